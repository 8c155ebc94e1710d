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
            let y = ops::conv2d(x, arg(1)?, *pads, *stride, *dilation, *groups)?;
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
            one(match ops::mm(x, b) {
                Ok(y) => y,
                Err(_) => ops::mm(&x.contiguous()?, &b.contiguous()?)?,
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

#[cfg(test)]
mod tests {
    use super::super::Plan;
    use candle_core::{Device, Tensor};

    fn run_both(bytes: &[u8], x: &Tensor) -> (Plan, Vec<f32>, Vec<f32>) {
        let cpu = Plan::from_onnx(bytes).unwrap();
        let dev = Plan::from_onnx_on(bytes, &Device::Cpu).unwrap();
        let a: Vec<f32> = cpu.run(x.clone()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = dev.run(x.clone()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (dev, a, b)
    }

    /// The device plan (candle ops and `device_ops`, run here on the CPU) against the CPU plan
    /// (our kernels) on the fusions fixture: SiLU folded into a convolution and a softmax.
    #[test]
    fn the_device_plan_matches_the_cpu_plan_on_the_fusions_fixture() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fusions.onnx")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 6), &Device::Cpu).unwrap();
        let (dev, a, b) = run_both(&bytes, &x);
        assert!(dev
            .steps
            .iter()
            .all(|s| !matches!(s.op, super::Op::FastConv(_) | super::Op::FastDepthwise(_))));
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5, "at {i}: {x} vs {y}");
        }
    }

    /// The same on YOLOv12n (`models/fetch`), every output within 1e-3 of the CPU plan's
    /// (class scores in 0..1, boxes in pixels of 640).
    #[test]
    fn the_device_plan_matches_the_cpu_plan_on_yolov12n() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/.cache/yolov12n.onnx");
        let bytes = std::fs::read(path).expect("run `bash models/fetch` for yolov12n.onnx");
        let x = Tensor::rand(0f32, 1.0, (1, 3, 640, 640), &Device::Cpu).unwrap();
        let (dev, a, b) = run_both(&bytes, &x);
        let depthwise = dev
            .steps
            .iter()
            .filter(|s| matches!(s.op, super::Op::DeviceDepthwise { .. }))
            .count();
        assert!(depthwise > 0, "YOLOv12n's depthwise convolutions run as one op each");
        assert_eq!(a.len(), 84 * 8400);
        let mut worst = 0f32;
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / y.abs().max(1.0));
        }
        assert!(worst <= 1e-3, "largest relative difference {worst}");
    }
}
