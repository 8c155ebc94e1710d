//! Stand-in for the `onnx` backend when its Cargo feature is off: same shape,
//! every load answers `BackendError::NotCompiled`.

use std::path::Path;

use super::{Backend, BackendEnv, BackendError, Outputs};
use crate::config::model::ModelConfig;

pub enum OnnxBackend {}

impl OnnxBackend {
    pub fn load(_path: &Path, _config: &ModelConfig, _env: &BackendEnv) -> Result<OnnxBackend, BackendError> {
        Err(BackendError::NotCompiled { backend: "onnx" })
    }
}

impl Backend for OnnxBackend {
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
