//! BMP (zune-bmp): 1- to 8-bit palette, grey, 16/24/32-bit RGB(A),
//! bit-field masks, RLE4/RLE8, top-down and bottom-up.

use zune_bmp::BmpDecoder;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use super::{check_size, decode_packed, DecodeError, Decoded, Format, Layout};

pub(super) fn decode(
    bytes: &[u8],
    rgb: &mut [u8],
    max_width: u32,
    max_height: u32,
    corrupt: impl Fn(String) -> DecodeError,
) -> Result<Decoded, DecodeError> {
    let options = DecoderOptions::default().set_max_width(1 << 16).set_max_height(1 << 16);
    let mut dec = BmpDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers().map_err(|e| corrupt(format!("{e:?}")))?;
    let (width, height) = dec.dimensions().ok_or_else(|| corrupt("no header".into()))?;
    check_size(width, height, max_width, max_height)?;
    let layout = match dec.colorspace() {
        Some(ColorSpace::Luma) => Layout::Gray,
        Some(ColorSpace::RGB) => Layout::Rgb,
        Some(ColorSpace::RGBA) => Layout::Rgba,
        other => return Err(corrupt(format!("unsupported pixel format {other:?}"))),
    };
    let need = dec.output_buf_size();
    decode_packed(rgb, (width, height), (layout, 1), need, |out| {
        dec.decode_into(out).map_err(|e| format!("{e:?}"))
    })
    .map_err(&corrupt)?;
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
        format: Format::Bmp,
        orientation: Default::default(),
    })
}
