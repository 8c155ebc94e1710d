//! One test body, every compiled backend (as candle's `test_device!`), plus
//! Candle-vs-ONNX-Runtime agreement on the same weights and dual mode end to
//! end through mosquitto. The ONNX Runtime parts need `bash models/fetch`
//! (tests/run does it for onnx and dual builds).
// A minimal build has no ML backend: only the last test runs there.
#![cfg_attr(not(any(feature = "candle", feature = "onnx")), allow(dead_code, unused_imports))]

mod support;

use ai_edge_inference::config::model::{self, ModelConfig};
use ai_edge_inference::frame::{Limits, Slot};
use ai_edge_inference::metrics::Metrics;
use ai_edge_inference::models::Models;
use ai_edge_inference::pipeline;
use ai_edge_inference::process::{Ctx, Emitted};
use miniserde::json::Value;
use support::*;

/// EfficientNet-Lite0 on `backend`: Candle reads the bundled f16 safetensors
/// (no fetch needed), ONNX Runtime the fetched ONNX graph of the same weights.
fn efficientnet_on(backend: &str) -> ModelConfig {
    let file = match backend {
        "candle" => "efficientnet-lite0-candle.yaml",
        _ => "efficientnet-lite0.yaml",
    };
    let c = model::load_file(&root().join("models").join(file), &settings()).unwrap();
    assert_eq!(c.backend.as_str(), backend);
    c
}

/// Every message each photo produces through model 0, parsed.
fn run(models: &Models, photos: &[&str]) -> Vec<Vec<(Emitted, Value)>> {
    let metrics = Metrics::default();
    let limits = Limits::for_models(models, 1 << 22, 2560, 1440);
    let mut slot = Slot::new(&limits);
    let ctx = Ctx {
        models,
        metrics: &metrics,
        max_width: 2560,
        max_height: 1440,
        error_topic: "e",
    };
    photos
        .iter()
        .map(|p| {
            pipeline::run_oneshot(&mut slot, &ctx, 1 << 22, 0, p, &fixture(p))
                .into_iter()
                .map(|(body, kind)| {
                    (
                        kind,
                        miniserde::json::from_str(std::str::from_utf8(&body).unwrap()).unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

fn top(v: &Value) -> (String, f64) {
    let Some(Value::Array(p)) = get(v, &["predictions"]) else {
        panic!("no predictions in {v:?}")
    };
    (
        get_str(&p[0], &["label"]).unwrap(),
        num(get(&p[0], &["confidence"]).unwrap()),
    )
}

/// YOLOv12n (ONNX) on `backend`: ONNX Runtime, or Candle through the graph plan.
#[cfg(any(feature = "candle-graph", feature = "onnx"))]
fn yolo_on(backend: &str) -> ModelConfig {
    let mut c = model::load_file(&root().join("models/yolov12n.yaml"), &settings()).unwrap();
    if backend == "candle" {
        c.backend = model::BackendKind::Candle;
    }
    assert!(c.model_path.as_ref().unwrap().exists(), "run `bash models/fetch` first");
    c
}

/// Generates one `#[test]` per compiled backend from one body (`graph`:
/// the Candle arm needs ONNX graphs on Candle).
macro_rules! on_every_backend {
    (graph $name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[cfg(feature = "candle-graph")]
            #[test]
            fn candle() {
                ($body)("candle")
            }
            #[cfg(feature = "onnx")]
            #[test]
            fn onnx() {
                ($body)("onnx")
            }
        }
    };
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[cfg(feature = "candle")]
            #[test]
            fn candle() {
                ($body)("candle")
            }
            #[cfg(feature = "onnx")]
            #[test]
            fn onnx() {
                ($body)("onnx")
            }
        }
    };
}

on_every_backend!(efficientnet_lite0_names_the_photos, |backend: &str| {
    let models = Models::load(vec![efficientnet_on(backend)], &backend_env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    let out = run(&models, &["coffee.jpg", "chelsea.jpg"]);
    let (coffee, chelsea) = (&out[0][0], &out[1][0]);
    assert_eq!(coffee.0, Emitted::Result);
    assert_eq!(get_str(&coffee.1, &["backend_used"]).as_deref(), Some(backend));
    let (label, p) = top(&coffee.1);
    assert_eq!(label, "espresso");
    assert!(p > 0.9, "{p}");
    assert!(["tiger cat", "Egyptian cat", "tabby"].contains(&top(&chelsea.1).0.as_str()));
});

on_every_backend!(graph yolov12n_finds_the_person_the_cat_and_the_cup, |backend: &str| {
    let models = Models::load(vec![yolo_on(backend)], &backend_env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    let out = run(&models, &["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]);
    let labels = |v: &Value| -> Vec<(String, f64, Vec<f64>)> {
        let Some(Value::Array(p)) = get(v, &["predictions"]) else { panic!() };
        p.iter()
            .map(|x| {
                let Some(Value::Array(b)) = get(x, &["bbox"]) else { panic!() };
                (get_str(x, &["label"]).unwrap(), num(get(x, &["confidence"]).unwrap()), b.iter().map(num).collect())
            })
            .collect()
    };
    for (msgs, want) in out.iter().zip(["person", "cat", "cup"]) {
        let v = &msgs[0].1;
        assert_eq!(get_str(v, &["backend_used"]).as_deref(), Some(backend));
        let found = labels(v);
        assert!(found.iter().any(|(l, c, _)| l == want && *c > 0.5), "{want}: {found:?}");
    }
    // The astronaut's box, in original pixels (512x512): the left three quarters, full height.
    let person = labels(&out[0][0].1).into_iter().find(|p| p.0 == "person").unwrap().2;
    assert!(person[0] < 60.0 && person[1] < 60.0 && (300.0..=450.0).contains(&person[2]) && person[3] > 450.0);
});

/// YOLOv12n: Candle's graph plan against ONNX Runtime on the same graph and
/// tensor, through dual mode: every detection above 0.25 matched one to one
/// by class with IoU >= 0.9.
#[cfg(all(feature = "candle-graph", feature = "onnx"))]
#[test]
fn yolov12n_on_candle_matches_onnx_runtime() {
    let c = model::load_file(&root().join("models/yolov12n-dual.yaml"), &settings()).unwrap();
    let models = Models::load(vec![c], &backend_env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    let photos = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"];
    for (photo, msgs) in photos.iter().zip(run(&models, &photos)) {
        let cmp = &msgs[1].1;
        assert_eq!(msgs[1].0, Emitted::Comparison);
        assert_eq!(get_bool(cmp, &["predictions_match"]), Some(true), "{photo}: {cmp:?}");
        let count = |b: &str| match get(cmp, &["backends", b, "predictions"]) {
            Some(Value::Array(p)) => p.len(),
            _ => panic!("{cmp:?}"),
        };
        assert!(count("candle") >= 1 && count("candle") == count("onnx"), "{photo}");
    }
}

/// Candle on the fetched f32 weights against ONNX Runtime on the same weights,
/// through dual mode: same top-1 on every photo and every probability within
/// 1e-3, as the comparison reports and as checked here from both results.
#[cfg(all(feature = "candle", feature = "onnx"))]
#[test]
fn candle_and_onnx_runtime_agree_on_every_photo_in_dual_mode() {
    let c = model::load_file(&root().join("models/efficientnet-lite0-dual.yaml"), &settings()).unwrap();
    assert_eq!(c.backend, model::BackendKind::Dual);
    let models = Models::load(vec![c], &backend_env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    assert_eq!(models.list[0].provider, "cpu+cpu");
    let photos = [
        "astronaut.jpg",
        "chelsea.jpg",
        "coffee.jpg",
        "rocket-1080p.jpg",
        "camera-gray.jpg",
    ];
    for (photo, msgs) in photos.iter().zip(run(&models, &photos)) {
        assert_eq!(msgs.len(), 2, "{photo}: a result and a comparison");
        assert_eq!(msgs[0].0, Emitted::Result);
        assert_eq!(msgs[1].0, Emitted::Comparison);
        let cmp = &msgs[1].1;
        assert_eq!(
            get_str(cmp, &["message_type"]).as_deref(),
            Some("dual_backend_comparison")
        );
        assert_eq!(get_bool(cmp, &["predictions_match"]), Some(true), "{photo}: {cmp:?}");
        let side = |b: &str| {
            let Some(Value::Array(p)) = get(cmp, &["backends", b, "predictions"]) else {
                panic!("{cmp:?}")
            };
            p.iter()
                .map(|x| (get_str(x, &["label"]).unwrap(), num(get(x, &["confidence"]).unwrap())))
                .collect::<Vec<_>>()
        };
        let (candle, onnx) = (side("candle"), side("onnx"));
        assert_eq!(candle[0].0, onnx[0].0, "{photo}: top-1");
        for ((lc, pc), (lo, po)) in candle.iter().zip(&onnx) {
            assert_eq!(lc, lo, "{photo}: top-5 order");
            assert!((pc - po).abs() <= 1e-3, "{photo}: {lc} {pc} vs {po}");
        }
        assert!(num(get(cmp, &["backends", "candle", "inference_time_ms"]).unwrap()) > 0.0);
        let faster = get_str(cmp, &["performance_delta", "faster_backend"]).unwrap();
        assert!(faster == "candle" || faster == "onnx");
        assert_eq!(top(&msgs[0].1).0, candle[0].0, "the primary result is Candle's");
    }
}

#[cfg(all(feature = "candle", feature = "onnx"))]
#[test]
fn dual_mode_end_to_end_through_mosquitto() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let lib = ort_library();
    let cfg = root().join("models/efficientnet-lite0-dual.yaml");
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("ORT_DYLIB_PATH", lib.to_str().unwrap()),
    ]);
    let peer = Peer::connect(broker.port, &["edge-ai/acme/plant-1/gw-1/ai/#"]);
    svc.wait_ready();
    let topic = "edge-ai/acme/plant-1/gw-1/camera/snapshots";
    for photo in ["coffee.jpg", "chelsea.jpg", "astronaut.jpg"] {
        peer.publish(topic, fixture(photo));
    }
    let is_cmp = |m: &Msg| m.topic == "edge-ai/acme/plant-1/gw-1/ai/comparison";
    let got = peer.wait_until("three results and three comparisons", |m| {
        m.iter().filter(|m| is_cmp(m)).count() == 3
            && m.iter()
                .filter(|m| m.topic == "edge-ai/acme/plant-1/gw-1/ai/classification")
                .count()
                == 3
    });
    for m in got.iter().filter(|m| is_cmp(m)) {
        assert_eq!(
            get_bool(&m.json(), &["predictions_match"]),
            Some(true),
            "{}",
            String::from_utf8_lossy(&m.payload)
        );
    }
    assert_eq!(svc.metric("aei_dual_comparisons_total"), 3.0);
    assert_eq!(svc.metric("aei_dual_predictions_matched_total"), 3.0);
    assert_eq!(
        svc.metric("aei_backend_inference_seconds_count{backend=\"candle\"}"),
        3.0
    );
    assert_eq!(svc.metric("aei_backend_inference_seconds_count{backend=\"onnx\"}"), 3.0);
    assert!(svc.still_running());
}

#[test]
fn a_dual_model_without_its_onnx_side_is_refused_clearly() {
    let dir = TempDir::new("dual");
    let cfg = dir.write(
        "d.yaml",
        "name: d\nbackend: dual\nmodel_type: image-classification\nmodel_path: embedded:efficientnet-lite0\n",
    );
    let models = Models::load(vec![model::load_file(&cfg, &settings()).unwrap()], &backend_env());
    assert_eq!(models.failed.len(), 1);
    let msg = models.failed[0].to_string();
    assert!(
        msg.contains("onnx_model_path") || msg.contains("is not compiled into this build"),
        "{msg}"
    );
}
