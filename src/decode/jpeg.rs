//! JPEG (zune-jpeg): baseline and progressive, grey, YCbCr at any
//! subsampling, CMYK and YCCK (Adobe), restart markers; the EXIF orientation.

use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use super::{check_size, decode_packed, exif, DecodeError, Decoded, Format, Layout};

pub(super) fn decode(
    bytes: &[u8],
    rgb: &mut [u8],
    max_width: u32,
    max_height: u32,
    corrupt: impl Fn(String) -> DecodeError,
) -> Result<Decoded, DecodeError> {
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true)
        // Let the header through so an over-size image is reported with its size.
        .set_max_width(1 << 16)
        .set_max_height(1 << 16);
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    dec.decode_headers().map_err(|e| corrupt(e.to_string()))?;
    let (width, height) = dec.dimensions().ok_or_else(|| corrupt("no frame header".into()))?;
    check_size(width, height, max_width, max_height)?;
    let need = dec.output_buffer_size();
    decode_packed(rgb, (width, height), (Layout::Rgb, 1), need, |out| {
        dec.decode_into(out).map_err(|e| e.to_string())
    })
    .map_err(&corrupt)?;
    let orientation = dec.exif().map(|e| exif::orientation(e)).unwrap_or_default();
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
        format: Format::Jpeg,
        orientation,
    })
}
