//! BMP (zune-bmp): 1- to 8-bit palette, grey, 16/24/32-bit RGB(A),
//! bit-field masks, RLE4/RLE8, top-down and bottom-up.

use zune_bmp::BmpDecoder;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use super::{check_size, fits, pack_rgb, DecodeError, Decoded, Format, Layout};

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
    let need = fits(dec.output_buf_size(), rgb, width, height).map_err(&corrupt)?;
    if need != width * height * layout.channels() {
        return Err(corrupt(format!("unexpected output size {need} for {width}x{height}")));
    }
    dec.decode_into(&mut rgb[..need])
        .map_err(|e| corrupt(format!("{e:?}")))?;
    pack_rgb(rgb, width * height, layout);
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
        format: Format::Bmp,
        orientation: Default::default(),
    })
}
