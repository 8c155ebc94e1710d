//! The plan on a device (`Plan::from_onnx_on`): what `ops.rs` runs on our CPU
//! kernels, here over candle ops and `device_ops` (each one launch on a GPU):
//! a convolution's bias and activation as one epilogue, a depthwise
//! convolution as one op, activations as one op, softmax and nearest resize
//! as candle's. Every other op is `ops.rs`'s own. On the CPU this runs too,
//! as the reference the tests hold the device plan to.

use candle_core::{DType, Device, Tensor};

use super::super::device_ops::{Activate, BiasAct, Depthwise};
use super::{ops, Op, Src, Step, R};
use crate::backend::candle::cpu::Act;

/// A depthwise convolution with constant weights becomes `Op::DeviceDepthwise` (zero bias
/// where the graph has none). Every other convolution stays candle's `conv2d`.
pub(super) fn depthwise_conv(step: &mut Step) -> R<()> {
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
    let Some(Src::Const(w)) = step.inputs.get(1) else {
        return Ok(());
    };
    let (cout, cin_g, kh, kw) = w.dims4().map_err(|e| format!("{}: {e}", step.name))?;
    if dilation != 1 || groups != cout || cin_g != 1 || kh != kw {
        return Ok(());
    }
    if step.inputs.len() == 2 {
        let zeros = Tensor::zeros(cout, DType::F32, w.device()).map_err(|e| format!("{}: {e}", step.name))?;
        step.inputs.push(Src::Const(zeros));
    }
    step.op = Op::DeviceDepthwise { stride, pads, act };
    Ok(())
}

/// Every constant onto `device`, once.
pub(super) fn upload(steps: &mut [Step], device: &Device) -> R<()> {
    for step in steps {
        for src in &mut step.inputs {
            if let Src::Const(t) = src {
                *t = t
                    .to_device(device)
                    .map_err(|e| format!("{}: uploading a constant: {e}", step.name))?;
            }
        }
    }
    Ok(())
}

fn act(x: Tensor, act: Act) -> candle_core::Result<Tensor> {
    match act {
        Act::None => Ok(x),
        a => x.contiguous()?.apply_op1_no_bwd(&Activate(a)),
    }
}

pub(super) fn apply(op: &Op, a: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
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
            act: f,
        } => {
            let [t, l, b, r] = *pads;
            let y = if t == b && l == r && t == l {
                x.conv2d(arg(1)?, t, *stride, *dilation, *groups)?
            } else {
                x.pad_with_zeros(2, t, b)?
                    .pad_with_zeros(3, l, r)?
                    .conv2d(arg(1)?, 0, *stride, *dilation, *groups)?
            };
            one(match a.get(2) {
                Some(bias) => y.contiguous()?.apply_op2_no_bwd(&bias.flatten_all()?, &BiasAct(*f))?,
                None => act(y, *f)?,
            })
        }
        Op::DeviceDepthwise { stride, pads, act: f } => one(x.contiguous()?.apply_op3_no_bwd(
            arg(1)?,
            &arg(2)?.flatten_all()?,
            &Depthwise {
                stride: *stride,
                pads: *pads,
                act: *f,
            },
        )?),
        Op::Sigmoid => one(act(x.clone(), Act::Sigmoid)?),
        Op::Exp => one(act(x.clone(), Act::Exp)?),
        Op::FastSoftmax { axis, scale } => {
            let d = ops::axis(*axis, x.rank())?;
            let q = (x * *scale as f64)?;
            let e = q.broadcast_sub(&q.max_keepdim(d)?)?.exp()?;
            one(e.broadcast_div(&e.sum_keepdim(d)?)?)
        }
        Op::Reshape { .. } | Op::Flatten { .. } => ops::apply(op, &[&x.contiguous()?]),
        Op::Transpose { perm, view: false } => one(x.permute(perm.as_slice())?.contiguous()?),
        Op::MatMul => {
            let b = arg(1)?;
            let mm = |l: &Tensor, r: &Tensor| {
                if l.rank() == r.rank() {
                    l.matmul(r)
                } else {
                    l.broadcast_matmul(r)
                }
            };
            one(match mm(x, b) {
                Ok(y) => y,
                Err(_) => mm(&x.contiguous()?, &b.contiguous()?)?,
            })
        }
        Op::Resize { scale_h, scale_w } => {
            let (_, _, h, w) = x.dims4()?;
            one(x.upsample_nearest2d(h * scale_h, w * scale_w)?)
        }
        Op::FastConv(_) | Op::FastDepthwise(_) => Err(candle_core::Error::Msg(
            "a CPU-kernel op in a device plan (a compile bug)".into(),
        )),
        _ => ops::apply(op, a),
    }
}
