//! Preprocessing: packed RGB8 -> the model's f32 input tensor.
//!
//! Owns: resize geometry (stretch, letterbox, short-side resize + centre
//! crop, rounded as Ultralytics and torchvision round), the resize filters
//! (`linear.rs`: OpenCV-style point sampling; `convolve.rs`: Pillow's
//! antialiased convolutions), channel order, layout and normalisation, and
//! the mapping of model coordinates back to original pixels. Writes only into
//! buffers it is handed; allocates nothing once its scratch has grown to the
//! largest frame.

mod convolve;
mod linear;

use crate::config::model::{ChannelOrder, Layout, Preprocessing, ResizeFilter, ResizeMode};

/// Where the source image lands in the model input, per axis:
/// `dst = src * scale + offset` (pixel edges), so
/// `src = (dst - offset) / scale`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Geometry {
    pub src_w: u32,
    pub src_h: u32,
    pub dst_w: u32,
    pub dst_h: u32,
    pub scale_x: f32,
    pub scale_y: f32,
    pub offset_x: f32,
    pub offset_y: f32,
    /// The whole image resized (before any crop or padding): `dst = resized + offset`.
    pub resized_w: u32,
    pub resized_h: u32,
    /// Destination pixels covered by the image: `[x0, x1) x [y0, y1)`;
    /// the rest is padding.
    pub content: [u32; 4],
}

impl Geometry {
    pub fn new(src_w: u32, src_h: u32, p: &Preprocessing) -> Geometry {
        let (dw, dh) = (p.width, p.height);
        let (sw, sh) = (src_w.max(1) as f32, src_h.max(1) as f32);
        match p.mode {
            ResizeMode::Stretch => Geometry {
                src_w,
                src_h,
                dst_w: dw,
                dst_h: dh,
                scale_x: dw as f32 / sw,
                scale_y: dh as f32 / sh,
                offset_x: 0.0,
                offset_y: 0.0,
                resized_w: dw,
                resized_h: dh,
                content: [0, 0, dw, dh],
            },
            ResizeMode::Letterbox { .. } => {
                // As Ultralytics' LetterBox: one ratio, rounded new size, padding split evenly.
                let r = (dw as f32 / sw).min(dh as f32 / sh);
                let nw = ((sw * r).round() as u32).clamp(1, dw);
                let nh = ((sh * r).round() as u32).clamp(1, dh);
                let left = (dw - nw) / 2;
                let top = (dh - nh) / 2;
                Geometry {
                    src_w,
                    src_h,
                    dst_w: dw,
                    dst_h: dh,
                    scale_x: nw as f32 / sw,
                    scale_y: nh as f32 / sh,
                    offset_x: left as f32,
                    offset_y: top as f32,
                    resized_w: nw,
                    resized_h: nh,
                    content: [left, top, left + nw, top + nh],
                }
            }
            ResizeMode::CenterCrop { resize_short } => {
                // As torchvision's Resize(short) + CenterCrop(size): the long side is
                // `int(short * long / short_side)` (truncated), the crop offset
                // `int(round((resized - crop) / 2))` with Python's round half to even.
                let (w, h) = (src_w.max(1) as u64, src_h.max(1) as u64);
                let short = resize_short as u64;
                let (rw, rh) = if w <= h {
                    (short, short * h / w)
                } else {
                    (short * w / h, short)
                };
                let rw = (rw as u32).max(dw);
                let rh = (rh as u32).max(dh);
                let left = round_half_even_half(rw - dw) as f32;
                let top = round_half_even_half(rh - dh) as f32;
                Geometry {
                    src_w,
                    src_h,
                    dst_w: dw,
                    dst_h: dh,
                    scale_x: rw as f32 / sw,
                    scale_y: rh as f32 / sh,
                    offset_x: -left,
                    offset_y: -top,
                    resized_w: rw,
                    resized_h: rh,
                    content: [0, 0, dw, dh],
                }
            }
        }
    }

    /// Maps a point in model-input pixels back to original image pixels,
    /// clamped to the image.
    pub fn to_source(&self, x: f32, y: f32) -> (f32, f32) {
        (
            ((x - self.offset_x) / self.scale_x).clamp(0.0, self.src_w as f32),
            ((y - self.offset_y) / self.scale_y).clamp(0.0, self.src_h as f32),
        )
    }
}

/// `round(n / 2)` as Python rounds: halves go to the even neighbour.
fn round_half_even_half(n: u32) -> u32 {
    let half = n / 2;
    if n % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Number of f32 values a config's tensor holds.
pub fn tensor_len(p: &Preprocessing) -> usize {
    p.width as usize * p.height as usize * 3
}

/// Scratch for one frame's sampling tables and rows. Sized at start-up for
/// the largest input; a larger frame grows it once (then it stays).
#[derive(Debug, Default)]
pub struct Scratch {
    linear: linear::Tables,
    convolve: convolve::Tables,
    row: Vec<f32>,
}

impl Scratch {
    pub fn with_capacity(max_dst_w: usize) -> Scratch {
        Scratch {
            linear: linear::Tables::with_capacity(max_dst_w),
            convolve: convolve::Tables::default(),
            row: Vec::with_capacity(max_dst_w * 3),
        }
    }

    /// Also reserves the antialiasing filters' tables for a source of up to
    /// `max_src_w` x `max_src_h` into a model input of `max_dst_w` x `max_dst_h`.
    pub fn for_frames(max_src_w: usize, max_src_h: usize, max_dst_w: usize, max_dst_h: usize) -> Scratch {
        Scratch {
            convolve: convolve::Tables::with_capacity(max_src_w, max_src_h, max_dst_w, max_dst_h),
            ..Scratch::with_capacity(max_dst_w)
        }
    }
}

/// `value = pixel * a[c] + b[c]` for output channel `c`, fed by source channel `src[c]`.
#[derive(Debug, Clone, Copy)]
struct Norm {
    a: [f32; 3],
    b: [f32; 3],
    src: [usize; 3],
}

impl Norm {
    fn new(p: &Preprocessing) -> Norm {
        let unit = if p.normalize { 1.0 / 255.0 } else { 1.0 };
        Norm {
            a: std::array::from_fn(|c| unit / p.std[c]),
            b: std::array::from_fn(|c| -p.mean[c] / p.std[c]),
            src: match p.channel_order {
                ChannelOrder::Rgb => [0, 1, 2],
                ChannelOrder::Bgr => [2, 1, 0],
            },
        }
    }
}

/// Fills `out` (exactly `tensor_len(p)` values) from packed RGB8 `rgb`.
pub fn preprocess_into(rgb: &[u8], g: &Geometry, p: &Preprocessing, scratch: &mut Scratch, out: &mut [f32]) {
    let (dw, dh) = (g.dst_w as usize, g.dst_h as usize);
    debug_assert_eq!(out.len(), dw * dh * 3);
    debug_assert!(rgb.len() >= g.src_w as usize * g.src_h as usize * 3);
    let norm = Norm::new(p);
    let pad_px = match p.mode {
        ResizeMode::Letterbox { pad_value } => pad_value as f32,
        _ => 0.0,
    };
    let pad: [f32; 3] = std::array::from_fn(|c| pad_px * norm.a[c] + norm.b[c]);
    let [cx0, cy0, cx1, cy1] = g.content.map(|v| v as usize);
    let Scratch { linear, convolve, row } = scratch;
    let antialiased = !matches!(p.filter, ResizeFilter::Nearest | ResizeFilter::Bilinear);
    if antialiased {
        convolve.prepare(rgb, g, p.filter);
    } else {
        linear.prepare(g, p.filter);
    }
    row.clear();
    row.resize(dw * 3, 0.0);

    let plane = dw * dh;
    for y in 0..dh {
        if y < cy0 || y >= cy1 {
            for px in row.chunks_exact_mut(3) {
                px.copy_from_slice(&pad);
            }
        } else {
            let (left, rest) = row.split_at_mut(cx0 * 3);
            let (content, right) = rest.split_at_mut((cx1 - cx0) * 3);
            for px in left.chunks_exact_mut(3).chain(right.chunks_exact_mut(3)) {
                px.copy_from_slice(&pad);
            }
            if antialiased {
                convolve.row(y - cy0, &norm, content);
            } else {
                linear.row(rgb, g, y - cy0, &norm, content);
            }
        }
        match p.layout {
            Layout::Nhwc => out[y * dw * 3..(y + 1) * dw * 3].copy_from_slice(row),
            Layout::Nchw => {
                for c in 0..3 {
                    let dst = &mut out[c * plane + y * dw..c * plane + (y + 1) * dw];
                    for (x, d) in dst.iter_mut().enumerate() {
                        *d = row[x * 3 + c];
                    }
                }
            }
        }
    }
}

/// An image file's model input (turned upright by its EXIF orientation),
/// allocated fresh: for tools off the frame path (`tensor`, `bench model`),
/// never per frame. Returns the upright image's size too.
pub fn tensor_for_image(
    image: &[u8],
    p: &Preprocessing,
    max_w: u32,
    max_h: u32,
) -> Result<((u32, u32), Vec<f32>), String> {
    let pixels = max_w as usize * max_h as usize;
    let mut rgb = vec![0u8; pixels * crate::decode::BUFFER_BYTES_PER_PIXEL];
    let mut spare = vec![0u8; pixels * crate::decode::BUFFER_BYTES_PER_PIXEL];
    let mut d = crate::decode::decode_into(image, &mut rgb, max_w, max_h).map_err(|e| e.to_string())?;
    crate::decode::orient(&mut rgb, &mut spare, &mut d);
    let g = Geometry::new(d.width, d.height, p);
    let mut tensor = vec![0f32; tensor_len(p)];
    preprocess_into(&rgb, &g, p, &mut Scratch::with_capacity(p.width as usize), &mut tensor);
    Ok(((d.width, d.height), tensor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(w: u32, h: u32, mode: ResizeMode) -> Preprocessing {
        Preprocessing {
            width: w,
            height: h,
            mode,
            filter: ResizeFilter::Bilinear,
            normalize: false,
            mean: [0.0; 3],
            std: [1.0; 3],
            channel_order: ChannelOrder::Rgb,
            layout: Layout::Nchw,
        }
    }

    #[test]
    fn letterbox_geometry_matches_ultralytics() {
        // 1920x1080 -> 640x640: ratio 1/3, 640x360 content, 140 px bars top and bottom.
        let g = Geometry::new(1920, 1080, &pre(640, 640, ResizeMode::Letterbox { pad_value: 114 }));
        assert_eq!(g.content, [0, 140, 640, 500]);
        assert_eq!(g.offset_y, 140.0);
        let (x, y) = g.to_source(320.0, 140.0);
        assert!((x - 960.0).abs() < 1e-3 && y.abs() < 1e-3);
        let (x, y) = g.to_source(640.0, 500.0);
        assert!((x - 1920.0).abs() < 1e-3 && (y - 1080.0).abs() < 1e-3);
        // Odd padding: 451x300 -> 640: ratio 1.419, 640x426, 214 px of padding: 107 above.
        let g = Geometry::new(451, 300, &pre(640, 640, ResizeMode::Letterbox { pad_value: 114 }));
        assert_eq!(g.content, [0, 107, 640, 533]);
        // Portrait: bars left and right.
        let g = Geometry::new(300, 600, &pre(640, 640, ResizeMode::Letterbox { pad_value: 114 }));
        assert_eq!(g.content, [160, 0, 480, 640]);
    }

    #[test]
    fn center_crop_geometry_matches_torchvision() {
        // 600x400, short side -> 256: 384x256, crop 224 at left=80, top=16.
        let g = Geometry::new(600, 400, &pre(224, 224, ResizeMode::CenterCrop { resize_short: 256 }));
        assert_eq!((g.offset_x, g.offset_y), (-80.0, -16.0));
        assert!((g.scale_x - 0.64).abs() < 1e-6);
        let (x, y) = g.to_source(0.0, 0.0);
        assert!((x - 125.0).abs() < 1e-3 && (y - 25.0).abs() < 1e-3);
        // 768x576: the long side is int(256 * 768 / 576) = 341, and the crop starts at
        // round(58.5) = 58 (half to even), not 59.
        let g = Geometry::new(768, 576, &pre(224, 224, ResizeMode::CenterCrop { resize_short: 256 }));
        assert_eq!((g.resized_w, g.resized_h), (341, 256));
        assert_eq!((g.offset_x, g.offset_y), (-58.0, -16.0));
        // 1920x1080: int(256 * 1920 / 1080) = 455, round(115.5) = 116.
        let g = Geometry::new(1920, 1080, &pre(224, 224, ResizeMode::CenterCrop { resize_short: 256 }));
        assert_eq!((g.resized_w, g.offset_x), (455, -116.0));
        // Portrait: the width is the short side.
        let g = Geometry::new(300, 451, &pre(224, 224, ResizeMode::CenterCrop { resize_short: 256 }));
        assert_eq!((g.resized_w, g.resized_h), (256, 384));
    }

    #[test]
    fn letterbox_pads_and_normalises() {
        // 2x1 image: red, blue -> 4x4 letterbox: content rows 1..3.
        let rgb = [255, 0, 0, 0, 0, 255];
        let mut p = pre(4, 4, ResizeMode::Letterbox { pad_value: 114 });
        p.normalize = true;
        let g = Geometry::new(2, 1, &p);
        assert_eq!(g.content, [0, 1, 4, 3]);
        let mut out = vec![0.0; tensor_len(&p)];
        preprocess_into(&rgb, &g, &p, &mut Scratch::with_capacity(4), &mut out);
        let at = |c: usize, y: usize, x: usize| out[c * 16 + y * 4 + x];
        assert!((at(0, 0, 0) - 114.0 / 255.0).abs() < 1e-6, "padding row");
        assert!((at(0, 1, 0) - 1.0).abs() < 1e-6, "left edge is pure red");
        assert!(at(2, 1, 0).abs() < 1e-6);
        assert!((at(2, 2, 3) - 1.0).abs() < 1e-6, "right edge is pure blue");
        assert!((at(0, 1, 1) - 0.75).abs() < 1e-6, "bilinear: 3/4 red at x=1");
    }

    #[test]
    fn bgr_nhwc_and_mean_std() {
        let rgb = [10, 20, 30];
        let mut p = pre(2, 1, ResizeMode::Stretch);
        p.channel_order = ChannelOrder::Bgr;
        p.layout = Layout::Nhwc;
        p.mean = [1.0, 2.0, 3.0];
        p.std = [2.0, 2.0, 2.0];
        let g = Geometry::new(1, 1, &p);
        let mut out = vec![0.0; 6];
        preprocess_into(&rgb, &g, &p, &mut Scratch::with_capacity(2), &mut out);
        assert_eq!(out, [14.5, 9.0, 3.5, 14.5, 9.0, 3.5]);
    }

    #[test]
    fn identity_stretch_reproduces_pixels() {
        let rgb: Vec<u8> = (0..5 * 3 * 3).map(|i| (i * 5) as u8).collect();
        let p = pre(5, 3, ResizeMode::Stretch);
        let g = Geometry::new(5, 3, &p);
        let mut out = vec![0.0; tensor_len(&p)];
        preprocess_into(&rgb, &g, &p, &mut Scratch::with_capacity(5), &mut out);
        for y in 0..3 {
            for x in 0..5 {
                for c in 0..3 {
                    assert_eq!(out[c * 15 + y * 5 + x], rgb[(y * 5 + x) * 3 + c] as f32);
                }
            }
        }
    }
}
