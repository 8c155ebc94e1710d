//! Image decoding (JPEG, PNG, BMP, TIFF: the header checks, every decoder, the
//! EXIF orientation) into a fixed buffer, and turning it upright, never panic.
#![no_main]

use ai_edge_inference::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rgb = vec![0u8; 256 * 256 * decode::BUFFER_BYTES_PER_PIXEL];
    let mut spare = vec![0u8; 256 * 256 * 3];
    if let Ok(mut d) = decode::decode_into(data, &mut rgb, 256, 256) {
        decode::orient(&mut rgb, &mut spare, &mut d);
        assert!(d.rgb_len() <= rgb.len());
    }
});
