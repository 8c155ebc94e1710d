//! TIFF (tiff): the first image of the file, 8- or 16-bit grey, grey+alpha,
//! RGB or RGBA, chunky (interleaved), uncompressed, PackBits, LZW or Deflate;
//! the Orientation tag. 16-bit samples are read whole into the frame buffer,
//! so a 16-bit image must fit it at two bytes a sample.

use std::io::Cursor;

use tiff::decoder::{Decoder, Limits};
use tiff::tags::{PlanarConfiguration, Tag};
use tiff::ColorType;

use super::{check_size, fits, pack_rgb, DecodeError, Decoded, Format, Layout, Orientation};

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
    let samples = width * height * layout.channels();
    let bytes_per = bits as usize / 8;
    let need = fits(samples.checked_mul(bytes_per), rgb, width, height).map_err(&corrupt)?;
    dec.read_image_bytes(&mut rgb[..need]).map_err(e)?;
    if bytes_per == 2 {
        // Native-endian u16 samples: keep the high byte, packed to the front.
        for i in 0..samples {
            let v = u16::from_ne_bytes([rgb[2 * i], rgb[2 * i + 1]]);
            rgb[i] = (v >> 8) as u8;
        }
    }
    pack_rgb(rgb, width * height, layout);
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
