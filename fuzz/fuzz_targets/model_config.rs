//! Model-config YAML never panics the parser, and what `check-config` prints
//! for a config that parses is a config that parses back to the same one.
#![no_main]

use std::path::Path;

use ai_edge_inference::config::{model, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let settings = Settings::from_env_and_args(|_| None, &[]).expect("default settings").0;
    // Labels files resolve against the repository's models directory.
    let at = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/fuzz.yaml"));
    if let Ok(c) = model::parse(text, at, &settings) {
        let described = model::describe(&c);
        let back = model::parse(&described, at, &settings)
            .unwrap_or_else(|e| panic!("check-config output does not parse: {e}\n{described}"));
        assert_eq!(back, c, "check-config output parses to another config:\n{described}");
    }
});
