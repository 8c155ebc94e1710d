//! JPEG header handling and decoding into a fixed buffer never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rgb = vec![0u8; 256 * 256 * 3];
    let _ = ai_edge_inference::decode::decode_into(data, &mut rgb, 256, 256);
});
