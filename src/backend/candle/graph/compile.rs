//! ONNX -> a plan: every tensor name resolved to a slot, initializers made
//! constants, shape-like parameters folded into the op, every op and its
//! attributes checked, then the passes of `fuse.rs` and liveness.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::super::cpu::Act;
use super::super::onnx_proto::{self, AttrValue, NodeProto, TensorProto};
use super::fuse::{compile_conv, fuse_activations, fuse_attention, fuse_softmax, mark_transpose_views};
use super::{Bin, Op, Plan, Src, Step, MAX_CONV_PARAM, MAX_RESIZE_SCALE, R};

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

pub(super) fn to_tensor(t: &TensorProto) -> R<Tensor> {
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
    /// The plan for the CPU: convolutions on our CPU kernels.
    pub fn from_onnx(bytes: &[u8]) -> R<Plan> {
        Plan::compile(bytes, None)
    }

    /// The plan for `device` over candle ops and `device_ops` (one launch per depthwise
    /// convolution and per epilogue), its constants uploaded once, here. On the CPU it is the
    /// GPU plan's reference.
    pub fn from_onnx_on(bytes: &[u8], device: &Device) -> R<Plan> {
        Plan::compile(bytes, Some(device))
    }

    fn compile(bytes: &[u8], device: Option<&Device>) -> R<Plan> {
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
        if device.is_none() {
            fuse_attention(&mut steps, output_slot);
        }
        for step in &mut steps {
            match device {
                None => compile_conv(step)?,
                Some(_) => super::device::depthwise_conv(step)?,
            }
        }
        mark_transpose_views(&mut steps);
        if let Some(d) = device {
            super::device::upload(&mut steps, d)?;
        }
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
            generic: device.is_some(),
            arena: None,
            arena_refused: None,
        })
    }
}
