//! The ONNX Runtime backend (`ort`). This version has the feature and the slot
//! in the engine enum but no model runtime yet: loading a model answers a
//! typed `Unsupported` error at start-up. The runtime lands with the ONNX
//! Runtime backend issue.

use std::path::Path;

use super::{Backend, BackendError, Outputs};
use crate::config::model::ModelConfig;

pub enum OnnxBackend {}

impl OnnxBackend {
    pub fn load(_path: &Path, config: &ModelConfig) -> Result<OnnxBackend, BackendError> {
        Err(BackendError::Unsupported {
            backend: "onnx",
            reason: format!(
                "model `{}`: this version has no ONNX Runtime integration yet; use `model_type: camera-health`",
                config.name
            ),
        })
    }
}

impl Backend for OnnxBackend {
    fn name(&self) -> &'static str {
        match *self {}
    }
    fn infer(&mut self, _input: &[f32], _out: &mut Outputs) -> Result<(), BackendError> {
        match *self {}
    }
}
