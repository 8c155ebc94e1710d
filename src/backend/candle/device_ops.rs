//! Ops for the plans that run on any candle device (`device_plan.rs`, the GPU
//! path): each is one launch of our CUDA kernels on a GPU (`gpu/kernels.cu`)
//! and a plain loop on the CPU, which is its reference and lets the device
//! plans be tested on machines without a GPU. What candle does well on a GPU
//! (convolution as im2col + cuBLAS, matmul, reductions) is left to candle.

use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};

use super::cpu::Act;
use super::gpu;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(all) = s else {
        candle_core::bail!("{what}: f32 expected");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{what}: a contiguous input expected"),
    }
}

/// `act(x)`, element-wise. Used by the graph's device plan and the GPU check (builds with
/// neither have no use for it).
#[cfg_attr(not(any(feature = "candle-graph", feature = "cuda")), allow(dead_code))]
pub struct Activate(pub Act);

impl CustomOp1 for Activate {
    fn name(&self) -> &'static str {
        "aei-device-activate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = f32s(s, l, "activation")?.to_vec();
        self.0.apply_all(&mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        gpu::bias_act(s, l, None, self.0)
    }
}

/// `act(x + bias[c])` over `x` `[n, c, ...]` and `bias` `[c]`: a convolution's epilogue.
pub struct BiasAct(pub Act);

/// Channels and pixels per channel of `[n, c, ...]`, with the bias length checked.
fn channels(l: &Layout, bias: usize) -> Result<(usize, usize)> {
    let dims = l.dims();
    let c = dims.get(1).copied().unwrap_or(1);
    if c != bias {
        candle_core::bail!("bias+activation: {bias} biases for {c} channels ({dims:?})");
    }
    Ok((c, dims.iter().skip(2).product::<usize>().max(1)))
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "aei-device-bias-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, "bias+activation")?;
        let b = f32s(bs, bl, "bias")?;
        let (c, hw) = channels(l, b.len())?;
        let mut y: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + b[(i / hw) % c]).collect();
        self.0.apply_all(&mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout, bs: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        channels(l, bl.shape().elem_count())?;
        gpu::bias_act(s, l, Some((bs, bl)), self.0)
    }
}

/// A depthwise convolution's sizes, fixed when the op is built from the input's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad_t: usize,
    pub pad_l: usize,
    pub ho: usize,
    pub wo: usize,
}

impl DwGeometry {
    /// For input `[n, c, h, w]`, a square `k` kernel, `stride` and ONNX-order pads (t, l, b, r).
    pub fn new(dims: &[usize], k: usize, stride: usize, pads: [usize; 4]) -> Result<DwGeometry> {
        let &[n, c, h, w] = dims else {
            candle_core::bail!("depthwise: a [n, c, h, w] input expected, found {dims:?}")
        };
        let [t, l, b, r] = pads;
        let (ph, pw) = (h + t + b, w + l + r);
        if k == 0 || stride == 0 || ph < k || pw < k {
            candle_core::bail!("depthwise: a {k}x{k} kernel, stride {stride}, does not fit {h}x{w} padded by {pads:?}");
        }
        Ok(DwGeometry {
            n,
            c,
            h,
            w,
            k,
            stride,
            pad_t: t,
            pad_l: l,
            ho: (ph - k) / stride + 1,
            wo: (pw - k) / stride + 1,
        })
    }
}

/// Depthwise convolution: `x` `[n, c, h, w]`, weights `[c, 1, k, k]`, bias `[c]`; stride, ONNX
/// pads, activation. candle runs a grouped convolution group by group (one launch per
/// channel); this is one launch.
pub struct Depthwise {
    pub stride: usize,
    pub pads: [usize; 4],
    pub act: Act,
}

impl Depthwise {
    fn geometry(&self, xl: &Layout, wl: &Layout, bl: &Layout) -> Result<DwGeometry> {
        let &[wc, one, kh, kw] = wl.dims() else {
            candle_core::bail!("depthwise: weights [c, 1, k, k] expected, found {:?}", wl.dims())
        };
        let g = DwGeometry::new(xl.dims(), kh, self.stride, self.pads)?;
        if one != 1 || kh != kw || wc != g.c || bl.shape().elem_count() != g.c {
            candle_core::bail!(
                "depthwise: weights {:?} and {} biases for {} channels",
                wl.dims(),
                bl.shape().elem_count(),
                g.c
            );
        }
        Ok(g)
    }
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "aei-device-depthwise"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl, wl, bl)?;
        let (x, w, b) = (
            f32s(xs, xl, "depthwise input")?,
            f32s(ws, wl, "weights")?,
            f32s(bs, bl, "bias")?,
        );
        let mut y = vec![0f32; g.n * g.c * g.ho * g.wo];
        for (plane, out) in y.chunks_mut(g.ho * g.wo).enumerate() {
            let ch = plane % g.c;
            let xp = &x[plane * g.h * g.w..][..g.h * g.w];
            let wp = &w[ch * g.k * g.k..][..g.k * g.k];
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let mut acc = b[ch];
                    for ky in 0..g.k {
                        let Some(iy) = (oy * g.stride + ky).checked_sub(g.pad_t).filter(|&i| i < g.h) else {
                            continue;
                        };
                        for kx in 0..g.k {
                            let Some(ix) = (ox * g.stride + kx).checked_sub(g.pad_l).filter(|&i| i < g.w) else {
                                continue;
                            };
                            acc += xp[iy * g.w + ix] * wp[ky * g.k + kx];
                        }
                    }
                    out[oy * g.wo + ox] = acc;
                }
            }
        }
        self.act.apply_all(&mut y);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c, g.ho, g.wo))))
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = self.geometry(xl, wl, bl)?;
        gpu::depthwise((xs, xl), (ws, wl), (bs, bl), g, self.act)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn close(a: &Tensor, b: &Tensor) {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "at {i}: {x} vs {y}");
        }
    }

    #[test]
    fn depthwise_matches_candles_grouped_conv_on_odd_shapes_strides_and_pads() {
        let d = Device::Cpu;
        for (c, h, w, k, s, pads) in [
            (3, 7, 5, 3, 1, [1, 1, 1, 1]),
            (8, 9, 11, 3, 2, [0, 0, 1, 1]),
            (5, 12, 12, 5, 2, [1, 1, 2, 2]),
            (4, 6, 6, 7, 1, [3, 3, 3, 3]),
            (2, 3, 3, 3, 1, [0, 0, 0, 0]),
        ] {
            let x = Tensor::randn(0f32, 1.0, (1, c, h, w), &d).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, c, &d).unwrap();
            let [t, l, bo, r] = pads;
            let want = x
                .pad_with_zeros(2, t, bo)
                .unwrap()
                .pad_with_zeros(3, l, r)
                .unwrap()
                .conv2d(&wt, 0, s, 1, c)
                .unwrap()
                .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .clamp(0f32, 6f32)
                .unwrap();
            let op = Depthwise {
                stride: s,
                pads,
                act: Act::Relu6,
            };
            let got = x.apply_op3_no_bwd(&wt, &b, &op).unwrap();
            assert_eq!(got.dims(), want.dims(), "c{c} {h}x{w} k{k} s{s} {pads:?}");
            close(&got, &want);
        }
    }

    #[test]
    fn bias_act_and_activate_match_candles_ops() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (1, 6, 4, 5), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &d).unwrap();
        let sum = x.broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap()).unwrap();
        close(
            &x.apply_op2_no_bwd(&b, &BiasAct(Act::Silu)).unwrap(),
            &sum.silu().unwrap(),
        );
        close(&x.apply_op2_no_bwd(&b, &BiasAct(Act::None)).unwrap(), &sum);
        close(&x.apply_op1_no_bwd(&Activate(Act::Relu)).unwrap(), &x.relu().unwrap());
        let bad = Tensor::zeros(5, candle_core::DType::F32, &d).unwrap();
        let e = x.apply_op2_no_bwd(&bad, &BiasAct(Act::None)).unwrap_err().to_string();
        assert!(e.contains("5 biases for 6 channels"), "{e}");
    }
}
