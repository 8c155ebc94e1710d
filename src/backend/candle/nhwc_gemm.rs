//! The NHWC plan's GEMM: `out[pixels x c_out] = act(x w + bias (+ residual))`,
//! weights packed once, the epilogue applied while the tile is in registers.
//!
//! Owns: the weights' packing (panels of 48 output channels, [`pack_b`]'s layout),
//! the split of one layer across the pool (by pixels, or by output channels where
//! a layer has few pixels), the register tiles (AVX-512: up to 12 pixels by 16 or
//! 32 channels, 8 by 48; AVX2: 6 by 16), and a portable row kernel for the
//! baseline. Pixels are read where they lie (a pointer per row of the tile), so
//! nothing is packed per call and nothing is allocated.
//!
//! Each layer can also run the form this plan ran before, the `gemm` crate plus
//! an epilogue pass: it holds its weights as rows until its first input, times
//! both forms on it and keeps the faster's weights only ([`Kept`]; `bench gemm`
//! compares them shape by shape). The crate packs the weights
//! again on every call, on every thread (a 7x7 layer with 1152 channels packs
//! 0.9 MB for 25 pixels), and allocates; on AVX2 its kernel is still 5-30 %
//! faster than the tile here where pixels are many.
//!
//! Why not [`super::gemm::gemm_packed`]: its tile runs rows of the weights by
//! pixels, with bias per row, for NCHW. Here rows are pixels and columns are
//! output channels (16 to 40 on the layers with the most pixels), so the tile
//! is 6 pixels by 16 channels, the bias, residual and activation per column.

use std::ops::Range;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use rayon::prelude::*;

use super::cpu::{multiversion, split, threads, Act, Isa, Level};
use super::gemm::{pack_b, Strided, Tile};
use super::nhwc::apply;

/// Columns per panel of packed weights (the widest tile); the last panel is 16, 32 or 48.
const NR: usize = 48;
/// Columns per register tile (two AVX2 vectors); panels are whole tiles wide.
const LANES: usize = 16;
/// The depth of one pass of a tile over `k`: a longer sum is added up in blocks, each
/// summed apart, then added to the total (closer to the reference, where there is no FMA).
const KC: usize = 256;
/// Pixels per task where a layer is split by pixels.
const TASK_ROWS: usize = 192;
/// Below this many pixels a layer with enough panels is split by output channels:
/// each thread then reads only its share of the weights.
const FEW_PIXELS: usize = 256;

/// The packing of the weights: panels of `NR` columns, the last of 16 or 32 where that holds it.
const TILE: Tile = Tile {
    mr: 1,
    nr: NR,
    nr_last: LANES,
};

/// A layer's weights, `k x n` (inputs by output channels). Until the first input
/// only the rows are held; that input times both forms and keeps the faster, and
/// only its weights (so a plan holds one copy, not two).
pub struct Weights {
    pub k: usize,
    pub n: usize,
    /// `k x n` row-major, until the form is decided.
    source: Mutex<Option<Vec<f32>>>,
    kept: OnceLock<Kept>,
}

/// A layer's weights in the form of GEMM it runs (tests make each).
pub enum Kept {
    /// This module's tiles, weights prepacked, epilogue in registers.
    Ours(Packed),
    /// The `gemm` crate on `k x n` rows, then an epilogue pass per task (the plan's
    /// earlier form).
    Crate { rows: Vec<f32>, k: usize, n: usize },
}

/// Weights packed in panels of `NR` columns for this module's tiles.
pub struct Packed {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Weights {
    /// From `w`, `k x n` row-major.
    pub fn new(w: &[f32], k: usize, n: usize) -> Weights {
        Weights {
            k,
            n,
            source: Mutex::new(Some(w[..k * n].to_vec())),
            kept: OnceLock::new(),
        }
    }

    /// Weights already in the form `kept` (tests choose it instead of timing).
    #[cfg(test)]
    pub fn with_form(kept: Kept) -> Weights {
        let (k, n) = kept.shape();
        Weights {
            k,
            n,
            source: Mutex::new(None),
            kept: OnceLock::from(kept),
        }
    }

    /// Whether the layer's form is chosen (by its first [`run`]).
    pub fn decided(&self) -> bool {
        self.kept.get().is_some()
    }
}

impl Kept {
    /// This module's form of `w` (`k x n` row-major).
    pub fn ours(w: &[f32], k: usize, n: usize) -> Kept {
        let mut data = vec![0f32; TILE.b_len(k, n)];
        pack_b(TILE, Strided::rows(w, n), k, n, &mut data);
        Kept::Ours(Packed { data, k, n })
    }

    /// The crate's form of `rows` (`k x n` row-major).
    pub fn crate_form(rows: Vec<f32>, k: usize, n: usize) -> Kept {
        assert!(rows.len() >= k * n, "nhwc gemm: weights smaller than their shape");
        Kept::Crate { rows, k, n }
    }

    fn shape(&self) -> (usize, usize) {
        match self {
            Kept::Ours(p) => (p.k, p.n),
            Kept::Crate { k, n, .. } => (*k, *n),
        }
    }
}

impl Packed {
    /// Blocks of 16 columns (a tile's width): the unit a layer's channels are split by.
    fn units(&self) -> usize {
        self.n.div_ceil(LANES)
    }

    /// Panel `p`: its first column, its width (whole vectors, zeros past `n`) and its floats.
    fn panel(&self, p: usize) -> (usize, usize, &[f32]) {
        let c0 = p * NR;
        let w = (self.n - c0).next_multiple_of(LANES).min(NR);
        (c0, w, &self.data[c0 * self.k..(c0 + w) * self.k])
    }
}

/// What is added to and applied on the product: `bias` per output channel, then
/// `residual` (shaped as the output), then `act`.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    pub bias: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub act: Act,
}

/// Pixels per register tile, for a tile `nv` vectors of 16 channels wide: with
/// AVX-512 (32 registers) 12 by 16 or 32 channels and 8 by 48, 24 accumulators at
/// most; with AVX2, 6 by 16 (two vectors of 8); 4 for the portable kernel, which
/// runs a row at a time.
fn rows_per_tile(isa: Isa, nv: usize) -> usize {
    match isa.level() {
        Level::V4 if nv >= 3 => 8,
        Level::V4 => 12,
        Level::V3 => 6,
        Level::Base => 4,
    }
}

/// The output, shared by the tasks, each writing tiles no other task writes.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles (`run` hands each a distinct range of pixels
// or of panels), and `run` holds the `&mut` the pointer came from until they end.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// `out[..pixels * n]` (row-major, `n = w.n`) = the epilogue of `x w`, `x` being
/// `pixels` rows of `w.k` floats, `lda` apart. Split across the pool, in the
/// layer's faster form (timed on its first input: best of three, alternating).
pub fn run(isa: Isa, w: &Weights, x: &[f32], lda: usize, pixels: usize, epi: Epilogue, out: &mut [f32]) {
    let kept = match w.kept.get() {
        Some(kept) => kept,
        None => decide(isa, w, x, lda, pixels, epi, out),
    };
    run_kept(isa, kept, x, lda, pixels, epi, out);
}

/// Times both forms on this input and keeps the faster, dropping the other; one
/// thread decides while any other waits for its answer.
#[cold]
fn decide<'w>(
    isa: Isa,
    w: &'w Weights,
    x: &[f32],
    lda: usize,
    pixels: usize,
    epi: Epilogue,
    out: &mut [f32],
) -> &'w Kept {
    let mut source = w.source.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(kept) = w.kept.get() {
        return kept;
    }
    let rows = source.take().expect("nhwc gemm: weights neither decided nor held");
    let forms = [Kept::ours(&rows, w.k, w.n), Kept::crate_form(rows, w.k, w.n)];
    let mut best = [f64::MAX; 2];
    for _ in 0..3 {
        for (i, form) in forms.iter().enumerate() {
            let t = Instant::now();
            run_kept(isa, form, x, lda, pixels, epi, out);
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    let [ours, theirs] = forms;
    w.kept.get_or_init(|| if best[0] <= best[1] { ours } else { theirs })
}

/// [`run`] on the calling thread alone, for a caller that splits the work itself;
/// `None` (nothing computed) until a [`run`] has chosen the layer's form.
pub fn run_here(
    isa: Isa,
    w: &Weights,
    x: &[f32],
    lda: usize,
    pixels: usize,
    epi: Epilogue,
    out: &mut [f32],
) -> Option<()> {
    let kept = w.kept.get()?;
    check(kept, x, lda, pixels, epi, out);
    if pixels == 0 || w.n == 0 {
        return Some(());
    }
    match kept {
        Kept::Ours(packed) => {
            let o = Out(out.as_mut_ptr());
            // SAFETY: all pixels and channels, inside `out`, `x` and the residual by
            // `check`; no other task: this is the only one.
            unsafe { task(isa, packed, x, lda, epi, o, 0..pixels, 0..packed.units()) }
        }
        Kept::Crate { rows, k, n } => crate_part(isa, (rows, *k, *n), x, lda, epi, &mut out[..pixels * n]),
    }
    Some(())
}

/// The crate's form (`w`, `k x n` row-major) on the `out.len() / n` pixels of `x` (`lda`
/// apart) whose residual, if any, starts `epi.residual`: the product on this thread,
/// then the epilogue pass.
fn crate_part(isa: Isa, (w, k, n): (&[f32], usize, usize), x: &[f32], lda: usize, epi: Epilogue, out: &mut [f32]) {
    let rows = out.len() / n;
    super::gemm::gemm_set(rows, n, k, x, lda, w, out);
    let res = epi.residual.map(|r| &r[..rows * n]);
    epilogue(isa, out, &epi.bias[..n], res, epi.act);
}

/// The shapes [`run_kept`] and [`run_here`] rely on.
fn check(kept: &Kept, x: &[f32], lda: usize, pixels: usize, epi: Epilogue, out: &[f32]) {
    let (k, n) = kept.shape();
    assert!(
        // Rows may overlap (`lda < k`): a convolution's fields, read in place.
        pixels == 0 || x.len() >= (pixels - 1) * lda + k,
        "nhwc gemm: input smaller than its shape"
    );
    assert!(
        out.len() >= pixels * n && epi.bias.len() >= n && epi.residual.is_none_or(|r| r.len() >= pixels * n),
        "nhwc gemm: output, bias or residual smaller than its shape"
    );
}

/// [`run`] in the form given.
pub fn run_kept(isa: Isa, kept: &Kept, x: &[f32], lda: usize, pixels: usize, epi: Epilogue, out: &mut [f32]) {
    check(kept, x, lda, pixels, epi, out);
    let (k, n) = kept.shape();
    if pixels == 0 || n == 0 {
        return;
    }
    let w = match kept {
        Kept::Ours(packed) => packed,
        Kept::Crate { rows: w, .. } => {
            let (_, per) = split(pixels, TASK_ROWS);
            out[..pixels * n]
                .par_chunks_mut(per * n)
                .enumerate()
                .for_each(|(t, o)| {
                    let p0 = t * per;
                    let epi = Epilogue {
                        residual: epi.residual.map(|r| &r[p0 * n..]),
                        ..epi
                    };
                    crate_part(isa, (w, k, n), &x[p0 * lda..], lda, epi, o);
                });
            return;
        }
    };
    let (units, t) = (w.units(), threads().max(1));
    let mr = rows_per_tile(isa, units.min(NR / LANES));
    let o = Out(out.as_mut_ptr());
    // Few pixels: split by channels where that loads the threads as evenly as
    // splitting the tiles of pixels would (each thread then reads only its weights).
    let uneven = |items: usize| items.div_ceil(t) * t * 1000 / items;
    if pixels < FEW_PIXELS && uneven(units) <= uneven(pixels.div_ceil(mr)) {
        let (runs, per) = split(units, units.div_ceil(t));
        (0..runs).into_par_iter().for_each(|r| {
            let us = r * per..((r + 1) * per).min(units);
            // SAFETY: each task its own channels, inside `out`, `x` and the residual
            // by the asserts above.
            unsafe { task(isa, w, x, lda, epi, o, 0..pixels, us) }
        });
    } else {
        let (runs, per) = split(pixels, TASK_ROWS);
        (0..runs).into_par_iter().for_each(|r| {
            let rows = r * per..((r + 1) * per).min(pixels);
            // SAFETY: each task its own pixels, as above.
            unsafe { task(isa, w, x, lda, epi, o, rows, 0..units) }
        });
    }
}

/// One task: pixels `rows` by the 16-column blocks `units`, in tiles as many pixels
/// as [`rows_per_tile`] gives for the part of each panel the task computes.
///
/// # Safety
/// As [`run`] checked, and no other task writes these pixels' columns.
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    isa: Isa,
    w: &Packed,
    x: &[f32],
    lda: usize,
    epi: Epilogue,
    out: Out,
    rows: Range<usize>,
    units: Range<usize>,
) {
    let (k, n) = (w.k, w.n);
    let (lo, hi) = (units.start * LANES, units.end * LANES);
    for p in lo / NR..hi.div_ceil(NR) {
        let (c0, pw, b) = w.panel(p);
        let cols = pw.min(n - c0);
        let part = lo.max(c0) - c0..hi.min(c0 + pw) - c0;
        let mr = rows_per_tile(isa, part.len() / LANES);
        for r0 in rows.clone().step_by(mr) {
            let at = r0 * n + c0;
            let j = Job {
                a: &x[r0 * lda..],
                lda,
                b,
                k,
                pw,
                rows: mr.min(rows.end - r0),
                part: part.clone(),
                cols,
                // SAFETY: row `r0`, column `c0`: inside `out` (run's assert).
                c: unsafe { out.0.add(at) },
                ldc: n,
                bias: &epi.bias[c0..c0 + cols],
                residual: epi.residual.map(|r| &r[at..]),
                act: epi.act,
            };
            // SAFETY: the caller's: this tile is this task's alone.
            unsafe { j.run(isa, mr) };
        }
    }
}

/// One register tile: `rows x cols` of the output at `c` (rows `ldc` apart).
struct Job<'a> {
    /// The tile's first pixel; its `rows` pixels `lda` apart, `k` floats each.
    a: &'a [f32],
    lda: usize,
    /// The panel, `k` rows of `pw` floats.
    b: &'a [f32],
    k: usize,
    pw: usize,
    rows: usize,
    /// The columns of the panel this tile computes: whole 16-column blocks.
    part: Range<usize>,
    /// The panel's columns inside `n`.
    cols: usize,
    c: *mut f32,
    ldc: usize,
    bias: &'a [f32],
    /// At the tile's first element, rows `ldc` apart.
    residual: Option<&'a [f32]>,
    act: Act,
}

impl Job<'_> {
    /// A register tile's first reads at step `q` of `k`: `R` pixel pointers and the
    /// panel's row from column `s0`. Pixels past the tile's last read the last one
    /// again (not stored), so a tile is always `R` pointers, each inside `a`.
    ///
    /// # Safety
    /// `q < k` and `s0 < pw`, with [`Job::run`]'s asserts holding.
    #[inline(always)]
    unsafe fn starts<const R: usize>(&self, s0: usize, q: usize) -> ([*const f32; R], *const f32) {
        // SAFETY: row min(i, rows - 1) lies inside `a`, `k` floats each (asserted by
        // `Job::run`), and q < k.
        let a = std::array::from_fn(|i| unsafe { self.a.as_ptr().add(i.min(self.rows - 1) * self.lda + q) });
        // SAFETY: the panel holds `k` rows of `pw` floats; q < k, s0 < pw.
        (a, unsafe { self.b.as_ptr().add(q * self.pw + s0) })
    }

    /// # Safety
    /// `c` valid for writes of `rows` rows of `cols` floats, `ldc` apart, which no
    /// other thread touches meanwhile.
    unsafe fn run(&self, isa: Isa, mr: usize) {
        assert!(self.rows >= 1 && self.rows <= mr && self.b.len() >= self.pw * self.k);
        assert!(
            self.a.len() >= (self.rows - 1) * self.lda + self.k,
            "nhwc gemm: pixels out of bounds"
        );
        assert!(self.cols <= self.pw && self.bias.len() >= self.cols && self.part.end <= self.pw);
        assert!(
            self.residual
                .is_none_or(|r| r.len() >= (self.rows - 1) * self.ldc + self.cols),
            "nhwc gemm: residual tile out of bounds"
        );
        #[cfg(target_arch = "x86_64")]
        if isa.level() == Level::V4 {
            // The panel is `cols` rounded up to whole vectors wide, so the part is too.
            let (s0, nv) = (self.part.start, self.part.len() / LANES);
            let mut q0 = 0;
            loop {
                let kc = KC.min(self.k - q0);
                let (ks, last) = (q0..q0 + kc, q0 + kc == self.k);
                // SAFETY: level V4 means AVX-512 F (`Isa::supported`); the operands'
                // lengths are asserted above, `nv` vectors from `s0` lie inside the
                // panel, and `c` is the caller's. A tile of few pixels (a layer's
                // last) runs a shorter tile.
                unsafe {
                    match (nv, self.rows) {
                        (1, 1..=4) => v4::<4, 1>(self, s0, ks, last),
                        (1, 5..=8) => v4::<8, 1>(self, s0, ks, last),
                        (1, _) => v4::<12, 1>(self, s0, ks, last),
                        (2, 1..=4) => v4::<4, 2>(self, s0, ks, last),
                        (2, 5..=8) => v4::<8, 2>(self, s0, ks, last),
                        (2, _) => v4::<12, 2>(self, s0, ks, last),
                        (_, 1..=2) => v4::<2, 3>(self, s0, ks, last),
                        (_, 3..=4) => v4::<4, 3>(self, s0, ks, last),
                        (_, _) => v4::<8, 3>(self, s0, ks, last),
                    }
                };
                q0 += kc;
                if last {
                    return;
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa.level() == Level::V3 {
            for s0 in self.part.clone().step_by(LANES).take_while(|&s0| s0 < self.cols) {
                let mut q0 = 0;
                loop {
                    let kc = KC.min(self.k - q0);
                    let (ks, last) = (q0..q0 + kc, q0 + kc == self.k);
                    // SAFETY: level V3 means AVX2 and FMA (`Isa::supported`); the
                    // operands' lengths are asserted above, and `c` is the caller's.
                    // A tile of few pixels (a layer's last) runs a shorter tile.
                    unsafe {
                        match self.rows {
                            1..=2 => v3::<2>(self, s0, ks, last),
                            3..=4 => v3::<4>(self, s0, ks, last),
                            _ => v3::<6>(self, s0, ks, last),
                        }
                    };
                    q0 += kc;
                    if last {
                        break;
                    }
                }
            }
            return;
        }
        let (lo, hi) = (self.part.start.min(self.cols), self.part.end.min(self.cols));
        for i in 0..self.rows {
            let at = i * self.ldc + lo;
            // SAFETY: row i < rows of the caller's tile, columns lo..hi: this task's alone.
            let o = unsafe { std::slice::from_raw_parts_mut(self.c.add(at), hi - lo) };
            let res = self.residual.map(|r| &r[at..at + hi - lo]);
            let (a, bias) = (&self.a[i * self.lda..][..self.k], &self.bias[lo..hi]);
            row_any(isa, a, self.b, self.pw, lo, bias, res, self.act, o);
        }
    }
}

multiversion! {
    /// The crate form's epilogue, row by row (`bias.len()` wide) while the rows are in
    /// L2: `act(out + bias (+ the same row of residual))`.
    fn epilogue(out: &mut [f32], bias: &[f32], residual: Option<&[f32]>, act: Act) {
        let c = bias.len();
        for (i, o) in out.chunks_exact_mut(c).enumerate() {
            match residual {
                Some(r) => {
                    for ((o, r), b) in o.iter_mut().zip(&r[i * c..(i + 1) * c]).zip(bias) {
                        *o += r + b;
                    }
                }
                None => o.iter_mut().zip(bias).for_each(|(o, b)| *o += b),
            }
            apply::<FMA>(o, act);
        }
    }
}

multiversion! {
    /// One pixel: `out = act(bias + a b (+ res))`, `b` a panel `pw` wide, from its column `lo`.
    fn row_any(
        a: &[f32],
        b: &[f32],
        pw: usize,
        lo: usize,
        bias: &[f32],
        res: Option<&[f32]>,
        act: Act,
        out: &mut [f32],
    ) {
        let mut acc = [0f32; NR];
        for (a, b) in a.chunks(KC).zip(b.chunks(KC * pw)) {
            let mut part = [0f32; NR];
            for (x, bq) in a.iter().zip(b.chunks_exact(pw)) {
                for (s, w) in part[..out.len()].iter_mut().zip(&bq[lo..]) {
                    *s = if FMA { x.mul_add(*w, *s) } else { x * w + *s };
                }
            }
            acc.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = acc[j] + bias[j] + res.map_or(0.0, |r| r[j]);
        }
        apply::<FMA>(out, act);
    }
}

/// The AVX2 tile: `R` pixels by 16 channels (two vectors) from column `s0` of the
/// panel, over the block `ks` of `k`. Before the last block the sum so far is kept
/// in the output; on the last, the epilogue runs on the accumulators (ReLU and ReLU6
/// in registers; other activations on the stored row, still in L1). 12
/// accumulators, two loads of the panel and `R` broadcasts per step of `k`.
///
/// # Safety
/// As [`Job::run`], whose asserts bound every read; `s0 < cols`, a multiple of 16;
/// `ks` inside `0..k`, blocks in order; AVX2 and FMA on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn v3<const R: usize>(j: &Job, s0: usize, ks: Range<usize>, last: bool) {
    use std::arch::x86_64::*;
    const NV: usize = 2;
    const W: usize = 8;
    let here = (j.cols - s0).min(NV * W);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let masks: [__m256i; NV] =
        std::array::from_fn(|v| _mm256_cmpgt_epi32(_mm256_set1_epi32(here.saturating_sub(v * W) as i32), lane));
    let mut acc = [[_mm256_setzero_ps(); NV]; R];
    // SAFETY: s0 + 16 <= pw (the panel is whole 16-column vectors wide); ks inside 0..k.
    let (mut a, mut b) = unsafe { j.starts::<R>(s0, ks.start) };
    let first = ks.start == 0;
    for _ in ks {
        // SAFETY: the panel holds `pw` floats per step of k, each pixel `k` floats
        // (asserted by `Job::run`).
        unsafe {
            let bv: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(b.add(v * W)));
            for (row, ai) in acc.iter_mut().zip(a.iter_mut()) {
                let x = _mm256_broadcast_ss(&**ai);
                for v in 0..NV {
                    row[v] = _mm256_fmadd_ps(x, bv[v], row[v]);
                }
                *ai = ai.add(1);
            }
            b = b.add(j.pw);
        }
    }
    // Whole vectors load and store plainly; only an edge is masked (a masked store
    // is microcode on AMD's cores, a dozen cycles each).
    let full = here == NV * W;
    let load = |p: *const f32, v: usize| {
        // SAFETY: `p` at lanes under the mask, inside a slice the caller's asserts
        // bound (`bias`: `cols` floats; `c` and the residual: `rows` rows of `cols`).
        unsafe {
            if full {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, masks[v])
            }
        }
    };
    let store = |p: *mut f32, v: usize, x: __m256| {
        // SAFETY: as `load`'s, in the caller's tile of `c`.
        unsafe {
            if full {
                _mm256_storeu_ps(p, x)
            } else {
                _mm256_maskstore_ps(p, masks[v], x)
            }
        }
    };
    // SAFETY: `bias` holds `cols` floats from s0 on under the masks.
    let bias: [__m256; NV] = std::array::from_fn(|v| load(unsafe { j.bias.as_ptr().add(s0 + v * W) }, v));
    let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
    for (i, row) in acc.iter().enumerate().take(j.rows) {
        let at = i * j.ldc + s0;
        for v in 0..NV {
            // SAFETY: row i < rows of the caller's tile, lane block v inside it.
            let c = unsafe { j.c.add(at + v * W) };
            let mut x = row[v];
            if !first {
                // The earlier blocks' sum, kept in the tile.
                x = _mm256_add_ps(x, load(c, v));
            }
            if !last {
                store(c, v, x);
                continue;
            }
            x = _mm256_add_ps(x, bias[v]);
            if let Some(r) = j.residual {
                // SAFETY: the residual holds `rows` rows of `cols`, `ldc` apart (asserted).
                x = _mm256_add_ps(x, load(unsafe { r.as_ptr().add(at + v * W) }, v));
            }
            x = match j.act {
                Act::Relu => _mm256_max_ps(x, zero),
                Act::Relu6 => _mm256_min_ps(_mm256_max_ps(x, zero), six),
                _ => x,
            };
            store(c, v, x);
        }
        if last && !matches!(j.act, Act::None | Act::Relu | Act::Relu6) {
            // SAFETY: the row just stored, `here` floats of the caller's tile.
            apply::<true>(unsafe { std::slice::from_raw_parts_mut(j.c.add(at), here) }, j.act);
        }
    }
}

/// The AVX-512 tile: `R` pixels by `NV` vectors of 16 channels from column `s0` of
/// the panel, over the block `ks` of `k`, as [`v3`] does with AVX2: the sum so far
/// kept in the output before the last block; on the last, bias, residual and ReLU or
/// ReLU6 on the accumulators, other activations on the stored row. Lanes past `cols`
/// are masked (an AVX-512 masked store is a plain store, unlike AVX2's).
///
/// # Safety
/// As [`Job::run`], whose asserts bound every read; `s0 + 16 NV <= pw`, `s0 < cols`;
/// `ks` inside `0..k`, blocks in order; AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn v4<const R: usize, const NV: usize>(j: &Job, s0: usize, ks: Range<usize>, last: bool) {
    use std::arch::x86_64::*;
    const W: usize = 16;
    let here = (j.cols - s0).min(NV * W);
    let masks: [u16; NV] = std::array::from_fn(|v| {
        let lanes = here.saturating_sub(v * W).min(W);
        ((1u32 << lanes) - 1) as u16
    });
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    // SAFETY: s0 + 16 NV <= pw; ks inside 0..k.
    let (mut a, mut b) = unsafe { j.starts::<R>(s0, ks.start) };
    let first = ks.start == 0;
    for _ in ks {
        // SAFETY: the panel holds `pw` floats per step of k, each pixel `k` floats
        // (asserted by `Job::run`).
        unsafe {
            let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(v * W)));
            for (row, ai) in acc.iter_mut().zip(a.iter_mut()) {
                let x = _mm512_set1_ps(**ai);
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(x, bv[v], row[v]);
                }
                *ai = ai.add(1);
            }
            b = b.add(j.pw);
        }
    }
    // SAFETY: `bias` holds `cols` floats from s0 on, under the masks.
    let bias: [__m512; NV] =
        std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(masks[v], j.bias.as_ptr().add(s0 + v * W)) });
    let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
    for (i, row) in acc.iter().enumerate().take(j.rows) {
        let at = i * j.ldc + s0;
        for v in 0..NV {
            // SAFETY: row i < rows of the caller's tile, lane block v inside it under
            // its mask; the residual holds `rows` rows of `cols`, `ldc` apart (asserted).
            unsafe {
                let c = j.c.add(at + v * W);
                let mut x = row[v];
                if !first {
                    // The earlier blocks' sum, kept in the tile.
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], c));
                }
                if last {
                    x = _mm512_add_ps(x, bias[v]);
                    if let Some(r) = j.residual {
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], r.as_ptr().add(at + v * W)));
                    }
                    x = match j.act {
                        Act::Relu => _mm512_max_ps(x, zero),
                        Act::Relu6 => _mm512_min_ps(_mm512_max_ps(x, zero), six),
                        _ => x,
                    };
                }
                _mm512_mask_storeu_ps(c, masks[v], x);
            }
        }
        if last && !matches!(j.act, Act::None | Act::Relu | Act::Relu6) {
            // SAFETY: the row just stored, `here` floats of the caller's tile.
            apply::<true>(unsafe { std::slice::from_raw_parts_mut(j.c.add(at), here) }, j.act);
        }
    }
}

/// `bench gemm`, second table: this GEMM against the `gemm` crate (with the
/// epilogue pass the plan ran after it) on EfficientNet-Lite0's pointwise shapes, on
/// this thread, alternating; best of `iters` rounds.
pub fn bench(iters: usize) -> String {
    let isa = Isa::detect();
    let mut out =
        format!("NHWC GEMM ({isa:?}, pixels x c_in -> c_out, ReLU6): ours against the gemm crate, one thread\n");
    out.push_str("pixels x c_in -> c_out | ours | gemm crate + epilogue | ours / crate time\n");
    for &(m, k, n) in &[
        (12544, 27, 32),
        (12544, 32, 16),
        (12544, 16, 96),
        (3136, 96, 24),
        (3136, 24, 144),
        (3136, 144, 24),
        (784, 40, 240),
        (784, 240, 40),
        (196, 80, 480),
        (196, 480, 80),
        (196, 672, 112),
        (49, 192, 1152),
        (49, 1152, 320),
        (49, 320, 1280),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
        let bias = vec![0.1f32; n];
        let Kept::Ours(packed) = Kept::ours(&w, k, n) else {
            unreachable!("Kept::ours makes our form")
        };
        let mut c = vec![0f32; m * n];
        let reps = (200_000_000 / (m * n * k)).max(3);
        let epi = Epilogue {
            bias: &bias,
            residual: None,
            act: Act::Relu6,
        };
        let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
        for _ in 0..iters.max(1) {
            let s = Instant::now();
            for _ in 0..reps {
                // SAFETY: `c` holds m rows of n; this thread's alone.
                unsafe { task(isa, &packed, &x, k, epi, Out(c.as_mut_ptr()), 0..m, 0..packed.units()) };
            }
            ours = ours.min(s.elapsed().as_secs_f64() / reps as f64);
            let s = Instant::now();
            for _ in 0..reps {
                super::gemm::gemm_set(m, n, k, &x, k, &w, &mut c);
                epilogue(isa, &mut c, &bias, None, Act::Relu6);
            }
            theirs = theirs.min(s.elapsed().as_secs_f64() / reps as f64);
        }
        let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        out.push_str(&format!(
            "{m} x {k} -> {n} | {:.1} GFLOP/s | {:.1} GFLOP/s | {:.2}\n",
            gf(ours),
            gf(theirs),
            ours / theirs
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_util::close;
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against a triple loop in f64, on every instruction set this CPU runs: pixel
    /// rows read `lda` apart (overlapping where `lda < k`), every activation, with and without a residual, on shapes
    /// split by pixels and by channels, with edges in both (a tile of fewer than 6
    /// pixels, a last vector of fewer than 8 channels).
    #[test]
    fn matches_a_plain_product_on_every_isa() {
        let acts = [Act::None, Act::Relu, Act::Relu6, Act::Silu, Act::Sigmoid];
        let shapes: [(usize, usize, usize, isize); 15] = [
            // (pixels, k, n, lda pad)
            (1, 1, 1, 0),
            (7, 3, 5, 2),
            (300, 16, 96, 0),
            (257, 27, 32, 0),
            (49, 192, 1152, 0),
            (49, 1152, 320, 3),
            (196, 80, 480, 0),
            (196, 672, 112, 0),
            (13, 24, 40, 1),
            (500, 40, 24, 0),
            (31, 33, 200, 0),
            (37, 20, 16, 1),
            (130, 300, 64, 0),
            // Overlapping rows, as a convolution's stack is read: 3x3 and 5x5 fields.
            (112, 27, 32, -9),
            (9, 75, 16, -60),
        ];
        for isa in Isa::supported() {
            for (s, &(m, k, n, pad)) in shapes.iter().enumerate() {
                let lda = k.checked_add_signed(pad).unwrap();
                let x = lcg((m - 1) * lda + k, s as u64);
                let w = lcg(k * n, 100 + s as u64);
                let bias = lcg(n, 200 + s as u64);
                let res = lcg(m * n, 300 + s as u64);
                let forms = [Kept::ours(&w, k, n), Kept::crate_form(w.clone(), k, n)];
                for (t, act) in acts.iter().enumerate() {
                    let residual = (t + s) % 2 == 1;
                    let mut want = vec![0f32; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let mut v = bias[j] as f64;
                            for q in 0..k {
                                v += x[i * lda + q] as f64 * w[q * n + j] as f64;
                            }
                            if residual {
                                v += res[i * n + j] as f64;
                            }
                            let v = v as f32;
                            want[i * n + j] = match act {
                                Act::None => v,
                                Act::Relu => v.max(0.0),
                                Act::Relu6 => v.clamp(0.0, 6.0),
                                Act::Silu => v / (1.0 + (-v).exp()),
                                Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
                                Act::Exp => v.exp(),
                            };
                        }
                    }
                    let epi = Epilogue {
                        bias: &bias,
                        residual: residual.then_some(&res[..]),
                        act: *act,
                    };
                    // Each form, then a layer's `run`, which times both and keeps one.
                    let layer = Weights::new(&w, k, n);
                    for form in ["ours", "crate", "decided"] {
                        let mut got = vec![f32::NAN; m * n + 3];
                        match form {
                            "ours" => run_kept(isa, &forms[0], &x, lda, m, epi, &mut got),
                            "crate" => run_kept(isa, &forms[1], &x, lda, m, epi, &mut got),
                            _ => run(isa, &layer, &x, lda, m, epi, &mut got),
                        }
                        let what = format!("{isa:?} {form} {m}x{k}x{n} lda {lda} {act:?} residual {residual}");
                        close(&got[..m * n], &want, &what);
                        assert!(got[m * n..].iter().all(|v| v.is_nan()), "{what}: wrote past the output");
                    }
                    assert!(layer.kept.get().is_some() && layer.source.lock().unwrap().is_none());
                }
            }
        }
    }
}
