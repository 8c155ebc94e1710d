//! Winograd F(2x2, 3x3) and F(4x4, 3x3) for stride-1 3x3 convolutions: each
//! 2x2 (4x4) block of outputs from a 4x4 (6x6) input patch with 16 (36)
//! multiplications per input channel and filter instead of 36 (144), so 2.25x
//! (4x) fewer multiply-adds than im2col + GEMM. F(4x4) uses Lavin and Gray's
//! points 0, ±1, ±2, ∞ (its error stays inside the kernels' test bound, 1e-4).
//!
//! The filters are transformed once at load (`U = G g Gᵀ`, 16 or 36 matrices
//! of `c_out x c_in`). Per frame, in chunks of output blocks that stay in cache:
//! the input patches are transformed (`V = Bᵀ d B`, one `c_in x blocks` matrix
//! per ξ), multiplied (a GEMM `U[ξ] V[ξ]` per ξ), transformed back
//! (`Y = Aᵀ M A`), and bias and activation applied as each output row is
//! written. Chunks run on the CPU pool, each into output pixels no other chunk
//! writes. Each transform runs as vectors across a block row's blocks, in whole
//! groups of [`L`] into padded rows.

use candle_core::Tensor;
use rayon::prelude::*;

use super::super::super::cpu::{multiversion, Act, Isa, Level};
use super::super::super::gemm::{gemm_packed, Packed, Strided, B};
use super::conv::every_other;
use super::*;

/// Output blocks per chunk, for `tt` transformed values a block (16 or 36): a chunk's
/// `tt (c_in + c_out)` floats a block stay near 1 MB.
fn blocks_per_chunk(tt: usize, cin: usize, cout: usize) -> usize {
    (262144 / (tt * (cin + cout)).max(1)).clamp(16, 256)
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
    /// Output block side: 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)).
    m: usize,
}

/// F(4x4, 3x3)'s filter transform `G` (6x3), as in Lavin and Gray's points 0, ±1, ±2, ∞.
const G4: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

impl Winograd {
    /// From a `[c_out, c_in, 3, 3]` weight (OIHW), a `[c_out]` bias, padding (top, bottom,
    /// left, right), as F(`m`x`m`, 3x3), `m` 2 or 4.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &[f32],
        bias: Vec<f32>,
        cout: usize,
        cin: usize,
        pad: [usize; 4],
        act: Act,
        isa: Isa,
        m: usize,
    ) -> Winograd {
        assert_eq!(w.len(), cout * cin * 9, "winograd: weights");
        assert!(m == 2 || m == 4, "winograd: F(2x2) or F(4x4)");
        if m == 4 {
            // U = G g Gᵀ (6x6), in f64.
            let mut u = vec![0f32; 36 * cout * cin];
            for co in 0..cout {
                for ci in 0..cin {
                    let g = &w[(co * cin + ci) * 9..][..9];
                    let mut t = [[0f64; 3]; 6];
                    for (r, t) in t.iter_mut().enumerate() {
                        for (c, t) in t.iter_mut().enumerate() {
                            *t = (0..3).map(|k| G4[r][k] * g[3 * k + c] as f64).sum();
                        }
                    }
                    for (r, t) in t.iter().enumerate() {
                        for (c, gc) in G4.iter().enumerate() {
                            let v: f64 = (0..3).map(|k| t[k] * gc[k]).sum();
                            u[((6 * r + c) * cout + co) * cin + ci] = v as f32;
                        }
                    }
                }
            }
            let u = (0..36)
                .map(|xi| Packed::a(isa, Strided::rows(&u[xi * cout * cin..][..cout * cin], cin), cout, cin))
                .collect();
            return Winograd {
                u,
                bias,
                cin,
                cout,
                pad,
                act,
                isa,
                m,
            };
        }
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
            m,
        }
    }

    /// The convolution of one image `x` (`c_in x h x w`) into `out` (`c_out x oh x ow`).
    pub(super) fn run(&self, x: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize), out: &SharedOut) {
        let (bh, bw) = (oh.div_ceil(self.m), ow.div_ceil(self.m));
        let blocks = bh * bw;
        let tt = self.u.len();
        let per = blocks_per_chunk(tt, self.cin, self.cout);
        let chunks = blocks.div_ceil(per);
        (0..chunks).into_par_iter().for_each(|ch| {
            let b0 = ch * per;
            let n = per.min(blocks - b0);
            // Rows of `v` and `m` (one per channel and ξ) `nn` apart: whole groups of L
            // columns, and room for the last group to run past `n`.
            let nn = padded(n);
            WINO.with(|s| {
                let mut s = s.borrow_mut();
                let (v_len, m_len) = (tt * self.cin * nn, tt * self.cout * nn);
                let t_len = row_scratch(self.m, bw);
                if s.len() < v_len + m_len + t_len {
                    s.resize(v_len + m_len + t_len, 0.0);
                }
                let (v, rest) = s.split_at_mut(v_len);
                let (m, rest) = rest.split_at_mut(m_len);
                let tmp = &mut rest[..t_len];
                let geo = (self.cin, h, w);
                if self.m == 4 {
                    input_transform4(self.isa, self.isa, x, geo, self.pad, (bw, nn), b0, n, v, tmp);
                } else {
                    input_transform(self.isa, self.isa, x, geo, self.pad, (bw, nn), b0, n, v, tmp);
                }
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
                unsafe {
                    if self.m == 4 {
                        self.output_rows4(m, (n, nn), (oh, ow), bw, b0, tmp, out)
                    } else {
                        self.output_rows(m, (n, nn), (oh, ow), bw, b0, tmp, out)
                    }
                };
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

/// `row` from input row `src`: its columns `x0..x0 + row.len()`, zeros outside the row.
#[inline(always)]
fn padded_row(src: &[f32], x0: isize, row: &mut [f32]) {
    let len = row.len() as isize;
    let lo = (-x0).clamp(0, len) as usize;
    let hi = (src.len() as isize - x0).clamp(lo as isize, len) as usize;
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
    copy_short(
        &src[(x0 + lo as isize) as usize..(x0 + hi as isize) as usize],
        &mut row[lo..hi],
    );
}

/// Asks for rows `y0..y0 + rows` of `plane` (rows `w` floats long), columns `x0..x0 + len`
/// of each, those inside it: the next channels' rows a transform reads, a plane apart, a
/// stride the hardware prefetcher does not follow. (A no-op off x86-64.)
#[inline(always)]
fn prefetch_rows(plane: &[f32], w: usize, (y0, rows): (isize, usize), (x0, len): (isize, usize)) {
    #[cfg(target_arch = "x86_64")]
    for r in 0..rows as isize {
        let y = y0 + r;
        if y < 0 || (y as usize + 1) * w > plane.len() {
            continue;
        }
        let at = y as usize * w + x0.max(0) as usize;
        let end = (at + len).min((y as usize + 1) * w);
        for p in (at..end).step_by(16) {
            // SAFETY: a prefetch only hints; `p` lies inside `plane` (end <= its row's end).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(plane.as_ptr().add(p).cast())
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (plane, w, y0, rows, x0, len);
}

impl Winograd {
    /// Writes `row` to the output at `at`, activated.
    ///
    /// # Safety
    /// `at..at + row.len()` lies inside `out`, and no other thread touches it meanwhile.
    unsafe fn put_row(&self, row: &[f32], at: usize, out: &SharedOut) {
        // SAFETY: the caller's.
        let o = unsafe { std::slice::from_raw_parts_mut(out.at(at), row.len()) };
        copy_short(row, o);
        if self.act != Act::None {
            activate(self.isa, o, self.act);
        }
    }
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
    /// No other thread writes those blocks' pixels meanwhile; `tmp` holds [`row_scratch`]`(2, bw)`.
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
                    // SAFETY: inside the output (asserted: x0 + cols <= ow, the row < oh, co <
                    // cout); these pixels belong to this chunk's blocks, the caller's alone.
                    unsafe { self.put_row(&row[..cols], at, out) };
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
fn row_scratch(m: usize, bw: usize) -> usize {
    // F(2x2): in, one padded input row (2 ml), and the even and odd columns of four rows
    // (ml each, eight arrays); out, four outputs per block and two output rows (ml each).
    // F(4x4): in, a row (4 ml), its even and odd columns (2 ml each) and the four phases
    // of six rows (24 ml); out, sixteen outputs per block and two rows' halves and a row.
    if m == 4 {
        32 * padded(bw + 1)
    } else {
        10 * padded(bw + 1)
    }
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
        assert!(nn >= padded(n) && v.len() >= 16 * c * nn && tmp.len() >= row_scratch(2, bw));
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
                // The same rows two channels on, asked for now.
                if ci + 2 < c {
                    prefetch_rows(&x[(ci + 2) * h * w..(ci + 3) * h * w], w, (2 * by as isize - pt, 4), (x0, len));
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
                    padded_row(src, x0, row);
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

/// `Bᵀ d` of F(4x4, 3x3) on six values. Bᵀ = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0;
/// 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1].
#[inline(always)]
fn bt4(d: [f32; 6]) -> [f32; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ m` of F(4x4, 3x3) on six values. Aᵀ = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0;
/// 0 1 -1 8 -8 1].
#[inline(always)]
fn at4(m: [f32; 6]) -> [f32; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (p12, n12, p34, n34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + p12 + p34, n12 + 2.0 * n34, p12 + 4.0 * p34, n12 + 8.0 * n34 + m5]
}

multiversion! {
    /// F(4x4, 3x3)'s `V = Bᵀ d B` of the 6x6 input patches of blocks `b0..b0 + n` (`bw`
    /// blocks a row), into `v[ξ][ci][j]` (rows `nn` apart), as [`input_transform`] does
    /// F(2x2)'s: a block row's six input rows are split into their four column phases
    /// (block `j`'s columns are phase 0..4 at `j`, then phases 0 and 1 at `j + 1`), `Bᵀ`
    /// applied down the rows in place, then across, in whole groups of [`L`] blocks.
    fn input_transform4(
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
        assert!(nn >= padded(n) && v.len() >= 36 * c * nn && tmp.len() >= row_scratch(4, bw));
        let (row, rest) = tmp.split_at_mut(4 * ml);
        let (half, ph) = rest.split_at_mut(4 * ml);
        // Phase k of row r: ph[(6 k + r) ml..][..ml].
        let ph = &mut ph[..24 * ml];
        let mut j = 0;
        while j < n {
            let (by, bx0) = ((b0 + j) / bw, (b0 + j) % bw);
            let span = (bw - bx0).min(n - j);
            let m = span + 1;
            let len = 4 * m;
            let x0 = 4 * bx0 as isize - pl;
            for ci in 0..c {
                let plane = &x[ci * h * w..(ci + 1) * h * w];
                // The same rows two channels on, asked for now (as in `input_transform`).
                if ci + 2 < c {
                    prefetch_rows(&x[(ci + 2) * h * w..(ci + 3) * h * w], w, (4 * by as isize - pt, 6), (x0, len));
                }
                for r in 0..6 {
                    let iy = 4 * by as isize - pt + r as isize;
                    if iy < 0 || iy >= h as isize {
                        for k in 0..4 {
                            ph[(6 * k + r) * ml..][..m].fill(0.0);
                        }
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    let row = &mut row[..len];
                    padded_row(src, x0, row);
                    // Even and odd columns, then each split again: phase k holds columns 4 i + k.
                    let (ev, od) = half.split_at_mut(2 * ml);
                    every_other(kern, row, &mut ev[..2 * m]);
                    every_other(kern, &row[1..], &mut od[..2 * m]);
                    for (k, src) in [(0, &ev[..2 * m]), (2, &ev[1..2 * m]), (1, &od[..2 * m]), (3, &od[1..2 * m])] {
                        every_other(kern, src, &mut ph[(6 * k + r) * ml..][..m]);
                    }
                }
                // Bᵀ down each phase's six rows, in place (whole groups: the padding is scratch).
                let mg = m.next_multiple_of(L);
                for k in 0..4 {
                    let rows = &mut ph[6 * k * ml..][..6 * ml];
                    let (r0, rest) = rows.split_at_mut(ml);
                    let (r1, rest) = rest.split_at_mut(ml);
                    let (r2, rest) = rest.split_at_mut(ml);
                    let (r3, rest) = rest.split_at_mut(ml);
                    let (r4, r5) = rest.split_at_mut(ml);
                    let (r0, r1, r2, r3, r4, r5) = (&mut r0[..mg], &mut r1[..mg], &mut r2[..mg], &mut r3[..mg], &mut r4[..mg], &mut r5[..mg]);
                    for i in 0..mg {
                        let t = bt4([r0[i], r1[i], r2[i], r3[i], r4[i], r5[i]]);
                        (r0[i], r1[i], r2[i], r3[i], r4[i], r5[i]) = (t[0], t[1], t[2], t[3], t[4], t[5]);
                    }
                }
                // Then across: row a's six patch columns through Bᵀ into v[6 a + k].
                for q in (0..span).step_by(L) {
                    for a in 0..6 {
                        let p = |k: usize| &ph[(6 * k + a) * ml + q..][..L + 1];
                        let (p0, p1, p2, p3) = (p(0), p(1), p(2), p(3));
                        let at = ((6 * a) * c + ci) * nn + j + q;
                        let (v0, rest) = v[at..].split_at_mut(c * nn);
                        let (v1, rest) = rest.split_at_mut(c * nn);
                        let (v2, rest) = rest.split_at_mut(c * nn);
                        let (v3, rest) = rest.split_at_mut(c * nn);
                        let (v4, v5) = rest.split_at_mut(c * nn);
                        let (v0, v1, v2, v3, v4, v5) = (&mut v0[..L], &mut v1[..L], &mut v2[..L], &mut v3[..L], &mut v4[..L], &mut v5[..L]);
                        for i in 0..L {
                            let t = bt4([p0[i], p1[i], p2[i], p3[i], p0[i + 1], p1[i + 1]]);
                            (v0[i], v1[i], v2[i], v3[i], v4[i], v5[i]) = (t[0], t[1], t[2], t[3], t[4], t[5]);
                        }
                    }
                }
            }
            j += span;
        }
    }
}

multiversion! {
    /// F(4x4, 3x3)'s `Y = Aᵀ M A` plus the bias for one filter across a segment's blocks,
    /// in groups of [`L`]: `mm[ξ][j]` -> output `(a, b)` of each block in `o[4 a + b][j]`.
    fn output_transform4(mm: [&[f32]; 36], bias: f32, o: &mut [f32], ml: usize, groups: usize) {
        // Zeroed once a call, not once a group (each group overwrites all of them).
        let (mut x, mut y) = ([[0f32; L]; 36], [[0f32; L]; 16]);
        for q in (0..groups).step_by(L) {
            for (x, m) in x.iter_mut().zip(&mm) {
                x.copy_from_slice(&m[q..q + L]);
            }
            for i in 0..L {
                // Aᵀ down each column of M, then across each row.
                let mut t = [[0f32; 6]; 4];
                for col in 0..6 {
                    let c = at4([x[col][i], x[6 + col][i], x[12 + col][i], x[18 + col][i], x[24 + col][i], x[30 + col][i]]);
                    for a in 0..4 {
                        t[a][col] = c[a];
                    }
                }
                for a in 0..4 {
                    let r = at4(t[a]);
                    for b in 0..4 {
                        y[4 * a + b][i] = r[b] + bias;
                    }
                }
            }
            for (k, y) in y.iter().enumerate() {
                o[k * ml + q..][..L].copy_from_slice(y);
            }
        }
    }
}

impl Winograd {
    /// F(4x4, 3x3)'s [`Winograd::output_rows`]: each block's sixteen outputs as vectors
    /// across the segment, interleaved twice into its four output rows.
    ///
    /// # Safety
    /// No other thread writes those blocks' pixels meanwhile; `tmp` holds [`row_scratch`]`(4, bw)`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn output_rows4(
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
        assert!(m.len() >= 36 * cout * nn && nn >= padded(n) && tmp.len() >= 24 * ml && cout * oh * ow <= out.1);
        let (ys, rest) = tmp.split_at_mut(16 * ml);
        let (halves, row) = rest.split_at_mut(4 * ml);
        let (ev, od) = halves.split_at_mut(2 * ml);
        let mut j = 0;
        while j < n {
            let (by, bx0) = ((b0 + j) / bw, (b0 + j) % bw);
            let span = (bw - bx0).min(n - j);
            let groups = span.next_multiple_of(L);
            let (x0, cols) = (4 * bx0, (4 * span).min(ow - 4 * bx0));
            for co in 0..cout {
                let mm: [&[f32]; 36] = std::array::from_fn(|xi| &m[(xi * cout + co) * nn + j..][..groups]);
                output_transform4(self.isa, mm, self.bias[co], ys, ml, groups);
                for a in 0..4 {
                    let y = 4 * by + a;
                    if y >= oh {
                        break;
                    }
                    let yb = |b: usize| &ys[(4 * a + b) * ml..][..span];
                    interleave(self.isa, yb(0), yb(2), &mut ev[..2 * span]);
                    interleave(self.isa, yb(1), yb(3), &mut od[..2 * span]);
                    interleave(self.isa, &ev[..2 * span], &od[..2 * span], &mut row[..4 * span]);
                    let at = (co * oh + y) * ow + x0;
                    // SAFETY: inside the output (asserted: x0 + cols <= ow, the row < oh, co <
                    // cout); these pixels belong to this chunk's blocks, the caller's alone.
                    unsafe { self.put_row(&row[..cols], at, out) };
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
