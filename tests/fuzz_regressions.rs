//! Every input the fuzz targets ever crashed on (`fuzz/regressions/<target>/`),
//! run through the same entry points: each must now give a result or a reason.
#![cfg(feature = "candle")]

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn model_weights_regressions_are_refused_with_a_reason() {
    let cases = inputs("model_weights");
    assert!(!cases.is_empty());
    for (name, bytes) in cases {
        for kind in ["pth", "safetensors"] {
            let r = ai_edge_inference::backend::compile_untrusted(kind, &bytes);
            assert!(r.as_ref().is_err_and(|e| !e.is_empty()), "{name} as {kind}: {r:?}");
        }
    }
}

#[test]
#[cfg(feature = "candle-graph")]
fn model_onnx_regressions_are_refused_with_a_reason() {
    let cases = inputs("model_onnx");
    assert!(!cases.is_empty());
    for (name, bytes) in cases {
        for kind in ["onnx-graph", "onnx"] {
            let r = ai_edge_inference::backend::compile_untrusted(kind, &bytes);
            assert!(r.is_err(), "{name} as {kind}: {r:?}");
        }
    }
}

/// Model-config YAML: what `check-config` prints for a config that parses parses back to it
/// (the `model_config` target's property). The first case: an input filter whose `{name}`
/// levels sit where no well-known name does, which `check-config` printed as bare `+`.
#[test]
fn model_config_regressions_round_trip_through_check_config() {
    use ai_edge_inference::config::{model, Settings};
    let cases = inputs("model_config");
    assert!(!cases.is_empty());
    let settings = Settings::from_env_and_args(|_| None, &[]).unwrap().0;
    let at = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fuzz.yaml");
    for (name, bytes) in cases {
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        if let Ok(c) = model::parse(text, &at, &settings) {
            let described = model::describe(&c);
            let back = model::parse(&described, &at, &settings)
                .unwrap_or_else(|e| panic!("{name}: check-config output does not parse: {e}\n{described}"));
            assert_eq!(
                back, c,
                "{name}: check-config output parses to another config:\n{described}"
            );
        }
    }
}
