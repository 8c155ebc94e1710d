//! EfficientNet-Lite0..4 compiled into a plan over our NHWC kernels
//! (`nhwc.rs`), reading the upstream `efficientnet-lite-pytorch` weight
//! names (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, `_depthwise_conv`,
//! `_project_conv`, `_bn0..2`, `_conv_head`, `_bn1`, `_fc`). Batch norm is
//! folded into each convolution at load (with candle ops); weights whose
//! batch norm is already folded (a `.bias` on the convolution, as in our
//! ONNX export) load too.
//!
//! The variant is read off the weights: blocks are counted, a stage starts
//! where the output width changes, and stages take Lite's fixed strides. TF
//! "same" padding (asymmetric for stride 2) is computed from the input size,
//! which is fixed at load: every intermediate buffer is allocated then, sized
//! for the largest activation, and reused for every frame.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::cpu::{Act, Isa};
use super::nhwc::{self, Geometry};
use super::weights::Weights;

const BN_EPS: f64 = 1e-3;
/// Stride of each of the seven stages.
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// A convolution with batch norm folded in (candle tensors, OIHW, f32).
pub(super) struct ConvBn {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
}

impl ConvBn {
    fn load(w: &Weights, conv: &str, bn: &str, stride: usize) -> Result<ConvBn, String> {
        // Folded in f32 whatever the checkpoint stores (the embedded one is f16).
        let get = |n: &str| {
            w.get(n)
                .ok_or_else(|| format!("missing tensor `{n}`"))?
                .to_dtype(candle_core::DType::F32)
                .map_err(|e| format!("{n}: {e}"))
        };
        let weight = get(&format!("{conv}.weight"))?;
        let (out_c, ..) = weight.dims4().map_err(|e| format!("{conv}.weight: {e}"))?;
        let e = |x: candle_core::Error| format!("{conv}: {x}");
        let (weight, bias) = match w.get(&format!("{bn}.running_var")) {
            Some(var) => {
                let var = var.to_dtype(candle_core::DType::F32).map_err(e)?;
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
            None => (weight, get(&format!("{conv}.bias"))?),
        };
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).map_err(e);
        Ok(ConvBn {
            weight: f32(&weight)?,
            bias: f32(&bias)?.flatten_all().map_err(e)?,
            stride,
        })
    }

    /// (out, in, kh, kw).
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        self.weight.dims4().unwrap_or((0, 0, 0, 0))
    }

    /// The kernel size; an error unless the kernel is square.
    fn square(&self, name: &str) -> Result<usize, String> {
        match self.dims() {
            (_, _, kh, kw) if kh == kw && kh > 0 => Ok(kh),
            (_, _, kh, kw) => Err(format!("{name}: a {kh}x{kw} kernel; EfficientNet-Lite's are square")),
        }
    }

    fn vecs(&self) -> Result<(Vec<f32>, Vec<f32>), String> {
        let v = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| e.to_string())
        };
        Ok((v(&self.weight)?, v(&self.bias)?))
    }

    /// The TF "same" geometry of this convolution on an `h x w` input.
    fn geometry(&self, h: usize, w: usize) -> Geometry {
        let (_, _, k, _) = self.dims();
        let (pt, pb) = same_pad(h, k, self.stride);
        let (pl, pr) = same_pad(w, k, self.stride);
        Geometry {
            k,
            stride: self.stride,
            pad: [pt, pb, pl, pr],
        }
    }

    /// An error unless the kernel is 1x1.
    fn one_by_one(&self, name: &str) -> Result<(), String> {
        match self.dims() {
            (_, _, 1, 1) => Ok(()),
            (_, _, kh, kw) => Err(format!("{name}: a {kh}x{kw} kernel where a 1x1 convolution belongs")),
        }
    }

    fn pointwise(&self, name: &str, act: Act) -> Result<nhwc::Pointwise, String> {
        self.one_by_one(name)?;
        let (o, i, ..) = self.dims();
        let (w, b) = self.vecs()?;
        nhwc::Pointwise::new(&w, &b, o, i, act).map_err(|e| format!("{name}: {e}"))
    }
}

/// TF "same" padding for one axis: (before, after).
fn same_pad(size: usize, k: usize, s: usize) -> (usize, usize) {
    let out = size.div_ceil(s.max(1));
    let total = (out.saturating_sub(1) * s + k).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// One MBConv block as read off the checkpoint.
pub(super) struct BlockSpec {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    /// The depthwise convolution's geometry on this block's input size.
    pub geo: Geometry,
    pub project: ConvBn,
    pub skip: bool,
    /// Input and output size (h, w).
    pub size: (usize, usize),
    pub out: (usize, usize),
}

/// The network as read off a checkpoint, for one input size: every layer with its batch norm
/// folded and its geometry fixed. The CPU plan here and the device plan (`device_plan.rs`)
/// are both compiled from it.
pub(super) struct Spec {
    pub stem: ConvBn,
    pub stem_geo: Geometry,
    pub blocks: Vec<BlockSpec>,
    pub head: ConvBn,
    /// `_fc`: weight `[classes, features]` and bias, f32.
    pub fc: (Tensor, Tensor),
    pub input: (usize, usize),
    pub stem_out: (usize, usize),
}

impl Spec {
    /// Reads the checkpoint for `[1, 3, h, w]` input, checking that every layer fits the next.
    pub fn read(w: &Weights, (h, wd): (usize, usize)) -> Result<Spec, String> {
        let stem = ConvBn::load(w, "_conv_stem", "_bn0", 2)?;
        let (stem_c, in_c3, ..) = stem.dims();
        if in_c3 != 3 {
            return Err(format!("_conv_stem takes {in_c3} channels, not 3"));
        }
        stem.square("_conv_stem")?;
        let stem_geo = stem.geometry(h, wd);
        let stem_out = stem_geo
            .checked_out_size(h, wd)
            .ok_or_else(|| format!("a {h}x{wd} input is too small for the stem"))?;
        let mut blocks = Vec::new();
        let (mut stage, mut prev_out) = (0usize, None);
        let (mut in_c, mut size) = (stem_c, stem_out);
        while w.contains_key(&format!("_blocks.{}._depthwise_conv.weight", blocks.len())) {
            let p = format!("_blocks.{}", blocks.len());
            let project = ConvBn::load(w, &format!("{p}._project_conv"), &format!("{p}._bn2"), 1)?;
            let out_c = project.dims().0;
            if prev_out.is_some_and(|o| o != out_c) {
                stage += 1;
            }
            let stride = if prev_out != Some(out_c) {
                *STAGE_STRIDES
                    .get(stage)
                    .ok_or_else(|| format!("{p}: more stages than EfficientNet-Lite has"))?
            } else {
                1
            };
            let expand = if w.contains_key(&format!("{p}._expand_conv.weight")) {
                let e = ConvBn::load(w, &format!("{p}._expand_conv"), &format!("{p}._bn0"), 1)?;
                e.one_by_one(&format!("{p}._expand_conv"))?;
                Some(e)
            } else {
                None
            };
            let dw = ConvBn::load(w, &format!("{p}._depthwise_conv"), &format!("{p}._bn1"), stride)?;
            let (mid, one, ..) = dw.dims();
            let mid_in = expand.as_ref().map_or(in_c, |e| e.dims().0);
            if expand.as_ref().is_some_and(|e| e.dims().1 != in_c) {
                return Err(format!(
                    "{p}._expand_conv takes {} channels after {in_c}",
                    expand.as_ref().map_or(0, |e| e.dims().1)
                ));
            }
            if one != 1 || mid != mid_in {
                return Err(format!(
                    "{p}._depthwise_conv: {mid} filters of {one} channels after {mid_in} channels"
                ));
            }
            dw.square(&format!("{p}._depthwise_conv"))?;
            let geo = dw.geometry(size.0, size.1);
            project.one_by_one(&format!("{p}._project_conv"))?;
            if project.dims().1 != mid {
                return Err(format!(
                    "{p}._project_conv takes {} channels after {mid}",
                    project.dims().1
                ));
            }
            let out = geo
                .checked_out_size(size.0, size.1)
                .ok_or_else(|| format!("{p}: a {}x{} input is too small", size.0, size.1))?;
            blocks.push(BlockSpec {
                expand,
                depthwise: dw,
                geo,
                project,
                skip: stride == 1 && in_c == out_c,
                size,
                out,
            });
            (in_c, size, prev_out) = (out_c, out, Some(out_c));
        }
        if blocks.is_empty() {
            return Err("no `_blocks.N` tensors: not an EfficientNet-Lite checkpoint".into());
        }
        let head = ConvBn::load(w, "_conv_head", "_bn1", 1)?;
        head.one_by_one("_conv_head")?;
        if head.dims().1 != in_c {
            return Err(format!("_conv_head takes {} channels after {in_c}", head.dims().1));
        }
        let get = |n: &str| {
            w.get(n)
                .ok_or_else(|| format!("missing tensor `{n}`"))?
                .to_dtype(candle_core::DType::F32)
                .map_err(|e| format!("{n}: {e}"))
        };
        let (fc_w, fc_b) = (get("_fc.weight")?, get("_fc.bias")?);
        let features = match fc_w.dims() {
            &[classes, features] if fc_b.elem_count() == classes && classes > 0 => features,
            d => return Err(format!("_fc: weight {d:?} and {} biases", fc_b.elem_count())),
        };
        if features != head.dims().0 {
            return Err(format!(
                "_fc takes {features} features, the head gives {}",
                head.dims().0
            ));
        }
        Ok(Spec {
            stem,
            stem_geo,
            blocks,
            head,
            fc: (fc_w, fc_b),
            input: (h, wd),
            stem_out,
        })
    }
}

/// Blocks whose expanded activation holds at least this many floats (4 MiB, several
/// times a core's L2) run their expansion and depthwise fused over bands of rows
/// (`Depthwise::run_expanded`), so that the expansion is never written out whole. At
/// 224x224 that is block 1 (112x112x96); blocks 2 and 3 (56x56x144, 1.8 MiB) measured
/// no faster fused, and block 3's 5x5 kernel slower (BENCHMARKS.md, issue 16, seventh step).
const FUSE_FROM: usize = 1 << 20;

/// About the floats a band of the fused blocks holds per thread (256 KiB).
const BAND_FLOATS: usize = 64 * 1024;

struct Block {
    expand: Option<nhwc::Pointwise>,
    depthwise: nhwc::Depthwise,
    project: nhwc::Pointwise,
    skip: bool,
    /// Input size (h, w); the output size follows from the depthwise geometry.
    size: (usize, usize),
}

/// The buffers a forward pass runs in, allocated once at load.
struct Arena {
    /// The block input (kept for the residual), then the block output.
    a: Vec<f32>,
    /// The expanded activation, and the head's output.
    b: Vec<f32>,
    /// The depthwise output.
    c: Vec<f32>,
    /// The projected output, swapped with `a`.
    d: Vec<f32>,
    /// The stem's scratch (a stack of input rows per task).
    col: Vec<f32>,
    pooled: Vec<f32>,
    logits: Vec<f32>,
}

pub struct EfficientNetLite {
    stem: nhwc::Conv,
    blocks: Vec<Block>,
    head: nhwc::Pointwise,
    fc: nhwc::Dense,
    /// Input (h, w) and the stem's output size.
    input: (usize, usize),
    stem_out: (usize, usize),
    isa: Isa,
    arena: Arena,
}

impl EfficientNetLite {
    /// Compiles the checkpoint for `[1, 3, h, w]` input.
    pub fn load(w: &Weights, size: (usize, usize)) -> Result<EfficientNetLite, String> {
        let spec = Spec::read(w, size)?;
        let (h, wd) = spec.input;
        let (sw, sb) = spec.stem.vecs()?;
        let stem_c = spec.stem.dims().0;
        let stem_k =
            nhwc::Conv::new(&sw, &sb, stem_c, 3, spec.stem_geo, Act::Relu6).map_err(|e| format!("_conv_stem: {e}"))?;
        let stem_out = spec.stem_out;
        // Each buffer sized for its role (block inputs and outputs; expanded; depthwise out),
        // not all for the largest activation: at 224x224, 9.6 MiB instead of 19.3.
        let mut io_max = stem_out.0 * stem_out.1 * stem_c;
        let (mut expanded_max, mut dw_max) = (0usize, 0usize);
        let col = stem_k.scratch_len(h, wd);
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for (i, b) in spec.blocks.iter().enumerate() {
            let p = format!("_blocks.{i}");
            let expand = match &b.expand {
                Some(e) => Some(e.pointwise(&format!("{p}._expand_conv"), Act::Relu6)?),
                None => None,
            };
            let mid = b.depthwise.dims().0;
            let (dwv, dbv) = b.depthwise.vecs()?;
            let depthwise = nhwc::Depthwise::new(&dwv, &dbv, mid, b.geo, Act::Relu6)
                .map_err(|e| format!("{p}._depthwise_conv: {e}"))?;
            let project = b.project.pointwise(&format!("{p}._project_conv"), Act::None)?;
            if expand.is_some() {
                expanded_max = expanded_max.max(b.size.0 * b.size.1 * mid);
            }
            dw_max = dw_max.max(b.out.0 * b.out.1 * mid);
            io_max = io_max.max(b.out.0 * b.out.1 * project.cout);
            blocks.push(Block {
                expand,
                depthwise,
                project,
                skip: b.skip,
                size: b.size,
            });
        }
        let head = spec.head.pointwise("_conv_head", Act::Relu6)?;
        let last = spec.blocks.last().map_or(stem_out, |b| b.out);
        expanded_max = expanded_max.max(last.0 * last.1 * head.cout);
        let v = |t: &Tensor, n: &str| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("{n}: {e}"))
        };
        let fc = nhwc::Dense::new(&v(&spec.fc.0, "_fc.weight")?, &v(&spec.fc.1, "_fc.bias")?)
            .map_err(|e| format!("_fc: {e}"))?;
        let buf = |n: usize| vec![0f32; n];
        let arena = Arena {
            a: buf(io_max),
            b: buf(expanded_max),
            c: buf(dw_max),
            d: buf(io_max),
            col: buf(col),
            pooled: buf(head.cout),
            logits: buf(fc.outputs()),
        };
        Ok(EfficientNetLite {
            stem: stem_k,
            blocks,
            head,
            fc,
            input: (h, wd),
            stem_out,
            isa: Isa::detect(),
            arena,
        })
    }

    /// Number of classes the classifier head outputs.
    pub fn classes(&self) -> usize {
        self.fc.outputs()
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes of the buffers allocated at load.
    pub fn arena_bytes(&self) -> usize {
        let a = &self.arena;
        4 * [&a.a, &a.b, &a.c, &a.d, &a.col, &a.pooled, &a.logits]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
    }

    /// `[1, 3, H, W]` (NCHW, flat) -> logits.
    pub fn forward(&mut self, x: &[f32]) -> Result<&[f32], String> {
        self.run(x, None)
    }

    /// `forward`, timing every layer (named by kind, kernel, stride, shape and place).
    pub fn forward_profiled(&mut self, x: &[f32], times: &mut Vec<(String, Duration)>) -> Result<&[f32], String> {
        self.run(x, Some(times))
    }

    fn run(&mut self, x: &[f32], mut times: Option<&mut Vec<(String, Duration)>>) -> Result<&[f32], String> {
        let (h, w) = self.input;
        if x.len() != 3 * h * w {
            return Err(format!("input has {} values, the model takes 3x{h}x{w}", x.len()));
        }
        let isa = self.isa;
        let ar = &mut self.arena;
        let mut t0 = Instant::now();
        let mut lap = |name: &dyn Fn() -> String| {
            if let Some(t) = times.as_deref_mut() {
                t.push((name(), t0.elapsed()));
                t0 = Instant::now();
            }
        };
        self.stem.run(isa, x, h, w, &mut ar.col, &mut ar.a);
        let s = &self.stem;
        lap(&|| {
            format!(
                "conv {k}x{k} s{} 3->{} @{h}x{w} (stem)",
                s.geo.stride,
                s.cout,
                k = s.geo.k
            )
        });
        let (mut hw, mut c) = (self.stem_out, self.stem.cout);
        for (i, b) in self.blocks.iter().enumerate() {
            let (bh, bw) = b.size;
            debug_assert_eq!((bh, bw), hw);
            let dw = &b.depthwise;
            let g = dw.geo;
            let fused = match &b.expand {
                Some(e) if bh * bw * e.cout >= FUSE_FROM => {
                    dw.run_expanded(isa, e, &ar.a, (bh, bw), BAND_FLOATS, &mut ar.b, &mut ar.c)
                }
                _ => false,
            };
            if fused {
                lap(&|| {
                    format!(
                        "fused 1x1 {}->{c} + depthwise {k}x{k} s{} @{bh}x{bw} (block{i} expand and depthwise)",
                        b.expand.as_ref().map_or(0, |e| e.cin),
                        g.stride,
                        k = g.k,
                        c = dw.c
                    )
                });
            } else {
                let mid = match &b.expand {
                    Some(e) => {
                        e.run(isa, &ar.a, bh * bw, None, &mut ar.b);
                        lap(&|| format!("pointwise 1x1 {}->{} @{bh}x{bw} (block{i} expand)", e.cin, e.cout));
                        &ar.b
                    }
                    None => &ar.a,
                };
                dw.run(isa, mid, bh, bw, &mut ar.c);
                lap(&|| {
                    format!(
                        "depthwise {k}x{k} s{} {c}->{c} @{bh}x{bw} (block{i})",
                        g.stride,
                        k = g.k,
                        c = dw.c
                    )
                });
            }
            let out = g.out_size(bh, bw);
            let p = &b.project;
            p.run(isa, &ar.c, out.0 * out.1, b.skip.then_some(&ar.a[..]), &mut ar.d);
            lap(&|| {
                format!(
                    "pointwise 1x1 {}->{} @{}x{}{} (block{i} project)",
                    p.cin,
                    p.cout,
                    out.0,
                    out.1,
                    if b.skip { " +skip" } else { "" }
                )
            });
            std::mem::swap(&mut ar.a, &mut ar.d);
            (hw, c) = (out, p.cout);
        }
        let pixels = hw.0 * hw.1;
        self.head.run(isa, &ar.a, pixels, None, &mut ar.b);
        let hd = &self.head;
        lap(&|| format!("pointwise 1x1 {c}->{} @{}x{} (head)", hd.cout, hw.0, hw.1));
        nhwc::mean_pixels(isa, &ar.b[..pixels * self.head.cout], self.head.cout, &mut ar.pooled);
        self.fc.run(isa, &ar.pooled, &mut ar.logits);
        lap(&|| format!("pool+fc {}->{}", self.fc.inputs, self.fc.outputs()));
        Ok(&ar.logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The same checkpoint on candle's own ops (`conv2d`, grouped for depthwise), NCHW.
    fn reference(w: &Weights, x: &Tensor) -> Vec<f32> {
        let conv = |c: &ConvBn, x: &Tensor, groups: usize, relu6: bool| -> Tensor {
            let (_, _, h, wd) = x.dims4().unwrap();
            let [pt, pb, pl, pr] = c.geometry(h, wd).pad;
            let y = x
                .pad_with_zeros(2, pt, pb)
                .unwrap()
                .pad_with_zeros(3, pl, pr)
                .unwrap()
                .conv2d(&c.weight, 0, c.stride, 1, groups)
                .unwrap()
                .broadcast_add(&c.bias.reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            if relu6 {
                y.clamp(0f32, 6f32).unwrap()
            } else {
                y
            }
        };
        let mut x = conv(&ConvBn::load(w, "_conv_stem", "_bn0", 2).unwrap(), x, 1, true);
        let model = EfficientNetLite::load(w, (224, 224)).unwrap();
        for (i, b) in model.blocks.iter().enumerate() {
            let p = format!("_blocks.{i}");
            let input = x.clone();
            if b.expand.is_some() {
                x = conv(
                    &ConvBn::load(w, &format!("{p}._expand_conv"), &format!("{p}._bn0"), 1).unwrap(),
                    &x,
                    1,
                    true,
                );
            }
            let dw = ConvBn::load(
                w,
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                b.depthwise.geo.stride,
            )
            .unwrap();
            x = conv(&dw, &x, b.depthwise.c, true);
            x = conv(
                &ConvBn::load(w, &format!("{p}._project_conv"), &format!("{p}._bn2"), 1).unwrap(),
                &x,
                1,
                false,
            );
            if b.skip {
                x = (x + input).unwrap();
            }
        }
        let x = conv(&ConvBn::load(w, "_conv_head", "_bn1", 1).unwrap(), &x, 1, true);
        let x = x.mean(D::Minus1).unwrap().mean(D::Minus1).unwrap();
        let fc_w = w["_fc.weight"].to_dtype(candle_core::DType::F32).unwrap();
        let fc_b = w["_fc.bias"].to_dtype(candle_core::DType::F32).unwrap();
        x.matmul(&fc_w.t().unwrap())
            .unwrap()
            .broadcast_add(&fc_b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn the_plan_matches_candles_ops_on_the_embedded_model_on_every_isa() {
        let w = super::super::weights::load_bytes(super::super::EMBEDDED_WEIGHTS).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu).unwrap();
        let want = reference(&w, &x);
        let input: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut model = EfficientNetLite::load(&w, (224, 224)).unwrap();
        // Twice each: the first frame chooses the GEMM forms and runs every layer apart,
        // later ones run block 1 fused over bands of rows.
        for isa in Isa::supported().into_iter().flat_map(|i| [i, i]) {
            model.isa = isa;
            let got = model.forward(&input).unwrap().to_vec();
            assert_eq!(got.len(), 1000);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-4 * scale,
                    "{isa:?} logit {i}: {a} vs {e} (max |logit| {scale})"
                );
            }
        }
    }

    #[test]
    fn a_wrong_input_size_is_an_error_not_a_panic() {
        let w = super::super::weights::load_bytes(super::super::EMBEDDED_WEIGHTS).unwrap();
        let mut model = EfficientNetLite::load(&w, (224, 224)).unwrap();
        let err = model.forward(&[0.0; 10]).unwrap_err();
        assert!(err.contains("3x224x224"), "{err}");
    }
}
