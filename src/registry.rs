//! The live model set and its hot swap.
//!
//! Owns: which `Models` snapshot new frames get, reloading one model beside
//! the old one (load + warm-up, then an atomic swap of the snapshot), adding
//! and removing models as config files come and go in the config directory,
//! keeping the MQTT subscriptions in step, the record of failed reloads, and
//! the file watcher that triggers all of this.
//! Frames hold the snapshot they were routed with, so in-flight frames
//! finish on the model they started with; unchanged models are shared
//! between snapshots (`Arc<Model>`), so a swap copies no model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::BackendEnv;
use crate::config::model;
use crate::config::Settings;
use crate::filewatch::{stamp, Stamp};
use crate::frame::Limits;
use crate::models::{Models, Problem, MAX_MODELS};

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
    /// Told the current problems after every reload, addition or removal.
    on_change: std::sync::OnceLock<Box<dyn Fn(Vec<Problem>) + Send + Sync>>,
    /// Told the input topics of every model set swapped in (the broker subscriptions follow).
    on_topics: std::sync::OnceLock<Box<dyn Fn(Vec<String>) + Send + Sync>>,
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
            on_change: std::sync::OnceLock::new(),
            on_topics: std::sync::OnceLock::new(),
        }
    }

    /// Sets what to call with the problems after every change (once).
    pub fn on_change(&self, f: impl Fn(Vec<Problem>) + Send + Sync + 'static) {
        let _ = self.on_change.set(Box::new(f));
    }

    /// Sets what to call with the input topics of every model set swapped in (once).
    pub fn on_topics(&self, f: impl Fn(Vec<String>) + Send + Sync + 'static) {
        let _ = self.on_topics.set(Box::new(f));
    }

    /// Reloads done and refused so far.
    pub fn reload_counts(&self) -> crate::metrics::Reloads {
        crate::metrics::Reloads {
            done: self.reloads.load(Relaxed),
            refused: self.reload_failures.load(Relaxed),
        }
    }

    /// Models that failed to load, and reloads that failed (their old version serving).
    pub fn problems(&self) -> Vec<Problem> {
        let mut p: Vec<_> = self
            .snapshot()
            .failed
            .iter()
            .map(|f| Problem {
                model: f.model.clone(),
                error: f.to_string(),
            })
            .collect();
        let errors = self.reload_errors.lock().unwrap_or_else(|e| e.into_inner());
        let mut reloads: Vec<_> = errors
            .iter()
            .map(|(m, e)| Problem {
                model: m.clone(),
                error: e.clone(),
            })
            .collect();
        reloads.sort();
        p.extend(reloads);
        p
    }

    fn changed(&self) {
        if let Some(f) = self.on_change.get() {
            f(self.problems());
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
        match &outcome {
            Ok(()) => log::info!(model = name; "model `{name}` reloaded"),
            Err(e) => {
                log::error!(model = name; "model `{name}`: reload failed, the previous version keeps serving: {e}")
            }
        }
        self.record(name, outcome.as_ref().err().cloned());
        outcome
    }

    /// Counts a reload or addition, keeps (or clears) its error under `key`
    /// (a model name, or a config file not added), and tells `on_change`.
    fn record(&self, key: &str, error: Option<String>) {
        let mut errors = self.reload_errors.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            None => {
                self.reloads.fetch_add(1, Relaxed);
                errors.remove(key);
            }
            Some(e) => {
                self.reload_failures.fetch_add(1, Relaxed);
                errors.insert(key.to_owned(), e);
            }
        }
        drop(errors);
        self.changed();
    }

    /// Checks that a (new or changed) config fits the slots allocated at start-up.
    fn fits(&self, config: &model::ModelConfig) -> Result<(), String> {
        let p = &config.preprocessing;
        // Sensor inputs are bounded by the schema and always fit (`frame::Limits`).
        let needs_tensor = !matches!(
            config.model_type,
            model::ModelType::CameraHealth | model::ModelType::SensorAnomaly
        );
        if needs_tensor && !self.limits.fits(p) {
            return Err(format!(
                "the input size {}x{} needs bigger frame slots than this process allocated; restart to apply it",
                p.width, p.height
            ));
        }
        Ok(())
    }

    /// Makes `next` the live set and brings the broker subscriptions in step with it.
    fn swap(&self, next: Models) {
        let subs = next.subscriptions();
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        if let Some(f) = self.on_topics.get() {
            f(subs);
        }
    }

    /// Loads the model config at `path` (a file new to the config directory,
    /// or one that failed before) beside the others and adds it.
    pub fn add(&self, path: &Path) -> Result<String, String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = self.try_add(path);
        match &outcome {
            Ok(name) => log::info!(model = name.as_str(); "model `{name}` added from {}", path.display()),
            Err(e) => log::error!("{}: not added: {e}", path.display()),
        }
        let error = outcome.as_ref().err().map(|e| format!("not added: {e}"));
        self.record(&path.display().to_string(), error);
        outcome
    }

    fn try_add(&self, path: &Path) -> Result<String, String> {
        let old = self.snapshot();
        let config = model::load_file(path, &self.settings).map_err(|e| e.to_string())?;
        let name = config.name.clone();
        if let Some(other) = old.list.iter().find(|m| m.config.name == name) {
            let from = other.config.source.as_deref().map(|p| p.display().to_string());
            return Err(format!(
                "model name `{name}` is already used by {}",
                from.unwrap_or_else(|| "the built-in model".into())
            ));
        }
        if old.list.len() >= MAX_MODELS {
            return Err(format!("at most {MAX_MODELS} models"));
        }
        self.fits(&config)?;
        let mut fresh = Models::load(vec![config], &self.env);
        if let Some(f) = fresh.failed.pop() {
            return Err(f.error.to_string());
        }
        // It may have failed at start-up; now it serves.
        let src = path.display().to_string();
        let failed: Vec<_> = old.failed.iter().filter(|f| f.source != src).cloned().collect();
        let mut list = old.list.clone();
        list.extend(fresh.list.pop());
        self.swap(Models { list, failed });
        Ok(name)
    }

    /// Forgets the error of a config file that is gone.
    fn forget(&self, path: &Path) {
        let removed = self
            .reload_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&path.display().to_string());
        if removed.is_some() {
            self.changed();
        }
    }

    /// Removes model `name` (its config file left the directory). Frames
    /// already routed to it finish on it. The last model is kept.
    pub fn remove(&self, name: &str) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let i = old.find(name).ok_or_else(|| format!("no model named `{name}`"))?;
        if old.list.len() == 1 {
            let e = format!("model `{name}`: its config file is gone, but it is the last model; it keeps serving");
            log::error!("{e}");
            return Err(e);
        }
        let mut list = old.list.clone();
        list.remove(i);
        self.swap(Models {
            list,
            failed: old.failed.clone(),
        });
        self.reload_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        log::info!(model = name; "model `{name}` removed: its config file is gone");
        self.changed();
        Ok(())
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
        self.fits(&config)?;
        let mut fresh = Models::load(vec![config], &self.env);
        if let Some(f) = fresh.failed.pop() {
            return Err(f.error.to_string());
        }
        let mut model = fresh.list.pop().ok_or("the model did not load")?;
        // Open alerts and their hysteresis, and track ids, carry over to the new version.
        if let Some(m) = Arc::get_mut(&mut model) {
            m.alerts = old.list[i].alerts.clone();
            m.tracks = old.list[i].tracks.clone();
        }
        let mut list = old.list.clone();
        list[i] = model;
        self.swap(Models {
            list,
            failed: old.failed.clone(),
        });
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
    /// `period`; a file whose stamp (`filewatch.rs`) changed and then held still
    /// for one period (so half-written files are skipped) triggers a reload.
    pub fn watch(self: &Arc<Self>, period: Duration) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("model-watch".into())
            .spawn(move || {
                let mut seen: HashMap<String, Vec<Option<Stamp>>> = HashMap::new();
                let mut pending: HashMap<String, Vec<Option<Stamp>>> = HashMap::new();
                let dir = me.settings.model_config_path.clone().filter(|p| p.is_dir());
                let mut scan = dir.as_deref().map(DirScan::new);
                loop {
                    std::thread::sleep(period);
                    if let (Some(scan), Some(dir)) = (scan.as_mut(), dir.as_deref()) {
                        scan.step(&me, dir);
                    }
                    for m in me.snapshot().list.iter() {
                        let name = &m.config.name;
                        let files: Vec<PathBuf> = [m.config.source.clone(), m.config.model_path.clone()]
                            .into_iter()
                            .flatten()
                            .filter(|p| p.is_absolute() || p.exists())
                            .collect();
                        // A vanished config is the directory scan's to remove, not a reload.
                        if files.is_empty() || m.config.source.as_deref().is_some_and(|s| !s.exists()) {
                            continue;
                        }
                        let now: Vec<Option<Stamp>> = files.iter().map(|f| stamp(f)).collect();
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

/// Config files coming and going in the config directory. A file is acted
/// on once it has looked the same for two checks in a row (so a file being
/// written is not read half-way, and a file being replaced is not removed).
struct DirScan {
    /// Config files and their modification times at the previous check.
    last: HashMap<PathBuf, Option<Stamp>>,
    /// What was last tried for a file not serving (so a broken file is retried only once it changes).
    tried: HashMap<PathBuf, Option<Stamp>>,
}

impl DirScan {
    fn new(dir: &Path) -> DirScan {
        let now = list_configs(dir);
        // Files present at start-up were loaded (or failed) then; only changes count.
        DirScan {
            tried: now.clone(),
            last: now,
        }
    }

    fn step(&mut self, reg: &Registry, dir: &Path) {
        let now = list_configs(dir);
        let models = reg.snapshot();
        for (path, mtime) in &now {
            let serving = models.list.iter().any(|m| m.config.source.as_deref() == Some(path));
            let stable = self.last.get(path) == Some(mtime);
            if !serving && stable && self.tried.get(path) != Some(mtime) {
                self.tried.insert(path.clone(), *mtime);
                let _ = reg.add(path);
            }
        }
        for m in &models.list {
            let Some(src) = m.config.source.as_deref() else {
                continue;
            };
            let gone_twice = src.parent() == Some(dir) && !now.contains_key(src) && !self.last.contains_key(src);
            if gone_twice {
                let _ = reg.remove(&m.config.name);
            }
        }
        for gone in self.last.keys().filter(|p| !now.contains_key(*p)) {
            reg.forget(gone);
        }
        self.tried.retain(|p, _| now.contains_key(p));
        self.last = now;
    }
}

fn list_configs(dir: &Path) -> HashMap<PathBuf, Option<Stamp>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .map(|p| {
                    let t = stamp(&p);
                    (p, t)
                })
                .collect()
        })
        .unwrap_or_default()
}
