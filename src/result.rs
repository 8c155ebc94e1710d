//! Result messages: `ai_inference_result`, `camera_health` and
//! `inference_error`, written into a reused buffer with `json::Writer`.
//!
//! Owns: the output schemas (README "Message schemas"). Takes plain values;
//! knows nothing of slots, models or MQTT.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::Placement;
use crate::decode::Decoded;
use crate::health::HealthReport;
use crate::json::Writer;

/// Where a frame came from, echoed in every message about it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub device_id: Option<&'a str>,
    pub form: &'a str,
    pub topic: &'a str,
    /// Raw JSON values from the input envelope, passed through unchanged.
    pub timestamp_json: Option<&'a [u8]>,
    pub correlation_id_json: Option<&'a [u8]>,
    pub location_json: Option<&'a [u8]>,
    pub metadata_json: Option<&'a [u8]>,
}

/// Timings of one frame, in the order the stages ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub decode: Duration,
    pub preprocess: Duration,
    pub infer: Duration,
}

/// One backend's run in a dual comparison.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackendRun {
    pub time: Duration,
    /// Heap bytes the backend call allocated on the calling thread (counted by
    /// the binary's counting allocator; the backend's own thread pools and
    /// arenas are not included).
    pub allocated_bytes: u64,
}

/// One prediction of a classifier or detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction<'a> {
    pub class_id: usize,
    pub label: &'a str,
    pub confidence: f32,
    /// `[x1, y1, x2, y2]` in original image pixels, for detections.
    pub bbox: Option<[f32; 4]>,
    /// The model's zones the detection is in (bit i: `zones[i]`).
    pub zones: u64,
    /// With tracking: the detection's identity across snapshots (`tracks.rs`).
    pub track_id: Option<u64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// This process's id in `result_id`s: its start time in nanoseconds, so ids
/// stay unique across restarts.
fn boot_id() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

/// A new `result_id`: `<boot>-<sequence>`, unique per message this service
/// writes. A consumer that sees one id twice saw an MQTT redelivery (QoS 1 is
/// at-least-once), not a second answer.
fn next_result_id() -> (u64, u64) {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    (boot_id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn header(w: &mut Writer<'_>, message_type: &str, now: SystemTime, device_id: Option<&str>) -> (u64, u64) {
    w.begin_object();
    w.key("message_type").str(message_type);
    let (boot, seq) = next_result_id();
    w.key("result_id").fmt_str(format_args!("{boot:x}-{seq}"));
    w.key("timestamp");
    w.rfc3339(now);
    w.key("device_id");
    match device_id {
        Some(d) => w.str(d),
        None => w.null(),
    };
    (boot, seq)
}

fn source(w: &mut Writer<'_>, s: &Source<'_>) {
    w.key("source").begin_object();
    w.key("form").str(s.form);
    w.key("topic").str(s.topic);
    for (k, v) in [
        ("timestamp", s.timestamp_json),
        ("correlation_id", s.correlation_id_json),
        ("location", s.location_json),
        ("metadata", s.metadata_json),
    ] {
        if let Some(v) = v {
            w.key(k).raw(v);
        }
    }
    w.end_object();
}

/// The backend that answered, as results name it (`Placement::backend_used`), and where it ran.
#[derive(Clone, Copy)]
pub struct Ran<'a> {
    pub backend_used: &'a str,
    pub placement: &'a Placement,
}

impl Ran<'_> {
    /// In a result's metadata: the device, and why not the GPU asked for.
    fn write(&self, w: &mut Writer<'_>) {
        w.key("device").str(&self.placement.device);
        if let Some(why) = &self.placement.gpu_fallback {
            w.key("gpu_fallback").str(why);
        }
    }
}

/// Classification or detection result (the design's `ai_inference_result`).
#[allow(clippy::too_many_arguments)]
pub fn write_inference<'p>(
    buf: &mut Vec<u8>,
    now: SystemTime,
    src: &Source<'_>,
    model_name: &str,
    ran: Ran<'_>,
    t: &Timings,
    image: &Decoded,
    predictions: impl Iterator<Item = Prediction<'p>> + Clone,
    alert: bool,
    zones: Zoning<'_>,
) -> (u64, u64) {
    let mut w = Writer::new(buf);
    let id = header(&mut w, "ai_inference_result", now, src.device_id);
    w.key("model_name").str(model_name);
    w.key("backend_used").str(ran.backend_used);
    w.key("inference_time_ms").f64(ms(t.infer), 3);
    w.key("predictions");
    write_predictions(&mut w, predictions.clone(), zones.zones);
    if zones.camera != 0 {
        // Per zone drawn for this camera: how many detections are in it.
        w.key("zone_counts").begin_object();
        for (i, z) in zones
            .zones
            .iter()
            .enumerate()
            .filter(|(i, _)| zones.camera & (1 << i) != 0)
        {
            w.key(&z.name)
                .u64(predictions.clone().filter(|p| p.zones & (1 << i) != 0).count() as u64);
        }
        w.end_object();
    }
    w.key("metadata").begin_object();
    w.key("decode_time_ms").f64(ms(t.decode), 3);
    w.key("preprocessing_time_ms").f64(ms(t.preprocess), 3);
    w.key("image_width").u64(image.width as u64);
    w.key("image_height").u64(image.height as u64);
    image_facts(&mut w, image);
    w.key("total_objects_detected")
        .u64(predictions.filter(|p| p.bbox.is_some()).count() as u64);
    w.key("alert_triggered").bool(alert);
    ran.write(&mut w);
    source(&mut w, src);
    w.end_object();
    w.end_object();
    id
}

/// A model's zones, and which of them are drawn for this frame's camera (a mask).
#[derive(Clone, Copy)]
pub struct Zoning<'a> {
    pub zones: &'a [crate::config::model::Zone],
    pub camera: u64,
}

impl Zoning<'_> {
    pub const NONE: Zoning<'static> = Zoning { zones: &[], camera: 0 };
}

/// An alert's lifecycle event (`ai_alert_event`): `start`, `update` or `end`.
pub fn write_alert(
    buf: &mut Vec<u8>,
    now: SystemTime,
    src: &Source<'_>,
    model_name: &str,
    rule: &crate::config::model::AlertRule,
    event: &crate::alerts::Event,
) {
    let a = &event.alert;
    let secs = |s: f64| UNIX_EPOCH + Duration::from_secs_f64(s.max(0.0));
    let mut w = Writer::new(buf);
    header(&mut w, "ai_alert_event", now, src.device_id);
    w.key("model_name").str(model_name);
    w.key("event").str(event.phase.as_str());
    w.key("alert_id").fmt_str(format_args!("{:x}-a{}", a.boot, a.id));
    w.key("rule").str(&rule.name);
    w.key("zone");
    match &rule.zone {
        Some(z) => w.str(z),
        None => w.null(),
    };
    w.key("classes").begin_array();
    for c in &rule.classes {
        w.str(c);
    }
    w.end_array();
    w.key("first_seen");
    w.rfc3339(secs(a.first_seen));
    w.key("last_seen");
    w.rfc3339(secs(a.last_seen));
    w.key("peak_confidence").f64(a.peak as f64, 4);
    w.key("count").u64(a.count as u64);
    w.key("result_ids").begin_array();
    for (boot, seq) in &a.results {
        w.fmt_str(format_args!("{boot:x}-{seq}"));
    }
    w.end_array();
    w.key("metadata").begin_object();
    source(&mut w, src);
    w.end_object();
    w.end_object();
}

/// The picture's format, and how it was turned upright when it was.
fn image_facts(w: &mut Writer<'_>, image: &Decoded) {
    w.key("image_format").str(image.format.as_str());
    if !image.orientation.is_identity() {
        // Turned upright before preprocessing: boxes are in the upright image's pixels.
        let o = image.orientation;
        w.key("orientation").begin_object();
        w.key("exif").u64(o.exif() as u64);
        w.key("rotated_degrees").u64(o.rotation() as u64);
        w.key("mirrored").bool(o.mirrored());
        w.end_object();
    }
}

/// Camera-health result (`camera_health`).
pub fn write_health(
    buf: &mut Vec<u8>,
    now: SystemTime,
    src: &Source<'_>,
    model_name: &str,
    t: &Timings,
    image: &Decoded,
    r: &HealthReport,
) {
    let mut w = Writer::new(buf);
    header(&mut w, "camera_health", now, src.device_id);
    w.key("model_name").str(model_name);
    w.key("backend_used").str("builtin");
    w.key("inference_time_ms").f64(ms(t.infer), 3);
    w.key("health").begin_object();
    w.key("width").u64(r.width as u64);
    w.key("height").u64(r.height as u64);
    w.key("mean_brightness").f64(r.mean_brightness as f64, 2);
    w.key("blur_score").f64(r.blur_score as f64, 2);
    w.key("black_frame").bool(r.black_frame);
    w.key("blurry").bool(r.blurry);
    w.key("frozen").bool(r.frozen);
    w.key("issues").begin_array();
    for (bad, name) in [
        (r.black_frame, "black_frame"),
        (r.blurry, "blurry"),
        (r.frozen, "frozen"),
    ] {
        if bad {
            w.str(name);
        }
    }
    w.end_array();
    w.end_object();
    w.key("metadata").begin_object();
    w.key("decode_time_ms").f64(ms(t.decode), 3);
    w.key("preprocessing_time_ms").f64(ms(t.preprocess), 3);
    image_facts(&mut w, image);
    w.key("total_objects_detected").u64(0);
    w.key("alert_triggered").bool(r.alert());
    source(&mut w, src);
    w.end_object();
    w.end_object();
}

fn write_predictions<'p>(
    w: &mut Writer<'_>,
    predictions: impl Iterator<Item = Prediction<'p>>,
    zones: &[crate::config::model::Zone],
) {
    w.begin_array();
    for p in predictions {
        w.begin_object();
        w.key("class_id").u64(p.class_id as u64);
        w.key("label").str(p.label);
        w.key("confidence").f64(p.confidence as f64, 4);
        if let Some(b) = p.bbox {
            w.key("bbox").begin_array();
            for v in b {
                w.f64(v as f64, 1);
            }
            w.end_array();
        }
        if let Some(id) = p.track_id {
            w.key("track_id").u64(id);
        }
        if p.zones != 0 {
            w.key("zones").begin_array();
            for (_, z) in zones.iter().enumerate().filter(|(i, _)| p.zones & (1 << i) != 0) {
                w.str(&z.name);
            }
            w.end_array();
        }
        w.end_object();
    }
    w.end_array();
}

/// Dual-backend comparison (`dual_backend_comparison`): both backends' times,
/// memory and predictions on the same tensor, which was faster, and whether
/// they agree.
/// `runs[1]` is `Err(reason)` when the second backend failed: the comparison
/// is then marked failed (`comparison_failed`, the backend's `error`) and has no
/// performance delta; the frame's result went out from the primary already.
pub fn write_comparison<'p, P: Iterator<Item = Prediction<'p>>>(
    buf: &mut Vec<u8>,
    now: SystemTime,
    src: &Source<'_>,
    model_name: &str,
    runs: [(&str, Result<BackendRun, &str>, P); 2],
    predictions_match: bool,
) {
    let times = match (&runs[0].1, &runs[1].1) {
        (Ok(a), Ok(b)) => Some((ms(a.time), ms(b.time))),
        _ => None,
    };
    let (na, nb) = (runs[0].0, runs[1].0);
    let mut w = Writer::new(buf);
    header(&mut w, "dual_backend_comparison", now, src.device_id);
    w.key("model_name").str(model_name);
    w.key("backends").begin_object();
    for (name, run, preds) in runs {
        w.key(name).begin_object();
        match run {
            Ok(run) => {
                w.key("inference_time_ms").f64(ms(run.time), 3);
                w.key("memory_usage_mb")
                    .f64(run.allocated_bytes as f64 / (1024.0 * 1024.0), 3);
                w.key("predictions");
                write_predictions(&mut w, preds, &[]);
            }
            Err(reason) => {
                w.key("error").str(reason);
            }
        }
        w.end_object();
    }
    w.end_object();
    comparison_end(&mut w, [na, nb], times, predictions_match, src);
}

/// What every comparison ends with, once its `backends` object is written: which backend was
/// faster and by how much (when both ran), whether they agreed, and the source.
fn comparison_end(w: &mut Writer<'_>, names: [&str; 2], times: Option<(f64, f64)>, matched: bool, src: &Source<'_>) {
    if let Some((ta, tb)) = times {
        let (faster, slow, fast) = if ta <= tb {
            (names[0], tb, ta)
        } else {
            (names[1], ta, tb)
        };
        w.key("performance_delta").begin_object();
        w.key("time_difference_ms").f64(slow - fast, 3);
        w.key("faster_backend").str(faster);
        w.key("faster_by_percent")
            .f64(if slow > 0.0 { (slow - fast) / slow * 100.0 } else { 0.0 }, 1);
        w.end_object();
    }
    w.key("predictions_match").bool(matched && times.is_some());
    w.key("comparison_failed").bool(times.is_none());
    w.key("metadata").begin_object();
    source(w, src);
    w.end_object();
    w.end_object();
}

/// A sensor model's verdict on one window of readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SensorVerdict {
    /// `None` while the device's window is still filling (nothing was inferred).
    pub score: Option<f32>,
    pub threshold: f32,
    /// Readings in the device's window, and how many the model takes.
    pub readings: usize,
    pub window: usize,
}

impl SensorVerdict {
    pub fn anomaly(&self) -> bool {
        self.score.is_some_and(|s| s > self.threshold)
    }
    pub fn as_str(&self) -> &'static str {
        match self.score {
            None => "window_filling",
            Some(_) if self.anomaly() => "anomaly",
            Some(_) => "normal",
        }
    }
}

fn write_verdict(w: &mut Writer<'_>, v: &SensorVerdict) {
    w.key("score");
    match v.score {
        Some(s) => w.f64(s as f64, 6),
        None => w.null(),
    };
    w.key("threshold").f64(v.threshold as f64, 6);
    w.key("verdict").str(v.as_str());
}

/// A sensor model's result (`sensor_inference_result`).
#[allow(clippy::too_many_arguments)]
pub fn write_sensor(
    buf: &mut Vec<u8>,
    now: SystemTime,
    src: &Source<'_>,
    model_name: &str,
    ran: Ran<'_>,
    score_kind: &str,
    t: &Timings,
    v: &SensorVerdict,
) {
    let mut w = Writer::new(buf);
    header(&mut w, "sensor_inference_result", now, src.device_id);
    w.key("model_name").str(model_name);
    w.key("backend_used").str(ran.backend_used);
    w.key("inference_time_ms").f64(ms(t.infer), 3);
    write_verdict(&mut w, v);
    w.key("alert_triggered").bool(v.anomaly());
    w.key("window").begin_object();
    w.key("readings").u64(v.readings as u64);
    w.key("size").u64(v.window as u64);
    w.end_object();
    w.key("metadata").begin_object();
    w.key("preprocessing_time_ms").f64(ms(t.preprocess), 3);
    w.key("score_kind").str(score_kind);
    ran.write(&mut w);
    source(&mut w, src);
    w.end_object();
    w.end_object();
}

/// One backend's run of a sensor model: its name, and its run and verdict or why it failed.
pub type SensorRun<'a> = (&'a str, Result<(BackendRun, SensorVerdict), &'a str>);

/// Dual mode for a sensor model: both backends' scores on the same window.
pub fn write_sensor_comparison(
    buf: &mut Vec<u8>,
    now: SystemTime,
    src: &Source<'_>,
    model_name: &str,
    runs: [SensorRun<'_>; 2],
    predictions_match: bool,
) {
    let times = match (&runs[0].1, &runs[1].1) {
        (Ok(a), Ok(b)) => Some((ms(a.0.time), ms(b.0.time))),
        _ => None,
    };
    let (na, nb) = (runs[0].0, runs[1].0);
    let mut w = Writer::new(buf);
    header(&mut w, "dual_backend_comparison", now, src.device_id);
    w.key("model_name").str(model_name);
    w.key("backends").begin_object();
    for (name, run) in &runs {
        w.key(name).begin_object();
        match run {
            Ok((run, v)) => {
                w.key("inference_time_ms").f64(ms(run.time), 3);
                w.key("memory_usage_mb")
                    .f64(run.allocated_bytes as f64 / (1024.0 * 1024.0), 3);
                write_verdict(&mut w, v);
            }
            Err(reason) => {
                w.key("error").str(reason);
            }
        }
        w.end_object();
    }
    w.end_object();
    comparison_end(&mut w, [na, nb], times, predictions_match, src);
}

/// Error result (`inference_error`): `error` is a stable code, `reason` says why.
pub fn write_error(buf: &mut Vec<u8>, now: SystemTime, src: &Source<'_>, code: &str, reason: std::fmt::Arguments<'_>) {
    let mut w = Writer::new(buf);
    header(&mut w, "inference_error", now, src.device_id);
    w.key("error").str(code);
    w.key("reason").fmt_str(reason);
    source(&mut w, src);
    w.end_object();
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniserde::json::{self, Value};

    fn src() -> Source<'static> {
        Source {
            device_id: Some("cam-1"),
            form: "image_snapshot",
            topic: "edge-ai/a/b/c/camera/snapshots",
            timestamp_json: Some(b"1767225600"),
            correlation_id_json: Some(b"\"corr-9\""),
            location_json: None,
            metadata_json: Some(br#"{"zone":"A"}"#),
        }
    }

    fn get<'v>(v: &'v Value, path: &[&str]) -> &'v Value {
        path.iter().fold(v, |v, k| match v {
            Value::Object(o) => o.get(*k).unwrap_or_else(|| panic!("missing {k}")),
            _ => panic!("not an object at {k}"),
        })
    }

    #[test]
    fn inference_result_schema() {
        let mut buf = Vec::new();
        let preds = [Prediction {
            class_id: 0,
            label: "person",
            confidence: 0.8123,
            bbox: Some([1.0, 2.0, 30.5, 40.25]),
            zones: 0,
            track_id: None,
        }];
        let t = Timings {
            decode: Duration::from_micros(1500),
            preprocess: Duration::from_micros(700),
            infer: Duration::from_millis(3),
        };
        write_inference(
            &mut buf,
            SystemTime::now(),
            &src(),
            "yolo",
            Ran {
                backend_used: "onnx:cpu:gpu_fallback",
                placement: &Placement {
                    device: "cpu".into(),
                    gpu_fallback: Some("cuda: not in this ONNX Runtime library".into()),
                },
            },
            &t,
            &Decoded {
                width: 480,
                height: 640,
                format: crate::decode::Format::Png,
                orientation: crate::decode::Orientation::from_exif(6),
            },
            preds.iter().copied(),
            true,
            Zoning::NONE,
        );
        let v: Value = json::from_str(std::str::from_utf8(&buf).unwrap()).unwrap();
        assert!(matches!(get(&v, &["message_type"]), Value::String(s) if s == "ai_inference_result"));
        assert!(matches!(
            get(&v, &["metadata", "total_objects_detected"]),
            Value::Number(_)
        ));
        assert!(matches!(get(&v, &["metadata", "alert_triggered"]), Value::Bool(true)));
        assert!(matches!(get(&v, &["metadata", "image_format"]), Value::String(s) if s == "png"));
        assert!(matches!(get(&v, &["backend_used"]), Value::String(s) if s == "onnx:cpu:gpu_fallback"));
        assert!(matches!(get(&v, &["metadata", "device"]), Value::String(s) if s == "cpu"));
        assert!(matches!(get(&v, &["metadata", "gpu_fallback"]), Value::String(s) if s.starts_with("cuda: not in")));
        assert!(matches!(
            get(&v, &["metadata", "orientation", "rotated_degrees"]),
            Value::Number(_)
        ));
        assert!(matches!(
            get(&v, &["metadata", "orientation", "mirrored"]),
            Value::Bool(false)
        ));
        assert!(matches!(get(&v, &["metadata", "source", "correlation_id"]), Value::String(s) if s == "corr-9"));
        assert!(matches!(get(&v, &["metadata", "source", "metadata", "zone"]), Value::String(s) if s == "A"));
        let Value::Array(p) = get(&v, &["predictions"]) else {
            panic!()
        };
        assert!(matches!(get(&p[0], &["label"]), Value::String(s) if s == "person"));
    }

    #[test]
    fn health_and_error_schemas() {
        let mut buf = Vec::new();
        let r = HealthReport {
            width: 4,
            height: 2,
            mean_brightness: 3.0,
            black_frame: true,
            ..Default::default()
        };
        write_health(
            &mut buf,
            SystemTime::now(),
            &src(),
            "camera-health",
            &Timings::default(),
            &Decoded::default(),
            &r,
        );
        let v: Value = json::from_str(std::str::from_utf8(&buf).unwrap()).unwrap();
        let Value::Array(issues) = get(&v, &["health", "issues"]) else {
            panic!()
        };
        assert_eq!(issues.len(), 1);
        assert!(matches!(get(&v, &["metadata", "alert_triggered"]), Value::Bool(true)));

        let mut s = src();
        s.device_id = None;
        write_error(
            &mut buf,
            SystemTime::now(),
            &s,
            "not_jpeg",
            format_args!("payload \"x\" is {}", "a PNG"),
        );
        let v: Value = json::from_str(std::str::from_utf8(&buf).unwrap()).unwrap();
        assert!(matches!(get(&v, &["device_id"]), Value::Null));
        assert!(matches!(get(&v, &["reason"]), Value::String(s) if s == "payload \"x\" is a PNG"));
    }

    #[test]
    fn a_failed_second_backend_marks_the_comparison_failed() {
        let mut buf = Vec::new();
        let preds = [Prediction {
            class_id: 3,
            label: "cat",
            confidence: 0.9,
            bbox: None,
            zones: 0,
            track_id: None,
        }];
        let run = BackendRun {
            time: Duration::from_millis(4),
            allocated_bytes: 0,
        };
        let sides = |b: Result<BackendRun, &'static str>| {
            [
                ("candle", Ok(run), preds.iter().copied()),
                ("onnx", b, preds.iter().copied()),
            ]
        };
        write_comparison(&mut buf, SystemTime::now(), &src(), "m", sides(Err("boom")), true);
        let v: Value = json::from_str(std::str::from_utf8(&buf).unwrap()).unwrap();
        assert!(matches!(get(&v, &["comparison_failed"]), Value::Bool(true)));
        assert!(matches!(get(&v, &["predictions_match"]), Value::Bool(false)));
        assert!(matches!(get(&v, &["backends", "onnx", "error"]), Value::String(s) if s == "boom"));
        let Value::Object(o) = &v else { panic!() };
        assert!(!o.contains_key("performance_delta"));
        write_comparison(&mut buf, SystemTime::now(), &src(), "m", sides(Ok(run)), true);
        let v: Value = json::from_str(std::str::from_utf8(&buf).unwrap()).unwrap();
        assert!(matches!(get(&v, &["comparison_failed"]), Value::Bool(false)));
        assert!(matches!(get(&v, &["predictions_match"]), Value::Bool(true)));
        assert!(matches!(
            get(&v, &["performance_delta", "faster_backend"]),
            Value::String(_)
        ));
    }
}
