//! ONNX graphs on Candle: a plan compiled once at load, then run per frame.
//!
//! Compiling resolves every tensor name to a slot index, turns initializers
//! into constant tensors, folds shape-like parameters (Reshape shapes, Split
//! sizes, reduction axes, Slice bounds, Resize scales) into the op, checks
//! that every op is supported, and works out when each intermediate can be
//! dropped. Running walks the steps over a slot vector with candle ops: no
//! string lookups and no graph re-walking per frame.
//!
//! Owns: the plan's shape (steps over slots) and running it. The rooms:
//! `compile.rs` (ONNX -> steps: names to slots, constants, folded
//! parameters, checks), `fuse.rs` (the passes over the steps: activations
//! into convolutions, spelled-out softmax, convolutions onto our kernels,
//! transposes as views), `ops.rs` (each op's semantics over candle tensors:
//! ONNX opset 13-19 subset: Conv, Sigmoid, Exp, Add, Sub, Mul, Div, Split,
//! Concat, Reshape, Transpose, MatMul, ReduceMax, ReduceSum, Softmax, Resize
//! (nearest, integer scales), Slice, Flatten, GlobalAveragePool, Clip, Relu,
//! Gemm), `kernels/` (our kernels as candle custom ops) and `bench.rs`
//! (`bench layouts`).

use std::collections::HashMap;

use candle_core::Tensor;

use super::cpu::Act;

mod bench;
mod compile;
/// The ops whose CPU form is our CPU kernels, on any device (the GPU plan).
mod device;
mod fuse;
/// The graph's own kernels: compiled with this module, so `candle-graph` keeps one `cfg`.
mod kernels;
mod ops;

pub use bench::bench_layouts;

/// Whether ONNX graphs compile in this build.
pub const COMPILED: bool = true;

type R<T> = Result<T, String>;

enum Src {
    Slot(usize),
    Const(Tensor),
}

/// Element-wise binary ops, broadcasting.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
}

enum Op {
    /// candle's conv2d: for what our kernels do not take (dilation, other groupings).
    Conv {
        stride: usize,
        /// ONNX order: top, left, bottom, right.
        pads: [usize; 4],
        dilation: usize,
        groups: usize,
        act: Act,
    },
    /// Our kernels (`kernels.rs`), weights packed at compile, activation fused.
    FastConv(kernels::Conv),
    FastDepthwise(kernels::Depthwise),
    /// Device plans: a depthwise convolution as one `device_ops::Depthwise` (inputs x, w, bias).
    DeviceDepthwise {
        stride: usize,
        pads: [usize; 4],
        act: Act,
    },
    Sigmoid,
    Exp,
    Relu,
    Clip {
        min: f32,
        max: f32,
    },
    Binary(Bin),
    /// Softmax over one axis of `scale * x`: ONNX's, or the one exports spell
    /// out (`ReduceMax, Sub, Exp, ReduceSum, Div`, after a `Mul` by a scalar), found at compile.
    FastSoftmax {
        axis: i64,
        scale: f32,
    },
    Split {
        axis: i64,
        sizes: Vec<usize>,
    },
    Concat {
        axis: i64,
    },
    Reshape {
        shape: Vec<i64>,
    },
    Flatten {
        axis: i64,
    },
    Transpose {
        perm: Vec<usize>,
        /// A view, not a copy: set at compile where the last two axes swap and only MatMuls read it.
        view: bool,
    },
    MatMul,
    Gemm {
        trans_b: bool,
    },
    Reduce {
        max: bool,
        axes: Vec<i64>,
        keepdims: bool,
    },
    Resize {
        scale_h: usize,
        scale_w: usize,
    },
    /// Step 1 only (checked at compile).
    Slice {
        starts: Vec<i64>,
        ends: Vec<i64>,
        axes: Vec<i64>,
    },
    GlobalAveragePool,
}

/// Convolution strides, dilations and pads above this are refused at compile.
const MAX_CONV_PARAM: i64 = 1024;
/// Resize scales above this are refused at compile.
const MAX_RESIZE_SCALE: f32 = 64.0;

impl Op {
    /// How many data inputs (graph values or float constants) the op takes: (least, most).
    fn arity(&self) -> (usize, usize) {
        match self {
            Op::Conv { .. } | Op::Gemm { .. } => (2, 3),
            Op::DeviceDepthwise { .. } => (3, 3),
            Op::FastConv(_) | Op::FastDepthwise(_) => (1, 1),
            Op::Binary(_) | Op::MatMul => (2, 2),
            Op::Concat { .. } => (1, usize::MAX),
            _ => (1, 1),
        }
    }
}

struct Step {
    name: String,
    op: Op,
    inputs: Vec<Src>,
    outputs: Vec<usize>,
    /// Slots no step after this one reads.
    free: Vec<usize>,
}

pub struct Plan {
    steps: Vec<Step>,
    slots: usize,
    input: usize,
    output: usize,
    pub input_name: String,
    /// Graph input dimensions (-1 where dynamic).
    pub input_dims: Vec<i64>,
    pub metadata: HashMap<String, String>,
    /// Compiled for a device (`from_onnx_on`): ops over candle and `device_ops`, not our CPU kernels.
    generic: bool,
}

impl Plan {
    pub fn run(&self, x: Tensor) -> candle_core::Result<Tensor> {
        self.run_profiled(x, None)
    }

    /// Runs the plan; with `times`, records each step's duration.
    pub fn run_profiled(
        &self,
        x: Tensor,
        mut times: Option<&mut Vec<(String, std::time::Duration)>>,
    ) -> candle_core::Result<Tensor> {
        let mut vals: Vec<Option<Tensor>> = vec![None; self.slots];
        vals[self.input] = Some(x);
        for step in &self.steps {
            let t0 = std::time::Instant::now();
            let mut args: Vec<&Tensor> = Vec::with_capacity(step.inputs.len());
            for s in &step.inputs {
                args.push(match s {
                    Src::Slot(k) => vals[*k]
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg(format!("{}: input not computed", step.name)))?,
                    Src::Const(t) => t,
                });
            }
            let outs = match self.generic {
                true => device::apply(&step.op, &args),
                false => ops::apply(&step.op, &args),
            }
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", step.name)))?;
            if let Some(times) = times.as_deref_mut() {
                // On a GPU the launch returns at once: wait for the step, so its time is its own.
                if let Some(t) = outs.first().filter(|t| !t.device().is_cpu()) {
                    t.device().synchronize()?;
                }
                let dims = outs.first().map(|t| t.dims().to_vec()).unwrap_or_default();
                times.push((format!("{} -> {dims:?}", step.name), t0.elapsed()));
            }
            for (slot, t) in step.outputs.iter().zip(outs) {
                vals[*slot] = Some(t);
            }
            for k in &step.free {
                vals[*k] = None;
            }
        }
        vals[self.output]
            .take()
            .ok_or_else(|| candle_core::Error::Msg("the graph output was not computed".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::onnx_proto;
    use super::compile::to_tensor;
    use super::*;
    use candle_core::{Device, Tensor};

    /// `tests/fixtures/fusions.onnx` (made by `make_fusions.py` beside it): SiLU and softmax
    /// as YOLO exports spell them out.
    #[test]
    fn silu_and_the_spelled_out_softmax_fuse_and_match_candles_ops() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fusions.onnx")).unwrap();
        let plan = Plan::from_onnx(&bytes).unwrap();
        let names: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["Conv conv", "Reshape reshape", "Softmax (fused) max"]);
        assert!(matches!(plan.steps[0].op, Op::FastConv(_)));
        assert!(matches!(plan.steps[2].op, Op::FastSoftmax { axis: -1, scale } if scale == 0.25));

        let model = onnx_proto::parse_model(&bytes).unwrap();
        let init = |n: &str| to_tensor(model.graph.initializers.iter().find(|t| t.name == n).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 6), &Device::Cpu).unwrap();
        let c = x
            .conv2d(&init("w"), 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&init("b").reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        let q = (c.silu().unwrap().reshape((1, 8, 36)).unwrap() * 0.25).unwrap();
        let e = q.broadcast_sub(&q.max_keepdim(2).unwrap()).unwrap().exp().unwrap();
        let want: Vec<f32> = e
            .broadcast_div(&e.sum_keepdim(2).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = plan.run(x).unwrap();
        assert_eq!(got.dims(), [1, 8, 36]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!((a - e).abs() <= 1e-4 * e.abs().max(1e-3), "at {i}: {a} vs {e}");
        }
    }
}
