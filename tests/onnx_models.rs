//! The ONNX Runtime backend on real models and photos (needs `bash models/fetch`;
//! `tests/run --features onnx` runs it first). Compares against onnxruntime's
//! Python API on the very same tensors (tests/reference/, made by
//! models/make_reference.py), checks bad model files, and runs detections end
//! to end through mosquitto.
#![cfg(feature = "onnx")]

mod support;

use ai_edge_inference::backend::{Backend as _, BackendEnv, Engine, Outputs};
use ai_edge_inference::config::model::{self, ModelConfig};
use ai_edge_inference::frame::{Limits, Slot};
use ai_edge_inference::metrics::Metrics;
use ai_edge_inference::models::Models;
use ai_edge_inference::pipeline;
use ai_edge_inference::process::{Ctx, Emitted};
use ai_edge_inference::{decode, preprocess};
use miniserde::json::Value;
use support::*;

#[global_allocator]
static ALLOC: ai_edge_inference::alloc_count::CountingAlloc = ai_edge_inference::alloc_count::CountingAlloc;

fn allocs_during(f: impl FnOnce()) -> u64 {
    let (a, _) = ai_edge_inference::alloc_count::snapshot();
    f();
    ai_edge_inference::alloc_count::snapshot().0 - a
}

/// The backend settings, insisting the ONNX Runtime library was fetched.
fn env() -> BackendEnv {
    let lib = ort_library();
    assert!(
        lib.exists(),
        "{} is missing: run `bash models/fetch` (tests/run does)",
        lib.display()
    );
    BackendEnv { ort_library: Some(lib) }
}

fn config(name: &str) -> ModelConfig {
    let c = model::load_file(&root().join("models").join(format!("{name}.yaml")), &settings()).unwrap();
    assert!(
        c.model_path.as_ref().unwrap().exists(),
        "{name}: run `bash models/fetch` first"
    );
    c
}

/// Runs each photo through `models` once, as the service does; returns the parsed results.
fn run_photos(models: &Models, photos: &[&str]) -> Vec<Value> {
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
            let (body, kind) = pipeline::run_oneshot(&mut slot, &ctx, 1 << 22, 0, p, &fixture(p)).swap_remove(0);
            let text = String::from_utf8(body).unwrap();
            assert_eq!(kind, Emitted::Result, "{text}");
            miniserde::json::from_str(&text).unwrap()
        })
        .collect()
}

fn predictions(v: &Value) -> Vec<(String, f64, Option<Vec<f64>>)> {
    let Some(Value::Array(a)) = get(v, &["predictions"]) else {
        panic!("no predictions")
    };
    a.iter()
        .map(|p| {
            let bbox = match get(p, &["bbox"]) {
                Some(Value::Array(b)) => Some(b.iter().map(num).collect()),
                _ => None,
            };
            (
                get_str(p, &["label"]).unwrap(),
                num(get(p, &["confidence"]).unwrap()),
                bbox,
            )
        })
        .collect()
}

#[test]
fn efficientnet_lite0_classifies_the_photos() {
    let models = Models::load(vec![config("efficientnet-lite0")], &env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    assert_eq!(models.list[0].provider, "cpu");
    let results = run_photos(&models, &["coffee.jpg", "chelsea.jpg"]);
    let coffee = predictions(&results[0]);
    assert_eq!(coffee[0].0, "espresso", "{coffee:?}");
    assert!(coffee[0].1 > 0.9, "{coffee:?}");
    assert_eq!(coffee.len(), 5, "top-5");
    let cat = predictions(&results[1]);
    assert!(
        ["tiger cat", "Egyptian cat", "tabby"].contains(&cat[0].0.as_str()),
        "{cat:?}"
    );
    assert_eq!(get_bool(&results[1], &["metadata", "alert_triggered"]), Some(false));
}

#[test]
fn yolov12n_finds_the_person_the_cat_and_the_cup_in_image_pixels() {
    let models = Models::load(vec![config("yolov12n")], &env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    let results = run_photos(&models, &["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]);

    // astronaut.jpg is 512x512; the astronaut fills its height and the left three quarters.
    let people: Vec<_> = predictions(&results[0])
        .into_iter()
        .filter(|p| p.0 == "person" && p.1 > 0.5)
        .collect();
    assert_eq!(people.len(), 1, "{:?}", predictions(&results[0]));
    let b = people[0].2.clone().unwrap();
    assert!(
        b[0] < 60.0 && b[1] < 60.0 && (300.0..=450.0).contains(&b[2]) && b[3] > 450.0,
        "{b:?}"
    );
    assert!(
        b.iter().all(|v| (0.0..=512.0).contains(v)),
        "boxes are in original-image pixels: {b:?}"
    );
    assert_eq!(
        get_bool(&results[0], &["metadata", "alert_triggered"]),
        Some(true),
        "person alert"
    );

    // chelsea.jpg is 451x300: the cat box spans most of it (letterbox padding undone).
    let cats: Vec<_> = predictions(&results[1])
        .into_iter()
        .filter(|p| p.0 == "cat" && p.1 > 0.5)
        .collect();
    assert_eq!(cats.len(), 1, "{:?}", predictions(&results[1]));
    let b = cats[0].2.clone().unwrap();
    assert!(
        b[2] - b[0] > 300.0 && b[3] - b[1] > 200.0 && b[2] <= 451.0 && b[3] <= 300.0,
        "{b:?}"
    );

    assert!(
        predictions(&results[2]).iter().any(|p| p.0 == "cup" && p.1 > 0.5),
        "{:?}",
        predictions(&results[2])
    );
    assert!(num(get(&results[2], &["metadata", "total_objects_detected"]).unwrap()) >= 1.0);
}

#[test]
fn outputs_match_python_onnxruntime_on_the_same_tensor() {
    let text = std::fs::read_to_string(root().join("tests/reference/onnx_outputs.json")).unwrap();
    let reference: Value = miniserde::json::from_str(&text).unwrap();
    let Some(Value::Array(entries)) = get(&reference, &["entries"]) else {
        panic!()
    };
    let env = env();
    let mut engines: Vec<(String, ModelConfig, Engine)> = Vec::new();
    let mut rgb = vec![0u8; 2560 * 1440 * 3];
    let mut out = Outputs::default();
    let mut worst: f64 = 0.0;
    for e in entries {
        let name = get_str(e, &["model"]).unwrap();
        let photo = get_str(e, &["photo"]).unwrap();
        if !engines.iter().any(|(n, ..)| *n == name) {
            let c = config(&name);
            let engine = Engine::load_as(c.backend, c.model_path.as_deref().unwrap(), &c, &env).unwrap();
            engines.push((name.clone(), c, engine));
        }
        let (_, c, engine) = engines.iter_mut().find(|(n, ..)| *n == name).unwrap();
        let p = &c.preprocessing;
        let d = decode::decode_into(&fixture(&photo), &mut rgb, 2560, 1440).unwrap();
        let mut tensor = vec![0f32; preprocess::tensor_len(p)];
        let g = preprocess::Geometry::new(d.width, d.height, p);
        preprocess::preprocess_into(
            &rgb,
            &g,
            p,
            &mut preprocess::Scratch::with_capacity(p.width as usize),
            &mut tensor,
        );
        let sum: f64 = tensor.iter().map(|v| *v as f64).sum();
        let want_sum = num(get(e, &["tensor_sum"]).unwrap());
        assert!(
            (sum - want_sum).abs() <= 1e-6 * want_sum.abs().max(1.0),
            "{name}/{photo}: the tensor differs from the one the reference was made from ({sum} vs {want_sum}); \
             rerun models/make_reference.py if preprocessing changed on purpose"
        );
        engine.infer(&tensor, &mut out).unwrap();
        let Some(Value::Array(shape)) = get(e, &["output_shape"]) else {
            panic!()
        };
        assert_eq!(out.shape, shape.iter().map(|v| num(v) as usize).collect::<Vec<_>>());
        let (Some(Value::Array(idx)), Some(Value::Array(vals))) = (get(e, &["indices"]), get(e, &["values"])) else {
            panic!()
        };
        assert!(!idx.is_empty());
        for (i, v) in idx.iter().zip(vals) {
            let (got, want) = (out.values[num(i) as usize] as f64, num(v));
            let diff = (got - want).abs() / want.abs().max(1.0);
            worst = worst.max(diff);
            assert!(
                diff < 1e-4,
                "{name}/{photo} output[{}]: {got} vs onnxruntime-python {want}",
                num(i)
            );
        }
    }
    assert_eq!(entries.len(), 6);
    println!("largest relative difference to onnxruntime-python: {worst:e}");
}

#[test]
fn bad_model_files_are_refused_and_the_good_model_keeps_serving() {
    let dir = TempDir::new("badmodels");
    let yolo = config("yolov12n").model_path.unwrap();
    let bytes = std::fs::read(&yolo).unwrap();
    std::fs::write(dir.0.join("truncated.onnx"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(dir.0.join("photo.onnx"), fixture("chelsea.jpg")).unwrap();
    let cfg = |name: &str, path: &str, extra: &str| {
        let p = dir.write(
            &format!("{name}.yaml"),
            &format!("name: {name}\nbackend: onnx\nmodel_type: object-detection\nmodel_path: {path}\n{extra}"),
        );
        model::load_file(&p, &settings()).unwrap()
    };
    let rank2 = root().join("tests/fixtures/rank2-identity.onnx");
    let configs = vec![
        cfg("missing", "nowhere.onnx", ""),
        cfg("truncated", "truncated.onnx", ""),
        cfg("not-onnx", "photo.onnx", ""),
        cfg("rank2", rank2.to_str().unwrap(), ""),
        cfg(
            "wrong-size",
            yolo.to_str().unwrap(),
            "preprocessing: { resize: [320, 320] }\n",
        ),
        cfg("wrong-labels", yolo.to_str().unwrap(), "labels: [a, b, c]\n"),
        cfg(
            "cuda-only",
            yolo.to_str().unwrap(),
            "inference: { execution_providers: [cuda] }\n",
        ),
        config("yolov12n"),
    ];
    let models = Models::load(configs, &env());
    let errors: Vec<(String, String)> = models.failed.iter().map(|f| (f.model.clone(), f.to_string())).collect();
    let expect = [
        ("missing", "does not exist"),
        ("truncated", "truncated.onnx"),
        ("not-onnx", "photo.onnx"),
        ("rank2", "has shape [1, 10]"),
        ("wrong-size", "[1, 3, 640, 640]"),
        ("wrong-labels", "does not fit 3 labels"),
        ("cuda-only", "none of the execution providers"),
    ];
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    for ((model, msg), (want_model, want)) in errors.iter().zip(expect) {
        assert_eq!(model, want_model);
        assert!(msg.contains(want), "{model}: {msg}");
    }
    assert!(
        errors[4].1.contains("[1, 3, 320, 320]"),
        "names both shapes: {}",
        errors[4].1
    );
    // The good model still loads and answers, and readiness reports the failures.
    assert_eq!(models.list.len(), 1);
    assert!(!models.all_ready());
    assert!(models
        .summary()
        .iter()
        .any(|s| s.name == "rank2" && s.error.is_some() && !s.ready));
    let r = run_photos(&models, &["astronaut.jpg"]);
    assert!(predictions(&r[0]).iter().any(|p| p.0 == "person"));
}

#[test]
fn a_missing_library_is_a_clear_startup_error() {
    let out = binary()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.99.0")
        .env("MODEL_CONFIG_PATH", root().join("models/yolov12n.yaml"))
        .env("HTTP_ADDR", "")
        .env("AIO_BROKER_HOSTNAME", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/libonnxruntime.so.1.99.0 (no such file)"),
        "{err}"
    );
    assert!(err.contains("ORT_DYLIB_PATH"), "{err}");

    // A file that is not a library: the loader's own reason.
    let out = binary()
        .env("ORT_DYLIB_PATH", root().join("tests/fixtures/chelsea.jpg"))
        .env("MODEL_CONFIG_PATH", root().join("models/yolov12n.yaml"))
        .env("HTTP_ADDR", "")
        .env("AIO_BROKER_HOSTNAME", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chelsea.jpg (failed to load"), "{err}");
}

#[test]
fn detections_end_to_end_through_mosquitto_in_every_payload_form() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let lib = ort_library();
    let models = root().join("models/yolov12n.yaml");
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("MODEL_CONFIG_PATH", models.to_str().unwrap()),
        ("ORT_DYLIB_PATH", lib.to_str().unwrap()),
    ]);
    let out = "edge-ai/acme/plant-1/gw-1/ai/inference/vision";
    let peer = Peer::connect(broker.port, &[out]);
    svc.wait_ready();
    let topic = "edge-ai/acme/plant-1/gw-1/camera/snapshots";
    let b64 = |f: &str| base64(&fixture(f));
    peer.publish(
        topic,
        format!(
            r#"{{"device_id":"cam-design","timestamp":"t","image_data":"{}"}}"#,
            b64("astronaut.jpg")
        )
        .into_bytes(),
    );
    peer.publish(
        topic,
        format!(
            r#"{{"message_type":"image_snapshot","schema_version":"1.0","camera_id":"cam-snap","image_data":"{}","correlation_id":"c1"}}"#,
            b64("chelsea.jpg")
        )
        .into_bytes(),
    );
    peer.publish(topic, fixture("coffee.jpg"));
    let got = peer.wait_until("three detection results", |m| m.len() >= 3);
    let by_device = |d: &str| {
        let m = got
            .iter()
            .find(|m| get_str(&m.json(), &["device_id"]).as_deref() == Some(d))
            .unwrap();
        let v = m.json();
        assert_eq!(get_str(&v, &["message_type"]).as_deref(), Some("ai_inference_result"));
        assert_eq!(get_str(&v, &["backend_used"]).as_deref(), Some("onnx"));
        predictions(&v).into_iter().map(|p| p.0).collect::<Vec<_>>()
    };
    assert!(by_device("cam-design").contains(&"person".to_owned()));
    assert!(by_device("cam-snap").contains(&"cat".to_owned()));
    assert!(by_device(topic).contains(&"cup".to_owned()));
    let (_, ready) = svc.get("/readyz");
    assert!(ready.contains("\"provider\":\"cpu\""), "{ready}");
    assert!(svc.get("/metrics").1.contains("provider=\"cpu\",device=\"cpu\"} 1"));
    assert!(svc.still_running());
}

#[test]
fn dynamic_axes_take_the_configured_size() {
    // [batch, 3, height, width] all dynamic but channels: global average pooling = mean R, G, B.
    let dir = TempDir::new("dynamic");
    let gap = root().join("tests/fixtures/dynamic-gap.onnx");
    let cfg = dir.write(
        "gap.yaml",
        &format!(
            "name: gap\nbackend: onnx\nmodel_type: image-classification\nmodel_path: {}\nlabels: [red, green, blue]\n\
             preprocessing: {{ resize: [96, 64], mode: stretch, normalize: true }}\ninference: {{ softmax: false, top_k: 3, confidence_threshold: 0.0 }}\n",
            gap.display()
        ),
    );
    let models = Models::load(vec![model::load_file(&cfg, &settings()).unwrap()], &env());
    assert!(models.failed.is_empty(), "{:?}", models.failed);
    // coffee.jpg: a red-brown table; the mean red exceeds the mean blue.
    let r = run_photos(&models, &["coffee.jpg"]);
    let p = predictions(&r[0]);
    assert_eq!(p.len(), 3);
    let value = |l: &str| p.iter().find(|x| x.0 == l).unwrap().1;
    assert!(value("red") > value("blue"), "{p:?}");
    assert!(p.iter().all(|x| (0.0..=1.0).contains(&x.1)), "{p:?}");
}

#[test]
fn a_detection_frame_allocates_only_in_the_decoder_and_ort() {
    use ai_edge_inference::frame::Origin;
    use ai_edge_inference::ingest;
    use ai_edge_inference::models::Runner;

    let models = Models::load(vec![config("yolov12n")], &env());
    let metrics = Metrics::default();
    let limits = Limits::for_models(&models, 1 << 20, 1024, 1024);
    let mut slot = Slot::new(&limits);
    let ctx = Ctx {
        models: &models,
        metrics: &metrics,
        max_width: 1024,
        max_height: 1024,
        error_topic: "e",
    };
    let jpeg = fixture("astronaut.jpg");
    let topic = "edge-ai/a/b/c/camera/snapshots";
    let mut routes = Vec::with_capacity(4);
    let mut frame = |slot: &mut Slot| {
        ingest::route(&models, topic, &mut routes);
        let a = ingest::admit(topic, &jpeg, None, limits.max_payload, &models, &routes).unwrap();
        slot.reset();
        slot.routes.extend_from_slice(&routes);
        ingest::fill(slot, topic, &jpeg, &a, Origin::Mqtt).unwrap();
        allocs_during(|| {
            ai_edge_inference::process::process(slot, &ctx, |s, k| {
                assert_eq!(k, Emitted::Result, "{}", String::from_utf8_lossy(&s.out))
            })
        })
    };
    frame(&mut slot);
    let mut rgb = vec![0u8; 1024 * 1024 * 3];
    let decoder = allocs_during(|| {
        decode::decode_into(&jpeg, &mut rgb, 1024, 1024).unwrap();
    });
    let Runner::Ml(ml) = &models.list[0].runner else {
        panic!()
    };
    let n = preprocess::tensor_len(&models.list[0].config.preprocessing);
    let ort_run = {
        let mut ml = ml.lock();
        let ml = &mut *ml;
        let tensor = slot.tensor[..n].to_vec();
        allocs_during(|| ml.primary.engine.infer(&tensor, &mut ml.primary.outputs).unwrap())
    };
    for _ in 0..3 {
        assert_eq!(
            frame(&mut slot),
            decoder + ort_run,
            "decode ({decoder}) + ONNX Runtime's run ({ort_run}) are the only allocations of a detection frame"
        );
    }
}
