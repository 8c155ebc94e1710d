//! Kernels of our own on NCHW tensors, plugged into candle as custom ops so
//! that graph code stays candle code: `conv.rs` (convolutions), `attention.rs`
//! (attention fused) and `tensor.rs` (element-wise activations, batched MatMul,
//! nearest upsampling, softmax, transpose); here, what they share (input
//! checks, fused bias and activation, the output buffer threads write disjoint
//! parts of).
//!
//! Convolutions: the general convolution (groups = 1; im2col + one GEMM, the weights
//! already in GEMM order as OIHW; a 1x1 stride-1 convolution packs its input
//! per column tile as the GEMM operand, with no im2col), the depthwise convolution (each channel
//! as row-wise multiply-adds over contiguous slices), and element-wise
//! activations, each with bias and activation fused in. candle runs a
//! grouped convolution group by group and an ungrouped one as im2col, copy,
//! matmul, copy; these write each output once. Threads: the CPU pool
//! (`cpu::threads`), by output channel.

use candle_core::{CpuStorage, Layout, Tensor};

use super::super::cpu::{copy_short, multiversion, Act, Isa, Level};
use super::super::nhwc::{apply, Geometry};

mod attention;
mod conv;
mod tensor;
mod winograd;

pub use attention::Attention;
pub use conv::{Conv, Depthwise};
pub use tensor::{contiguous, Activation, MatMul, Softmax, Transpose, Upsample, MAX_RANK};

/// `act` on every element: SiLU and sigmoid in AVX-512's own instructions where the CPU
/// has them ([`sigmoid_v4`]), in AVX2's ([`sigmoid_v3`]) where it has those, the rest
/// (and other CPUs) from the portable body.
pub(super) fn activate(isa: Isa, s: &mut [f32], act: Act) {
    #[cfg(target_arch = "x86_64")]
    if matches!(act, Act::Silu | Act::Sigmoid) {
        match isa.level() {
            // SAFETY: an `Isa` of level V4 exists only where AVX-512 F was found.
            Level::V4 => return unsafe { sigmoid_v4(s, act == Act::Silu) },
            Level::V3 => {
                // SAFETY: an `Isa` of level V3 exists only where AVX2 and FMA were found.
                let done = unsafe { sigmoid_v3(s, act == Act::Silu) };
                return activate_any(isa, &mut s[done..], act);
            }
            Level::Base => {}
        }
    }
    activate_any(isa, s, act)
}

multiversion! {
    /// `act` on every element, from the portable body.
    fn activate_any(s: &mut [f32], act: Act) {
        apply::<FMA>(s, act)
    }
}

/// `e^t` on 16 lanes as `2^k p(r)`, `vscalefps` doing the `2^k` (no clamps or exponent
/// bits by hand: it goes to 0 or infinity where `e^t` leaves f32), `p` of degree 6 on
/// `|r| <= ln 2 / 2` (about 1.2e-7 relative).
///
/// # Safety
/// AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn exp_v4(t: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const C: [f32; 6] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0];
    // k = round(t log2 e); r = t - k ln 2 in two parts.
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        t,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(
        k,
        _mm512_set1_ps(1.428_606_8e-6),
        _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), t),
    );
    let mut p = _mm512_set1_ps(C[0]);
    for c in &C[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(_mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0)), k)
}

/// `x * sigmoid(x)` (`silu`) or `sigmoid(x)` on every element: `e^-x` by [`exp_v4`],
/// and `1 / (1 + e^-x)` as `vrcp14ps` plus one Newton step. About 15
/// instructions a vector where the portable body takes 26 (SiLU was 9 % of YOLOv12n).
///
/// # Safety
/// AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sigmoid_v4(s: &mut [f32], silu: bool) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    // e^-x overflows past x = -88; there the sigmoid is 0 to f32's precision anyway.
    let top = _mm512_set1_ps(88.0);
    let f = |x: __m512| {
        // SAFETY: AVX-512 F, as this function's.
        let e = unsafe { exp_v4(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), top)) };
        let d = _mm512_add_ps(one, e);
        let y = _mm512_rcp14_ps(d);
        // One Newton step: y (2 - d y), from 14 bits to about 24.
        let y = _mm512_fmadd_ps(y, _mm512_fnmadd_ps(d, y, one), y);
        if silu {
            _mm512_mul_ps(x, y)
        } else {
            y
        }
    };
    let mut chunks = s.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: 16 floats at `c`.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), f(_mm512_loadu_ps(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    let mask = ((1u32 << rest.len()) - 1) as u16;
    // SAFETY: the mask covers the `rest.len() < 16` floats at `rest`.
    unsafe {
        let x = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, f(x));
    }
}

/// `e^t` on 8 lanes as [`exp_v4`] with AVX2's instructions: `t` clamped to [-87, 88], so
/// that `2^k` is a normal float built from its exponent bits (where `e^t` leaves that
/// range, a sigmoid's `1 + e^t` is 1 or past 1e38, the answer 0 or 1 to f32's precision).
///
/// # Safety
/// AVX2 and FMA on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp_v3(t: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    const C: [f32; 6] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0];
    let t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
    // k = round(t log2 e); r = t - k ln 2 in two parts.
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        t,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(
        k,
        _mm256_set1_ps(1.428_606_8e-6),
        _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_145_75), t),
    );
    let mut p = _mm256_set1_ps(C[0]);
    for c in &C[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    // 2^k: k + 127 in the exponent field (k in -126..=127 after the clamp).
    let two_k = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(k),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(_mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0)), two_k)
}

/// [`sigmoid_v4`] on 8 lanes at a time with AVX2's instructions: `e^-x` by [`exp_v3`],
/// `1 / (1 + e^-x)` as `vrcpps` (12 bits) plus one Newton step. Returns how many it did:
/// all but the last `len % 8`, left to the caller. SiLU was 8 % of YOLOv12n on AVX2.
///
/// # Safety
/// AVX2 and FMA on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_v3(s: &mut [f32], silu: bool) -> usize {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(1.0);
    let f = |x: __m256| {
        // SAFETY: AVX2 and FMA, as this function's.
        let d = _mm256_add_ps(one, unsafe { exp_v3(_mm256_sub_ps(_mm256_setzero_ps(), x)) });
        let y = _mm256_rcp_ps(d);
        // One Newton step: y (2 - d y), from 12 bits to about 23.
        let y = _mm256_fmadd_ps(y, _mm256_fnmadd_ps(d, y, one), y);
        if silu {
            _mm256_mul_ps(x, y)
        } else {
            y
        }
    };
    let mut chunks = s.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: 8 floats at `c`.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), f(_mm256_loadu_ps(c.as_ptr()))) };
    }
    s.len() / 8 * 8
}

/// N, C, H, W.
pub(super) type Dims4 = (usize, usize, usize, usize);

/// The contiguous f32 data of a custom op's input.
pub(super) fn input_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(all) = storage else {
        candle_core::bail!("{what}: f32 input expected");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: contiguous input expected")))?;
    Ok(&all[start..end])
}

/// The contiguous f32 data of a custom op's input, and its 4 dims.
pub(super) fn input4<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], Dims4)> {
    Ok((input_f32(storage, layout, what)?, layout.shape().dims4()?))
}

/// A convolution's output size for a `(c, h, w)` input, checked: the channels it was
/// built for, and an input at least as large as the kernel.
pub(super) fn out_size(
    geo: Geometry,
    (c, h, w): (usize, usize, usize),
    want_c: usize,
    what: &str,
) -> candle_core::Result<(usize, usize)> {
    if c != want_c {
        candle_core::bail!("{what}: {c} input channels for filters of {want_c}");
    }
    geo.checked_out_size(h, w)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: a {h}x{w} input is smaller than the kernel")))
}

pub(super) fn f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()
}

/// A convolution's bias as f32s, `filters` of them; zeros when the graph gives none.
pub(super) fn bias_or_zeros(bias: Option<&Tensor>, filters: usize, what: &str) -> candle_core::Result<Vec<f32>> {
    let bias = match bias {
        Some(b) => f32s(b)?,
        None => vec![0.0; filters],
    };
    if bias.len() != filters {
        candle_core::bail!("{what}: {} biases for {filters} filters", bias.len());
    }
    Ok(bias)
}

/// An output buffer of `len` f32s, allocated but not zeroed (zeroing an output
/// the GEMM overwrites anyway was 4 % of YOLOv12n's time). Length 0: only raw
/// pointer writes may fill it, then `set_len` once every element is written.
pub(super) fn uninit(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

/// An output buffer the pool's threads write disjoint parts of.
pub(super) struct SharedOut(*mut f32, usize);
// SAFETY: threads write disjoint elements only (see `Conv::tile`, `Transpose`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// All of `s`, for threads to write disjoint parts of.
    pub(super) fn of(s: &mut [f32]) -> SharedOut {
        SharedOut(s.as_mut_ptr(), s.len())
    }

    /// A pointer to element `i`.
    pub(super) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    /// Writes `v` to element `i`.
    ///
    /// # Safety
    /// No other thread reads or writes element `i` meanwhile.
    #[inline(always)]
    pub(super) unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.1, "SharedOut: {i} past {}", self.1);
        // SAFETY: `i` is inside the buffer (checked above); the caller owns the element.
        unsafe { self.0.add(i).write(v) }
    }

    /// Copies `src` to elements `at..at + src.len()`.
    ///
    /// # Safety
    /// No other thread reads or writes those elements meanwhile, and `src` is not part of this buffer.
    #[inline(always)]
    pub(super) unsafe fn copy_from(&self, at: usize, src: &[f32]) {
        assert!(
            at.checked_add(src.len()).is_some_and(|end| end <= self.1),
            "SharedOut: copy past the end"
        );
        if src.len() <= 64 {
            // Short runs (a transpose's tile rows, an attention head's rows) inline: a
            // `memcpy` call per run cost more than the copy.
            // SAFETY: as below; the slice is this caller's alone while it lives.
            copy_short(src, unsafe {
                std::slice::from_raw_parts_mut(self.0.add(at), src.len())
            });
            return;
        }
        // SAFETY: the range is inside the buffer (checked above), owned by the caller, and
        // `src` lies elsewhere.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len()) }
    }
}

/// `o += a * x`, sixteen lanes at a time: rows here are short (20 to 160), too
/// short for the compiler's own vector loop, which wants four vectors' worth
/// before it starts and leaves the rest scalar.
#[inline(always)]
pub(super) fn axpy<const FMA: bool>(a: f32, x: &[f32], o: &mut [f32]) {
    let mut oc = o.chunks_exact_mut(16);
    let mut xc = x.chunks_exact(16);
    for (o, x) in (&mut oc).zip(&mut xc) {
        for j in 0..16 {
            o[j] = if FMA { a.mul_add(x[j], o[j]) } else { o[j] + a * x[j] };
        }
    }
    for (o, x) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
        *o = if FMA { a.mul_add(*x, *o) } else { *o + a * x };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use conv::every_other;

    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        pad: [usize; 4],
        groups: usize,
        act: Act,
    ) -> Tensor {
        let bias: Vec<f32> = b.to_vec1().unwrap();
        super::super::super::test_util::reference_conv(x, w, &bias, stride, pad, groups, act)
    }

    fn close(got: &Tensor, want: &Tensor, what: &str) {
        super::super::super::test_util::close_tensors(got, want, what)
    }

    /// (channels, h, w, k, stride, pad): odd sizes, one channel, stride 2, asymmetric
    /// padding, no padding, a kernel as large as the input, 1x1, YOLO's 7x7.
    type Case = (usize, usize, usize, usize, usize, [usize; 4]);
    const CASES: &[Case] = &[
        (32, 40, 40, 3, 1, [1, 1, 1, 1]),
        (16, 15, 17, 3, 2, [0, 0, 1, 1]),
        (1, 7, 5, 5, 1, [2, 2, 2, 2]),
        (8, 9, 9, 5, 2, [1, 1, 2, 2]),
        (3, 6, 11, 3, 1, [0, 0, 0, 0]),
        (5, 5, 5, 5, 1, [0, 0, 0, 0]),
        (4, 2, 3, 3, 2, [1, 1, 1, 1]),
        (24, 13, 9, 1, 1, [0, 0, 0, 0]),
        (6, 10, 10, 1, 2, [0, 0, 0, 0]),
        (64, 20, 20, 7, 1, [3, 3, 3, 3]),
        (8, 6, 71, 3, 2, [1, 1, 1, 1]),
        (5, 5, 67, 5, 2, [1, 2, 1, 2]),
        (6, 9, 21, 4, 1, [1, 2, 2, 1]),
        (3, 3, 40, 3, 1, [2, 0, 0, 2]),
        // 1x1 stride 1 over several column tiles (the input packed per tile), one with an
        // edge panel.
        (48, 40, 40, 1, 1, [0, 0, 0, 0]),
        (20, 33, 35, 1, 1, [0, 0, 0, 0]),
    ];
    const ACTS: [Act; 5] = [Act::None, Act::Relu, Act::Relu6, Act::Silu, Act::Sigmoid];

    #[test]
    fn depthwise_matches_candles_grouped_convolution() {
        let dev = Device::Cpu;
        for (n, &(c, h, w, k, s, pad)) in CASES.iter().enumerate() {
            let act = ACTS[n % 5];
            let x = Tensor::randn(0f32, 2.0, (1, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let want = reference(&x, &wt, &b, s, pad, c, act);
            // candle pads (top, bottom) then (left, right); ONNX order is (top, left, bottom, right).
            let op = Depthwise::new(&wt, Some(&b), s, [pad[0], pad[1], pad[2], pad[3]], act).unwrap();
            close(
                &x.apply_op1_no_bwd(&op).unwrap(),
                &want,
                &format!("depthwise case {n} {act:?}"),
            );
        }
    }

    #[test]
    fn conv_matches_candles_convolution() {
        let dev = Device::Cpu;
        for (n, &(cin, h, w, k, s, pad)) in CASES.iter().enumerate() {
            let cout = [16, 3, 1, 32, 7][n % 5];
            let act = ACTS[(n + 3) % 5];
            let x = Tensor::randn(0f32, 2.0, (2, cin, h, w), &dev).unwrap();
            // Scaled by fan-in, as trained weights are: outputs stay O(1), so 1e-4 relative is a real bound.
            let wt = Tensor::randn(0f32, 1.0 / ((cin * k * k) as f32).sqrt(), (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let want = reference(&x, &wt, &b, s, pad, 1, act);
            let op = Conv::new(&wt, Some(&b), s, pad, act).unwrap();
            close(
                &x.apply_op1_no_bwd(&op).unwrap(),
                &want,
                &format!("conv case {n} {act:?}"),
            );
        }
    }

    /// Each GEMM operand of the general convolution, forced on every case whatever its
    /// width: im2col tiles, and the shifted phase planes.
    #[test]
    fn im2col_and_shifted_convolutions_match_candles() {
        let dev = Device::Cpu;
        for (n, &(cin, h, w, k, s, pad)) in CASES.iter().enumerate() {
            let cout = [16, 3, 1, 32, 7][n % 5];
            let act = ACTS[(n + 1) % 5];
            let x = Tensor::randn(0f32, 2.0, (2, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0 / ((cin * k * k) as f32).sqrt(), (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let want = reference(&x, &wt, &b, s, pad, 1, act);
            let op = Conv::new(&wt, Some(&b), s, pad, act).unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let dims = (2, cin, h, w);
            let (oh, ow) = op.out_hw(dims).unwrap();
            for shifted in [false, true] {
                let mut out = vec![f32::NAN; 2 * cout * oh * ow];
                let dst = SharedOut(out.as_mut_ptr(), out.len());
                if shifted {
                    op.shifted(&xs, dims, (oh, ow), &dst);
                } else {
                    op.im2col(&xs, dims, (oh, ow), &dst);
                }
                let got = Tensor::from_vec(out, (2, cout, oh, ow), &dev).unwrap();
                close(&got, &want, &format!("conv case {n} {act:?}, shifted {shifted}"));
            }
        }
    }

    #[test]
    fn winograd_matches_candles_convolution_on_every_isa() {
        use super::super::super::cpu::Isa;
        let dev = Device::Cpu;
        // (c_in, c_out, h, w, pad): odd and even sizes (edge blocks past an odd output),
        // one channel, no padding, asymmetric padding, YOLO's channel counts, a chunk boundary.
        let cases: &[(usize, usize, usize, usize, [usize; 4])] = &[
            (32, 16, 40, 40, [1, 1, 1, 1]),
            (3, 7, 6, 11, [0, 0, 0, 0]),
            (1, 1, 3, 3, [0, 0, 0, 0]),
            (5, 3, 7, 5, [1, 1, 1, 1]),
            (6, 9, 9, 21, [1, 2, 2, 1]),
            (3, 5, 3, 40, [2, 0, 0, 2]),
            (64, 64, 33, 31, [1, 1, 1, 1]),
            (16, 32, 2, 2, [1, 1, 1, 1]),
            // Many more filters than input channels (the outputs outgrow the transformed input).
            (2, 16, 9, 9, [1, 1, 1, 1]),
        ];
        for isa in Isa::supported() {
            for (n, &(cin, cout, h, w, pad)) in cases.iter().enumerate() {
                let act = ACTS[n % 5];
                let x = Tensor::randn(0f32, 2.0, (2, cin, h, w), &dev).unwrap();
                let wt = Tensor::randn(0f32, 1.0 / ((cin * 9) as f32).sqrt(), (cout, cin, 3, 3), &dev).unwrap();
                let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
                let want = reference(&x, &wt, &b, 1, pad, 1, act);
                for m in [2, 4] {
                    let op = Conv::winograd_only(&wt, &b, pad, act, isa, m);
                    close(
                        &x.apply_op1_no_bwd(&op).unwrap(),
                        &want,
                        &format!("winograd F({m}x{m}) case {n} {act:?} {isa:?}"),
                    );
                }
            }
        }
    }

    #[test]
    fn an_input_smaller_than_the_kernel_is_an_error_not_a_panic() {
        let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 1, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let dw = Depthwise::new(&w, None, 1, [0; 4], Act::None).unwrap();
        assert!(x
            .apply_op1_no_bwd(&dw)
            .unwrap_err()
            .to_string()
            .contains("smaller than the kernel"));
        let w = Tensor::zeros((3, 4, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let conv = Conv::new(&w, None, 1, [1, 0, 1, 0], Act::None).unwrap();
        assert!(x
            .apply_op1_no_bwd(&conv)
            .unwrap_err()
            .to_string()
            .contains("smaller than the kernel"));
    }

    /// SiLU and sigmoid on every instruction set (AVX-512's and AVX2's own kernels included) against
    /// f64, from far below where e^-x overflows to far above, with a tail past 16 lanes.
    #[test]
    fn silu_and_sigmoid_match_f64_on_every_isa() {
        use super::super::super::cpu::Isa;
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        for isa in Isa::supported() {
            for act in [Act::Silu, Act::Sigmoid] {
                let mut v = xs.clone();
                activate(isa, &mut v, act);
                for (&x, &got) in xs.iter().zip(&v) {
                    let sig = 1.0 / (1.0 + (-(x as f64)).exp());
                    let want = if act == Act::Silu { x as f64 * sig } else { sig };
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                        "{isa:?} {act:?}({x}) = {got}, f64 {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_other_takes_even_elements_at_every_length() {
        let x: Vec<f32> = (0..200).map(|v| v as f32).collect();
        for len in [0usize, 1, 15, 16, 17, 33, 64, 99] {
            for extra in [0, 1, 2] {
                let xs = &x[..(2 * len).saturating_sub(1) + extra];
                for isa in Isa::supported() {
                    let mut o = vec![f32::NAN; len];
                    every_other(isa, xs, &mut o);
                    let want: Vec<f32> = (0..len).map(|j| (2 * j) as f32).collect();
                    assert_eq!(o, want, "{isa:?}: len {len}, input {}", xs.len());
                }
            }
        }
    }

    #[test]
    fn transpose_matches_candles_permute() {
        let x = Tensor::randn(0f32, 1.0, (3, 5, 37, 18), &Device::Cpu).unwrap();
        for perm in [
            [0, 1, 3, 2],
            [0, 2, 1, 3],
            [3, 2, 1, 0],
            [1, 3, 0, 2],
            [0, 1, 2, 3],
            [2, 0, 3, 1],
        ] {
            let want = x.permute(perm.as_slice()).unwrap().contiguous().unwrap();
            let got = x.apply_op1_no_bwd(&Transpose(perm.to_vec())).unwrap();
            assert_eq!(got.dims(), want.dims(), "{perm:?}");
            let (g, w): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(g, w, "{perm:?}");
        }
        // Views: a narrowed last axis (a Split part), a transposed view, a broadcast-free slice.
        let views = [
            x.narrow(3, 5, 7).unwrap(),
            x.narrow(1, 1, 3).unwrap().narrow(3, 0, 9).unwrap(),
            x.transpose(2, 3).unwrap(),
            x.permute((0, 2, 1, 3)).unwrap().narrow(0, 1, 2).unwrap(),
        ];
        for (i, v) in views.iter().enumerate() {
            for perm in [[0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2], [3, 1, 0, 2]] {
                let want = v.permute(perm.as_slice()).unwrap().contiguous().unwrap();
                let got = v.apply_op1_no_bwd(&Transpose(perm.to_vec())).unwrap();
                assert_eq!(got.dims(), want.dims(), "view {i} {perm:?}");
                let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(g, w, "view {i} {perm:?}");
            }
            let c = contiguous(v).unwrap();
            assert!(c.is_contiguous());
            let g: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = v.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(g, w, "contiguous view {i}");
        }
        // Past MAX_RANK axes: a clear error from the kernel, candle's copy for `contiguous`.
        let dims = [2usize; MAX_RANK + 1];
        let big = Tensor::randn(0f32, 1.0, dims.as_slice(), &Device::Cpu).unwrap();
        let perm: Vec<usize> = (0..=MAX_RANK).rev().collect();
        let mut out = vec![0f32; big.elem_count()];
        let strides = big.stride().to_vec();
        let data: Vec<f32> = big.flatten_all().unwrap().to_vec1().unwrap();
        assert!(Transpose::permute(&perm, &data, &dims, &strides, &mut out).is_err());
        let v = big.transpose(0, MAX_RANK).unwrap();
        let g: Vec<f32> = contiguous(&v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = v.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g, w);
    }

    #[test]
    fn softmax_matches_candles_on_every_axis() {
        let x = Tensor::randn(0f32, 3.0, (2, 7, 5, 37), &Device::Cpu).unwrap();
        for axis in [-1i64, 0, 1, 2, 3] {
            for scale in [1.0f32, 0.125] {
                let d = if axis < 0 { 3 } else { axis as usize };
                let xs = (&x * scale as f64).unwrap();
                let e = xs.broadcast_sub(&xs.max_keepdim(d).unwrap()).unwrap().exp().unwrap();
                let want = e.broadcast_div(&e.sum_keepdim(d).unwrap()).unwrap();
                let got = x.apply_op1_no_bwd(&Softmax { axis, scale }).unwrap();
                close(&got, &want, &format!("softmax axis {axis} scale {scale}"));
            }
        }
    }

    /// One row's softmax on every instruction set (AVX-512's own kernel included) against
    /// f64, at lengths under, at and past a vector, with and without a tail.
    #[test]
    fn softmax_rows_match_f64_on_every_isa() {
        use super::super::super::cpu::Isa;
        for isa in Isa::supported() {
            for len in [1usize, 7, 16, 37, 400] {
                let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
                let mut o = vec![f32::NAN; len];
                tensor::softmax_row(isa, &x, 0.5, &mut o);
                let mx = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(0.5 * v as f64));
                let sum: f64 = x.iter().map(|&v| (0.5 * v as f64 - mx).exp()).sum();
                for (&v, &got) in x.iter().zip(&o) {
                    let want = (0.5 * v as f64 - mx).exp() / sum;
                    assert!(
                        (got as f64 - want).abs() <= 1e-6 * want + 1e-12,
                        "{isa:?} length {len}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn matmul_matches_candle_on_strided_views() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (3, 2, 17, 9), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (3, 2, 9, 13), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (3, 2, 13, 9), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let at = Tensor::randn(0f32, 1.0, (3, 2, 9, 17), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        for (l, r) in [(&a, &b), (&a, &bt), (&at, &b), (&at, &bt)] {
            let want = l.contiguous().unwrap().matmul(&r.contiguous().unwrap()).unwrap();
            close(&l.apply_op2_no_bwd(r, &MatMul).unwrap(), &want, "matmul");
        }
        let one = Tensor::randn(0f32, 1.0, (1, 5, 40), &dev).unwrap();
        let two = Tensor::randn(0f32, 1.0, (1, 40, 3), &dev).unwrap();
        close(
            &one.apply_op2_no_bwd(&two, &MatMul).unwrap(),
            &one.matmul(&two).unwrap(),
            "one batch",
        );
        assert!(
            a.apply_op2_no_bwd(&a, &MatMul).is_err(),
            "mismatched inner dims are refused"
        );
    }

    #[test]
    fn upsample_matches_candles_nearest() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu).unwrap();
        for (sh, sw) in [(2, 2), (1, 3), (3, 1), (1, 1)] {
            let want = x.upsample_nearest2d(5 * sh, 7 * sw).unwrap();
            let got = x.apply_op1_no_bwd(&Upsample { sh, sw }).unwrap();
            close(&got, &want, &format!("upsample {sh}x{sw}"));
        }
    }

    #[test]
    fn activation_matches_candle() {
        let x = Tensor::randn(0f32, 8.0, (3, 5000), &Device::Cpu).unwrap();
        let sig = (x.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
        close(&x.apply_op1_no_bwd(&Activation(Act::Sigmoid)).unwrap(), &sig, "sigmoid");
        close(
            &x.apply_op1_no_bwd(&Activation(Act::Silu)).unwrap(),
            &x.silu().unwrap(),
            "silu",
        );
        let e = x.clamp(-80f32, 80f32).unwrap();
        close(
            &e.apply_op1_no_bwd(&Activation(Act::Exp)).unwrap(),
            &e.exp().unwrap(),
            "exp",
        );
    }
}
