//! Convolution kernels over NHWC f32 buffers (batch 1), for plans that own
//! their buffers.
//!
//! Owns: the pointwise (1x1) convolution as GEMM, the depthwise convolution,
//! the general convolution (a GEMM reading stacks of input rows in place, from
//! NCHW), each with bias, activation and (pointwise) a residual fused in; global
//! average pooling; the dense layer.
//! Weights are packed once, at construction. No kernel allocates: outputs
//! and scratch are the caller's (the GEMM, `nhwc_gemm.rs`, reads the pixels in
//! place). Work is split across the CPU pool (`cpu::threads`) by output rows
//! (the GEMM: by output channels where pixels are few).
//!
//! NHWC keeps a pixel's channels contiguous: a pointwise layer is one
//! `[pixels, c_in] x [c_in, c_out]` GEMM with no copy, and a depthwise tap
//! is a vector multiply-add across channels (EfficientNet's channel counts
//! are multiples of 16). The layout was picked by measurement against the
//! graph path's NCHW kernels (`bench layouts`, BENCHMARKS.md): NHWC depthwise
//! is 1.4-10x faster; NCHW pointwise is faster where `c_out` is narrow (the
//! GEMM's vectors run along the contiguous output axis), slower where wide.

use std::time::Instant;

use rayon::prelude::*;

use super::cpu::{multiversion, split, threads, Act, Isa};
use super::nhwc_depthwise;
use super::nhwc_gemm::{self, Epilogue};

/// `a * b + c`, fused where the instruction set has FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The body of the activations, inlined into each instruction set's copy.
#[inline(always)]
pub(super) fn apply<const FMA: bool>(s: &mut [f32], act: Act) {
    match act {
        Act::Silu => s.iter_mut().for_each(|v| *v *= recip::<FMA>(1.0 + exp::<FMA>(-*v))),
        Act::Sigmoid => s.iter_mut().for_each(|v| *v = recip::<FMA>(1.0 + exp::<FMA>(-*v))),
        Act::Exp => s.iter_mut().for_each(|v| *v = exp::<FMA>(*v)),
        other => other.apply_all(s),
    }
}

/// `1 / d` for `d >= 1` (a sigmoid's denominator) to about 1e-7 relative, without a
/// division: a bit-trick first guess (12 % off at worst), then three Newton steps, each
/// squaring the error. A vector division takes longer than the whole `exp` before it
/// (it was a third of SiLU's time).
#[inline(always)]
pub fn recip<const FMA: bool>(d: f32) -> f32 {
    // Past 1e37 the guess's bits would wrap; the answer is 0 to the precision here.
    let d = d.min(1e37);
    let mut y = f32::from_bits(0x7EF3_11C7u32.wrapping_sub(d.to_bits()));
    for _ in 0..3 {
        let e = madd::<FMA>(-d, y, 1.0);
        y = madd::<FMA>(y, e, y);
    }
    y
}

/// `e^x` to about 2e-7 relative, in plain arithmetic so that loops over it
/// vectorise (libm's `expf` does not): 2^k times a degree-6 polynomial on
/// |r| <= ln2/2. `k` is rounded by adding 1.5 * 2^23, which leaves it in the
/// low mantissa bits: no float-to-int conversion in the loop.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = madd::<FMA>(x, LOG2E, ROUND);
    let k = t - ROUND;
    let r = madd::<FMA>(-k, LN2_LO, madd::<FMA>(-k, LN2_HI, x));
    // Horner's rule, from the degree-7 coefficient down.
    let p = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0]
        .iter()
        .fold(1.0 / 5040.0, |p, &c| madd::<FMA>(p, r, c));
    // t's bits are ROUND's plus k; 2^k's exponent field is k + 127.
    let two_k = (t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23;
    p * f32::from_bits(two_k)
}

/// `m` (`rows x cols`, row-major) transposed: weights packed once, at construction.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// A 1x1 convolution: `[pixels, c_in] x [c_in, c_out]`, bias, optional residual, activation.
pub struct Pointwise {
    w: nhwc_gemm::Weights,
    bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub act: Act,
}

impl Pointwise {
    /// From OIHW weights (`[c_out][c_in]` for 1x1) and a bias.
    pub fn new(w_oi: &[f32], bias: &[f32], cout: usize, cin: usize, act: Act) -> Result<Pointwise, String> {
        sizes_fit("a 1x1 convolution", w_oi.len(), &[cout, cin], bias.len(), cout)?;
        Ok(Pointwise {
            w: nhwc_gemm::Weights::new(&transposed(w_oi, cout, cin), cin, cout),
            bias: bias.to_vec(),
            cin,
            cout,
            act,
        })
    }

    /// `out[..pixels * c_out]` from `x[..pixels * c_in]`, plus `residual` (`pixels * c_out`) if given.
    pub fn run(&self, isa: Isa, x: &[f32], pixels: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        let epi = Epilogue {
            bias: &self.bias,
            residual: residual.map(|r| &r[..pixels * self.cout]),
            act: self.act,
        };
        nhwc_gemm::run(isa, &self.w, x, self.cin, pixels, epi, out);
    }

    /// [`Pointwise::run`] on this thread alone, without a residual; `None` (nothing
    /// computed) until a `run` has chosen the layer's GEMM form.
    fn run_here(&self, isa: Isa, x: &[f32], pixels: usize, out: &mut [f32]) -> Option<()> {
        let epi = Epilogue {
            bias: &self.bias,
            residual: None,
            act: self.act,
        };
        nhwc_gemm::run_here(isa, &self.w, x, self.cin, pixels, epi, out)
    }
}

/// Convolution geometry: kernel, stride, padding (top, bottom, left, right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub pad: [usize; 4],
}

/// Checks that `weights` values make `dims` and `bias` values make `outputs` (`what` names the layer).
fn sizes_fit(what: &str, weights: usize, dims: &[usize], bias: usize, outputs: usize) -> Result<(), String> {
    let want = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if want != Some(weights) || bias != outputs || dims.contains(&0) {
        return Err(format!(
            "{what} of shape {dims:?} with {weights} weights and {bias} biases for {outputs} outputs"
        ));
    }
    Ok(())
}

impl Geometry {
    /// A kernel and stride of at least 1 and pads smaller than the kernel.
    pub fn check(&self) -> Result<(), String> {
        if self.k == 0 || self.stride == 0 || self.k > 64 || self.pad.iter().any(|&p| p >= self.k) {
            return Err(format!(
                "kernel {} stride {} pads {:?} is not a convolution these kernels run",
                self.k, self.stride, self.pad
            ));
        }
        Ok(())
    }

    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let [pt, pb, pl, pr] = self.pad;
        (
            (h + pt + pb - self.k) / self.stride + 1,
            (w + pl + pr - self.k) / self.stride + 1,
        )
    }

    /// `out_size`, or `None` where the padded input is smaller than the kernel (or the stride 0).
    pub fn checked_out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let [pt, pb, pl, pr] = self.pad;
        let fits = self.stride > 0 && h + pt + pb >= self.k && w + pl + pr >= self.k;
        fits.then(|| self.out_size(h, w))
    }

    /// The kernel rows (or columns) `lo..hi` that land inside an input of `size` for output `o`.
    #[inline(always)]
    fn taps(&self, o: usize, before: usize, size: usize) -> (usize, usize) {
        let at = o * self.stride;
        (
            before.saturating_sub(at),
            self.k.min((size + before).saturating_sub(at)),
        )
    }
}

/// A depthwise convolution: one `k x k` filter per channel, bias and activation fused.
pub struct Depthwise {
    /// `[k*k][c]`.
    w: Vec<f32>,
    bias: Vec<f32>,
    pub c: usize,
    pub geo: Geometry,
    pub act: Act,
}

impl Depthwise {
    /// From `[c][1][k][k]` weights and a bias.
    pub fn new(w_c1kk: &[f32], bias: &[f32], c: usize, geo: Geometry, act: Act) -> Result<Depthwise, String> {
        geo.check()?;
        let kk = geo.k * geo.k;
        sizes_fit("a depthwise convolution", w_c1kk.len(), &[c, kk], bias.len(), c)?;
        Ok(Depthwise {
            w: transposed(w_c1kk, c, kk),
            bias: bias.to_vec(),
            c,
            geo,
            act,
        })
    }

    /// `out` (`oh x ow x c`) from the expansion `e` of `x` (`h x w x e.cin`), never
    /// written whole: each thread expands its rows a band at a time into its part of
    /// `band` and runs the depthwise on them while they are in its cache, keeping the
    /// rows the next band reads again. A band holds about `band_floats` floats.
    /// `false` (nothing computed) until `e` has run once unfused, choosing its form,
    /// or where `band` cannot hold a band for each thread.
    #[allow(clippy::too_many_arguments)]
    pub fn run_expanded(
        &self,
        isa: Isa,
        e: &Pointwise,
        x: &[f32],
        (h, w): (usize, usize),
        band_floats: usize,
        band: &mut [f32],
        out: &mut [f32],
    ) -> bool {
        assert_eq!(e.cout, self.c, "depthwise: the expansion's channels are not its own");
        if !e.w.decided() {
            return false;
        }
        let (g, c, cin) = (self.geo, self.c, e.cin);
        let (oh, ow) = g.out_size(h, w);
        let [pt, ..] = g.pad;
        let (orow, irow) = (ow * c, w * c);
        let (runs, per) = split(oh, oh.div_ceil(threads()));
        // Output rows per band: `rows` of them read `(rows - 1) * stride + k` input rows.
        let rows = ((band_floats / irow).saturating_sub(g.k) / g.stride + 1).min(per);
        let band_len = ((rows - 1) * g.stride + g.k) * irow;
        if band.len() < runs * band_len {
            return false;
        }
        // The input rows output rows `a..b` read.
        let reads = |a: usize, b: usize| {
            (
                (a * g.stride).saturating_sub(pt),
                ((b - 1) * g.stride + g.k).saturating_sub(pt).min(h),
            )
        };
        band[..runs * band_len]
            .par_chunks_mut(band_len)
            .zip(out[..oh * orow].par_chunks_mut(per * orow))
            .enumerate()
            .for_each(|(t, (band, out))| {
                // Input rows `held` are in `band`, from its start.
                let mut held = 0..0;
                for (i, o) in out.chunks_mut(rows * orow).enumerate() {
                    let oy0 = t * per + i * rows;
                    let (lo, hi) = reads(oy0, oy0 + o.len() / orow);
                    let new = if lo < held.end {
                        band.copy_within((lo - held.start) * irow..(held.end - held.start) * irow, 0);
                        held.end
                    } else {
                        lo
                    };
                    let done = e.run_here(
                        isa,
                        &x[new * w * cin..hi * w * cin],
                        (hi - new) * w,
                        &mut band[(new - lo) * irow..(hi - lo) * irow],
                    );
                    debug_assert!(done.is_some(), "decided above");
                    held = lo..hi;
                    depthwise_rows(isa, self, &band[..(hi - lo) * irow], lo, h, w, oy0, isa, true, o);
                }
            });
        true
    }

    /// `out` (`oh x ow x c`) from `x` (`h x w x c`).
    pub fn run(&self, isa: Isa, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let (oh, ow) = self.geo.out_size(h, w);
        let row = ow * self.c;
        let (_, per) = split(oh, oh.div_ceil(threads()));
        out[..oh * row]
            .par_chunks_mut(per * row)
            .enumerate()
            .for_each(|(t, o)| depthwise_rows(isa, self, x, 0, h, w, t * per, isa, true, o));
    }
}

multiversion! {
    /// Output rows from `oy0` on, as many as `out` holds, from `x`: rows `y0..` of the
    /// `h x w` input, as many as those output rows read. With `fast` on an AVX-512 or
    /// AVX2 `kern`, the pixels whose taps all land inside the input run
    /// [`nhwc_depthwise::interior`] (`bench gemm` compares it with `fast` off).
    fn depthwise_rows(
        dw: &Depthwise,
        x: &[f32],
        y0: usize,
        h: usize,
        w: usize,
        oy0: usize,
        kern: Isa,
        fast: bool,
        out: &mut [f32],
    ) {
        let (c, g) = (dw.c, dw.geo);
        let (_, ow) = g.out_size(h, w);
        let [pt, _, pl, _] = g.pad;
        // The pixels whose taps all land inside the row: `inner.0..inner.1`.
        let inner = match (w + pl).checked_sub(g.k) {
            Some(room) => (pl.div_ceil(g.stride), (room / g.stride + 1).min(ow)),
            None => (0, 0),
        };
        let fast = fast && nhwc_depthwise::runs(kern, g.k, c) && inner.0 < inner.1;
        let lanes = nhwc_depthwise::lanes(kern);
        for (r, orow) in out.chunks_exact_mut(ow * c).enumerate() {
            let oy = oy0 + r;
            let (ky0, ky1) = g.taps(oy, pt, h);
            let mut skip = 0..0;
            if fast && ky0 == 0 && ky1 == g.k {
                let (ox0, n) = (inner.0, inner.1 - inner.0);
                let ix0 = ox0 * g.stride - pl;
                let iy0 = (oy * g.stride - pt).checked_sub(y0).expect("depthwise: a row above the band");
                // SAFETY: `runs` checked the instruction set (AVX-512 F, or AVX2 and
                // FMA) and k; band rows iy0..iy0 + k (asserted inside `x`) and columns
                // ix0..ix0 + (n - 1) stride + k (inside the row: all taps of the `inner`
                // pixels are), `w` apart; the weights hold `k * k * c` floats and the bias
                // `c` (asserted); pixels ox0..ox0 + n lie inside `orow`.
                unsafe {
                    assert!(x.len() >= (iy0 + g.k) * w * c && dw.w.len() >= g.k * g.k * c && dw.bias.len() >= c);
                    nhwc_depthwise::interior(
                        kern,
                        g.k,
                        x.as_ptr().add((iy0 * w + ix0) * c),
                        w * c,
                        c,
                        g.stride,
                        n,
                        dw.w.as_ptr(),
                        dw.bias.as_ptr(),
                        dw.act,
                        orow[ox0 * c..(ox0 + n) * c].as_mut_ptr(),
                    )
                };
                let whole = c / lanes * lanes;
                for ox in ox0..ox0 + n {
                    let o = &mut orow[ox * c..(ox + 1) * c];
                    for cb in whole..c {
                        dw_block::<1, FMA>(dw, x, (y0, w), (oy, ox), (0, g.k, 0, g.k), cb, &mut o[cb..cb + 1]);
                    }
                }
                if whole < c || !nhwc_depthwise::in_registers(dw.act) {
                    dw.act.apply_all(&mut orow[ox0 * c..(ox0 + n) * c]);
                }
                skip = ox0..ox0 + n;
            }
            let mut ox = 0;
            while ox < ow {
                if ox == skip.start && !skip.is_empty() {
                    ox = skip.end;
                    continue;
                }
                let (kx0, kx1) = g.taps(ox, pl, w);
                if ox + 1 < ow && g.taps(ox + 1, pl, w) == (kx0, kx1) {
                    // Two pixels with the same taps: each weight load serves both.
                    let t = (ky0, ky1, kx0, kx1);
                    let mut cb = 0;
                    while cb + 64 <= c {
                        dw_pair::<64, FMA>(dw, x, (y0, w), (oy, ox), t, cb, orow);
                        cb += 64;
                    }
                    while cb + 16 <= c {
                        dw_pair::<16, FMA>(dw, x, (y0, w), (oy, ox), t, cb, orow);
                        cb += 16;
                    }
                    while cb < c {
                        dw_pair::<1, FMA>(dw, x, (y0, w), (oy, ox), t, cb, orow);
                        cb += 1;
                    }
                    dw.act.apply_all(&mut orow[ox * c..(ox + 2) * c]);
                    ox += 2;
                    continue;
                }
                let o = &mut orow[ox * c..(ox + 1) * c];
                let mut cb = 0;
                // Channel blocks held in registers across the taps: 64, then 16, then 1.
                while cb + 64 <= c {
                    dw_block::<64, FMA>(dw, x, (y0, w), (oy, ox), (ky0, ky1, kx0, kx1), cb, &mut o[cb..cb + 64]);
                    cb += 64;
                }
                while cb + 16 <= c {
                    dw_block::<16, FMA>(dw, x, (y0, w), (oy, ox), (ky0, ky1, kx0, kx1), cb, &mut o[cb..cb + 16]);
                    cb += 16;
                }
                while cb < c {
                    dw_block::<1, FMA>(dw, x, (y0, w), (oy, ox), (ky0, ky1, kx0, kx1), cb, &mut o[cb..cb + 1]);
                    cb += 1;
                }
                dw.act.apply_all(o);
                ox += 1;
            }
        }
    }
}

/// Channels `cb..cb + B` of output pixels `ox` and `ox + 1` of row `orow`, whose taps
/// (the same for both) are `t`; `x` holds input rows `y0..`, `w` pixels each.
#[inline(always)]
fn dw_pair<const B: usize, const FMA: bool>(
    dw: &Depthwise,
    x: &[f32],
    (y0, w): (usize, usize),
    (oy, ox): (usize, usize),
    (ky0, ky1, kx0, kx1): (usize, usize, usize, usize),
    cb: usize,
    orow: &mut [f32],
) {
    let (c, g) = (dw.c, dw.geo);
    let [pt, _, pl, _] = g.pad;
    let mut a0 = [0f32; B];
    a0.copy_from_slice(&dw.bias[cb..cb + B]);
    let mut a1 = a0;
    for ky in ky0..ky1 {
        let iy = oy * g.stride + ky - pt - y0;
        for kx in kx0..kx1 {
            let ix = ox * g.stride + kx - pl;
            let i0 = &x[(iy * w + ix) * c + cb..][..B];
            let i1 = &x[(iy * w + ix + g.stride) * c + cb..][..B];
            let f = &dw.w[(ky * g.k + kx) * c + cb..][..B];
            for j in 0..B {
                a0[j] = madd::<FMA>(f[j], i0[j], a0[j]);
                a1[j] = madd::<FMA>(f[j], i1[j], a1[j]);
            }
        }
    }
    orow[ox * c + cb..][..B].copy_from_slice(&a0);
    orow[(ox + 1) * c + cb..][..B].copy_from_slice(&a1);
}

/// Channels `cb..cb + B` of one output pixel; `x` holds input rows `y0..`, `w` pixels each.
#[inline(always)]
fn dw_block<const B: usize, const FMA: bool>(
    dw: &Depthwise,
    x: &[f32],
    (y0, w): (usize, usize),
    (oy, ox): (usize, usize),
    (ky0, ky1, kx0, kx1): (usize, usize, usize, usize),
    cb: usize,
    out: &mut [f32],
) {
    let (c, g) = (dw.c, dw.geo);
    let [pt, _, pl, _] = g.pad;
    let mut acc = [0f32; B];
    acc.copy_from_slice(&dw.bias[cb..cb + B]);
    for ky in ky0..ky1 {
        let iy = oy * g.stride + ky - pt - y0;
        for kx in kx0..kx1 {
            let ix = ox * g.stride + kx - pl;
            let i = &x[(iy * w + ix) * c + cb..][..B];
            let f = &dw.w[(ky * g.k + kx) * c + cb..][..B];
            for j in 0..B {
                acc[j] = madd::<FMA>(f[j], i[j], acc[j]);
            }
        }
    }
    out.copy_from_slice(&acc);
}

/// `bench gemm`, third table: the depthwise layers of EfficientNet-Lite0, the inner
/// pixels' kernel against the general one for every pixel, on this thread,
/// alternating; best of `iters` rounds.
pub fn bench_depthwise(iters: usize) -> String {
    let isa = Isa::detect();
    let mut out =
        format!("NHWC depthwise ({isa:?}, ReLU6): the inner pixels' kernel against the general one, one thread\n");
    out.push_str("c @ h x w, k, stride | inner kernel | general | inner / general time\n");
    for &(c, hw, k, s) in &[
        (32usize, 112usize, 3usize, 1usize),
        (96, 112, 3, 2),
        (144, 56, 3, 1),
        (144, 56, 5, 2),
        (240, 28, 5, 1),
        (240, 28, 3, 2),
        (480, 14, 3, 1),
        (480, 14, 5, 1),
        (672, 14, 5, 1),
        (672, 14, 5, 2),
        (1152, 7, 5, 1),
        (1152, 7, 3, 1),
    ] {
        // TensorFlow's "same" padding, as the plan's layers have it.
        let total = (hw.div_ceil(s) - 1) * s + k - hw;
        let pad = [total / 2, total - total / 2, total / 2, total - total / 2];
        let geo = Geometry { k, stride: s, pad };
        let x: Vec<f32> = (0..hw * hw * c).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let wt: Vec<f32> = (0..c * k * k).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
        let dw = Depthwise::new(&wt, &vec![0.1; c], c, geo, Act::Relu6).expect("a valid shape");
        let (oh, ow) = geo.out_size(hw, hw);
        let mut o = vec![0f32; oh * ow * c];
        let reps = (50_000_000 / (oh * ow * c * k * k)).max(3);
        let mut best = [f64::MAX; 2];
        for _ in 0..iters.max(1) {
            for (i, fast) in [true, false].into_iter().enumerate() {
                let t = Instant::now();
                for _ in 0..reps {
                    depthwise_rows(isa, &dw, &x, 0, hw, hw, 0, isa, fast, &mut o);
                }
                best[i] = best[i].min(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
        out.push_str(&format!(
            "{c} @ {hw} x {hw}, {k}x{k}, s{s} | {:.1} us | {:.1} us | {:.2}\n",
            best[0] * 1e6,
            best[1] * 1e6,
            best[0] / best[1]
        ));
    }
    out
}

/// Output rows per convolution task (tasks are rounded to a multiple of the threads).
const CONV_ROWS: usize = 8;

/// A general convolution (groups = 1) as a GEMM read in place, bias and activation fused.
///
/// For each output row it gathers the `k` input rows that row reads into a *stack*,
/// `[column][ky][c_in]`, zeros where padded. An output pixel's receptive field is then
/// `k*k*c_in` contiguous floats of the stack, `stride*k*c_in` after its left
/// neighbour's, so the GEMM reads its rows where they lie: no im2col matrix (9x the
/// input for a 3x3 kernel), and the stack, a few KiB per row, is read from L1 just after
/// it is written. The input is read as NCHW, as the model takes it.
pub struct Conv {
    /// `[k*k*c_in][c_out]`, rows in (kx, ky, c_in) order, matching a field in the stack.
    w: nhwc_gemm::Weights,
    bias: Vec<f32>,
    pub cin: usize,
    pub cout: usize,
    pub geo: Geometry,
    pub act: Act,
}

impl Conv {
    /// From OIHW weights and a bias.
    pub fn new(w_oihw: &[f32], bias: &[f32], cout: usize, cin: usize, geo: Geometry, act: Act) -> Result<Conv, String> {
        geo.check()?;
        let k = geo.k;
        sizes_fit("a convolution", w_oihw.len(), &[cout, cin, k, k], bias.len(), cout)?;
        let mut w = vec![0f32; k * k * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        w[((kx * k + ky) * cin + i) * cout + o] = w_oihw[((o * cin + i) * k + ky) * k + kx];
                    }
                }
            }
        }
        Ok(Conv {
            w: nhwc_gemm::Weights::new(&w, k * k * cin, cout),
            bias: bias.to_vec(),
            cin,
            cout,
            geo,
            act,
        })
    }

    /// Floats of the stack of an output row `ow` pixels wide: the columns its fields span.
    fn stack_len(&self, ow: usize) -> usize {
        let g = self.geo;
        (g.stride * (ow - 1) + g.k) * g.k * self.cin
    }

    /// Scratch `run` needs for an `h x w` input: a stack per task.
    pub fn scratch_len(&self, h: usize, w: usize) -> usize {
        let (oh, ow) = self.geo.out_size(h, w);
        split(oh, CONV_ROWS).0 * self.stack_len(ow)
    }

    /// `out` (`oh x ow x c_out`, NHWC) from `x` (`c_in x h x w`, NCHW); `col` is scratch
    /// of `scratch_len`. The first run chooses the GEMM's form on the first output row;
    /// then each task gathers its rows' stacks one at a time and multiplies each at once.
    pub fn run(&self, isa: Isa, x: &[f32], h: usize, w: usize, col: &mut [f32], out: &mut [f32]) {
        let g = self.geo;
        let (oh, ow) = g.out_size(h, w);
        let n = self.cout;
        let (stack, lda) = (self.stack_len(ow), g.stride * g.k * self.cin);
        assert!(
            x.len() >= self.cin * h * w,
            "conv: input smaller than {}x{h}x{w}",
            self.cin
        );
        let epi = Epilogue {
            bias: &self.bias,
            residual: None,
            act: self.act,
        };
        if !self.w.decided() {
            gather_stack(isa, self, x, h, w, 0, &mut col[..stack]);
            nhwc_gemm::run(isa, &self.w, &col[..stack], lda, ow, epi, &mut out[..ow * n]);
        }
        let (_, per) = split(oh, CONV_ROWS);
        col[..oh.div_ceil(per) * stack]
            .par_chunks_mut(stack)
            .zip(out[..oh * ow * n].par_chunks_mut(per * ow * n))
            .enumerate()
            .for_each(|(t, (st, o))| {
                for (i, row) in o.chunks_exact_mut(ow * n).enumerate() {
                    gather_stack(isa, self, x, h, w, t * per + i, st);
                    let done = nhwc_gemm::run_here(isa, &self.w, st, lda, ow, epi, row);
                    debug_assert!(done.is_some(), "decided above");
                }
            });
    }
}

multiversion! {
    /// Output row `oy`'s stack: `stack[(col * k + ky) * c_in + c]` = the NCHW input at
    /// channel `c`, row `oy * stride + ky - pad_top`, column `col - pad_left`; zero outside.
    fn gather_stack(conv: &Conv, x: &[f32], h: usize, w: usize, oy: usize, stack: &mut [f32]) {
        let (g, cin) = (conv.geo, conv.cin);
        let [pt, _, pl, _] = g.pad;
        let cols = stack.len() / (g.k * cin);
        let step = g.k * cin;
        for ky in 0..g.k {
            let iy = (oy * g.stride + ky).checked_sub(pt).filter(|&iy| iy < h);
            for c in 0..cin {
                let at = ky * cin + c;
                let Some(iy) = iy else {
                    stack[at..].iter_mut().step_by(step).for_each(|v| *v = 0.0);
                    continue;
                };
                let src = &x[(c * h + iy) * w..(c * h + iy + 1) * w];
                // Columns `pl..pl + w` hold the row; those before and after are padding.
                let lead = pl.min(cols);
                let mut dst = stack[at..].iter_mut().step_by(step);
                dst.by_ref().take(lead).for_each(|v| *v = 0.0);
                // The source first: `zip` stops on it without taking a column more.
                src[..(pl + w).min(cols) - lead].iter().zip(dst.by_ref()).for_each(|(s, v)| *v = *s);
                dst.for_each(|v| *v = 0.0);
            }
        }
    }
}

multiversion! {
    /// Mean over pixels: `x` (`pixels x c`) -> `out` (`c`).
    pub fn mean_pixels(x: &[f32], c: usize, out: &mut [f32]) {
        out.fill(0.0);
        let pixels = x.len() / c;
        for p in x.chunks_exact(c) {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        let inv = 1.0 / pixels.max(1) as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// A dense layer: `out = W x + b`, `W` as `[out][in]`.
pub struct Dense {
    w: Vec<f32>,
    bias: Vec<f32>,
    pub inputs: usize,
}

impl Dense {
    pub fn new(w: &[f32], bias: &[f32]) -> Result<Dense, String> {
        if bias.is_empty() || !w.len().is_multiple_of(bias.len()) {
            return Err(format!(
                "a dense layer of {} weights cannot have {} outputs",
                w.len(),
                bias.len()
            ));
        }
        Ok(Dense {
            inputs: w.len() / bias.len(),
            w: w.to_vec(),
            bias: bias.to_vec(),
        })
    }

    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    pub fn run(&self, isa: Isa, x: &[f32], out: &mut [f32]) {
        let (_, per) = split(self.outputs(), self.outputs().div_ceil(threads() * 2));
        out[..self.outputs()]
            .par_chunks_mut(per)
            .enumerate()
            .for_each(|(t, o)| dense_rows(isa, self, x, t * per, o));
    }
}

multiversion! {
    fn dense_rows(d: &Dense, x: &[f32], r0: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let row = &d.w[(r0 + i) * d.inputs..(r0 + i + 1) * d.inputs];
            // Sixteen partial sums: independent lanes the compiler can vectorise.
            let mut acc = [0f32; 16];
            let mut chunks = row.chunks_exact(16).zip(x.chunks_exact(16));
            for (a, b) in &mut chunks {
                for j in 0..16 {
                    acc[j] = madd::<FMA>(a[j], b[j], acc[j]);
                }
            }
            let tail: f32 = row[row.len() / 16 * 16..]
                .iter()
                .zip(&x[row.len() / 16 * 16..])
                .map(|(a, b)| a * b)
                .sum();
            *o = acc.iter().sum::<f32>() + tail + d.bias[r0 + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::close;
    use super::*;
    use candle_core::{Device, Tensor};

    fn randn(shape: &[usize], seed: u64) -> Vec<f32> {
        // A small deterministic generator: the tests need no extra crate.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..shape.iter().product::<usize>())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn nhwc(t: &Tensor) -> Vec<f32> {
        t.permute((0, 2, 3, 1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn nchw(x: &[f32], (c, h, w): (usize, usize, usize)) -> Tensor {
        Tensor::from_slice(x, (1, h, w, c), &Device::Cpu)
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
    }

    fn reference(x: &Tensor, w: &Tensor, b: &[f32], g: Geometry, groups: usize, act: Act) -> Tensor {
        super::super::test_util::reference_conv(x, w, b, g.stride, g.pad, groups, act)
    }

    /// (channels, h, w, k, stride, pad): odd sizes, one channel, stride 2, asymmetric
    /// padding, no padding, a kernel as large as the input, channels past a 64 block.
    type Shape = (usize, usize, usize, usize, usize, [usize; 4]);
    const SHAPES: &[Shape] = &[
        (32, 28, 28, 3, 1, [1, 1, 1, 1]),
        (16, 15, 17, 3, 2, [0, 1, 0, 1]),
        (1, 7, 5, 5, 1, [2, 2, 2, 2]),
        (8, 9, 9, 5, 2, [1, 2, 1, 2]),
        (3, 6, 11, 3, 1, [0, 0, 0, 0]),
        (5, 5, 5, 5, 1, [0, 0, 0, 0]),
        (4, 2, 3, 3, 2, [1, 1, 1, 1]),
        (83, 6, 7, 3, 1, [1, 1, 1, 1]),
        (144, 14, 14, 5, 2, [1, 2, 1, 2]),
    ];
    const ACTS: [Act; 5] = [Act::None, Act::Relu, Act::Relu6, Act::Silu, Act::Sigmoid];

    #[test]
    fn depthwise_matches_candles_grouped_convolution_on_every_isa() {
        // Besides the shared shapes: runs of 4 and 8 pixels with a row's rest after
        // them, and channels past the last block of 16.
        let more: &[Shape] = &[
            (48, 9, 23, 5, 1, [2, 2, 2, 2]),
            (40, 8, 30, 3, 2, [0, 1, 0, 1]),
            (32, 6, 13, 3, 1, [1, 1, 1, 1]),
            (16, 5, 12, 5, 1, [0, 0, 0, 0]),
        ];
        for isa in Isa::supported() {
            for (n, &(c, h, w, k, s, pad)) in SHAPES.iter().chain(more).enumerate() {
                let act = ACTS[n % ACTS.len()];
                let geo = Geometry { k, stride: s, pad };
                let x = randn(&[h, w, c], n as u64);
                let wt = randn(&[c, 1, k, k], 100 + n as u64);
                let b = randn(&[c], 200 + n as u64);
                let wt_t = Tensor::from_slice(&wt, (c, 1, k, k), &Device::Cpu).unwrap();
                let want = nhwc(&reference(&nchw(&x, (c, h, w)), &wt_t, &b, geo, c, act));
                let dw = Depthwise::new(&wt, &b, c, geo, act).unwrap();
                let (oh, ow) = geo.out_size(h, w);
                let mut got = vec![f32::NAN; oh * ow * c];
                dw.run(isa, &x, h, w, &mut got);
                close(
                    &got,
                    &want,
                    &format!("{isa:?} depthwise {c}x{h}x{w} k{k} s{s} {pad:?} {act:?}"),
                );
            }
        }
    }

    /// An expansion fused into the depthwise over bands of rows gives what the two
    /// layers give run one after the other (tested against candle above), in both
    /// GEMM forms, with bands of one output row, of a few, and of the whole image.
    #[test]
    fn expand_and_depthwise_fused_over_bands_match_the_two_layers() {
        for isa in Isa::supported() {
            for (n, &(c, h, w, k, s, pad)) in SHAPES.iter().enumerate() {
                let cin = [16, 3, 24, 1][n % 4];
                let geo = Geometry { k, stride: s, pad };
                let x = randn(&[h, w, cin], 500 + n as u64);
                let we = randn(&[c, cin], 600 + n as u64);
                let be = randn(&[c], 700 + n as u64);
                let wd = randn(&[c, 1, k, k], 800 + n as u64);
                let bd = randn(&[c], 900 + n as u64);
                let dw = Depthwise::new(&wd, &bd, c, geo, ACTS[n % ACTS.len()]).unwrap();
                let (oh, ow) = geo.out_size(h, w);
                let rows = transposed(&we, c, cin);
                for form in 0..2 {
                    let kept = match form {
                        0 => nhwc_gemm::Kept::ours(&rows, cin, c),
                        _ => nhwc_gemm::Kept::crate_form(rows.clone(), cin, c),
                    };
                    let e = Pointwise {
                        w: nhwc_gemm::Weights::with_form(kept),
                        bias: be.clone(),
                        cin,
                        cout: c,
                        act: Act::Relu6,
                    };
                    let mut mid = vec![f32::NAN; h * w * c];
                    e.run(isa, &x, h * w, None, &mut mid);
                    let mut want = vec![f32::NAN; oh * ow * c];
                    dw.run(isa, &mid, h, w, &mut want);
                    for band_floats in [1, 3 * w * c, h * w * c] {
                        let mut band = vec![f32::NAN; h * w * c * threads() + k * w * c * threads()];
                        let mut got = vec![f32::NAN; oh * ow * c];
                        assert!(dw.run_expanded(isa, &e, &x, (h, w), band_floats, &mut band, &mut got));
                        close(
                            &got,
                            &want,
                            &format!(
                                "{isa:?} form {form} fused {cin}->{c} {h}x{w} k{k} s{s} {pad:?} band {band_floats}"
                            ),
                        );
                    }
                }
                // Before its form is chosen, the fused run declines.
                let e = Pointwise::new(&we, &be, c, cin, Act::None).unwrap();
                let mut got = vec![0f32; oh * ow * c];
                let mut band = vec![0f32; h * w * c * threads() + k * w * c * threads()];
                assert!(!dw.run_expanded(isa, &e, &x, (h, w), 1, &mut band, &mut got));
            }
        }
    }

    #[test]
    fn conv_matches_candles_convolution_on_every_isa() {
        for isa in Isa::supported() {
            for (n, &(cin, h, w, k, s, pad)) in SHAPES.iter().enumerate() {
                let cout = [32, 7, 1, 16, 24][n % 5];
                let act = ACTS[(n + 2) % ACTS.len()];
                let geo = Geometry { k, stride: s, pad };
                let x = randn(&[h, w, cin], n as u64);
                let wt = randn(&[cout, cin, k, k], 300 + n as u64);
                let b = randn(&[cout], 400 + n as u64);
                let wt_t = Tensor::from_slice(&wt, (cout, cin, k, k), &Device::Cpu).unwrap();
                let want = nhwc(&reference(&nchw(&x, (cin, h, w)), &wt_t, &b, geo, 1, act));
                let conv = Conv::new(&wt, &b, cout, cin, geo, act).unwrap();
                let (oh, ow) = geo.out_size(h, w);
                let mut col = vec![f32::NAN; conv.scratch_len(h, w)];
                let x: Vec<f32> = nchw(&x, (cin, h, w)).flatten_all().unwrap().to_vec1().unwrap();
                // The first run chooses the GEMM's form on the first output row; both
                // runs then multiply each row's stack as it is gathered.
                for run in 0..2 {
                    let mut got = vec![f32::NAN; oh * ow * cout];
                    conv.run(isa, &x, h, w, &mut col, &mut got);
                    close(
                        &got,
                        &want,
                        &format!("{isa:?} conv {cin}->{cout} {h}x{w} k{k} s{s} {pad:?} {act:?} run {run}"),
                    );
                }
            }
        }
    }

    #[test]
    fn pointwise_with_residual_matches_candle_on_every_isa() {
        for isa in Isa::supported() {
            for (n, &(cin, cout, h, w)) in [
                (16, 96, 15, 17),
                (1, 1, 1, 1),
                (320, 1280, 7, 7),
                (83, 5, 40, 41),
                (192, 1152, 7, 7),
                (24, 40, 9, 11),
            ]
            .iter()
            .enumerate()
            {
                let act = ACTS[n % ACTS.len()];
                let geo = Geometry {
                    k: 1,
                    stride: 1,
                    pad: [0; 4],
                };
                let x = randn(&[h, w, cin], n as u64);
                let wt = randn(&[cout, cin], 500 + n as u64);
                let b = randn(&[cout], 600 + n as u64);
                let res = randn(&[h, w, cout], 700 + n as u64);
                let wt_t = Tensor::from_slice(&wt, (cout, cin, 1, 1), &Device::Cpu).unwrap();
                let y = reference(&nchw(&x, (cin, h, w)), &wt_t, &b, geo, 1, Act::None);
                let y = (y + nchw(&res, (cout, h, w))).unwrap();
                let y = reference(
                    &y,
                    &Tensor::ones((cout, 1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
                    &vec![0.0; cout],
                    geo,
                    cout,
                    act,
                );
                let pw = Pointwise::new(&wt, &b, cout, cin, act).unwrap();
                let mut got = vec![f32::NAN; h * w * cout];
                pw.run(isa, &x, h * w, Some(&res), &mut got);
                close(
                    &got,
                    &nhwc(&y),
                    &format!("{isa:?} pointwise {cin}->{cout} {h}x{w} {act:?}"),
                );
            }
        }
    }

    #[test]
    fn pooling_and_dense_match_candle() {
        for isa in Isa::supported() {
            let (hw, c, out) = (49, 37, 11);
            let x = randn(&[hw, c], 1);
            let mut pooled = vec![f32::NAN; c];
            mean_pixels(isa, &x, c, &mut pooled);
            let xt = Tensor::from_slice(&x, (hw, c), &Device::Cpu).unwrap();
            let want = xt.mean(0).unwrap();
            close(&pooled, &want.to_vec1::<f32>().unwrap(), "mean");
            let w = randn(&[out, c], 2);
            let b = randn(&[out], 3);
            let d = Dense::new(&w, &b).unwrap();
            let mut got = vec![f32::NAN; out];
            d.run(isa, &pooled, &mut got);
            let wt = Tensor::from_slice(&w, (out, c), &Device::Cpu).unwrap();
            let want = (wt
                .matmul(&want.reshape((c, 1)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                + Tensor::from_slice(&b, out, &Device::Cpu).unwrap())
            .unwrap();
            close(&got, &want.to_vec1::<f32>().unwrap(), &format!("{isa:?} dense"));
        }
    }

    #[test]
    fn recip_is_close_to_a_division_from_one_to_past_exps_range() {
        let mut d = 1.0f32;
        while d < 3e38 {
            for got in [recip::<false>(d), recip::<true>(d)] {
                let want = 1.0 / d.min(1e37) as f64;
                assert!(
                    (got as f64 - want).abs() <= 2e-7 * want,
                    "recip({d}) = {got}, division {want}"
                );
            }
            d *= 1.0137;
        }
        assert_eq!(recip::<true>(1.0), 1.0);
    }

    #[test]
    fn exp_is_close_to_libm_over_the_range_activations_see() {
        let mut x = -90.0f32;
        while x < 90.0 {
            let want = x.clamp(-87.0, 88.0).exp();
            for got in [exp::<false>(x), exp::<true>(x)] {
                assert!((got - want).abs() <= 1e-6 * want, "exp({x}) = {got}, libm {want}");
            }
            x += 0.0137;
        }
    }
}
