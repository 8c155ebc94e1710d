//! Envelope detection, JSON scanning and base64 decoding never panic, and
//! whatever they accept round-trips into a result that is valid JSON; sensor
//! readings parse, or are refused with a reason, and a window never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

use ai_edge_inference::config::model::{Sensor, SensorScore};
use ai_edge_inference::sensor;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = ai_edge_inference::envelope::parse(data) {
        if let ai_edge_inference::envelope::Image::Base64 { text, escaped } = env.image {
            let mut scratch = Vec::new();
            let mut out = vec![0u8; data.len()];
            let _ = ai_edge_inference::envelope::decode_base64(text, escaped, &mut scratch, &mut out);
        }
    }
    let s = Sensor {
        fields: vec!["temperature".into(), "vibration".into(), "current".into()],
        mean: vec![60.0, 2.0, 7.0],
        std: vec![3.6, 0.3, 1.8],
        window: 4,
        score: SensorScore::ReconstructionError,
        threshold: 0.1,
        max_devices: 4,
        device_timeout_s: 600,
    };
    let _ = sensor::looks_like_reading(data);
    let mut row = [0f32; 3];
    if let Ok(r) = sensor::parse(data, &s, &mut row) {
        assert!(row.iter().all(|v| v.is_finite()), "{row:?}");
        let mut w = sensor::Windows::new(&s);
        let mut out = Vec::new();
        let now = std::time::Instant::now();
        for _ in 0..5 {
            let _ = w.push(r.device_id.unwrap_or(""), r.timestamp, &row, now, &mut out);
        }
    }
});
