//! TIFF (tiff): the first image of the file, 8- or 16-bit grey, grey+alpha,
//! RGB or RGBA, chunky (interleaved), uncompressed, PackBits, LZW or Deflate;
//! the Orientation tag. 16-bit samples are read whole into the frame buffer,
//! so a 16-bit image must fit it at two bytes a sample.

use std::io::Cursor;

use tiff::decoder::{Decoder, Limits};
use tiff::tags::{PlanarConfiguration, Tag};
use tiff::ColorType;

use super::{check_size, decode_packed, DecodeError, Decoded, Format, Layout, Orientation};

pub(super) fn decode(
    bytes: &[u8],
    rgb: &mut [u8],
    max_width: u32,
    max_height: u32,
    corrupt: impl Fn(String) -> DecodeError,
) -> Result<Decoded, DecodeError> {
    let e = |e: tiff::TiffError| corrupt(e.to_string());
    // The decoder's own buffers stay within the frame buffer's size.
    let mut limits = Limits::default();
    limits.decoding_buffer_size = rgb.len();
    limits.intermediate_buffer_size = rgb.len();
    limits.ifd_value_size = 1 << 20;
    let mut dec = Decoder::new(Cursor::new(bytes)).map_err(e)?.with_limits(limits);
    let (width, height) = dec.dimensions().map_err(e)?;
    let (width, height) = (width as usize, height as usize);
    check_size(width, height, max_width, max_height)?;
    let planar = dec.find_tag_unsigned::<u16>(Tag::PlanarConfiguration).map_err(e)?;
    if planar.is_some_and(|p| p != PlanarConfiguration::Chunky.to_u16()) {
        return Err(corrupt(
            "planar (separated) samples are not supported; write chunky (contiguous) samples".into(),
        ));
    }
    let (layout, bits) = match dec.colortype().map_err(e)? {
        ColorType::Gray(b) => (Layout::Gray, b),
        ColorType::GrayA(b) => (Layout::GrayAlpha, b),
        ColorType::RGB(b) => (Layout::Rgb, b),
        ColorType::RGBA(b) => (Layout::Rgba, b),
        other => return Err(corrupt(format!("unsupported colour type {other:?}"))),
    };
    if bits != 8 && bits != 16 {
        return Err(corrupt(format!("{bits}-bit samples are not supported (8 or 16)")));
    }
    let sample_bytes = bits as usize / 8;
    let need = (width * height * layout.channels()).checked_mul(sample_bytes);
    decode_packed(rgb, (width, height), (layout, sample_bytes), need, |out| {
        dec.read_image_bytes(out).map_err(|e| e.to_string())?;
        if sample_bytes == 2 {
            // Native-endian u16 samples: keep the high byte, packed to the front.
            for i in 0..out.len() / 2 {
                out[i] = (u16::from_ne_bytes([out[2 * i], out[2 * i + 1]]) >> 8) as u8;
            }
        }
        Ok(())
    })
    .map_err(&corrupt)?;
    let orientation = dec
        .find_tag_unsigned::<u16>(Tag::Orientation)
        .ok()
        .flatten()
        .map(Orientation::from_exif)
        .unwrap_or_default();
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
        format: Format::Tiff,
        orientation,
    })
}
