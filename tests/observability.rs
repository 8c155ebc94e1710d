//! What the service tells about itself, through a real mosquitto: the status on the design's
//! topic tree (`SITE`), the periodic metrics snapshot on `ai/metrics` agreeing with `/metrics`,
//! and JSON log lines (`LOG_FORMAT=json`) that parse and carry their fields.

mod support;

use miniserde::json::Value;
use support::*;

const SITE: &str = "acme/plant-1/gw-1";
const SNAPSHOTS: &str = "edge-ai/acme/plant-1/gw-1/camera/snapshots";
const SITE_STATUS: &str = "edge-ai/acme/plant-1/gw-1/ai/status";
const SITE_METRICS: &str = "edge-ai/acme/plant-1/gw-1/ai/metrics";
const DEFAULT_STATUS: &str = "edge-ai/services/obs/ai/status";

fn n(v: &Value, path: &[&str]) -> f64 {
    num(get(v, path).unwrap_or_else(|| panic!("no {path:?} in the snapshot")))
}

/// The default model (the embedded EfficientNet-Lite0 on Candle; camera health in the minimal
/// build) answers three good frames and one corrupt one; the next snapshot on the site's
/// `ai/metrics` carries the same numbers `/metrics` and `/models` show.
#[test]
fn the_metrics_snapshot_on_the_site_topic_agrees_with_metrics_and_the_status_goes_to_both_topics() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "obs"),
        ("SITE", SITE),
        ("METRICS_INTERVAL_S", "1"),
    ]);
    let peer = Peer::connect(broker.port, &["edge-ai/#"]);
    svc.wait_ready();

    let msgs = peer.wait_until("the online status on both topics", |m| {
        [SITE_STATUS, DEFAULT_STATUS]
            .iter()
            .all(|t| m.iter().any(|m| m.topic == *t))
    });
    for t in [SITE_STATUS, DEFAULT_STATUS] {
        let s = msgs.iter().find(|m| m.topic == t).unwrap();
        assert!(s.retain, "{t}: the status is retained");
        assert_eq!(get_str(&s.json(), &["status"]).as_deref(), Some("online"), "{t}");
    }

    // A snapshot comes every second, before any frame too.
    let first = peer.wait_until("a metrics snapshot", |m| m.iter().any(|m| m.topic == SITE_METRICS));
    let first = first.iter().find(|m| m.topic == SITE_METRICS).unwrap().json();
    assert_eq!(get_str(&first, &["message_type"]).as_deref(), Some("service_metrics"));
    assert_eq!(get_str(&first, &["client_id"]).as_deref(), Some("obs"));
    assert_eq!(get_bool(&first, &["mqtt", "connected"]), Some(true));

    let jpeg = fixture("coffee.jpg");
    for _ in 0..3 {
        peer.publish(SNAPSHOTS, jpeg.clone());
    }
    peer.publish(SNAPSHOTS, jpeg[..jpeg.len() / 3].to_vec());
    wait_for("3 results and 1 error", || {
        svc.metric("aei_messages_published_total{kind=\"result\"}") == 3.0
            && svc.metric("aei_messages_published_total{kind=\"error\"}") == 1.0
    });
    let before = peer.received.lock().unwrap().len();
    let msgs = peer.wait_until("a snapshot after the frames", |m| {
        m[before..].iter().any(|m| m.topic == SITE_METRICS)
    });
    let snap = msgs[before..].iter().find(|m| m.topic == SITE_METRICS).unwrap();
    assert!(!snap.retain);
    let v = snap.json();

    assert_eq!(
        n(&v, &["frames", "answered"]),
        svc.metric("aei_messages_published_total{kind=\"result\"}")
    );
    assert_eq!(n(&v, &["frames", "answered"]), 3.0);
    assert_eq!(
        n(&v, &["frames", "errors_published"]),
        svc.metric("aei_messages_published_total{kind=\"error\"}")
    );
    assert_eq!(
        n(&v, &["frames", "failed", "corrupt_jpeg"]),
        svc.metric("aei_frames_failed_total{reason=\"corrupt_jpeg\"}")
    );
    assert_eq!(n(&v, &["frames", "failed", "corrupt_jpeg"]), 1.0);
    assert_eq!(
        n(&v, &["frames", "dropped", "superseded"]),
        svc.metric("aei_frames_dropped_total{reason=\"superseded\"}")
    );
    assert_eq!(
        n(&v, &["frames", "received", "raw_jpeg"]),
        svc.metric("aei_frames_received_total{form=\"raw_jpeg\"}")
    );
    assert_eq!(
        n(&v, &["latency_ms", "stages", "total", "count"]),
        svc.metric("aei_stage_duration_seconds_count{stage=\"total\"}")
    );
    let p50 = n(&v, &["latency_ms", "stages", "total", "p50"]);
    let p99 = n(&v, &["latency_ms", "stages", "total", "p99"]);
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
    assert_eq!(
        n(&v, &["queue", "slots"]),
        svc.metric("aei_frame_slots{state=\"free\"}") + svc.metric("aei_frame_slots{state=\"busy\"}")
    );
    assert!(n(&v, &["uptime_s"]) > 0.0);
    assert!(svc.metric("aei_uptime_seconds") >= n(&v, &["uptime_s"]));

    // The model: its version and frames as /models shows them, and its latency per backend.
    let (_, models) = svc.get("/models");
    let models: Value = miniserde::json::from_str(&models).unwrap();
    let Some(Value::Array(models)) = Some(models) else {
        panic!("/models is a list")
    };
    let Some(Value::Array(snap_models)) = get(&v, &["models"]).cloned() else {
        panic!("models is a list")
    };
    assert_eq!(snap_models.len(), models.len());
    let (m, s) = (&models[0], &snap_models[0]);
    let name = get_str(m, &["name"]).unwrap();
    assert_eq!(get_str(s, &["name"]), Some(name.clone()));
    assert_eq!(get_str(s, &["model_hash"]), get_str(m, &["model_hash"]));
    assert_eq!(n(s, &["frames"]), num(get(m, &["frames"]).unwrap()));
    assert_eq!(n(s, &["frames"]), 3.0);
    assert_eq!(get_bool(s, &["ready"]), Some(true));
    let backend = get_str(s, &["backend"]).unwrap();
    if backend == "candle" {
        let series = format!("aei_model_inference_seconds_count{{model=\"{name}\",backend=\"candle\"}}");
        assert_eq!(n(s, &["latency_ms", "candle", "count"]), svc.metric(&series));
        assert_eq!(n(s, &["latency_ms", "candle", "count"]), 3.0);
        assert!(n(s, &["latency_ms", "candle", "p90"]) > 0.0);
    }
}

#[test]
fn metrics_snapshots_off_and_a_bad_site_is_a_clear_start_up_error() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "obs"),
        ("METRICS_INTERVAL_S", "0"),
        ("MQTT_METRICS_TOPIC", "edge-ai/services/{client_id}/ai/metrics"),
    ]);
    let peer = Peer::connect(broker.port, &["edge-ai/#"]);
    svc.wait_ready();
    peer.wait_until("the online status", |m| m.iter().any(|m| m.topic == DEFAULT_STATUS));
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let r = peer.received.lock().unwrap();
    assert!(
        !r.iter().any(|m| m.topic.ends_with("/ai/metrics")),
        "METRICS_INTERVAL_S=0: no snapshot"
    );
    assert!(!r.iter().any(|m| m.topic.contains("acme")), "no SITE: no site topics");

    for (site, why) in [("acme/plant-1", "three levels"), ("acme/+/gw", "plain topic levels")] {
        let out = binary()
            .env_clear()
            .env("SITE", site)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("SITE") && err.contains(why), "{site}: {err}");
    }
    let out = binary()
        .env_clear()
        .env("MQTT_METRICS_TOPIC", "edge-ai/{gateway_id}/ai/metrics")
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MQTT_METRICS_TOPIC") && err.contains("{gateway_id}"),
        "{err}"
    );
}

/// With `LOG_FORMAT=json` every line the service writes is one JSON object with timestamp,
/// level, target and message, and lines about a model, a device or a topic carry them as
/// fields: a corrupt frame's line names its device, topic and reason.
#[test]
fn json_log_lines_parse_and_carry_their_fields() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let (_cfg, health) = camera_health_config();
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("MODEL_CONFIG_PATH", &health),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "debug,rumqttc=info"),
    ]);
    let peer = Peer::connect(broker.port, &["edge-ai/#"]);
    svc.wait_ready();
    let jpeg = fixture("coffee.jpg");
    peer.publish(SNAPSHOTS, jpeg[..jpeg.len() / 3].to_vec());
    peer.publish(
        SNAPSHOTS,
        format!(
            r#"{{"device_id":"cam-7","timestamp":"2026-12-01T10:00:00Z","image_data":"{}"}}"#,
            base64(&jpeg[..500])
        )
        .into_bytes(),
    );
    svc.wait_log("cam-7");
    svc.signal("TERM");
    assert!(svc.wait_exit().success());

    let lines = svc.log.lock().unwrap().clone();
    assert!(lines.len() > 5, "{lines:?}");
    let mut parsed = Vec::new();
    for l in &lines {
        let v: Value = miniserde::json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        for k in ["timestamp", "level", "target", "message"] {
            assert!(get_str(&v, &[k]).is_some_and(|s| !s.is_empty()), "no {k}: {l}");
        }
        let ts = get_str(&v, &["timestamp"]).unwrap();
        assert!(ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        parsed.push(v);
    }
    let with = |k: &str, val: &str| parsed.iter().find(|v| get_str(v, &[k]).as_deref() == Some(val));
    let model = with("model", "camera-health").unwrap_or_else(|| panic!("a line with the model field: {lines:?}"));
    assert!(get_str(model, &["message"]).unwrap().contains("camera-health"));
    let frame = with("device", "cam-7").unwrap_or_else(|| panic!("a line with the device field: {lines:?}"));
    assert_eq!(get_str(frame, &["topic"]).as_deref(), Some(SNAPSHOTS));
    assert_eq!(get_str(frame, &["reason"]).as_deref(), Some("corrupt_jpeg"));
    assert_eq!(get_str(frame, &["level"]).as_deref(), Some("DEBUG"));
    assert!(with("level", "INFO").is_some());
}
