//! Loaded models and topic routing.
//!
//! Owns: turning validated `ModelConfig`s into runnable models (a built-in
//! analysis or a backend `Engine`), their readiness, and which models a
//! topic routes to. Does not touch frames (see `process.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::backend::{BackendError, Engine};
use crate::config::model::{ModelConfig, ModelType};
use crate::health;

/// Most models one service routes a frame to.
pub const MAX_MODELS: usize = 64;

pub enum Runner {
    Health(health::Monitor),
    Ml(Mutex<Engine>),
}

pub struct Model {
    pub config: ModelConfig,
    pub runner: Runner,
    pub ready: AtomicBool,
}

impl Model {
    pub fn backend_name(&self) -> &'static str {
        match &self.runner {
            Runner::Health(_) => "builtin",
            Runner::Ml(_) => self.config.backend.as_str(),
        }
    }
}

/// A model a frame goes to, and which of its input filters matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub model: u16,
    pub filter: u16,
}

#[derive(Debug)]
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

pub struct Models {
    pub list: Vec<Model>,
}

impl Models {
    /// Loads every model; the first failure is returned with its model named.
    pub fn load(configs: Vec<ModelConfig>) -> Result<Models, LoadError> {
        if configs.len() > MAX_MODELS {
            return Err(LoadError {
                model: configs[MAX_MODELS].name.clone(),
                source: "model configs".into(),
                error: BackendError::Unsupported {
                    backend: "any",
                    reason: format!("at most {MAX_MODELS} models"),
                },
            });
        }
        let mut list = Vec::with_capacity(configs.len());
        for config in configs {
            let runner = match config.model_type {
                ModelType::CameraHealth => Runner::Health(health::Monitor::default()),
                ModelType::Classification | ModelType::Detection => match Engine::load(&config) {
                    Ok(e) => Runner::Ml(Mutex::new(e)),
                    Err(error) => {
                        return Err(LoadError {
                            model: config.name.clone(),
                            source: config
                                .source
                                .as_deref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "built-in".into()),
                            error,
                        })
                    }
                },
            };
            // Built-in analyses need no warm-up; engines warm up in `Engine::load`.
            list.push(Model {
                config,
                runner,
                ready: AtomicBool::new(true),
            });
        }
        Ok(Models { list })
    }

    pub fn all_ready(&self) -> bool {
        self.list.iter().all(|m| m.ready.load(Ordering::Relaxed))
    }

    /// Fills `out` with every model whose input filters match `topic`
    /// (each model once, with its first matching filter).
    pub fn route(&self, topic: &str, out: &mut Vec<Route>) {
        out.clear();
        for (mi, m) in self.list.iter().enumerate() {
            if let Some(fi) = m.config.input_topics.iter().position(|f| f.matches(topic)) {
                out.push(Route {
                    model: mi as u16,
                    filter: fi as u16,
                });
            }
        }
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

    /// (name, backend, type, ready) for metrics and `/readyz`.
    pub fn summary(&self) -> Vec<(String, &'static str, &'static str, bool)> {
        self.list
            .iter()
            .map(|m| {
                (
                    m.config.name.clone(),
                    m.backend_name(),
                    m.config.model_type.as_str(),
                    m.ready.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}
