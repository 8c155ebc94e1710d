//! Convolutions: the general one (GEMM over the input read as the im2col
//! matrix, shifted per tap or copied into column tiles, or Winograd F(2x2) or
//! F(4x4) for stride-1 3x3 where it measures faster) and depthwise.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::winograd::{self, Winograd};

use super::super::super::cpu::{multiversion, split, Act, Isa, Level};
use super::super::super::gemm::{gemm_packed, pack_b, Packed, Strided, Tile, B};
use super::super::super::nhwc::Geometry;
use super::*;

/// A convolution with groups = 1: weights `[c_out][c_in * k * k]` (OIHW as it comes), bias, activation.
pub struct Conv {
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    geo: Geometry,
    act: Act,
    isa: Isa,
    /// The weights (`[c_out][c_in k k]`) packed for the GEMM.
    packed: Packed,
    /// Stride-1 3x3 layers: the Winograd forms, F(2x2, 3x3) and F(4x4, 3x3), until the
    /// first input has chosen a form; then the chosen one alone (the others' transformed
    /// filters, 1.8x and 4x the layer's weights, are dropped). Locked for reading on each
    /// frame, for writing once.
    winograd: RwLock<[Option<Box<Winograd>>; 2]>,
    /// Which form runs: [`UNDECIDED`] until the first input times them all, then
    /// [`IM2COL`], [`SHIFTED`], [`WINOGRAD`] or [`WINOGRAD4`].
    choice: AtomicU8,
}

const UNDECIDED: u8 = 0;
/// im2col tiles ([`Conv::im2col`]; a 1x1 stride-1 layer's input packed per tile, no im2col).
const IM2COL: u8 = 1;
const WINOGRAD: u8 = 2;
/// Shifted phase planes ([`Conv::shifted`]).
const SHIFTED: u8 = 3;
/// Winograd F(4x4, 3x3): 4x fewer multiplications than the GEMM, where F(2x2) saves 2.25x.
const WINOGRAD4: u8 = 4;

/// `AEI_WINOGRAD`: `auto` (default: per layer, if it times fastest on its first input),
/// `off` (never) or `on` (wherever it applies).
fn winograd_policy() -> u8 {
    static POLICY: OnceLock<u8> = OnceLock::new();
    *POLICY.get_or_init(|| match std::env::var("AEI_WINOGRAD").as_deref() {
        Ok("off") => IM2COL,
        Ok("on") => WINOGRAD,
        _ => UNDECIDED,
    })
}

impl Conv {
    /// From a `[c_out, c_in, k, k]` weight and an optional `[c_out]` bias.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: [usize; 4],
        act: Act,
    ) -> candle_core::Result<Conv> {
        let (cout, cin, k, k2) = weight.dims4()?;
        if k != k2 || stride == 0 {
            candle_core::bail!("conv: weight {:?} stride {stride} unsupported", weight.dims());
        }
        let bias = bias_or_zeros(bias, cout, "conv")?;
        let w = f32s(weight)?;
        let isa = Isa::detect();
        let policy = winograd_policy();
        let applies = winograd::applies(weight, stride) && policy != IM2COL;
        let winograd =
            [2, 4].map(|m| applies.then(|| Box::new(Winograd::new(&w, bias.clone(), cout, cin, pad, act, isa, m))));
        let pointwise = k == 1 && stride == 1 && pad == [0; 4];
        let choice = if pointwise {
            IM2COL
        } else if applies && policy == WINOGRAD {
            WINOGRAD
        } else {
            UNDECIDED
        };
        let packed = Packed::a(isa, Strided::rows(&w, cin * k * k), cout, cin * k * k);
        Ok(Conv {
            packed,
            bias,
            cin,
            cout,
            geo: Geometry { k, stride, pad },
            act,
            isa,
            winograd: RwLock::new(winograd),
            choice: AtomicU8::new(choice),
        })
    }

    /// A stride-1 3x3 layer that always runs as Winograd F(`m`x`m`, 3x3) with `isa`'s
    /// kernels (for tests).
    #[cfg(test)]
    pub(super) fn winograd_only(weight: &Tensor, bias: &Tensor, pad: [usize; 4], act: Act, isa: Isa, m: usize) -> Conv {
        let mut c = Conv::new(weight, Some(bias), 1, pad, act).unwrap();
        let (cout, cin, ..) = weight.dims4().unwrap();
        let w = f32s(weight).unwrap();
        c.winograd =
            RwLock::new([2, 4].map(|m| Some(Box::new(Winograd::new(&w, c.bias.clone(), cout, cin, pad, act, isa, m)))));
        c.choice = AtomicU8::new(if m == 4 { WINOGRAD4 } else { WINOGRAD });
        c
    }

    /// Runs the Winograd form `form` names ([`WINOGRAD`] or [`WINOGRAD4`]); false (nothing
    /// run) if this layer has not got it.
    fn run_winograd(&self, form: u8, x: &[f32], dims: Dims4, ohw: (usize, usize), dst: &SharedOut) -> bool {
        let forms = self.winograd.read().unwrap_or_else(|e| e.into_inner());
        let wg = match form {
            WINOGRAD => forms[0].as_deref(),
            WINOGRAD4 => forms[1].as_deref(),
            _ => None,
        };
        wg.inspect(|wg| self.winograd_fwd(wg, x, dims, ohw, dst)).is_some()
    }

    fn winograd_fwd(&self, wg: &Winograd, x: &[f32], (n, c, h, w): Dims4, (oh, ow): (usize, usize), dst: &SharedOut) {
        let per = self.cout * oh * ow;
        assert!(n * per <= dst.1, "conv: output too small");
        for b in 0..n {
            // Batch b's outputs: inside `dst` (asserted above).
            let out = SharedOut(dst.at(b * per), per);
            wg.run(&x[b * c * h * w..(b + 1) * c * h * w], (h, w), (oh, ow), &out);
        }
    }

    /// The output size for an NCHW input of `dims`, checked against the filters.
    pub fn out_hw(&self, (_, c, h, w): Dims4) -> candle_core::Result<(usize, usize)> {
        out_size(self.geo, (c, h, w), self.cin, "conv")
    }

    /// Output channels.
    pub fn filters(&self) -> usize {
        self.cout
    }

    /// Writes all `n * c_out * oh * ow` outputs to `dst`, by the GEMM over im2col tiles
    /// or shifted planes, or by Winograd: the first call on a layer times each that applies
    /// and keeps the fastest.
    pub fn forward(&self, x: &[f32], dims: Dims4, ohw: (usize, usize), dst: &SharedOut) {
        match self.choice.load(Relaxed) {
            IM2COL => self.im2col(x, dims, ohw, dst),
            SHIFTED => self.shifted(x, dims, ohw, dst),
            form => {
                if !self.run_winograd(form, x, dims, ohw, dst) {
                    self.decide(x, dims, ohw, dst)
                }
            }
        }
    }

    /// The first input (the warm-up at load): each form run once to warm it, then the
    /// fastest kept by its best of three timed runs, in rounds whose order alternates (one
    /// noisy run, or a machine slowing down, must not decide).
    fn decide(&self, x: &[f32], dims: Dims4, ohw: (usize, usize), dst: &SharedOut) {
        let run = |form: u8| match form {
            WINOGRAD | WINOGRAD4 if self.run_winograd(form, x, dims, ohw, dst) => {}
            SHIFTED => self.shifted(x, dims, ohw, dst),
            _ => self.im2col(x, dims, ohw, dst),
        };
        let mut forms = vec![(IM2COL, Duration::MAX), (SHIFTED, Duration::MAX)];
        let have = self
            .winograd
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .each_ref()
            .map(|f| f.is_some());
        for (form, have) in [WINOGRAD, WINOGRAD4].into_iter().zip(have) {
            if have {
                forms.push((form, Duration::MAX));
            }
        }
        for &(f, _) in &forms {
            run(f);
        }
        for round in 0..3 {
            for i in 0..forms.len() {
                let i = if round % 2 == 1 { forms.len() - 1 - i } else { i };
                let t = Instant::now();
                run(forms[i].0);
                forms[i].1 = forms[i].1.min(t.elapsed());
            }
        }
        // The last round ran forwards: its last form's answer is in `dst`.
        let last = forms.last().expect("two forms at least").0;
        let (pick, _) = *forms.iter().min_by_key(|(_, t)| *t).expect("two forms at least");
        // The forms not chosen are never run again: their filters go.
        for (form, slot) in [WINOGRAD, WINOGRAD4]
            .into_iter()
            .zip(self.winograd.write().unwrap_or_else(|e| e.into_inner()).iter_mut())
        {
            if form != pick {
                *slot = None;
            }
        }
        self.choice.store(pick, Relaxed);
        let (_, _, h, w) = dims;
        let ms = |f: u8| {
            forms
                .iter()
                .find(|(g, _)| *g == f)
                .map_or("-".to_string(), |(_, t)| format!("{:.3} ms", t.as_secs_f64() * 1e3))
        };
        log::debug!(
            "conv {}->{} {k}x{k} s{s} at {h}x{w}: im2col {}, shifted {}, Winograd F(2x2) {}, F(4x4) {}",
            self.cin,
            self.cout,
            ms(IM2COL),
            ms(SHIFTED),
            ms(WINOGRAD),
            ms(WINOGRAD4),
            k = self.geo.k,
            s = self.geo.stride,
        );
        if pick != last {
            // `dst` holds the last form's answer.
            self.forward(x, dims, ohw, dst);
        }
    }
}

impl CustomOp1 for Conv {
    fn name(&self) -> &'static str {
        "aei-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dims) = input4(storage, layout, "conv")?;
        let (oh, ow) = self.out_hw(dims)?;
        let len = dims.0 * self.cout * oh * ow;
        // Not zeroed: `forward` writes every element (see `uninit`).
        let mut out = uninit(len);
        self.forward(x, dims, (oh, ow), &SharedOut(out.as_mut_ptr(), len));
        // SAFETY: `forward` has written all `len` elements.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((dims.0, self.cout, oh, ow))))
    }
}

impl Conv {
    /// The im2col matrix never written: the input padded and split into `stride x stride`
    /// phases, a band of output rows at a time, which the GEMM reads at one offset per
    /// tap ([`B::Shifted`]), one output row per run (or the band as a grid). Each phase plane holds the band's
    /// input pixels that one tap parity reads, so a tap `(ky, kx)` is the plane of
    /// `(ky % s, kx % s)` shifted by `(ky / s, kx / s)`: about one copy of the input
    /// where im2col writes `k * k / s^2` copies.
    pub(in super::super) fn shifted(&self, x: &[f32], (n, c, h, w): Dims4, (oh, ow): (usize, usize), out: &SharedOut) {
        let (k, s) = (self.geo.k, self.geo.stride);
        let reach = (k - 1) / s;
        let wph = ow + reach;
        let (hw, ohw, k_len) = (h * w, oh * ow, c * k * k);
        // Bands whose planes (c s^2 (band + reach) wph floats) stay near 512 KB, in L2.
        let per_row = c * s * s * wph;
        let (tasks, band) = split(oh, (131072 / per_row.max(1)).saturating_sub(reach).max(1));
        let rows_len = band + reach;
        let planes_len = per_row * rows_len;
        // Output rows a whole number of the GEMM's narrowest panel wide run one per output
        // row, straight into the output; narrower ones (the last panel would idle lanes)
        // run the band as one grid, through a tile.
        let grid = ow % Tile::of(self.isa).nr_last != 0;
        let len = n * self.cout * ohw;
        assert!(len <= out.1, "conv: output too small");
        for b in 0..n {
            let x = &x[b * c * hw..(b + 1) * c * hw];
            // Batch b's outputs: inside `out` (asserted above).
            let dst = SharedOut(out.at(b * self.cout * ohw), self.cout * ohw);
            (0..tasks).into_par_iter().for_each(|t| {
                let oy0 = t * band;
                if oy0 >= oh {
                    return;
                }
                let rows = band.min(oh - oy0);
                PLANES.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let (planes, off, tile) = &mut *scratch;
                    if planes.len() < planes_len {
                        planes.resize(planes_len, 0.0);
                    }
                    let planes = &mut planes[..planes_len];
                    phase_planes(
                        self.isa,
                        self.isa,
                        x,
                        (c, h, w),
                        self.geo,
                        (oy0, rows + reach, rows_len, wph),
                        planes,
                    );
                    off.clear();
                    off.extend((0..k_len).map(|q| {
                        let (ci, ky, kx) = (q / (k * k), q / k % k, q % k);
                        let plane = (ci * s + ky % s) * s + kx % s;
                        ((plane * rows_len + ky / s) * wph + kx / s) as u32
                    }));
                    if !grid {
                        let rhs = B::Shifted {
                            data: planes,
                            off,
                            run: ow,
                            run_stride: wph,
                        };
                        // SAFETY: bands are disjoint ranges of output rows, so of columns
                        // oy0 ow..(oy0 + rows) ow of every channel: no two threads touch the
                        // same element.
                        unsafe { self.tile(&dst, ohw, oy0 * ow, rows * ow, k_len, rhs) };
                        return;
                    }
                    // The band's rows as one run, `wph` apart, the `reach` columns past each
                    // output row computed and dropped: the GEMM into this thread's tile, then
                    // each output row out of it, activated.
                    let cols = (rows - 1) * wph + ow;
                    if tile.len() < self.cout * cols {
                        tile.resize(self.cout * cols, 0.0);
                    }
                    let rhs = B::Shifted {
                        data: planes,
                        off,
                        run: cols,
                        run_stride: cols,
                    };
                    // SAFETY: the tile holds `cout` rows of `cols`, this thread's alone.
                    unsafe {
                        gemm_packed(
                            self.isa,
                            (self.cout, cols, k_len),
                            self.packed.data(),
                            rhs,
                            tile.as_mut_ptr(),
                            cols,
                            Some(&self.bias),
                        )
                    };
                    for (r, trow) in tile.chunks_exact(cols).enumerate().take(self.cout) {
                        for y in 0..rows {
                            let at = r * ohw + (oy0 + y) * ow;
                            assert!(at + ow <= dst.1);
                            // SAFETY: inside `dst` (asserted); output row oy0 + y of channel r
                            // belongs to this band's task alone.
                            let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(at), ow) };
                            copy_short(&trow[y * wph..y * wph + ow], o);
                            if self.act != Act::None {
                                activate(self.isa, o, self.act);
                            }
                        }
                    }
                });
            });
        }
        // The bands cover every output row of every batch, and the GEMM has written each
        // element of them.
    }

    /// im2col + GEMM over column tiles (or the input itself packed, 1x1 stride 1).
    pub(in super::super) fn im2col(&self, x: &[f32], (n, c, h, w): Dims4, (oh, ow): (usize, usize), out: &SharedOut) {
        let (hw, ohw) = (h * w, oh * ow);
        let k_len = c * self.geo.k * self.geo.k;
        let direct = self.geo.k == 1 && self.geo.stride == 1 && self.geo.pad == [0; 4];
        let tile = Tile::of(self.isa);
        // Column tiles: a tile's im2col rows (k_len x cols) stay in L2 while the GEMM reads them.
        let cols = (65536 / k_len.max(1)).clamp(64, 1024) / 16 * 16;
        // Tiles a whole number of the GEMM's panels wide.
        let (_, per) = split(ohw, cols);
        let per = per.next_multiple_of(tile.nr).min(ohw);
        let tiles = ohw.div_ceil(per);
        let len = n * self.cout * ohw;
        assert!(len <= out.1, "conv: output too small");
        for b in 0..n {
            let x = &x[b * c * hw..(b + 1) * c * hw];
            // Batch b's outputs: inside `out` (asserted above).
            let dst = SharedOut(out.at(b * self.cout * ohw), self.cout * ohw);
            (0..tiles).into_par_iter().for_each(|t| {
                let (c0, cols) = (t * per, per.min(ohw - t * per));
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let need = if direct { tile.b_len(k_len, cols) } else { k_len * cols };
                    if scratch.len() < need {
                        scratch.resize(need, 0.0);
                    }
                    let buf = &mut scratch[..need];
                    let operand = if direct {
                        // The input's channel rows, `h w` floats apart, packed into panels: read
                        // in place, a panel's rows lie a multiple of 4 KB apart at 160x160 and
                        // share one L1 set, so the tile missed on nearly every row (packed,
                        // 1.6-1.7x faster there, and 0-10 % at 80x80 and 40x40).
                        pack_b(tile, Strided::rows(&x[c0..], hw), k_len, cols, buf);
                        B::Packed(buf)
                    } else {
                        im2col_tile(self.isa, self.isa, x, (c, h, w), self.geo, c0, cols, buf);
                        B::Rows(buf, cols)
                    };
                    // SAFETY: tiles are disjoint column ranges c0..c0+cols of every output
                    // row, so no two threads touch the same element.
                    unsafe { self.tile(&dst, ohw, c0, cols, k_len, operand) };
                });
            });
        }
        // The tiles cover every column of every output row of every batch, and the GEMM
        // has written each element (the bias alone where k_len is 0).
    }
}

std::thread_local! {
    /// Each pool thread's im2col tile, grown to the largest asked for, then reused.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each pool thread's phase planes, tap offsets and output tile for [`Conv::shifted`],
    /// likewise.
    static PLANES: std::cell::RefCell<(Vec<f32>, Vec<u32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

impl Conv {
    /// Columns `c0..c0 + cols` of every output row (`ohw` long): GEMM with the bias, then
    /// the activation.
    ///
    /// # Safety
    /// No other thread may touch those columns while this runs.
    unsafe fn tile(&self, dst: &SharedOut, ohw: usize, c0: usize, cols: usize, k_len: usize, rhs: B) {
        assert!(self.cout * ohw <= dst.1 && c0 + cols <= ohw);
        // SAFETY: `c0 < ohw <= dst.1` (asserted), so the pointer stays inside the buffer.
        let o = unsafe { dst.0.add(c0) };
        // SAFETY: `cout` rows of `cols` at stride `ohw` from `o` lie inside `dst` (asserted);
        // the caller owns those columns.
        unsafe {
            gemm_packed(
                self.isa,
                (self.cout, cols, k_len),
                self.packed.data(),
                rhs,
                o,
                ohw,
                Some(&self.bias),
            )
        };
        if self.act == Act::None {
            return;
        }
        for r in 0..self.cout {
            // SAFETY: row r's columns c0..c0 + cols lie inside `dst` (asserted) and belong to
            // this caller alone; the GEMM has written them.
            let row = unsafe { std::slice::from_raw_parts_mut(o.add(r * ohw), cols) };
            activate(self.isa, row, self.act);
        }
    }
}

multiversion! {
    /// The im2col rows (`c * k * k` of them, `cols` long) of output pixels `p0..p0 + cols`;
    /// zeros where padded. `kern` (the same `Isa`) picks [`every_other`]'s kernel.
    fn im2col_tile(
        kern: Isa,
        x: &[f32],
        chw: (usize, usize, usize),
        g: Geometry,
        p0: usize,
        cols: usize,
        col: &mut [f32],
    ) {
        let (c, h, w) = chw;
        let (_, ow) = g.out_size(h, w);
        let [pt, _, pl, _] = g.pad;
        for (r, row) in col.chunks_exact_mut(cols).enumerate().take(c * g.k * g.k) {
            let (ci, ky, kx) = (r / (g.k * g.k), r / g.k % g.k, r % g.k);
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            // Output columns whose input column ox*s + kx - pl lies inside the row.
            let lo = pl.saturating_sub(kx).div_ceil(g.stride).min(ow);
            let hi = ow.min((w + pl).saturating_sub(kx).div_ceil(g.stride)).max(lo);
            let mut p = p0;
            while p < p0 + cols {
                let (oy, ox0) = (p / ow, p % ow);
                let ox1 = ow.min(ox0 + p0 + cols - p);
                let out = &mut row[p - p0..p - p0 + ox1 - ox0];
                p += ox1 - ox0;
                let iy = (oy * g.stride + ky) as isize - pt as isize;
                if iy < 0 || iy >= h as isize {
                    out.fill(0.0);
                    continue;
                }
                let irow = &plane[iy as usize * w..(iy as usize + 1) * w];
                // Zeros left of `lo` and right of `hi`, the input row between.
                let (a, b) = (lo.clamp(ox0, ox1), hi.clamp(ox0, ox1).max(lo.clamp(ox0, ox1)));
                out[..a - ox0].fill(0.0);
                out[b - ox0..].fill(0.0);
                let mid = &mut out[a - ox0..b - ox0];
                if mid.is_empty() {
                    continue;
                }
                let first = a * g.stride + kx - pl;
                match g.stride {
                    1 => copy_short(&irow[first..first + mid.len()], mid),
                    2 => every_other(kern, &irow[first..], mid),
                    s => {
                        for (j, o) in mid.iter_mut().enumerate() {
                            *o = irow[first + j * s];
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// [`Conv::shifted`]'s phase planes for the band of output rows from `oy0`: plane
    /// `(ci, py, px)` (`rows_len x wph`, in that order in `planes`), row `r`, column `j`
    /// holds input `(ci, (oy0 + r) s + py - pad_top, j s + px - pad_left)`, zero where
    /// that lies outside; its first `rows` rows are written. `kern` (the same `Isa`)
    /// picks [`every_other`]'s kernel.
    fn phase_planes(
        kern: Isa,
        x: &[f32],
        chw: (usize, usize, usize),
        g: Geometry,
        band: (usize, usize, usize, usize),
        planes: &mut [f32],
    ) {
        let ((c, h, w), (oy0, rows, rows_len, wph)) = (chw, band);
        let s = g.stride;
        let [pt, _, pl, _] = g.pad;
        for (p, plane) in planes.chunks_exact_mut(rows_len * wph).enumerate().take(c * s * s) {
            let (ci, py, px) = (p / (s * s), p / s % s, p % s);
            // Columns whose input column j s + px - pl lies inside the row.
            let lo = pl.saturating_sub(px).div_ceil(s).min(wph);
            let hi = wph.min((w + pl).saturating_sub(px).div_ceil(s)).max(lo);
            for (r, orow) in plane.chunks_exact_mut(wph).enumerate().take(rows) {
                let iy = ((oy0 + r) * s + py) as isize - pt as isize;
                if iy < 0 || iy >= h as isize {
                    orow.fill(0.0);
                    continue;
                }
                let irow = &x[(ci * h + iy as usize) * w..][..w];
                orow[..lo].fill(0.0);
                orow[hi..].fill(0.0);
                let first = lo * s + px - pl;
                let mid = &mut orow[lo..hi];
                match s {
                    1 => copy_short(&irow[first..first + mid.len()], mid),
                    2 => every_other(kern, &irow[first..], mid),
                    s => {
                        for (j, o) in mid.iter_mut().enumerate() {
                            *o = irow[first + j * s];
                        }
                    }
                }
            }
        }
    }
}

/// `o[j] = x[2 j]`: on AVX-512 and AVX2 two vectors of `x` at a time, their even
/// lanes permuted into one of `o`. (Left to the compiler, the loop became gathers and
/// scatters on AVX-512, about half of the YOLOv12n stem's time in its phase planes.)
pub(super) fn every_other(isa: Isa, x: &[f32], o: &mut [f32]) {
    let done = match isa.level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` of level V4 exists only where AVX-512 F was found.
        Level::V4 => unsafe { every_other_v4(x, o) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: likewise, level V3 only where AVX2 was found.
        Level::V3 => unsafe { every_other_v3(x, o) },
        _ => 0,
    };
    // The rest one at a time: the last output needs just 2 len - 1 inputs.
    for (j, o) in o.iter_mut().enumerate().skip(done) {
        *o = x[2 * j];
    }
}

/// [`every_other`]'s first `16 n` outputs, for the largest `n` whose `32 n` inputs exist; returns `16 n`.
///
/// # Safety
/// AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn every_other_v4(x: &[f32], o: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let blocks = (o.len() / 16).min(x.len() / 32);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (o, x) in o.chunks_exact_mut(16).zip(x.chunks_exact(32)).take(blocks) {
        // SAFETY: `x` holds 32 floats and `o` 16 (exact chunks).
        unsafe {
            let (lo, hi) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_permutex2var_ps(lo, even, hi));
        }
    }
    blocks * 16
}

/// [`every_other`]'s first `8 n` outputs, for the largest `n` whose `16 n` inputs exist; returns `8 n`.
///
/// # Safety
/// AVX2 on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn every_other_v3(x: &[f32], o: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let blocks = (o.len() / 8).min(x.len() / 16);
    for (o, x) in o.chunks_exact_mut(8).zip(x.chunks_exact(16)).take(blocks) {
        // SAFETY: `x` holds 16 floats and `o` 8 (exact chunks).
        unsafe {
            let (lo, hi) = (_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(x.as_ptr().add(8)));
            // [x0 x2 x8 x10 | x4 x6 x12 x14], then its 64-bit lanes in order 0, 2, 1, 3.
            let s = _mm256_shuffle_ps::<0x88>(lo, hi);
            let s = _mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(s));
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_castpd_ps(s));
        }
    }
    blocks * 8
}

/// A depthwise convolution with its weights packed (`[c][k*k]`), its bias, padding and activation.
pub struct Depthwise {
    weight: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
    geo: Geometry,
    act: Act,
    isa: Isa,
}

impl Depthwise {
    /// From a `[c, 1, k, k]` weight and an optional `[c]` bias.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: [usize; 4],
        act: Act,
    ) -> candle_core::Result<Depthwise> {
        let (c, one, k, k2) = weight.dims4()?;
        if one != 1 || k != k2 || stride == 0 {
            candle_core::bail!("depthwise: weight {:?} stride {stride} unsupported", weight.dims());
        }
        let bias = bias_or_zeros(bias, c, "depthwise")?;
        Ok(Depthwise {
            weight: f32s(weight)?,
            bias,
            channels: c,
            geo: Geometry { k, stride, pad },
            act,
            isa: Isa::detect(),
        })
    }
}

multiversion! {
    /// One channel: `inp` is `h x w`, `out` is `oh x ow`.
    fn depthwise_channel(dw: &Depthwise, ch: usize, inp: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let (k, s) = (dw.geo.k, dw.geo.stride);
        let [pt, _, pl, _] = dw.geo.pad;
        let (_, ow) = dw.geo.out_size(h, w);
        let wk = &dw.weight[ch * k * k..(ch + 1) * k * k];
        out.fill(dw.bias[ch]);
        for (oy, orow) in out.chunks_exact_mut(ow).enumerate() {
            for ky in 0..k {
                let iy = (oy * s + ky) as isize - pt as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let irow = &inp[iy as usize * w..(iy as usize + 1) * w];
                for kx in 0..k {
                    let wv = wk[ky * k + kx];
                    let lo = pl.saturating_sub(kx).div_ceil(s);
                    let hi = ow.min((w + pl).saturating_sub(kx).div_ceil(s));
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * s + kx - pl;
                    if s == 1 {
                        axpy::<FMA>(wv, &irow[first..first + (hi - lo)], &mut orow[lo..hi]);
                    } else {
                        for (j, o) in orow[lo..hi].iter_mut().enumerate() {
                            let i = irow[first + j * s];
                            *o = if FMA { wv.mul_add(i, *o) } else { *o + wv * i };
                        }
                    }
                }
            }
        }
    }
}

std::thread_local! {
    /// Each pool thread's zero-padded input plane for stride-1 depthwise layers.
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

multiversion! {
    /// One channel at stride 1: the plane is copied once into `pad` with its zero
    /// border (and 16 spare columns), then each run of 16 outputs keeps its sums
    /// in registers across all `k * k` taps, with no bounds to work out per tap.
    fn depthwise_s1_channel(dw: &Depthwise, ch: usize, inp: &[f32], hw: (usize, usize), pad: &mut Vec<f32>, out: &mut [f32]) {
        let (h, w) = hw;
        let k = dw.geo.k;
        let [pt, pb, pl, pr] = dw.geo.pad;
        let (_, ow) = dw.geo.out_size(h, w);
        let (hp, wp) = (h + pt + pb, w + pl + pr + 16);
        pad.clear();
        pad.resize(hp * wp, 0.0);
        for (y, row) in inp.chunks_exact(w).enumerate() {
            copy_short(row, &mut pad[(y + pt) * wp + pl..][..w]);
        }
        let wk = &dw.weight[ch * k * k..(ch + 1) * k * k];
        let bias = dw.bias[ch];
        let oh = out.len() / ow.max(1);
        let mut oy = 0;
        while oy < oh {
            // Four rows at once where four are left: four independent sums per tap, where
            // one row's single sum waits on each multiply-add before the next.
            let rows = if oh - oy >= 4 { 4 } else { 1 };
            let orows = &mut out[oy * ow..(oy + rows) * ow];
            if rows == 4 {
                depthwise_rows::<4, FMA>(&pad[oy * wp..], (wp, ow), wk, k, bias, orows);
            } else {
                depthwise_rows::<1, FMA>(&pad[oy * wp..], (wp, ow), wk, k, bias, orows);
            }
            oy += rows;
        }
    }
}

/// `acc += w * src[..16]`, sixteen lanes (one function per call site, which the
/// compiler vectorises where a loop over rows of sums it did not).
#[inline(always)]
fn fma16<const FMA: bool>(acc: &mut [f32; 16], w: f32, src: &[f32]) {
    let src: &[f32; 16] = src[..16].try_into().expect("16 floats");
    for j in 0..16 {
        acc[j] = if FMA {
            w.mul_add(src[j], acc[j])
        } else {
            acc[j] + w * src[j]
        };
    }
}

/// `R` output rows of a stride-1 depthwise channel from its padded plane (from the
/// first of them on, rows `wp` apart, 16 spare columns), in runs of 16 columns.
#[inline(always)]
fn depthwise_rows<const R: usize, const FMA: bool>(
    pad: &[f32],
    (wp, ow): (usize, usize),
    wk: &[f32],
    k: usize,
    bias: f32,
    out: &mut [f32],
) {
    for x0 in (0..ow).step_by(16) {
        let mut acc = [[bias; 16]; R];
        for ky in 0..k {
            for (kx, wv) in wk[ky * k..(ky + 1) * k].iter().enumerate() {
                for (r, acc) in acc.iter_mut().enumerate() {
                    fma16::<FMA>(acc, *wv, &pad[(r + ky) * wp + x0 + kx..]);
                }
            }
        }
        let n = (ow - x0).min(16);
        for (r, acc) in acc.iter().enumerate() {
            out[r * ow + x0..r * ow + x0 + n].copy_from_slice(&acc[..n]);
        }
    }
}

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "aei-depthwise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dims) = input4(storage, layout, "depthwise")?;
        let (oh, ow) = self.out_hw(dims)?;
        let mut out = vec![0f32; dims.0 * dims.1 * oh * ow];
        self.forward(x, dims, (oh, ow), &mut out);
        Ok((CpuStorage::F32(out), Shape::from((dims.0, dims.1, oh, ow))))
    }
}

impl Depthwise {
    /// The output size for an NCHW input of `dims`, checked against the filters.
    pub fn out_hw(&self, (_, c, h, w): Dims4) -> candle_core::Result<(usize, usize)> {
        out_size(self.geo, (c, h, w), self.channels, "depthwise")
    }

    /// Writes the `n * c * oh * ow` outputs to `out`, a plane per task.
    pub fn forward(&self, x: &[f32], (_, c, h, w): Dims4, (oh, ow): (usize, usize), out: &mut [f32]) {
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, o)| {
            let inp = &x[plane * h * w..(plane + 1) * h * w];
            if self.geo.stride == 1 {
                PADDED.with(|pad| {
                    let mut pad = pad.borrow_mut();
                    depthwise_s1_channel(self.isa, self, plane % c, inp, (h, w), &mut pad, o)
                });
            } else {
                depthwise_channel(self.isa, self, plane % c, inp, h, w, o);
            }
            activate(self.isa, o, self.act);
        });
    }
}
