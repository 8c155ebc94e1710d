//! EfficientNet-Lite on any candle device (the GPU path), compiled from the
//! same `efficientnet::Spec` as the CPU plan: weights (batch norm folded)
//! uploaded once at load; per frame one upload of the input, candle's
//! convolution (im2col + cuBLAS) for the stem, cuBLAS matrix products for the
//! 1x1 convolutions, `device_ops` for each depthwise convolution and each
//! bias+activation epilogue, and one download of the logits. On the CPU it
//! runs too, as the reference the tests hold it to.

use candle_core::{Device, Tensor};

use super::cpu::Act;
use super::device_ops::{BiasAct, Depthwise};
use super::efficientnet::{ConvBn, Spec};
use super::weights::Weights;

type R<T> = Result<T, String>;

/// A 1x1 convolution as a matrix product: weight `[out, in]`, bias `[out]`.
struct Pointwise {
    w: Tensor,
    b: Tensor,
    act: Act,
}

impl Pointwise {
    fn new(c: &ConvBn, act: Act, d: &Device) -> candle_core::Result<Pointwise> {
        let (o, i, ..) = c.dims();
        Ok(Pointwise {
            w: c.weight.reshape((o, i))?.to_device(d)?,
            b: c.bias.to_device(d)?,
            act,
        })
    }

    /// `[1, c, h, w]` -> `[1, out, h, w]`.
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let y = self.w.matmul(&x.reshape((c, n * h * w))?)?;
        y.reshape((n, self.w.dim(0)?, h, w))?
            .apply_op2_no_bwd(&self.b, &BiasAct(self.act))
    }
}

struct Block {
    expand: Option<Pointwise>,
    dw_w: Tensor,
    dw_b: Tensor,
    dw: Depthwise,
    project: Pointwise,
    skip: bool,
}

pub struct EfficientNet {
    device: Device,
    stem_w: Tensor,
    stem_b: Tensor,
    /// The stem's TF "same" padding (top, bottom, left, right) and stride.
    stem_pad: [usize; 4],
    stem_stride: usize,
    blocks: Vec<Block>,
    head: Pointwise,
    /// `[features, classes]` and `[1, classes]`.
    fc_w: Tensor,
    fc_b: Tensor,
    input: (usize, usize),
}

impl EfficientNet {
    /// Compiles the checkpoint for `[1, 3, h, w]` input on `device`.
    pub fn load(w: &Weights, size: (usize, usize), device: &Device) -> R<EfficientNet> {
        let spec = Spec::read(w, size)?;
        let d = device;
        let e = |x: candle_core::Error| format!("uploading the weights: {x}");
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for b in &spec.blocks {
            // Geometry's pads are (top, bottom, left, right); ONNX order is (top, left, bottom, right).
            let [t, bo, l, r] = b.geo.pad;
            blocks.push(Block {
                expand: b
                    .expand
                    .as_ref()
                    .map(|x| Pointwise::new(x, Act::Relu6, d))
                    .transpose()
                    .map_err(e)?,
                dw_w: b.depthwise.weight.to_device(d).map_err(e)?,
                dw_b: b.depthwise.bias.to_device(d).map_err(e)?,
                dw: Depthwise {
                    stride: b.geo.stride,
                    pads: [t, l, bo, r],
                    act: Act::Relu6,
                },
                project: Pointwise::new(&b.project, Act::None, d).map_err(e)?,
                skip: b.skip,
            });
        }
        let classes = spec.fc.0.dim(0).map_err(e)?;
        Ok(EfficientNet {
            device: d.clone(),
            stem_w: spec.stem.weight.to_device(d).map_err(e)?,
            stem_b: spec.stem.bias.to_device(d).map_err(e)?,
            stem_pad: spec.stem_geo.pad,
            stem_stride: spec.stem_geo.stride,
            blocks,
            head: Pointwise::new(&spec.head, Act::Relu6, d).map_err(e)?,
            fc_w: spec
                .fc
                .0
                .t()
                .and_then(|t| t.contiguous())
                .and_then(|t| t.to_device(d))
                .map_err(e)?,
            fc_b: spec
                .fc
                .1
                .reshape((1, classes))
                .and_then(|t| t.to_device(d))
                .map_err(e)?,
            input: spec.input,
        })
    }

    pub fn device_name(&self) -> &'static str {
        if self.device.is_cpu() {
            "cpu"
        } else {
            "gpu"
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// `[1, 3, H, W]` (NCHW, flat) -> logits, copied into `out`.
    pub fn forward(&self, x: &[f32], out: &mut Vec<f32>) -> candle_core::Result<()> {
        let (h, w) = self.input;
        if x.len() != 3 * h * w {
            candle_core::bail!("input has {} values, the model takes 3x{h}x{w}", x.len());
        }
        let x = Tensor::from_slice(x, (1, 3, h, w), &self.device)?;
        let [t, b, l, r] = self.stem_pad;
        let mut a = x
            .pad_with_zeros(2, t, b)?
            .pad_with_zeros(3, l, r)?
            .conv2d(&self.stem_w, 0, self.stem_stride, 1, 1)?
            .apply_op2_no_bwd(&self.stem_b, &BiasAct(Act::Relu6))?;
        for blk in &self.blocks {
            let mid = match &blk.expand {
                Some(e) => e.run(&a)?,
                None => a.clone(),
            };
            let dw = mid.apply_op3_no_bwd(&blk.dw_w, &blk.dw_b, &blk.dw)?;
            let y = blk.project.run(&dw)?;
            a = if blk.skip { (y + &a)? } else { y };
        }
        let y = self.head.run(&a)?;
        let (_, c, hh, ww) = y.dims4()?;
        let pooled = y.reshape((1, c, hh * ww))?.mean(2)?;
        let logits = pooled.matmul(&self.fc_w)?.broadcast_add(&self.fc_b)?;
        out.clear();
        out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device plan, run on the CPU, against the CPU plan on the embedded model.
    #[test]
    fn the_device_plan_matches_the_cpu_plan_on_the_embedded_model() {
        let w = super::super::weights::load_bytes(super::super::EMBEDDED_WEIGHTS).unwrap();
        let size = (224, 224);
        let dev = EfficientNet::load(&w, size, &Device::Cpu).unwrap();
        let mut cpu = super::super::efficientnet::EfficientNetLite::load(&w, size).unwrap();
        assert_eq!(dev.blocks(), cpu.blocks());
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, 3 * 224 * 224, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = cpu.forward(&x).unwrap().to_vec();
        let mut got = Vec::new();
        dev.forward(&x, &mut got).unwrap();
        assert_eq!(got.len(), 1000);
        let top = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(top(&got), top(&want));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "logit {i}: {a} vs {b}");
        }
    }
}
