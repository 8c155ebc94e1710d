//! The NHWC depthwise convolution's kernel for the pixels all of whose taps land
//! inside the input, on AVX-512 and on AVX2: all of a layer but its border, which
//! the general kernel in `nhwc.rs` takes.
//!
//! Owns: a run of such pixels along one output row, a block of channels (a
//! vector's lanes: 16 or 8) at a time, in tiles of 8 pixels: 8 independent sums,
//! each multiply-add loading only its input. With AVX-512, a 3x3 kernel's 9 weight
//! vectors are held in registers across the run; a 5x5 kernel's row of 5, and
//! every kernel's with AVX2's 16 registers, is loaded again for each tile. The
//! general kernel, plain loops the compiler vectorises, loads a weight for every
//! two multiply-adds and works out each pixel's taps; `bench gemm`'s third table
//! compares the two on EfficientNet-Lite0's depthwise layers.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::cpu::{Act, Isa, Level};

/// Channels per block of [`interior`] on this instruction set (a vector's lanes).
pub(super) fn lanes(isa: Isa) -> usize {
    if isa.level() == Level::V4 {
        16
    } else {
        8
    }
}

/// Whether [`interior`] runs this layer on this instruction set: AVX-512 or AVX2,
/// a 3x3 or 5x5 kernel, and at least one whole block of channels.
pub(super) fn runs(isa: Isa, k: usize, c: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa.level() >= Level::V3 && matches!(k, 3 | 5) && c >= lanes(isa)
}

/// Whether [`interior`] applies `act` itself (the others are left to the caller).
pub(super) fn in_registers(act: Act) -> bool {
    matches!(act, Act::None | Act::Relu | Act::Relu6)
}

/// `n` output pixels of one row, channels `0..c / 16 * 16`: `out` (pixels `c`
/// apart) = bias + the `k x k` taps of `x` weighted by `wt` (`[k * k][c]`), then
/// `act` where [`in_registers`] says so. `x` is the first pixel's first tap,
/// channel 0; kernel rows lie `row` floats apart, output pixels `stride * c`.
///
/// # Safety
/// [`runs`] holds for this CPU's [`Isa`], `k` and `c`. For every pixel `p < n`,
/// tap row `ky < k` and column `kx < k`, the `c` floats at
/// `x + ky * row + (p * stride + kx) * c` are readable; `wt` holds `k * k * c`
/// floats, `bias` `c`, and `out` is writable for `n * c`, touched by no one else.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn interior(
    isa: Isa,
    k: usize,
    x: *const f32,
    row: usize,
    c: usize,
    stride: usize,
    n: usize,
    wt: *const f32,
    bias: *const f32,
    act: Act,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let r = Run {
            x,
            row,
            c,
            px: stride * c,
            wt,
            bias,
            act,
            out,
        };
        // SAFETY: the caller's (`runs`: AVX-512 F, or AVX2 and FMA, and k of 3 or 5).
        unsafe {
            match (isa.level(), k) {
                (Level::V4, 3) => v4::<3, true>(&r, n),
                (Level::V4, _) => v4::<5, false>(&r, n),
                (_, 3) => v3::<3, false>(&r, n),
                (_, _) => v3::<5, false>(&r, n),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, k, x, row, c, stride, n, wt, bias, act, out);
        unreachable!("nhwc depthwise: `runs` is false off x86-64");
    }
}

/// [`interior`]'s operands; `px`: floats from one output pixel's taps to the next's.
#[cfg(target_arch = "x86_64")]
struct Run {
    x: *const f32,
    row: usize,
    c: usize,
    px: usize,
    wt: *const f32,
    bias: *const f32,
    act: Act,
    out: *mut f32,
}

/// One instruction set's kernel: `$v` runs each block of `$lanes` channels, the
/// pixels in tiles of 8 and the rest in one tile, and `$tile` one tile. With `HOLD`,
/// the block's weights are loaded once, before the pixels; else once per tile and
/// kernel row (a 5x5 kernel's 25, or AVX2's 16 registers, leave too few for that).
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($v:ident, $tile:ident, $feat:literal, $vec:ty, $lanes:literal, $load:ident, $store:ident,
     $fma:ident, $zero:ident, $set1:ident, $max:ident, $min:ident) => {
        /// # Safety
        #[doc = concat!("As [`interior`]; `K` its `k`; this CPU runs ", $feat, ".")]
        #[target_feature(enable = $feat)]
        unsafe fn $v<const K: usize, const HOLD: bool>(r: &Run, n: usize) {
            const P: usize = 8;
            for cb in (0..r.c / $lanes).map(|b| b * $lanes) {
                let wv: [[$vec; K]; K] = std::array::from_fn(|ky| {
                    std::array::from_fn(|kx| {
                        if HOLD {
                            // SAFETY: tap (ky, kx) of channels cb..cb + lanes, inside the
                            // `K * K * c` weights.
                            unsafe { $load(r.wt.add((ky * K + kx) * r.c + cb)) }
                        } else {
                            $zero()
                        }
                    })
                });
                // SAFETY: channels cb..cb + lanes of the `c` biases.
                let bv = unsafe { $load(r.bias.add(cb)) };
                let mut p = 0;
                // SAFETY: pixels p..p + P (or p) < n, channels cb..cb + lanes <= c: the
                // caller's.
                unsafe {
                    while p + P <= n {
                        $tile::<K, P, HOLD>(r, p, cb, &wv, bv);
                        p += P;
                    }
                    // The rest in one tile, so that its sums run side by side.
                    match n - p {
                        0 => {}
                        1 => $tile::<K, 1, HOLD>(r, p, cb, &wv, bv),
                        2 => $tile::<K, 2, HOLD>(r, p, cb, &wv, bv),
                        3 => $tile::<K, 3, HOLD>(r, p, cb, &wv, bv),
                        4 => $tile::<K, 4, HOLD>(r, p, cb, &wv, bv),
                        5 => $tile::<K, 5, HOLD>(r, p, cb, &wv, bv),
                        6 => $tile::<K, 6, HOLD>(r, p, cb, &wv, bv),
                        _ => $tile::<K, 7, HOLD>(r, p, cb, &wv, bv),
                    }
                }
            }
        }

        /// Pixels `p..p + P`, one block of channels from `cb`.
        ///
        /// # Safety
        /// As [`interior`], for these pixels and channels.
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $tile<const K: usize, const P: usize, const HOLD: bool>(
            r: &Run,
            p: usize,
            cb: usize,
            wv: &[[$vec; K]; K],
            bv: $vec,
        ) {
            let zero = $zero();
            let mut acc = [bv; P];
            for (ky, wrow) in wv.iter().enumerate() {
                // SAFETY: tap row ky of pixel p, channel cb: the caller's.
                let x = unsafe { r.x.add(ky * r.row + p * r.px + cb) };
                let held: [$vec; K] = std::array::from_fn(|kx| {
                    if HOLD {
                        wrow[kx]
                    } else {
                        // SAFETY: tap (ky, kx) of channels cb..cb + lanes, inside the
                        // `K * K * c` weights.
                        unsafe { $load(r.wt.add((ky * K + kx) * r.c + cb)) }
                    }
                });
                for (kx, &wk) in held.iter().enumerate() {
                    for (j, a) in acc.iter_mut().enumerate() {
                        // SAFETY: tap (ky, kx) of pixel p + j, a block of channels from cb.
                        let i = unsafe { $load(x.add(j * r.px + kx * r.c)) };
                        *a = $fma(i, wk, *a);
                    }
                }
            }
            let six = $set1(6.0);
            for (j, &v) in acc.iter().enumerate() {
                let v = match r.act {
                    Act::Relu => $max(v, zero),
                    Act::Relu6 => $min($max(v, zero), six),
                    _ => v,
                };
                // SAFETY: pixel p + j, this block of channels of `out`: the caller's.
                unsafe { $store(r.out.add((p + j) * r.c + cb), v) };
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
kernel!(
    v4,
    tile_v4,
    "avx512f",
    __m512,
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_max_ps,
    _mm512_min_ps
);
#[cfg(target_arch = "x86_64")]
kernel!(
    v3,
    tile_v3,
    "avx2,fma",
    __m256,
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_max_ps,
    _mm256_min_ps
);
