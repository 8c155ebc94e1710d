//! The live model set and its hot swap.
//!
//! Owns: which `Models` snapshot new frames get, reloading one model beside
//! the old one (load + warm-up, then an atomic swap of the snapshot), the
//! record of failed reloads, and the file watcher that triggers reloads.
//! Frames hold the snapshot they were routed with, so in-flight frames
//! finish on the model they started with; unchanged models are shared
//! between snapshots (`Arc<Model>`), so a swap copies no model.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::backend::BackendEnv;
use crate::config::model;
use crate::config::Settings;
use crate::frame::Limits;
use crate::models::Models;

pub struct Registry {
    current: Mutex<Arc<Models>>,
    settings: Settings,
    env: BackendEnv,
    /// Slot sizes fixed at start-up; a reloaded model must fit them.
    limits: Limits,
    /// Serialises reloads (a slow load must not race another).
    reloading: Mutex<()>,
    /// Model name -> why its last reload failed (cleared by a good reload).
    pub reload_errors: Mutex<HashMap<String, String>>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl Registry {
    pub fn new(models: Models, settings: Settings, limits: Limits) -> Registry {
        let env = BackendEnv {
            ort_library: settings.ort_library.clone(),
        };
        Registry {
            current: Mutex::new(Arc::new(models)),
            settings,
            env,
            limits,
            reloading: Mutex::new(()),
            reload_errors: Mutex::new(HashMap::new()),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// The model set for the next frame (an `Arc` clone: no allocation).
    pub fn snapshot(&self) -> Arc<Models> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads model `name` from its config file: loads and warms up the new
    /// model beside the old one, then swaps. On any failure the old model
    /// keeps serving and the reason is recorded.
    pub fn reload(&self, name: &str) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = self.try_reload(name);
        let mut errors = self.reload_errors.lock().unwrap_or_else(|e| e.into_inner());
        match &outcome {
            Ok(()) => {
                self.reloads.fetch_add(1, Relaxed);
                errors.remove(name);
                log::info!("model `{name}` reloaded");
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Relaxed);
                errors.insert(name.to_owned(), e.clone());
                log::error!("model `{name}`: reload failed, the previous version keeps serving: {e}");
            }
        }
        outcome
    }

    fn try_reload(&self, name: &str) -> Result<(), String> {
        let old = self.snapshot();
        let i = old.find(name).ok_or_else(|| format!("no model named `{name}`"))?;
        let source = old.list[i]
            .config
            .source
            .clone()
            .ok_or_else(|| format!("model `{name}` is built in; it has no file to reload"))?;
        let config = model::load_file(&source, &self.settings).map_err(|e| e.to_string())?;
        if config.name != name {
            return Err(format!(
                "{} now names model `{}`; rename by restarting",
                source.display(),
                config.name
            ));
        }
        let p = &config.preprocessing;
        let needs_tensor = config.model_type != model::ModelType::CameraHealth;
        if needs_tensor
            && (crate::preprocess::tensor_len(p) > self.limits.max_tensor
                || p.width as usize > self.limits.max_input_width)
        {
            return Err(format!(
                "the new input size {}x{} needs bigger frame slots than this process allocated; restart to apply it",
                p.width, p.height
            ));
        }
        if config.input_topics != old.list[i].config.input_topics {
            return Err("input topics changed; subscriptions change with a restart".into());
        }
        let mut fresh = Models::load(vec![config], &self.env);
        if let Some(f) = fresh.failed.pop() {
            return Err(f.error.to_string());
        }
        let model = fresh.list.pop().ok_or("the model did not load")?;
        let mut list = old.list.clone();
        list[i] = model;
        let next = Arc::new(Models {
            list,
            failed: old.failed.clone(),
        });
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Reloads every model that has a config file (SIGHUP); each keeps its
    /// old version when its reload fails.
    pub fn reload_all(&self) {
        let names: Vec<String> = self
            .snapshot()
            .list
            .iter()
            .filter(|m| m.config.source.is_some())
            .map(|m| m.config.name.clone())
            .collect();
        for name in names {
            let _ = self.reload(&name);
        }
    }

    /// Polls the config and model files of every file-backed model every
    /// `period`; a file whose modification time changed and then held still
    /// for one period (so half-written files are skipped) triggers a reload.
    pub fn watch(self: &Arc<Self>, period: Duration) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("model-watch".into())
            .spawn(move || {
                let mut seen: HashMap<String, Vec<Option<SystemTime>>> = HashMap::new();
                let mut pending: HashMap<String, Vec<Option<SystemTime>>> = HashMap::new();
                loop {
                    std::thread::sleep(period);
                    for m in me.snapshot().list.iter() {
                        let name = &m.config.name;
                        let files: Vec<PathBuf> = [m.config.source.clone(), m.config.model_path.clone()]
                            .into_iter()
                            .flatten()
                            .filter(|p| p.is_absolute() || p.exists())
                            .collect();
                        if files.is_empty() {
                            continue;
                        }
                        let now: Vec<Option<SystemTime>> = files
                            .iter()
                            .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
                            .collect();
                        let before = seen.entry(name.clone()).or_insert_with(|| now.clone()).clone();
                        if now == before {
                            pending.remove(name);
                            continue;
                        }
                        match pending.get(name) {
                            Some(p) if *p == now => {
                                pending.remove(name);
                                seen.insert(name.clone(), now);
                                let _ = me.reload(name);
                            }
                            _ => {
                                pending.insert(name.clone(), now);
                            }
                        }
                    }
                }
            })
            .expect("spawn model watcher")
    }
}
