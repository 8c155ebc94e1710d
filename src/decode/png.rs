//! PNG (zune-png): 1- to 16-bit grey, grey+alpha, RGB, RGBA and palette
//! (with or without tRNS), interlaced or not; the first frame of an APNG.

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_png::PngDecoder;

use super::{check_size, decode_packed, exif, DecodeError, Decoded, Format, Layout};

pub(super) fn decode(
    bytes: &[u8],
    rgb: &mut [u8],
    max_width: u32,
    max_height: u32,
    corrupt: impl Fn(String) -> DecodeError,
) -> Result<Decoded, DecodeError> {
    let options = DecoderOptions::default()
        .png_set_strip_to_8bit(true)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16);
    let mut dec = PngDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers().map_err(|e| corrupt(format!("{e:?}")))?;
    let (width, height) = dec.dimensions().ok_or_else(|| corrupt("no IHDR chunk".into()))?;
    check_size(width, height, max_width, max_height)?;
    let layout = match dec.colorspace() {
        Some(ColorSpace::Luma) => Layout::Gray,
        Some(ColorSpace::LumaA) => Layout::GrayAlpha,
        Some(ColorSpace::RGB) => Layout::Rgb,
        Some(ColorSpace::RGBA) => Layout::Rgba,
        other => return Err(corrupt(format!("unsupported colour type {other:?}"))),
    };
    let need = dec.output_buffer_size();
    decode_packed(rgb, (width, height), (layout, 1), need, |out| {
        dec.decode_into(out).map_err(|e| format!("{e:?}"))
    })
    .map_err(&corrupt)?;
    let orientation = dec
        .info()
        .and_then(|i| i.exif.as_deref())
        .map(exif::orientation)
        .unwrap_or_default();
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
        format: Format::Png,
        orientation,
    })
}
