//! ONNX graphs on Candle: a plan compiled once at load, then run per frame.
//!
//! Compiling resolves every tensor name to a slot index, turns initializers
//! into constant tensors, folds shape-like parameters (Reshape shapes, Split
//! sizes, reduction axes, Slice bounds, Resize scales) into the op, checks
//! that every op is supported, and works out when each intermediate can be
//! dropped. Running walks the steps over a slot vector with candle ops: no
//! string lookups and no graph re-walking per frame.
//!
//! Owns: op semantics (ONNX opset 13-19 subset: Conv, Sigmoid, Exp, Add, Sub,
//! Mul, Div, Split, Concat, Reshape, Transpose, MatMul, ReduceMax, ReduceSum,
//! Softmax, Resize (nearest, integer scales), Slice, Flatten,
//! GlobalAveragePool, Clip, Relu, Gemm).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use super::cpu::Act;
use super::onnx_proto::{self, AttrValue, NodeProto, TensorProto};

/// The graph's own kernels: compiled with this module, so `candle-graph` keeps one `cfg`.
#[path = "kernels.rs"]
mod kernels;

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
}

fn attr_i(n: &NodeProto, k: &str, default: i64) -> i64 {
    match n.attributes.get(k) {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    }
}
fn attr_f(n: &NodeProto, k: &str) -> Option<f32> {
    match n.attributes.get(k) {
        Some(AttrValue::Float(v)) => Some(*v),
        _ => None,
    }
}
fn attr_ints(n: &NodeProto, k: &str) -> Option<Vec<i64>> {
    match n.attributes.get(k) {
        Some(AttrValue::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}
fn attr_s(n: &NodeProto, k: &str) -> Option<String> {
    match n.attributes.get(k) {
        Some(AttrValue::Bytes(v)) => Some(String::from_utf8_lossy(v).into_owned()),
        _ => None,
    }
}

fn to_tensor(t: &TensorProto) -> R<Tensor> {
    if t.external {
        return Err(format!(
            "initializer `{}` lives in an external file, which is not supported",
            t.name
        ));
    }
    let (dtype, data): (DType, &[u8]) = match t.data_type {
        onnx_proto::FLOAT => (DType::F32, &t.raw),
        onnx_proto::FLOAT16 => (DType::F16, &t.raw),
        onnx_proto::DOUBLE => (DType::F64, &t.raw),
        onnx_proto::INT64 => (DType::I64, &t.raw),
        other => {
            return Err(format!(
                "initializer `{}`: element type {other} is not supported",
                t.name
            ))
        }
    };
    let dims = t.shape(dtype.size_in_bytes())?;
    let t2 = Tensor::from_raw_buffer(data, dtype, &dims, &Device::Cpu)
        .map_err(|e| format!("initializer `{}`: {e}", t.name))?;
    match dtype {
        DType::F16 | DType::F64 => t2.to_dtype(DType::F32).map_err(|e| e.to_string()),
        _ => Ok(t2),
    }
}

impl Plan {
    pub fn from_onnx(bytes: &[u8]) -> R<Plan> {
        let model = onnx_proto::parse_model(bytes)?;
        let g = &model.graph;
        let inits: HashMap<&str, &TensorProto> = g.initializers.iter().map(|t| (t.name.as_str(), t)).collect();
        let input = g
            .inputs
            .iter()
            .find(|i| !inits.contains_key(i.name.as_str()))
            .ok_or("the graph has no input")?;
        let output = g.outputs.first().ok_or("the graph has no output")?;
        let mut slots: HashMap<String, usize> = HashMap::new();
        slots.insert(input.name.clone(), 0);
        let mut consts: HashMap<&str, Tensor> = HashMap::new();
        let int_param = |name: &str| -> R<Vec<i64>> {
            inits
                .get(name)
                .ok_or_else(|| format!("`{name}` must be a constant initializer"))?
                .to_i64s()
        };
        let mut steps = Vec::with_capacity(g.nodes.len());
        for n in &g.nodes {
            let what = |e: String| format!("node `{}` ({}): {e}", n.name, n.op_type);
            let op = match n.op_type.as_str() {
                "Conv" => {
                    let strides = attr_ints(n, "strides").unwrap_or(vec![1, 1]);
                    let dil = attr_ints(n, "dilations").unwrap_or(vec![1, 1]);
                    let (stride, dilation) = match (strides.as_slice(), dil.as_slice()) {
                        ([s, s2], [d, d2]) if s == s2 && d == d2 => (*s, *d),
                        _ => return Err(what("only 2-D convolutions with equal strides and dilations".into())),
                    };
                    if attr_s(n, "auto_pad").is_some_and(|p| p != "NOTSET") {
                        return Err(what("auto_pad is not supported; export with explicit pads".into()));
                    }
                    let pads = attr_ints(n, "pads").unwrap_or(vec![0; 4]);
                    let groups = attr_i(n, "group", 1);
                    // Bounds that no real network passes: a flipped bit must not ask for terabytes.
                    let small = |v: i64, lo: i64| (lo..=MAX_CONV_PARAM).contains(&v);
                    let [pt, pl, pb, pr] = pads.as_slice() else {
                        return Err(what(format!("pads must be 4 values, found {pads:?}")));
                    };
                    if !small(stride, 1)
                        || !small(dilation, 1)
                        || !(1..=1 << 20).contains(&groups)
                        || ![pt, pl, pb, pr].iter().all(|p| small(**p, 0))
                    {
                        return Err(what(format!(
                            "stride {stride}, dilation {dilation}, group {groups}, pads {pads:?}: out of range"
                        )));
                    }
                    Op::Conv {
                        stride: stride as usize,
                        pads: [*pt as usize, *pl as usize, *pb as usize, *pr as usize],
                        dilation: dilation as usize,
                        groups: groups as usize,
                        act: Act::None,
                    }
                }
                "Sigmoid" => Op::Sigmoid,
                "Exp" => Op::Exp,
                "Relu" => Op::Relu,
                "Clip" => {
                    let bound = |i: usize, default: f32| -> R<f32> {
                        match n.inputs.get(i).filter(|s| !s.is_empty()) {
                            Some(name) => inits
                                .get(name.as_str())
                                .ok_or_else(|| what(format!("`{name}` must be constant")))?
                                .to_f32s()?
                                .first()
                                .copied()
                                .ok_or_else(|| what("empty bound".into())),
                            None => Ok(default),
                        }
                    };
                    Op::Clip {
                        min: attr_f(n, "min").map_or_else(|| bound(1, f32::MIN), Ok)?,
                        max: attr_f(n, "max").map_or_else(|| bound(2, f32::MAX), Ok)?,
                    }
                }
                "Add" => Op::Binary(Bin::Add),
                "Sub" => Op::Binary(Bin::Sub),
                "Mul" => Op::Binary(Bin::Mul),
                "Div" => Op::Binary(Bin::Div),
                "Split" => {
                    let sizes = match n.inputs.get(1).filter(|s| !s.is_empty()) {
                        Some(s) => int_param(s).map_err(what)?,
                        None => attr_ints(n, "split").unwrap_or_default(),
                    };
                    Op::Split {
                        axis: attr_i(n, "axis", 0),
                        sizes: sizes.iter().map(|s| *s as usize).collect(),
                    }
                }
                "Concat" => Op::Concat {
                    axis: attr_i(n, "axis", 0),
                },
                "Reshape" => {
                    if attr_i(n, "allowzero", 0) != 0 {
                        return Err(what("allowzero=1 is not supported".into()));
                    }
                    let shape = n
                        .inputs
                        .get(1)
                        .ok_or_else(|| what("the shape input is missing".into()))?;
                    Op::Reshape {
                        shape: int_param(shape).map_err(what)?,
                    }
                }
                "Flatten" => Op::Flatten {
                    axis: attr_i(n, "axis", 1),
                },
                "Transpose" => {
                    let perm = attr_ints(n, "perm").ok_or_else(|| what("perm is required".into()))?;
                    let rank = perm.len() as i64;
                    if (0..rank).any(|i| !perm.contains(&i)) {
                        return Err(what(format!("perm {perm:?} is not a permutation")));
                    }
                    Op::Transpose {
                        perm: perm.iter().map(|p| *p as usize).collect(),
                        view: false,
                    }
                }
                "MatMul" => Op::MatMul,
                "Gemm" => {
                    if attr_i(n, "transA", 0) != 0
                        || attr_f(n, "alpha").unwrap_or(1.0) != 1.0
                        || attr_f(n, "beta").unwrap_or(1.0) != 1.0
                    {
                        return Err(what("only Gemm with transA=0, alpha=1, beta=1".into()));
                    }
                    Op::Gemm {
                        trans_b: attr_i(n, "transB", 0) != 0,
                    }
                }
                op @ ("ReduceMax" | "ReduceSum") => {
                    let axes = match n.inputs.get(1).filter(|s| !s.is_empty()) {
                        Some(s) => int_param(s).map_err(what)?,
                        None => attr_ints(n, "axes")
                            .ok_or_else(|| what("reducing over all axes is not supported".into()))?,
                    };
                    Op::Reduce {
                        max: op == "ReduceMax",
                        axes,
                        keepdims: attr_i(n, "keepdims", 1) != 0,
                    }
                }
                "Softmax" => Op::FastSoftmax {
                    axis: attr_i(n, "axis", -1),
                    scale: 1.0,
                },
                "Resize" => {
                    let mode = attr_s(n, "mode").unwrap_or_else(|| "nearest".into());
                    let scales = match n.inputs.get(2).filter(|s| !s.is_empty()) {
                        Some(s) => inits
                            .get(s.as_str())
                            .ok_or_else(|| what("scales must be constant".into()))?
                            .to_f32s()?,
                        None => return Err(what("only Resize with constant scales".into())),
                    };
                    let int =
                        |v: f32| (v.fract() == 0.0 && (1.0..=MAX_RESIZE_SCALE).contains(&v)).then_some(v as usize);
                    match (mode.as_str(), scales.as_slice()) {
                        ("nearest", [1.0, 1.0, h, w]) if int(*h).is_some() && int(*w).is_some() => Op::Resize {
                            scale_h: *h as usize,
                            scale_w: *w as usize,
                        },
                        _ => {
                            return Err(what(format!(
                                "only nearest Resize by whole-number scales up to {MAX_RESIZE_SCALE} (found {mode} {scales:?})"
                            )))
                        }
                    }
                }
                "Slice" => {
                    let p = |i: usize| -> R<Option<Vec<i64>>> {
                        n.inputs
                            .get(i)
                            .filter(|s| !s.is_empty())
                            .map(|s| int_param(s))
                            .transpose()
                    };
                    let starts = p(1).map_err(what)?.ok_or_else(|| what("starts are required".into()))?;
                    let ends = p(2).map_err(what)?.ok_or_else(|| what("ends are required".into()))?;
                    let axes = p(3)
                        .map_err(what)?
                        .unwrap_or_else(|| (0..starts.len() as i64).collect());
                    let steps = p(4).map_err(what)?.unwrap_or_else(|| vec![1; starts.len()]);
                    if steps.iter().any(|s| *s != 1) {
                        return Err(what("only Slice with step 1".into()));
                    }
                    Op::Slice { starts, ends, axes }
                }
                "GlobalAveragePool" => Op::GlobalAveragePool,
                other => {
                    return Err(format!(
                        "op `{other}` (node `{}`) is not supported on Candle yet",
                        n.name
                    ))
                }
            };
            // Inputs: graph values by slot, float initializers as constants.
            let data_inputs = match &op {
                Op::Split { .. }
                | Op::Reshape { .. }
                | Op::Reduce { .. }
                | Op::Slice { .. }
                | Op::Clip { .. }
                | Op::Resize { .. } => 1,
                _ => n.inputs.len(),
            };
            let mut inputs = Vec::with_capacity(data_inputs);
            for name in n.inputs.iter().take(data_inputs) {
                if let Some(&s) = slots.get(name) {
                    inputs.push(Src::Slot(s));
                } else if let Some(t) = inits.get(name.as_str()) {
                    if !consts.contains_key(name.as_str()) {
                        consts.insert(t.name.as_str(), to_tensor(t).map_err(what)?);
                    }
                    inputs.push(Src::Const(consts[name.as_str()].clone()));
                } else if name.is_empty() {
                    continue;
                } else {
                    return Err(what(format!("input `{name}` is produced by no earlier node")));
                }
            }
            let (least, most) = op.arity();
            if inputs.len() < least || inputs.len() > most {
                return Err(what(format!(
                    "{} inputs; this op takes {least} to {most}",
                    inputs.len()
                )));
            }
            if n.outputs.is_empty() {
                return Err(what("no outputs".into()));
            }
            let mut outputs = Vec::with_capacity(n.outputs.len());
            for o in &n.outputs {
                let next = slots.len();
                outputs.push(*slots.entry(o.clone()).or_insert(next));
            }
            steps.push(Step {
                name: format!("{} {}", n.op_type, n.name),
                op,
                inputs,
                outputs,
                free: Vec::new(),
            });
        }
        let output_slot = *slots
            .get(&output.name)
            .ok_or("the graph output is produced by no node")?;
        fuse_activations(&mut steps, output_slot);
        fuse_softmax(&mut steps, output_slot);
        for step in &mut steps {
            compile_conv(step)?;
        }
        mark_transpose_views(&mut steps);
        // Liveness: free each slot after the last step that reads it.
        let mut last: HashMap<usize, usize> = HashMap::new();
        for (i, s) in steps.iter().enumerate() {
            for src in &s.inputs {
                if let Src::Slot(k) = src {
                    last.insert(*k, i);
                }
            }
        }
        for (slot, i) in last {
            if slot != output_slot {
                steps[i].free.push(slot);
            }
        }
        Ok(Plan {
            steps,
            slots: slots.len(),
            input: 0,
            output: output_slot,
            input_name: input.name.clone(),
            input_dims: input.dims.clone(),
            metadata: model.metadata,
        })
    }

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
            let outs = apply(&step.op, &args).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", step.name)))?;
            if let Some(times) = times.as_deref_mut() {
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

/// The steps that read each slot.
fn readers(steps: &[Step]) -> HashMap<usize, Vec<usize>> {
    let mut r: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        for src in &s.inputs {
            if let Src::Slot(k) = src {
                r.entry(*k).or_default().push(i);
            }
        }
    }
    r
}

/// Folds the activation after a convolution into it: `Conv -> Relu`, `-> Clip(0, 6)`,
/// `-> Sigmoid`, and SiLU as exported (`Conv -> Sigmoid -> Mul(conv, sigmoid)`),
/// where nothing else reads the convolution's output.
fn fuse_activations(steps: &mut Vec<Step>, graph_output: usize) {
    let readers = readers(steps);
    let only = |slot: usize| match readers.get(&slot).map(Vec::as_slice) {
        Some([j]) => Some(*j),
        _ => None,
    };
    let reads = |step: &Step, slot: usize| step.inputs.iter().any(|s| matches!(s, Src::Slot(k) if *k == slot));
    let mut dead = vec![false; steps.len()];
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::Conv { act: Act::None, .. }) || steps[i].outputs.len() != 1 {
            continue;
        }
        let y = steps[i].outputs[0];
        if y == graph_output {
            continue;
        }
        let (act, last) = match readers.get(&y).map(Vec::as_slice) {
            Some(&[j]) => match steps[j].op {
                Op::Relu => (Act::Relu, j),
                Op::Sigmoid => (Act::Sigmoid, j),
                Op::Clip { min, max } if min == 0.0 && max == 6.0 => (Act::Relu6, j),
                _ => continue,
            },
            Some(&[a, b]) => {
                let (sig, mul) = if matches!(steps[a].op, Op::Sigmoid) {
                    (a, b)
                } else {
                    (b, a)
                };
                let s = steps[sig].outputs[0];
                let is_silu = matches!(steps[sig].op, Op::Sigmoid)
                    && matches!(steps[mul].op, Op::Binary(Bin::Mul))
                    && steps[mul].inputs.len() == 2
                    && reads(&steps[mul], y)
                    && reads(&steps[mul], s)
                    && only(s) == Some(mul)
                    && s != graph_output;
                if !is_silu {
                    continue;
                }
                dead[sig] = true;
                (Act::Silu, mul)
            }
            _ => continue,
        };
        dead[last] = true;
        steps[i].outputs = std::mem::take(&mut steps[last].outputs);
        if let Op::Conv { act: a, .. } = &mut steps[i].op {
            *a = act;
        }
    }
    let mut i = 0;
    steps.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
}

/// Finds softmax as exports spell it out over one axis,
/// `d = Div(e, ReduceSum(e))` with `e = Exp(Sub(x, ReduceMax(x)))`, and
/// `x = Mul(y, scalar)` before it, where nothing else reads the
/// intermediates, and runs it as one `FastSoftmax` step.
fn fuse_softmax(steps: &mut Vec<Step>, graph_output: usize) {
    let readers = readers(steps);
    let mut dead = vec![false; steps.len()];
    for r in 0..steps.len() {
        let Some(f) = match_softmax(steps, &readers, r, graph_output) else {
            continue;
        };
        for i in f.removed.into_iter().flatten() {
            dead[i] = true;
        }
        steps[r].op = Op::FastSoftmax {
            axis: f.axis,
            scale: f.scale,
        };
        steps[r].name = format!("Softmax (fused) {}", steps[r].name.trim_start_matches("ReduceMax "));
        steps[r].inputs = vec![Src::Slot(f.input)];
        steps[r].outputs = std::mem::take(&mut steps[f.div].outputs);
    }
    let mut i = 0;
    steps.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
}

/// A softmax spelled out from step `r` (its `ReduceMax`) on.
struct SoftmaxMatch {
    axis: i64,
    scale: f32,
    input: usize,
    div: usize,
    /// Steps folded in: Sub, Exp, ReduceSum, Div, and the scalar Mul if any.
    removed: [Option<usize>; 5],
}

fn match_softmax(
    steps: &[Step],
    readers: &HashMap<usize, Vec<usize>>,
    r: usize,
    graph_output: usize,
) -> Option<SoftmaxMatch> {
    let read_by = |slot: usize| readers.get(&slot).map(Vec::as_slice).unwrap_or(&[]);
    let slot = |s: &Src| match s {
        Src::Slot(k) => Some(*k),
        Src::Const(_) => None,
    };
    let ins = |i: usize| steps[i].inputs.iter().map(slot).collect::<Vec<_>>();
    let out = |i: usize| steps[i].outputs.first().copied().unwrap_or(usize::MAX);
    let Op::Reduce {
        max: true,
        ref axes,
        keepdims: true,
    } = steps[r].op
    else {
        return None;
    };
    let ([axis], Some(Some(x))) = (axes.as_slice(), steps[r].inputs.first().map(slot)) else {
        return None;
    };
    let m = out(r);
    let [sub] = *read_by(m) else { return None };
    if !matches!(steps[sub].op, Op::Binary(Bin::Sub)) || ins(sub) != [Some(x), Some(m)] {
        return None;
    }
    let [exp] = *read_by(out(sub)) else { return None };
    if !matches!(steps[exp].op, Op::Exp) {
        return None;
    }
    let e = out(exp);
    let [a, b] = *read_by(e) else { return None };
    let (sum, div) = if matches!(steps[a].op, Op::Reduce { .. }) {
        (a, b)
    } else {
        (b, a)
    };
    let sum_ok =
        matches!(&steps[sum].op, Op::Reduce { max: false, axes, keepdims: true } if axes.as_slice() == [*axis]);
    if !sum_ok
        || read_by(out(sum)) != [div]
        || !matches!(steps[div].op, Op::Binary(Bin::Div))
        || ins(div) != [Some(e), Some(out(sum))]
        || [m, out(sub), e, out(sum)].contains(&graph_output)
    {
        return None;
    }
    let mut found = SoftmaxMatch {
        axis: *axis,
        scale: 1.0,
        input: x,
        div,
        removed: [Some(sub), Some(exp), Some(sum), Some(div), None],
    };
    // A scalar Mul before it, read only by this softmax, folds in as its scale.
    let producer = steps.iter().position(|s| s.outputs == [x]);
    if let Some(p) = producer.filter(|_| read_by(x).len() == 2 && x != graph_output) {
        if let (Op::Binary(Bin::Mul), [Src::Slot(y), Src::Const(c)]) = (&steps[p].op, steps[p].inputs.as_slice()) {
            let v = c
                .flatten_all()
                .and_then(|c| c.to_dtype(DType::F32))
                .and_then(|c| c.to_vec1::<f32>());
            if let Ok([v]) = v.as_deref() {
                (found.input, found.scale, found.removed[4]) = (*y, *v, Some(p));
            }
        }
    }
    Some(found)
}

/// Puts a convolution with constant weights on our kernels where they apply.
fn compile_conv(step: &mut Step) -> R<()> {
    let Op::Conv {
        stride,
        pads,
        dilation,
        groups,
        act,
    } = step.op
    else {
        return Ok(());
    };
    let (Some(Src::Const(w)), bias) = (step.inputs.get(1), step.inputs.get(2)) else {
        return Ok(());
    };
    let bias = match bias {
        Some(Src::Const(b)) => Some(b),
        Some(Src::Slot(_)) => return Ok(()),
        None => None,
    };
    let (cout, cin_g, ..) = w.dims4().map_err(|e| format!("{}: {e}", step.name))?;
    // ONNX pads (top, left, bottom, right) -> ours (top, bottom, left, right).
    let pad = [pads[0], pads[2], pads[1], pads[3]];
    let e = |x: candle_core::Error| format!("{}: {x}", step.name);
    step.op = match (dilation, groups) {
        (1, 1) => Op::FastConv(kernels::Conv::new(w, bias, stride, pad, act).map_err(e)?),
        (1, g) if g == cout && cin_g == 1 => {
            Op::FastDepthwise(kernels::Depthwise::new(w, bias, stride, pad, act).map_err(e)?)
        }
        _ => return Ok(()),
    };
    step.inputs.truncate(1);
    Ok(())
}

/// A Transpose that swaps the last two axes and is read only by MatMuls stays a
/// view: our MatMul reads the strides as they are, so the copy is never made.
fn mark_transpose_views(steps: &mut [Step]) {
    let readers = readers(steps);
    for i in 0..steps.len() {
        let Op::Transpose { ref perm, .. } = steps[i].op else {
            continue;
        };
        let only_matmuls = steps[i].outputs.iter().all(|o| {
            readers
                .get(o)
                .is_some_and(|r| r.iter().all(|&j| matches!(steps[j].op, Op::MatMul)))
        });
        if swaps_last_two(perm) && only_matmuls {
            if let Op::Transpose { view, .. } = &mut steps[i].op {
                *view = true;
            }
        }
    }
}

/// Whether `perm` swaps the last two axes and keeps the others.
fn swaps_last_two(perm: &[usize]) -> bool {
    let n = perm.len();
    n >= 2 && perm[n - 2] == n - 1 && perm[n - 1] == n - 2 && perm[..n - 2].iter().enumerate().all(|(i, p)| i == *p)
}

/// An ONNX axis (negative counts from the end) as an index below `rank`.
fn axis(a: i64, rank: usize) -> candle_core::Result<usize> {
    let i = if a < 0 { a + rank as i64 } else { a };
    usize::try_from(i)
        .ok()
        .filter(|&i| i < rank)
        .ok_or_else(|| candle_core::Error::Msg(format!("axis {a} for rank {rank}")))
}

fn apply(op: &Op, a: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
    // Compile checked each op's input count (`Op::arity`); this keeps a miss an error.
    let arg = |i: usize| {
        a.get(i)
            .copied()
            .ok_or_else(|| candle_core::Error::Msg(format!("input {i} is missing")))
    };
    let x = arg(0)?;
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Conv {
            stride,
            pads,
            dilation,
            groups,
            act,
        } => {
            let [t, l, b, r] = *pads;
            let y = if t == b && l == r && t == l {
                x.conv2d(arg(1)?, t, *stride, *dilation, *groups)?
            } else {
                x.pad_with_zeros(2, t, b)?
                    .pad_with_zeros(3, l, r)?
                    .conv2d(arg(1)?, 0, *stride, *dilation, *groups)?
            };
            let y = match a.get(2) {
                Some(bias) => y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?)?,
                None => y,
            };
            one(match act {
                Act::None => y,
                act => y.contiguous()?.apply_op1_no_bwd(&kernels::Activation(*act))?,
            })
        }
        Op::FastConv(k) => one(kernels::contiguous(x)?.apply_op1_no_bwd(k)?),
        Op::FastDepthwise(k) => one(kernels::contiguous(x)?.apply_op1_no_bwd(k)?),
        Op::Sigmoid => one(kernels::contiguous(x)?.apply_op1_no_bwd(&kernels::Activation(Act::Sigmoid))?),
        Op::Exp => one(kernels::contiguous(x)?.apply_op1_no_bwd(&kernels::Activation(Act::Exp))?),
        Op::Relu => one(x.relu()?),
        Op::Clip { min, max } => one(x.clamp(*min, *max)?),
        Op::Binary(b) => one(match b {
            Bin::Add => x.broadcast_add(arg(1)?)?,
            Bin::Sub => x.broadcast_sub(arg(1)?)?,
            Bin::Mul => x.broadcast_mul(arg(1)?)?,
            Bin::Div => x.broadcast_div(arg(1)?)?,
        }),
        Op::FastSoftmax { axis, scale } => one(kernels::contiguous(x)?.apply_op1_no_bwd(&kernels::Softmax {
            axis: *axis,
            scale: *scale,
        })?),
        Op::Split { axis: ax, sizes } => {
            let d = axis(*ax, x.rank())?;
            let mut start = 0;
            let mut outs = Vec::with_capacity(sizes.len());
            for s in sizes {
                outs.push(x.narrow(d, start, *s)?);
                start += s;
            }
            Ok(outs)
        }
        Op::Concat { axis: ax } => {
            let d = axis(*ax, x.rank())?;
            one(Tensor::cat(a, d)?)
        }
        Op::Reshape { shape } => {
            let dims = x.dims();
            let mut out: Vec<usize> = Vec::with_capacity(shape.len());
            let mut infer = None;
            let bad = || candle_core::Error::Msg(format!("cannot reshape {dims:?} to {shape:?}"));
            for (i, s) in shape.iter().enumerate() {
                match *s {
                    0 => out.push(*dims.get(i).ok_or_else(bad)?),
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    s => out.push(usize::try_from(s).map_err(|_| bad())?),
                }
            }
            if let Some(i) = infer {
                let known = out.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(bad)?;
                out[i] = x.elem_count() / known.max(1);
            }
            if out.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) != Some(x.elem_count()) {
                return Err(bad());
            }
            one(kernels::contiguous(x)?.reshape(out)?)
        }
        Op::Flatten { axis: ax } => {
            let d = if *ax == x.rank() as i64 {
                x.rank()
            } else {
                axis(*ax, x.rank())?
            };
            let outer: usize = x.dims()[..d].iter().product();
            one(kernels::contiguous(x)?.reshape((outer, x.elem_count() / outer.max(1)))?)
        }
        Op::Transpose { perm, view: true } => one(x.permute(perm.as_slice())?),
        // Our transpose reads any strides: a view is not copied twice.
        Op::Transpose { perm, view: false } => one(x.apply_op1_no_bwd(&kernels::Transpose(perm.clone()))?),
        Op::MatMul => {
            // candle's matmul reads the strides of a transposed view as they are; other
            // layouts it refuses are made contiguous first.
            let mm = |l: &Tensor, r: &Tensor| {
                if l.rank() == r.rank() {
                    l.matmul(r)
                } else {
                    l.broadcast_matmul(r)
                }
            };
            let b = arg(1)?;
            let same_batch = x.rank() == b.rank() && x.rank() >= 2 && {
                let r = x.rank();
                x.dims()[..r - 2] == b.dims()[..r - 2]
            };
            if same_batch && x.dtype() == DType::F32 && b.dtype() == DType::F32 {
                return one(x.apply_op2_no_bwd(b, &kernels::MatMul)?);
            }
            one(match mm(x, b) {
                Ok(y) => y,
                Err(_) => mm(&kernels::contiguous(x)?, &b.contiguous()?)?,
            })
        }
        Op::Gemm { trans_b } => {
            let w = if *trans_b { arg(1)?.t()? } else { arg(1)?.clone() };
            let y = x.matmul(&w.contiguous()?)?;
            one(match a.get(2) {
                Some(c) => y.broadcast_add(c)?,
                None => y,
            })
        }
        Op::Reduce { max, axes, keepdims } => {
            let mut ds: Vec<usize> = axes
                .iter()
                .map(|a| axis(*a, x.rank()))
                .collect::<candle_core::Result<_>>()?;
            ds.dedup();
            ds.sort_unstable_by(|a, b| b.cmp(a));
            let mut y = x.clone();
            for d in ds {
                y = match (max, keepdims) {
                    (true, true) => y.max_keepdim(d)?,
                    (true, false) => y.max(d)?,
                    (false, true) => y.sum_keepdim(d)?,
                    (false, false) => y.sum(d)?,
                };
            }
            one(y)
        }
        Op::Resize { scale_h, scale_w } => one(kernels::contiguous(x)?.apply_op1_no_bwd(&kernels::Upsample {
            sh: *scale_h,
            sw: *scale_w,
        })?),
        Op::Slice { starts, ends, axes, .. } => {
            let mut y = x.clone();
            for ((s, e), ax) in starts.iter().zip(ends).zip(axes) {
                let d = axis(*ax, y.rank())?;
                let n = y.dims()[d] as i64;
                let clamp = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
                let (s, e) = (clamp(*s), clamp(*e));
                y = y.narrow(d, s as usize, (e - s).max(0) as usize)?;
            }
            one(y)
        }
        Op::GlobalAveragePool => one(x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?),
    }
}

/// `bench layouts`: the NCHW kernels of this module against the NHWC ones of
/// `nhwc.rs` on EfficientNet-Lite0's depthwise and pointwise shapes (random
/// data, ReLU6 fused, median of `iters` runs each, on the CPU pool), which is
/// how the native plan's layout was chosen.
pub fn bench_layouts(iters: usize) -> Result<String, String> {
    use super::cpu::{self, Isa};
    use super::nhwc;
    use std::time::Instant;
    let e = |x: candle_core::Error| x.to_string();
    // The median of `iters` runs of `f`, in ms.
    let time = |f: &mut dyn FnMut()| {
        let mut v: Vec<f64> = (0..iters.max(1))
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let isa = Isa::detect();
    let mut out = String::from("layer | NCHW (candle custom op) | NHWC (plan kernel) | NCHW / NHWC\n");
    // (channels in, channels out, size, k, stride): depthwise where in == out and k > 1.
    let shapes = [
        (32, 32, 112, 3, 1),
        (96, 96, 112, 3, 2),
        (144, 144, 56, 3, 1),
        (144, 144, 56, 5, 2),
        (240, 240, 28, 5, 1),
        (672, 672, 14, 5, 1),
        (1152, 1152, 7, 5, 1),
        (16, 96, 112, 1, 1),
        (144, 24, 56, 1, 1),
        (240, 40, 28, 1, 1),
        (672, 112, 14, 1, 1),
        (192, 1152, 7, 1, 1),
    ];
    for (cin, cout, h, k, s) in shapes {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, cin, h, h), &dev).map_err(e)?;
        let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
        let mut x_nhwc = vec![0f32; xs.len()];
        nhwc::nchw_to_nhwc(isa, &xs, cin, &mut x_nhwc);
        // TF "same" padding, as EfficientNet-Lite's layers have it.
        let total = ((h.div_ceil(s) - 1) * s + k).saturating_sub(h);
        let pad = [total / 2, total - total / 2, total / 2, total - total / 2];
        let geo = nhwc::Geometry { k, stride: s, pad };
        let (oh, ow) = geo.out_size(h, h);
        let b = vec![0.1f32; cout];
        let bt = Tensor::new(b.as_slice(), &dev).map_err(e)?;
        let depthwise = k > 1 && cin == cout;
        let mut y = vec![0f32; oh * ow * cout];
        let (nchw, nhwc_t) = if depthwise {
            let w = Tensor::randn(0f32, 0.1, (cin, 1, k, k), &dev).map_err(e)?;
            let wv: Vec<f32> = w.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
            let op = kernels::Depthwise::new(&w, Some(&bt), s, pad, Act::Relu6).map_err(e)?;
            let dw = nhwc::Depthwise::new(&wv, &b, cin, geo, Act::Relu6)?;
            cpu::run(|| {
                (
                    time(&mut || drop(x.apply_op1_no_bwd(&op))),
                    time(&mut || dw.run(isa, &x_nhwc, h, h, &mut y)),
                )
            })
        } else {
            let w = Tensor::randn(0f32, 0.1, (cout, cin, 1, 1), &dev).map_err(e)?;
            let wv: Vec<f32> = w.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
            let op = kernels::Conv::new(&w, Some(&bt), 1, [0; 4], Act::Relu6).map_err(e)?;
            let pw = nhwc::Pointwise::new(&wv, &b, cout, cin, Act::Relu6)?;
            cpu::run(|| {
                (
                    time(&mut || drop(x.apply_op1_no_bwd(&op))),
                    time(&mut || pw.run(isa, &x_nhwc, h * h, None, &mut y)),
                )
            })
        };
        let kind = if depthwise { "depthwise" } else { "pointwise" };
        out.push_str(&format!(
            "{kind} {k}x{k} s{s} {cin}->{cout} @{h}x{h} | {nchw:.3} ms | {nhwc_t:.3} ms | {:.2}\n",
            nchw / nhwc_t
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
