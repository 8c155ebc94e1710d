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

use super::super::super::cpu::{multiversion, Act, Isa};
use super::super::super::gemm::{gemm_packed, Packed, Strided, B};
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
            WINO.with(|s| {
                let mut s = s.borrow_mut();
                // `v` is reused for the outputs `y` (4 per block and filter) once multiplied.
                let (v_len, m_len) = ((16 * self.cin * n).max(4 * self.cout * n), 16 * self.cout * n);
                let t_len = row_scratch(bw);
                if s.len() < v_len + m_len + t_len {
                    s.resize(v_len + m_len + t_len, 0.0);
                }
                let (v, rest) = s.split_at_mut(v_len);
                let (m, rest) = rest.split_at_mut(m_len);
                let tmp = &mut rest[..t_len];
                input_transform(
                    self.isa,
                    x,
                    (self.cin, h, w),
                    self.pad,
                    bw,
                    b0,
                    n,
                    &mut v[..16 * self.cin * n],
                    tmp,
                );
                for (xi, u) in self.u.iter().enumerate() {
                    let m = &mut m[xi * self.cout * n..][..self.cout * n];
                    // SAFETY: `m` is this product's `cout x n`, this thread's scratch.
                    unsafe {
                        gemm_packed(
                            self.isa,
                            (self.cout, n, self.cin),
                            u.data(),
                            B::Rows(&v[xi * self.cin * n..][..self.cin * n], n),
                            m.as_mut_ptr(),
                            n,
                            None,
                        )
                    };
                }
                // Y = Aᵀ M A, into the first 4 * cout * n floats of `v` (no longer needed).
                let y = &mut v[..4 * self.cout * n];
                output_transform(self.isa, m, self.cout, n, y);
                for (co, y) in y.chunks_exact_mut(4 * n).enumerate() {
                    bias_activate(self.isa, y, self.bias[co], self.act);
                }
                // SAFETY: chunk `ch` owns output blocks b0..b0 + n, which no other chunk writes.
                unsafe { scatter(y, self.cout, (oh, ow), bw, b0, n, out) };
            });
        });
    }
}

std::thread_local! {
    /// Each pool thread's transformed input and products, grown to the largest chunk, then reused.
    static WINO: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of row scratch [`input_transform`] needs for `bw` blocks a row.
fn row_scratch(bw: usize) -> usize {
    // Four padded input rows (2 bw + 4 each), and even/odd columns of the four
    // transformed rows (bw + 2 each, eight arrays).
    4 * (2 * bw + 4) + 8 * (bw + 2)
}

multiversion! {
    /// `V = Bᵀ d B` of the 4x4 input patches of blocks `b0..b0 + n` (`bw` blocks a row),
    /// into `v[ξ][ci][j]`; zeros where the patch lies in the padding. A block row at a time:
    /// its four input rows are copied with their padding, split into even and odd columns
    /// (block `j`'s columns are even[j], odd[j], even[j + 1], odd[j + 1]), and every step is
    /// then a contiguous vector operation across the row's blocks.
    fn input_transform(
        x: &[f32],
        chw: (usize, usize, usize),
        pad: [usize; 4],
        bw: usize,
        b0: usize,
        n: usize,
        v: &mut [f32],
        tmp: &mut [f32],
    ) {
        let (c, h, w) = chw;
        let (pt, pl) = (pad[0] as isize, pad[2] as isize);
        let (rows, eo) = tmp.split_at_mut(4 * (2 * bw + 4));
        let mut j = 0;
        while j < n {
            let (by, bx0) = ((b0 + j) / bw, (b0 + j) % bw);
            let span = (bw - bx0).min(n - j);
            let len = 2 * span + 2;
            let x0 = 2 * bx0 as isize - pl;
            for ci in 0..c {
                let plane = &x[ci * h * w..(ci + 1) * h * w];
                // The four input rows of this block row, zero outside the image.
                for r in 0..4 {
                    let row = &mut rows[r * (2 * bw + 4)..][..len];
                    let iy = 2 * by as isize - pt + r as isize;
                    if iy < 0 || iy >= h as isize {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    let lo = (-x0).clamp(0, len as isize) as usize;
                    let hi = (w as isize - x0).clamp(lo as isize, len as isize) as usize;
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    copy_short(&src[(x0 + lo as isize) as usize..(x0 + hi as isize) as usize], &mut row[lo..hi]);
                }
                // Bᵀ d down each column: t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3,
                // kept as even and odd columns (span + 1 of each).
                let m = span + 1;
                let (ev, od) = eo.split_at_mut(4 * (bw + 2));
                for i in 0..m {
                    let d: [[f32; 2]; 4] =
                        std::array::from_fn(|r| [rows[r * (2 * bw + 4) + 2 * i], rows[r * (2 * bw + 4) + 2 * i + 1]]);
                    let t = [
                        [d[0][0] - d[2][0], d[0][1] - d[2][1]],
                        [d[1][0] + d[2][0], d[1][1] + d[2][1]],
                        [d[2][0] - d[1][0], d[2][1] - d[1][1]],
                        [d[1][0] - d[3][0], d[1][1] - d[3][1]],
                    ];
                    for r in 0..4 {
                        ev[r * (bw + 2) + i] = t[r][0];
                        od[r * (bw + 2) + i] = t[r][1];
                    }
                }
                // (Bᵀ d) B across: columns even[j], odd[j], even[j + 1], odd[j + 1].
                for r in 0..4 {
                    let e = &ev[r * (bw + 2)..][..m];
                    let o = &od[r * (bw + 2)..][..m];
                    let at = |k: usize| ((4 * r + k) * c + ci) * n + j;
                    for (q, d) in v[at(0)..at(0) + span].iter_mut().enumerate() {
                        *d = e[q] - e[q + 1];
                    }
                    for (q, d) in v[at(1)..at(1) + span].iter_mut().enumerate() {
                        *d = o[q] + e[q + 1];
                    }
                    for (q, d) in v[at(2)..at(2) + span].iter_mut().enumerate() {
                        *d = e[q + 1] - o[q];
                    }
                    for (q, d) in v[at(3)..at(3) + span].iter_mut().enumerate() {
                        *d = o[q] - o[q + 1];
                    }
                }
            }
            j += span;
        }
    }
}

multiversion! {
    /// `Y = Aᵀ M A` of every filter and block: `m[ξ][co][j]` -> `y[co][j][4]` (the block's
    /// 2x2 outputs, row-major). Aᵀ = [1 1 1 0; 0 1 -1 -1].
    fn output_transform(m: &[f32], cout: usize, n: usize, y: &mut [f32]) {
        let at = |xi: usize, co: usize, j: usize| m[(xi * cout + co) * n + j];
        for co in 0..cout {
            for j in 0..n {
                let mm: [f32; 16] = std::array::from_fn(|xi| at(xi, co, j));
                let t0: [f32; 4] = std::array::from_fn(|k| mm[k] + mm[4 + k] + mm[8 + k]);
                let t1: [f32; 4] = std::array::from_fn(|k| mm[4 + k] - mm[8 + k] - mm[12 + k]);
                let o = &mut y[(co * n + j) * 4..][..4];
                o[0] = t0[0] + t0[1] + t0[2];
                o[1] = t0[1] - t0[2] - t0[3];
                o[2] = t1[0] + t1[1] + t1[2];
                o[3] = t1[1] - t1[2] - t1[3];
            }
        }
    }
}

/// Writes blocks `b0..b0 + n` of `y` (`y[co][j][4]`) into the `c_out x oh x ow` output,
/// dropping the pixels of edge blocks that fall past an odd `oh` or `ow`.
///
/// # Safety
/// No other thread writes those blocks' pixels meanwhile.
unsafe fn scatter(y: &[f32], cout: usize, (oh, ow): (usize, usize), bw: usize, b0: usize, n: usize, out: &SharedOut) {
    for co in 0..cout {
        for j in 0..n {
            let (by, bx) = ((b0 + j) / bw, (b0 + j) % bw);
            let o = &y[(co * n + j) * 4..][..4];
            for (k, &v) in o.iter().enumerate() {
                let (oy, ox) = (2 * by + k / 2, 2 * bx + k % 2);
                if oy < oh && ox < ow {
                    // SAFETY: inside the output (`write` checks), and block j is this caller's.
                    unsafe { out.write((co * oh + oy) * ow + ox, v) };
                }
            }
        }
    }
}

/// The weights of a candle tensor as the Winograd kernel takes them, if it applies:
/// a `[c_out, c_in, 3, 3]` weight at stride 1.
pub(super) fn applies(weight: &Tensor, stride: usize) -> bool {
    matches!(weight.dims4(), Ok((_, _, 3, 3))) && stride == 1
}
