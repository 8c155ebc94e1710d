//! The schema: which keys a model config has, their defaults and checks.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::yaml::{kind, scalar_text, Doc};
use super::*;
use crate::config::Settings;
use crate::topic::{TopicFilter, TopicTemplate};

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
    "zones",
    "alert_rules",
    "alert_state_file",
    "tracking",
    "annotations",
    "mqtt",
    "sensor",
];
const TRACKING_KEYS: &[&str] = &["enabled", "max_gap_s"];
const ANNOTATION_KEYS: &[&str] = &["quality", "max_bytes", "min_interval_s"];
const SENSOR_KEYS: &[&str] = &[
    "fields",
    "mean",
    "std",
    "window",
    "score",
    "threshold",
    "max_devices",
    "device_timeout_s",
];
const PRE_KEYS: &[&str] = &[
    "resize",
    "mode",
    "pad_value",
    "resize_short",
    "resize_filter",
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
    "gpu_device",
    "gpu_policy",
    "gpu_memory_limit_mb",
    "tensorrt_engine_cache",
    "tensorrt_fp16",
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
const MQTT_KEYS: &[&str] = &[
    "input_topics",
    "output_topic_template",
    "comparison_topic_template",
    "alerts_topic_template",
    "annotated_topic_template",
];
const ZONE_KEYS: &[&str] = &["name", "cameras", "polygon", "classes", "min_area", "anchor"];
const RULE_KEYS: &[&str] = &[
    "name",
    "classes",
    "zone",
    "min_confidence",
    "k",
    "n",
    "for_s",
    "cooldown_s",
    "clear_s",
];
/// Where alert events go unless `mqtt.alerts_topic_template` says.
pub const DEFAULT_ALERTS_TOPIC: &str = "edge-ai/{business_unit}/{facility}/{gateway_id}/ai/alerts";

/// Parses one config's text; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path, settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let ctx = Doc {
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
        Some("sensor-anomaly") => ModelType::SensorAnomaly,
        Some(other) => {
            return Err(ctx.err(
                "model_type",
                format!(
                    "expected image-classification, object-detection, camera-health or sensor-anomaly, found `{other}`"
                ),
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
    let zones = ctx.zones(&doc["zones"])?;
    let alert_rules = ctx.alert_rules(&doc["alert_rules"], &zones)?;
    if model_type != ModelType::Detection && !(zones.is_empty() && alert_rules.is_empty()) {
        return Err(ctx.err(
            "zones",
            format!(
                "zones and alert rules are for object-detection models, not {}",
                model_type.as_str()
            ),
        ));
    }
    let alerts_topic = {
        let (text, key) = match ctx.string(&doc["mqtt"]["alerts_topic_template"], "mqtt.alerts_topic_template")? {
            Some(t) => (t, "mqtt.alerts_topic_template"),
            None => (DEFAULT_ALERTS_TOPIC.to_owned(), "mqtt.alerts_topic_template (default)"),
        };
        let t = TopicTemplate::parse(&text).map_err(|e| ctx.err(key, e.0))?;
        // Only models with rules publish alerts; others need not bind its variables.
        if !alert_rules.is_empty() {
            for f in &input_topics {
                t.check_against(f).map_err(|e| ctx.err(key, e.0))?;
            }
        }
        t
    };
    let alert_state_file = match ctx.string(&doc["alert_state_file"], "alert_state_file")? {
        Some(p) if p.is_empty() => {
            return Err(ctx.err("alert_state_file", "is empty; leave it out for no state file".into()))
        }
        Some(_) if alert_rules.is_empty() => {
            return Err(ctx.err(
                "alert_state_file",
                "keeps the alert rules' state across restarts: add alert_rules".into(),
            ))
        }
        Some(p) => Some(base.join(p)),
        None => None,
    };
    let tracking = ctx.tracking(&doc["tracking"])?;
    if tracking.is_some() && model_type != ModelType::Detection {
        return Err(ctx.err(
            "tracking",
            format!(
                "tracks boxes: object-detection models only, not {}",
                model_type.as_str()
            ),
        ));
    }
    let annotations = ctx.annotations(
        &doc["annotations"],
        &doc["mqtt"]["annotated_topic_template"],
        &input_topics,
    )?;
    if annotations.topic.is_some() && alert_rules.is_empty() {
        return Err(ctx.err(
            "mqtt.annotated_topic_template",
            "pictures go out when an alert starts or ends: add alert_rules".into(),
        ));
    }
    if backend == BackendKind::Dual {
        for f in &input_topics {
            comparison_topic
                .check_against(f)
                .map_err(|e| ctx.err("mqtt.comparison_topic_template", e.0))?;
        }
    }
    let sensor = match (model_type.is_sensor(), &doc["sensor"]) {
        (true, v) => Some(ctx.sensor(v)?),
        (false, Yaml::BadValue) => None,
        (false, _) => {
            return Err(ctx.err(
                "sensor",
                format!("only sensor models take it, not {}", model_type.as_str()),
            ))
        }
    };
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
        zones,
        alert_rules,
        alerts_topic,
        alert_state_file,
        tracking,
        annotations,
        input_topics,
        output_topic,
        comparison_topic,
        sensor,
    })
}

/// Labels files larger than this are refused (a path such as `/dev/zero` must not hang a load).
const MAX_LABELS_FILE: u64 = 16 << 20;

impl Doc {
    pub(super) fn preprocessing(&self, v: &Yaml, model_type: ModelType) -> Result<Preprocessing, ConfigError> {
        self.known_keys(v, "preprocessing.", PRE_KEYS)?;
        let (dw, dh, dmode) = match model_type {
            ModelType::Detection => (640, 640, "letterbox"),
            _ => (224, 224, "center-crop"),
        };
        let (width, height) = match &v["resize"] {
            Yaml::BadValue | Yaml::Null => (dw, dh),
            Yaml::Array(a) if a.len() == 2 => {
                let side = |i: usize| {
                    let k = format!("preprocessing.resize[{i}]");
                    self.int(self.item(&a[i], &k)?, &k, 0, 8, 8192).map(|v| v as u32)
                };
                (side(0)?, side(1)?)
            }
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
        let filter = match self.string(&v["resize_filter"], "preprocessing.resize_filter")? {
            None if matches!(mode, ResizeMode::CenterCrop { .. }) => ResizeFilter::BilinearAntialias,
            None => ResizeFilter::Bilinear,
            Some(name) => ResizeFilter::parse(&name).ok_or_else(|| {
                self.err(
                    "preprocessing.resize_filter",
                    format!("expected {}, found `{name}`", ResizeFilter::NAMES),
                )
            })?,
        };
        let std = self.triple(&v["std"], "preprocessing.std", [1.0; 3])?;
        if std.contains(&0.0) {
            return Err(self.err("preprocessing.std", "must not contain 0".into()));
        }
        Ok(Preprocessing {
            width,
            height,
            mode,
            filter,
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

    pub(super) fn inference(&self, v: &Yaml, settings: &Settings) -> Result<Inference, ConfigError> {
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
            gpu_device: self.int(
                &v["gpu_device"],
                "inference.gpu_device",
                settings.gpu_device as u64,
                0,
                255,
            )? as usize,
            gpu_policy: GpuPolicy::parse(&choice(
                "gpu_policy",
                &["require", "fallback"],
                settings.gpu_policy.as_str(),
            )?)
            .unwrap_or(settings.gpu_policy),
            gpu_memory_limit_mb: self.int(
                &v["gpu_memory_limit_mb"],
                "inference.gpu_memory_limit_mb",
                0,
                0,
                1 << 24,
            )?,
            tensorrt_engine_cache: self
                .string(&v["tensorrt_engine_cache"], "inference.tensorrt_engine_cache")?
                .filter(|s| !s.is_empty())
                .map(|s| Path::new(&self.file).parent().unwrap_or(Path::new(".")).join(s)),
            tensorrt_fp16: self.boolean(&v["tensorrt_fp16"], "inference.tensorrt_fp16", false)?,
        })
    }

    pub(super) fn sensor(&self, v: &Yaml) -> Result<Sensor, ConfigError> {
        if matches!(v, Yaml::BadValue | Yaml::Null) {
            return Err(self.err(
                "sensor",
                "is required for sensor-anomaly: at least `fields` and `threshold`".into(),
            ));
        }
        self.known_keys(v, "sensor.", SENSOR_KEYS)?;
        let fields: Vec<String> = match &v["fields"] {
            Yaml::Array(a) if !a.is_empty() && a.len() <= MAX_SENSOR_FIELDS => a
                .iter()
                .enumerate()
                .map(|(i, f)| match scalar_text(f) {
                    Some(f) if !f.is_empty() && f.len() <= 64 => Ok(f),
                    _ => Err(self.err(
                        &format!("sensor.fields[{i}]"),
                        "expected a field name (1 to 64 characters)".into(),
                    )),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(self.err(
                    "sensor.fields",
                    format!(
                        "expected a list of 1 to {MAX_SENSOR_FIELDS} field names, found {}",
                        kind(other)
                    ),
                ))
            }
        };
        for (i, f) in fields.iter().enumerate() {
            if fields[..i].contains(f)
                || matches!(
                    f.as_str(),
                    "device_id" | "timestamp" | "values" | "metadata" | "correlation_id"
                )
            {
                return Err(self.err(
                    "sensor.fields",
                    format!("`{f}` is named twice or is a reserved member name"),
                ));
            }
        }
        let per_field = |key: &str, default: f32| -> Result<Vec<f32>, ConfigError> {
            let k = format!("sensor.{key}");
            match &v[key] {
                Yaml::BadValue | Yaml::Null => Ok(vec![default; fields.len()]),
                Yaml::Array(a) if a.len() == fields.len() => a
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        let k = format!("{k}[{i}]");
                        self.float(self.item(x, &k)?, &k, default, -1e30, 1e30)
                    })
                    .collect(),
                other => Err(self.err(
                    &k,
                    format!(
                        "expected {} numbers, one per field, found {}",
                        fields.len(),
                        kind(other)
                    ),
                )),
            }
        };
        let mean = per_field("mean", 0.0)?;
        let std = per_field("std", 1.0)?;
        if std.iter().any(|s| *s <= 0.0) {
            return Err(self.err("sensor.std", "every value must be above 0".into()));
        }
        if matches!(v["threshold"], Yaml::BadValue | Yaml::Null) {
            return Err(self.err(
                "sensor.threshold",
                "is required: the score above which a reading is an anomaly".into(),
            ));
        }
        Ok(Sensor {
            window: self.int(&v["window"], "sensor.window", 1, 1, MAX_SENSOR_WINDOW as u64)? as usize,
            score: match self.string(&v["score"], "sensor.score")?.as_deref() {
                None | Some("reconstruction_error") => SensorScore::ReconstructionError,
                Some("output") => SensorScore::Output,
                Some(o) => {
                    return Err(self.err(
                        "sensor.score",
                        format!("expected reconstruction_error or output, found `{o}`"),
                    ))
                }
            },
            threshold: self.float(&v["threshold"], "sensor.threshold", 1.0, 0.0, 1e30)?,
            max_devices: self.int(&v["max_devices"], "sensor.max_devices", 1024, 1, 1_000_000)? as usize,
            device_timeout_s: self.int(&v["device_timeout_s"], "sensor.device_timeout_s", 600, 1, 30 * 86_400)?,
            fields,
            mean,
            std,
        })
    }

    pub(super) fn alerts(&self, v: &Yaml) -> Result<Vec<(String, f32)>, ConfigError> {
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

    fn names(&self, v: &Yaml, key: &str) -> Result<Vec<String>, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(Vec::new()),
            Yaml::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, c)| scalar_text(c).ok_or_else(|| self.err(&format!("{key}[{i}]"), "expected a name".into())))
                .collect(),
            Yaml::String(s) => Ok(vec![s.clone()]),
            other => Err(self.err(key, format!("expected a list of names, found {}", kind(other)))),
        }
    }

    pub(super) fn zones(&self, v: &Yaml) -> Result<Vec<Zone>, ConfigError> {
        let items = match v {
            Yaml::BadValue | Yaml::Null => return Ok(Vec::new()),
            Yaml::Array(a) if a.len() <= MAX_ZONES => a,
            Yaml::Array(_) => return Err(self.err("zones", format!("at most {MAX_ZONES} zones"))),
            other => return Err(self.err("zones", format!("expected a list of zones, found {}", kind(other)))),
        };
        let mut zones: Vec<Zone> = Vec::with_capacity(items.len());
        for (i, z) in items.iter().enumerate() {
            let k = |f: &str| format!("zones[{i}].{f}");
            self.known_keys(z, &format!("zones[{i}]."), ZONE_KEYS)?;
            let name = self
                .string(&z["name"], &k("name"))?
                .filter(|n| !n.is_empty())
                .ok_or_else(|| self.err(&k("name"), "is required".into()))?;
            if zones.iter().any(|o| o.name == name) {
                return Err(self.err(&k("name"), format!("zone `{name}` is named twice")));
            }
            let cameras = self
                .names(&z["cameras"], &k("cameras"))?
                .into_iter()
                .map(|c| match c.contains(['/', '+', '#']) {
                    true => TopicFilter::parse(&c)
                        .map(CameraMatch::Topic)
                        .map_err(|e| self.err(&k("cameras"), e.0)),
                    false => Ok(CameraMatch::Device(c)),
                })
                .collect::<Result<_, _>>()?;
            let Yaml::Array(points) = &z["polygon"] else {
                return Err(self.err(
                    &k("polygon"),
                    "is required: a list of [x, y] in 0..1 (x right, y down)".into(),
                ));
            };
            if points.len() < 3 || points.len() > MAX_ZONE_POINTS {
                return Err(self.err(
                    &k("polygon"),
                    format!("needs 3 to {MAX_ZONE_POINTS} points, found {}", points.len()),
                ));
            }
            let polygon = points
                .iter()
                .enumerate()
                .map(|(j, p)| match p {
                    Yaml::Array(xy) if xy.len() == 2 => {
                        let coord = |c: usize| {
                            let k = format!("zones[{i}].polygon[{j}][{c}]");
                            self.float(self.item(&xy[c], &k)?, &k, 0.0, 0.0, 1.0)
                        };
                        Ok([coord(0)?, coord(1)?])
                    }
                    _ => Err(self.err(&format!("zones[{i}].polygon[{j}]"), "expected [x, y]".into())),
                })
                .collect::<Result<_, _>>()?;
            zones.push(Zone {
                name,
                cameras,
                polygon,
                classes: self.names(&z["classes"], &k("classes"))?,
                min_area: self.float(&z["min_area"], &k("min_area"), 0.0, 0.0, 1.0)?,
                anchor: match self.string(&z["anchor"], &k("anchor"))?.as_deref() {
                    None | Some("bottom_center") => Anchor::BottomCenter,
                    Some("center") => Anchor::Center,
                    Some(o) => {
                        return Err(self.err(&k("anchor"), format!("expected bottom_center or center, found `{o}`")))
                    }
                },
            });
        }
        Ok(zones)
    }

    pub(super) fn tracking(&self, v: &Yaml) -> Result<Option<f64>, ConfigError> {
        self.known_keys(v, "tracking.", TRACKING_KEYS)?;
        if matches!(v, Yaml::BadValue) || !self.boolean(&v["enabled"], "tracking.enabled", false)? {
            return Ok(None);
        }
        Ok(Some(
            self.float(&v["max_gap_s"], "tracking.max_gap_s", 10.0, 0.0, 3600.0)? as f64,
        ))
    }

    pub(super) fn annotations(
        &self,
        v: &Yaml,
        topic: &Yaml,
        inputs: &[TopicFilter],
    ) -> Result<Annotations, ConfigError> {
        self.known_keys(v, "annotations.", ANNOTATION_KEYS)?;
        let d = Annotations::default();
        let topic = match self.string(topic, "mqtt.annotated_topic_template")? {
            Some(text) => {
                let t = TopicTemplate::parse(&text).map_err(|e| self.err("mqtt.annotated_topic_template", e.0))?;
                for f in inputs {
                    t.check_against(f)
                        .map_err(|e| self.err("mqtt.annotated_topic_template", e.0))?;
                }
                Some(t)
            }
            None => None,
        };
        Ok(Annotations {
            topic,
            quality: self.int(&v["quality"], "annotations.quality", d.quality as u64, 1, 100)? as u8,
            max_bytes: self.int(
                &v["max_bytes"],
                "annotations.max_bytes",
                d.max_bytes as u64,
                4096,
                64 << 20,
            )? as usize,
            min_interval_s: self.float(
                &v["min_interval_s"],
                "annotations.min_interval_s",
                d.min_interval_s as f32,
                0.0,
                86_400.0,
            )? as f64,
        })
    }

    pub(super) fn alert_rules(&self, v: &Yaml, zones: &[Zone]) -> Result<Vec<AlertRule>, ConfigError> {
        let items = match v {
            Yaml::BadValue | Yaml::Null => return Ok(Vec::new()),
            Yaml::Array(a) if a.len() <= MAX_ALERT_RULES => a,
            Yaml::Array(_) => return Err(self.err("alert_rules", format!("at most {MAX_ALERT_RULES} rules"))),
            other => {
                return Err(self.err(
                    "alert_rules",
                    format!("expected a list of rules, found {}", kind(other)),
                ))
            }
        };
        let mut rules: Vec<AlertRule> = Vec::with_capacity(items.len());
        for (i, r) in items.iter().enumerate() {
            let k = |f: &str| format!("alert_rules[{i}].{f}");
            self.known_keys(r, &format!("alert_rules[{i}]."), RULE_KEYS)?;
            let name = self
                .string(&r["name"], &k("name"))?
                .filter(|n| !n.is_empty())
                .ok_or_else(|| self.err(&k("name"), "is required".into()))?;
            if rules.iter().any(|o| o.name == name) {
                return Err(self.err(&k("name"), format!("rule `{name}` is named twice")));
            }
            let zone = self.string(&r["zone"], &k("zone"))?;
            if let Some(z) = &zone {
                if !zones.iter().any(|o| &o.name == z) {
                    let known: Vec<&str> = zones.iter().map(|o| o.name.as_str()).collect();
                    return Err(self.err(&k("zone"), format!("no zone `{z}` (zones: {})", known.join(", "))));
                }
            }
            let n = self.int(&r["n"], &k("n"), 1, 1, 64)? as u32;
            let k_of = self.int(&r["k"], &k("k"), 1, 1, 64)? as u32;
            if k_of > n {
                return Err(self.err(
                    &k("k"),
                    format!("{k_of} of the last {n} snapshots cannot happen; k must be at most n"),
                ));
            }
            rules.push(AlertRule {
                name,
                classes: self.names(&r["classes"], &k("classes"))?,
                zone,
                min_confidence: self.float(&r["min_confidence"], &k("min_confidence"), 0.5, 0.0, 1.0)?,
                k: k_of,
                n,
                for_s: self.float(&r["for_s"], &k("for_s"), 0.0, 0.0, 86_400.0)? as f64,
                cooldown_s: self.float(&r["cooldown_s"], &k("cooldown_s"), 0.0, 0.0, 86_400.0)? as f64,
                clear_s: self.float(&r["clear_s"], &k("clear_s"), 0.0, 0.0, 86_400.0)? as f64,
            });
        }
        Ok(rules)
    }

    pub(super) fn health(&self, v: &Yaml) -> Result<Health, ConfigError> {
        self.known_keys(v, "health.", HEALTH_KEYS)?;
        Ok(Health {
            black_threshold: self.float(&v["black_threshold"], "health.black_threshold", 16.0, 0.0, 255.0)?,
            blur_threshold: self.float(&v["blur_threshold"], "health.blur_threshold", 20.0, 0.0, 1e9)?,
        })
    }

    pub(super) fn topics(
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
