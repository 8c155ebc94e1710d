//! Kernels over whole tensors: element-wise activations, batched MatMul over
//! strided views, nearest upsampling, softmax over an axis, transpose.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::super::super::cpu::{multiversion, split, threads, Act, Isa, Level};
use super::super::super::gemm::{gemm_packed, pack_a, pack_b, Strided, Tile, B};
use super::super::super::nhwc;
use super::*;

/// An element-wise activation as one pass (candle's sigmoid is four ops, each allocating).
pub struct Activation(pub Act);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "aei-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input_f32(storage, layout, "activation")?;
        let mut out = vec![0f32; x.len()];
        self.forward(x, &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl Activation {
    /// `out = act(x)`, in parallel chunks.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let (_, per) = split(out.len(), out.len().div_ceil(threads() * 4));
        let isa = Isa::detect();
        out.par_chunks_mut(per.max(4096))
            .zip(x.par_chunks(per.max(4096)))
            .for_each(|(o, x)| {
                o.copy_from_slice(x);
                activate(isa, o, self.0)
            });
    }
}

/// A batched matrix product `[..., m, k] x [..., k, n]` with the same batch
/// dims on both sides, any strides (a transposed view is read as it is).
/// Batches run in parallel, one GEMM each (candle runs them one after another).
pub struct MatMul;

/// The element offset of batch `b` (row-major over `dims`) under `strides`.
pub(super) fn batch_offset(mut b: usize, dims: &[usize], strides: &[usize]) -> usize {
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
        let shape = MatMul::out_dims(da, db)?;
        let len = shape.iter().product();
        // Not zeroed: `forward` writes every element (see `uninit`).
        let mut out = uninit(len);
        MatMul::forward(
            (&a[l1.start_offset()..], da, l1.stride()),
            (&b[l2.start_offset()..], db, l2.stride()),
            &SharedOut(out.as_mut_ptr(), len),
        )?;
        // SAFETY: `forward` has written all `len` elements.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

std::thread_local! {
    /// Each pool thread's packed MatMul operands, grown to the largest, then reused.
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A MatMul operand: its data from the view's first element, dims and strides.
pub type Operand<'a> = (&'a [f32], &'a [usize], &'a [usize]);

impl MatMul {
    /// The product's dims, checked: same batch dims, inner dims that agree.
    pub fn out_dims(da: &[usize], db: &[usize]) -> candle_core::Result<Vec<usize>> {
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            candle_core::bail!("matmul: shapes {da:?} x {db:?}");
        }
        let mut shape = da.to_vec();
        shape[r - 1] = db[r - 1];
        Ok(shape)
    }

    /// Writes the product's elements (row-major, `out_dims`) to `dst`.
    pub fn forward((a, da, sa): Operand, (b, db, sb): Operand, dst: &SharedOut) -> candle_core::Result<()> {
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            candle_core::bail!("matmul: shapes {da:?} x {db:?}");
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let batch_dims = &da[..r - 2];
        let batches: usize = batch_dims.iter().product();
        if sa.len() != r || sb.len() != r || batches * m * n > dst.1 {
            candle_core::bail!("matmul: strides or output do not fit the shapes");
        }
        // Every element a GEMM reads must lie inside its data.
        let reach = |rows: usize, cols: usize, st: &[usize], len: usize| {
            let last = batch_offset(batches.saturating_sub(1), batch_dims, &st[..r - 2]);
            let far = last + rows.saturating_sub(1) * st[r - 2] + cols.saturating_sub(1) * st[r - 1];
            far < len || rows * cols == 0
        };
        if !reach(m, k, sa, a.len()) || !reach(k, n, sb, b.len()) {
            candle_core::bail!("matmul: strides reach past the storage");
        }
        if k == 0 || batches * m * n == 0 {
            for i in 0..batches * m * n {
                // SAFETY: this thread alone writes `dst` here; `i` is inside it (checked above).
                unsafe { dst.write(i, 0.0) };
            }
            return Ok(());
        }
        let isa = Isa::detect();
        let t = Tile::of(isa);
        // Tasks: each batch's columns in as many runs as keep every thread busy, whole panels each.
        let runs = threads().div_ceil(batches).max(1);
        let per = n.div_ceil(runs).next_multiple_of(t.nr).min(n);
        let runs = n.div_ceil(per);
        (0..batches * runs).into_par_iter().for_each(|task| {
            let (i, c0) = (task / runs, task % runs * per);
            let cols = per.min(n - c0);
            let oa = batch_offset(i, batch_dims, &sa[..r - 2]);
            let ob = batch_offset(i, batch_dims, &sb[..r - 2]) + c0 * sb[r - 1];
            PACKED.with(|buf| {
                let mut buf = buf.borrow_mut();
                let b_in_place = sb[r - 1] == 1 && (k == 1 || sb[r - 2] >= cols);
                let (a_len, b_len) = (t.a_len(m, k), if b_in_place { 0 } else { t.b_len(k, cols) });
                if buf.len() < a_len + b_len {
                    buf.resize(a_len + b_len, 0.0);
                }
                let (pa, pb) = buf.split_at_mut(a_len);
                pack_a(
                    t,
                    Strided {
                        data: &a[oa..],
                        rs: sa[r - 2],
                        cs: sa[r - 1],
                    },
                    m,
                    k,
                    pa,
                );
                let bs = Strided {
                    data: &b[ob..],
                    rs: sb[r - 2],
                    cs: sb[r - 1],
                };
                let rhs = if b_in_place {
                    B::Rows(&b[ob..], sb[r - 2])
                } else {
                    pack_b(t, bs, k, cols, pb);
                    B::Packed(pb)
                };
                // SAFETY: `reach` checked the farthest element of the last batch on both sides;
                // this task's output is batch i's m rows at columns c0..c0 + cols, inside `dst`
                // (checked above), which no other task touches.
                unsafe { gemm_packed(isa, (m, cols, k), pa, rhs, dst.at(i * m * n + c0), n, None) };
            });
        });
        // The tasks cover every column of every batch's m x n outputs.
        Ok(())
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
        self.forward(x, (n, c, h, w), &mut out);
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

impl Upsample {
    /// Writes the `n * c * (h * sh) * (w * sw)` outputs to `out`.
    pub fn forward(&self, x: &[f32], (_, _, h, w): Dims4, out: &mut [f32]) {
        let (sh, sw) = (self.sh.max(1), self.sw.max(1));
        let (oh, ow) = (h * sh, w * sw);
        if !out.is_empty() && h * w > 0 {
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
        let mut out = vec![0f32; x.len()];
        self.forward(x, layout.shape().dims(), &mut out)?;
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl Softmax {
    /// Writes `softmax(scale * x)` over the axis to `out` (`x`'s length, contiguous).
    pub fn forward(&self, x: &[f32], dims: &[usize], out: &mut [f32]) -> candle_core::Result<()> {
        let rank = dims.len() as i64;
        let ax = if self.axis < 0 { self.axis + rank } else { self.axis };
        if !(0..rank).contains(&ax) {
            candle_core::bail!("softmax: axis {} of a rank-{rank} tensor", self.axis);
        }
        let ax = ax as usize;
        let (n, inner) = (dims[ax], dims[ax + 1..].iter().product::<usize>());
        // One block: the `n` rows one softmax runs over, `inner` columns each.
        let block = (n * inner).max(1);
        if out.len() != x.len() {
            candle_core::bail!("softmax: {} outputs for {} inputs", out.len(), x.len());
        }
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
        Ok(())
    }
}

/// `o = softmax(scale * x)` over one contiguous row: in AVX-512's own instructions
/// where the CPU has them ([`softmax_row_v4`]), else from the portable body.
pub(super) fn softmax_row(isa: Isa, x: &[f32], scale: f32, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.level() == Level::V4 {
        // SAFETY: an `Isa` of level V4 exists only where AVX-512 F was found.
        return unsafe { softmax_row_v4(x, scale, o) };
    }
    softmax_row_any(isa, x, scale, o)
}

/// [`softmax_row`] on AVX-512: the max, then `e^(scale x - max)` by [`super::exp_v4`]
/// stored and summed, then the scale by `1 / sum`; the tail under a mask.
///
/// # Safety
/// AVX-512 F on this CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_v4(x: &[f32], scale: f32, o: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), o.len(), "softmax: row lengths");
    let n = x.len();
    let full = n / 16 * 16;
    let mask = ((1u32 << (n - full)) - 1) as u16;
    let sc = _mm512_set1_ps(scale);
    // SAFETY: every load and store below: whole vectors at j < full lie inside both
    // rows; the tail's mask covers its n - full < 16 floats.
    unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(16) {
            m = _mm512_max_ps(m, _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(j)), sc));
        }
        let tail = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x.as_ptr().add(full)), sc);
        m = _mm512_mask_max_ps(m, mask, m, tail);
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut sum = _mm512_setzero_ps();
        for j in (0..full).step_by(16) {
            let e = super::exp_v4(_mm512_fmsub_ps(_mm512_loadu_ps(x.as_ptr().add(j)), sc, mx));
            _mm512_storeu_ps(o.as_mut_ptr().add(j), e);
            sum = _mm512_add_ps(sum, e);
        }
        let e = super::exp_v4(_mm512_sub_ps(tail, mx));
        _mm512_mask_storeu_ps(o.as_mut_ptr().add(full), mask, e);
        sum = _mm512_mask_add_ps(sum, mask, sum, e);
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for j in (0..full).step_by(16) {
            let p = o.as_mut_ptr().add(j);
            _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), inv));
        }
        let p = o.as_mut_ptr().add(full);
        _mm512_mask_storeu_ps(p, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, p), inv));
    }
}

multiversion! {
    /// `o = softmax(scale * x)` over one contiguous row, from the portable body.
    fn softmax_row_any(x: &[f32], scale: f32, o: &mut [f32]) {
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
                oc[j] = nhwc::exp::<FMA>(scale * xc[j] - mx);
                s[j] += oc[j];
            }
        }
        let tail = x.len() / L * L;
        let mut sum: f32 = s.iter().sum();
        for (o, v) in oc.into_remainder().iter_mut().zip(&x[tail..]) {
            *o = nhwc::exp::<FMA>(scale * v - mx);
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
                *o = nhwc::exp::<FMA>(scale * v - m);
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
        let out_dims: Vec<usize> = self.0.iter().filter_map(|&p| dims.get(p).copied()).collect();
        let mut out = vec![0f32; dims.iter().product()];
        Transpose::permute(&self.0, x, dims, layout.stride(), &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

impl Transpose {
    /// Writes `x` (read through `in_strides`) permuted by `perm` to `out`, contiguous.
    /// At most [`MAX_RANK`] axes (the index arithmetic lives on the stack: no allocation).
    pub fn permute(
        perm: &[usize],
        x: &[f32],
        dims: &[usize],
        in_strides: &[usize],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let rank = dims.len();
        if rank > MAX_RANK || perm.len() != rank || (0..rank).any(|i| !perm.contains(&i)) {
            candle_core::bail!("transpose: perm {perm:?} for rank {rank}");
        }
        let len: usize = dims.iter().product();
        let mut out_dims = [0usize; MAX_RANK];
        for (o, &p) in out_dims.iter_mut().zip(perm) {
            *o = dims[p];
        }
        if out.len() != len || in_strides.len() != rank {
            candle_core::bail!("transpose: {} outputs or strides for {dims:?}", out.len());
        }
        if len == 0 || rank == 0 {
            if len == 1 {
                out[0] = x[0];
            }
            return Ok(());
        }
        let reach: usize = dims.iter().zip(in_strides).map(|(d, s)| (d - 1) * s).sum();
        if reach >= x.len() {
            candle_core::bail!("transpose: strides {in_strides:?} reach past the storage");
        }
        // For each output axis, the input stride it walks.
        let mut src = [0usize; MAX_RANK];
        for (o, &p) in src.iter_mut().zip(perm) {
            *o = in_strides[p];
        }
        let last = rank - 1;
        let n_last = out_dims[last];
        // `a`: another output axis that walks the input with stride 1, for square tiles.
        let a = if src[last] == 1 {
            None
        } else {
            (0..last).find(|&i| src[i] == 1 && out_dims[i] > 1)
        };
        let mut out_strides = [1usize; MAX_RANK];
        for i in (0..last).rev() {
            out_strides[i] = out_strides[i + 1] * out_dims[i + 1];
        }
        // Outer index: every output axis but `last` and `a`, as an odometer, split across threads.
        let mut outer = [0usize; MAX_RANK];
        let mut n_outer = 0;
        for i in (0..rank).filter(|&i| i != last && Some(i) != a) {
            outer[n_outer] = i;
            n_outer += 1;
        }
        let outer = &outer[..n_outer];
        let count: usize = outer.iter().map(|&i| out_dims[i]).product();
        // With square tiles, each task takes one band of TILE_T along `a`: a lone 2-D transpose
        // (batch 1) still splits across the pool.
        let bands = a.map_or(1, |a| out_dims[a].div_ceil(TILE_T));
        let dst = SharedOut(out.as_mut_ptr(), out.len());
        (0..count * bands).into_par_iter().for_each(|task| {
            let (mut o, band) = (task / bands, task % bands);
            let (mut ib, mut ob) = (0, 0);
            for &i in outer.iter().rev() {
                let d = o % out_dims[i];
                o /= out_dims[i];
                ib += d * src[i];
                ob += d * out_strides[i];
            }
            // Each outer index (and band along `a`) owns the output elements
            // ob + j*out_strides[a] + k (j in the band), disjoint from every other task's:
            // every write below is to an element only this task touches.
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
                    // A square tile: its input rows (along `a`, contiguous) read into `t`, then
                    // written out along the output's last axis, a contiguous run per row.
                    let mut t = [[0f32; TILE_T]; TILE_T];
                    let j0 = band * TILE_T;
                    let tj = TILE_T.min(n_a - j0);
                    for k0 in (0..n_last).step_by(TILE_T) {
                        let tk = TILE_T.min(n_last - k0);
                        for (k, tr) in t.iter_mut().enumerate().take(tk) {
                            let at = ib + j0 + (k0 + k) * sl;
                            copy_short(&x[at..at + tj], &mut tr[..tj]);
                        }
                        // The whole fixed-size tile flipped, which the compiler does in registers.
                        let mut flipped = [[0f32; TILE_T]; TILE_T];
                        for (k, tr) in t.iter().enumerate() {
                            for (j, v) in tr.iter().enumerate() {
                                flipped[j][k] = *v;
                            }
                        }
                        for (j, row) in flipped.iter().enumerate().take(tj) {
                            // SAFETY: this task's own elements (above).
                            unsafe { dst.copy_from(ob + (j0 + j) * oa + k0, &row[..tk]) };
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// The most axes [`Transpose::permute`] takes (higher ranks go through candle's own copy).
pub const MAX_RANK: usize = 8;

/// `x` laid out contiguously: itself when it already is, else one parallel
/// copy (candle's own copies a strided view one element at a time, on one thread).
pub fn contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.is_contiguous() {
        Ok(x.clone())
    } else if x.dtype() == candle_core::DType::F32 && x.rank() <= MAX_RANK {
        x.apply_op1_no_bwd(&Transpose((0..x.rank()).collect()))
    } else {
        x.contiguous()
    }
}
