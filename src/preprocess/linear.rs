//! Point-sampling filters, no antialiasing: `bilinear` as OpenCV's
//! `INTER_LINEAR` (half-pixel centres, two by two taps, edges clamped) and
//! `nearest` as Pillow's `NEAREST` (the pixel under the output pixel's centre).

use super::{Geometry, Norm};
use crate::config::model::ResizeFilter;

/// One tap pair along an axis.
#[derive(Debug, Clone, Copy, Default)]
struct Tap {
    i0: u32,
    i1: u32,
    w1: f32,
}

/// The frame's column and row taps (content pixels only).
#[derive(Debug, Default)]
pub(super) struct Tables {
    xs: Vec<Tap>,
    ys: Vec<Tap>,
}

impl Tables {
    pub(super) fn with_capacity(max_dst_w: usize) -> Tables {
        Tables {
            xs: Vec::with_capacity(max_dst_w),
            ys: Vec::with_capacity(max_dst_w),
        }
    }

    pub(super) fn prepare(&mut self, g: &Geometry, filter: ResizeFilter) {
        let [cx0, cy0, cx1, cy1] = g.content;
        self.xs.clear();
        self.ys.clear();
        if filter == ResizeFilter::Nearest {
            let from_x = (cx0 as f32 - g.offset_x) as u32;
            let from_y = (cy0 as f32 - g.offset_y) as u32;
            nearest(&mut self.xs, g.src_w, g.resized_w, from_x, cx1 - cx0);
            nearest(&mut self.ys, g.src_h, g.resized_h, from_y, cy1 - cy0);
        } else {
            self.xs
                .extend((cx0..cx1).map(|x| linear(x, g.scale_x, g.offset_x, g.src_w)));
            self.ys
                .extend((cy0..cy1).map(|y| linear(y, g.scale_y, g.offset_y, g.src_h)));
        }
    }

    /// Writes content row `i`'s pixels (`out`: `3 * content width` values).
    pub(super) fn row(&self, rgb: &[u8], g: &Geometry, i: usize, n: &Norm, out: &mut [f32]) {
        let sw = g.src_w as usize;
        let t = self.ys[i];
        let r0 = &rgb[t.i0 as usize * sw * 3..(t.i0 as usize + 1) * sw * 3];
        let r1 = &rgb[t.i1 as usize * sw * 3..(t.i1 as usize + 1) * sw * 3];
        let wy1 = t.w1;
        let wy0 = 1.0 - wy1;
        for (tx, o) in self.xs.iter().zip(out.chunks_exact_mut(3)) {
            let (p0, p1) = (tx.i0 as usize * 3, tx.i1 as usize * 3);
            let wx1 = tx.w1;
            let wx0 = 1.0 - wx1;
            for (c, o) in o.iter_mut().enumerate() {
                let s = n.src[c];
                let top = r0[p0 + s] as f32 * wx0 + r0[p1 + s] as f32 * wx1;
                let bot = r1[p0 + s] as f32 * wx0 + r1[p1 + s] as f32 * wx1;
                *o = (top * wy0 + bot * wy1) * n.a[c] + n.b[c];
            }
        }
    }
}

/// Pillow's nearest neighbour (`ImagingScaleAffine`): the source position of
/// each output pixel's centre, stepped along the axis in f64 as Pillow steps
/// it (so a boundary falls on the same side), for outputs `from..from + count`
/// of `n` source pixels resized to `resized`.
fn nearest(taps: &mut Vec<Tap>, n: u32, resized: u32, from: u32, count: u32) {
    let step = n as f64 / resized as f64;
    let mut at = step * 0.5;
    for x in 0..from + count {
        if x >= from {
            let i = (at.max(0.0) as u32).min(n - 1);
            taps.push(Tap { i0: i, i1: i, w1: 0.0 });
        }
        at += step;
    }
}

fn linear(d: u32, scale: f32, offset: f32, n: u32) -> Tap {
    // Half-pixel centres, as OpenCV's INTER_LINEAR.
    let s = ((d as f32 + 0.5 - offset) / scale - 0.5).max(0.0);
    let i0 = (s.floor() as u32).min(n - 1);
    let i1 = (i0 + 1).min(n - 1);
    Tap {
        i0,
        i1,
        w1: if i1 == i0 { 0.0 } else { s - i0 as f32 },
    }
}
