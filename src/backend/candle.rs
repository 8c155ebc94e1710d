//! The Candle backend (pure Rust). This version has the feature and the slot
//! in the engine enum but no model runtime yet: loading a model answers a
//! typed `Unsupported` error at start-up. The runtime lands with the Candle
//! backend issue.

use std::path::Path;

use super::{Backend, BackendEnv, BackendError, Outputs};
use crate::config::model::ModelConfig;

pub enum CandleBackend {}

impl CandleBackend {
    pub fn load(_path: &Path, config: &ModelConfig, _env: &BackendEnv) -> Result<CandleBackend, BackendError> {
        Err(BackendError::Unsupported {
            backend: "candle",
            reason: format!(
                "model `{}`: this version has no Candle model runtime yet; use `model_type: camera-health`",
                config.name
            ),
        })
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        match *self {}
    }
    fn provider(&self) -> &str {
        match *self {}
    }
    fn metadata_labels(&self) -> Option<Vec<String>> {
        match *self {}
    }
    fn infer(&mut self, _input: &[f32], _out: &mut Outputs) -> Result<(), BackendError> {
        match *self {}
    }
}
