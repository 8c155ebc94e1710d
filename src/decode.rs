//! JPEG decode into a frame slot's preallocated RGB buffer (zune-jpeg, SIMD).
//!
//! Owns: turning compressed bytes into packed RGB8 and the reasons a JPEG is
//! refused. Does not resize or normalise (see `preprocess.rs`).

use std::fmt;

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a JPEG at all (no SOI marker); names what it looks like.
    NotJpeg(&'static str),
    /// Larger than the slots were sized for.
    TooLarge {
        width: usize,
        height: usize,
        max_width: u32,
        max_height: u32,
    },
    /// Truncated or corrupt JPEG data.
    Corrupt(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::NotJpeg(what) => write!(f, "payload is not a JPEG image ({what})"),
            DecodeError::TooLarge {
                width,
                height,
                max_width,
                max_height,
            } => write!(
                f,
                "image is {width}x{height}, larger than MAX_IMAGE_WIDTH x MAX_IMAGE_HEIGHT = {max_width}x{max_height}"
            ),
            DecodeError::Corrupt(why) => write!(f, "corrupt or truncated JPEG: {why}"),
        }
    }
}

/// Names a payload that is not a JPEG by its magic bytes.
pub fn sniff_non_jpeg(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    Some(if bytes.starts_with(b"\x89PNG") {
        "it is a PNG"
    } else if bytes.starts_with(b"GIF8") {
        "it is a GIF"
    } else if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        "it is a WebP"
    } else if bytes.starts_with(b"BM") {
        "it is a BMP"
    } else if bytes.is_empty() {
        "it is empty"
    } else {
        "no JPEG start-of-image marker"
    })
}

/// A decoded image: dimensions of the packed RGB8 data at the front of the slot's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decoded {
    pub width: u32,
    pub height: u32,
}

/// Decodes `jpeg` as RGB8 into `rgb` (whose length is the slot's capacity;
/// it is never grown). Strict mode: truncated or corrupt data is an error,
/// not a grey-filled picture.
pub fn decode_into(jpeg: &[u8], rgb: &mut [u8], max_width: u32, max_height: u32) -> Result<Decoded, DecodeError> {
    if let Some(what) = sniff_non_jpeg(jpeg) {
        return Err(DecodeError::NotJpeg(what));
    }
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true)
        // Let the header through so an over-size image is reported with its size.
        .set_max_width(16384)
        .set_max_height(16384);
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(jpeg), options);
    dec.decode_headers().map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (width, height) = dec
        .dimensions()
        .ok_or_else(|| DecodeError::Corrupt("no frame header".into()))?;
    if width > max_width as usize || height > max_height as usize {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_width,
            max_height,
        });
    }
    let need = dec
        .output_buffer_size()
        .ok_or_else(|| DecodeError::Corrupt("no frame header".into()))?;
    if need != width * height * 3 || need > rgb.len() {
        return Err(DecodeError::Corrupt(format!(
            "unexpected output size {need} for {width}x{height}"
        )));
    }
    dec.decode_into(&mut rgb[..need])
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
    })
}
