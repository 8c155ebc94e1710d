//! Stand-in for the `onnx` backend when its Cargo feature is off: same shape,
//! every load answers `BackendError::NotCompiled`.

use std::path::Path;

use super::{Backend, BackendEnv, BackendError, Outputs, Placement};
use crate::config::model::ModelConfig;

/// Never constructed: `load` always answers `NotCompiled`. A plain struct
/// (not an empty enum) so code after a load stays reachable in every build.
pub struct OnnxBackend {
    placement: Placement,
}

impl OnnxBackend {
    pub fn load(_path: &Path, _config: &ModelConfig, _env: &BackendEnv) -> Result<OnnxBackend, BackendError> {
        Err(BackendError::NotCompiled { backend: "onnx" })
    }
}

impl Backend for OnnxBackend {
    fn name(&self) -> &'static str {
        "onnx"
    }
    fn provider(&self) -> &str {
        "none"
    }
    fn placement(&self) -> &Placement {
        &self.placement
    }
    fn metadata_labels(&self) -> Option<Vec<String>> {
        None
    }
    fn infer(&mut self, _input: &[f32], _out: &mut Outputs) -> Result<(), BackendError> {
        Err(BackendError::NotCompiled { backend: "onnx" })
    }
}
