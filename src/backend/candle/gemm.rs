//! The GEMM under every convolution and MatMul of the Candle kernels: packed
//! panels, a register tile per instruction set, and no allocation.
//!
//! `c = bias + a b`, with `a` (`m x k`) packed into panels of [`Tile::mr`]
//! rows and `b` (`k x n`) into panels of [`Tile::nr`] columns, each panel
//! `k`-major so that the register tile reads both operands in order. Weights
//! are packed once, at load ([`Packed`]); the other operand is packed per call
//! into a buffer the caller owns (a pool thread's scratch, reused), so a frame
//! allocates nothing here. `c` is row-major with any row stride, so a caller
//! can write straight into a column tile of its output.
//!
//! The register tiles: AVX-512, 8 rows by 48 columns (24 accumulators of 16
//! lanes: 11 loads per 24 multiply-adds, where 8 by 32 took 10 per 16), with
//! 16- or 32-column tiles for a narrower last panel; AVX2 + FMA, 6 by 16;
//! the baseline, 4 by 8 in plain arithmetic. Sums run in blocks of [`KC`]
//! along `k`: the block's panels stay in L1, and a long sum is added up in
//! parts (closer to the reference, where it has no FMA).

use super::cpu::{copy_short, Isa, Level};

/// The depth of one pass of the register tile over `k`.
pub const KC: usize = 256;

/// The register tile of an instruction set: rows of `a`, columns of `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub mr: usize,
    pub nr: usize,
    /// The narrowest last panel of `b` (one vector); panels are whole vectors wide.
    pub nr_last: usize,
}

impl Tile {
    pub fn of(isa: Isa) -> Tile {
        match isa.level() {
            Level::V4 => Tile {
                mr: 8,
                nr: 48,
                nr_last: 16,
            },
            Level::V3 => Tile {
                mr: 6,
                nr: 16,
                nr_last: 16,
            },
            Level::Base => Tile {
                mr: 4,
                nr: 8,
                nr_last: 8,
            },
        }
    }

    /// The width of the last panel of `n` columns: the fewest whole vectors
    /// (`nr_last` each) that hold what is left.
    fn last_width(self, n: usize) -> usize {
        let rem = n - (n.max(1) - 1) / self.nr * self.nr;
        rem.next_multiple_of(self.nr_last).clamp(self.nr_last, self.nr)
    }

    /// Floats `a` (`m x k`) takes packed.
    pub fn a_len(self, m: usize, k: usize) -> usize {
        m.div_ceil(self.mr) * self.mr * k
    }

    /// Floats `b` (`k x n`) takes packed.
    pub fn b_len(self, k: usize, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        ((n - 1) / self.nr * self.nr + self.last_width(n)) * k
    }
}

/// A matrix element by element: `(row, column)` at `data[row * rs + column * cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// Row-major, rows `rs` apart.
    pub fn rows(data: &'a [f32], rs: usize) -> Strided<'a> {
        Strided { data, rs, cs: 1 }
    }

    /// Whether every element of a `rows x cols` matrix lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `a` (`m x k`) into panels of `t.mr` rows in `dst` (at least `t.a_len(m, k)`), zeros past `m`.
pub fn pack_a(t: Tile, a: Strided, m: usize, k: usize, dst: &mut [f32]) {
    assert!(a.fits(m, k) && dst.len() >= t.a_len(m, k), "gemm: pack_a out of bounds");
    for (p, panel) in dst[..t.a_len(m, k)].chunks_exact_mut((t.mr * k).max(1)).enumerate() {
        let r0 = p * t.mr;
        let rows = t.mr.min(m - r0);
        for (q, lane) in panel.chunks_exact_mut(t.mr).enumerate() {
            for (i, v) in lane.iter_mut().enumerate() {
                *v = if i < rows {
                    a.data[(r0 + i) * a.rs + q * a.cs]
                } else {
                    0.0
                };
            }
        }
    }
}

/// `b` (`k x n`) into panels of `t.nr` columns (the last perhaps narrower) in `dst`
/// (at least `t.b_len(k, n)`), zeros past `n`.
pub fn pack_b(t: Tile, b: Strided, k: usize, n: usize, dst: &mut [f32]) {
    assert!(b.fits(k, n) && dst.len() >= t.b_len(k, n), "gemm: pack_b out of bounds");
    let mut at = 0;
    let mut c0 = 0;
    while c0 < n {
        let w = if n - c0 > t.nr { t.nr } else { t.last_width(n) };
        let cols = w.min(n - c0);
        let panel = &mut dst[at..at + w * k];
        if b.rs == 1 && b.cs != 1 && k > 1 {
            // b stored transposed (a column of b is contiguous, as an attention's transposed
            // operand is): 8x8 blocks, read 8 contiguous floats of 8 columns, written as 8
            // rows of the panel, so that reads and writes both run along memory.
            #[cfg(target_arch = "x86_64")]
            let avx = std::arch::is_x86_feature_detected!("avx");
            for q0 in (0..k).step_by(8) {
                let qn = 8.min(k - q0);
                for j0 in (0..w).step_by(8) {
                    #[cfg(target_arch = "x86_64")]
                    if avx && qn == 8 && j0 + 8 <= cols {
                        let src = &b.data[(c0 + j0) * b.cs + q0..];
                        assert!(7 * b.cs + 8 <= src.len() && (q0 + 7) * w + j0 + 8 <= panel.len());
                        // SAFETY: AVX found above; 8 rows of 8 floats, `cs` apart, inside
                        // `src`, and 8 rows of 8, `w` apart, inside the panel (asserted).
                        unsafe { transpose8(src.as_ptr(), b.cs, panel[q0 * w + j0..].as_mut_ptr(), w) };
                        continue;
                    }
                    let mut blk = [[0f32; 8]; 8];
                    for (jj, col) in (j0..(j0 + 8).min(cols)).enumerate() {
                        let src = &b.data[(c0 + col) * b.cs + q0..][..qn];
                        for (qq, x) in src.iter().enumerate() {
                            blk[qq][jj] = *x;
                        }
                    }
                    for (qq, row) in blk.iter().enumerate().take(qn) {
                        panel[(q0 + qq) * w + j0..][..8].copy_from_slice(row);
                    }
                }
            }
        } else {
            for (q, lane) in panel.chunks_exact_mut(w).enumerate() {
                let row = q * b.rs + c0 * b.cs;
                if b.cs == 1 {
                    copy_short(&b.data[row..row + cols], &mut lane[..cols]);
                } else {
                    for (j, v) in lane[..cols].iter_mut().enumerate() {
                        *v = b.data[row + j * b.cs];
                    }
                }
                lane[cols..].fill(0.0);
            }
        }
        at += w * k;
        c0 += w;
    }
}

/// The 8x8 block at `src` (rows `ls` apart) transposed into `dst` (rows `ld` apart):
/// eight loads, 24 shuffles and eight stores, where element by element the block took
/// 64 loads and stores (the attention's transposed operand, 5 % of YOLOv12n's time).
///
/// # Safety
/// AVX on this CPU; 8 rows of 8 floats valid at `src` for reads and at `dst` for writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8(src: *const f32, ls: usize, dst: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's: rows r < 8 of 8 floats at both ends.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ls)));
        let lo = |a, b| _mm256_unpacklo_ps(a, b);
        let hi = |a, b| _mm256_unpackhi_ps(a, b);
        let t = [
            lo(r[0], r[1]),
            hi(r[0], r[1]),
            lo(r[2], r[3]),
            hi(r[2], r[3]),
            lo(r[4], r[5]),
            hi(r[4], r[5]),
            lo(r[6], r[7]),
            hi(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * ld), _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]));
            _mm256_storeu_ps(dst.add((i + 4) * ld), _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]));
        }
    }
}

/// Weights packed once, as the GEMM's left operand.
pub struct Packed {
    data: Vec<f32>,
}

impl Packed {
    /// `a` (`m x k`) as the left operand.
    pub fn a(isa: Isa, a: Strided, m: usize, k: usize) -> Packed {
        let tile = Tile::of(isa);
        let mut data = vec![0f32; tile.a_len(m, k)];
        pack_a(tile, a, m, k, &mut data);
        Packed { data }
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

/// The right operand of [`gemm_packed`].
#[derive(Clone, Copy)]
pub enum B<'a> {
    /// Packed by [`pack_b`].
    Packed(&'a [f32]),
    /// Row-major, rows `ldb` apart, read where it lies: no copy, for a matrix the
    /// caller has just written (an im2col tile) or one already in that order.
    Rows(&'a [f32], usize),
    /// Row `p` shifted by `off[p]`, its columns in runs: column `j` of row `p` at
    /// `data[off[p] + j / run * run_stride + j % run]`. A convolution reads its
    /// (padded, phase-split) input this way as the im2col matrix it never writes:
    /// a run is one output row, each row of `b` one tap of the kernel. No panel
    /// crosses a run. (Only the graph path's convolutions make one.)
    #[cfg_attr(not(feature = "candle-graph"), allow(dead_code))]
    Shifted {
        data: &'a [f32],
        off: &'a [u32],
        run: usize,
        run_stride: usize,
    },
}

/// `c[i * ldc + j] = bias[i] + sum_p a[i, p] b[p, j]` for `i < m`, `j < n`, from
/// `a` packed by [`pack_a`] with `isa`'s [`Tile`], and `b`; no bias is zero.
///
/// # Safety
/// `c` must be valid for writes of `m` rows of `n` floats, `ldc` apart, and no other
/// thread may touch them while this runs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_packed(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: B,
    c: *mut f32,
    ldc: usize,
    bias: Option<&[f32]>,
) {
    let t = Tile::of(isa);
    let (mut off, mut run, mut run_stride) = (std::ptr::null(), n, 0);
    let (b, ldb) = match b {
        B::Packed(b) => {
            assert!(b.len() >= t.b_len(k, n), "gemm: packed b smaller than its shape");
            (b, 0)
        }
        B::Rows(b, ldb) => {
            assert!(
                Strided::rows(b, ldb).fits(k, n) && (k <= 1 || ldb >= n),
                "gemm: b smaller than its shape"
            );
            // A stride of 0 (one row of b, k = 1) reads the same: never taken for "packed".
            (b, ldb.max(1))
        }
        B::Shifted {
            data,
            off: o,
            run: r,
            run_stride: rs,
        } => {
            assert!(o.len() >= k && r > 0 && rs >= r, "gemm: shifted b's offsets or runs");
            // The last column is the farthest, as runs do not overlap (rs >= r).
            let last = n.max(1) - 1;
            let far = o[..k].iter().max().map_or(0, |&x| x as usize) + last / r * rs + last % r;
            assert!(k == 0 || n == 0 || far < data.len(), "gemm: b smaller than its shape");
            (off, run, run_stride) = (o.as_ptr(), r, rs);
            (data, 1)
        }
    };
    assert!(
        a.len() >= t.a_len(m, k) && bias.is_none_or(|b| b.len() >= m),
        "gemm: operands smaller than their shapes"
    );
    assert!(m <= 1 || ldc >= n, "gemm: rows of c overlap");
    if m == 0 || n == 0 {
        return;
    }
    let g = Gemm {
        t,
        m,
        n,
        k,
        a: a.as_ptr(),
        b: b.as_ptr(),
        ldb,
        off,
        run,
        run_stride,
        c,
        ldc,
        bias: bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
    };
    match isa.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` of level V4 exists only where AVX-512 F was found (`Isa::supported`);
        // the asserts above bound every panel read, and the caller owns `c`'s tile.
        Level::V4 => unsafe { g.run_v4() },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: likewise, level V3 only where AVX2 and FMA were found.
        Level::V3 => unsafe { g.run_v3() },
        // SAFETY: as above, with no instruction beyond the baseline.
        _ => unsafe { g.run_base() },
    }
}

/// One call's operands, checked by [`gemm_packed`].
struct Gemm {
    t: Tile,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    /// `b`'s row stride where it is read in place; 0 where packed.
    ldb: usize,
    /// Shifted `b` ([`B::Shifted`]): its row offsets (else null), and its runs
    /// (`run` is `n` otherwise).
    off: *const u32,
    run: usize,
    run_stride: usize,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
}

/// One register tile's work: `rows x cols` of `c` from `a`'s and `b`'s panels, over
/// `k` (one block): the first block's sum plus the bias (or zero) is stored, a later
/// block's sum is added to `c`.
struct Step {
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    k: usize,
    /// The panel's width (the tile's).
    w: usize,
    /// The stride from one `k` to the next in `b`: `w` if packed.
    ldb: usize,
    /// Shifted `b`: this block's row offsets from `b` (else null; `ldb` then steps).
    off: *const u32,
    rows: usize,
    cols: usize,
    first: bool,
    bias: *const f32,
}

impl Gemm {
    /// Every tile of `c`, block by block along `k`: `kernel(step)` per tile.
    ///
    /// # Safety
    /// As [`gemm_packed`]; `kernel` computes a [`Step`] within its bounds.
    #[inline(always)]
    unsafe fn each(&self, mut kernel: impl FnMut(&Step)) {
        let t = self.t;
        let mut q0 = 0;
        loop {
            let kc = KC.min(self.k - q0);
            let mut bp = 0;
            let mut c0 = 0;
            while c0 < self.n {
                // Panels end where runs do (a run is all of `n` unless shifted).
                let x0 = c0 % self.run;
                let left = (self.run - x0).min(self.n - c0);
                let w = if left > t.nr { t.nr } else { t.last_width(left) };
                let cols = w.min(left);
                for r0 in (0..self.m).step_by(t.mr) {
                    // SAFETY: panel offsets inside the lengths `gemm_packed` asserted; row r0,
                    // column c0 of `c` inside the caller's m x n tile.
                    let step = unsafe {
                        Step {
                            a: self.a.add(r0 * self.k + q0 * t.mr),
                            b: if !self.off.is_null() {
                                self.b.add(c0 / self.run * self.run_stride + x0)
                            } else if self.ldb == 0 {
                                self.b.add(bp + q0 * w)
                            } else {
                                self.b.add(q0 * self.ldb + c0)
                            },
                            c: self.c.add(r0 * self.ldc + c0),
                            ldc: self.ldc,
                            k: kc,
                            w,
                            ldb: if self.ldb == 0 { w } else { self.ldb },
                            off: if self.off.is_null() { self.off } else { self.off.add(q0) },
                            rows: t.mr.min(self.m - r0),
                            cols,
                            first: q0 == 0,
                            bias: if self.bias.is_null() {
                                self.bias
                            } else {
                                self.bias.add(r0)
                            },
                        }
                    };
                    kernel(&step);
                }
                bp += w * self.k;
                c0 += cols;
            }
            q0 += kc;
            if q0 >= self.k {
                break;
            }
        }
    }

    /// # Safety
    /// As [`gemm_packed`], on a CPU with AVX-512 F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_v4(&self) {
        // SAFETY: as this function's.
        unsafe {
            self.each(|s| {
                // `each` hands steps within their panels; this CPU has AVX-512 F.
                match (s.w, s.off.is_null()) {
                    (48, true) => v4::<3, false>(s),
                    (32, true) => v4::<2, false>(s),
                    (_, true) => v4::<1, false>(s),
                    (48, false) => v4::<3, true>(s),
                    (32, false) => v4::<2, true>(s),
                    (_, false) => v4::<1, true>(s),
                }
            })
        }
    }

    /// # Safety
    /// As [`gemm_packed`], on a CPU with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_v3(&self) {
        // SAFETY: as this function's.
        unsafe {
            // `each` hands steps within their panels; this CPU has AVX2 and FMA.
            self.each(|s| if s.off.is_null() { v3::<false>(s) } else { v3::<true>(s) })
        }
    }

    /// # Safety
    /// As [`gemm_packed`].
    unsafe fn run_base(&self) {
        // SAFETY: as this function's.
        unsafe {
            // `each` hands steps within their panels.
            self.each(|s| base(s))
        }
    }
}

/// The AVX-512 tile: 8 rows, `NV` vectors of 16 columns; `b` shifted if `SHIFT`.
///
/// # Safety
/// `s` within its panels and `c`'s tile; AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn v4<const NV: usize, const SHIFT: bool>(s: &Step) {
    use std::arch::x86_64::*;
    const MR: usize = 8;
    // Lanes of each vector inside `cols`.
    let mut masks = [0u16; NV];
    for (v, mask) in masks.iter_mut().enumerate() {
        let lanes = s.cols.saturating_sub(v * 16).min(16);
        *mask = ((1u32 << lanes) - 1) as u16;
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    if s.first && !s.bias.is_null() {
        for (i, row) in acc.iter_mut().enumerate().take(s.rows) {
            // SAFETY: row i < rows of the tile, which the bias covers.
            *row = [_mm512_set1_ps(unsafe { *s.bias.add(i) }); NV];
        }
    }
    let (mut a, mut b) = (s.a, s.b);
    for q in 0..s.k {
        if SHIFT {
            // SAFETY: `off` holds this block's `k` offsets, each a row inside `b`.
            b = unsafe { s.b.add(*s.off.add(q) as usize) };
        }
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            // SAFETY: the panel holds `cols` floats (and zeros to `w`) per step of k.
            *x = unsafe { _mm512_maskz_loadu_ps(masks[v], b.add(v * 16)) };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: the panel holds MR floats per step of k.
            let ai = _mm512_set1_ps(unsafe { *a.add(i) });
            for v in 0..NV {
                row[v] = _mm512_fmadd_ps(ai, bv[v], row[v]);
            }
        }
        // SAFETY: k steps stay inside both panels.
        unsafe {
            a = a.add(MR);
            if !SHIFT {
                b = b.add(s.ldb);
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(s.rows) {
        for (v, x) in row.iter().enumerate() {
            // SAFETY: row i < rows of the tile, lanes under the mask inside it.
            unsafe {
                let at = s.c.add(i * s.ldc + v * 16);
                // A later block of k: this block's partial sum added to the earlier ones'.
                let x = if s.first {
                    *x
                } else {
                    _mm512_add_ps(*x, _mm512_maskz_loadu_ps(masks[v], at))
                };
                _mm512_mask_storeu_ps(at, masks[v], x)
            };
        }
    }
}

/// The AVX2 tile: 6 rows, 2 vectors of 8 columns; edges go through a staging tile; `b`
/// shifted if `SHIFT`.
///
/// # Safety
/// `s` within its panels and `c`'s tile; AVX2 and FMA on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn v3<const SHIFT: bool>(s: &Step) {
    use std::arch::x86_64::*;
    const MR: usize = 6;
    const NR: usize = 16;
    let full = s.rows == MR && s.cols == NR;
    // An edge tile's stage, left uninitialised for a full tile (zeroing it on every tile
    // cost as much as the rest of a short tile's overhead); written before it is read.
    let mut stage = std::mem::MaybeUninit::<[f32; MR * NR]>::uninit();
    let stage = stage.as_mut_ptr().cast::<f32>();
    let (dst, ld) = if full { (s.c, s.ldc) } else { (stage, NR) };
    if !full {
        for i in 0..MR {
            for j in 0..NR {
                // SAFETY: inside the stage; the earlier blocks' sums where inside the tile
                // (for the adds at the end), zeros elsewhere.
                unsafe {
                    let v = if !s.first && i < s.rows && j < s.cols {
                        *s.c.add(i * s.ldc + j)
                    } else {
                        0.0
                    };
                    stage.add(i * NR + j).write(v);
                }
            }
        }
    }
    // Lanes inside `cols`, for loads from `b` read in place.
    let lane = |v: usize| {
        let on = |j: usize| if v * 8 + j < s.cols { -1 } else { 0 };
        _mm256_setr_epi32(on(0), on(1), on(2), on(3), on(4), on(5), on(6), on(7))
    };
    let (m0, m1) = (lane(0), lane(1));
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    if s.first && !s.bias.is_null() {
        for (i, row) in acc.iter_mut().enumerate().take(s.rows) {
            // SAFETY: row i < rows of the tile, which the bias covers.
            *row = [_mm256_set1_ps(unsafe { *s.bias.add(i) }); 2];
        }
    }
    // A whole panel loads plainly; only an edge is masked (a masked load costs more
    // than a plain one on AMD's cores, and this runs on every step of k).
    // SAFETY: the panels hold `cols` floats per step of k (16 where `cols == NR`).
    unsafe {
        if s.cols == NR {
            v3_sum::<SHIFT, MR, false>(s, &mut acc, m0, m1)
        } else {
            v3_sum::<SHIFT, MR, true>(s, &mut acc, m0, m1)
        }
    };
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            // SAFETY: `dst` is the full tile or the stage.
            unsafe {
                let at = dst.add(i * ld + v * 8);
                // A later block of k: this block's partial sum added to the earlier ones'.
                let x = if s.first {
                    *x
                } else {
                    _mm256_add_ps(*x, _mm256_loadu_ps(at))
                };
                _mm256_storeu_ps(at, x)
            };
        }
    }
    if !full {
        for i in 0..s.rows {
            for j in 0..s.cols {
                // SAFETY: inside the tile and the stage (written above and by the stores).
                unsafe { *s.c.add(i * s.ldc + j) = *stage.add(i * NR + j) };
            }
        }
    }
}

/// The AVX2 tile's sum over `k`: `acc += a b`, `b`'s two vectors loaded under the
/// masks if `MASKED`, plainly otherwise.
///
/// # Safety
/// As [`v3`]'s; without `MASKED`, the panel holds 16 floats per step of k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn v3_sum<const SHIFT: bool, const MR: usize, const MASKED: bool>(
    s: &Step,
    acc: &mut [[std::arch::x86_64::__m256; 2]; MR],
    m0: std::arch::x86_64::__m256i,
    m1: std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    let (mut a, mut b) = (s.a, s.b);
    for q in 0..s.k {
        if SHIFT {
            // SAFETY: `off` holds this block's `k` offsets, each a row inside `b`.
            b = unsafe { s.b.add(*s.off.add(q) as usize) };
        }
        // SAFETY: the panel holds `cols` floats per step of k; the masks load no more,
        // and unmasked loads run only where `cols` is 16.
        let (b0, b1) = unsafe {
            if MASKED {
                (_mm256_maskload_ps(b, m0), _mm256_maskload_ps(b.add(8), m1))
            } else {
                (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)))
            }
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: the panel holds MR floats per step of k.
            let ai = _mm256_set1_ps(unsafe { *a.add(i) });
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        // SAFETY: k steps stay inside both panels.
        unsafe {
            a = a.add(MR);
            if !SHIFT {
                b = b.add(s.ldb);
            }
        }
    }
}

/// The baseline tile, 4 rows by 8 columns, in plain arithmetic.
///
/// # Safety
/// `s` within its panels and `c`'s tile.
unsafe fn base(s: &Step) {
    const MR: usize = 4;
    const NR: usize = 8;
    debug_assert!(s.cols <= NR);
    let mut acc = [[0f32; NR]; MR];
    if s.first && !s.bias.is_null() {
        for (i, row) in acc.iter_mut().enumerate().take(s.rows) {
            // SAFETY: row i < rows of the tile, which the bias covers.
            *row = [unsafe { *s.bias.add(i) }; NR];
        }
    }
    for q in 0..s.k {
        // SAFETY: the panels hold MR and `cols` floats per step of k (b's row q shifted
        // by `off[q]` where shifted).
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(s.a.add(q * MR), MR),
                std::slice::from_raw_parts(
                    if s.off.is_null() {
                        s.b.add(q * s.ldb)
                    } else {
                        s.b.add(*s.off.add(q) as usize)
                    },
                    s.cols,
                ),
            )
        };
        for (row, &ai) in acc.iter_mut().zip(a) {
            for (x, &bj) in row.iter_mut().zip(b) {
                *x += ai * bj;
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(s.rows) {
        for (j, x) in row.iter().enumerate().take(s.cols) {
            // SAFETY: inside the tile.
            unsafe {
                let at = s.c.add(i * s.ldc + j);
                // A later block of k: this block's partial sum added to the earlier ones'.
                *at = if s.first { *x } else { *at + *x };
            }
        }
    }
}

/// `out[m x n] = a[m x k] * b[k x n]`, all row-major (`a`'s rows `lda` apart), on this
/// thread, by the `gemm` crate: the peer `bench gemm` measures against.
pub(super) fn gemm_set(m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], out: &mut [f32]) {
    assert!(m == 0 || (a.len() >= (m - 1) * lda + k && b.len() >= k * n && out.len() >= m * n));
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert above keeps every index gemm computes from these
    // strides inside the three slices; `out` is borrowed mutably, the others shared.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `bench gemm`: this GEMM (packing `b` per call, as a convolution's column tile does)
/// against the `gemm` crate on the shapes of YOLOv12n's convolution tiles
/// (`c_out x tile columns x c_in k k`), on this thread, alternating; best of `iters` rounds.
pub fn bench(iters: usize) -> String {
    use std::time::Instant;
    let isa = Isa::detect();
    let t = Tile::of(isa);
    let mut out = format!(
        "GEMM ({isa:?}, tile {}x{}): ours against the gemm crate, one thread\n",
        t.mr, t.nr
    );
    out.push_str("m x n x k | ours, b packed | ours, b in place | gemm crate | in place / crate time\n");
    for &(m, k) in &[
        (16, 27),
        (16, 16),
        (32, 144),
        (64, 64),
        (64, 288),
        (64, 576),
        (128, 1152),
        (256, 2304),
        (80, 576),
    ] {
        let n = ((65536 / k).clamp(64, 1024) / 32 * 32).max(32);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let pa = Packed::a(isa, Strided::rows(&a, k), m, k);
        let mut pb = vec![0f32; t.b_len(k, n)];
        let mut c = vec![0f32; m * n];
        let reps = (50_000_000 / (m * n * k)).max(3);
        let (mut ours, mut inplace, mut theirs) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..iters.max(1) {
            let s = Instant::now();
            for _ in 0..reps {
                // SAFETY: c holds m rows of n, this thread's alone.
                unsafe { gemm_packed(isa, (m, n, k), pa.data(), B::Rows(&b, n), c.as_mut_ptr(), n, None) };
            }
            inplace = inplace.min(s.elapsed().as_secs_f64() / reps as f64);
            let s = Instant::now();
            for _ in 0..reps {
                pack_b(t, Strided::rows(&b, n), k, n, &mut pb);
                // SAFETY: c holds m rows of n, this thread's alone.
                unsafe { gemm_packed(isa, (m, n, k), pa.data(), B::Packed(&pb), c.as_mut_ptr(), n, None) };
            }
            ours = ours.min(s.elapsed().as_secs_f64() / reps as f64);
            let s = Instant::now();
            for _ in 0..reps {
                gemm_set(m, n, k, &a, k, &b, &mut c);
            }
            theirs = theirs.min(s.elapsed().as_secs_f64() / reps as f64);
        }
        let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        out.push_str(&format!(
            "{m} x {n} x {k} | {:.1} GFLOP/s | {:.1} GFLOP/s | {:.1} GFLOP/s | {:.2}\n",
            gf(ours),
            gf(inplace),
            gf(theirs),
            inplace / theirs
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Against a plain triple loop in f64, on every instruction set this CPU runs, on
    /// edge shapes (one row or column, tiles' edges, a k past [`KC`], k = 0), with `b`
    /// packed from a transpose, read in place and shifted, with and without bias.
    #[test]
    fn matches_a_plain_product_on_every_isa() {
        let shapes = [
            (1, 1, 1),
            (1, 33, 7),
            (8, 32, 16),
            (9, 17, 5),
            (13, 50, 300),
            (16, 48, 27),
            (5, 3, 0),
            (64, 100, 600),
            (7, 16, 513),
        ];
        for isa in Isa::supported() {
            let t = Tile::of(isa);
            for &(m, n, k) in &shapes {
                let (a, b, bias) = (lcg(m * k, 1), lcg(k * n, 2), lcg(m, 3));
                // b with rows 5 floats longer than n, to read in place.
                let ldb = n + 5;
                let mut bpad = vec![f32::NAN; k * ldb];
                for p in 0..k {
                    bpad[p * ldb..p * ldb + n].copy_from_slice(&b[p * n..(p + 1) * n]);
                }
                // b read transposed from its own transpose, to check column strides.
                let mut bt = vec![0f32; k * n];
                for p in 0..k {
                    for j in 0..n {
                        bt[j * k + p] = b[p * n + j];
                    }
                }
                let bs = Strided {
                    data: &bt,
                    rs: 1,
                    cs: k,
                };
                // b shifted: each row at its own offset, in runs of 7 columns 10 apart, NaN
                // between (a run shorter than a panel, so that panels end at runs).
                let (run, rs) = (7, 10);
                let span = n.div_ceil(run) * rs + 3;
                let off: Vec<u32> = (0..k).map(|p| ((k - 1 - p) * span + p % 3) as u32).collect();
                let mut sh = vec![f32::NAN; k * span + 3];
                for p in 0..k {
                    for j in 0..n {
                        sh[off[p] as usize + j / run * rs + j % run] = b[p * n + j];
                    }
                }
                let mut pb = vec![f32::NAN; t.b_len(k, n)];
                pack_b(t, if k > 0 { bs } else { Strided::rows(&b, n) }, k, n, &mut pb);
                let pa = Packed::a(isa, Strided::rows(&a, k), m, k);
                for (with_bias, operand) in [
                    (false, B::Packed(&pb)),
                    (true, B::Packed(&pb)),
                    (true, B::Rows(&b, n)),
                    (false, B::Rows(&bpad[..((k.max(1) - 1) * ldb + n).min(bpad.len())], ldb)),
                    (
                        true,
                        B::Shifted {
                            data: &sh,
                            off: &off,
                            run,
                            run_stride: rs,
                        },
                    ),
                ] {
                    // c wider than n: the columns past n must stay untouched.
                    let ldc = n + 3;
                    let mut c = vec![7f32; m * ldc];
                    let bias_s = with_bias.then_some(&bias[..]);
                    // SAFETY: c holds m rows of ldc >= n floats, this thread's alone.
                    unsafe { gemm_packed(isa, (m, n, k), pa.data(), operand, c.as_mut_ptr(), ldc, bias_s) };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert_eq!(got, 7.0, "{isa:?} {m}x{n}x{k}: wrote past n");
                                continue;
                            }
                            let mut want = if with_bias { bias[i] as f64 } else { 0.0 };
                            for p in 0..k {
                                want += a[i * k + p] as f64 * b[p * n + j] as f64;
                            }
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{isa:?} {m}x{n}x{k} at ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packed_lengths_pad_to_whole_panels() {
        for isa in Isa::supported() {
            let t = Tile::of(isa);
            assert_eq!(t.a_len(t.mr + 1, 3), 2 * t.mr * 3);
            assert_eq!(t.b_len(3, t.nr), t.nr * 3);
            assert_eq!(t.b_len(3, t.nr + 1), (t.nr + t.nr_last) * 3);
            assert_eq!(t.b_len(3, 2 * t.nr - 1), 2 * t.nr * 3);
            assert_eq!(t.b_len(3, 0), 0);
        }
    }
}
