//! The Candle backend (pure Rust): native architectures written over candle,
//! loading upstream checkpoints (safetensors or PyTorch `.pth`).
//!
//! Owns: choosing the architecture for a config, loading its weights (from a
//! file or the embedded default model), running it, and the `convert` tool
//! (checkpoint -> safetensors). Native: EfficientNet-Lite0..4. ONNX graphs
//! (YOLO and others) run through `graph.rs`'s plan with `candle-graph`.

mod cpu;
mod device_ops;
mod device_plan;
mod efficientnet;
mod gemm;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(not(feature = "cuda"))]
#[path = "gpu_stub.rs"]
mod gpu;
#[cfg(feature = "candle-graph")]
mod graph;
#[cfg(not(feature = "candle-graph"))]
#[path = "graph_stub.rs"]
mod graph;
mod mlp;
mod nhwc;
mod nhwc_depthwise;
mod nhwc_gemm;
mod onnx_proto;
#[cfg(test)]
mod test_util;
mod weights;

use std::path::Path;

use candle_core::{DType, Device};

use super::{Backend, BackendEnv, BackendError, Outputs, Placement};
use crate::config::model::EMBEDDED_MODEL;
use crate::config::model::{Layout, ModelConfig, ModelType};

/// EfficientNet-Lite0 ImageNet weights in f16 (Apache-2.0; see models/NOTICE).
static EMBEDDED_WEIGHTS: &[u8] = include_bytes!("../../../models/efficientnet-lite0.safetensors");

/// What runs: a native architecture, or a compiled ONNX graph.
enum Arch {
    /// Boxed: the layers are many and large; the enum stays small.
    EfficientNet(Box<efficientnet::EfficientNetLite>),
    /// The same on a GPU.
    DeviceEfficientNet(Box<device_plan::EfficientNet>),
    /// Boxed as well: the plan carries its arena's layout.
    Graph(Box<graph::Plan>),
    /// Dense layers (sensor models).
    Mlp(mlp::Mlp),
}

pub struct CandleBackend {
    net: Arch,
    input: (usize, usize, usize, usize),
    /// Where the frame tensor goes (the CPU, or the GPU the model runs on).
    device: Device,
    placement: Placement,
}

/// The device a model runs on: the CPU, or with `gpu_enabled` its GPU, when it can be used;
/// when it cannot, the GPU policy decides (an error, or the CPU and the reason).
fn place(config: &ModelConfig) -> Result<(Device, Placement), BackendError> {
    let i = &config.inference;
    if !i.gpu_enabled {
        return Ok((Device::Cpu, Placement::cpu()));
    }
    let opened = match config.sensor {
        // A few hundred multiply-adds: a GPU launch costs more than the CPU takes.
        Some(_) => Err("the Candle backend runs sensor models' dense networks on the CPU".to_owned()),
        None => gpu::open(i.gpu_device),
    };
    match opened {
        Ok(d) => Ok((d, Placement::cuda(i.gpu_device))),
        Err(why) => Ok((Device::Cpu, Placement::gpu_unavailable(config, "candle", why)?)),
    }
}

fn unsupported(reason: String) -> BackendError {
    BackendError::Unsupported {
        backend: "candle",
        reason,
    }
}

impl CandleBackend {
    pub fn load(path: &Path, config: &ModelConfig, _env: &BackendEnv) -> Result<CandleBackend, BackendError> {
        let (device, placement) = place(config)?;
        let load_err = |reason: String| BackendError::Load {
            path: path.display().to_string(),
            reason,
        };
        if let Some(s) = &config.sensor {
            let weights = match path.is_file() {
                true => weights::load(path).map_err(load_err)?,
                false => return Err(load_err("the file does not exist".into())),
            };
            let net = mlp::Mlp::load(&weights).map_err(|e| load_err(format!("dense network: {e}")))?;
            if net.inputs() != s.input_len() {
                return Err(load_err(format!(
                    "the network takes {} inputs; the sensor config gives {} ({} fields x window {})",
                    net.inputs(),
                    s.input_len(),
                    s.fields.len(),
                    s.window
                )));
            }
            log::info!(
                model = config.name.as_str();
                "model `{}`: Candle dense network {} -> {} from {}",
                config.name,
                net.inputs(),
                net.outputs(),
                path.display()
            );
            return Ok(CandleBackend {
                net: Arch::Mlp(net),
                input: (1, s.input_len(), 1, 1),
                device,
                placement,
            });
        }
        let p = &config.preprocessing;
        if p.layout != Layout::Nchw {
            return Err(load_err(format!(
                "the Candle backend takes NCHW input; the config says {:?}",
                p.layout
            )));
        }
        let input = (1, 3, p.height as usize, p.width as usize);
        let is_onnx = path.extension().is_some_and(|e| e == "onnx");
        // Without `candle-graph`, an ONNX classifier still runs natively from its initializers.
        let graph = is_onnx && (cfg!(feature = "candle-graph") || config.model_type != ModelType::Classification);
        if graph {
            if !graph::COMPILED {
                return Err(unsupported(format!(
                    "model `{}`: ONNX graphs on Candle are not compiled into this build; rebuild with `--features candle-graph`",
                    config.name
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| load_err(e.to_string()))?;
            let plan = match &device {
                Device::Cpu => graph::Plan::from_onnx(&bytes),
                d => graph::Plan::from_onnx_on(&bytes, d),
            }
            .map_err(load_err)?;
            let want = [input.0, input.1, input.2, input.3];
            let fits = plan.input_dims.len() == 4
                && plan
                    .input_dims
                    .iter()
                    .zip(want)
                    .all(|(d, w)| *d < 0 || *d as usize == w);
            if !fits {
                return Err(load_err(format!(
                    "model input `{}` has shape {:?} (-1 = dynamic), but the preprocessing config gives {want:?}",
                    plan.input_name, plan.input_dims
                )));
            }
            log::info!(
                model = config.name.as_str();
                "model `{}`: Candle ONNX graph plan on {} from {}",
                config.name,
                placement.device,
                path.display()
            );
            return Ok(CandleBackend {
                net: Arch::Graph(Box::new(plan)),
                input,
                device,
                placement,
            });
        }
        if config.model_type != ModelType::Classification {
            return Err(unsupported(format!(
                "model `{}`: the native Candle architectures are classifiers; give an ONNX graph for {}",
                config.name,
                config.model_type.as_str()
            )));
        }
        let weights = if path == Path::new(EMBEDDED_MODEL) {
            let w = weights::load_bytes(EMBEDDED_WEIGHTS).map_err(load_err)?;
            // Copied out: the 9.4 MB image in the binary need not stay resident.
            crate::memory::release_embedded(EMBEDDED_WEIGHTS);
            w
        } else if path.is_file() {
            weights::load(path).map_err(load_err)?
        } else {
            return Err(load_err("the file does not exist".into()));
        };
        if !device.is_cpu() {
            let model = device_plan::EfficientNet::load(&weights, (input.2, input.3), &device)
                .map_err(|e| load_err(format!("EfficientNet-Lite on {}: {e}", placement.device)))?;
            log::info!(
                model = config.name.as_str();
                "model `{}`: Candle EfficientNet-Lite ({} blocks) on {} from {}",
                config.name,
                model.blocks(),
                placement.device,
                path.display()
            );
            return Ok(CandleBackend {
                net: Arch::DeviceEfficientNet(Box::new(model)),
                input,
                device,
                placement,
            });
        }
        let model = efficientnet::EfficientNetLite::load(&weights, (input.2, input.3))
            .map_err(|e| load_err(format!("EfficientNet-Lite: {e}")))?;
        log::info!(
            "model `{}`: Candle EfficientNet-Lite ({} blocks, {} classes, {:.1} MiB of buffers) from {}",
            config.name,
            model.blocks(),
            model.classes(),
            model.arena_bytes() as f64 / (1 << 20) as f64,
            path.display()
        );
        Ok(CandleBackend {
            net: Arch::EfficientNet(Box::new(model)),
            input,
            device,
            placement,
        })
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn provider(&self) -> &str {
        &self.placement.device
    }

    fn placement(&self) -> &Placement {
        &self.placement
    }

    fn metadata_labels(&self) -> Option<Vec<String>> {
        match &self.net {
            Arch::Graph(plan) => plan
                .metadata
                .get("names")
                .and_then(|n| crate::config::model::parse_names(n)),
            Arch::EfficientNet(_) | Arch::DeviceEfficientNet(_) | Arch::Mlp(_) => None,
        }
    }

    fn infer(&mut self, input: &[f32], out: &mut Outputs) -> Result<(), BackendError> {
        out.shape.clear();
        out.values.clear();
        let dims = self.input;
        let device = &self.device;
        cpu::run(|| match &mut self.net {
            Arch::EfficientNet(m) => {
                let logits = m.forward(input).map_err(BackendError::Run)?;
                out.shape.extend_from_slice(&[1, logits.len()]);
                out.values.extend_from_slice(logits);
                Ok(())
            }
            Arch::DeviceEfficientNet(m) => {
                m.forward(input, &mut out.values)
                    .map_err(|e| BackendError::Run(e.to_string()))?;
                out.shape.extend_from_slice(&[1, out.values.len()]);
                Ok(())
            }
            Arch::Mlp(m) => {
                let y = m.forward(input).map_err(BackendError::Run)?;
                out.shape.extend_from_slice(&[1, y.len()]);
                out.values.extend_from_slice(y);
                Ok(())
            }
            Arch::Graph(plan) => {
                let (n, c, h, w) = dims;
                let shape = plan
                    .run_slice(input, &[n, c, h, w], device, &mut out.values, None)
                    .map_err(|e| BackendError::Run(e.to_string()))?;
                out.shape.extend_from_slice(&shape);
                Ok(())
            }
        })
    }

    fn profile(&mut self, input: &[f32]) -> Option<Vec<(String, std::time::Duration)>> {
        let dims = self.input;
        let device = &self.device;
        cpu::run(|| {
            let mut times = Vec::new();
            match &mut self.net {
                Arch::EfficientNet(m) => {
                    m.forward_profiled(input, &mut times).ok()?;
                }
                Arch::DeviceEfficientNet(m) => {
                    let t = std::time::Instant::now();
                    m.forward(input, &mut Vec::new()).ok()?;
                    times.push((format!("whole network on {}", m.device_name()), t.elapsed()));
                }
                Arch::Graph(plan) => {
                    let (n, c, h, w) = dims;
                    plan.run_slice(input, &[n, c, h, w], device, &mut Vec::new(), Some(&mut times))
                        .ok()?;
                }
                Arch::Mlp(m) => {
                    let t = std::time::Instant::now();
                    m.forward(input).ok()?;
                    times.push(("dense layers".to_owned(), t.elapsed()));
                }
            }
            Some(times)
        })
    }
}

/// The kernels' CPU threads (`CANDLE_THREADS`; 0: one per CPU) and
/// instruction-set cap (`CANDLE_ISA`).
pub fn set_cpu(threads: usize, isa: &str) {
    cpu::set_isa_cap(isa);
    cpu::set_threads(threads)
}

/// `bench gemm`: our GEMM against the `gemm` crate (`gemm.rs`).
pub fn bench_gemm(iters: usize) -> Result<String, String> {
    Ok(gemm::bench(iters) + &nhwc_gemm::bench(iters) + &nhwc::bench_depthwise(iters))
}

/// `bench layouts`: NCHW against NHWC kernels on EfficientNet-Lite0's shapes (`candle-graph`).
pub fn bench_layouts(iters: usize) -> Result<String, String> {
    graph::bench_layouts(iters)
}

/// See [`crate::backend::compile_untrusted`].
pub fn compile_untrusted(kind: &str, bytes: &[u8]) -> Result<(), String> {
    if kind == "onnx-graph" {
        return graph::Plan::from_onnx(bytes).map(drop);
    }
    let ext = match kind {
        "pth" | "safetensors" | "onnx" => kind,
        other => return Err(format!("unknown kind `{other}`")),
    };
    // The checkpoint readers take a file (candle's `.pth` reader opens a zip by path).
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("aei-untrusted-{}-{n}.{ext}", std::process::id()));
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let loaded = weights::load(&path);
    let _ = std::fs::remove_file(&path);
    efficientnet::EfficientNetLite::load(&loaded?, (64, 64)).map(drop)
}

/// `convert IN OUT`: a checkpoint (`.pth`, legacy or zip; safetensors; or an
/// ONNX model's initializers) -> safetensors in `dtype` ("f16" or "f32"),
/// names unchanged.
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
