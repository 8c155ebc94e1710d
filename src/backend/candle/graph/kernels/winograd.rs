//! Winograd F(2x2, 3x3) for stride-1 3x3 convolutions: each 2x2 block of
//! outputs from a 4x4 input patch with 16 multiplications per input channel
//! and filter instead of 36, so 2.25x fewer multiply-adds than im2col + GEMM.
//!
//! The filters are transformed once at load (`U = G g Gᵀ`, 16 matrices of
//! `c_out x c_in`). Per frame, in chunks of output blocks that stay in cache:
//! the input patches are transformed (`V = Bᵀ d B`, 16 matrices of `c_in x
//! blocks`), multiplied (16 GEMMs `U[ξ] V[ξ]`), transformed back
//! (`Y = Aᵀ M A`), and bias and activation applied before the block is
//! written. Chunks run on the CPU pool, each into output pixels no other
//! chunk writes.

use candle_core::Tensor;
use rayon::prelude::*;

use super::super::super::cpu::{multiversion, Act, Isa, Level};
use super::super::super::gemm::{gemm_packed, Packed, Strided, B};
use super::conv::every_other;
use super::*;

/// Output blocks (2x2 pixels each) per chunk: `16 * (c_in + c_out)` floats a block must fit L2 with room.
fn blocks_per_chunk(cin: usize, cout: usize) -> usize {
    (16384 / (cin + cout).max(1)).clamp(16, 256)
}

/// A stride-1 3x3 convolution (groups = 1) as Winograd F(2x2, 3x3).
pub struct Winograd {
    /// `U[ξ]` (`c_out x c_in`) packed for the GEMM, ξ = 4 r + c of the 4x4 transformed filter.
    u: Vec<Packed>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    /// (top, bottom, left, right).
    pad: [usize; 4],
    act: Act,
    isa: Isa,
}

impl Winograd {
    /// From a `[c_out, c_in, 3, 3]` weight (OIHW), a `[c_out]` bias, padding (top, bottom, left, right).
    pub fn new(w: &[f32], bias: Vec<f32>, cout: usize, cin: usize, pad: [usize; 4], act: Act, isa: Isa) -> Winograd {
        assert_eq!(w.len(), cout * cin * 9, "winograd: weights");
        let mut u = vec![0f32; 16 * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &w[(co * cin + ci) * 9..][..9];
                // G g: 4x3. G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1].
                let mut t = [[0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    t[0][c] = g0;
                    t[1][c] = 0.5 * (g0 + g1 + g2);
                    t[2][c] = 0.5 * (g0 - g1 + g2);
                    t[3][c] = g2;
                }
                // (G g) Gᵀ: 4x4.
                for (r, t) in t.iter().enumerate() {
                    let v = [t[0], 0.5 * (t[0] + t[1] + t[2]), 0.5 * (t[0] - t[1] + t[2]), t[2]];
                    for (c, v) in v.into_iter().enumerate() {
                        u[((4 * r + c) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
        let u = (0..16)
            .map(|xi| Packed::a(isa, Strided::rows(&u[xi * cout * cin..][..cout * cin], cin), cout, cin))
            .collect();
        Winograd {
            u,
            bias,
            cin,
            cout,
            pad,
            act,
            isa,
        }
    }

    /// The convolution of one image `x` (`c_in x h x w`) into `out` (`c_out x oh x ow`).
    pub(super) fn run(&self, x: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize), out: &SharedOut) {
        let (bh, bw) = (oh.div_ceil(2), ow.div_ceil(2));
        let blocks = bh * bw;
        let per = blocks_per_chunk(self.cin, self.cout);
        let chunks = blocks.div_ceil(per);
        (0..chunks).into_par_iter().for_each(|ch| {
            let b0 = ch * per;
            let n = per.min(blocks - b0);
            // Rows of `v` and `m` (one per channel and ξ) `nn` apart: whole groups of L
            // columns, and room for the last group to run past `n`.
            let nn = padded(n);
            WINO.with(|s| {
                let mut s = s.borrow_mut();
                let (v_len, m_len) = (16 * self.cin * nn, 16 * self.cout * nn);
                let t_len = row_scratch(bw);
                if s.len() < v_len + m_len + t_len {
                    s.resize(v_len + m_len + t_len, 0.0);
                }
                let (v, rest) = s.split_at_mut(v_len);
                let (m, rest) = rest.split_at_mut(m_len);
                let tmp = &mut rest[..t_len];
                input_transform(
                    self.isa,
                    self.isa,
                    x,
                    (self.cin, h, w),
                    self.pad,
                    (bw, nn),
                    b0,
                    n,
                    v,
                    tmp,
                );
                for (xi, u) in self.u.iter().enumerate() {
                    let m = &mut m[xi * self.cout * nn..][..self.cout * nn];
                    // SAFETY: `m` is this product's `cout` rows, `nn >= n` apart, this thread's scratch.
                    unsafe {
                        gemm_packed(
                            self.isa,
                            (self.cout, n, self.cin),
                            u.data(),
                            B::Rows(&v[xi * self.cin * nn..][..self.cin * nn], nn),
                            m.as_mut_ptr(),
                            nn,
                            None,
                        )
                    };
                }
                // Y = Aᵀ M A, plus the bias, activated, into the output rows.
                // SAFETY: chunk `ch` owns output blocks b0..b0 + n, which no other chunk writes.
                unsafe { self.output_rows(m, (n, nn), (oh, ow), bw, b0, tmp, out) };
            });
        });
    }
}

/// The transforms' vector width: they run in whole groups of `L` blocks, into rows
/// padded for the last group (what it computes past the blocks is never read).
const L: usize = 16;

/// A row of `n` blocks padded to whole groups of [`L`], with one group to spare.
fn padded(n: usize) -> usize {
    n.next_multiple_of(L) + L
}

impl Winograd {
    /// `Y = Aᵀ M A` of blocks `b0..b0 + n` (`bw` a row) from the products `m[ξ][co][j]`
    /// (rows `nn` apart), the bias added and the activation applied, written into the
    /// `c_out x oh x ow` output: a block row's segment at a time, each filter's four
    /// outputs per block computed as vectors across the segment's blocks, then interleaved
    /// into its two output rows. (Block by block, with a scatter of single pixels, this
    /// took as long as the GEMMs.)
    ///
    /// # Safety
    /// No other thread writes those blocks' pixels meanwhile; `tmp` holds [`row_scratch`]`(bw)`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_rows(
        &self,
        m: &[f32],
        (n, nn): (usize, usize),
        (oh, ow): (usize, usize),
        bw: usize,
        b0: usize,
        tmp: &mut [f32],
        out: &SharedOut,
    ) {
        let (cout, ml) = (self.cout, padded(bw));
        assert!(m.len() >= 16 * cout * nn && nn >= padded(n) && tmp.len() >= 8 * ml && cout * oh * ow <= out.1);
        let (quads, rows) = tmp.split_at_mut(4 * ml);
        let (top, bottom) = rows.split_at_mut(2 * ml);
        let mut j = 0;
        while j < n {
            let (by, bx0) = ((b0 + j) / bw, (b0 + j) % bw);
            let span = (bw - bx0).min(n - j);
            let groups = span.next_multiple_of(L);
            let (x0, cols) = (2 * bx0, (2 * span).min(ow - 2 * bx0));
            for co in 0..cout {
                let mm: [&[f32]; 16] = std::array::from_fn(|xi| &m[(xi * cout + co) * nn + j..][..groups]);
                let (o0, rest) = quads.split_at_mut(ml);
                let (o1, rest) = rest.split_at_mut(ml);
                let (o2, o3) = rest.split_at_mut(ml);
                let o = [
                    &mut o0[..groups],
                    &mut o1[..groups],
                    &mut o2[..groups],
                    &mut o3[..groups],
                ];
                output_transform(self.isa, mm, self.bias[co], o);
                let y = 2 * by;
                for (r, (a, b), row) in [(0, (&*o0, &*o1), &mut *top), (1, (&*o2, &*o3), &mut *bottom)] {
                    if y + r >= oh {
                        continue;
                    }
                    interleave(self.isa, &a[..span], &b[..span], &mut row[..2 * span]);
                    let at = (co * oh + y + r) * ow + x0;
                    // SAFETY: inside the output (asserted: x0 + cols <= ow, y + r < oh, co < cout);
                    // these pixels belong to this chunk's blocks, the caller's alone.
                    let o = unsafe { std::slice::from_raw_parts_mut(out.at(at), cols) };
                    copy_short(&row[..cols], o);
                    if self.act != Act::None {
                        activate(self.isa, o, self.act);
                    }
                }
            }
            j += span;
        }
    }
}

std::thread_local! {
    /// Each pool thread's transformed input and products, grown to the largest chunk, then reused.
    static WINO: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of row scratch [`input_transform`] and [`Winograd::output_rows`] need for `bw`
/// blocks a row.
fn row_scratch(bw: usize) -> usize {
    // In: one padded input row (2 ml), and the even and odd columns of four rows (ml
    // each, eight arrays). Out: four outputs per block and two output rows (ml each).
    10 * padded(bw + 1)
}

multiversion! {
    /// `V = Bᵀ d B` of the 4x4 input patches of blocks `b0..b0 + n` (`bw` blocks a row),
    /// into `v[ξ][ci][j]` (rows `nn` apart); zeros where the patch lies in the padding. A
    /// block row at a time: its four input rows are copied with their padding and split
    /// into even and odd columns (block `j`'s columns are even[j], odd[j], even[j + 1],
    /// odd[j + 1]), and every step is then a vector operation across the row's blocks, in
    /// whole groups of [`L`]. `kern` (the same `Isa`) picks [`every_other`]'s kernel.
    fn input_transform(
        kern: Isa,
        x: &[f32],
        chw: (usize, usize, usize),
        pad: [usize; 4],
        bw_nn: (usize, usize),
        b0: usize,
        n: usize,
        v: &mut [f32],
        tmp: &mut [f32],
    ) {
        let ((c, h, w), (bw, nn)) = (chw, bw_nn);
        let (pt, pl) = (pad[0] as isize, pad[2] as isize);
        let ml = padded(bw + 1);
        assert!(nn >= padded(n) && v.len() >= 16 * c * nn && tmp.len() >= 10 * ml);
        let (row, eo) = tmp.split_at_mut(2 * ml);
        let (ev, od) = eo.split_at_mut(4 * ml);
        let mut j = 0;
        while j < n {
            let (by, bx0) = ((b0 + j) / bw, (b0 + j) % bw);
            let span = (bw - bx0).min(n - j);
            let m = span + 1;
            let len = 2 * m;
            let x0 = 2 * bx0 as isize - pl;
            for ci in 0..c {
                let plane = &x[ci * h * w..(ci + 1) * h * w];
                // The same rows two channels on, asked for now: a channel's rows lie a plane
                // apart, a stride the hardware prefetcher does not follow.
                #[cfg(target_arch = "x86_64")]
                if ci + 2 < c {
                    for r in 0..4 {
                        let iy = 2 * by as isize - pt + r as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let at = ((ci + 2) * h + iy as usize) * w + x0.max(0) as usize;
                        let end = (at + len).min(((ci + 2) * h + iy as usize + 1) * w);
                        for p in (at..end).step_by(16) {
                            // SAFETY: a prefetch only hints; `p` lies inside `x` (end <= its row's end).
                            unsafe {
                                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                                    x.as_ptr().add(p).cast(),
                                )
                            };
                        }
                    }
                }
                // The four input rows of this block row, zero outside the image, as even and
                // odd columns.
                for r in 0..4 {
                    let (e, o) = (&mut ev[r * ml..][..m], &mut od[r * ml..][..m]);
                    let iy = 2 * by as isize - pt + r as isize;
                    if iy < 0 || iy >= h as isize {
                        e.fill(0.0);
                        o.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    let row = &mut row[..len];
                    let lo = (-x0).clamp(0, len as isize) as usize;
                    let hi = (w as isize - x0).clamp(lo as isize, len as isize) as usize;
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    copy_short(&src[(x0 + lo as isize) as usize..(x0 + hi as isize) as usize], &mut row[lo..hi]);
                    every_other(kern, row, e);
                    every_other(kern, &row[1..], o);
                }
                // Per group of L blocks: Bᵀ d down each of the patch's four columns (t0 = d0 -
                // d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3), then (Bᵀ d) B across.
                for q in (0..span).step_by(L) {
                    // Row r of Bᵀ d is d[a] + s d[b], s = ±1; its patch columns are even[j],
                    // odd[j], even[j + 1], odd[j + 1].
                    for (r, (a, b, sg)) in [(0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0)].into_iter().enumerate() {
                        let (ea, oa) = (&ev[a * ml + q..][..L + 1], &od[a * ml + q..][..L + 1]);
                        let (eb, ob) = (&ev[b * ml + q..][..L + 1], &od[b * ml + q..][..L + 1]);
                        let at = |k: usize| ((4 * r + k) * c + ci) * nn + j + q;
                        let (v0, rest) = v[at(0)..].split_at_mut(c * nn);
                        let (v1, rest) = rest.split_at_mut(c * nn);
                        let (v2, v3) = rest.split_at_mut(c * nn);
                        let (v0, v1, v2, v3) = (&mut v0[..L], &mut v1[..L], &mut v2[..L], &mut v3[..L]);
                        for i in 0..L {
                            let t0 = ea[i] + sg * eb[i];
                            let t1 = oa[i] + sg * ob[i];
                            let t2 = ea[i + 1] + sg * eb[i + 1];
                            let t3 = oa[i + 1] + sg * ob[i + 1];
                            v0[i] = t0 - t2;
                            v1[i] = t1 + t2;
                            v2[i] = t2 - t1;
                            v3[i] = t1 - t3;
                        }
                    }
                }
            }
            j += span;
        }
    }
}

multiversion! {
    /// One filter's `Y = Aᵀ M A` plus its bias across a segment's blocks, in groups of
    /// [`L`]: `mm[ξ][j]` -> the blocks' top-left, top-right, bottom-left and bottom-right
    /// outputs `o[0..4][j]`. Aᵀ = [1 1 1 0; 0 1 -1 -1].
    fn output_transform(mm: [&[f32]; 16], bias: f32, o: [&mut [f32]; 4]) {
        let [o0, o1, o2, o3] = o;
        for q in (0..o0.len()).step_by(L) {
            let mut x = [[0f32; L]; 16];
            for (x, m) in x.iter_mut().zip(&mm) {
                x.copy_from_slice(&m[q..q + L]);
            }
            let (o0, o1, o2, o3) = (&mut o0[q..q + L], &mut o1[q..q + L], &mut o2[q..q + L], &mut o3[q..q + L]);
            for i in 0..L {
                let mut t0 = [0f32; 4];
                let mut t1 = [0f32; 4];
                for k in 0..4 {
                    t0[k] = x[k][i] + x[4 + k][i] + x[8 + k][i];
                    t1[k] = x[4 + k][i] - x[8 + k][i] - x[12 + k][i];
                }
                o0[i] = t0[0] + t0[1] + t0[2] + bias;
                o1[i] = t0[1] - t0[2] - t0[3] + bias;
                o2[i] = t1[0] + t1[1] + t1[2] + bias;
                o3[i] = t1[1] - t1[2] - t1[3] + bias;
            }
        }
    }
}

/// `o[2 j] = a[j]`, `o[2 j + 1] = b[j]`: on AVX-512 and AVX2 a vector of each at a
/// time, permuted into two of `o`.
fn interleave(isa: Isa, a: &[f32], b: &[f32], o: &mut [f32]) {
    let n = a.len();
    assert!(b.len() == n && o.len() == 2 * n, "interleave: lengths");
    let done = match isa.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` of level V4 exists only where AVX-512 F was found.
        Level::V4 => unsafe { interleave_v4(a, b, o) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: likewise, level V3 only where AVX2 was found.
        Level::V3 => unsafe { interleave_v3(a, b, o) },
        _ => 0,
    };
    for j in done..n {
        o[2 * j] = a[j];
        o[2 * j + 1] = b[j];
    }
}

/// [`interleave`]'s first `16 k` pairs, for the largest such `k`; returns `16 k`.
///
/// # Safety
/// AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_v4(a: &[f32], b: &[f32], o: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let whole = a.len() / 16;
    for ((a, b), o) in a.chunks_exact(16).zip(b.chunks_exact(16)).zip(o.chunks_exact_mut(32)) {
        // SAFETY: 16 floats at `a` and `b`, 32 at `o` (exact chunks).
        unsafe {
            let (x, y) = (_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(b.as_ptr()));
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_permutex2var_ps(x, lo, y));
            _mm512_storeu_ps(o.as_mut_ptr().add(16), _mm512_permutex2var_ps(x, hi, y));
        }
    }
    whole * 16
}

/// [`interleave`]'s first `8 k` pairs, for the largest such `k`; returns `8 k`.
///
/// # Safety
/// AVX2 on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_v3(a: &[f32], b: &[f32], o: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = a.len() / 8;
    for ((a, b), o) in a.chunks_exact(8).zip(b.chunks_exact(8)).zip(o.chunks_exact_mut(16)) {
        // SAFETY: 8 floats at `a` and `b`, 16 at `o` (exact chunks).
        unsafe {
            let (x, y) = (_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr()));
            // Within each 128-bit half: [a0 b0 a1 b1 | a4 b4 a5 b5] and [a2 b2 a3 b3 | a6 b6 a7 b7].
            let (l, h) = (_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_permute2f128_ps::<0x20>(l, h));
            _mm256_storeu_ps(o.as_mut_ptr().add(8), _mm256_permute2f128_ps::<0x31>(l, h));
        }
    }
    whole * 8
}

/// The weights of a candle tensor as the Winograd kernel takes them, if it applies:
/// a `[c_out, c_in, 3, 3]` weight at stride 1.
pub(super) fn applies(weight: &Tensor, stride: usize) -> bool {
    matches!(weight.dims4(), Ok((_, _, 3, 3))) && stride == 1
}
