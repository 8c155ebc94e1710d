//! Inference backends behind one contract, dispatched statically.
//!
//! Owns: the `Backend` trait, the `Engine` enum that dispatches over the
//! compiled backends, and the typed errors. Each backend lives in its own
//! module; when its Cargo feature is off, a stub module of the same shape
//! answers "not compiled into this build" instead, so nothing here carries a
//! `#[cfg]` below the module declarations. Nothing outside `src/backend/`
//! names candle or ort.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::build_info;
use crate::config::model::{BackendKind, GpuPolicy, ModelConfig};

#[cfg(feature = "candle")]
mod candle;
#[cfg(not(feature = "candle"))]
#[path = "candle_stub.rs"]
mod candle;

#[cfg(feature = "onnx")]
mod onnx;
#[cfg(not(feature = "onnx"))]
#[path = "onnx_stub.rs"]
mod onnx;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The backend's Cargo feature is off in this build.
    NotCompiled {
        backend: &'static str,
    },
    /// Compiled in, but cannot run this model (yet, or at all).
    Unsupported {
        backend: &'static str,
        reason: String,
    },
    Load {
        path: String,
        reason: String,
    },
    /// A GPU was asked for, cannot be used, and the policy is `require`.
    GpuUnavailable {
        backend: &'static str,
        reason: String,
    },
    Run(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::NotCompiled { backend } => write!(
                f,
                "backend `{backend}` is not compiled into this build (features: {}); rebuild with `--features {backend}`",
                build_info::FEATURES
            ),
            BackendError::Unsupported { backend, reason } => write!(f, "backend `{backend}`: {reason}"),
            BackendError::Load { path, reason } => write!(f, "cannot load model {path}: {reason}"),
            BackendError::GpuUnavailable { backend, reason } => write!(
                f,
                "backend `{backend}`: a GPU was asked for (inference.gpu_enabled) and cannot be used, and the GPU policy is `require`: {reason}; \
                 set `inference.gpu_policy: fallback` (or GPU_POLICY=fallback) to run on the CPU instead"
            ),
            BackendError::Run(why) => write!(f, "inference failed: {why}"),
        }
    }
}

/// `convert IN OUT --dtype f16|f32`: a checkpoint to safetensors (Candle builds).
pub fn convert(input: &Path, output: &Path, dtype: &str) -> Result<String, String> {
    candle::convert(input, output, dtype)
}

/// Sets the Candle kernels' CPU threads (0: one per CPU) and instruction-set
/// cap ("auto", "v4", "v3", "base") for the process; the first call wins.
pub fn set_cpu(threads: usize, isa: &str) {
    candle::set_cpu(threads, isa)
}

/// `bench gemm`: the Candle kernels' GEMM against the `gemm` crate on convolution shapes.
pub fn bench_gemm(iters: usize) -> Result<String, String> {
    candle::bench_gemm(iters)
}

/// `bench layouts`: the Candle kernels' NCHW against NHWC on EfficientNet-Lite0's layer shapes.
pub fn bench_layouts(iters: usize) -> Result<String, String> {
    candle::bench_layouts(iters)
}

/// What loading does with a model file's bytes, short of running them: parse
/// and compile an ONNX graph for Candle (`kind` "onnx-graph"), or read a
/// checkpoint (`kind` "pth", "safetensors" or "onnx": its initializers) and
/// compile EfficientNet-Lite from it. For the fuzz targets (`fuzz/`): any
/// bytes must give `Ok` or a reason, never a panic.
pub fn compile_untrusted(kind: &str, bytes: &[u8]) -> Result<(), String> {
    candle::compile_untrusted(kind, bytes)
}

/// Process-wide backend settings (from the service settings).
#[derive(Debug, Clone, Default)]
pub struct BackendEnv {
    /// The ONNX Runtime shared library (`ORT_DYLIB_PATH`).
    pub ort_library: Option<PathBuf>,
}

/// Where a loaded model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `cpu`, or `cuda:N`.
    pub device: String,
    /// A GPU was asked for and cannot be used, so the model runs on the CPU (policy
    /// `fallback`): why.
    pub gpu_fallback: Option<String>,
}

impl Placement {
    pub fn cpu() -> Placement {
        Placement {
            device: "cpu".into(),
            gpu_fallback: None,
        }
    }

    pub fn cuda(ordinal: usize) -> Placement {
        Placement {
            device: format!("cuda:{ordinal}"),
            gpu_fallback: None,
        }
    }

    /// What results say in `backend_used`: the backend's name on the CPU as configured,
    /// `candle:cuda:0` on a GPU, `candle:cpu:gpu_fallback` when the GPU asked for was not there.
    pub fn backend_used(&self, backend: &str) -> String {
        match (&self.gpu_fallback, self.device.as_str()) {
            (Some(_), _) => format!("{backend}:cpu:gpu_fallback"),
            (None, "cpu") => backend.to_owned(),
            (None, device) => format!("{backend}:{device}"),
        }
    }

    /// A GPU was asked for and cannot be used: under `require` an error that names `reason`,
    /// under `fallback` the CPU, with a warning.
    pub fn gpu_unavailable(
        config: &ModelConfig,
        backend: &'static str,
        reason: String,
    ) -> Result<Placement, BackendError> {
        match config.inference.gpu_policy {
            GpuPolicy::Require => Err(BackendError::GpuUnavailable { backend, reason }),
            GpuPolicy::Fallback => {
                log::warn!(
                    model = config.name.as_str(), backend = backend, reason = reason.as_str();
                    "model `{}`: a GPU was asked for but cannot be used ({reason}); running on the CPU (GPU policy `fallback`; `require` refuses instead)",
                    config.name
                );
                Ok(Placement {
                    device: "cpu".into(),
                    gpu_fallback: Some(reason),
                })
            }
        }
    }
}

/// Raw model outputs for the post-processing stage.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Flattened first output tensor.
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

/// What every backend does: run the preprocessed tensor through a loaded model.
pub trait Backend {
    fn name(&self) -> &'static str;
    /// The execution provider actually running the model (e.g. `cpu`).
    fn provider(&self) -> &str;
    /// The device it runs on, and why not the GPU asked for.
    fn placement(&self) -> &Placement;
    /// Class names the model file carries, if any.
    fn metadata_labels(&self) -> Option<Vec<String>>;
    /// `input` is the frame slot's tensor (layout and size from the model config).
    fn infer(&mut self, input: &[f32], out: &mut Outputs) -> Result<(), BackendError>;
    /// Time per layer of one run, for backends that can tell (`bench model`).
    fn profile(&mut self, _input: &[f32]) -> Option<Vec<(String, std::time::Duration)>> {
        None
    }
}

/// The compiled backends; `match` arms carry no `#[cfg]`.
pub enum Engine {
    Candle(candle::CandleBackend),
    Onnx(onnx::OnnxBackend),
}

impl Engine {
    /// Loads `path` on backend `kind` (candle or onnx) for `config`.
    pub fn load_as(
        kind: BackendKind,
        path: &Path,
        config: &ModelConfig,
        env: &BackendEnv,
    ) -> Result<Engine, BackendError> {
        match kind {
            BackendKind::Candle => candle::CandleBackend::load(path, config, env).map(Engine::Candle),
            BackendKind::Onnx => onnx::OnnxBackend::load(path, config, env).map(Engine::Onnx),
            BackendKind::Dual | BackendKind::Builtin => Err(BackendError::Unsupported {
                backend: kind.as_str(),
                reason: "not a single backend; dual models load each side with its own kind".into(),
            }),
        }
    }
}

impl Backend for Engine {
    fn name(&self) -> &'static str {
        match self {
            Engine::Candle(b) => b.name(),
            Engine::Onnx(b) => b.name(),
        }
    }
    fn provider(&self) -> &str {
        match self {
            Engine::Candle(b) => b.provider(),
            Engine::Onnx(b) => b.provider(),
        }
    }
    fn placement(&self) -> &Placement {
        match self {
            Engine::Candle(b) => b.placement(),
            Engine::Onnx(b) => b.placement(),
        }
    }
    fn metadata_labels(&self) -> Option<Vec<String>> {
        match self {
            Engine::Candle(b) => b.metadata_labels(),
            Engine::Onnx(b) => b.metadata_labels(),
        }
    }
    fn infer(&mut self, input: &[f32], out: &mut Outputs) -> Result<(), BackendError> {
        match self {
            Engine::Candle(b) => b.infer(input, out),
            Engine::Onnx(b) => b.infer(input, out),
        }
    }
    fn profile(&mut self, input: &[f32]) -> Option<Vec<(String, std::time::Duration)>> {
        match self {
            Engine::Candle(b) => b.profile(input),
            Engine::Onnx(b) => b.profile(input),
        }
    }
}
