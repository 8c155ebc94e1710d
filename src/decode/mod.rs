//! Image decode into a frame slot's preallocated RGB buffer: JPEG (zune-jpeg,
//! SIMD), PNG (zune-png), BMP (zune-bmp) and TIFF (tiff), told apart by their
//! magic bytes, and the EXIF orientation that turns the picture upright.
//!
//! Owns: turning compressed bytes into packed RGB8, the dimension check made
//! from the header before any pixel is decoded, and the reasons an image is
//! refused. Alpha is dropped (as Pillow's `convert("RGB")` and OpenCV's
//! `IMREAD_COLOR` do), grey is repeated into R, G and B, 16-bit samples keep
//! their high byte, palettes are expanded. Does not resize or normalise (see
//! `preprocess.rs`).

mod bmp;
mod exif;
mod jpeg;
mod orient;
mod png;
mod tiff;

use std::fmt;

pub use orient::Orientation;

/// The image formats the service decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Jpeg,
    Png,
    Bmp,
    Tiff,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Jpeg, Format::Png, Format::Bmp, Format::Tiff];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Bmp => "bmp",
            Format::Tiff => "tiff",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Bmp => "BMP",
            Format::Tiff => "TIFF",
        }
    }
}

/// Bytes per pixel a slot's decode buffer holds: room for a decoder's RGBA
/// output, which is packed down to RGB in place.
pub const BUFFER_BYTES_PER_PIXEL: usize = 4;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// None of the formats we decode; names what it looks like.
    UnknownFormat(&'static str),
    /// Larger than the slots were sized for.
    TooLarge {
        width: usize,
        height: usize,
        max_width: u32,
        max_height: u32,
    },
    /// Truncated, corrupt, or a variant of the format we do not decode.
    Corrupt(Format, String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnknownFormat(what) => {
                write!(f, "payload is not an image we decode (JPEG, PNG, BMP, TIFF): {what}")
            }
            DecodeError::TooLarge {
                width,
                height,
                max_width,
                max_height,
            } => write!(
                f,
                "image is {width}x{height}, larger than MAX_IMAGE_WIDTH x MAX_IMAGE_HEIGHT = {max_width}x{max_height}"
            ),
            DecodeError::Corrupt(format, why) => write!(f, "corrupt or truncated {}: {why}", format.name()),
        }
    }
}

/// The format of `bytes` by its magic bytes, or what it looks like instead.
pub fn sniff(bytes: &[u8]) -> Result<Format, &'static str> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        Ok(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(Format::Png)
    } else if bytes.starts_with(b"BM") {
        Ok(Format::Bmp)
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        Ok(Format::Tiff)
    } else if bytes.starts_with(b"GIF8") {
        Err("it is a GIF")
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        Err("it is a WebP")
    } else if bytes.starts_with(b"II+\0") || bytes.starts_with(b"MM\0+") {
        Err("it is a BigTIFF")
    } else if bytes.is_empty() {
        Err("it is empty")
    } else {
        Err("no JPEG, PNG, BMP or TIFF signature")
    }
}

/// A decoded image: the packed RGB8 data at the front of the slot's buffer.
/// `width` and `height` are the upright image's once [`orient`] has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decoded {
    pub width: u32,
    pub height: u32,
    pub format: Format,
    /// How the stored pixels are turned to be upright (EXIF orientation).
    pub orientation: Orientation,
}

impl Decoded {
    /// Bytes of packed RGB8 the image occupies.
    pub fn rgb_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

/// The dimension check every decoder makes from its header, before decoding.
fn check_size(width: usize, height: usize, max_width: u32, max_height: u32) -> Result<(), DecodeError> {
    if width > max_width as usize || height > max_height as usize {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_width,
            max_height,
        });
    }
    Ok(())
}

/// Decodes `bytes` as RGB8 into `rgb` (whose length is the slot's capacity;
/// it is never grown). Strict: truncated or corrupt data is an error, not a
/// grey-filled picture. The pixels are as stored; [`orient`] turns them upright.
pub fn decode_into(bytes: &[u8], rgb: &mut [u8], max_width: u32, max_height: u32) -> Result<Decoded, DecodeError> {
    let format = sniff(bytes).map_err(DecodeError::UnknownFormat)?;
    let corrupt = |why: String| DecodeError::Corrupt(format, why);
    match format {
        Format::Jpeg => jpeg::decode(bytes, rgb, max_width, max_height, corrupt),
        Format::Png => png::decode(bytes, rgb, max_width, max_height, corrupt),
        Format::Bmp => bmp::decode(bytes, rgb, max_width, max_height, corrupt),
        Format::Tiff => tiff::decode(bytes, rgb, max_width, max_height, corrupt),
    }
}

/// Turns a decoded image upright by its orientation, through `spare`:
/// afterwards `rgb` holds the upright pixels and `d` their size. The two
/// buffers trade places, so a caller that decodes again into `rgb` gives
/// `spare` the same size.
pub fn orient(rgb: &mut Vec<u8>, spare: &mut Vec<u8>, d: &mut Decoded) {
    if d.orientation.is_identity() {
        return;
    }
    let n = d.rgb_len();
    if spare.len() < n {
        // A caller that gave no room: keep the stored pixels (and say so).
        log::warn!("no room to turn a {}x{} image upright", d.width, d.height);
        d.orientation = Orientation::default();
        return;
    }
    let (w, h) = d.orientation.apply(&rgb[..n], d.width, d.height, &mut spare[..n]);
    std::mem::swap(rgb, spare);
    d.width = w;
    d.height = h;
}

/// Where a decoder's pixels are, before packing to RGB8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
}

impl Layout {
    fn channels(self) -> usize {
        match self {
            Layout::Gray => 1,
            Layout::GrayAlpha => 2,
            Layout::Rgb => 3,
            Layout::Rgba => 4,
        }
    }
}

/// Packs `pixels` pixels of `from` at the front of `buf` into RGB8, in place.
fn pack_rgb(buf: &mut [u8], pixels: usize, from: Layout) {
    match from {
        Layout::Rgb => {}
        Layout::Rgba => {
            // Forward: the write (3 i) never passes the read (4 i).
            for i in 0..pixels {
                buf.copy_within(i * 4..i * 4 + 3, i * 3);
            }
        }
        Layout::Gray | Layout::GrayAlpha => {
            // Backward: the write (3 i) is always at or past the read (c i).
            let c = from.channels();
            for i in (0..pixels).rev() {
                let v = buf[i * c];
                buf[i * 3..i * 3 + 3].fill(v);
            }
        }
    }
}

/// Runs `decode` on the front of `rgb`, sized by what the decoder says it
/// needs (`need` bytes of `layout` pixels, `sample_bytes` a sample, checked
/// against the buffer and the image), then packs those pixels to RGB8 in
/// place. A decoder of wider samples leaves them narrowed to bytes at the front.
fn decode_packed(
    rgb: &mut [u8],
    (width, height): (usize, usize),
    (layout, sample_bytes): (Layout, usize),
    need: Option<usize>,
    decode: impl FnOnce(&mut [u8]) -> Result<(), String>,
) -> Result<(), String> {
    let need = match need {
        Some(n) if n <= rgb.len() => n,
        Some(n) => {
            return Err(format!(
                "a {width}x{height} image needs {n} bytes to decode, the frame buffer holds {}",
                rgb.len()
            ))
        }
        None => return Err(format!("{width}x{height}: output size overflows")),
    };
    if need != width * height * layout.channels() * sample_bytes {
        return Err(format!("unexpected output size {need} for {width}x{height}"));
    }
    decode(&mut rgb[..need])?;
    pack_rgb(rgb, width * height, layout);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_by_magic_bytes() {
        assert_eq!(sniff(b"\xff\xd8\xff\xe0"), Ok(Format::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nxxxx"), Ok(Format::Png));
        assert_eq!(sniff(b"BM\0\0"), Ok(Format::Bmp));
        assert_eq!(sniff(b"II*\0\x08\0\0\0"), Ok(Format::Tiff));
        assert_eq!(sniff(b"MM\0*\0\0\0\x08"), Ok(Format::Tiff));
        assert_eq!(sniff(b"GIF89a"), Err("it is a GIF"));
        assert_eq!(sniff(b""), Err("it is empty"));
        assert!(sniff(b"hello").is_err());
        assert!(sniff(b"\x89PNG").is_err(), "a PNG signature is eight bytes");
    }

    #[test]
    fn packs_every_layout_to_rgb_in_place() {
        let mut b = vec![1, 2, 3, 9, 4, 5, 6, 9, 0, 0];
        pack_rgb(&mut b, 2, Layout::Rgba);
        assert_eq!(&b[..6], &[1, 2, 3, 4, 5, 6]);
        let mut b = vec![7, 8, 0, 0, 0, 0];
        pack_rgb(&mut b, 2, Layout::Gray);
        assert_eq!(b, [7, 7, 7, 8, 8, 8]);
        let mut b = vec![7, 255, 8, 0, 0, 0];
        pack_rgb(&mut b, 2, Layout::GrayAlpha);
        assert_eq!(b, [7, 7, 7, 8, 8, 8]);
    }
}
