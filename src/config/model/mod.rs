//! Model configs: one YAML file per model, validated into typed values.
//!
//! Owns: the schema's types, and finding and reading config files. The rooms
//! below: `yaml.rs` (typed getters over YAML values, errors naming file, key
//! and expectation), `parse.rs` (the schema's keys, defaults and checks),
//! `builtin.rs` (the built-in models), `labels.rs` (class names: ImageNet's,
//! and those a model file's metadata carries), `describe.rs` (the
//! `check-config` printer). Does not load model weights; `backend/` does that.

mod builtin;
mod describe;
mod labels;
mod parse;
mod yaml;

pub use builtin::{builtin_camera_health, builtin_classifier, EMBEDDED_MODEL};
pub use describe::describe;
pub use labels::{parse_names, IMAGENET_LABELS};
pub use parse::{parse, PROVIDERS};

use std::fmt;
use std::path::{Path, PathBuf};

use super::Settings;
use crate::topic::{TopicFilter, TopicTemplate};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Candle,
    Onnx,
    Dual,
    /// Built-in analysis without an ML backend (camera health).
    Builtin,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Candle => "candle",
            BackendKind::Onnx => "onnx",
            BackendKind::Dual => "dual",
            BackendKind::Builtin => "builtin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Classification,
    Detection,
    CameraHealth,
    /// Numeric readings (a window of the last N per device) scored by an autoencoder's
    /// reconstruction error or a one-output model's score, against a threshold.
    SensorAnomaly,
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Classification => "image-classification",
            ModelType::Detection => "object-detection",
            ModelType::CameraHealth => "camera-health",
            ModelType::SensorAnomaly => "sensor-anomaly",
        }
    }

    /// Takes sensor readings rather than pictures.
    /// Whether its results can be drawn on the picture (`annotate.rs`).
    pub fn draws(self) -> bool {
        matches!(self, ModelType::Classification | ModelType::Detection)
    }

    pub fn is_sensor(self) -> bool {
        self == ModelType::SensorAnomaly
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// Taken from the model's metadata (or class indices when it has none).
    FromModel,
    Inline(Vec<String>),
    /// One label per line.
    File(PathBuf, Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ResizeMode {
    Stretch,
    Letterbox {
        pad_value: u8,
    },
    /// Resize so the short side is `resize_short`, then crop the centre.
    CenterCrop {
        resize_short: u32,
    },
}

/// How pixels are sampled when the image is resized to the model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeFilter {
    /// The pixel under each output pixel's centre (Pillow's `NEAREST`).
    Nearest,
    /// Two by two taps at the output pixel's centre, no antialiasing: OpenCV's
    /// `INTER_LINEAR`, as Ultralytics' letterbox resizes.
    Bilinear,
    /// Pillow's antialiased `BILINEAR` (a triangle filter widened by the
    /// shrink factor): what torchvision's `Resize` does to a PIL image.
    BilinearAntialias,
    /// Pillow's antialiased `BICUBIC` (a = -0.5).
    Bicubic,
    /// Pillow's `BOX`: the mean of the source pixels each output pixel covers
    /// (OpenCV's `INTER_AREA` when shrinking by a whole factor).
    Area,
}

impl ResizeFilter {
    pub const NAMES: &'static str = "nearest, bilinear, bilinear-antialias, bicubic or area";

    pub fn as_str(self) -> &'static str {
        match self {
            ResizeFilter::Nearest => "nearest",
            ResizeFilter::Bilinear => "bilinear",
            ResizeFilter::BilinearAntialias => "bilinear-antialias",
            ResizeFilter::Bicubic => "bicubic",
            ResizeFilter::Area => "area",
        }
    }

    pub fn parse(name: &str) -> Option<ResizeFilter> {
        Some(match name.to_ascii_lowercase().replace('_', "-").as_str() {
            "nearest" => ResizeFilter::Nearest,
            "bilinear" | "linear" | "inter-linear" => ResizeFilter::Bilinear,
            "bilinear-antialias" | "antialias-bilinear" | "pil-bilinear" | "triangle" => {
                ResizeFilter::BilinearAntialias
            }
            "bicubic" | "pil-bicubic" => ResizeFilter::Bicubic,
            "area" | "box" | "inter-area" => ResizeFilter::Area,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    pub width: u32,
    pub height: u32,
    pub mode: ResizeMode,
    /// Default: `bilinear-antialias` for center-crop (torchvision's), `bilinear` otherwise (OpenCV's).
    pub filter: ResizeFilter,
    /// Scale pixels to [0, 1] before mean/std; otherwise they stay 0..255.
    pub normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub channel_order: ChannelOrder,
    pub layout: Layout,
}

/// Whether classifier outputs still need a softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Softmax {
    /// Apply it unless the outputs already look like probabilities.
    Auto,
    Always,
    Never,
}

/// YOLO output layout: v5 has an objectness column, v8 and later do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloVersion {
    Auto,
    V5,
    V8,
}

/// A GPU asked for (`gpu_enabled`) that cannot be used: no driver, no device, the library or
/// the provider missing, or the build without `cuda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPolicy {
    /// Refuse to load the model, with the reason.
    Require,
    /// Run on the CPU, with a warning and the reason shown wherever the model's device is.
    Fallback,
}

impl GpuPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuPolicy::Require => "require",
            GpuPolicy::Fallback => "fallback",
        }
    }

    pub fn parse(s: &str) -> Option<GpuPolicy> {
        match s {
            "require" => Some(GpuPolicy::Require),
            "fallback" => Some(GpuPolicy::Fallback),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptLevel {
    Disable,
    Basic,
    Extended,
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inference {
    pub confidence_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
    pub batch_size: usize,
    pub gpu_enabled: bool,
    /// Which GPU (CUDA device ordinal) when `gpu_enabled`.
    pub gpu_device: usize,
    /// What happens when a GPU is asked for and cannot be used.
    pub gpu_policy: GpuPolicy,
    /// ONNX Runtime's CUDA/TensorRT providers: the most device memory their arena may take
    /// (MiB; 0: no limit).
    pub gpu_memory_limit_mb: u64,
    /// TensorRT: where built engines are cached between starts (none: rebuilt each load).
    pub tensorrt_engine_cache: Option<PathBuf>,
    /// TensorRT: build fp16 engines.
    pub tensorrt_fp16: bool,
    /// Classification: how many classes to report.
    pub top_k: usize,
    pub softmax: Softmax,
    /// Detection: NMS across classes instead of per class.
    pub class_agnostic_nms: bool,
    pub yolo_version: YoloVersion,
    /// Backend threads within one operator (0: the CPU cores shared out among `instances`).
    pub intra_threads: usize,
    /// Copies of the engine that run frames in parallel (0: auto, see `models::instances`).
    pub instances: usize,
    /// ONNX Runtime's threads spin-wait for work after each run (off: they sleep, and leave the
    /// core to the decoding beside them).
    pub spinning: bool,
    /// ONNX Runtime's CPU arena (keeps its peak allocation for reuse) and its memory-pattern
    /// planning (allocates each run's intermediates as one block).
    pub cpu_arena: bool,
    pub memory_pattern: bool,
    /// Backend threads across operators.
    pub inter_threads: usize,
    pub optimization_level: OptLevel,
    /// Execution providers in priority order: cpu, cuda, tensorrt.
    pub execution_providers: Vec<String>,
    /// Dual mode: largest probability difference that still counts as agreement.
    pub dual_tolerance: f32,
}

impl Inference {
    /// Engine copies that run frames in parallel: `instances`, or when 0 (auto) one.
    /// Measured on 2 cores (BENCHMARKS.md, "Under load"): see `AUTO_INSTANCES`.
    pub fn engine_copies(&self) -> usize {
        match self.instances {
            0 => AUTO_INSTANCES,
            n => n,
        }
    }

    /// Threads within one operator for each copy: `intra_threads`, or when 0 the CPU
    /// cores shared out among the copies (at least one each).
    pub fn threads_per_copy(&self) -> usize {
        match self.intra_threads {
            0 => (cpu_cores() / self.engine_copies()).max(1),
            n => n,
        }
    }
}

/// `inference.instances: 0` means this many engine copies.
pub const AUTO_INSTANCES: usize = 1;

/// The CPU cores this process may use.
pub fn cpu_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Thresholds of the camera-health job.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Mean luma (0..255) below which a frame counts as black.
    pub black_threshold: f32,
    /// Variance of the Laplacian below which a frame counts as blurry.
    pub blur_threshold: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    /// The YAML file, or `None` for the built-in default.
    pub source: Option<PathBuf>,
    pub backend: BackendKind,
    pub model_path: Option<PathBuf>,
    /// Dual mode: the ONNX Runtime side's model (the same weights as an ONNX graph).
    pub onnx_model_path: Option<PathBuf>,
    pub model_type: ModelType,
    pub labels: Labels,
    pub preprocessing: Preprocessing,
    pub inference: Inference,
    pub health: Health,
    /// Classes that raise `alert_triggered`, with their own confidence thresholds.
    pub alerts: Vec<(String, f32)>,
    pub input_topics: Vec<TopicFilter>,
    pub output_topic: TopicTemplate,
    /// Dual mode: where `dual_backend_comparison` messages go.
    pub comparison_topic: TopicTemplate,
    /// Sensor models: the readings' mapping to the input (`None` for picture models).
    pub sensor: Option<Sensor>,
    /// Detection models: polygon zones per camera (`zones.rs`).
    pub zones: Vec<Zone>,
    /// Detection models: alert rules with hysteresis (`alerts/`); their events go to `alerts_topic`.
    pub alert_rules: Vec<AlertRule>,
    pub alerts_topic: TopicTemplate,
    /// Where the alert rules' state is kept across restarts (`alerts/state.rs`); `None`: lost.
    pub alert_state_file: Option<PathBuf>,
    /// Identity across snapshots (`tracks.rs`): `Some(max_gap_s)` when enabled.
    pub tracking: Option<f64>,
    /// Annotated pictures (`annotate.rs`): their JPEG settings, and where pictures of frames
    /// that start or end an alert go (`mqtt.annotated_topic_template`; none by default).
    pub annotations: Annotations,
}

/// How annotated pictures are encoded and sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotations {
    /// `None`: no pictures on MQTT (`infer --annotate` and `POST /infer?annotate=true` still work).
    pub topic: Option<TopicTemplate>,
    /// JPEG quality, 1..=100.
    pub quality: u8,
    /// A picture for MQTT over this is encoded again at lower quality, then skipped.
    pub max_bytes: usize,
    /// Per camera, at least this long between two pictures on the topic.
    pub min_interval_s: f64,
}

impl Default for Annotations {
    fn default() -> Annotations {
        Annotations {
            topic: None,
            quality: 80,
            max_bytes: DEFAULT_PICTURE_BYTES,
            min_interval_s: 10.0,
        }
    }
}

/// `annotations.max_bytes` unless a config says.
pub const DEFAULT_PICTURE_BYTES: usize = 1 << 20;

/// Most zones and alert rules one model may have (a detection's zones are a 64-bit mask).
pub const MAX_ZONES: usize = 64;
pub const MAX_ALERT_RULES: usize = 32;
/// Most vertices of one zone's polygon.
pub const MAX_ZONE_POINTS: usize = 64;

/// Which cameras a zone is drawn for.
#[derive(Debug, Clone, PartialEq)]
pub enum CameraMatch {
    /// A device id, exactly.
    Device(String),
    /// A topic filter the frame's topic matches (`+`, `#`).
    Topic(TopicFilter),
}

/// The point of a box that decides whether it is in a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// Where a person stands.
    BottomCenter,
    Center,
}

/// A polygon in normalised image coordinates (0..1, x right, y down) on some cameras.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub name: String,
    /// Empty: every camera.
    pub cameras: Vec<CameraMatch>,
    pub polygon: Vec<[f32; 2]>,
    /// Empty: every class.
    pub classes: Vec<String>,
    /// Smallest box, as a fraction of the image's area.
    pub min_area: f32,
    pub anchor: Anchor,
}

/// Raises, updates and ends alerts: `classes` (in `zone`, or anywhere) at `min_confidence` or
/// more, in at least `k` of the last `n` snapshots, or continuously for `for_s` seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRule {
    pub name: String,
    /// Empty: every class.
    pub classes: Vec<String>,
    pub zone: Option<String>,
    pub min_confidence: f32,
    pub k: u32,
    pub n: u32,
    /// Seconds the condition must hold (0: use `k` of `n`).
    pub for_s: f64,
    /// After an end, no new start for this long.
    pub cooldown_s: f64,
    /// The condition must stay cleared this long before the alert ends.
    pub clear_s: f64,
}

impl ModelConfig {
    /// Floats in one inference's input tensor.
    pub fn input_len(&self) -> usize {
        match &self.sensor {
            Some(s) => s.input_len(),
            None => {
                let p = &self.preprocessing;
                3 * p.width as usize * p.height as usize
            }
        }
    }

    /// The input tensor's shape: `[1, window x fields]` for sensor models, else NCHW or NHWC.
    pub fn input_shape(&self) -> Vec<usize> {
        let p = &self.preprocessing;
        match (&self.sensor, p.layout) {
            (Some(s), _) => vec![1, s.input_len()],
            (None, Layout::Nchw) => vec![1, 3, p.height as usize, p.width as usize],
            (None, Layout::Nhwc) => vec![1, p.height as usize, p.width as usize, 3],
        }
    }
}

/// How a sensor model's score is read from its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorScore {
    /// An autoencoder: the mean squared difference between its input and its output.
    ReconstructionError,
    /// The model's first output value itself (e.g. a fault probability).
    Output,
}

impl SensorScore {
    pub fn as_str(self) -> &'static str {
        match self {
            SensorScore::ReconstructionError => "reconstruction_error",
            SensorScore::Output => "output",
        }
    }
}

/// A sensor model's input: which fields of a reading, scaled how, over how many readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensor {
    /// The reading's fields in the order the model takes them.
    pub fields: Vec<String>,
    /// Per field: the model sees `(value - mean) / std`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Readings per inference (the last `window` of a device, oldest first); 1: each on its own.
    pub window: usize,
    pub score: SensorScore,
    /// A score above it is an anomaly (`alert_triggered`).
    pub threshold: f32,
    /// Devices whose windows are kept; the least recently heard is forgotten first.
    pub max_devices: usize,
    /// A device silent this long starts a fresh window.
    pub device_timeout_s: u64,
}

impl Sensor {
    /// Floats in one inference's input: `window x fields`.
    pub fn input_len(&self) -> usize {
        self.window * self.fields.len()
    }
}

/// Most fields a sensor model may take, and most readings in its window.
pub const MAX_SENSOR_FIELDS: usize = 64;
pub const MAX_SENSOR_WINDOW: usize = 256;
/// Most floats one sensor inference takes.
pub const MAX_SENSOR_INPUT: usize = MAX_SENSOR_FIELDS * MAX_SENSOR_WINDOW;

/// A config error: which file, which key, what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: `{}`: {}", self.file, self.key, self.message)
        }
    }
}

/// Loads `path`: one YAML file, or every `*.yaml`/`*.yml` in a directory
/// (sorted by name). Without a path, the built-in default: the embedded
/// EfficientNet-Lite0 on Candle in builds that have Candle, camera health
/// otherwise.
pub fn load(path: Option<&Path>, settings: &Settings) -> Result<Vec<ModelConfig>, ConfigError> {
    let Some(path) = path else {
        return Ok(vec![if cfg!(feature = "candle") {
            builtin_classifier(settings)?
        } else {
            builtin_camera_health(settings)?
        }]);
    };
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io_err(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ConfigError {
                file: path.display().to_string(),
                key: String::new(),
                message: "directory holds no *.yaml or *.yml model config".into(),
            });
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut models: Vec<ModelConfig> = Vec::new();
    for f in files {
        let m = load_file(&f, settings)?;
        if let Some(other) = models.iter().find(|o| o.name == m.name) {
            return Err(ConfigError {
                file: f.display().to_string(),
                key: "name".into(),
                message: format!(
                    "`{}` is already used by {}",
                    m.name,
                    other.source.as_deref().unwrap_or(Path::new("?")).display()
                ),
            });
        }
        models.push(m);
    }
    Ok(models)
}

pub(super) fn io_err(path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError {
        file: path.display().to_string(),
        key: String::new(),
        message: format!("cannot read: {e}"),
    }
}

pub fn load_file(path: &Path, settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let text = read_small(path, MAX_CONFIG_FILE).map_err(|e| ConfigError {
        file: path.display().to_string(),
        key: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path, settings)
}

/// Config files larger than this are refused.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// A UTF-8 text file of at most `limit` bytes.
pub(super) fn read_small(path: &Path, limit: u64) -> Result<String, String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > limit {
        return Err(format!("larger than {} MiB", limit >> 20));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::from_env_and_args(|_| None, &[]).unwrap().0
    }

    fn parse_str(text: &str) -> Result<ModelConfig, ConfigError> {
        parse(text, Path::new("/cfg/m.yaml"), &settings())
    }

    #[test]
    fn full_schema_parses() {
        let m = parse_str(
            r#"
name: "industrial-safety-detector"
backend: "onnx"
model_path: "models/x.onnx"
model_type: "object-detection"
labels: ["person", "helmet"]
preprocessing: { resize: [640, 480], mode: letterbox, pad_value: 0, normalize: true, mean: [0, 0, 0], std: [1, 1, 1], channel_order: bgr, layout: nhwc }
inference: { confidence_threshold: 0.7, iou_threshold: 0.45, max_detections: 100, batch_size: 1, gpu_enabled: true }
mqtt: { input_topics: ["edge-ai/+/+/+/camera/snapshots"], output_topic_template: "edge-ai/{business_unit}/{facility}/{gateway_id}/ai/inference/vision" }
"#,
        )
        .unwrap();
        assert_eq!(m.backend, BackendKind::Onnx);
        assert_eq!(m.model_path.as_deref(), Some(Path::new("/cfg/models/x.onnx")));
        assert_eq!(m.preprocessing.mode, ResizeMode::Letterbox { pad_value: 0 });
        assert_eq!((m.preprocessing.width, m.preprocessing.height), (640, 480));
        assert_eq!(m.preprocessing.channel_order, ChannelOrder::Bgr);
        assert_eq!(m.labels, Labels::Inline(vec!["person".into(), "helmet".into()]));
        assert!((m.inference.confidence_threshold - 0.7).abs() < 1e-6);
        assert!(!m.inference.gpu_enabled, "GPU_ENABLED=false overrides the model's wish");
        assert!(describe(&m).contains("mode: letterbox"));
    }

    #[test]
    fn errors_name_file_key_and_expectation() {
        let cases = [
            ("name: a\nmodel_type: image-classification\n", "/cfg/m.yaml: `model_path`: is required for image-classification"),
            ("name: a\nmodel_type: foo\n", "/cfg/m.yaml: `model_type`: expected image-classification, object-detection, camera-health or sensor-anomaly, found `foo`"),
            ("name: a\nmodel_type: camera-health\npreprocesing: {}\n", "/cfg/m.yaml: `preprocesing`: unknown key (expected one of: name, backend, model_path, onnx_model_path, model_type, labels, preprocessing, inference, health, alerts, zones, alert_rules, alert_state_file, tracking, annotations, mqtt, sensor)"),
            ("name: a\nmodel_type: sensor-anomaly\nmodel_path: m\n", "/cfg/m.yaml: `sensor`: is required for sensor-anomaly"),
            ("name: a\nmodel_type: sensor-anomaly\nmodel_path: m\nsensor: { fields: [t, v] }\n", "/cfg/m.yaml: `sensor.threshold`: is required"),
            ("name: a\nmodel_type: sensor-anomaly\nmodel_path: m\nsensor: { fields: [t, v], mean: [1], threshold: 1 }\n", "/cfg/m.yaml: `sensor.mean`: expected 2 numbers, one per field"),
            ("name: a\nmodel_type: sensor-anomaly\nmodel_path: m\nsensor: { fields: [t, t], threshold: 1 }\n", "/cfg/m.yaml: `sensor.fields`: `t` is named twice"),
            ("name: a\nmodel_type: sensor-anomaly\nmodel_path: m\nsensor: { fields: [t], std: [0], threshold: 1 }\n", "/cfg/m.yaml: `sensor.std`: every value must be above 0"),
            ("name: a\nmodel_type: sensor-anomaly\nmodel_path: m\nsensor: { fields: [t], window: 1000, threshold: 1 }\n", "/cfg/m.yaml: `sensor.window`: expected a whole number in 1..=256"),
            ("name: a\nmodel_type: camera-health\nsensor: { fields: [t] }\n", "/cfg/m.yaml: `sensor`: only sensor models take it"),
            ("name: a\nmodel_type: camera-health\ninference: { iou_threshold: 2 }\n", "/cfg/m.yaml: `inference.iou_threshold`: expected a number in 0..=1, found 2"),
            ("name: a\nmodel_type: camera-health\npreprocessing: { resize: 224 }\n", "/cfg/m.yaml: `preprocessing.resize`: expected [width, height], found the number 224"),
            ("name: a\nmodel_type: camera-health\npreprocessing: { resize: [224, &a] }\n", "/cfg/m.yaml: `preprocessing.resize[1]`: a list item is empty (found null)"),
            ("name: a\nmodel_type: camera-health\npreprocessing: { mean: [1, ~, 1] }\n", "/cfg/m.yaml: `preprocessing.mean[1]`: a list item is empty (found null)"),
            ("name: a\nmodel_type: image-classification\nmodel_path: m\nbackend: tflite\n", "/cfg/m.yaml: `backend`: expected candle, onnx or dual, found `tflite`"),
            ("name: [\n", "/cfg/m.yaml: not valid YAML"),
            ("name: a\nmodel_type: camera-health\nmqtt: { input_topics: [\"azure-iot-operations/data/+/+\"] }\n", "/cfg/m.yaml: `MQTT_OUTPUT_TOPIC_TEMPLATE`: template `edge-ai/{business_unit}"),
        ];
        for (text, want) in cases {
            let got = parse_str(text).unwrap_err().to_string();
            assert!(got.starts_with(want), "got:  {got}\nwant: {want}");
        }
    }

    #[test]
    fn defaults_follow_model_type_and_settings() {
        let m = parse_str("name: cls\nmodel_type: image-classification\nmodel_path: m.safetensors\n").unwrap();
        assert_eq!(m.backend, BackendKind::Candle);
        assert_eq!(m.preprocessing.mode, ResizeMode::CenterCrop { resize_short: 256 });
        let d = parse_str("name: det\nmodel_type: object-detection\nmodel_path: m.onnx\n").unwrap();
        assert_eq!(d.preprocessing.mode, ResizeMode::Letterbox { pad_value: 114 });
        assert_eq!((d.preprocessing.width, d.preprocessing.height), (640, 640));
        let mut s = settings();
        s.enable_dual = true;
        let m = parse(
            "name: c\nmodel_type: image-classification\nmodel_path: m\nbackend: onnx\n",
            Path::new("x.yaml"),
            &s,
        );
        assert_eq!(m.unwrap().backend, BackendKind::Dual);
        let h = builtin_camera_health(&settings()).unwrap();
        assert_eq!(h.input_topics[0].subscription(), "edge-ai/+/+/+/camera/snapshots");
    }

    #[test]
    fn check_config_output_parses_back_to_the_same_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut configs: Vec<ModelConfig> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| load_file(&p, &settings()).unwrap())
            .collect();
        assert!(configs.len() >= 5);
        configs.push(builtin_camera_health(&settings()).unwrap());
        configs.push(
            parse_str("name: ab\nmodel_type: image-classification\nmodel_path: m.onnx\nlabels: [\"x\", \"y: \\\"z\\\"\"]\nalerts: {\"x\": 0.25}\n")
                .unwrap(),
        );
        configs.push(
            parse_str(
                "name: z\nmodel_type: object-detection\nmodel_path: m.onnx\n\
                 zones:\n  - name: door\n    polygon: [[0, 0], [0.5, 0], [0.5, 0.7]]\n\
                 alert_rules:\n  - name: r\n    zone: door\n    for_s: 2.5\n\
                 alert_state_file: state/z.json\n\
                 tracking:\n  enabled: true\n  max_gap_s: 4.5\n\
                 annotations:\n  quality: 65\n  max_bytes: 200000\n  min_interval_s: 0.3\n\
                 mqtt:\n  input_topics: [\"a/{gateway_id}/+\"]\n  output_topic_template: \"r/{gateway_id}\"\n  alerts_topic_template: \"al/{gateway_id}\"\n  annotated_topic_template: \"p/{gateway_id}/pic\"\n",
            )
            .unwrap(),
        );
        for c in configs {
            let text = describe(&c);
            let back =
                parse(&text, Path::new("/elsewhere/x.yaml"), &settings()).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(
                ModelConfig { source: None, ..back },
                ModelConfig { source: None, ..c },
                "{text}"
            );
        }
    }

    #[test]
    fn dual_mode_still_refuses_an_unknown_backend() {
        let mut s = settings();
        s.enable_dual = true;
        let e = parse(
            "name: a\nmodel_type: image-classification\nmodel_path: m.onnx\nbackend: tensorflow\n",
            Path::new("/c/m.yaml"),
            &s,
        )
        .unwrap_err();
        assert_eq!(e.key, "backend", "{e}");
        let ok = parse(
            "name: a\nmodel_type: image-classification\nmodel_path: m.onnx\nbackend: onnx\n",
            Path::new("/c/m.yaml"),
            &s,
        )
        .unwrap();
        assert_eq!(ok.backend, BackendKind::Dual);
    }
}
