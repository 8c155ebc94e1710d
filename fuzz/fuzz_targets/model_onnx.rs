//! ONNX model files (protobuf, graph, initializers) never panic the loaders:
//! compiled as a Candle graph and read as EfficientNet-Lite weights.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ai_edge_inference::backend::compile_untrusted("onnx-graph", data);
    let _ = ai_edge_inference::backend::compile_untrusted("onnx", data);
});
