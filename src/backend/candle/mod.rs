//! The Candle backend (pure Rust): native architectures written over candle,
//! loading upstream checkpoints (safetensors or PyTorch `.pth`).
//!
//! Owns: choosing the architecture for a config, loading its weights (from a
//! file or the embedded default model), running it, and the `convert` tool
//! (checkpoint -> safetensors). This version has EfficientNet-Lite0..4;
//! ONNX graphs on Candle (YOLO) are not in it yet.

mod efficientnet;
mod weights;

use std::path::Path;

use candle_core::{DType, Module, Tensor};

use super::{Backend, BackendEnv, BackendError, Outputs, EMBEDDED_MODEL};
use crate::config::model::{Layout, ModelConfig, ModelType};

/// EfficientNet-Lite0 ImageNet weights in f16 (Apache-2.0; see models/NOTICE).
static EMBEDDED_WEIGHTS: &[u8] = include_bytes!("../../../models/efficientnet-lite0.safetensors");

pub struct CandleBackend {
    model: efficientnet::EfficientNetLite,
    input: (usize, usize, usize, usize),
}

fn unsupported(reason: String) -> BackendError {
    BackendError::Unsupported {
        backend: "candle",
        reason,
    }
}

impl CandleBackend {
    pub fn load(path: &Path, config: &ModelConfig, _env: &BackendEnv) -> Result<CandleBackend, BackendError> {
        let load_err = |reason: String| BackendError::Load {
            path: path.display().to_string(),
            reason,
        };
        if config.model_type != ModelType::Classification {
            return Err(unsupported(format!(
                "model `{}`: {} on Candle needs ONNX graphs on Candle, which this version does not have; use `backend: onnx`",
                config.name,
                config.model_type.as_str()
            )));
        }
        if path.extension().is_some_and(|e| e == "onnx") {
            return Err(unsupported(format!(
                "model `{}`: Candle runs native architectures from safetensors or .pth weights; convert the checkpoint \
                 with `ai-edge-inference convert`, or use `backend: onnx`",
                config.name
            )));
        }
        let weights = if path == Path::new(EMBEDDED_MODEL) {
            weights::load_bytes(EMBEDDED_WEIGHTS).map_err(load_err)?
        } else if path.is_file() {
            weights::load(path).map_err(load_err)?
        } else {
            return Err(load_err("the file does not exist".into()));
        };
        let model =
            efficientnet::EfficientNetLite::load(&weights).map_err(|e| load_err(format!("EfficientNet-Lite: {e}")))?;
        let p = &config.preprocessing;
        if p.layout != Layout::Nchw {
            return Err(load_err(format!(
                "EfficientNet-Lite takes NCHW input; the config says {:?}",
                p.layout
            )));
        }
        log::info!(
            "model `{}`: Candle EfficientNet-Lite ({} blocks, {} classes) from {}",
            config.name,
            model.blocks(),
            model.classes(),
            path.display()
        );
        Ok(CandleBackend {
            model,
            input: (1, 3, p.height as usize, p.width as usize),
        })
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn provider(&self) -> &str {
        "cpu"
    }

    fn metadata_labels(&self) -> Option<Vec<String>> {
        None
    }

    fn infer(&mut self, input: &[f32], out: &mut Outputs) -> Result<(), BackendError> {
        let run = |e: candle_core::Error| BackendError::Run(e.to_string());
        let x = Tensor::from_slice(input, self.input, &efficientnet::device()).map_err(run)?;
        let y = self.model.forward(&x).map_err(run)?;
        out.shape.clear();
        out.shape.extend_from_slice(y.dims());
        out.values.clear();
        out.values
            .extend(y.flatten_all().map_err(run)?.to_vec1::<f32>().map_err(run)?);
        Ok(())
    }

    fn profile(&mut self, input: &[f32]) -> Option<Vec<(String, std::time::Duration)>> {
        let x = Tensor::from_slice(input, self.input, &efficientnet::device()).ok()?;
        let mut times = Vec::new();
        self.model.forward_profiled(&x, &mut times).ok()?;
        Some(times)
    }
}

/// `convert IN OUT`: a checkpoint (`.pth`, legacy or zip, or safetensors)
/// -> safetensors in `dtype` ("f16" or "f32"), names unchanged.
pub fn convert(input: &Path, output: &Path, dtype: &str) -> Result<String, String> {
    let dtype = match dtype {
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => return Err(format!("--dtype: expected f16 or f32, found `{other}`")),
    };
    let w = weights::load(input)?;
    let params: usize = w.values().map(|t| t.elem_count()).sum();
    weights::save(&w, dtype, output)?;
    Ok(format!(
        "{}: {} tensors, {params} parameters, {dtype:?}\n",
        output.display(),
        w.len()
    ))
}
