//! Attention fused: `o = v softmax(scale q k)ᵀ` per head, as YOLOv12's area
//! attention spells it out (`MatMul`, softmax over keys, `Transpose`, `MatMul`),
//! without the `n x n_k` scores ever written whole, transposed or packed.
//!
//! Per head, the keys (`kᵀ`) and values (`v`) are packed once as the GEMM's left
//! operands; then per block of [`QUERIES`] queries:
//! - the scores come out transposed, `sᵀ = kᵀ q_blockᵀ` (`n_k x` block, keys down),
//!   into a scratch block that stays in L2;
//! - the softmax runs down its columns (vectorised along the queries), leaving
//!   `e = exp(scale s - max)` and each query's `1 / sum`;
//! - `o_block = v e` reads `e` in place (it is already `k`-major for the GEMM)
//!   into the output's columns, which `1 / sum` then scales.
//!
//! Unfused, the scores were written (`n x n_k` floats per head), read and
//! written by the softmax, and transposed into packed panels for the second
//! product (5 MB per YOLOv12n attention layer). Inputs are read through their
//! strides, so the transposes that make `q`, `k` and `v` stay views.

use rayon::prelude::*;

use super::super::super::cpu::{multiversion, Isa};
use super::super::super::gemm::{gemm_packed, pack_a, pack_b, Strided, Tile, B};
use super::tensor::{batch_offset, Operand};
use super::*;

/// Queries per block: a whole number of every tile's panels (16 and 48 columns).
const QUERIES: usize = 48;

/// `o = v softmax(scale q k)ᵀ` over the last axis of the scores: `q` `[.., n, d]`,
/// `k` `[.., d, n_k]`, `v` `[.., d_v, n_k]`, `o` `[.., d_v, n]`, the same batch dims.
pub struct Attention {
    pub scale: f32,
}

std::thread_local! {
    /// Each pool thread's packed operands and score block, grown to the largest, then reused.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Attention {
    /// The output's dims, checked: `[.., d_v, n]`.
    pub fn out_dims(dq: &[usize], dk: &[usize], dv: &[usize]) -> candle_core::Result<Vec<usize>> {
        Attention::check(dq, dk, dv)?;
        let mut out = dv.to_vec();
        out[dq.len() - 1] = dq[dq.len() - 2];
        Ok(out)
    }

    /// The shapes agree; the output's length.
    fn check(dq: &[usize], dk: &[usize], dv: &[usize]) -> candle_core::Result<usize> {
        let r = dq.len();
        let same_batch = dk.len() == r && dv.len() == r && dq[..r.max(2) - 2] == dk[..r.max(2) - 2];
        if r < 2 || !same_batch || dq[..r - 2] != dv[..r - 2] || dq[r - 1] != dk[r - 2] || dk[r - 1] != dv[r - 1] {
            candle_core::bail!("attention: shapes q {dq:?}, k {dk:?}, v {dv:?}");
        }
        Ok(dv[..r - 1].iter().product::<usize>() * dq[r - 2])
    }

    /// Writes the output (row-major, [`Attention::out_dims`]) to `dst`.
    pub fn forward(
        &self,
        (q, dq, sq): Operand,
        (k, dk, sk): Operand,
        (v, dv, sv): Operand,
        dst: &SharedOut,
    ) -> candle_core::Result<()> {
        let len = Attention::check(dq, dk, dv)?;
        let r = dq.len();
        let (n, d, nk, dvv) = (dq[r - 2], dq[r - 1], dk[r - 1], dv[r - 2]);
        let batch_dims = &dq[..r - 2];
        let batches: usize = batch_dims.iter().product();
        if sq.len() != r || sk.len() != r || sv.len() != r || len > dst.1 {
            candle_core::bail!("attention: strides or output do not fit the shapes");
        }
        // Every element a GEMM reads must lie inside its data.
        let reach = |(rows, cols): (usize, usize), st: &[usize], len: usize| {
            let last = batch_offset(batches.saturating_sub(1), batch_dims, &st[..r - 2]);
            rows * cols == 0 || last + (rows - 1) * st[r - 2] + (cols - 1) * st[r - 1] < len
        };
        if !reach((n, d), sq, q.len()) || !reach((d, nk), sk, k.len()) || !reach((dvv, nk), sv, v.len()) {
            candle_core::bail!("attention: strides reach past the storage");
        }
        if batches * dvv * n == 0 {
            return Ok(());
        }
        if nk == 0 {
            // No keys: every output is an empty sum's (NaN, as softmax over nothing is).
            for i in 0..batches * dvv * n {
                // SAFETY: this thread alone writes `dst` here; `i` is inside it (checked above).
                unsafe { dst.write(i, f32::NAN) };
            }
            return Ok(());
        }
        let isa = Isa::detect();
        let t = Tile::of(isa);
        let nb = QUERIES.min(n);
        let (ka_len, va_len) = (t.a_len(nk, d), t.a_len(dvv, nk));
        let (qb_len, s_len) = (t.b_len(d, nb), nk * nb);
        (0..batches).into_par_iter().for_each(|b| {
            let (oq, ok, ov) = (
                batch_offset(b, batch_dims, &sq[..r - 2]),
                batch_offset(b, batch_dims, &sk[..r - 2]),
                batch_offset(b, batch_dims, &sv[..r - 2]),
            );
            SCRATCH.with(|buf| {
                let mut buf = buf.borrow_mut();
                let total = ka_len + va_len + qb_len + s_len + 2 * nb;
                if buf.len() < total {
                    buf.resize(total, 0.0);
                }
                let (ka, rest) = buf.split_at_mut(ka_len);
                let (va, rest) = rest.split_at_mut(va_len);
                let (qb, rest) = rest.split_at_mut(qb_len);
                let (s, rest) = rest.split_at_mut(s_len);
                let (mx, sums) = rest[..2 * nb].split_at_mut(nb);
                // kᵀ (n_k x d) and v (d_v x n_k), the two products' left operands.
                let kt = Strided {
                    data: &k[ok..],
                    rs: sk[r - 1],
                    cs: sk[r - 2],
                };
                pack_a(t, kt, nk, d, ka);
                let vs = Strided {
                    data: &v[ov..],
                    rs: sv[r - 2],
                    cs: sv[r - 1],
                };
                pack_a(t, vs, dvv, nk, va);
                for i0 in (0..n).step_by(nb) {
                    let cols = nb.min(n - i0);
                    // q_blockᵀ (d x cols): column i is query i0 + i.
                    let qt = Strided {
                        data: &q[oq + i0 * sq[r - 2]..],
                        rs: sq[r - 1],
                        cs: sq[r - 2],
                    };
                    pack_b(t, qt, d, cols, qb);
                    let s = &mut s[..nk * cols];
                    // SAFETY: `s` holds n_k rows of `cols`, this thread's scratch.
                    unsafe { gemm_packed(isa, (nk, cols, d), ka, B::Packed(qb), s.as_mut_ptr(), cols, None) };
                    softmax_down(isa, s, cols, self.scale, &mut mx[..cols], &mut sums[..cols]);
                    let at = b * dvv * n + i0;
                    // SAFETY: batch b's d_v rows at columns i0..i0 + cols, `n` apart, lie inside
                    // `dst` (checked above) and belong to this task alone.
                    unsafe { gemm_packed(isa, (dvv, cols, nk), va, B::Rows(s, cols), dst.at(at), n, None) };
                    for c in 0..dvv {
                        for (j, inv) in sums[..cols].iter().enumerate() {
                            let i = at + c * n + j;
                            // SAFETY: as above; the GEMM has written it.
                            unsafe { *dst.at(i) *= *inv };
                        }
                    }
                }
            });
        });
        // Every batch's d_v x n outputs: each query block's columns, written and scaled.
        Ok(())
    }
}

multiversion! {
    /// Softmax of `scale * s` down the columns of `s` (rows `cols` long), unnormalised:
    /// `s` becomes `exp(scale s - max)` and `inv` each column's `1 / sum`; `mx` is scratch.
    fn softmax_down(s: &mut [f32], cols: usize, scale: f32, mx: &mut [f32], inv: &mut [f32]) {
        let (mx, inv) = (&mut mx[..cols], &mut inv[..cols]);
        mx.fill(f32::NEG_INFINITY);
        for row in s.chunks_exact(cols) {
            for (m, v) in mx.iter_mut().zip(row) {
                *m = m.max(scale * v);
            }
        }
        inv.fill(0.0);
        for row in s.chunks_exact_mut(cols) {
            for ((v, m), sum) in row.iter_mut().zip(mx.iter()).zip(inv.iter_mut()) {
                *v = super::super::super::nhwc::exp::<FMA>(scale * *v - m);
                *sum += *v;
            }
        }
        inv.iter_mut().for_each(|v| *v = 1.0 / *v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Against candle's matmul and softmax, on edge shapes (one query, one key, a query
    /// block's edge, more keys than a block of `k`, a head wider than a tile, a negative
    /// scale), with `q`, `k` and `v` read contiguous and through transposed strides.
    #[test]
    fn matches_candles_ops_on_edge_shapes_and_strided_views() {
        let dev = Device::Cpu;
        let cases: &[(usize, usize, usize, usize, usize, f32)] = &[
            (1, 1, 1, 1, 1, 1.0),
            (2, 100, 37, 8, 5, 0.35),
            (3, 49, 300, 32, 32, 0.18),
            (1, 48, 17, 3, 16, 1.0),
            (2, 5, 7, 33, 2, -0.5),
        ];
        for &(b, n, nk, d, dv, scale) in cases {
            let q = Tensor::randn(0f32, 1.0, (b, n, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, d, nk), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, dv, nk), &dev).unwrap();
            let s = (q.matmul(&k).unwrap() * scale as f64).unwrap();
            let e = s.broadcast_sub(&s.max_keepdim(2).unwrap()).unwrap().exp().unwrap();
            let p = e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap();
            let want: Vec<f32> = v
                .matmul(&p.t().unwrap().contiguous().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for strided in [false, true] {
                // Strided: each operand stored as its transpose, read through swapped strides.
                let held = |t: &Tensor| -> (Vec<f32>, Vec<usize>, Vec<usize>) {
                    let (x, y, z) = t.dims3().unwrap();
                    if strided {
                        let data = t.transpose(1, 2).unwrap().contiguous().unwrap().flatten_all().unwrap();
                        (data.to_vec1().unwrap(), vec![x, y, z], vec![y * z, 1, y])
                    } else {
                        (
                            t.flatten_all().unwrap().to_vec1().unwrap(),
                            vec![x, y, z],
                            vec![y * z, z, 1],
                        )
                    }
                };
                let (qd, qs, qst) = held(&q);
                let (kd, ks, kst) = held(&k);
                let (vd, vs, vst) = held(&v);
                let mut out = vec![f32::NAN; b * dv * n];
                Attention { scale }
                    .forward(
                        (&qd, &qs, &qst),
                        (&kd, &ks, &kst),
                        (&vd, &vs, &vst),
                        &SharedOut::of(&mut out),
                    )
                    .unwrap();
                for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * e.abs().max(1e-2),
                        "{b}x{n}x{nk}, d {d}, d_v {dv}, strided {strided}, at {i}: {a} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_shapes_that_do_not_agree() {
        assert!(Attention::out_dims(&[2, 5, 8], &[2, 8, 7], &[2, 3, 7]).is_ok_and(|d| d == [2, 3, 5]));
        assert!(Attention::out_dims(&[2, 5, 8], &[2, 4, 7], &[2, 3, 7]).is_err());
        assert!(Attention::out_dims(&[2, 5, 8], &[2, 8, 7], &[2, 3, 6]).is_err());
        assert!(Attention::out_dims(&[2, 5, 8], &[1, 8, 7], &[2, 3, 7]).is_err());
        assert!(Attention::out_dims(&[5], &[5], &[5]).is_err());
        let x = [0f32; 4];
        let mut out = [0f32; 2];
        let r = Attention { scale: 1.0 }.forward(
            (&x, &[1, 2, 2], &[4, 2, 1]),
            (&x, &[1, 2, 2], &[4, 2, 1]),
            (&x, &[1, 2, 2], &[4, 2, 1]),
            &SharedOut::of(&mut out),
        );
        assert!(r.is_err(), "an output too small is refused");
    }
}
