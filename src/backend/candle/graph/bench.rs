//! `bench layouts`: how the native plan's layout was chosen.

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
