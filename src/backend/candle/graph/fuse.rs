//! The passes over a compiled plan's steps: activations folded into the
//! convolution before them, softmax found where exports spell it out,
//! attention (`MatMul`, softmax, `Transpose`, `MatMul`) run as one step,
//! convolutions with constant weights put on our kernels, and transposes that
//! only MatMuls read left as views.

use std::collections::HashMap;

use candle_core::DType;

use super::super::cpu::Act;
use super::kernels;
use super::{Bin, Op, Src, Step, R};

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
pub(super) fn fuse_activations(steps: &mut Vec<Step>, graph_output: usize) {
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
pub(super) fn fuse_softmax(steps: &mut Vec<Step>, graph_output: usize) {
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

/// Finds attention as YOLOv12 exports it, `MatMul(v, Transpose(softmax(MatMul(q, k))))`
/// with the transpose swapping the last two axes, where nothing else reads the
/// scores, the softmax or its transpose, and runs it as one `Attention` step (on the
/// CPU plan: its kernel never writes the scores).
pub(super) fn fuse_attention(steps: &mut Vec<Step>, graph_output: usize) {
    let readers = readers(steps);
    let read_by = |slot: usize| readers.get(&slot).map(Vec::as_slice).unwrap_or(&[]);
    let producer = |slot: usize| steps.iter().position(|s| s.outputs == [slot]);
    let mut dead = vec![false; steps.len()];
    let mut fused = Vec::new();
    for m2 in 0..steps.len() {
        let (Op::MatMul, [Src::Slot(v), Src::Slot(pt)]) = (&steps[m2].op, steps[m2].inputs.as_slice()) else {
            continue;
        };
        let only = |slot: usize, reader: usize| read_by(slot) == [reader] && slot != graph_output;
        let Some(tr) = producer(*pt).filter(|_| only(*pt, m2)) else {
            continue;
        };
        let (Op::Transpose { perm, .. }, [Src::Slot(p)]) = (&steps[tr].op, steps[tr].inputs.as_slice()) else {
            continue;
        };
        let Some(sm) = producer(*p).filter(|_| swaps_last_two(perm) && only(*p, tr)) else {
            continue;
        };
        let (&Op::FastSoftmax { axis, scale }, [Src::Slot(sc)]) = (&steps[sm].op, steps[sm].inputs.as_slice()) else {
            continue;
        };
        let Some(m1) = producer(*sc).filter(|_| only(*sc, sm)) else {
            continue;
        };
        let (Op::MatMul, [Src::Slot(q), Src::Slot(k)]) = (&steps[m1].op, steps[m1].inputs.as_slice()) else {
            continue;
        };
        fused.push((m2, [*q, *k, *v], axis, scale));
        for i in [m1, sm, tr] {
            dead[i] = true;
        }
    }
    for (m2, inputs, axis, scale) in fused {
        steps[m2].op = Op::Attention { axis, scale };
        steps[m2].name = format!("Attention (fused) {}", steps[m2].name.trim_start_matches("MatMul "));
        steps[m2].inputs = inputs.into_iter().map(Src::Slot).collect();
    }
    let mut i = 0;
    steps.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
}

/// Puts a convolution with constant weights on our kernels where they apply.
pub(super) fn compile_conv(step: &mut Step) -> R<()> {
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
pub(super) fn mark_transpose_views(steps: &mut [Step]) {
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
