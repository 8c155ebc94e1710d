//! Prometheus metrics: lock-free counters and histograms with fixed label
//! sets, rendered as text exposition format for `/metrics`.
//!
//! Owns: what is counted and how it is named. Recording is an atomic add
//! (no allocation, usable on the frame path); rendering allocates and runs
//! only when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::build_info;
use crate::decode::Format;
use crate::envelope::Form;

/// Why a frame got an error result instead of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    PayloadTooLarge,
    BadJson,
    BadEnvelope,
    BadBase64,
    /// Not JPEG, PNG, BMP or TIFF (`not_jpeg` before PNG, BMP and TIFF were decoded).
    UnknownFormat,
    CorruptJpeg,
    /// A corrupt PNG, BMP or TIFF.
    CorruptImage,
    ImageTooLarge,
    InferenceFailed,
    /// A sensor reading with missing, mistyped or non-finite fields, too many fields, or a
    /// timestamp not after its device's last one.
    BadReading,
}

impl FailReason {
    pub const ALL: [FailReason; 10] = [
        FailReason::PayloadTooLarge,
        FailReason::BadJson,
        FailReason::BadEnvelope,
        FailReason::BadBase64,
        FailReason::UnknownFormat,
        FailReason::CorruptJpeg,
        FailReason::CorruptImage,
        FailReason::ImageTooLarge,
        FailReason::InferenceFailed,
        FailReason::BadReading,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::PayloadTooLarge => "payload_too_large",
            FailReason::BadJson => "bad_json",
            FailReason::BadEnvelope => "bad_envelope",
            FailReason::BadBase64 => "bad_base64",
            FailReason::UnknownFormat => "unknown_format",
            FailReason::CorruptJpeg => "corrupt_jpeg",
            FailReason::CorruptImage => "corrupt_image",
            FailReason::ImageTooLarge => "image_too_large",
            FailReason::InferenceFailed => "inference_failed",
            FailReason::BadReading => "bad_reading",
        }
    }
}

/// Why a frame was dropped unprocessed (it still gets an error result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A newer frame of the same source needed the slot.
    Superseded,
    /// Older than MAX_FRAME_AGE_S when its turn came (or its one-shot caller stopped waiting).
    Stale,
    /// The source sent faster than MAX_FPS_PER_SOURCE.
    RateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [DropReason::Superseded, DropReason::Stale, DropReason::RateLimited];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Superseded => "superseded",
            DropReason::Stale => "stale",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// Model reloads so far: done, and refused (the old version kept serving).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reloads {
    pub done: u64,
    pub refused: u64,
}

/// Why a frame was answered with an error result instead of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Failed(FailReason),
    Dropped(DropReason),
}

impl Refusal {
    /// The HTTP status a one-shot caller gets for it.
    pub fn http_status(self) -> u16 {
        match self {
            Refusal::Failed(FailReason::PayloadTooLarge | FailReason::ImageTooLarge) => 413,
            Refusal::Failed(FailReason::InferenceFailed) => 500,
            Refusal::Failed(_) => 422,
            Refusal::Dropped(DropReason::RateLimited) => 429,
            Refusal::Dropped(_) => 503,
        }
    }
}

/// Why the HTTP server closed a connection without serving a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpRefusal {
    /// Not HTTP/1.x, a malformed head or body framing, a non-UTF-8 target.
    BadRequest,
    /// The head (request line and headers) was over its size or count limit.
    HeadTooLarge,
    /// The head or the body did not arrive in time (slow or silent client).
    Timeout,
    /// Every connection was taken: the one idle longest was closed for a new one.
    Evicted,
    /// Every connection was busy with a request: a new one was turned away.
    Busy,
}

impl HttpRefusal {
    pub const ALL: [HttpRefusal; 5] = [
        HttpRefusal::BadRequest,
        HttpRefusal::HeadTooLarge,
        HttpRefusal::Timeout,
        HttpRefusal::Evicted,
        HttpRefusal::Busy,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            HttpRefusal::BadRequest => "bad_request",
            HttpRefusal::HeadTooLarge => "head_too_large",
            HttpRefusal::Timeout => "timeout",
            HttpRefusal::Evicted => "evicted",
            HttpRefusal::Busy => "busy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingest,
    Decode,
    Preprocess,
    Infer,
    Total,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Ingest,
        Stage::Decode,
        Stage::Preprocess,
        Stage::Infer,
        Stage::Total,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Decode => "decode",
            Stage::Preprocess => "preprocess",
            Stage::Infer => "infer",
            Stage::Total => "total",
        }
    }
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A histogram's numbers read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative); those above the last bucket are in `count` only.
    pub counts: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// The `q` quantile in seconds, estimated from the buckets as Prometheus'
    /// `histogram_quantile` does (linear inside the bucket; the last bucket's bound when it
    /// falls above it). `None` with no observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let frac = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lo + (BUCKETS[i] - lo) * frac);
            }
            below += n;
        }
        Some(BUCKETS[BUCKETS.len() - 1])
    }

    pub fn mean_s(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ns as f64 / 1e9 / self.count as f64)
    }
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Relaxed)),
            count: self.count.load(Relaxed),
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

/// The backends timed per call, in the order of `Metrics::backends` and `Summary::latency`.
pub const BACKENDS: [&str; 2] = ["candle", "onnx"];

/// `name`'s index in [`BACKENDS`].
pub fn backend_index(name: &str) -> usize {
    (name == "onnx") as usize
}

/// One model's state for `/readyz`, `/metrics` and the metrics snapshot (built by
/// `models::Models::summary`).
#[derive(Debug, Clone)]
pub struct Summary {
    pub name: String,
    pub backend: &'static str,
    pub model_type: &'static str,
    pub provider: String,
    /// `cpu`, `cuda:N` (dual: `a+b` when the sides differ), `builtin`, or `none` (failed).
    pub device: String,
    /// A GPU was asked for and cannot be used; the model runs on the CPU: why.
    pub gpu_fallback: Option<String>,
    pub ready: bool,
    /// Why the model is not serving, when it failed to load.
    pub error: Option<String>,
    /// Content hash of the model file (0 when there is none).
    pub hash: u64,
    /// Frames this version answered.
    pub frames: u64,
    /// This version's inference time per backend ([`BACKENDS`]).
    pub latency: [HistogramSnapshot; 2],
}

/// The camera-health job's latest view of each camera, for per-camera alerting (silent,
/// frozen, black): at most [`CAMERA_GAUGES`] cameras, the least recently seen forgotten first
/// (its series disappear), so made-up device ids cannot grow the scrape without bound.
#[derive(Debug)]
pub struct CameraGauges(std::sync::Mutex<crate::cameras::Table<CameraSeen>>);

/// Cameras with their own series.
pub const CAMERA_GAUGES: usize = 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CameraSeen {
    /// Unix seconds of its latest analysed frame.
    pub last_frame: f64,
    pub frozen: bool,
    pub black: bool,
    pub blurry: bool,
}

impl Default for CameraGauges {
    fn default() -> CameraGauges {
        CameraGauges(std::sync::Mutex::new(crate::cameras::Table::new(CAMERA_GAUGES)))
    }
}

impl CameraGauges {
    /// Records a camera-health report of `device`.
    pub fn seen(&self, device: &str, now: std::time::SystemTime, frozen: bool, black: bool, blurry: bool) {
        let last_frame = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t.touch(device, CameraSeen::default) = CameraSeen {
            last_frame,
            frozen,
            black,
            blurry,
        };
    }

    /// Every camera's latest view, sorted by device id.
    pub fn list(&self) -> Vec<(String, CameraSeen)> {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, CameraSeen)> = t.iter().map(|(k, s)| (k.to_owned(), *s)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Every metric of the service.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub received: [AtomicU64; Form::ALL.len()],
    /// Frames decoded, by image format.
    pub decoded: [AtomicU64; Format::ALL.len()],
    /// Frames turned upright by their EXIF orientation.
    pub oriented: AtomicU64,
    pub failed: [AtomicU64; FailReason::ALL.len()],
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    pub results_published: AtomicU64,
    pub errors_published: AtomicU64,
    /// Annotated pictures handed to the MQTT client (alert starts and ends).
    pub pictures_published: AtomicU64,
    /// Annotated pictures asked for, by what became of them.
    pub pictures: [AtomicU64; crate::annotate::Outcome::ALL.len()],
    /// Outgoing messages refused by the MQTT client.
    pub publish_failed: AtomicU64,
    /// Publishes the broker answered with a failure reason (e.g. not authorised).
    pub publish_refused: AtomicU64,
    pub mqtt_subscriptions_refused: AtomicU64,
    pub mqtt_reauthentications: AtomicU64,
    pub mqtt_last_error: std::sync::Mutex<String>,
    /// Results waiting in the offline queue, and results it dropped.
    pub offline_queued: AtomicU64,
    pub offline_dropped: AtomicU64,
    /// Extra copies of a frame delivered for overlapping subscriptions.
    pub overlap_copies: AtomicU64,
    /// Messages recognised as repeats of a recent one (`dedup.rs`).
    pub repeats: AtomicU64,
    pub stages: [Histogram; Stage::ALL.len()],
    pub queue_waiting: AtomicU64,
    /// Frames that found every slot busy and waited for one (flow control at work).
    pub slot_waits: AtomicU64,
    pub slots_total: AtomicU64,
    pub slots_free: AtomicU64,
    pub mqtt_connected: AtomicBool,
    pub mqtt_connects: AtomicU64,
    pub mqtt_connection_errors: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_refused: [AtomicU64; HttpRefusal::ALL.len()],
    /// Inference time per backend: candle, onnx.
    pub backends: [Histogram; 2],
    pub dual_comparisons: AtomicU64,
    pub dual_matches: AtomicU64,
    /// Dual comparisons whose second backend failed (the primary's result went out).
    pub dual_failed: AtomicU64,
    /// Alert events published, by phase (start, update, end).
    pub alert_events: [AtomicU64; 3],
    /// Per camera, what the camera-health job last saw (`aei_camera_*{device}`).
    pub cameras: CameraGauges,
    /// When the service started (set once at start-up), for the uptime.
    pub started: std::sync::OnceLock<std::time::Instant>,
}

impl Metrics {
    pub fn received(&self, f: Form) {
        self.received[f as usize].fetch_add(1, Relaxed);
    }
    pub fn failed(&self, r: FailReason) {
        self.failed[r as usize].fetch_add(1, Relaxed);
    }
    pub fn http_refused(&self, r: HttpRefusal) {
        self.http_refused[r as usize].fetch_add(1, Relaxed);
    }
    pub fn dropped(&self, r: DropReason) {
        self.dropped[r as usize].fetch_add(1, Relaxed);
    }
    pub fn stage(&self, s: Stage, d: std::time::Duration) {
        self.stages[s as usize].observe(d);
    }
    /// One backend call of `backend` ("candle" or "onnx") took `d`.
    pub fn backend(&self, backend: &str, d: std::time::Duration) {
        self.backends[backend_index(backend)].observe(d);
    }
    /// One dual comparison, agreeing or not.
    pub fn picture(&self, outcome: crate::annotate::Outcome) {
        self.pictures[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn alert_event(&self, phase: crate::alerts::Phase) {
        self.alert_events[phase as usize].fetch_add(1, Relaxed);
    }

    pub fn dual(&self, matched: bool) {
        self.dual_comparisons.fetch_add(1, Relaxed);
        self.dual_matches.fetch_add(matched as u64, Relaxed);
    }

    /// Prometheus text exposition, with the state of every configured model.
    /// Seconds since `started` was set (0 before).
    pub fn uptime_s(&self) -> f64 {
        self.started.get().map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    pub fn render(&self, models: &[Summary], reloads: Reloads) -> String {
        let mut o = String::with_capacity(8192);
        let v = |a: &AtomicU64| a.load(Relaxed);
        let one = |value: u64| [(String::new(), value)];
        let by = |label: &str, pairs: &mut dyn Iterator<Item = (&str, u64)>| -> Vec<(String, u64)> {
            pairs.map(|(l, n)| (format!("{label}=\"{l}\""), n)).collect()
        };
        let build = format!(
            "version=\"{}\",commit=\"{}\",features=\"{}\",profile=\"{}\"",
            build_info::VERSION,
            build_info::GIT_COMMIT,
            build_info::FEATURES,
            build_info::PROFILE
        );
        metric(
            &mut o,
            "aei_build_info",
            "gauge",
            "Build facts of the running binary; always 1.",
            &[(build, 1)],
        );
        head(
            &mut o,
            "aei_uptime_seconds",
            "gauge",
            "Seconds since the service started.",
        );
        let _ = writeln!(o, "aei_uptime_seconds {:.1}", self.uptime_s());
        metric(
            &mut o,
            "aei_messages_received_total",
            "counter",
            "Messages received (MQTT and /infer), well-formed or not.",
            &one(v(&self.messages_received)),
        );
        metric(
            &mut o,
            "aei_frames_received_total",
            "counter",
            "Frames accepted for processing, by payload form.",
            &by(
                "form",
                &mut Form::ALL.iter().map(|f| (f.as_str(), v(&self.received[*f as usize]))),
            ),
        );
        metric(
            &mut o,
            "aei_frames_decoded_total",
            "counter",
            "Frames whose image decoded, by format.",
            &by(
                "format",
                &mut Format::ALL.iter().map(|f| (f.as_str(), v(&self.decoded[*f as usize]))),
            ),
        );
        metric(
            &mut o,
            "aei_frames_oriented_total",
            "counter",
            "Frames turned upright by their EXIF orientation before preprocessing.",
            &one(v(&self.oriented)),
        );
        metric(
            &mut o,
            "aei_frames_failed_total",
            "counter",
            "Frames answered with an error result, by reason.",
            &by(
                "reason",
                &mut FailReason::ALL
                    .iter()
                    .map(|r| (r.as_str(), v(&self.failed[*r as usize]))),
            ),
        );
        metric(
            &mut o,
            "aei_frames_dropped_total",
            "counter",
            "Frames dropped unprocessed under load, by reason.",
            &by(
                "reason",
                &mut DropReason::ALL
                    .iter()
                    .map(|r| (r.as_str(), v(&self.dropped[*r as usize]))),
            ),
        );
        metric(
            &mut o,
            "aei_messages_published_total",
            "counter",
            "Messages handed to the MQTT client, by kind.",
            &by(
                "kind",
                &mut [
                    ("result", v(&self.results_published)),
                    ("error", v(&self.errors_published)),
                    ("picture", v(&self.pictures_published)),
                ]
                .into_iter(),
            ),
        );
        metric(
            &mut o,
            "aei_pictures_total",
            "counter",
            "Annotated pictures asked for (one-shot annotate, alert starts and ends), by outcome.",
            &by(
                "outcome",
                &mut crate::annotate::Outcome::ALL
                    .iter()
                    .map(|p| (p.as_str(), v(&self.pictures[*p as usize]))),
            ),
        );
        metric(
            &mut o,
            "aei_publish_failures_total",
            "counter",
            "Messages the MQTT client refused.",
            &one(v(&self.publish_failed)),
        );
        metric(
            &mut o,
            "aei_publish_refused_total",
            "counter",
            "Messages the broker acknowledged with a failure reason (not authorised, quota).",
            &one(v(&self.publish_refused)),
        );
        metric(
            &mut o,
            "aei_offline_queue_results",
            "gauge",
            "Results waiting for the broker to come back (MQTT_OFFLINE_QUEUE).",
            &one(v(&self.offline_queued)),
        );
        metric(
            &mut o,
            "aei_offline_queue_dropped_total",
            "counter",
            "Results dropped, oldest first, because the offline queue was full.",
            &one(v(&self.offline_dropped)),
        );
        metric(
            &mut o,
            "aei_mqtt_subscriptions_refused_total",
            "counter",
            "Subscriptions the broker refused (e.g. outside the client's ACL).",
            &one(v(&self.mqtt_subscriptions_refused)),
        );
        metric(
            &mut o,
            "aei_mqtt_reauthentications_total",
            "counter",
            "Reconnects made to re-authenticate with a rotated K8S-SAT token.",
            &one(v(&self.mqtt_reauthentications)),
        );
        metric(
            &mut o,
            "aei_messages_repeated_total",
            "counter",
            "Messages not answered again: a redelivery of a recent QoS 1/2 message, or another copy of a frame that matched several subscriptions.",
            &by(
                "why",
                &mut [("redelivered", v(&self.repeats)), ("overlapping_subscription", v(&self.overlap_copies))].into_iter(),
            ),
        );
        head(
            &mut o,
            "aei_stage_duration_seconds",
            "histogram",
            "Time spent per frame in each pipeline stage.",
        );
        for st in Stage::ALL {
            histogram(
                &mut o,
                "aei_stage_duration_seconds",
                &format!("stage=\"{}\"", st.as_str()),
                &self.stages[st as usize].snapshot(),
            );
        }
        head(
            &mut o,
            "aei_backend_inference_seconds",
            "histogram",
            "Inference time per backend call.",
        );
        for (i, b) in BACKENDS.iter().enumerate() {
            histogram(
                &mut o,
                "aei_backend_inference_seconds",
                &format!("backend=\"{b}\""),
                &self.backends[i].snapshot(),
            );
        }
        head(
            &mut o,
            "aei_model_inference_seconds",
            "histogram",
            "Inference time per backend call, by model (the version serving now) and backend.",
        );
        for m in models {
            for (i, b) in BACKENDS.iter().enumerate() {
                if m.latency[i].count > 0 {
                    let labels = format!("model=\"{}\",backend=\"{b}\"", escape_label(&m.name));
                    histogram(&mut o, "aei_model_inference_seconds", &labels, &m.latency[i]);
                }
            }
        }
        metric(
            &mut o,
            "aei_dual_comparisons_total",
            "counter",
            "Frames run on both backends in dual mode.",
            &one(v(&self.dual_comparisons)),
        );
        metric(
            &mut o,
            "aei_dual_predictions_matched_total",
            "counter",
            "Dual comparisons whose predictions agreed.",
            &one(v(&self.dual_matches)),
        );
        metric(
            &mut o,
            "aei_dual_comparisons_failed_total",
            "counter",
            "Dual comparisons whose second backend failed; the primary's result still went out.",
            &one(v(&self.dual_failed)),
        );
        metric(
            &mut o,
            "aei_alert_events_total",
            "counter",
            "Alert lifecycle events published (alert rules), by event.",
            &by(
                "event",
                &mut crate::alerts::Phase::ALL
                    .iter()
                    .map(|p| (p.as_str(), v(&self.alert_events[*p as usize]))),
            ),
        );
        let cameras = self.cameras.list();
        head(
            &mut o,
            "aei_camera_last_frame_timestamp_seconds",
            "gauge",
            "Unix time of each camera's latest frame the camera-health job analysed (a silent camera's stops moving).",
        );
        for (d, c) in &cameras {
            let _ = writeln!(
                o,
                "aei_camera_last_frame_timestamp_seconds{{device=\"{}\"}} {:.3}",
                escape_label(d),
                c.last_frame
            );
        }
        for (name, help, get) in [
            (
                "aei_camera_frozen",
                "1 when each camera's latest frame was identical to the one before it (camera health).",
                (|c: &CameraSeen| c.frozen) as fn(&CameraSeen) -> bool,
            ),
            (
                "aei_camera_black",
                "1 when each camera's latest frame was black (camera health).",
                |c: &CameraSeen| c.black,
            ),
            (
                "aei_camera_blurry",
                "1 when each camera's latest frame was blurry (camera health).",
                |c: &CameraSeen| c.blurry,
            ),
        ] {
            let samples: Vec<(String, u64)> = cameras
                .iter()
                .map(|(d, c)| (format!("device=\"{}\"", escape_label(d)), get(c) as u64))
                .collect();
            metric(&mut o, name, "gauge", help, &samples);
        }
        metric(
            &mut o,
            "aei_queue_waiting_frames",
            "gauge",
            "Frames waiting for a worker.",
            &one(v(&self.queue_waiting)),
        );
        metric(
            &mut o,
            "aei_slot_waits_total",
            "counter",
            "Frames that found every frame slot busy and waited for one (none is evicted).",
            &one(v(&self.slot_waits)),
        );
        let free = v(&self.slots_free);
        metric(
            &mut o,
            "aei_frame_slots",
            "gauge",
            "Preallocated frame slots, by state.",
            &by(
                "state",
                &mut [("free", free), ("busy", v(&self.slots_total).saturating_sub(free))].into_iter(),
            ),
        );
        metric(
            &mut o,
            "aei_mqtt_connected",
            "gauge",
            "1 while connected to the MQTT broker.",
            &one(self.mqtt_connected.load(Relaxed) as u64),
        );
        metric(
            &mut o,
            "aei_mqtt_connects_total",
            "counter",
            "Successful MQTT connections (CONNACK received).",
            &one(v(&self.mqtt_connects)),
        );
        metric(
            &mut o,
            "aei_mqtt_connection_errors_total",
            "counter",
            "MQTT connection errors (each followed by a reconnect).",
            &one(v(&self.mqtt_connection_errors)),
        );
        metric(
            &mut o,
            "aei_http_requests_total",
            "counter",
            "HTTP requests served.",
            &one(v(&self.http_requests)),
        );
        metric(
            &mut o,
            "aei_http_refused_total",
            "counter",
            "HTTP connections closed without serving a request, by reason.",
            &by(
                "reason",
                &mut HttpRefusal::ALL
                    .iter()
                    .map(|r| (r.as_str(), v(&self.http_refused[*r as usize]))),
            ),
        );
        let ready: Vec<(String, u64)> = models
            .iter()
            .map(|m| {
                let labels = format!(
                    "model=\"{}\",backend=\"{}\",type=\"{}\",provider=\"{}\",device=\"{}\"",
                    escape_label(&m.name),
                    m.backend,
                    m.model_type,
                    escape_label(&m.provider),
                    escape_label(&m.device)
                );
                (labels, m.ready as u64)
            })
            .collect();
        let fallback: Vec<(String, u64)> = models
            .iter()
            .filter_map(|m| {
                let why = m.gpu_fallback.as_deref()?;
                let labels = format!(
                    "model=\"{}\",backend=\"{}\",device=\"{}\",reason=\"{}\"",
                    escape_label(&m.name),
                    m.backend,
                    escape_label(&m.device),
                    escape_label(why)
                );
                Some((labels, 1))
            })
            .collect();
        metric(
            &mut o,
            "aei_model_ready",
            "gauge",
            "1 when the model is loaded and warmed up; 0 when it failed to load.",
            &ready,
        );
        metric(
            &mut o,
            "aei_model_gpu_fallback",
            "gauge",
            "1 for a model that asked for a GPU and runs on the CPU instead (GPU policy `fallback`), with the reason.",
            &fallback,
        );
        metric(
            &mut o,
            "aei_model_reloads_total",
            "counter",
            "Models reloaded without a restart.",
            &one(reloads.done),
        );
        metric(
            &mut o,
            "aei_model_reload_failures_total",
            "counter",
            "Reloads refused; the previous model kept serving.",
            &one(reloads.refused),
        );
        o
    }
}

/// The metrics snapshot published on `ai/metrics`: the numbers `/metrics` shows, read at one
/// moment, as one compact JSON object (latency as p50/p90/p99 estimated from the same buckets).
pub struct Snapshot<'a> {
    pub client_id: &'a str,
    pub models: &'a [Summary],
    pub reloads: Reloads,
}

impl Metrics {
    /// Writes the snapshot into `buf` (cleared first).
    pub fn snapshot_json(&self, buf: &mut Vec<u8>, now: std::time::SystemTime, s: &Snapshot<'_>) {
        let v = |a: &AtomicU64| a.load(Relaxed);
        let mut w = crate::json::Writer::new(buf);
        w.begin_object();
        w.key("message_type").str("service_metrics");
        w.key("timestamp").rfc3339(now);
        w.key("client_id").str(s.client_id);
        w.key("version").str(build_info::VERSION);
        w.key("uptime_s").f64(self.uptime_s(), 1);
        w.key("mqtt").begin_object();
        w.key("connected").bool(self.mqtt_connected.load(Relaxed));
        w.key("connects").u64(v(&self.mqtt_connects));
        w.key("connection_errors").u64(v(&self.mqtt_connection_errors));
        w.end_object();

        w.key("frames").begin_object();
        w.key("messages_received").u64(v(&self.messages_received));
        w.key("received").begin_object();
        for f in Form::ALL {
            w.key(f.as_str()).u64(v(&self.received[f as usize]));
        }
        w.end_object();
        w.key("answered").u64(v(&self.results_published));
        w.key("errors_published").u64(v(&self.errors_published));
        w.key("failed").begin_object();
        for r in FailReason::ALL {
            w.key(r.as_str()).u64(v(&self.failed[r as usize]));
        }
        w.end_object();
        w.key("dropped").begin_object();
        for r in DropReason::ALL {
            w.key(r.as_str()).u64(v(&self.dropped[r as usize]));
        }
        w.end_object();
        w.key("repeated").u64(v(&self.repeats));
        w.end_object();

        w.key("latency_ms").begin_object();
        w.key("stages").begin_object();
        for st in Stage::ALL {
            w.key(st.as_str());
            latency(&mut w, &self.stages[st as usize].snapshot());
        }
        w.end_object();
        w.key("backends").begin_object();
        for (i, b) in BACKENDS.iter().enumerate() {
            w.key(b);
            latency(&mut w, &self.backends[i].snapshot());
        }
        w.end_object();
        w.end_object();

        let free = v(&self.slots_free);
        w.key("queue").begin_object();
        w.key("waiting").u64(v(&self.queue_waiting));
        w.key("slots").u64(v(&self.slots_total));
        w.key("slots_busy").u64(v(&self.slots_total).saturating_sub(free));
        w.key("slot_waits").u64(v(&self.slot_waits));
        w.key("offline_queued").u64(v(&self.offline_queued));
        w.key("offline_dropped").u64(v(&self.offline_dropped));
        w.end_object();

        w.key("models").begin_array();
        for m in s.models {
            w.begin_object();
            w.key("name").str(&m.name);
            w.key("backend").str(m.backend);
            w.key("model_type").str(m.model_type);
            w.key("ready").bool(m.ready);
            w.key("device").str(&m.device);
            if let Some(why) = &m.gpu_fallback {
                w.key("gpu_fallback").str(why);
            }
            w.key("model_hash").fmt_str(format_args!("{:016x}", m.hash));
            w.key("frames").u64(m.frames);
            w.key("latency_ms").begin_object();
            for (i, b) in BACKENDS.iter().enumerate() {
                if m.latency[i].count > 0 {
                    w.key(b);
                    latency(&mut w, &m.latency[i]);
                }
            }
            w.end_object();
            if let Some(e) = &m.error {
                w.key("error").str(e);
            }
            w.end_object();
        }
        w.end_array();
        w.key("reloads").begin_object();
        w.key("done").u64(s.reloads.done);
        w.key("refused").u64(s.reloads.refused);
        w.end_object();
        w.key("dual").begin_object();
        w.key("comparisons").u64(v(&self.dual_comparisons));
        w.key("matched").u64(v(&self.dual_matches));
        w.key("failed").u64(v(&self.dual_failed));
        w.end_object();
        w.key("http_requests").u64(v(&self.http_requests));
        w.end_object();
    }
}

/// `{"count": n, "mean": ms, "p50": ms, "p90": ms, "p99": ms}` (nulls with no observations).
fn latency(w: &mut crate::json::Writer<'_>, h: &HistogramSnapshot) {
    let ms = |s: Option<f64>| s.map_or(f64::NAN, |s| s * 1e3);
    w.begin_object();
    w.key("count").u64(h.count);
    w.key("mean").f64(ms(h.mean_s()), 3);
    for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        w.key(k).f64(ms(h.quantile(q)), 3);
    }
    w.end_object();
}

/// A metric's help and type lines.
fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A metric: its help and type lines, then one sample per (labels, value).
fn metric(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    head(o, name, kind, help);
    for (labels, value) in samples {
        let _ = match labels.is_empty() {
            true => writeln!(o, "{name} {value}"),
            false => writeln!(o, "{name}{{{labels}}} {value}"),
        };
    }
}

fn histogram(o: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let mut cum = 0;
    for (i, b) in BUCKETS.iter().enumerate() {
        cum += h.counts[i];
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
    }
    let n = h.count;
    let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {n}");
    let _ = writeln!(o, "{name}_sum{{{labels}}} {}", h.sum_ns as f64 / 1e9);
    let _ = writeln!(o, "{name}_count{{{labels}}} {n}");
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.stage(Stage::Decode, Duration::from_micros(300));
        m.stage(Stage::Decode, Duration::from_millis(7));
        m.stage(Stage::Decode, Duration::from_secs(60));
        m.failed(FailReason::UnknownFormat);
        let text = m.render(
            &[
                Summary {
                    name: "m\"1".into(),
                    backend: "builtin",
                    model_type: "camera-health",
                    provider: "builtin".into(),
                    device: "cpu".into(),
                    gpu_fallback: None,
                    ready: true,
                    error: None,
                    hash: 0,
                    frames: 0,
                    latency: Default::default(),
                },
                Summary {
                    name: "yolo".into(),
                    backend: "candle",
                    model_type: "object-detection",
                    provider: "cpu".into(),
                    device: "cpu".into(),
                    gpu_fallback: Some("no \"driver\"".into()),
                    ready: true,
                    error: None,
                    hash: 0,
                    frames: 0,
                    latency: Default::default(),
                },
            ],
            Reloads::default(),
        );
        assert!(text.contains("aei_stage_duration_seconds_bucket{stage=\"decode\",le=\"0.0005\"} 1\n"));
        assert!(text.contains("aei_stage_duration_seconds_bucket{stage=\"decode\",le=\"0.01\"} 2\n"));
        assert!(text.contains("aei_stage_duration_seconds_bucket{stage=\"decode\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("aei_frames_failed_total{reason=\"unknown_format\"} 1\n"));
        assert!(text.contains(
            "aei_model_ready{model=\"m\\\"1\",backend=\"builtin\",type=\"camera-health\",provider=\"builtin\",device=\"cpu\"} 1\n"
        ));
        assert!(text.contains(
            "aei_model_gpu_fallback{model=\"yolo\",backend=\"candle\",device=\"cpu\",reason=\"no \\\"driver\\\"\"} 1\n"
        ));
        assert_eq!(
            text.matches("aei_model_gpu_fallback{").count(),
            1,
            "only models that fell back"
        );
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket_as_prometheus_does() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile(0.5), None);
        // Four in (0.005, 0.01], four in (0.01, 0.025]: the median is the first bucket's top.
        for ms in [6, 7, 8, 9, 11, 12, 20, 24] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert!((s.quantile(0.5).unwrap() - 0.01).abs() < 1e-12);
        assert!((s.quantile(0.25).unwrap() - 0.0075).abs() < 1e-12);
        assert!((s.quantile(0.75).unwrap() - 0.0175).abs() < 1e-12);
        assert!((s.mean_s().unwrap() - 0.012125).abs() < 1e-9);
        // Above the last bucket: its bound, as histogram_quantile answers.
        h.observe(Duration::from_secs(60));
        assert_eq!(h.snapshot().quantile(1.0), Some(10.0));
    }
}
