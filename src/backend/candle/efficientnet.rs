//! EfficientNet-Lite0..4 written over candle, reading the upstream
//! `efficientnet-lite-pytorch` weight names (`_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv`, `_depthwise_conv`, `_project_conv`, `_bn0..2`,
//! `_conv_head`, `_bn1`, `_fc`). Batch norm is folded into each convolution
//! at load; weights whose batch norm is already folded (a `.bias` on the
//! convolution, as in our ONNX export) load too.
//!
//! The variant is read off the weights: blocks are counted, a stage starts
//! where the output width changes, and stages take Lite's fixed strides. TF
//! "same" padding (asymmetric for stride 2) is computed from the input size.

use std::time::{Duration, Instant};

use candle_core::{Device, Module, Tensor, D};

use super::weights::Weights;

const BN_EPS: f64 = 1e-3;
/// Stride of each of the seven stages.
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// A depthwise kernel and the input size (h, w) its padding was computed for.
type SizedKernel = ((usize, usize), std::sync::Arc<super::kernels::Depthwise>);

/// A convolution with batch norm folded in, optionally followed by ReLU6.
struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    groups: usize,
    relu6: bool,
    /// Depthwise layers on the CPU: our kernel, built for the input size it last saw.
    depthwise: std::sync::Mutex<Option<SizedKernel>>,
}

impl ConvBn {
    fn load(w: &Weights, conv: &str, bn: &str, stride: usize, depthwise: bool, relu6: bool) -> Result<ConvBn, String> {
        let get = |n: &str| w.get(n).ok_or_else(|| format!("missing tensor `{n}`"));
        let weight = get(&format!("{conv}.weight"))?.clone();
        let (out_c, ..) = weight.dims4().map_err(|e| format!("{conv}.weight: {e}"))?;
        let e = |x: candle_core::Error| format!("{conv}: {x}");
        let (weight, bias) = match w.get(&format!("{bn}.running_var")) {
            Some(var) => {
                let gamma = get(&format!("{bn}.weight"))?;
                let beta = get(&format!("{bn}.bias"))?;
                let mean = get(&format!("{bn}.running_mean"))?;
                let scale = gamma
                    .broadcast_div(&var.affine(1.0, BN_EPS).map_err(e)?.sqrt().map_err(e)?)
                    .map_err(e)?;
                let weight = weight
                    .broadcast_mul(&scale.reshape((out_c, 1, 1, 1)).map_err(e)?)
                    .map_err(e)?;
                let bias = beta.sub(&mean.mul(&scale).map_err(e)?).map_err(e)?;
                (weight, bias)
            }
            None => (weight, get(&format!("{conv}.bias"))?.clone()),
        };
        Ok(ConvBn {
            bias: bias.reshape((1, out_c, 1, 1)).map_err(e)?,
            weight,
            stride,
            groups: if depthwise { out_c } else { 1 },
            relu6,
            depthwise: std::sync::Mutex::new(None),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = self.weight.dims4()?;
        let (pt, pb) = same_pad(h, kh, self.stride);
        let (pl, pr) = same_pad(w, kw, self.stride);
        if self.groups > 1 && x.device().is_cpu() {
            // Padding depends on the input size; the packed weights do not, but are cheap to keep with it.
            let op = {
                let mut dw = self.depthwise.lock().unwrap_or_else(|e| e.into_inner());
                match dw.as_ref() {
                    Some((size, op)) if *size == (h, w) => op.clone(),
                    _ => {
                        let op = std::sync::Arc::new(super::kernels::Depthwise::new(
                            &self.weight,
                            &self.bias,
                            self.stride,
                            [pt, pb, pl, pr],
                            self.relu6,
                        )?);
                        *dw = Some(((h, w), op.clone()));
                        op
                    }
                }
            };
            return x.contiguous()?.apply_op1_no_bwd(op.as_ref());
        }
        let (n, c_in, ..) = x.dims4()?;
        if kh == 1 && kw == 1 && self.stride == 1 && self.groups == 1 && n == 1 {
            // Pointwise: one GEMM, [c_out, c_in] x [c_in, h*w], without conv2d's im2col copy.
            let c_out = self.weight.dim(0)?;
            let y = self
                .weight
                .reshape((c_out, c_in))?
                .matmul(&x.reshape((c_in, h * w))?)?
                .reshape((1, c_out, h, w))?
                .broadcast_add(&self.bias)?;
            return if self.relu6 { y.clamp(0f32, 6f32) } else { Ok(y) };
        }
        let y = if pt == pb && pl == pr && pt == pl {
            x.conv2d(&self.weight, pt, self.stride, 1, self.groups)?
        } else {
            x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?.conv2d(
                &self.weight,
                0,
                self.stride,
                1,
                self.groups,
            )?
        };
        let y = y.broadcast_add(&self.bias)?;
        if self.relu6 {
            y.clamp(0f32, 6f32)
        } else {
            Ok(y)
        }
    }
}

/// TF "same" padding for one axis: (before, after).
fn same_pad(size: usize, k: usize, s: usize) -> (usize, usize) {
    let out = size.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(size);
    (total / 2, total - total / 2)
}

struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    skip: bool,
}

pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
    fc_weight: Tensor,
    fc_bias: Tensor,
}

impl EfficientNetLite {
    pub fn load(w: &Weights) -> Result<EfficientNetLite, String> {
        let stem = ConvBn::load(w, "_conv_stem", "_bn0", 2, false, true)?;
        let mut blocks = Vec::new();
        let (mut stage, mut prev_out) = (0usize, None);
        let mut in_c = stem.weight.dims4().map_err(|e| e.to_string())?.0;
        while w.contains_key(&format!("_blocks.{}._depthwise_conv.weight", blocks.len())) {
            let p = format!("_blocks.{}", blocks.len());
            let out_c = w
                .get(&format!("{p}._project_conv.weight"))
                .ok_or_else(|| format!("missing tensor `{p}._project_conv.weight`"))?
                .dims4()
                .map_err(|e| e.to_string())?
                .0;
            if prev_out.is_some_and(|o| o != out_c) {
                stage += 1;
            }
            let first_of_stage = prev_out != Some(out_c);
            let stride = if first_of_stage {
                *STAGE_STRIDES
                    .get(stage)
                    .ok_or_else(|| format!("{p}: more stages than EfficientNet-Lite has"))?
            } else {
                1
            };
            let expand = if w.contains_key(&format!("{p}._expand_conv.weight")) {
                Some(ConvBn::load(
                    w,
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    1,
                    false,
                    true,
                )?)
            } else {
                None
            };
            blocks.push(Block {
                expand,
                depthwise: ConvBn::load(
                    w,
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    stride,
                    true,
                    true,
                )?,
                project: ConvBn::load(w, &format!("{p}._project_conv"), &format!("{p}._bn2"), 1, false, false)?,
                skip: stride == 1 && in_c == out_c,
            });
            in_c = out_c;
            prev_out = Some(out_c);
        }
        if blocks.is_empty() {
            return Err("no `_blocks.N` tensors: not an EfficientNet-Lite checkpoint".into());
        }
        let get = |n: &str| w.get(n).cloned().ok_or_else(|| format!("missing tensor `{n}`"));
        Ok(EfficientNetLite {
            stem,
            blocks,
            head: ConvBn::load(w, "_conv_head", "_bn1", 1, false, true)?,
            fc_weight: get("_fc.weight")?,
            fc_bias: get("_fc.bias")?,
        })
    }

    /// Number of classes the classifier head outputs.
    pub fn classes(&self) -> usize {
        self.fc_weight.dims().first().copied().unwrap_or(0)
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// `forward`, timing every convolution (named by layer, kernel, stride
    /// and shape) and the head.
    pub fn forward_profiled(&self, x: &Tensor, times: &mut Vec<(String, Duration)>) -> candle_core::Result<Tensor> {
        let mut timed = |name: String, c: &ConvBn, x: &Tensor| -> candle_core::Result<Tensor> {
            let t0 = Instant::now();
            let y = c.forward(x)?;
            let (_, ci, h, w) = x.dims4()?;
            let (co, _, k, _) = c.weight.dims4()?;
            let kind = if c.groups > 1 {
                "depthwise"
            } else if k == 1 {
                "pointwise"
            } else {
                "conv"
            };
            times.push((
                format!("{name} {kind} {k}x{k} s{} {ci}->{co} @{h}x{w}", c.stride),
                t0.elapsed(),
            ));
            Ok(y)
        };
        let mut x = timed("stem".into(), &self.stem, x)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let input = x.clone();
            if let Some(e) = &b.expand {
                x = timed(format!("block{i}.expand"), e, &x)?;
            }
            x = timed(format!("block{i}.depthwise"), &b.depthwise, &x)?;
            x = timed(format!("block{i}.project"), &b.project, &x)?;
            if b.skip {
                x = (x + input)?;
            }
        }
        let x = timed("head".into(), &self.head, &x)?;
        let t0 = Instant::now();
        let y = x
            .mean(D::Minus1)?
            .mean(D::Minus1)?
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)?;
        times.push(("pool+fc".into(), t0.elapsed()));
        Ok(y)
    }
}

impl Module for EfficientNetLite {
    /// `[1, 3, H, W]` -> logits `[1, classes]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(x)?;
        for b in &self.blocks {
            let input = x.clone();
            if let Some(e) = &b.expand {
                x = e.forward(&x)?;
            }
            x = b.project.forward(&b.depthwise.forward(&x)?)?;
            if b.skip {
                x = (x + input)?;
            }
        }
        let x = self.head.forward(&x)?.mean(D::Minus1)?.mean(D::Minus1)?;
        x.matmul(&self.fc_weight.t()?)?.broadcast_add(&self.fc_bias)
    }
}

/// The CPU device the native architectures run on.
pub fn device() -> Device {
    Device::Cpu
}
