//! `check-config`'s printer: a config as YAML that parses back to it.

use std::path::Path;

use super::*;

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
    let _ = writeln!(o, "  resize_filter: {}", p.filter.as_str());
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
        "inference:\n  confidence_threshold: {}\n  iou_threshold: {}\n  max_detections: {}\n  batch_size: {}\n  gpu_enabled: {}\n  gpu_device: {}\n  gpu_policy: {}\n  gpu_memory_limit_mb: {}\n  tensorrt_fp16: {}{}\n  top_k: {}\n  softmax: {}\n  class_agnostic_nms: {}\n  yolo_version: {}\n  intra_threads: {}\n  instances: {}\n  spinning: {}\n  cpu_arena: {}\n  memory_pattern: {}\n  inter_threads: {}\n  optimization_level: {}\n  execution_providers: [{}]\n  dual_tolerance: {}",
        i.confidence_threshold,
        i.iou_threshold,
        i.max_detections,
        i.batch_size,
        i.gpu_enabled,
        i.gpu_device,
        i.gpu_policy.as_str(),
        i.gpu_memory_limit_mb,
        i.tensorrt_fp16,
        match &i.tensorrt_engine_cache {
            Some(p) => format!("\n  tensorrt_engine_cache: {}", quoted(&p.display().to_string())),
            None => String::new(),
        },
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
    if let Some(s) = &m.sensor {
        let list = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(", ");
        let fields: Vec<String> = s.fields.iter().map(|f| quoted(f)).collect();
        let _ = writeln!(
            o,
            "sensor:\n  fields: [{}]\n  mean: [{}]\n  std: [{}]\n  window: {}\n  score: {}\n  threshold: {}\n  max_devices: {}\n  device_timeout_s: {}",
            fields.join(", "),
            list(&s.mean),
            list(&s.std),
            s.window,
            s.score.as_str(),
            s.threshold,
            s.max_devices,
            s.device_timeout_s
        );
    }
    let names = |v: &[String]| v.iter().map(|c| quoted(c)).collect::<Vec<_>>().join(", ");
    if !m.zones.is_empty() {
        o.push_str("zones:\n");
        for z in &m.zones {
            let cameras: Vec<String> = z
                .cameras
                .iter()
                .map(|c| match c {
                    CameraMatch::Device(d) => quoted(d),
                    CameraMatch::Topic(t) => quoted(&t.text()),
                })
                .collect();
            let points: Vec<String> = z.polygon.iter().map(|[x, y]| format!("[{x}, {y}]")).collect();
            let _ = writeln!(
                o,
                "  - name: {}\n    cameras: [{}]\n    polygon: [{}]\n    classes: [{}]\n    min_area: {}\n    anchor: {}",
                quoted(&z.name),
                cameras.join(", "),
                points.join(", "),
                names(&z.classes),
                z.min_area,
                match z.anchor {
                    Anchor::BottomCenter => "bottom_center",
                    Anchor::Center => "center",
                }
            );
        }
    }
    if !m.alert_rules.is_empty() {
        o.push_str("alert_rules:\n");
        for r in &m.alert_rules {
            let _ = writeln!(
                o,
                "  - name: {}\n    classes: [{}]{}\n    min_confidence: {}\n    k: {}\n    n: {}\n    for_s: {}\n    cooldown_s: {}\n    clear_s: {}",
                quoted(&r.name),
                names(&r.classes),
                r.zone.as_deref().map(|z| format!("\n    zone: {}", quoted(z))).unwrap_or_default(),
                r.min_confidence,
                r.k,
                r.n,
                r.for_s,
                r.cooldown_s,
                r.clear_s
            );
        }
    }
    if let Some(p) = &m.alert_state_file {
        let _ = writeln!(o, "alert_state_file: {}", path_text(p));
    }
    if let Some(gap) = m.tracking {
        let _ = writeln!(o, "tracking:\n  enabled: true\n  max_gap_s: {gap}");
    }
    let a = &m.annotations;
    let _ = writeln!(
        o,
        "annotations:\n  quality: {}\n  max_bytes: {}\n  min_interval_s: {}",
        a.quality, a.max_bytes, a.min_interval_s
    );
    let inputs: Vec<String> = m.input_topics.iter().map(|t| quoted(&t.text())).collect();
    let _ = writeln!(
        o,
        "mqtt:\n  input_topics: [{}]\n  output_topic_template: {}\n  comparison_topic_template: {}\n  alerts_topic_template: {}{}",
        inputs.join(", "),
        quoted(m.output_topic.as_str()),
        quoted(m.comparison_topic.as_str()),
        quoted(m.alerts_topic.as_str()),
        a.topic
            .as_ref()
            .map(|t| format!("\n  annotated_topic_template: {}", quoted(t.as_str())))
            .unwrap_or_default()
    );
    o
}
