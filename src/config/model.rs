//! Model configs: one YAML file per model, validated into typed values.
//!
//! Owns: the YAML schema, defaults and validation messages (file, key, what
//! was expected). Does not load model weights; `backend/` does that.

use std::fmt;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

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
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Classification => "image-classification",
            ModelType::Detection => "object-detection",
            ModelType::CameraHealth => "camera-health",
        }
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
}

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

const TOP_KEYS: &[&str] = &[
    "name",
    "backend",
    "model_path",
    "onnx_model_path",
    "model_type",
    "labels",
    "preprocessing",
    "inference",
    "health",
    "alerts",
    "mqtt",
];
const PRE_KEYS: &[&str] = &[
    "resize",
    "mode",
    "pad_value",
    "resize_short",
    "normalize",
    "mean",
    "std",
    "channel_order",
    "layout",
];
const INF_KEYS: &[&str] = &[
    "confidence_threshold",
    "iou_threshold",
    "max_detections",
    "batch_size",
    "gpu_enabled",
    "top_k",
    "softmax",
    "class_agnostic_nms",
    "yolo_version",
    "intra_threads",
    "instances",
    "spinning",
    "cpu_arena",
    "memory_pattern",
    "inter_threads",
    "optimization_level",
    "execution_providers",
    "dual_tolerance",
];
/// Execution providers a config may name.
pub const PROVIDERS: &[&str] = &["cpu", "cuda", "tensorrt"];
const HEALTH_KEYS: &[&str] = &["black_threshold", "blur_threshold"];
const MQTT_KEYS: &[&str] = &["input_topics", "output_topic_template", "comparison_topic_template"];

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

fn io_err(path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError {
        file: path.display().to_string(),
        key: String::new(),
        message: format!("cannot read: {e}"),
    }
}

/// ImageNet-1k class names, in index order (torchvision's list; see models/NOTICE).
pub const IMAGENET_LABELS: &str = include_str!("../../models/imagenet-labels.txt");

/// The default of Candle builds: EfficientNet-Lite0 with its weights embedded
/// in the binary, on the service-wide topics.
pub fn builtin_classifier(settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let ctx = Ctx {
        file: "built-in EfficientNet-Lite0 (MQTT_INPUT_TOPICS, MQTT_OUTPUT_TOPIC_TEMPLATE)".into(),
    };
    let (input_topics, output_topic, comparison_topic) = ctx.topics(&Yaml::BadValue, settings)?;
    let mut inference = ctx.inference(&Yaml::BadValue, settings)?;
    inference.confidence_threshold = 0.0;
    Ok(ModelConfig {
        name: "efficientnet-lite0".into(),
        source: None,
        backend: if settings.enable_dual {
            BackendKind::Dual
        } else {
            BackendKind::Candle
        },
        model_path: Some(PathBuf::from(crate::backend::EMBEDDED_MODEL)),
        onnx_model_path: None,
        model_type: ModelType::Classification,
        labels: Labels::Inline(IMAGENET_LABELS.lines().map(str::to_owned).collect()),
        preprocessing: Preprocessing {
            width: 224,
            height: 224,
            mode: ResizeMode::CenterCrop { resize_short: 256 },
            normalize: false,
            mean: [127.0; 3],
            std: [128.0; 3],
            channel_order: ChannelOrder::Rgb,
            layout: Layout::Nchw,
        },
        inference,
        health: ctx.health(&Yaml::BadValue)?,
        alerts: Vec::new(),
        input_topics,
        output_topic,
        comparison_topic,
    })
}

/// The default job of builds without Candle: camera health on the
/// service-wide input topics.
pub fn builtin_camera_health(settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let ctx = Ctx {
        file: "built-in camera-health model (MQTT_INPUT_TOPICS, MQTT_OUTPUT_TOPIC_TEMPLATE)".into(),
    };
    let (input_topics, output_topic, comparison_topic) = ctx.topics(&Yaml::BadValue, settings)?;
    Ok(ModelConfig {
        name: "camera-health".into(),
        source: None,
        backend: BackendKind::Builtin,
        model_path: None,
        onnx_model_path: None,
        model_type: ModelType::CameraHealth,
        labels: Labels::FromModel,
        preprocessing: ctx.preprocessing(&Yaml::BadValue, ModelType::CameraHealth)?,
        inference: ctx.inference(&Yaml::BadValue, settings)?,
        health: ctx.health(&Yaml::BadValue)?,
        alerts: Vec::new(),
        input_topics,
        output_topic,
        comparison_topic,
    })
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

/// Parses one config's text; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path, settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let ctx = Ctx {
        file: path.display().to_string(),
    };
    let docs = YamlLoader::load_from_str(text).map_err(|e| ctx.err("", format!("not valid YAML: {e}")))?;
    let doc = match docs.as_slice() {
        [d] => d,
        [] => return Err(ctx.err("", "the file is empty".into())),
        _ => return Err(ctx.err("", "expected one YAML document, found several".into())),
    };
    ctx.known_keys(doc, "", TOP_KEYS)?;
    let name = ctx
        .string(&doc["name"], "name")?
        .ok_or_else(|| ctx.err("name", "is required".into()))?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(ctx.err(
            "name",
            format!("expected letters, digits, `-`, `_` or `.`, found `{name}`"),
        ));
    }
    let model_type = match ctx.string(&doc["model_type"], "model_type")?.as_deref() {
        Some("image-classification") => ModelType::Classification,
        Some("object-detection") => ModelType::Detection,
        Some("camera-health") => ModelType::CameraHealth,
        Some(other) => {
            return Err(ctx.err(
                "model_type",
                format!("expected image-classification, object-detection or camera-health, found `{other}`"),
            ))
        }
        None => return Err(ctx.err("model_type", "is required".into())),
    };
    let backend = match (model_type, ctx.string(&doc["backend"], "backend")?.as_deref()) {
        (ModelType::CameraHealth, None | Some("builtin")) => BackendKind::Builtin,
        (ModelType::CameraHealth, Some(other)) => {
            return Err(ctx.err(
                "backend",
                format!("camera-health needs no ML backend; omit it (found `{other}`)"),
            ))
        }
        (_, Some(other)) if !matches!(other, "candle" | "onnx" | "dual") => {
            return Err(ctx.err("backend", format!("expected candle, onnx or dual, found `{other}`")))
        }
        (_, _) if settings.enable_dual => BackendKind::Dual,
        (_, None) => settings.default_backend,
        (_, Some("candle")) => BackendKind::Candle,
        (_, Some("onnx")) => BackendKind::Onnx,
        (_, Some(_)) => BackendKind::Dual,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let model_path = ctx.string(&doc["model_path"], "model_path")?.map(|p| {
        if p.starts_with("embedded:") {
            PathBuf::from(p)
        } else {
            base.join(p)
        }
    });
    if model_path.is_none() && model_type != ModelType::CameraHealth {
        return Err(ctx.err("model_path", format!("is required for {}", model_type.as_str())));
    }
    let onnx_model_path = ctx
        .string(&doc["onnx_model_path"], "onnx_model_path")?
        .map(|p| base.join(p));
    let labels = match &doc["labels"] {
        Yaml::BadValue | Yaml::Null => Labels::FromModel,
        Yaml::Array(items) => Labels::Inline(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    scalar_text(v).ok_or_else(|| ctx.err(&format!("labels[{i}]"), "expected a label string".into()))
                })
                .collect::<Result<_, _>>()?,
        ),
        Yaml::String(p) => {
            let file = base.join(p);
            let text = read_small(&file, MAX_LABELS_FILE)
                .map_err(|e| ctx.err("labels", format!("cannot read labels file {}: {e}", file.display())))?;
            let labels: Vec<String> = text
                .lines()
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect();
            if labels.is_empty() {
                return Err(ctx.err("labels", format!("labels file {} holds no labels", file.display())));
            }
            Labels::File(file, labels)
        }
        other => {
            return Err(ctx.err(
                "labels",
                format!("expected a list or a file path, found {}", kind(other)),
            ))
        }
    };
    let (input_topics, output_topic, comparison_topic) = ctx.topics(&doc["mqtt"], settings)?;
    if backend == BackendKind::Dual {
        for f in &input_topics {
            comparison_topic
                .check_against(f)
                .map_err(|e| ctx.err("mqtt.comparison_topic_template", e.0))?;
        }
    }
    Ok(ModelConfig {
        name,
        source: Some(path.to_path_buf()),
        backend,
        model_path,
        onnx_model_path,
        model_type,
        labels,
        preprocessing: ctx.preprocessing(&doc["preprocessing"], model_type)?,
        inference: ctx.inference(&doc["inference"], settings)?,
        health: ctx.health(&doc["health"])?,
        alerts: ctx.alerts(&doc["alerts"])?,
        input_topics,
        output_topic,
        comparison_topic,
    })
}

/// Labels files larger than this are refused (a path such as `/dev/zero` must not hang a load).
const MAX_LABELS_FILE: u64 = 16 << 20;

/// A UTF-8 text file of at most `limit` bytes.
fn read_small(path: &Path, limit: u64) -> Result<String, String> {
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

struct Ctx {
    file: String,
}

impl Ctx {
    fn err(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_owned(),
            message,
        }
    }

    fn known_keys(&self, v: &Yaml, prefix: &str, known: &[&str]) -> Result<(), ConfigError> {
        let hash = match v {
            Yaml::Hash(h) => h,
            Yaml::BadValue => return Ok(()),
            other => {
                let key = prefix.trim_end_matches('.');
                return Err(self.err(key, format!("expected a mapping, found {}", kind(other))));
            }
        };
        for k in hash.keys() {
            let name = scalar_text(k).unwrap_or_default();
            if !known.contains(&name.as_str()) {
                return Err(self.err(
                    &format!("{prefix}{name}"),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn string(&self, v: &Yaml, key: &str) -> Result<Option<String>, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::String(s) => Ok(Some(s.trim().to_owned())),
            other => Err(self.err(key, format!("expected a string, found {}", kind(other)))),
        }
    }

    fn float(&self, v: &Yaml, key: &str, default: f32, min: f32, max: f32) -> Result<f32, ConfigError> {
        let x = match v {
            Yaml::BadValue | Yaml::Null => return Ok(default),
            Yaml::Integer(i) => *i as f64,
            Yaml::Real(_) => v.as_f64().unwrap_or(f64::NAN),
            other => return Err(self.err(key, format!("expected a number, found {}", kind(other)))),
        };
        if !(min as f64..=max as f64).contains(&x) {
            return Err(self.err(key, format!("expected a number in {min}..={max}, found {x}")));
        }
        Ok(x as f32)
    }

    fn int(&self, v: &Yaml, key: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(default),
            Yaml::Integer(i) if (min as i64..=max as i64).contains(i) => Ok(*i as u64),
            other => Err(self.err(
                key,
                format!("expected a whole number in {min}..={max}, found {}", kind(other)),
            )),
        }
    }

    fn boolean(&self, v: &Yaml, key: &str, default: bool) -> Result<bool, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(default),
            Yaml::Boolean(b) => Ok(*b),
            other => Err(self.err(key, format!("expected true or false, found {}", kind(other)))),
        }
    }

    fn triple(&self, v: &Yaml, key: &str, default: [f32; 3]) -> Result<[f32; 3], ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(default),
            Yaml::Array(a) if a.len() == 3 => {
                let mut out = [0.0; 3];
                for (i, x) in a.iter().enumerate() {
                    out[i] = self.float(x, &format!("{key}[{i}]"), 0.0, -1e6, 1e6)?;
                }
                Ok(out)
            }
            other => Err(self.err(key, format!("expected a list of 3 numbers, found {}", kind(other)))),
        }
    }

    fn preprocessing(&self, v: &Yaml, model_type: ModelType) -> Result<Preprocessing, ConfigError> {
        self.known_keys(v, "preprocessing.", PRE_KEYS)?;
        let (dw, dh, dmode) = match model_type {
            ModelType::Detection => (640, 640, "letterbox"),
            _ => (224, 224, "center-crop"),
        };
        let (width, height) = match &v["resize"] {
            Yaml::BadValue | Yaml::Null => (dw, dh),
            Yaml::Array(a) if a.len() == 2 => (
                self.int(&a[0], "preprocessing.resize[0]", 0, 8, 8192)? as u32,
                self.int(&a[1], "preprocessing.resize[1]", 0, 8, 8192)? as u32,
            ),
            other => {
                return Err(self.err(
                    "preprocessing.resize",
                    format!("expected [width, height], found {}", kind(other)),
                ))
            }
        };
        let mode_name = self
            .string(&v["mode"], "preprocessing.mode")?
            .unwrap_or_else(|| dmode.to_owned());
        let mode = match mode_name.as_str() {
            "stretch" => ResizeMode::Stretch,
            "letterbox" => ResizeMode::Letterbox {
                pad_value: self.int(&v["pad_value"], "preprocessing.pad_value", 114, 0, 255)? as u8,
            },
            "center-crop" | "resize-short-side-center-crop" => {
                let default_short = (width.max(height) as f32 / 0.875).round() as u64;
                let short = self.int(
                    &v["resize_short"],
                    "preprocessing.resize_short",
                    default_short,
                    8,
                    16384,
                )? as u32;
                if short < width.max(height) {
                    return Err(self.err(
                        "preprocessing.resize_short",
                        format!("must be at least the crop size {}, found {short}", width.max(height)),
                    ));
                }
                ResizeMode::CenterCrop { resize_short: short }
            }
            other => {
                return Err(self.err(
                    "preprocessing.mode",
                    format!("expected stretch, letterbox or center-crop, found `{other}`"),
                ))
            }
        };
        let std = self.triple(&v["std"], "preprocessing.std", [1.0; 3])?;
        if std.contains(&0.0) {
            return Err(self.err("preprocessing.std", "must not contain 0".into()));
        }
        Ok(Preprocessing {
            width,
            height,
            mode,
            normalize: self.boolean(&v["normalize"], "preprocessing.normalize", true)?,
            mean: self.triple(&v["mean"], "preprocessing.mean", [0.0; 3])?,
            std,
            channel_order: match self
                .string(&v["channel_order"], "preprocessing.channel_order")?
                .as_deref()
            {
                None | Some("rgb" | "RGB") => ChannelOrder::Rgb,
                Some("bgr" | "BGR") => ChannelOrder::Bgr,
                Some(o) => {
                    return Err(self.err(
                        "preprocessing.channel_order",
                        format!("expected rgb or bgr, found `{o}`"),
                    ))
                }
            },
            layout: match self.string(&v["layout"], "preprocessing.layout")?.as_deref() {
                None | Some("nchw" | "NCHW") => Layout::Nchw,
                Some("nhwc" | "NHWC") => Layout::Nhwc,
                Some(o) => return Err(self.err("preprocessing.layout", format!("expected nchw or nhwc, found `{o}`"))),
            },
        })
    }

    fn inference(&self, v: &Yaml, settings: &Settings) -> Result<Inference, ConfigError> {
        self.known_keys(v, "inference.", INF_KEYS)?;
        let batch_size = self.int(&v["batch_size"], "inference.batch_size", 1, 1, 1)? as usize;
        let choice = |key: &str, options: &[&str], default: &str| -> Result<String, ConfigError> {
            let k = format!("inference.{key}");
            let s = match &v[key] {
                Yaml::Boolean(b) => b.to_string(),
                other => self.string(other, &k)?.unwrap_or_else(|| default.to_owned()),
            };
            if options.contains(&s.as_str()) {
                Ok(s)
            } else {
                Err(self.err(&k, format!("expected one of {}, found `{s}`", options.join(", "))))
            }
        };
        let execution_providers = match &v["execution_providers"] {
            Yaml::BadValue | Yaml::Null => vec!["cpu".to_owned()],
            Yaml::Array(a) if !a.is_empty() => a
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let k = format!("inference.execution_providers[{i}]");
                    match self.string(p, &k)? {
                        Some(p) if PROVIDERS.contains(&p.as_str()) => Ok(p),
                        other => Err(self.err(
                            &k,
                            format!(
                                "expected one of {}, found `{}`",
                                PROVIDERS.join(", "),
                                other.unwrap_or_default()
                            ),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(self.err(
                    "inference.execution_providers",
                    format!("expected a list such as [cuda, cpu], found {}", kind(other)),
                ))
            }
        };
        Ok(Inference {
            top_k: self.int(&v["top_k"], "inference.top_k", 5, 1, 1000)? as usize,
            softmax: match choice("softmax", &["auto", "true", "false"], "auto")?.as_str() {
                "true" => Softmax::Always,
                "false" => Softmax::Never,
                _ => Softmax::Auto,
            },
            class_agnostic_nms: self.boolean(&v["class_agnostic_nms"], "inference.class_agnostic_nms", false)?,
            yolo_version: match choice("yolo_version", &["auto", "v5", "v8"], "auto")?.as_str() {
                "v5" => YoloVersion::V5,
                "v8" => YoloVersion::V8,
                _ => YoloVersion::Auto,
            },
            intra_threads: self.int(&v["intra_threads"], "inference.intra_threads", 0, 0, 256)? as usize,
            instances: self.int(&v["instances"], "inference.instances", 0, 0, 16)? as usize,
            spinning: self.boolean(&v["spinning"], "inference.spinning", false)?,
            cpu_arena: self.boolean(&v["cpu_arena"], "inference.cpu_arena", true)?,
            memory_pattern: self.boolean(&v["memory_pattern"], "inference.memory_pattern", false)?,
            inter_threads: self.int(&v["inter_threads"], "inference.inter_threads", 1, 1, 256)? as usize,
            optimization_level: match choice("optimization_level", &["disable", "basic", "extended", "all"], "all")?
                .as_str()
            {
                "disable" => OptLevel::Disable,
                "basic" => OptLevel::Basic,
                "extended" => OptLevel::Extended,
                _ => OptLevel::All,
            },
            execution_providers,
            dual_tolerance: self.float(&v["dual_tolerance"], "inference.dual_tolerance", 0.005, 0.0, 1.0)?,
            confidence_threshold: self.float(
                &v["confidence_threshold"],
                "inference.confidence_threshold",
                0.25,
                0.0,
                1.0,
            )?,
            iou_threshold: self.float(&v["iou_threshold"], "inference.iou_threshold", 0.45, 0.0, 1.0)?,
            max_detections: self.int(&v["max_detections"], "inference.max_detections", 100, 1, 10000)? as usize,
            batch_size,
            gpu_enabled: self.boolean(&v["gpu_enabled"], "inference.gpu_enabled", settings.gpu_enabled)?
                && settings.gpu_enabled,
        })
    }

    fn alerts(&self, v: &Yaml) -> Result<Vec<(String, f32)>, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(Vec::new()),
            Yaml::Hash(h) => h
                .iter()
                .map(|(k, t)| {
                    let label = scalar_text(k).unwrap_or_default();
                    let threshold = self.float(t, &format!("alerts.{label}"), 0.5, 0.0, 1.0)?;
                    Ok((label, threshold))
                })
                .collect(),
            other => Err(self.err(
                "alerts",
                format!(
                    "expected a mapping of class label to threshold, e.g. {{person: 0.5}}, found {}",
                    kind(other)
                ),
            )),
        }
    }

    fn health(&self, v: &Yaml) -> Result<Health, ConfigError> {
        self.known_keys(v, "health.", HEALTH_KEYS)?;
        Ok(Health {
            black_threshold: self.float(&v["black_threshold"], "health.black_threshold", 16.0, 0.0, 255.0)?,
            blur_threshold: self.float(&v["blur_threshold"], "health.blur_threshold", 20.0, 0.0, 1e9)?,
        })
    }

    fn topics(
        &self,
        v: &Yaml,
        settings: &Settings,
    ) -> Result<(Vec<TopicFilter>, TopicTemplate, TopicTemplate), ConfigError> {
        self.known_keys(v, "mqtt.", MQTT_KEYS)?;
        let (texts, key): (Vec<String>, &str) = match &v["input_topics"] {
            Yaml::BadValue | Yaml::Null => (settings.input_topics.clone(), "MQTT_INPUT_TOPICS"),
            Yaml::Array(a) if !a.is_empty() => (
                a.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        scalar_text(t).ok_or_else(|| {
                            self.err(&format!("mqtt.input_topics[{i}]"), "expected a topic filter".into())
                        })
                    })
                    .collect::<Result<_, _>>()?,
                "mqtt.input_topics",
            ),
            Yaml::String(s) => (vec![s.clone()], "mqtt.input_topics"),
            other => {
                return Err(self.err(
                    "mqtt.input_topics",
                    format!("expected a list of topic filters, found {}", kind(other)),
                ))
            }
        };
        let filters: Vec<TopicFilter> = texts
            .iter()
            .map(|t| TopicFilter::parse(t).map_err(|e| self.err(key, e.0)))
            .collect::<Result<_, _>>()?;
        let (tpl_text, tkey) = match self.string(&v["output_topic_template"], "mqtt.output_topic_template")? {
            Some(t) => (t, "mqtt.output_topic_template"),
            None => (settings.output_topic_template.clone(), "MQTT_OUTPUT_TOPIC_TEMPLATE"),
        };
        let tpl = TopicTemplate::parse(&tpl_text).map_err(|e| self.err(tkey, e.0))?;
        for f in &filters {
            tpl.check_against(f).map_err(|e| self.err(tkey, e.0))?;
        }
        let (cmp_text, ckey) = match self.string(&v["comparison_topic_template"], "mqtt.comparison_topic_template")? {
            Some(t) => (t, "mqtt.comparison_topic_template"),
            None => (
                settings.comparison_topic_template.clone(),
                "MQTT_COMPARISON_TOPIC_TEMPLATE",
            ),
        };
        let cmp = TopicTemplate::parse(&cmp_text).map_err(|e| self.err(ckey, e.0))?;
        // Only dual models publish comparisons; others need not bind its variables.
        Ok((filters, tpl, cmp))
    }
}

fn scalar_text(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kind(v: &Yaml) -> String {
    match v {
        Yaml::Real(r) => format!("the number {r}"),
        Yaml::Integer(i) => format!("the number {i}"),
        Yaml::String(s) => format!("the string `{s}`"),
        Yaml::Boolean(b) => format!("`{b}`"),
        Yaml::Array(_) => "a list".into(),
        Yaml::Hash(_) => "a mapping".into(),
        Yaml::Alias(_) => "an alias".into(),
        Yaml::Null => "null".into(),
        Yaml::BadValue => "nothing".into(),
    }
}

/// A YAML double-quoted scalar.
fn quoted(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn path_text(p: &Path) -> String {
    quoted(&p.display().to_string())
}

/// The effective configuration, for `check-config`: YAML in the spellings
/// [`parse`] takes, every setting spelled out (defaults included), so the
/// output is itself a valid config file for the same model.
pub fn describe(m: &ModelConfig) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let source = m.source.as_deref().map(|p| p.display().to_string());
    let _ = writeln!(o, "# source: {}", source.as_deref().unwrap_or("built-in"));
    let _ = writeln!(o, "name: {}", quoted(&m.name));
    let _ = writeln!(o, "backend: {}", m.backend.as_str());
    let _ = writeln!(o, "model_type: {}", m.model_type.as_str());
    if let Some(p) = &m.model_path {
        let _ = writeln!(o, "model_path: {}", path_text(p));
    }
    if let Some(p) = &m.onnx_model_path {
        let _ = writeln!(o, "onnx_model_path: {}", path_text(p));
    }
    match &m.labels {
        Labels::FromModel => o.push_str("# labels: from the model's metadata\n"),
        Labels::Inline(v) => {
            let items: Vec<String> = v.iter().map(|l| quoted(l)).collect();
            let _ = writeln!(o, "labels: [{}]", items.join(", "));
        }
        Labels::File(f, v) => {
            let _ = writeln!(o, "labels: {}  # {} labels", path_text(f), v.len());
        }
    }
    let p = &m.preprocessing;
    let _ = writeln!(o, "preprocessing:\n  resize: [{}, {}]", p.width, p.height);
    match p.mode {
        ResizeMode::Stretch => o.push_str("  mode: stretch\n"),
        ResizeMode::Letterbox { pad_value } => {
            let _ = writeln!(o, "  mode: letterbox\n  pad_value: {pad_value}");
        }
        ResizeMode::CenterCrop { resize_short } => {
            let _ = writeln!(o, "  mode: center-crop\n  resize_short: {resize_short}");
        }
    }
    let triple = |v: [f32; 3]| format!("[{}, {}, {}]", v[0], v[1], v[2]);
    let _ = writeln!(
        o,
        "  normalize: {}\n  mean: {}\n  std: {}\n  channel_order: {}\n  layout: {}",
        p.normalize,
        triple(p.mean),
        triple(p.std),
        match p.channel_order {
            ChannelOrder::Rgb => "rgb",
            ChannelOrder::Bgr => "bgr",
        },
        match p.layout {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    );
    let i = &m.inference;
    let _ = writeln!(
        o,
        "inference:\n  confidence_threshold: {}\n  iou_threshold: {}\n  max_detections: {}\n  batch_size: {}\n  gpu_enabled: {}\n  top_k: {}\n  softmax: {}\n  class_agnostic_nms: {}\n  yolo_version: {}\n  intra_threads: {}\n  instances: {}\n  spinning: {}\n  cpu_arena: {}\n  memory_pattern: {}\n  inter_threads: {}\n  optimization_level: {}\n  execution_providers: [{}]\n  dual_tolerance: {}",
        i.confidence_threshold,
        i.iou_threshold,
        i.max_detections,
        i.batch_size,
        i.gpu_enabled,
        i.top_k,
        match i.softmax {
            Softmax::Auto => "auto",
            Softmax::Always => "true",
            Softmax::Never => "false",
        },
        i.class_agnostic_nms,
        match i.yolo_version {
            YoloVersion::Auto => "auto",
            YoloVersion::V5 => "v5",
            YoloVersion::V8 => "v8",
        },
        i.intra_threads,
        i.instances,
        i.spinning,
        i.cpu_arena,
        i.memory_pattern,
        i.inter_threads,
        match i.optimization_level {
            OptLevel::Disable => "disable",
            OptLevel::Basic => "basic",
            OptLevel::Extended => "extended",
            OptLevel::All => "all",
        },
        i.execution_providers.join(", "),
        i.dual_tolerance,
    );
    if m.alerts.is_empty() {
        o.push_str("alerts: {}\n");
    } else {
        o.push_str("alerts:\n");
        for (label, t) in &m.alerts {
            let _ = writeln!(o, "  {}: {t}", quoted(label));
        }
    }
    let _ = writeln!(
        o,
        "health:\n  black_threshold: {}\n  blur_threshold: {}",
        m.health.black_threshold, m.health.blur_threshold
    );
    let inputs: Vec<String> = m.input_topics.iter().map(|t| quoted(t.subscription())).collect();
    let _ = writeln!(
        o,
        "mqtt:\n  input_topics: [{}]\n  output_topic_template: {}\n  comparison_topic_template: {}",
        inputs.join(", "),
        quoted(m.output_topic.as_str()),
        quoted(m.comparison_topic.as_str())
    );
    o
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
            ("name: a\nmodel_type: foo\n", "/cfg/m.yaml: `model_type`: expected image-classification, object-detection or camera-health, found `foo`"),
            ("name: a\nmodel_type: camera-health\npreprocesing: {}\n", "/cfg/m.yaml: `preprocesing`: unknown key (expected one of: name, backend, model_path, onnx_model_path, model_type, labels, preprocessing, inference, health, alerts, mqtt)"),
            ("name: a\nmodel_type: camera-health\ninference: { iou_threshold: 2 }\n", "/cfg/m.yaml: `inference.iou_threshold`: expected a number in 0..=1, found 2"),
            ("name: a\nmodel_type: camera-health\npreprocessing: { resize: 224 }\n", "/cfg/m.yaml: `preprocessing.resize`: expected [width, height], found the number 224"),
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
