//! `bench layouts`: how the native plan's layout, and the convolutions' GEMM
//! operand, were chosen.

use candle_core::{Device, Tensor};

use super::super::cpu::Act;
use super::kernels;

/// `bench layouts`: the NCHW kernels of this module against the NHWC ones of
/// `nhwc.rs` on EfficientNet-Lite0's depthwise and pointwise shapes (random
/// data, ReLU6 fused, median of `iters` runs each, on the CPU pool), which is
/// how the native plan's layout was chosen.
pub fn bench_layouts(iters: usize) -> Result<String, String> {
    use super::super::cpu::{self, Isa};
    use super::super::nhwc;
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
        let x_nhwc: Vec<f32> = x
            .permute((0, 2, 3, 1))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(e)?;
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
    out.push_str(&bench_conv_operands(iters)?);
    Ok(out)
}

/// YOLOv12n's 3x3 convolutions on the two GEMM operands of [`kernels::Conv`]: im2col
/// tiles against shifted phase planes (random data, SiLU fused, on the CPU pool,
/// alternating; median of `iters` runs each), which is how [`kernels::Conv`] picks
/// between them by output width.
fn bench_conv_operands(iters: usize) -> Result<String, String> {
    use super::super::cpu;
    use super::kernels::SharedOut;
    use std::time::Instant;
    let e = |x: candle_core::Error| x.to_string();
    let mut out = String::from("\nconv 3x3 (YOLOv12n) | im2col tiles | shifted planes | shifted / im2col\n");
    // (channels in, channels out, input size, stride).
    let shapes = [
        (3, 16, 640, 2),
        (16, 32, 320, 2),
        (64, 64, 160, 2),
        (128, 128, 80, 2),
        (64, 64, 80, 2),
        (128, 256, 40, 2),
        (16, 8, 160, 1),
        (16, 16, 80, 1),
        (64, 64, 80, 1),
        (32, 32, 40, 1),
        (128, 64, 40, 1),
        (64, 64, 20, 1),
        (256, 64, 20, 1),
    ];
    let dev = Device::Cpu;
    for (cin, cout, h, s) in shapes {
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, cin * h * h, &dev)
            .and_then(|t| t.to_vec1())
            .map_err(e)?;
        let w = Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev).map_err(e)?;
        let b = Tensor::zeros(cout, candle_core::DType::F32, &dev).map_err(e)?;
        let op = kernels::Conv::new(&w, Some(&b), s, [1; 4], Act::Silu).map_err(e)?;
        let dims = (1, cin, h, h);
        let (oh, ow) = op.out_hw(dims).map_err(e)?;
        let mut y = vec![0f32; cout * oh * ow];
        let dst = SharedOut::of(&mut y);
        let (mut a, mut c) = (Vec::new(), Vec::new());
        cpu::run(|| {
            op.im2col(&x, dims, (oh, ow), &dst);
            op.shifted(&x, dims, (oh, ow), &dst);
            for _ in 0..iters.max(1) {
                let t = Instant::now();
                op.im2col(&x, dims, (oh, ow), &dst);
                a.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                op.shifted(&x, dims, (oh, ow), &dst);
                c.push(t.elapsed().as_secs_f64() * 1e3);
            }
        });
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, c) = (med(&mut a), med(&mut c));
        out.push_str(&format!(
            "s{s} {cin}->{cout} @{h}x{h} | {a:.3} ms | {c:.3} ms | {:.2}\n",
            c / a
        ));
    }
    Ok(out)
}
