//! Wiring: settings -> models -> pipeline, MQTT and HTTP threads; and the
//! command-line jobs (`infer`, `check-config`, `bench`).
//!
//! Owns: start-up order and start-up errors, every channel between threads,
//! the signal and watchdog threads. The other modules start their own
//! threads when this calls them (ARCHITECTURE.md lists which).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::BackendEnv;
use crate::config::{model, Settings};
use crate::frame::{Limits, Ring, Slot};
use crate::metrics::Metrics;
use crate::models::Models;
use crate::pipeline::{self, Shared};
use crate::process::{Ctx, Emitted};
use crate::registry::Registry;
use crate::topic::TopicTemplate;
use crate::{build_info, http, mqtt};

/// Loads and validates the model configs, then the models. A model that
/// fails to load is logged and left out; when none loads, that is an error.
pub fn load_models(settings: &Settings) -> Result<Models, String> {
    let configs = model::load(settings.model_config_path.as_deref(), settings).map_err(|e| e.to_string())?;
    crate::backend::set_cpu(settings.candle_threads, &settings.candle_isa);
    let env = BackendEnv {
        ort_library: settings.ort_library.clone(),
    };
    let models = Models::load(configs, &env);
    for f in &models.failed {
        log::error!("{f}; the other models keep serving");
    }
    if models.list.is_empty() {
        let why: Vec<String> = models.failed.iter().map(|f| f.to_string()).collect();
        return Err(format!("no model could be loaded: {}", why.join("; ")));
    }
    Ok(models)
}

fn render_service_topic(t: &str, client_id: &str) -> Result<String, String> {
    Ok(TopicTemplate::parse(t).map_err(|e| e.0)?.render_client(client_id))
}

/// Runs the service until its threads end (they run until the process is stopped).
pub fn run(settings: Settings) -> Result<(), String> {
    log::info!("{}", build_info::line());
    let models = load_models(&settings)?;
    crate::memory::return_free_memory();
    for m in &models.list {
        log::info!(
            model = m.config.name.as_str(), backend = m.backend_name();
            "model `{}`: {} on {}, inputs {:?} -> {}",
            m.config.name,
            m.config.model_type.as_str(),
            m.backend_name(),
            m.config
                .input_topics
                .iter()
                .map(|f| f.subscription())
                .collect::<Vec<_>>(),
            m.config.output_topic.as_str()
        );
    }
    let metrics = Arc::new(Metrics::default());
    let _ = metrics.started.set(std::time::Instant::now());
    let limits = Limits::for_models(
        &models,
        settings.max_payload_bytes,
        settings.max_image_width,
        settings.max_image_height,
    );
    let mut status_topics = vec![render_service_topic(&settings.status_topic, &settings.client_id)?];
    if let Some(site) = &settings.site {
        status_topics.push(site.topic("ai/status"));
    }
    let error_topic = render_service_topic(&settings.error_topic, &settings.client_id)?;
    let subscriptions = mqtt::Subscriptions::new(models.subscriptions());
    let model_count = models.list.len();
    let mqtt_on = settings.broker.is_some();
    let registry = Arc::new(Registry::new(models, settings.clone(), limits));
    if mqtt_on {
        // The broker subscriptions follow the models' input topics.
        let subscriptions = subscriptions.clone();
        registry.on_topics(move |topics| subscriptions.set(topics));
    }
    if settings.model_watch_s > 0 {
        registry.watch(Duration::from_secs(settings.model_watch_s));
    }
    let stop = signals(registry.clone())?;

    // Room for every QoS 1 delivery the broker may have out to us (Receive Maximum) and for
    // the HTTP callers, so the MQTT thread never blocks on it with QoS 1 traffic.
    let receive_maximum = mqtt::receive_maximum(settings.queue_depth);
    let (in_tx, in_rx) = async_channel::bounded(receive_maximum as usize + 16);
    let (out_tx, out_rx) = async_channel::bounded(settings.queue_depth * 4 + 16);
    let shared = Arc::new(Shared {
        registry: registry.clone(),
        metrics: metrics.clone(),
        ring: Ring::new(settings.queue_depth, &limits, metrics.clone()),
        limits,
        error_topic,
        max_fps_per_source: settings.max_fps_per_source,
        outbound: mqtt_on.then_some(out_tx.clone()),
        dedup: crate::dedup::Window::new(settings.dedup_window).map(std::sync::Mutex::new),
        policy: pipeline::Policy {
            supersede: settings.drop_superseded,
            max_age: (settings.max_frame_age_s > 0.0).then(|| Duration::from_secs_f64(settings.max_frame_age_s)),
        },
    });
    let mut threads = Vec::new();
    if settings.http_addr.is_some() || settings.http_admin_addr.is_some() {
        let token = settings
            .http_token_file
            .as_deref()
            .map(http::TokenFile::open)
            .transpose()?;
        let state = Arc::new(http::HttpState {
            registry: registry.clone(),
            token,
            metrics: metrics.clone(),
            incoming: in_tx.clone(),
            mqtt_enabled: mqtt_on,
            max_body: settings.max_payload_bytes,
        });
        let (read, admin) = (&settings.http_addr, &settings.http_admin_addr);
        let listeners = match (read, admin) {
            // Port 0 twice asks for two ports, not one shared listener.
            (Some(r), Some(a)) if r == a && !r.ends_with(":0") => vec![(r, http::Role::Both)],
            _ => read
                .iter()
                .map(|r| (r, http::Role::ReadOnly))
                .chain(admin.iter().map(|a| (a, http::Role::Admin)))
                .collect(),
        };
        for (addr, role) in listeners {
            let (bound, handles) = http::start(addr, role, state.clone())?;
            match role {
                http::Role::ReadOnly => {
                    log::info!("HTTP listening on http://{bound} (GET /healthz /readyz /metrics /models)")
                }
                http::Role::Admin => log::info!(
                    "HTTP admin listening on http://{bound} (POST /infer, POST /models/{{name}}/reload{})",
                    if settings.http_token_file.is_some() {
                        ", bearer token required"
                    } else {
                        ""
                    }
                ),
                http::Role::Both => {
                    log::info!(
                        "HTTP listening on http://{bound} (all endpoints; HTTP admin listening on http://{bound})"
                    )
                }
            }
            threads.extend(handles);
        }
    }
    let pipeline_threads = Arc::new(pipeline::start(shared, in_rx, settings.workers));
    let mut mqtt_threads = Vec::new();
    if let Some((host, port)) = settings.broker.clone() {
        let cfg = mqtt::MqttConfig {
            settings: settings.clone(),
            host,
            port,
            subscriptions,
            status_topics,
            metrics_snapshot: (settings.metrics_interval_s > 0).then(|| {
                let (metrics, registry, client_id) =
                    (metrics.clone(), Arc::downgrade(&registry), settings.client_id.clone());
                mqtt::MetricsSnapshot {
                    topic: settings.metrics_topic.clone(),
                    every: Duration::from_secs(settings.metrics_interval_s),
                    write: Arc::new(move |buf: &mut Vec<u8>| {
                        let (models, reloads) = match registry.upgrade() {
                            Some(r) => (r.snapshot().summary(), r.reload_counts()),
                            None => (Vec::new(), Default::default()),
                        };
                        let s = crate::metrics::Snapshot {
                            client_id: &client_id,
                            models: &models,
                            reloads,
                        };
                        metrics.snapshot_json(buf, std::time::SystemTime::now(), &s);
                    }),
                }
            }),
            receive_maximum,
            status_dirty: Default::default(),
            problems: {
                let reg = Arc::downgrade(&registry);
                Arc::new(move || reg.upgrade().map(|r| r.problems()).unwrap_or_default())
            },
        };
        {
            let (out, dirty) = (out_tx.clone(), cfg.status_dirty.clone());
            registry.on_change(move |_| {
                // A full queue must not lose the change: the publisher picks the flag up.
                if out.try_send(crate::messages::ToMqtt::StatusChanged).is_err() {
                    dirty.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        mqtt_threads = mqtt::start(cfg, metrics, in_tx.clone(), out_rx, out_tx.clone())?;
    } else {
        log::info!("AIO_BROKER_HOSTNAME is empty: MQTT is off");
    }
    log::info!(
        "ready: {} model(s), {} frame slots, {} workers",
        model_count,
        settings.queue_depth,
        settings.workers
    );
    let notifier = Arc::new(crate::notify::Notifier::from_env());
    notifier.send("READY=1");
    if let Some(every) = crate::notify::Notifier::watchdog_interval() {
        watchdog(notifier.clone(), every, pipeline_threads.clone());
    }

    let signal = stop.recv().map_err(|_| "the signal thread ended")?;
    log::info!("{signal}: stopping; no new frames, finishing those in flight");
    notifier.send("STOPPING=1");
    STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(settings.shutdown_timeout_s);
    // New MQTT deliveries stay unacknowledged (the broker redelivers them); /infer answers 503.
    in_tx.close();
    if !wait_all(&pipeline_threads, deadline) {
        log::warn!(
            "SHUTDOWN_TIMEOUT_S ({} s) passed with frames still in flight; they stay unacknowledged and will be redelivered",
            settings.shutdown_timeout_s
        );
    }
    if !mqtt_threads.is_empty() {
        let _ = out_tx.send_blocking(crate::messages::ToMqtt::Shutdown);
        if !wait_all(&mqtt_threads, Instant::now() + Duration::from_secs(5)) {
            log::warn!("the MQTT client did not finish within 5 s");
        }
    }
    log::info!("stopped");
    Ok(())
}

/// Set once a stop signal arrived.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Waits until every thread has finished or `deadline` passes; true when all finished.
fn wait_all(threads: &[std::thread::JoinHandle<()>], deadline: Instant) -> bool {
    while threads.iter().any(|t| !t.is_finished()) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// One signal thread: SIGHUP reloads every model that has files (the usual
/// daemon convention); SIGTERM and SIGINT are passed on by name, to stop.
fn signals(registry: Arc<Registry>) -> Result<std::sync::mpsc::Receiver<&'static str>, String> {
    use async_signal::Signal;
    use smol::stream::StreamExt as _;
    let mut signals = async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup])
        .map_err(|e| format!("cannot watch SIGTERM, SIGINT and SIGHUP: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            smol::block_on(async {
                while let Some(Ok(s)) = signals.next().await {
                    match s {
                        Signal::Hup => {
                            log::info!("SIGHUP: reloading every model from its files");
                            registry.reload_all();
                        }
                        Signal::Int => {
                            let _ = tx.send("SIGINT");
                        }
                        _ => {
                            let _ = tx.send("SIGTERM");
                        }
                    }
                }
            })
        })
        .map_err(|e| e.to_string())?;
    Ok(rx)
}

/// Pings systemd's watchdog every `every` while all of the pipeline's
/// threads run; once one has ended (a panic), the pings stop and systemd
/// restarts the service.
fn watchdog(notifier: Arc<crate::notify::Notifier>, every: Duration, pipeline: Arc<Vec<std::thread::JoinHandle<()>>>) {
    let _ = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        while pipeline.iter().all(|t| !t.is_finished()) {
            notifier.send("WATCHDOG=1");
            std::thread::sleep(every);
        }
        if !STOPPING.load(std::sync::atomic::Ordering::Relaxed) {
            log::error!("a pipeline thread ended; no more watchdog pings");
        }
    });
}

/// `infer FILE... [--annotate OUT]`: one JSON line per file on stdout, and with `annotate`
/// each file's annotated picture (a path for one file; for several, a directory that gets
/// `NAME.annotated.jpg` for each). Returns whether every file got a result.
pub fn infer_files(
    settings: &Settings,
    model: Option<&str>,
    files: &[String],
    annotate: Option<&str>,
) -> Result<bool, String> {
    let picture_path = |f: &str| -> Result<std::path::PathBuf, String> {
        let out = std::path::Path::new(annotate.unwrap_or_default());
        if files.len() == 1 && !out.is_dir() {
            return Ok(out.to_path_buf());
        }
        if !out.is_dir() {
            return Err(format!(
                "--annotate {}: with several files, name an existing directory",
                out.display()
            ));
        }
        let stem = std::path::Path::new(f)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "picture".into());
        Ok(out.join(format!("{stem}.annotated.jpg")))
    };
    if annotate.is_some() {
        picture_path(&files[0])?;
    }
    let models = load_models(settings)?;
    let idx = match model {
        Some(name) => models.find(name).ok_or_else(|| format!("no model named `{name}`"))?,
        None => 0,
    };
    let config = &models.list[idx].config;
    if annotate.is_some() && !config.model_type.draws() {
        return Err(format!(
            "--annotate is for classification and detection models; `{}` is {}",
            config.name,
            config.model_type.as_str()
        ));
    }
    let metrics = Metrics::default();
    let limits = Limits::for_models(
        &models,
        settings.max_payload_bytes,
        settings.max_image_width,
        settings.max_image_height,
    );
    let mut slot = Slot::new(&limits);
    let ctx = Ctx {
        models: &models,
        metrics: &metrics,
        max_width: limits.max_width,
        max_height: limits.max_height,
        error_topic: "",
    };
    let mut all_ok = true;
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| format!("cannot read {f}: {e}"))?;
        let answers =
            pipeline::run_oneshot_annotated(&mut slot, &ctx, limits.max_payload, idx, f, &bytes, annotate.is_some());
        for (body, kind) in answers {
            match kind {
                Emitted::Picture => {
                    let path = picture_path(f)?;
                    std::fs::write(&path, &body).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    eprintln!("{f}: annotated picture in {}", path.display());
                }
                Emitted::AlertPicture => {}
                _ => {
                    all_ok &= !matches!(kind, Emitted::Error(_));
                    println!("{}", String::from_utf8_lossy(&body));
                }
            }
        }
    }
    Ok(all_ok)
}

/// `check-config [PATH]`: the effective configuration, or the first error.
pub fn check_config(settings: &Settings, path: Option<&str>) -> Result<String, String> {
    let path = path
        .map(std::path::PathBuf::from)
        .or_else(|| settings.model_config_path.clone());
    let configs = model::load(path.as_deref(), settings).map_err(|e| e.to_string())?;
    let mut out = String::new();
    for (i, c) in configs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&model::describe(c));
    }
    Ok(out)
}

/// `tensor FILE --out PATH`: the model input the service would feed for
/// `FILE` (decode + preprocessing of the named or first model), as raw
/// little-endian f32 in the config's layout. For checking a model against
/// another runtime on the very same tensor.
pub fn dump_tensor(settings: &Settings, model: Option<&str>, file: &str, out: &str) -> Result<String, String> {
    let configs = model::load(settings.model_config_path.as_deref(), settings).map_err(|e| e.to_string())?;
    let config = match model {
        Some(name) => configs
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("no model named `{name}`"))?,
        None => &configs[0],
    };
    let p = &config.preprocessing;
    let jpeg = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let (_, tensor) =
        crate::preprocess::tensor_for_image(&jpeg, p, settings.max_image_width, settings.max_image_height)?;
    let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes).map_err(|e| format!("cannot write {out}: {e}"))?;
    let shape = match p.layout {
        model::Layout::Nchw => [1, 3, p.height, p.width],
        model::Layout::Nhwc => [1, p.height, p.width, 3],
    };
    Ok(format!("{out}: model `{}`, f32 {shape:?}\n", config.name))
}
