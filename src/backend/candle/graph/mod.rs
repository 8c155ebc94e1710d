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

/// The CPU plan's buffers, laid out at the first frame: no tensor allocated per step.
mod arena;
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
    /// `v softmax(scale q k)ᵀ`, the softmax over the scores' last axis (`axis` as the
    /// softmax had it): inputs `q`, `k`, `v`; found at compile where a `MatMul` reads `v`
    /// and the transpose of a softmax of `MatMul(q, k)`, and nothing else reads those.
    Attention {
        axis: i64,
        scale: f32,
    },
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
            Op::Attention { .. } => (3, 3),
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
    /// The CPU plan's arena, for the input dims of the frame that laid it out.
    arena: Option<arena::Arena>,
    /// Input dims whose arena could not be laid out (logged once; they run on candle).
    arena_refused: Option<Vec<usize>>,
}

/// `AEI_ARENA=off` runs the CPU plan over candle tensors, one per step (for comparisons).
fn arena_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("AEI_ARENA").as_deref() != Ok("off"))
}

impl Plan {
    /// Runs the plan over candle tensors (the reference the arena is checked against).
    #[cfg(test)]
    pub fn run(&self, x: Tensor) -> candle_core::Result<Tensor> {
        self.walk(x, None, None)
    }

    /// Runs the plan on `input` of `dims`, appends its output to `out` and returns the
    /// output's dims; with `times`, records each step's duration. On the CPU the first frame of
    /// a size runs over candle tensors and lays out the arena; the frames after run in it.
    pub fn run_slice(
        &mut self,
        input: &[f32],
        dims: &[usize],
        device: &candle_core::Device,
        out: &mut Vec<f32>,
        times: Option<&mut Vec<(String, std::time::Duration)>>,
    ) -> candle_core::Result<Vec<usize>> {
        let use_arena = !self.generic && arena_enabled() && self.arena_refused.as_deref() != Some(dims);
        if let Some(mut a) = self.arena.take().filter(|a| use_arena && a.fits(dims)) {
            let r = a.run(self, input, out, times);
            self.arena = Some(a);
            return r;
        }
        let x = Tensor::from_slice(input, dims, device)?;
        let mut traced = use_arena.then(|| vec![None; self.slots]);
        let y = self.walk(x, times, traced.as_mut())?;
        if let Some(traced) = traced {
            // The traced frame's tensors are freed: hand their heap back before the arena takes
            // its own, so that peak memory is the larger of the two, not their sum.
            crate::memory::return_free_memory();
            match arena::Arena::build(self, dims, &traced) {
                Ok(a) => {
                    log::debug!(
                        "graph arena for {dims:?}: {:.1} MiB, {} of {} steps on candle",
                        a.len() as f64 * 4.0 / (1 << 20) as f64,
                        a.fallbacks,
                        self.steps.len()
                    );
                    self.arena = Some(a);
                }
                Err(e) => {
                    log::warn!("graph arena for {dims:?} not laid out ({e}); this size runs on candle tensors");
                    self.arena_refused = Some(dims.to_vec());
                }
            }
        }
        out.extend(y.flatten_all()?.to_vec1::<f32>()?);
        Ok(y.dims().to_vec())
    }

    /// Runs the plan over candle tensors; with `times`, records each step's duration; with
    /// `traced`, each slot's dims.
    fn walk(
        &self,
        x: Tensor,
        mut times: Option<&mut Vec<(String, std::time::Duration)>>,
        mut traced: Option<&mut Vec<Option<Vec<usize>>>>,
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
                if let Some(tr) = traced.as_deref_mut() {
                    tr[*slot] = Some(t.dims().to_vec());
                }
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

    /// `tests/fixtures/attention.onnx` (made by `make_attention.py` beside it): YOLOv12's
    /// attention fuses into one step, and both the first frame (over candle tensors, the
    /// unfused ops) and the frames after (the arena, the fused kernel reading q, k and v
    /// through the transposes' strides) match candle's own ops.
    #[test]
    fn attention_fuses_and_matches_candles_ops_on_both_paths() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/attention.onnx")).unwrap();
        let mut plan = Plan::from_onnx(&bytes).unwrap();
        let names: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Reshape reshape",
                "Split split",
                "Transpose tq",
                "Transpose tk",
                "Transpose tv",
                "Attention (fused) out"
            ]
        );
        assert!(
            matches!(plan.steps[5].op, Op::Attention { axis: -1, scale } if (scale - 8f32.powf(-0.5)).abs() < 1e-7)
        );

        let x = Tensor::randn(0f32, 2.0, (1, 100, 48), &Device::Cpu).unwrap();
        let r = x.reshape((1, 100, 2, 24)).unwrap();
        let part = |i: usize| r.narrow(3, 8 * i, 8).unwrap();
        let q = part(0).permute((0, 2, 1, 3)).unwrap().contiguous().unwrap();
        let k = part(1).permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        let v = part(2).permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        let s = (q.matmul(&k).unwrap() * 8f64.powf(-0.5)).unwrap();
        let e = s.broadcast_sub(&s.max_keepdim(3).unwrap()).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
        let want: Vec<f32> = v
            .matmul(&p.transpose(2, 3).unwrap().contiguous().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let input: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for frame in 0..3 {
            let mut got = Vec::new();
            let dims = plan
                .run_slice(&input, &[1, 100, 48], &Device::Cpu, &mut got, None)
                .unwrap();
            assert_eq!(dims, [1, 2, 8, 100]);
            if frame > 0 {
                let a = plan.arena.as_ref().expect("the arena laid out after the first frame");
                assert_eq!(a.fallbacks, 0, "the fused step runs on its kernel");
            }
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-4 * e.abs().max(1e-2),
                    "frame {frame} at {i}: {a} vs {e}"
                );
            }
        }
    }
}
