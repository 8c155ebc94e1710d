//! Convolution kernels of our own on NCHW tensors, plugged into candle as
//! custom ops so that graph code (`graph.rs`) stays candle code.
//!
//! Owns: the general convolution (groups = 1; im2col + one GEMM, the weights
//! already in GEMM order as OIHW; a 1x1 stride-1 convolution reads its input
//! as the GEMM operand with no copy), the depthwise convolution (each channel
//! as row-wise multiply-adds over contiguous slices), and element-wise
//! activations, each with bias and activation fused in. candle runs a
//! grouped convolution group by group and an ungrouped one as im2col, copy,
//! matmul, copy; these write each output once. Threads: the CPU pool
//! (`cpu::threads`), by output channel.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::super::cpu::{multiversion, split, threads, Act, Isa};
use super::super::nhwc::{self, apply, Geometry};

multiversion! {
    /// `act` on every element.
    fn activate(s: &mut [f32], act: Act) {
        apply(s, act)
    }
}

multiversion! {
    /// `act(s + bias)` on every element.
    fn bias_activate(s: &mut [f32], bias: f32, act: Act) {
        s.iter_mut().for_each(|v| *v += bias);
        apply(s, act)
    }
}

/// N, C, H, W.
type Dims4 = (usize, usize, usize, usize);

/// The contiguous f32 data of a custom op's input.
fn input_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(all) = storage else {
        candle_core::bail!("{what}: f32 input expected");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: contiguous input expected")))?;
    Ok(&all[start..end])
}

/// The contiguous f32 data of a custom op's input, and its 4 dims.
fn input4<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<(&'a [f32], Dims4)> {
    Ok((input_f32(storage, layout, what)?, layout.shape().dims4()?))
}

/// A convolution's output size for a `(c, h, w)` input, checked: the channels it was
/// built for, and an input at least as large as the kernel.
fn out_size(
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

fn f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()
}

/// A convolution's bias as f32s, `filters` of them; zeros when the graph gives none.
fn bias_or_zeros(bias: Option<&Tensor>, filters: usize, what: &str) -> candle_core::Result<Vec<f32>> {
    let bias = match bias {
        Some(b) => f32s(b)?,
        None => vec![0.0; filters],
    };
    if bias.len() != filters {
        candle_core::bail!("{what}: {} biases for {filters} filters", bias.len());
    }
    Ok(bias)
}

/// A convolution with groups = 1: weights `[c_out][c_in * k * k]` (OIHW as it comes), bias, activation.
pub struct Conv {
    w: Vec<f32>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    geo: Geometry,
    act: Act,
    isa: Isa,
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
        Ok(Conv {
            w: f32s(weight)?,
            bias,
            cin,
            cout,
            geo: Geometry { k, stride, pad },
            act,
            isa: Isa::detect(),
        })
    }
}

impl CustomOp1 for Conv {
    fn name(&self) -> &'static str {
        "aei-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, (n, c, h, w)) = input4(storage, layout, "conv")?;
        let (oh, ow) = out_size(self.geo, (c, h, w), self.cin, "conv")?;
        let (hw, ohw) = (h * w, oh * ow);
        let k_len = c * self.geo.k * self.geo.k;
        let direct = self.geo.k == 1 && self.geo.stride == 1 && self.geo.pad == [0; 4];
        // Column tiles: a tile's im2col rows (k_len x cols) stay in L2 while the GEMM reads them.
        let cols = (65536 / k_len.max(1)).clamp(64, 1024) / 16 * 16;
        // Tiles a multiple of 16 wide: the GEMM then reads the im2col tile as it is, unpacked.
        let (_, per) = split(ohw, cols);
        let per = per.next_multiple_of(16).min(ohw);
        let tiles = ohw.div_ceil(per);
        let len = n * self.cout * ohw;
        if k_len == 0 || len == 0 {
            return Ok((CpuStorage::F32(vec![0f32; len]), Shape::from((n, self.cout, oh, ow))));
        }
        // Not zeroed: the GEMM writes every element (see `uninit`).
        let mut out = uninit(len);
        for b in 0..n {
            let x = &x[b * c * hw..(b + 1) * c * hw];
            // SAFETY: batch b's outputs lie inside the allocation of `len` elements.
            let dst = SharedOut(unsafe { out.as_mut_ptr().add(b * self.cout * ohw) }, self.cout * ohw);
            (0..tiles).into_par_iter().for_each(|t| {
                let (c0, cols) = (t * per, per.min(ohw - t * per));
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let (rhs, rhs_rs): (&[f32], usize) = if direct {
                        (&x[c0..], hw)
                    } else {
                        if scratch.len() < k_len * cols {
                            scratch.resize(k_len * cols, 0.0);
                        }
                        im2col_tile(self.isa, x, (c, h, w), self.geo, c0, cols, &mut scratch[..k_len * cols]);
                        (&scratch[..], cols)
                    };
                    // SAFETY: tiles are disjoint column ranges c0..c0+cols of every output row,
                    // so no two threads touch the same element; `o` outlives the loop.
                    unsafe { self.tile(&dst, ohw, c0, cols, k_len, rhs, rhs_rs) };
                });
            });
        }
        // SAFETY: the tiles cover every column of every output row of every batch, and
        // the GEMM (k_len > 0, read_dst off) has written each element.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n, self.cout, oh, ow))))
    }
}

std::thread_local! {
    /// Each pool thread's im2col tile, grown to the largest asked for, then reused.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An output buffer of `len` f32s, allocated but not zeroed (zeroing an output
/// the GEMM overwrites anyway was 4 % of YOLOv12n's time). Length 0: only raw
/// pointer writes may fill it, then `set_len` once every element is written.
fn uninit(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

/// An output buffer the pool's threads write disjoint parts of.
struct SharedOut(*mut f32, usize);
// SAFETY: threads write disjoint elements only (see `Conv::tile`, `Transpose`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A pointer to element `i`.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    /// Writes `v` to element `i`.
    ///
    /// # Safety
    /// No other thread reads or writes element `i` meanwhile.
    #[inline(always)]
    unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.1, "SharedOut: {i} past {}", self.1);
        // SAFETY: `i` is inside the buffer (checked above); the caller owns the element.
        unsafe { self.0.add(i).write(v) }
    }

    /// Copies `src` to elements `at..at + src.len()`.
    ///
    /// # Safety
    /// No other thread reads or writes those elements meanwhile, and `src` is not part of this buffer.
    #[inline(always)]
    unsafe fn copy_from(&self, at: usize, src: &[f32]) {
        assert!(
            at.checked_add(src.len()).is_some_and(|end| end <= self.1),
            "SharedOut: copy past the end"
        );
        // SAFETY: the range is inside the buffer (checked above), owned by the caller, and
        // `src` lies elsewhere.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len()) }
    }
}

impl Conv {
    /// Columns `c0..c0 + cols` of every output row (`ohw` long): GEMM, then bias and activation.
    ///
    /// # Safety
    /// No other thread may touch those columns while this runs.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        dst: &SharedOut,
        ohw: usize,
        c0: usize,
        cols: usize,
        k_len: usize,
        rhs: &[f32],
        rhs_rs: usize,
    ) {
        assert!(self.cout * ohw <= dst.1 && c0 + cols <= ohw);
        assert!(rhs.len() >= (k_len - 1) * rhs_rs + cols && self.w.len() >= self.cout * k_len);
        // SAFETY: `c0 < ohw <= dst.1` (asserted), so the pointer stays inside the buffer.
        let o = unsafe { dst.0.add(c0) };
        // SAFETY: the asserts bound every element gemm reads (`cout x k_len` of `w`,
        // `k_len x cols` of `rhs` at row stride `rhs_rs`) and writes (`cout` rows of
        // `cols` at stride `ohw` from `o`, inside `dst`); the caller owns those columns.
        unsafe {
            gemm::gemm(
                self.cout,
                cols,
                k_len,
                o,
                1,
                ohw as isize,
                false,
                self.w.as_ptr(),
                1,
                k_len as isize,
                rhs.as_ptr(),
                1,
                rhs_rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        for r in 0..self.cout {
            // SAFETY: row r's columns c0..c0 + cols lie inside `dst` (asserted) and belong to
            // this caller alone; gemm has written them.
            let row = unsafe { std::slice::from_raw_parts_mut(o.add(r * ohw), cols) };
            bias_activate(self.isa, row, self.bias[r], self.act);
        }
    }
}

multiversion! {
    /// The im2col rows (`c * k * k` of them, `cols` long) of output pixels `p0..p0 + cols`;
    /// zeros where padded.
    fn im2col_tile(x: &[f32], chw: (usize, usize, usize), g: Geometry, p0: usize, cols: usize, col: &mut [f32]) {
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
                    1 => mid.copy_from_slice(&irow[first..first + mid.len()]),
                    2 => every_other(&irow[first..], mid),
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

/// `o[j] = x[2 j]`, sixteen at a time from fixed-size blocks, which the
/// compiler turns into shuffles instead of one load per element.
#[inline(always)]
fn every_other(x: &[f32], o: &mut [f32]) {
    // Whole blocks only where all 32 inputs exist; the last output needs just 2 len - 1.
    let blocks = (o.len() / 16).min(x.len() / 32);
    for (o, x) in o.chunks_exact_mut(16).zip(x.chunks_exact(32)).take(blocks) {
        for j in 0..16 {
            o[j] = x[2 * j];
        }
    }
    for (j, o) in o[blocks * 16..].iter_mut().enumerate() {
        *o = x[2 * (blocks * 16 + j)];
    }
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
            pad[(y + pt) * wp + pl..][..w].copy_from_slice(row);
        }
        let wk = &dw.weight[ch * k * k..(ch + 1) * k * k];
        let bias = dw.bias[ch];
        for (oy, orow) in out.chunks_exact_mut(ow).enumerate() {
            for x0 in (0..ow).step_by(16) {
                let mut acc = [bias; 16];
                for ky in 0..k {
                    let prow = &pad[(oy + ky) * wp + x0..];
                    for (kx, wv) in wk[ky * k..(ky + 1) * k].iter().enumerate() {
                        let src = &prow[kx..kx + 16];
                        for j in 0..16 {
                            acc[j] = if FMA { wv.mul_add(src[j], acc[j]) } else { acc[j] + wv * src[j] };
                        }
                    }
                }
                let n = (ow - x0).min(16);
                orow[x0..x0 + n].copy_from_slice(&acc[..n]);
            }
        }
    }
}

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "aei-depthwise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, (n, c, h, w)) = input4(storage, layout, "depthwise")?;
        let (oh, ow) = out_size(self.geo, (c, h, w), self.channels, "depthwise")?;
        let mut out = vec![0f32; n * c * oh * ow];
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
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// An element-wise activation as one pass (candle's sigmoid is four ops, each allocating).
pub struct Activation(pub Act);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "aei-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = input_f32(storage, layout, "activation")?.to_vec();
        let (_, per) = split(out.len(), out.len().div_ceil(threads() * 4));
        let isa = Isa::detect();
        out.par_chunks_mut(per.max(4096)).for_each(|o| activate(isa, o, self.0));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// A batched matrix product `[..., m, k] x [..., k, n]` with the same batch
/// dims on both sides, any strides (a transposed view is read as it is).
/// Batches run in parallel, one GEMM each (candle runs them one after another).
pub struct MatMul;

/// The element offset of batch `b` (row-major over `dims`) under `strides`.
fn batch_offset(mut b: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for (d, s) in dims.iter().zip(strides).rev() {
        off += (b % d) * s;
        b /= d;
    }
    off
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "aei-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("matmul: f32 inputs expected");
        };
        let (da, db) = (l1.shape().dims(), l2.shape().dims());
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            candle_core::bail!("matmul: shapes {da:?} x {db:?}");
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let batch_dims = &da[..r - 2];
        let batches: usize = batch_dims.iter().product();
        let (sa, sb) = (l1.stride(), l2.stride());
        // Every element a GEMM reads must lie inside its storage.
        let reach = |l: &Layout, rows: usize, cols: usize, st: &[usize], len: usize| {
            let last = batch_offset(batches.saturating_sub(1), batch_dims, &st[..r - 2]);
            let far = l.start_offset() + last + rows.saturating_sub(1) * st[r - 2] + cols.saturating_sub(1) * st[r - 1];
            far < len || rows * cols == 0
        };
        if !reach(l1, m, k, sa, a.len()) || !reach(l2, k, n, sb, b.len()) {
            candle_core::bail!("matmul: strides reach past the storage");
        }
        if k == 0 || batches * m * n == 0 {
            let mut shape = da.to_vec();
            shape[r - 1] = n;
            return Ok((CpuStorage::F32(vec![0f32; batches * m * n]), Shape::from(shape)));
        }
        // Not zeroed: each batch's GEMM writes all of its m x n outputs (see `uninit`).
        let mut out = uninit(batches * m * n);
        let dst = SharedOut(out.as_mut_ptr(), batches * m * n);
        let par = if batches < threads() {
            gemm::Parallelism::Rayon(threads())
        } else {
            gemm::Parallelism::None
        };
        (0..batches).into_par_iter().for_each(|i| {
            let o = dst.at(i * m * n);
            let oa = l1.start_offset() + batch_offset(i, batch_dims, &sa[..r - 2]);
            let ob = l2.start_offset() + batch_offset(i, batch_dims, &sb[..r - 2]);
            // SAFETY: `reach` checked the farthest element of the last batch on both
            // sides; earlier batches lie below it; `o` is this batch's m x n output,
            // which no other batch touches.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    o,
                    1,
                    n as isize,
                    false,
                    a.as_ptr().add(oa),
                    sa[r - 1] as isize,
                    sa[r - 2] as isize,
                    b.as_ptr().add(ob),
                    sb[r - 1] as isize,
                    sb[r - 2] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            }
        });
        // SAFETY: every batch's GEMM (k > 0, read_dst off) has written its m x n outputs.
        unsafe { out.set_len(batches * m * n) };
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Nearest-neighbour upsampling of NCHW by whole factors (ONNX `Resize`,
/// nearest, integer scales): each input row widened once, then copied to
/// its `sh` output rows; planes in parallel.
pub struct Upsample {
    pub sh: usize,
    pub sw: usize,
}

impl CustomOp1 for Upsample {
    fn name(&self) -> &'static str {
        "aei-upsample"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, (n, c, h, w)) = input4(storage, layout, "upsample")?;
        let (sh, sw) = (self.sh.max(1), self.sw.max(1));
        let (oh, ow) = (h * sh, w * sw);
        let mut out = vec![0f32; n * c * oh * ow];
        if !out.is_empty() {
            out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(o, x)| {
                for (y, rows) in o.chunks_exact_mut(sh * ow).enumerate() {
                    let (first, rest) = rows.split_at_mut(ow);
                    for (o, v) in first.chunks_exact_mut(sw).zip(&x[y * w..(y + 1) * w]) {
                        o.fill(*v);
                    }
                    for r in rest.chunks_exact_mut(ow) {
                        r.copy_from_slice(first);
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// Softmax of `scale * x` over one axis, in one pass per row: max, then
/// `exp` (vectorised) and sum, then scale. Rows along a middle axis are
/// done a whole inner block at a time, vectorised across it.
pub struct Softmax {
    pub axis: i64,
    pub scale: f32,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "aei-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input_f32(storage, layout, "softmax")?;
        let dims = layout.shape().dims();
        let rank = dims.len() as i64;
        let ax = if self.axis < 0 { self.axis + rank } else { self.axis };
        if !(0..rank).contains(&ax) {
            candle_core::bail!("softmax: axis {} of a rank-{rank} tensor", self.axis);
        }
        let ax = ax as usize;
        let (n, inner) = (dims[ax], dims[ax + 1..].iter().product::<usize>());
        // One block: the `n` rows one softmax runs over, `inner` columns each.
        let block = (n * inner).max(1);
        let mut out = vec![0f32; x.len()];
        let isa = Isa::detect();
        // Enough blocks per task that a task is worth handing to another thread.
        let per = (16384 / block).max(1);
        out.par_chunks_mut(block * per)
            .zip(x.par_chunks(block * per))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(block).zip(x.chunks_exact(block)) {
                    if inner == 1 {
                        softmax_row(isa, x, self.scale, o);
                    } else {
                        softmax_block(isa, x, inner, self.scale, o);
                    }
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

multiversion! {
    /// `o = softmax(scale * x)` over one contiguous row.
    fn softmax_row(x: &[f32], scale: f32, o: &mut [f32]) {
        const L: usize = 16;
        let mut m = [f32::NEG_INFINITY; L];
        let mut chunks = x.chunks_exact(L);
        for c in &mut chunks {
            for j in 0..L {
                m[j] = m[j].max(scale * c[j]);
            }
        }
        let mx = chunks.remainder().iter().fold(m.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)), |a, v| a.max(scale * v));
        let mut s = [0f32; L];
        let mut oc = o.chunks_exact_mut(L);
        for (oc, xc) in (&mut oc).zip(x.chunks_exact(L)) {
            for j in 0..L {
                oc[j] = nhwc::exp(scale * xc[j] - mx);
                s[j] += oc[j];
            }
        }
        let tail = x.len() / L * L;
        let mut sum: f32 = s.iter().sum();
        for (o, v) in oc.into_remainder().iter_mut().zip(&x[tail..]) {
            *o = nhwc::exp(scale * v - mx);
            sum += *o;
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    /// Softmax over the `n` rows of an `n x inner` block, for each of the `inner` columns.
    fn softmax_block(x: &[f32], inner: usize, scale: f32, o: &mut [f32]) {
        let mut m: Vec<f32> = x[..inner].iter().map(|v| scale * v).collect();
        for r in x.chunks_exact(inner).skip(1) {
            for (m, v) in m.iter_mut().zip(r) {
                *m = m.max(scale * v);
            }
        }
        let mut s = vec![0f32; inner];
        for (or, xr) in o.chunks_exact_mut(inner).zip(x.chunks_exact(inner)) {
            for (((o, v), m), s) in or.iter_mut().zip(xr).zip(&m).zip(s.iter_mut()) {
                *o = nhwc::exp(scale * v - m);
                *s += *o;
            }
        }
        s.iter_mut().for_each(|v| *v = 1.0 / *v);
        for or in o.chunks_exact_mut(inner) {
            for (o, s) in or.iter_mut().zip(&s) {
                *o *= s;
            }
        }
    }
}

/// `o += a * x`, sixteen lanes at a time: rows here are short (20 to 160), too
/// short for the compiler's own vector loop, which wants four vectors' worth
/// before it starts and leaves the rest scalar.
#[inline(always)]
fn axpy<const FMA: bool>(a: f32, x: &[f32], o: &mut [f32]) {
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

/// A transposition (ONNX `Transpose`) written once into a new buffer. When the
/// input's last axis moves, the copy goes in square tiles, so that both the
/// reads and the writes stay within a few cache lines (candle's
/// `permute().contiguous()` walks the strided side one element at a time).
pub struct Transpose(pub Vec<usize>);

const TILE_T: usize = 16;

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "aei-transpose"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("transpose: f32 input expected");
        };
        // Any strides: a view (a Split part, a transposed MatMul operand) is read where it lies.
        let x = &all[layout.start_offset()..];
        let dims = layout.shape().dims();
        let in_strides = layout.stride();
        let perm = &self.0;
        let rank = dims.len();
        if perm.len() != rank || (0..rank).any(|i| !perm.contains(&i)) {
            candle_core::bail!("transpose: perm {perm:?} for rank {rank}");
        }
        let len: usize = dims.iter().product();
        let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let mut out = vec![0f32; len];
        if len == 0 || rank == 0 {
            if len == 1 {
                out[0] = x[0];
            }
            return Ok((CpuStorage::F32(out), Shape::from(out_dims)));
        }
        let reach: usize = dims.iter().zip(in_strides).map(|(d, s)| (d - 1) * s).sum();
        if reach >= x.len() {
            candle_core::bail!("transpose: strides {in_strides:?} reach past the storage");
        }
        // For each output axis, the input stride it walks.
        let src: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        let last = rank - 1;
        let n_last = out_dims[last];
        // `a`: another output axis that walks the input with stride 1, for square tiles.
        let a = if src[last] == 1 {
            None
        } else {
            (0..last).find(|&i| src[i] == 1 && out_dims[i] > 1)
        };
        let mut out_strides = vec![1usize; rank];
        for i in (0..last).rev() {
            out_strides[i] = out_strides[i + 1] * out_dims[i + 1];
        }
        // Outer index: every output axis but `last` and `a`, as an odometer, split across threads.
        let outer: Vec<usize> = (0..rank).filter(|&i| i != last && Some(i) != a).collect();
        let count: usize = outer.iter().map(|&i| out_dims[i]).product();
        let dst = SharedOut(out.as_mut_ptr(), out.len());
        (0..count).into_par_iter().for_each(|mut o| {
            let (mut ib, mut ob) = (0, 0);
            for &i in outer.iter().rev() {
                let d = o % out_dims[i];
                o /= out_dims[i];
                ib += d * src[i];
                ob += d * out_strides[i];
            }
            // Each outer index owns the output elements ob + j*out_strides[a] + k, disjoint
            // from every other's: every write below is to an element only this task touches.
            let sl = src[last];
            match a {
                // The output's last axis walks the input with stride 1: contiguous runs.
                // SAFETY: this task's own elements (above); `x` is the input, not `out`.
                None if sl == 1 => unsafe { dst.copy_from(ob, &x[ib..ib + n_last]) },
                None => {
                    for k in 0..n_last {
                        // SAFETY: this task's own element (above).
                        unsafe { dst.write(ob + k, x[ib + k * sl]) };
                    }
                }
                Some(a) => {
                    let (n_a, oa) = (out_dims[a], out_strides[a]);
                    for j0 in (0..n_a).step_by(TILE_T) {
                        for k0 in (0..n_last).step_by(TILE_T) {
                            for j in j0..(j0 + TILE_T).min(n_a) {
                                for k in k0..(k0 + TILE_T).min(n_last) {
                                    // SAFETY: this task's own element (above).
                                    unsafe { dst.write(ob + j * oa + k, x[ib + j + k * sl]) };
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// `x` laid out contiguously: itself when it already is, else one parallel
/// copy (candle's own copies a strided view one element at a time, on one thread).
pub fn contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.is_contiguous() {
        Ok(x.clone())
    } else if x.dtype() == candle_core::DType::F32 {
        x.apply_op1_no_bwd(&Transpose((0..x.rank()).collect()))
    } else {
        x.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// candle's own convolution, padding applied first (it takes one symmetric pad).
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        pad: [usize; 4],
        groups: usize,
        act: Act,
    ) -> Tensor {
        let c = w.dims4().unwrap().0;
        let y = x
            .pad_with_zeros(2, pad[0], pad[1])
            .unwrap()
            .pad_with_zeros(3, pad[2], pad[3])
            .unwrap()
            .conv2d(w, 0, stride, 1, groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap();
        match act {
            Act::None => y,
            Act::Relu => y.relu().unwrap(),
            Act::Relu6 => y.clamp(0f32, 6f32).unwrap(),
            Act::Silu => y.silu().unwrap(),
            Act::Sigmoid => (y.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap(),
            Act::Exp => y.exp().unwrap(),
        }
    }

    fn close(got: &Tensor, want: &Tensor, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let r: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        for (i, (a, e)) in g.iter().zip(&r).enumerate() {
            assert!((a - e).abs() <= 1e-4 * e.abs().max(1.0), "{what} at {i}: {a} vs {e}");
        }
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

    #[test]
    fn every_other_takes_even_elements_at_every_length() {
        let x: Vec<f32> = (0..200).map(|v| v as f32).collect();
        for len in [0usize, 1, 15, 16, 17, 33, 64, 99] {
            for extra in [0, 1, 2] {
                let xs = &x[..(2 * len).saturating_sub(1) + extra];
                let mut o = vec![f32::NAN; len];
                every_other(xs, &mut o);
                let want: Vec<f32> = (0..len).map(|j| (2 * j) as f32).collect();
                assert_eq!(o, want, "len {len}, input {}", xs.len());
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
