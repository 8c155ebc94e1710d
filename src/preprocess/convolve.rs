//! Pillow's resampling convolutions, bit for bit: `bilinear-antialias`
//! (triangle), `bicubic` (a = -0.5) and `area` (box). When shrinking, the
//! filter is widened by the shrink factor, so every source pixel counts
//! (antialiasing). As `ImagingResample` in Pillow's `Resample.c`: weights
//! computed in f64 per output pixel, normalised, held as fixed point with 22
//! fraction bits; a horizontal pass into 8-bit rows, then a vertical pass,
//! each rounded and clamped to 0..=255. torchvision's `Resize` on a PIL image
//! is exactly this.

use super::{Geometry, Norm};
use crate::config::model::ResizeFilter;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

fn support(f: ResizeFilter) -> f64 {
    match f {
        ResizeFilter::Area => 0.5,
        ResizeFilter::Bicubic => 2.0,
        _ => 1.0,
    }
}

fn weight(f: ResizeFilter, x: f64) -> f64 {
    match f {
        ResizeFilter::Area => {
            if x > -0.5 && x <= 0.5 {
                1.0
            } else {
                0.0
            }
        }
        ResizeFilter::Bicubic => {
            const A: f64 = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
        _ => {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
    }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One axis's taps: for output pixel `i`, source pixels `first[i]..first[i] + len[i]`
/// weighted by `k[i * ksize..][..len[i]]`.
#[derive(Debug, Default)]
struct Axis {
    first: Vec<u32>,
    len: Vec<u32>,
    k: Vec<i32>,
    ksize: usize,
    w: Vec<f64>,
}

impl Axis {
    fn with_capacity(max_in: usize, max_out: usize) -> Axis {
        // ksize <= 4 * in / resized + 3 (bicubic) and outputs <= resized, so the
        // table holds at most 4 * in + 5 * out weights.
        Axis {
            first: Vec::with_capacity(max_out),
            len: Vec::with_capacity(max_out),
            k: Vec::with_capacity(4 * max_in + 5 * max_out),
            ksize: 0,
            w: Vec::with_capacity(4 * max_in / max_out.max(1) + 8),
        }
    }

    /// Taps for outputs `from..from + count` of `in_size` resized to `out_size`.
    fn prepare(&mut self, in_size: u32, out_size: u32, from: u32, count: usize, f: ResizeFilter) {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = support(f) * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        self.ksize = ksize;
        self.first.clear();
        self.len.clear();
        self.k.clear();
        self.k.resize(count * ksize, 0);
        self.w.clear();
        self.w.resize(ksize, 0.0);
        for i in 0..count {
            let centre = ((from as usize + i) as f64 + 0.5) * scale;
            // C's (int) casts: toward zero.
            let xmin = ((centre - support + 0.5) as i64).max(0);
            let xmax = ((centre + support + 0.5) as i64).min(in_size as i64);
            let n = ((xmax - xmin).max(0) as usize).min(ksize);
            let mut total = 0.0;
            for x in 0..n {
                let w = weight(f, ((x as i64 + xmin) as f64 - centre + 0.5) * ss);
                self.w[x] = w;
                total += w;
            }
            let k = &mut self.k[i * ksize..i * ksize + n];
            for (k, &w) in k.iter_mut().zip(&self.w[..n]) {
                let w = if total != 0.0 { w / total } else { w };
                let fixed = w * (1 << PRECISION_BITS) as f64;
                *k = if w < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            self.first.push(xmin as u32);
            self.len.push(n as u32);
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let n = self.len[i] as usize;
        (self.first[i] as usize, &self.k[i * self.ksize..i * self.ksize + n])
    }
}

/// The horizontal pass into `rows` (`cols` pixels each) from the source rows
/// starting at `src` (`sw` pixels each); with AVX2 where the CPU has it.
fn horizontal(rows: &mut [u8], src: &[u8], sw: usize, cols: usize, h: &Axis) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { horizontal_avx2(rows, src, sw, cols, h) };
    }
    horizontal_any(rows, src, sw, cols, h)
}

/// [`horizontal_any`] compiled for AVX2 (the same code, wider registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal_avx2(rows: &mut [u8], src: &[u8], sw: usize, cols: usize, h: &Axis) {
    horizontal_any(rows, src, sw, cols, h)
}

#[inline(always)]
fn horizontal_any(rows: &mut [u8], src: &[u8], sw: usize, cols: usize, h: &Axis) {
    for (r, out) in rows.chunks_exact_mut(cols * 3).enumerate() {
        // The row and whatever follows it: a pixel is read as four bytes (the
        // fourth, the next pixel's red, is weighted and dropped), which
        // vectorises; only the image's very last pixel lacks a fourth byte.
        let src = &src[r * sw * 3..];
        for (j, o) in out.chunks_exact_mut(3).enumerate() {
            let (x0, k) = h.taps(j);
            let px = if (x0 + k.len()) * 3 < src.len() {
                horizontal4(&src[x0 * 3..(x0 + k.len()) * 3 + 1], k)
            } else {
                horizontal3(&src[x0 * 3..(x0 + k.len()) * 3], k)
            };
            o.copy_from_slice(&px);
        }
    }
}

/// One output pixel of the horizontal pass: `px` holds `k.len()` RGB pixels and one byte more.
#[inline(always)]
fn horizontal4(px: &[u8], k: &[i32]) -> [u8; 3] {
    let mut acc = [HALF; 4];
    for (t, &k) in k.iter().enumerate() {
        let p: &[u8; 4] = px[t * 3..t * 3 + 4].try_into().unwrap();
        for c in 0..4 {
            acc[c] += p[c] as i32 * k;
        }
    }
    [clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]
}

/// As [`horizontal4`], for the image's last pixel (no byte after it).
fn horizontal3(px: &[u8], k: &[i32]) -> [u8; 3] {
    let mut acc = [HALF; 3];
    for (p, &k) in px.chunks_exact(3).zip(k) {
        for c in 0..3 {
            acc[c] += p[c] as i32 * k;
        }
    }
    [clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]
}

/// The frame's taps, and its horizontally resampled rows.
#[derive(Debug, Default)]
pub(super) struct Tables {
    h: Axis,
    v: Axis,
    /// 8-bit RGB rows `first_row..`, `cols` pixels each: the horizontal pass.
    rows: Vec<u8>,
    acc: Vec<i32>,
    first_row: usize,
    cols: usize,
}

impl Tables {
    pub(super) fn with_capacity(max_src_w: usize, max_src_h: usize, max_dst_w: usize, max_dst_h: usize) -> Tables {
        Tables {
            h: Axis::with_capacity(max_src_w, max_dst_w),
            v: Axis::with_capacity(max_src_h, max_dst_h),
            rows: Vec::with_capacity(max_src_h * max_dst_w * 3),
            acc: Vec::with_capacity(max_dst_w * 3),
            first_row: 0,
            cols: 0,
        }
    }

    /// Computes the taps and runs the horizontal pass over every source row
    /// the content needs.
    pub(super) fn prepare(&mut self, rgb: &[u8], g: &Geometry, f: ResizeFilter) {
        let [cx0, cy0, cx1, cy1] = g.content;
        // Content pixel x is pixel x - offset of the whole resized image.
        let from_x = (cx0 as f32 - g.offset_x) as u32;
        let from_y = (cy0 as f32 - g.offset_y) as u32;
        let (cols, out_rows) = ((cx1 - cx0) as usize, (cy1 - cy0) as usize);
        self.h.prepare(g.src_w, g.resized_w, from_x, cols, f);
        self.v.prepare(g.src_h, g.resized_h, from_y, out_rows, f);
        self.cols = cols;
        if out_rows == 0 || cols == 0 {
            self.rows.clear();
            return;
        }
        let first = self.v.first[0] as usize;
        let last = self.v.first[out_rows - 1] as usize + self.v.len[out_rows - 1] as usize;
        self.first_row = first;
        self.rows.clear();
        self.rows.resize((last - first) * cols * 3, 0);
        horizontal(
            &mut self.rows,
            &rgb[first * g.src_w as usize * 3..],
            g.src_w as usize,
            cols,
            &self.h,
        );
    }

    /// The vertical pass for content row `i`, normalised into `out`.
    pub(super) fn row(&mut self, i: usize, n: &Norm, out: &mut [f32]) {
        let width = self.cols * 3;
        let (y0, k) = self.v.taps(i);
        self.acc.clear();
        self.acc.resize(width, HALF);
        for (t, &k) in k.iter().enumerate() {
            let r = (y0 - self.first_row + t) * width;
            for (a, &p) in self.acc.iter_mut().zip(&self.rows[r..r + width]) {
                *a += p as i32 * k;
            }
        }
        for (o, a) in out.chunks_exact_mut(3).zip(self.acc.chunks_exact(3)) {
            let px = [clip8(a[0]), clip8(a[1]), clip8(a[2])];
            for (c, o) in o.iter_mut().enumerate() {
                *o = px[n.src[c]] as f32 * n.a[c] + n.b[c];
            }
        }
    }
}
