//! Checkpoints (`.pth` zip and legacy, safetensors) never panic the loaders,
//! up to compiling EfficientNet-Lite from what they hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ai_edge_inference::backend::compile_untrusted("pth", data);
    let _ = ai_edge_inference::backend::compile_untrusted("safetensors", data);
});
