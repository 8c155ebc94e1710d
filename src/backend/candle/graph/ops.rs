//! What each op does to candle tensors, per frame.

use candle_core::{DType, Tensor, D};

use super::super::cpu::Act;
use super::kernels;
use super::{Bin, Op};

/// An ONNX axis (negative counts from the end) as an index below `rank`.
pub(super) fn axis(a: i64, rank: usize) -> candle_core::Result<usize> {
    let i = if a < 0 { a + rank as i64 } else { a };
    usize::try_from(i)
        .ok()
        .filter(|&i| i < rank)
        .ok_or_else(|| candle_core::Error::Msg(format!("axis {a} for rank {rank}")))
}

/// candle's conv2d with ONNX pads (top, left, bottom, right): symmetric ones passed through,
/// others as explicit zero padding first.
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    [t, l, b, r]: [usize; 4],
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    if t == b && l == r && t == l {
        x.conv2d(w, t, stride, dilation, groups)
    } else {
        x.pad_with_zeros(2, t, b)?
            .pad_with_zeros(3, l, r)?
            .conv2d(w, 0, stride, dilation, groups)
    }
}

/// candle's matmul, broadcasting when the ranks differ.
pub(super) fn mm(l: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
    if l.rank() == r.rank() {
        l.matmul(r)
    } else {
        l.broadcast_matmul(r)
    }
}

pub(super) fn apply(op: &Op, a: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
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
            let y = conv2d(x, arg(1)?, *pads, *stride, *dilation, *groups)?;
            let y = match a.get(2) {
                Some(bias) => y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?)?,
                None => y,
            };
            one(match act {
                Act::None => y,
                act => y.contiguous()?.apply_op1_no_bwd(&kernels::Activation(*act))?,
            })
        }
        Op::DeviceDepthwise { .. } => super::device::apply(op, a),
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
        Op::Transpose { perm, view: false } if x.rank() <= kernels::MAX_RANK => {
            one(x.apply_op1_no_bwd(&kernels::Transpose(perm.clone()))?)
        }
        Op::Transpose { perm, .. } => one(x.permute(perm.as_slice())?.contiguous()?),
        Op::MatMul => {
            // candle's matmul reads the strides of a transposed view as they are; other
            // layouts it refuses are made contiguous first.
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
        Op::Attention { axis: ax, scale } => {
            // As the unfused steps ran it: the scores, their softmax, its transpose's product.
            let (k, v) = (arg(1)?, arg(2)?);
            let s = apply(&Op::MatMul, &[x, k])?.remove(0);
            let d = axis(*ax, s.rank())?;
            let p = kernels::contiguous(&s)?.apply_op1_no_bwd(&kernels::Softmax {
                axis: d as i64,
                scale: *scale,
            })?;
            let r = p.rank();
            apply(&Op::MatMul, &[v, &p.transpose(r - 2, r - 1)?])
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
