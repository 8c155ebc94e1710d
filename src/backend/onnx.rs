//! The ONNX Runtime backend (`ort`, the library loaded at run time).
//!
//! Owns: finding and loading the ONNX Runtime shared library once per
//! process, session options from the model config (threads, optimisation
//! level, execution providers without silent fallback), checking the
//! model's input against the preprocessing config, warm-up, and running the
//! slot's tensor as a borrowed view.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use ort::ep::{self, ExecutionProvider as _, ExecutionProviderDispatch};
use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use super::{Backend, BackendEnv, BackendError, Outputs, Placement};
use crate::config::model::{Inference, ModelConfig, OptLevel};

/// The loaded ONNX Runtime library: where from, and its build string.
struct Runtime {
    path: PathBuf,
    info: String,
    env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

fn err(reason: impl Into<String>) -> BackendError {
    BackendError::Unsupported {
        backend: "onnx",
        reason: reason.into(),
    }
}

/// Candidate library paths, in the order they are tried.
fn candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = configured {
        return vec![p.to_path_buf()];
    }
    let mut v = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let mut beside: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        beside.sort();
        beside.reverse(); // the newest version first
        if beside.is_empty() {
            beside.push(dir.join("libonnxruntime.so"));
        }
        v.extend(beside);
    }
    v
}

/// Loads the library once per process (the first model's settings win).
fn runtime(configured: Option<&Path>) -> Result<&'static Runtime, BackendError> {
    let r = RUNTIME.get_or_init(|| {
        let mut tried = Vec::new();
        for path in candidates(configured) {
            if !path.exists() {
                tried.push(format!("{} (no such file)", path.display()));
                continue;
            }
            match ort::init_from(&path) {
                Ok(builder) => match builder.with_name("ai-edge-inference").build() {
                    Ok(env) => {
                        let info = ort::info().to_owned();
                        log::info!("ONNX Runtime loaded from {}: {info}", path.display());
                        return Ok(Runtime { path, info, env });
                    }
                    Err(e) => tried.push(format!("{} ({e})", path.display())),
                },
                // Names the version found when it is too old.
                Err(e) => tried.push(format!("{} ({e})", path.display())),
            }
        }
        Err(format!(
            "cannot load the ONNX Runtime library; tried: {}. Set ORT_DYLIB_PATH (--ort-library) to a libonnxruntime.so.1.x \
             (version 1.17 or newer; `models/fetch` downloads one)",
            if tried.is_empty() { "nothing".to_owned() } else { tried.join("; ") }
        ))
    });
    r.as_ref().map_err(|e| err(e.clone()))
}

/// Prepacked weights shared by the sessions of one model file (its engine
/// copies, and the old and new version during a hot reload), so each copy
/// adds only its own run-time buffers. Freed when the last of them goes.
static PREPACKED: Mutex<Vec<(PathBuf, Weak<PrepackedWeights>)>> = Mutex::new(Vec::new());

fn prepacked_for(path: &Path) -> Arc<PrepackedWeights> {
    let mut all = PREPACKED.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(_, w)| w.strong_count() > 0);
    if let Some(p) = all.iter().find(|(p, _)| p == path).and_then(|(_, w)| w.upgrade()) {
        return p;
    }
    let p = Arc::new(PrepackedWeights::new());
    all.push((path.to_path_buf(), Arc::downgrade(&p)));
    p
}

pub struct OnnxBackend {
    session: Session,
    placement: Placement,
    /// Kept alive with the session that uses it.
    _prepacked: Arc<PrepackedWeights>,
    input_shape: Vec<usize>,
    provider: String,
    metadata_labels: Option<Vec<String>>,
}

impl OnnxBackend {
    pub fn load(path: &Path, config: &ModelConfig, env: &BackendEnv) -> Result<OnnxBackend, BackendError> {
        let rt = runtime(env.ort_library.as_deref())?;
        let load_err = |reason: String| BackendError::Load {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(load_err(
                "the file does not exist (run `models/fetch`, or fix `model_path`)".into(),
            ));
        }
        let inf = &config.inference;

        let (eps, provider, placement) = providers(rt, config)?;
        let level = match inf.optimization_level {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::All,
        };
        let threads = inf.threads_per_copy();
        let prepacked = prepacked_for(path);
        let session = Session::builder(&rt.env)
            .and_then(|b| b.with_prepacked_weights(&prepacked).map_err(Into::into))
            .and_then(|b| b.with_optimization_level(level).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(inf.inter_threads).map_err(Into::into))
            .and_then(|b| b.with_intra_threads(threads).map_err(Into::into))
            // Spinning threads take the core from the JPEG decoding beside them.
            .and_then(|b| b.with_intra_op_spinning(inf.spinning).map_err(Into::into))
            .and_then(|b| b.with_inter_op_spinning(inf.spinning).map_err(Into::into))
            .and_then(|b| b.with_memory_pattern(inf.memory_pattern).map_err(Into::into))
            .and_then(|b| b.with_execution_providers(eps).map_err(Into::into))
            .map_err(|e: ort::Error| load_err(format!("session options: {e}")))?
            .commit_from_file(path)
            .map_err(|e| load_err(e.to_string()))?;

        // The model's input must fit the preprocessing config.
        let input_shape = check_input(&session, config).map_err(load_err)?;
        if session.outputs().is_empty() {
            return Err(load_err("the model has no outputs".into()));
        }
        let metadata_labels = session
            .metadata()
            .ok()
            .and_then(|m| m.custom("names"))
            .and_then(|names| crate::config::model::parse_names(&names));
        log::info!(
            "model `{}`: ONNX Runtime ({}), provider {provider}, input `{}` {:?}, {threads} threads intra{} / {} inter, spinning {}",
            config.name,
            rt.path.display(),
            session.inputs()[0].name(),
            input_shape,
            if inf.intra_threads == 0 { " (auto)" } else { "" },
            inf.inter_threads,
            if inf.spinning { "on" } else { "off" },
        );
        log::debug!("ONNX Runtime build: {}", rt.info);
        // `Models::load` runs the warm-up inference before the model is called ready.
        Ok(OnnxBackend {
            session,
            placement,
            _prepacked: prepacked,
            input_shape,
            provider,
            metadata_labels,
        })
    }
}

/// One execution provider as the config sets it up: device, memory limit, TensorRT's engine
/// cache and precision. Asked to fail rather than be skipped when it cannot register.
fn dispatch(name: &str, inf: &Inference) -> ExecutionProviderDispatch {
    let device = inf.gpu_device as i32;
    let limit = (inf.gpu_memory_limit_mb as usize).saturating_mul(1 << 20);
    match name {
        "cuda" => {
            let mut cuda = ep::CUDA::default().with_device_id(device);
            if limit > 0 {
                cuda = cuda.with_memory_limit(limit);
            }
            cuda.build().error_on_failure()
        }
        "tensorrt" => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(device)
                .with_fp16(inf.tensorrt_fp16);
            if limit > 0 {
                trt = trt.with_max_workspace_size(limit);
            }
            if let Some(dir) = &inf.tensorrt_engine_cache {
                trt = trt.with_engine_cache(true).with_engine_cache_path(dir.display());
            }
            trt.build().error_on_failure()
        }
        _ => ep::CPU::default()
            .with_arena_allocator(inf.cpu_arena)
            .build()
            .error_on_failure(),
    }
}

/// The execution providers a session gets, the one that runs the model, and where it runs.
///
/// Without `gpu_enabled` the config's GPU providers are skipped (and said so). With it, the
/// GPU providers it lists (`cuda` when it lists none) are tried in order: each must be in the
/// library and register (ort is asked to fail, not to skip). When none does, the GPU policy
/// decides: `require` refuses the model, `fallback` runs it on the CPU and says why.
fn providers(
    rt: &Runtime,
    config: &ModelConfig,
) -> Result<(Vec<ExecutionProviderDispatch>, String, Placement), BackendError> {
    let inf = &config.inference;
    let is_gpu = |n: &String| n == "cuda" || n == "tensorrt";
    if !inf.gpu_enabled {
        for name in inf.execution_providers.iter().filter(|n| is_gpu(n)) {
            log::warn!(
                model = config.name.as_str();
                "model `{}`: execution provider {name} skipped: GPU_ENABLED / inference.gpu_enabled is false",
                config.name
            );
        }
        if !inf.execution_providers.iter().any(|n| n == "cpu") {
            return Err(err(format!(
                "model `{}`: none of the execution providers {:?} can run: the GPU ones need GPU_ENABLED=true and \
                 inference.gpu_enabled; add `cpu` to the list to run on the CPU",
                config.name, inf.execution_providers
            )));
        }
        return Ok((vec![dispatch("cpu", inf)], "cpu".into(), Placement::cpu()));
    }
    let mut wanted: Vec<&str> = inf
        .execution_providers
        .iter()
        .filter(|n| is_gpu(n))
        .map(String::as_str)
        .collect();
    if wanted.is_empty() {
        wanted.push("cuda");
    }
    let mut reasons = Vec::new();
    for name in wanted {
        let available = match name {
            "tensorrt" => ep::TensorRT::is_available(),
            _ => ep::CUDA::is_available(),
        };
        if !available.unwrap_or(false) {
            reasons.push(format!(
                "{name}: not in this ONNX Runtime library ({}; the onnxruntime-gpu build has it)",
                rt.path.display()
            ));
            continue;
        }
        // Registering is where a missing driver, device or CUDA library shows.
        let probe = Session::builder(&rt.env)
            .and_then(|b| b.with_execution_providers([dispatch(name, inf)]).map_err(Into::into));
        match probe {
            Ok(_) => {
                let eps = vec![dispatch(name, inf), dispatch("cpu", inf)];
                return Ok((eps, name.to_owned(), Placement::cuda(inf.gpu_device)));
            }
            Err(e) => reasons.push(format!("{name}: {e}")),
        }
    }
    let placement = Placement::gpu_unavailable(config, "onnx", reasons.join("; "))?;
    Ok((vec![dispatch("cpu", inf)], "cpu".into(), placement))
}

/// The input shape the config feeds (NCHW/NHWC, or `[1, n]` for sensor models), checked
/// against the model's input.
fn check_input(session: &Session, config: &ModelConfig) -> Result<Vec<usize>, String> {
    let inputs = session.inputs();
    let [input] = inputs else {
        return Err(format!("expected a model with one input, found {}", inputs.len()));
    };
    let p = &config.preprocessing;
    let want = config.input_shape();
    let ValueType::Tensor { ty, shape, .. } = input.dtype() else {
        return Err(format!("input `{}` is not a tensor", input.name()));
    };
    if *ty != TensorElementType::Float32 {
        return Err(format!(
            "input `{}` is {ty:?}; only float32 inputs are supported",
            input.name()
        ));
    }
    let dims: &[i64] = shape;
    let fits = dims.len() == want.len() && dims.iter().zip(&want).all(|(d, w)| *d < 0 || *d as usize == *w);
    if !fits && config.sensor.is_some() {
        return Err(format!(
            "model input `{}` has shape {dims:?} (-1 = dynamic), but the sensor config gives {want:?} (fields x window)",
            input.name()
        ));
    }
    if !fits {
        return Err(format!(
            "model input `{}` has shape {dims:?} (-1 = dynamic), but the preprocessing config gives {want:?} \
             ({:?}, resize [{}, {}])",
            input.name(),
            p.layout,
            p.width,
            p.height
        ));
    }
    Ok(want)
}

impl Backend for OnnxBackend {
    fn name(&self) -> &'static str {
        "onnx"
    }

    fn provider(&self) -> &str {
        &self.provider
    }

    fn placement(&self) -> &Placement {
        &self.placement
    }

    fn metadata_labels(&self) -> Option<Vec<String>> {
        self.metadata_labels.clone()
    }

    fn infer(&mut self, input: &[f32], out: &mut Outputs) -> Result<(), BackendError> {
        let run = |e: ort::Error| BackendError::Run(e.to_string());
        // A view of the slot's tensor: no copy.
        let tensor = TensorRef::from_array_view((self.input_shape.as_slice(), input)).map_err(run)?;
        let outputs = self.session.run(ort::inputs![tensor]).map_err(run)?;
        let (shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(run)?;
        out.shape.clear();
        out.shape.extend(shape.iter().map(|d| *d as usize));
        out.values.clear();
        out.values.extend_from_slice(data);
        Ok(())
    }
}
