//! The built-in models: the embedded EfficientNet-Lite0 (Candle builds) and
//! camera health (every build), on the service-wide topics. Each is a config
//! text read by the same parser as a file, so a built-in and the same YAML
//! on disk give the same model.

use std::path::Path;

use super::labels::IMAGENET_LABELS;
use super::{parse, ConfigError, Labels, ModelConfig};
use crate::config::Settings;

/// `model_path` of the EfficientNet-Lite0 weights embedded in Candle builds.
pub const EMBEDDED_MODEL: &str = "embedded:efficientnet-lite0";

/// The default of Candle builds: EfficientNet-Lite0 with its weights embedded
/// in the binary (ImageNet labels), on the service-wide topics.
pub fn builtin_classifier(settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let text = format!(
        "name: efficientnet-lite0\nbackend: candle\nmodel_type: image-classification\nmodel_path: \"{EMBEDDED_MODEL}\"\n\
         preprocessing: {{ resize: [224, 224], mode: center-crop, resize_short: 256, resize_filter: bilinear-antialias, normalize: false, \
         mean: [127, 127, 127], std: [128, 128, 128] }}\ninference: {{ confidence_threshold: 0.0 }}\n"
    );
    let mut c = builtin(
        &text,
        "built-in EfficientNet-Lite0 (MQTT_INPUT_TOPICS, MQTT_OUTPUT_TOPIC_TEMPLATE)",
        settings,
    )?;
    c.labels = Labels::Inline(IMAGENET_LABELS.lines().map(str::to_owned).collect());
    Ok(c)
}

/// The default job of builds without Candle: camera health on the
/// service-wide input topics.
pub fn builtin_camera_health(settings: &Settings) -> Result<ModelConfig, ConfigError> {
    builtin(
        "name: camera-health\nmodel_type: camera-health\n",
        "built-in camera-health model (MQTT_INPUT_TOPICS, MQTT_OUTPUT_TOPIC_TEMPLATE)",
        settings,
    )
}

/// `text` parsed as a config named `what` in errors, with no file behind it.
fn builtin(text: &str, what: &str, settings: &Settings) -> Result<ModelConfig, ConfigError> {
    let mut c = parse(text, Path::new(what), settings)?;
    c.source = None;
    Ok(c)
}
