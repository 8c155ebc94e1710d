//! Deterministic mutation testing of everything that comes from outside:
//! real envelopes and JPEGs with bytes flipped, cut, duplicated or spliced
//! go through ingest and processing; each must be answered exactly once
//! (a result or an error result with a known code) and nothing may panic.

use ai_edge_inference::backend::BackendEnv;
use ai_edge_inference::config::model;
use ai_edge_inference::config::Settings;
use ai_edge_inference::frame::{Limits, Origin, Slot};
use ai_edge_inference::ingest;
use ai_edge_inference::metrics::{FailReason, Metrics, Refusal};
use ai_edge_inference::models::Models;
use ai_edge_inference::process::{self, Ctx, Emitted};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len());
        match rng.below(6) {
            0 => {
                let i = at.min(v.len().saturating_sub(1));
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.truncate(at),
            2 => {
                let n = rng.below(64).min(v.len() - at);
                let chunk = v[at..at + n].to_vec();
                v.splice(at..at, chunk);
            }
            3 => {
                if !v.is_empty() {
                    let i = at.min(v.len() - 1);
                    let set = b"{}[]\":,\\/0\x00\xff";
                    v[i] = set[rng.below(set.len())];
                }
            }
            4 => v.drain(at..(at + rng.below(32)).min(v.len())).for_each(drop),
            _ => {
                // A run of zeroed bytes (a camera's broken transfer).
                let end = (at + rng.below(512)).min(v.len());
                v[at..end].iter_mut().for_each(|b| *b = 0);
            }
        }
        if v.is_empty() {
            break;
        }
    }
    v
}

#[test]
fn mutated_envelopes_and_jpegs_are_each_answered_once_without_panicking() {
    let settings = Settings::from_env_and_args(|_| None, &[]).unwrap().0;
    let cfg = model::builtin_camera_health(&settings).unwrap();
    let models = Models::load(vec![cfg], &BackendEnv::default());
    let metrics = Metrics::default();
    let limits = Limits {
        max_payload: 1 << 20,
        max_width: 1024,
        max_height: 1024,
        max_tensor: 0,
        max_input_width: 0,
        max_picture: 0,
    };
    let mut slot = Slot::new(&limits);
    let ctx = Ctx {
        models: &models,
        metrics: &metrics,
        max_width: 1024,
        max_height: 1024,
        error_topic: "errors",
    };
    let topic = "edge-ai/bu/fac/gw/camera/snapshots";

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let jpeg = std::fs::read(format!("{dir}chelsea.jpg")).unwrap();
    let progressive = std::fs::read(format!("{dir}chelsea-progressive.jpg")).unwrap();
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    };
    let seeds: Vec<Vec<u8>> = vec![
        jpeg.clone(),
        progressive,
        format!(r#"{{"device_id":"cam","timestamp":"t","image_data":"{b64}","metadata":{{"a":[1,{{"b":null}}]}}}}"#)
            .into_bytes(),
        format!(
            r#"{{"message_type":"image_snapshot","schema_version":"1.0","camera_id":"c","image_data":"{}","correlation_id":"x"}}"#,
            b64.replace('/', "\\/")
        )
        .into_bytes(),
    ];
    let codes: Vec<&str> = FailReason::ALL.iter().map(|r| r.as_str()).collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut results, mut errors) = (0, 0);
    let mut routes = Vec::new();
    for i in 0..1500 {
        let payload = mutate(&mut rng, &seeds[i % seeds.len()]);
        ingest::route(&models, topic, &mut routes);
        let mut answers: Vec<(Emitted, String)> = Vec::new();
        match ingest::admit(topic, &payload, None, limits.max_payload, &models, &routes) {
            Err(e) => {
                let mut buf = Vec::new();
                ingest::write_early_error(&mut buf, topic, &payload, false, &e);
                answers.push((
                    Emitted::Error(Refusal::Failed(e.reason)),
                    String::from_utf8(buf).unwrap(),
                ));
            }
            Ok(a) => {
                slot.reset();
                slot.routes.extend_from_slice(&routes);
                let mut collect = |s: &Slot, k| answers.push((k, String::from_utf8(s.out.clone()).unwrap()));
                match ingest::fill(&mut slot, topic, &payload, &a, Origin::Mqtt) {
                    Ok(()) => process::process(&mut slot, &ctx, &mut collect),
                    Err(e) => process::fail(&mut slot, &ctx, &e, &mut collect),
                }
            }
        }
        assert_eq!(answers.len(), 1, "mutation {i} must be answered exactly once");
        let (kind, body) = &answers[0];
        let v: miniserde::json::Value = miniserde::json::from_str(body)
            .unwrap_or_else(|e| panic!("mutation {i}: invalid JSON out ({e:?}): {body}"));
        let miniserde::json::Value::Object(o) = v else {
            panic!("not an object")
        };
        match kind {
            Emitted::Result => results += 1,
            Emitted::Comparison | Emitted::Alert | Emitted::Picture | Emitted::AlertPicture => {
                panic!("camera health publishes no comparisons, alerts or pictures")
            }
            Emitted::Error(_) => {
                errors += 1;
                let Some(miniserde::json::Value::String(code)) = o.get("error") else {
                    panic!("{body}")
                };
                assert!(codes.contains(&code.as_str()), "unknown error code {code}");
            }
        }
    }
    // Both outcomes were exercised.
    assert!(results > 50 && errors > 50, "results {results}, errors {errors}");
}
