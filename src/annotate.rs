//! Annotated pictures: a frame with its detections drawn on it (boxes, labels and
//! confidences; a classifier's top classes as a caption) and its zones outlined, as JPEG.
//!
//! Owns: drawing onto a copy of the decoded frame (a worker's spare RGB buffer, so the frame
//! itself stays as the next model needs it) and encoding it (`jpeg-encoder`) into a reused
//! buffer, within a size limit. Labels use the 8x8 bitmap font of `font8x8`, scaled with the
//! picture. Nothing here allocates; the encoder keeps a few row buffers of its own per picture.

use crate::config::model::Zone;

/// A box or a class to draw: boxes in original image pixels `[x1, y1, x2, y2]`.
#[derive(Debug, Clone, Copy)]
pub struct Mark<'a> {
    pub class_id: usize,
    pub label: &'a str,
    pub confidence: f32,
    pub bbox: Option<[f32; 4]>,
}

/// What became of a picture asked for: counted in `aei_pictures_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Drawn and encoded (for a one-shot caller or the alert topic).
    Drawn,
    /// An alert started or ended, but the camera had a picture on the topic too recently.
    RateLimited,
    /// Over `annotations.max_bytes` even at the lowest quality: not sent.
    TooLarge,
    /// The encoder refused.
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Outcome::Drawn, Outcome::RateLimited, Outcome::TooLarge, Outcome::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Drawn => "drawn",
            Outcome::RateLimited => "rate_limited",
            Outcome::TooLarge => "too_large",
            Outcome::Failed => "failed",
        }
    }
}

/// Why no picture came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotateError {
    /// Even at the lowest quality the JPEG is over the limit (bytes at that quality, limit).
    TooLarge(usize, usize),
    /// The encoder refused (a side over 65535 pixels).
    Encode(String),
}

impl std::fmt::Display for AnnotateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnnotateError::TooLarge(n, max) => {
                write!(
                    f,
                    "the annotated JPEG is {n} bytes at the lowest quality, over the limit of {max}"
                )
            }
            AnnotateError::Encode(e) => write!(f, "cannot encode the annotated JPEG: {e}"),
        }
    }
}

/// Box colours, by class id (saturated, so they survive JPEG and stand out on a scene).
pub const PALETTE: [[u8; 3]; 10] = [
    [255, 56, 56],
    [56, 56, 255],
    [0, 200, 0],
    [255, 157, 0],
    [255, 0, 200],
    [0, 200, 255],
    [160, 0, 255],
    [255, 230, 0],
    [0, 120, 120],
    [140, 70, 0],
];
/// Zones are outlined in this colour.
pub const ZONE_COLOUR: [u8; 3] = [255, 255, 255];

/// The colour of class `class_id`'s boxes.
pub fn colour(class_id: usize) -> [u8; 3] {
    PALETTE[class_id % PALETTE.len()]
}

/// Line width of boxes and zones in a `width` x `height` picture: 2 px up to 720p, 3 at 1080p.
pub fn line_width(width: u32, height: u32) -> u32 {
    (width.min(height) / 360).max(2)
}

/// Font scale: 8 px glyphs up to 480 px, 16 at 1080p.
fn font_scale(width: u32, height: u32) -> u32 {
    (width.min(height) / 480).clamp(1, 4)
}

/// An RGB8 picture being drawn on.
pub struct Canvas<'a> {
    pub rgb: &'a mut [u8],
    pub width: u32,
    pub height: u32,
}

impl Canvas<'_> {
    /// Fills the rectangle `[x0, x1) x [y0, y1)`, clipped to the picture.
    pub fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let (w, h) = (self.width as i64, self.height as i64);
        let (x0, x1) = (x0.clamp(0, w) as usize, x1.clamp(0, w) as usize);
        let (y0, y1) = (y0.clamp(0, h) as usize, y1.clamp(0, h) as usize);
        if x0 >= x1 {
            return;
        }
        for y in y0..y1 {
            let row = &mut self.rgb[(y * w as usize + x0) * 3..(y * w as usize + x1) * 3];
            for px in row.chunks_exact_mut(3) {
                px.copy_from_slice(&c);
            }
        }
    }

    /// A rectangle's outline, `t` pixels wide, inside `[x0, x1] x [y0, y1]`.
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, t: i64, c: [u8; 3]) {
        self.fill(x0, y0, x1 + 1, y0 + t, c);
        self.fill(x0, y1 + 1 - t, x1 + 1, y1 + 1, c);
        self.fill(x0, y0, x0 + t, y1 + 1, c);
        self.fill(x1 + 1 - t, y0, x1 + 1, y1 + 1, c);
    }

    /// A line `t` pixels wide from `a` to `b` (a square stamped at each step).
    pub fn line(&mut self, a: (i64, i64), b: (i64, i64), t: i64, c: [u8; 3]) {
        let (dx, dy) = ((b.0 - a.0).abs(), (b.1 - a.1).abs());
        let steps = dx.max(dy).max(1);
        let half = t / 2;
        let mut last = (i64::MIN, i64::MIN);
        for i in 0..=steps {
            let x = a.0 + (b.0 - a.0) * i / steps;
            let y = a.1 + (b.1 - a.1) * i / steps;
            if (x, y) != last {
                self.fill(x - half, y - half, x - half + t, y - half + t, c);
                last = (x, y);
            }
        }
    }

    /// `text` in the 8x8 font at `scale`, its top left at `(x, y)`, on a `bg` box.
    /// Characters outside ASCII are drawn as `?`. Returns the box's width.
    pub fn text(&mut self, x: i64, y: i64, scale: u32, text: impl Iterator<Item = char> + Clone, bg: [u8; 3]) -> i64 {
        let s = scale.max(1) as i64;
        let pad = s;
        let n = text.clone().count() as i64;
        let (bw, bh) = (n * 8 * s + 2 * pad, 8 * s + 2 * pad);
        self.fill(x, y, x + bw, y + bh, bg);
        // Dark text on light backgrounds, white on dark (Rec. 601 luma).
        let luma = (299 * bg[0] as u32 + 587 * bg[1] as u32 + 114 * bg[2] as u32) / 1000;
        let fg = if luma > 140 { [0, 0, 0] } else { [255, 255, 255] };
        for (i, ch) in text.enumerate() {
            let code = if ch.is_ascii() && !ch.is_ascii_control() {
                ch as usize
            } else {
                '?' as usize
            };
            let glyph = font8x8::legacy::BASIC_LEGACY[code];
            let gx = x + pad + i as i64 * 8 * s;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let px = gx + col * s;
                        let py = y + pad + row as i64 * s;
                        self.fill(px, py, px + s, py + s, fg);
                    }
                }
            }
        }
        bw
    }
}

/// Digits of a confidence as two decimals ("0.87"), without formatting machinery.
fn confidence_text(p: f32) -> [char; 4] {
    let v = (p.clamp(0.0, 1.0) * 100.0).round() as u32;
    if v >= 100 {
        return ['1', '.', '0', '0'];
    }
    let d = |n: u32| char::from_digit(n, 10).unwrap_or('?');
    ['0', '.', d(v / 10), d(v % 10)]
}

/// Draws `marks` and the zones in `zone_mask` (a mask over `zones`, from `zones::for_camera`)
/// onto the canvas: zones first, then boxes with their labels above them (inside when a box
/// touches the top); marks without a box are a caption at the top left, one per line.
pub fn draw<'m>(canvas: &mut Canvas<'_>, marks: impl Iterator<Item = Mark<'m>>, zones: &[Zone], zone_mask: u64) {
    let (w, h) = (canvas.width, canvas.height);
    let t = line_width(w, h) as i64;
    let s = font_scale(w, h);
    let label_h = (8 * s + 2 * s) as i64;
    for (i, z) in zones.iter().enumerate() {
        if zone_mask & (1 << i) == 0 || z.polygon.is_empty() {
            continue;
        }
        let px = |p: [f32; 2]| ((p[0] * w as f32).round() as i64, (p[1] * h as f32).round() as i64);
        let n = z.polygon.len();
        for k in 0..n {
            canvas.line(px(z.polygon[k]), px(z.polygon[(k + 1) % n]), t, ZONE_COLOUR);
        }
        let (x, y) = px(z.polygon[0]);
        canvas.text(x, y, s, z.name.chars(), ZONE_COLOUR);
    }
    let mut caption_y = 0i64;
    for m in marks {
        let c = colour(m.class_id);
        let conf = confidence_text(m.confidence);
        let text = m.label.chars().chain([' ']).chain(conf);
        match m.bbox {
            Some(b) => {
                // Clipped to the picture, so a box past an edge keeps its outline there.
                let (xm, ym) = (w as i64 - 1, h as i64 - 1);
                let (x0, y0) = ((b[0].round() as i64).clamp(0, xm), (b[1].round() as i64).clamp(0, ym));
                let (x1, y1) = ((b[2].round() as i64).clamp(x0, xm), (b[3].round() as i64).clamp(y0, ym));
                canvas.rect(x0, y0, x1, y1, t, c);
                let ly = if y0 >= label_h { y0 - label_h } else { y0 };
                canvas.text(x0, ly, s, text, c);
            }
            None => {
                canvas.text(0, caption_y, s, text, c);
                caption_y += label_h;
            }
        }
    }
}

/// Encodes the `width` x `height` RGB8 picture into `out` (cleared first) at `quality`;
/// over `max_bytes`, again at lower qualities, down to 10. Returns the quality used.
pub fn encode(
    rgb: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    max_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<u8, AnnotateError> {
    let (Ok(w), Ok(h)) = (u16::try_from(width), u16::try_from(height)) else {
        return Err(AnnotateError::Encode(format!(
            "{width}x{height} is over JPEG's 65535 pixels a side"
        )));
    };
    let pixels = &rgb[..width as usize * height as usize * 3];
    let mut q = quality.clamp(1, 100);
    loop {
        out.clear();
        let mut e = jpeg_encoder::Encoder::new(&mut *out, q);
        // Full-resolution colour: lines two or three pixels wide keep their colour
        // (4:2:0 would blend them with the scene).
        e.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
        e.encode(pixels, w, h, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| AnnotateError::Encode(e.to_string()))?;
        if out.len() <= max_bytes {
            return Ok(q);
        }
        if q <= 10 {
            return Err(AnnotateError::TooLarge(out.len(), max_bytes));
        }
        q = (q / 2).max(10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canvas(buf: &mut [u8], w: u32, h: u32) -> Canvas<'_> {
        Canvas {
            rgb: buf,
            width: w,
            height: h,
        }
    }

    fn px(buf: &[u8], w: u32, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * w + x) * 3) as usize;
        [buf[i], buf[i + 1], buf[i + 2]]
    }

    #[test]
    fn a_box_outline_is_drawn_on_its_edges_and_nowhere_inside() {
        let (w, h) = (200u32, 100u32);
        let mut buf = vec![10u8; (w * h * 3) as usize];
        let mark = Mark {
            class_id: 1,
            label: "car",
            confidence: 0.5,
            bbox: Some([40.0, 50.0, 120.0, 90.0]),
        };
        draw(&mut canvas(&mut buf, w, h), [mark].into_iter(), &[], 0);
        let c = colour(1);
        let t = line_width(w, h);
        for x in 40..=120 {
            assert_eq!(px(&buf, w, x, 90), c, "bottom edge at x={x}");
        }
        for y in 50..=90 {
            assert_eq!(px(&buf, w, 40, y), c, "left edge at y={y}");
            assert_eq!(px(&buf, w, 120, y), c, "right edge at y={y}");
        }
        for y in 50 + t..=90 - t {
            assert_eq!(px(&buf, w, 40 + t - 1, y), c);
            assert_eq!(px(&buf, w, 40 + t, y), [10; 3], "lines are {t} px wide");
        }
        assert_eq!(px(&buf, w, 80, 70), [10; 3], "the inside is untouched");
        assert_eq!(px(&buf, w, 130, 95), [10; 3], "outside is untouched");
        // The label sits above the box: its background is the class colour.
        assert_eq!(px(&buf, w, 41, 49), c);
        let label_pixels = (30..50).flat_map(|y| (40..80).map(move |x| (x, y)));
        assert!(
            label_pixels.clone().any(|(x, y)| px(&buf, w, x, y) == [255; 3]),
            "white text on the dark blue label"
        );
    }

    #[test]
    fn boxes_past_the_edges_are_clipped_and_zones_outlined() {
        let (w, h) = (64u32, 48u32);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        let zone = Zone {
            name: "door".into(),
            cameras: vec![],
            polygon: vec![[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]],
            classes: vec![],
            min_area: 0.0,
            anchor: crate::config::model::Anchor::BottomCenter,
        };
        let mark = Mark {
            class_id: 0,
            label: "person\u{e9}",
            confidence: 1.0,
            bbox: Some([-30.0, -5.0, 500.0, 600.0]),
        };
        draw(
            &mut canvas(&mut buf, w, h),
            [mark].into_iter(),
            std::slice::from_ref(&zone),
            1,
        );
        // The zone's right edge (x = 48) is white below its label.
        assert_eq!(px(&buf, w, 48, 30), ZONE_COLOUR);
        // The clipped box's left edge runs down column 0.
        assert_eq!(px(&buf, w, 0, 40), colour(0));
        // A zone the camera does not have is not drawn.
        let mut other = vec![0u8; (w * h * 3) as usize];
        draw(
            &mut canvas(&mut other, w, h),
            std::iter::empty(),
            std::slice::from_ref(&zone),
            0,
        );
        assert!(other.iter().all(|&b| b == 0));
    }

    #[test]
    fn the_jpeg_decodes_to_the_drawing_and_shrinks_to_its_limit() {
        let (w, h) = (320u32, 240u32);
        // A noisy scene, so that quality matters for the size.
        let mut buf: Vec<u8> = (0..w * h * 3)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mark = Mark {
            class_id: 2,
            label: "helmet",
            confidence: 0.91,
            bbox: Some([100.0, 100.0, 200.0, 200.0]),
        };
        draw(&mut canvas(&mut buf, w, h), [mark].into_iter(), &[], 0);
        let mut out = Vec::with_capacity(1 << 20);
        let q = encode(&buf, w, h, 90, 1 << 20, &mut out).unwrap();
        assert_eq!(q, 90);
        let big = out.len();
        let mut pixels = vec![0u8; (w * h * 4) as usize];
        let d = crate::decode::decode_into(&out, &mut pixels, w, h).unwrap();
        assert_eq!((d.width, d.height), (w, h));
        // The box's left edge (3 px wide at x = 100..103), well away from the label.
        let p = px(&pixels, w, 101, 170);
        let c = colour(2);
        let near = p.iter().zip(c).all(|(&a, b)| (a as i32 - b as i32).abs() < 60);
        assert!(near, "edge pixel {p:?} should be near {c:?}");
        // A limit below the first size is met at a lower quality.
        let q = encode(&buf, w, h, 90, big / 2, &mut out).unwrap();
        assert!(q < 90 && out.len() <= big / 2, "quality {q}, {} bytes", out.len());
        assert!(matches!(
            encode(&buf, w, h, 90, 100, &mut out),
            Err(AnnotateError::TooLarge(_, 100))
        ));
    }

    #[test]
    fn confidences_read_as_two_decimals() {
        let s = |p| confidence_text(p).iter().collect::<String>();
        assert_eq!(s(0.876), "0.88");
        assert_eq!(s(0.05), "0.05");
        assert_eq!(s(1.0), "1.00");
        assert_eq!(s(f32::NAN), "0.00");
    }
}
