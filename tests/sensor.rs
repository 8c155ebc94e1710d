//! Sensor inference through a real mosquitto with the shipped model (`models/machine-anomaly.*`,
//! trained by `examples/train_sensor`): readings of a healthy machine and of one that overheats,
//! from the same synthetic machine the model was trained on, on Candle, ONNX Runtime and in dual
//! mode; bad readings answered with their reasons without touching the windows; a reload.
#![cfg(feature = "candle")]

mod support;

#[allow(dead_code)]
#[path = "../examples/train_sensor/data.rs"]
mod data;

use std::collections::HashMap;

use data::{Fault, Machine};
use miniserde::json::Value;
use support::*;

const TOPIC: &str = "edge-ai/acme/plant-1/gw-1/sensors/machine";
const RESULTS: &str = "edge-ai/acme/plant-1/gw-1/ai/inference/sensor";
const COMPARISONS: &str = "edge-ai/acme/plant-1/gw-1/ai/comparison";
const ERRORS: &str = "edge-ai/services/sensors/ai/errors";
const T0: u64 = 1_800_000_000;

/// The shipped config with `backend` set and the model paths made absolute.
fn config(dir: &TempDir, backend: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("models/machine-anomaly.yaml")).unwrap();
    let models = root().join("models");
    let text = text
        .replace("backend: candle", &format!("backend: {backend}"))
        .replace(
            "model_path: machine",
            &format!("model_path: {}/machine", models.display()),
        )
        .replace(
            "onnx_model_path: machine",
            &format!("onnx_model_path: {}/machine", models.display()),
        );
    dir.write("machine-anomaly.yaml", &text)
}

fn reading(device: &str, step: u64, r: [f32; 3]) -> Vec<u8> {
    format!(
        r#"{{"device_id":"{device}","timestamp":{},"temperature":{},"vibration":{},"current":{},"metadata":{{"line":"L4"}}}}"#,
        T0 + step,
        r[0],
        r[1],
        r[2]
    )
    .into_bytes()
}

fn start(backend: &str, broker: &Broker, dir: &TempDir) -> Service {
    let cfg = config(dir, backend);
    let port = broker.port.to_string();
    let ort = ort_library();
    Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "sensors"),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ("MODEL_WATCH_S", "0"),
    ])
}

/// Each device's results in reading order (workers may finish out of order).
fn by_device(msgs: &[Msg]) -> HashMap<String, Vec<Value>> {
    let mut out: HashMap<String, Vec<(f64, Value)>> = HashMap::new();
    for m in msgs.iter().filter(|m| m.topic == RESULTS) {
        let v = m.json();
        let t = num(get(&v, &["metadata", "source", "timestamp"]).unwrap());
        out.entry(get_str(&v, &["device_id"]).unwrap())
            .or_default()
            .push((t, v));
    }
    out.into_iter()
        .map(|(k, mut v)| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            (k, v.into_iter().map(|(_, v)| v).collect())
        })
        .collect()
}

/// A healthy machine and one that starts to overheat after 8 readings: 20 readings each.
/// Returns each device's scores (None while its window fills).
fn run_machines(backend: &str) -> HashMap<String, Vec<Option<f64>>> {
    let broker = Broker::start();
    let dir = TempDir::new("sensor");
    let svc = start(backend, &broker, &dir);
    let peer = Peer::connect(broker.port, &["edge-ai/#"]);
    svc.wait_ready();
    let (mut ok, mut hot) = (Machine::new(7), Machine::new(8));
    for step in 0..20u64 {
        peer.publish(TOPIC, reading("pump-ok", step, ok.reading(None)));
        let fault = (step >= 8).then(|| (Fault::Overheating, step as usize - 8));
        peer.publish(TOPIC, reading("pump-hot", step, hot.reading(fault)));
    }
    let dual = backend == "dual";
    let msgs = peer.wait_until("40 sensor results", |m| {
        m.iter().filter(|m| m.topic == RESULTS).count() == 40
            && (!dual || m.iter().filter(|m| m.topic == COMPARISONS).count() == 26)
    });
    assert!(!msgs.iter().any(|m| m.topic == ERRORS), "no errors");
    let results = by_device(&msgs);
    let mut scores = HashMap::new();
    for (device, rs) in &results {
        assert_eq!(rs.len(), 20, "{device}");
        let mut s = Vec::new();
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(
                get_str(r, &["message_type"]).as_deref(),
                Some("sensor_inference_result")
            );
            assert_eq!(get_str(r, &["model_name"]).as_deref(), Some("machine-anomaly"));
            let want_backend = if dual { "candle" } else { backend };
            assert_eq!(get_str(r, &["backend_used"]).as_deref(), Some(want_backend));
            assert_eq!(num(get(r, &["window", "readings"]).unwrap()) as usize, (i + 1).min(8));
            assert_eq!(
                get_str(r, &["metadata", "source", "form"]).as_deref(),
                Some("sensor_reading")
            );
            assert!(get(r, &["metadata", "source", "metadata", "line"]).is_some());
            let verdict = get_str(r, &["verdict"]).unwrap();
            if i < 7 {
                assert_eq!(verdict, "window_filling", "{device} #{i}");
                assert!(matches!(get(r, &["score"]), Some(Value::Null)));
                s.push(None);
            } else {
                let score = num(get(r, &["score"]).unwrap());
                let threshold = num(get(r, &["threshold"]).unwrap());
                assert_eq!(verdict, if score > threshold { "anomaly" } else { "normal" });
                assert_eq!(get_bool(r, &["alert_triggered"]), Some(score > threshold));
                s.push(Some(score));
            }
        }
        scores.insert(device.clone(), s);
    }
    let threshold = num(get(&results["pump-ok"][0], &["threshold"]).unwrap());
    let flagged = |d: &str| scores[d].iter().flatten().filter(|s| **s > threshold).count();
    assert!(flagged("pump-ok") <= 1, "a healthy machine: {:?}", scores["pump-ok"]);
    // Overheating from reading 8 on (k + 1 °C by reading 8 + k, at most 10): once a few of
    // a window's readings carry it, every window is an anomaly, scored above anything the
    // healthy machine gets.
    let hot = &scores["pump-hot"];
    assert!(
        hot[12..].iter().all(|s| s.unwrap() > threshold),
        "an overheating machine: {hot:?}"
    );
    let healthy_max = scores["pump-ok"].iter().flatten().fold(0.0f64, |a, b| a.max(*b));
    assert!(
        hot[12..].iter().all(|s| s.unwrap() > healthy_max),
        "{hot:?} vs {healthy_max}"
    );
    if dual {
        for c in msgs.iter().filter(|m| m.topic == COMPARISONS) {
            let v = c.json();
            assert_eq!(get_bool(&v, &["predictions_match"]), Some(true), "{v:?}");
            let a = num(get(&v, &["backends", "candle", "score"]).unwrap());
            let b = num(get(&v, &["backends", "onnx", "score"]).unwrap());
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "candle {a} onnx {b}");
        }
        assert_eq!(svc.metric("aei_dual_predictions_matched_total"), 26.0);
    }
    assert_eq!(svc.metric("aei_frames_received_total{form=\"sensor_reading\"}"), 40.0);
    scores
}

#[test]
fn readings_of_a_healthy_and_an_overheating_machine_on_candle() {
    run_machines("candle");
}

/// ONNX Runtime runs the same weights (the ONNX file the training wrote) to the same scores.
#[test]
#[cfg(feature = "onnx")]
fn onnx_runtime_and_dual_mode_score_the_same_windows_alike() {
    let candle = run_machines("candle");
    let onnx = run_machines("onnx");
    for (device, c) in &candle {
        for (a, b) in c.iter().zip(&onnx[device]) {
            match (a, b) {
                (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{device}: {a} vs {b}"),
                (None, None) => {}
                _ => panic!("{device}: {a:?} vs {b:?}"),
            }
        }
    }
    run_machines("dual");
}

#[test]
fn bad_readings_are_answered_with_reasons_and_leave_the_window_alone() {
    let broker = Broker::start();
    let dir = TempDir::new("sensor-bad");
    let svc = start("candle", &broker, &dir);
    let peer = Peer::connect(broker.port, &["edge-ai/#"]);
    svc.wait_ready();
    let mut m = Machine::new(11);
    for step in 0..4 {
        peer.publish(TOPIC, reading("pump-x", step, m.reading(None)));
    }
    let bad: [(&str, String); 7] = [
        (
            "missing field `current`",
            format!(
                r#"{{"device_id":"pump-x","timestamp":{},"temperature":60,"vibration":2}}"#,
                T0 + 10
            ),
        ),
        (
            "`vibration` is a string",
            format!(
                r#"{{"device_id":"pump-x","timestamp":{},"temperature":60,"vibration":"NaN","current":7}}"#,
                T0 + 10
            ),
        ),
        (
            "not a finite number",
            format!(
                r#"{{"device_id":"pump-x","timestamp":{},"temperature":1e999,"vibration":2,"current":7}}"#,
                T0 + 10
            ),
        ),
        (
            "too many fields",
            format!(
                r#"{{"device_id":"pump-x","timestamp":{},"values":[60,2,7,1]}}"#,
                T0 + 10
            ),
        ),
        (
            "repeats the timestamp",
            String::from_utf8(reading("pump-x", 3, [60.0, 2.0, 7.0])).unwrap(),
        ),
        (
            "is older than",
            String::from_utf8(reading("pump-x", 1, [60.0, 2.0, 7.0])).unwrap(),
        ),
        ("not a JSON reading", "temperature=60".to_owned()),
    ];
    for (_, text) in &bad {
        peer.publish(TOPIC, text.clone().into_bytes());
    }
    for step in 4..8 {
        peer.publish(TOPIC, reading("pump-x", step, m.reading(None)));
    }
    let msgs = peer.wait_until("8 results and 7 errors", |m| {
        m.iter().filter(|m| m.topic == RESULTS).count() == 8 && m.iter().filter(|m| m.topic == ERRORS).count() == 7
    });
    let errors: Vec<Value> = msgs.iter().filter(|m| m.topic == ERRORS).map(Msg::json).collect();
    for (why, _) in &bad {
        assert!(
            errors
                .iter()
                .any(|e| get_str(e, &["error"]).as_deref() == Some("bad_reading")
                    && get_str(e, &["reason"]).unwrap().contains(why)),
            "an error saying `{why}`: {errors:?}"
        );
    }
    assert_eq!(svc.metric("aei_frames_failed_total{reason=\"bad_reading\"}"), 7.0);
    // The bad readings joined no window: the 8th good one fills it and is scored.
    let rs = &by_device(&msgs)["pump-x"];
    assert_eq!(num(get(&rs[7], &["window", "readings"]).unwrap()), 8.0);
    assert_eq!(get_str(&rs[7], &["verdict"]).as_deref(), Some("normal"));

    // A reload works as for a picture model: the new version starts fresh windows.
    let (status, body) = http_request(svc.admin(), "POST", "/models/machine-anomaly/reload", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    peer.publish(TOPIC, reading("pump-x", 8, m.reading(None)));
    let msgs = peer.wait_until("a result after the reload", |m| {
        m.iter().filter(|m| m.topic == RESULTS).count() == 9
    });
    let rs = &by_device(&msgs)["pump-x"];
    assert_eq!(num(get(&rs[8], &["window", "readings"]).unwrap()), 1.0);
    assert_eq!(svc.metric("aei_model_reloads_total"), 1.0);
}
