//! Stand-in for the `candle` backend when its Cargo feature is off: same shape,
//! every load answers `BackendError::NotCompiled`.

use std::path::Path;

use super::{Backend, BackendEnv, BackendError, Outputs, Placement};
use crate::config::model::ModelConfig;

/// Never constructed: `load` always answers `NotCompiled`. A plain struct
/// (not an empty enum) so code after a load stays reachable in every build.
pub struct CandleBackend {
    placement: Placement,
}

impl CandleBackend {
    pub fn load(_path: &Path, _config: &ModelConfig, _env: &BackendEnv) -> Result<CandleBackend, BackendError> {
        Err(BackendError::NotCompiled { backend: "candle" })
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        "candle"
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
        Err(BackendError::NotCompiled { backend: "candle" })
    }
}

pub fn convert(_input: &Path, _output: &Path, _dtype: &str) -> Result<String, String> {
    Err(BackendError::NotCompiled { backend: "candle" }.to_string())
}

pub fn set_cpu(_threads: usize, _isa: &str) {}

pub fn bench_gemm(_iters: usize) -> Result<String, String> {
    Err(BackendError::NotCompiled { backend: "candle" }.to_string())
}

pub fn bench_layouts(_iters: usize) -> Result<String, String> {
    Err(BackendError::NotCompiled { backend: "candle" }.to_string())
}

pub fn compile_untrusted(_kind: &str, _bytes: &[u8]) -> Result<(), String> {
    Err(BackendError::NotCompiled { backend: "candle" }.to_string())
}
