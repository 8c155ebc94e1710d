//! Loaded models and topic routing.
//!
//! Owns: turning validated `ModelConfig`s into runnable models (a built-in
//! analysis or a backend `Engine` with its labels and post-processing
//! buffers), warm-up, readiness and load failures. Does not touch frames
//! (see `process.rs`) or route them (see `ingest.rs`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::{Backend as _, BackendEnv, BackendError, Engine, Outputs, Placement};
use crate::config::model::{BackendKind, Labels, ModelConfig, ModelType};
use crate::health;
use crate::metrics::Histogram;
use crate::postprocess::{self, Detection, YoloLayout};

/// Most models one service routes a frame to.
pub const MAX_MODELS: usize = 64;

/// One backend's engine and the buffers its results land in, sized at load.
/// A model that is not serving as configured: it failed to load, a reload of
/// it failed (its old version serving), or its config file was not added.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, miniserde::Serialize)]
pub struct Problem {
    pub model: String,
    pub error: String,
}

/// One backend engine with the buffers of its last run: raw outputs, and
/// what post-processing made of them (candidates and kept detections, or top
/// classes), all sized at warm-up.
pub struct EngineState {
    pub engine: Engine,
    /// What results say in `backend_used` (`Placement::backend_used`).
    pub backend_used: String,
    pub outputs: Outputs,
    pub candidates: Vec<Detection>,
    pub kept: Vec<Detection>,
    /// With tracking: each kept detection's track id (same order).
    pub track_ids: Vec<u64>,
    /// Classification: the top-k (class, probability) pairs.
    pub classes: Vec<(usize, f32)>,
}

/// An ML model with everything one inference needs.
pub struct MlModel {
    /// The backend whose predictions are the model's result.
    pub primary: EngineState,
    /// Dual mode: the other backend, run on the same tensor for comparison.
    pub comparison: Option<EngineState>,
    pub labels: Vec<String>,
    /// Detection: the output layout, worked out at warm-up.
    pub yolo: Option<YoloLayout>,
}

pub enum Runner {
    Health(health::Monitor),
    Ml(Pool),
}

/// An ML model's engine copies (`inference.instances`), each with its own
/// buffers; workers run frames on them in parallel.
pub struct Pool {
    copies: Box<[Mutex<MlModel>]>,
    next: std::sync::atomic::AtomicUsize,
}

impl Pool {
    pub fn new(copies: Vec<MlModel>) -> Pool {
        Pool {
            copies: copies.into_iter().map(Mutex::new).collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A copy no other worker is using, else waits for one, taken in turn.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, MlModel> {
        for c in self.copies.iter() {
            match c.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.copies.len();
        self.copies[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }
}

pub struct Model {
    pub config: ModelConfig,
    pub runner: Runner,
    /// The execution provider in use (`builtin` for built-in analyses).
    pub provider: String,
    /// Where it runs (both sides in dual mode), and why not on the GPU asked for.
    pub placement: Placement,
    /// What its results say in `backend_used` (in dual mode, the primary side's).
    pub backend_used: String,
    /// Its alert rules' state per camera; shared with the version a reload replaces it by.
    pub alerts: Arc<std::sync::Mutex<crate::alerts::Alerts>>,
    /// With tracking: each camera's previous boxes; shared like `alerts`.
    pub tracks: Arc<std::sync::Mutex<crate::tracks::Tracks>>,
    pub ready: AtomicBool,
    pub loaded_at: std::time::SystemTime,
    /// Content hash of the model file (0 when there is none), the version `/models` shows.
    pub hash: u64,
    /// Frames this model has answered.
    pub frames: std::sync::atomic::AtomicU64,
    /// Inference time of this version, per backend (`metrics::backend_index`: candle, onnx).
    pub latency: [Histogram; 2],
    /// Sensor models: each device's window of readings (kept by the ingest task). A reloaded
    /// version starts with empty windows.
    pub windows: Option<std::sync::Mutex<crate::sensor::Windows>>,
}

impl Model {
    pub fn backend_name(&self) -> &'static str {
        match &self.runner {
            Runner::Health(_) => "builtin",
            Runner::Ml(_) => self.config.backend.as_str(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadError {
    pub model: String,
    pub source: String,
    pub error: BackendError,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model `{}` ({}): {}", self.model, self.source, self.error)
    }
}

/// One model's state for `/readyz` and metrics.
pub use crate::metrics::Summary;

pub struct Models {
    /// Shared between snapshots: a hot swap replaces one entry.
    pub list: Vec<Arc<Model>>,
    /// Models that failed to load; the others serve.
    pub failed: Vec<LoadError>,
}

/// A model's alert state: fresh, or read back from its `alert_state_file` (what was found is
/// logged; a reload keeps the state it replaces instead, see `registry.rs`).
fn open_alerts(config: &ModelConfig) -> crate::alerts::Alerts {
    use crate::alerts::{Alerts, Restored};
    let Some(path) = &config.alert_state_file else {
        return Alerts::default();
    };
    let (alerts, restored) = Alerts::with_state_file(path, &config.name, &config.alert_rules);
    let (name, file) = (config.name.as_str(), path.display());
    match restored {
        Restored::Fresh => log::info!(model = name; "model `{name}`: alert state will be kept in {file}"),
        Restored::Read { cameras, open } => log::info!(
            model = name; "model `{name}`: alert state read from {file} ({cameras} cameras, {open} open alerts)"
        ),
        Restored::SetAside(why, aside) => log::warn!(
            model = name; "model `{name}`: alert state file {file} cannot be used ({why}); moved to {}, starting fresh",
            aside.display()
        ),
        Restored::NotUsed(why) => log::warn!(
            model = name; "model `{name}`: alert state file {file} left alone ({why}); this model's alert state is not saved"
        ),
    }
    alerts
}

impl Models {
    /// Loads every model. A model that fails to load or warm up is recorded
    /// in `failed` and the others still serve.
    pub fn load(configs: Vec<ModelConfig>, env: &BackendEnv) -> Models {
        let mut list = Vec::with_capacity(configs.len());
        let mut failed = Vec::new();
        for config in configs {
            if list.len() == MAX_MODELS {
                failed.push(LoadError {
                    model: config.name.clone(),
                    source: source_of(&config),
                    error: BackendError::Unsupported {
                        backend: "any",
                        reason: format!("at most {MAX_MODELS} models"),
                    },
                });
                continue;
            }
            let loaded = match config.model_type {
                ModelType::CameraHealth => Ok((
                    Runner::Health(health::Monitor::default()),
                    ("builtin".to_owned(), Placement::cpu()),
                )),
                ModelType::Classification | ModelType::Detection | ModelType::SensorAnomaly => load_ml(&config, env),
            };
            match loaded {
                Ok((runner, (provider, placement))) => {
                    let hash = config
                        .model_path
                        .as_deref()
                        .and_then(|p| std::fs::read(p).ok())
                        .map(|b| health::content_hash(&b))
                        .unwrap_or(0);
                    let primary = match config.backend {
                        BackendKind::Dual => "candle",
                        _ => config.backend.as_str(),
                    };
                    let backend_used = match config.model_type {
                        ModelType::CameraHealth => "builtin".to_owned(),
                        _ => placement.backend_used(primary),
                    };
                    list.push(Arc::new(Model {
                        runner,
                        provider,
                        backend_used,
                        placement,
                        alerts: Arc::new(std::sync::Mutex::new(open_alerts(&config))),
                        tracks: Default::default(),
                        ready: AtomicBool::new(true),
                        loaded_at: std::time::SystemTime::now(),
                        hash,
                        frames: std::sync::atomic::AtomicU64::new(0),
                        latency: Default::default(),
                        windows: config
                            .sensor
                            .as_ref()
                            .map(|s| std::sync::Mutex::new(crate::sensor::Windows::new(s))),
                        config,
                    }))
                }
                Err(error) => failed.push(LoadError {
                    model: config.name.clone(),
                    source: source_of(&config),
                    error,
                }),
            }
        }
        Models { list, failed }
    }

    pub fn all_ready(&self) -> bool {
        self.failed.is_empty() && self.list.iter().all(|m| m.ready.load(Ordering::Relaxed))
    }

    /// Distinct subscription filters over all models.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut subs: Vec<String> = Vec::new();
        for m in &self.list {
            for f in &m.config.input_topics {
                if !subs.iter().any(|s| s == f.subscription()) {
                    subs.push(f.subscription().to_owned());
                }
            }
        }
        subs
    }

    /// Index of the model called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|m| m.config.name == name)
    }

    /// Every configured model, serving or failed, for metrics and `/readyz`.
    pub fn summary(&self) -> Vec<Summary> {
        let serving = self.list.iter().map(|m| Summary {
            name: m.config.name.clone(),
            backend: m.backend_name(),
            model_type: m.config.model_type.as_str(),
            provider: m.provider.clone(),
            device: m.placement.device.clone(),
            gpu_fallback: m.placement.gpu_fallback.clone(),
            ready: m.ready.load(Ordering::Relaxed),
            error: None,
            hash: m.hash,
            frames: m.frames.load(Ordering::Relaxed),
            latency: [m.latency[0].snapshot(), m.latency[1].snapshot()],
        });
        let failed = self.failed.iter().map(|f| Summary {
            name: f.model.clone(),
            backend: "none",
            model_type: "unknown",
            provider: "none".into(),
            device: "none".into(),
            gpu_fallback: None,
            ready: false,
            error: Some(f.error.to_string()),
            hash: 0,
            frames: 0,
            latency: Default::default(),
        });
        serving.chain(failed).collect()
    }
}

fn source_of(config: &ModelConfig) -> String {
    config
        .source
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in".into())
}

/// Loads an ML model (both sides in dual mode), resolves its labels and
/// warms each side up once, which also fixes the output layout and sizes
/// every post-processing buffer.
fn load_ml(config: &ModelConfig, env: &BackendEnv) -> Result<(Runner, (String, Placement)), BackendError> {
    let n = config.inference.engine_copies();
    let mut copies = Vec::with_capacity(n);
    let mut provider = (String::new(), Placement::cpu());
    for _ in 0..n {
        let (ml, p) = load_copy(config, env)?;
        copies.push(ml);
        provider = p;
    }
    if n > 1 {
        log::info!("model `{}`: {n} engine copies run frames in parallel", config.name);
    }
    Ok((Runner::Ml(Pool::new(copies)), provider))
}

/// One copy of an ML model: its engine(s), warmed up, and its buffers.
fn load_copy(config: &ModelConfig, env: &BackendEnv) -> Result<(MlModel, (String, Placement)), BackendError> {
    let path = config.model_path.as_deref().unwrap_or(Path::new(""));
    let (primary, second) = match config.backend {
        BackendKind::Dual => {
            let onnx = config
                .onnx_model_path
                .as_deref()
                .or_else(|| path.extension().is_some_and(|e| e == "onnx").then_some(path))
                .ok_or_else(|| BackendError::Unsupported {
                    backend: "dual",
                    reason: format!(
                        "model `{}`: dual mode runs Candle on `model_path` and ONNX Runtime on `onnx_model_path`; set it",
                        config.name
                    ),
                })?;
            (
                warm(Engine::load_as(BackendKind::Candle, path, config, env)?, config)?,
                Some(warm(Engine::load_as(BackendKind::Onnx, onnx, config, env)?, config)?),
            )
        }
        // ONNX Runtime takes the ONNX form when the config names one beside `model_path`.
        BackendKind::Onnx => {
            let onnx = config.onnx_model_path.as_deref().unwrap_or(path);
            (
                warm(Engine::load_as(BackendKind::Onnx, onnx, config, env)?, config)?,
                None,
            )
        }
        kind => (warm(Engine::load_as(kind, path, config, env)?, config)?, None),
    };
    let fail = |reason: String| BackendError::Load {
        path: path.display().to_string(),
        reason,
    };
    let configured = match &config.labels {
        Labels::Inline(v) | Labels::File(_, v) => Some(v.clone()),
        Labels::FromModel => primary.engine.metadata_labels(),
    };
    let i = &config.inference;
    if let Some(s) = &config.sensor {
        let (n, want) = (primary.outputs.values.len(), s.input_len());
        if s.score == crate::config::model::SensorScore::ReconstructionError && n != want {
            return Err(fail(format!(
                "score `reconstruction_error` needs the model to give back its {want} inputs; it outputs {n} values (use `score: output` for a model that scores)"
            )));
        }
        if n == 0 {
            return Err(fail("the model outputs nothing".into()));
        }
    }
    let (labels, yolo) = match config.model_type {
        ModelType::Detection => {
            let layout = postprocess::yolo_layout(
                &primary.outputs.shape,
                configured.as_ref().map(Vec::len),
                i.yolo_version,
            )
            .map_err(fail)?;
            (configured.unwrap_or_else(|| numbered(layout.classes)), Some(layout))
        }
        _ => {
            let n = primary.outputs.values.len();
            if let Some(l) = &configured {
                if l.len() != n {
                    return Err(fail(format!(
                        "the model outputs {n} classes but {} labels are configured",
                        l.len()
                    )));
                }
            }
            (configured.unwrap_or_else(|| numbered(n)), None)
        }
    };
    if let Some(s) = &second {
        if s.outputs.shape != primary.outputs.shape {
            return Err(fail(format!(
                "dual mode: the backends' outputs differ in shape ({:?} vs {:?})",
                primary.outputs.shape, s.outputs.shape
            )));
        }
    }
    let anchors = yolo.map(|l| l.anchors.min(postprocess::MAX_CANDIDATES)).unwrap_or(0);
    let size = |mut side: EngineState| {
        side.candidates.reserve(anchors);
        side.kept.reserve(i.max_detections);
        side.classes.reserve(i.top_k + 1);
        side
    };
    let (provider, placement) = match &second {
        Some(s) => {
            let (a, b) = (primary.engine.placement(), s.engine.placement());
            let placement = Placement {
                device: match a.device == b.device {
                    true => a.device.clone(),
                    false => format!("{}+{}", a.device, b.device),
                },
                gpu_fallback: a.gpu_fallback.clone().or_else(|| b.gpu_fallback.clone()),
            };
            (
                format!("{}+{}", primary.engine.provider(), s.engine.provider()),
                placement,
            )
        }
        None => (primary.engine.provider().to_owned(), primary.engine.placement().clone()),
    };
    let ml = MlModel {
        primary: size(primary),
        comparison: second.map(size),
        labels,
        yolo,
    };
    Ok((ml, (provider, placement)))
}

/// One warm-up inference on zeros before the model is called ready.
fn warm(mut engine: Engine, config: &ModelConfig) -> Result<EngineState, BackendError> {
    let mut outputs = Outputs::default();
    let zeros = vec![0f32; config.input_len()];
    engine.infer(&zeros, &mut outputs).map_err(|e| BackendError::Load {
        path: config
            .model_path
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        reason: format!("warm-up inference on {} failed: {e}", engine.name()),
    })?;
    Ok(EngineState {
        backend_used: engine.placement().backend_used(engine.name()),
        engine,
        outputs,
        candidates: Vec::new(),
        kept: Vec::new(),
        track_ids: Vec::new(),
        classes: Vec::new(),
    })
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}
