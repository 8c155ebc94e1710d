//! Service settings: environment variables overridden by command-line flags,
//! all described by one table that also writes `--help`.
//!
//! Owns: the option table, parsing and validating service-wide settings.
//! Model configs (YAML) live in `model/` beside this file.

pub mod model;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

pub use model::{BackendKind, ModelConfig, ModelType};

/// One setting: its environment variable, its flag, its default and its help.
pub struct Opt {
    pub env: &'static str,
    pub flag: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every service setting. `--help` and the README's table are written from this.
pub const OPTIONS: &[Opt] = &[
    Opt { env: "MODEL_CONFIG_PATH", flag: "--model-config", default: "", help: "Model config YAML file, or a directory of them. Empty: the built-in default on MQTT_INPUT_TOPICS (the embedded EfficientNet-Lite0 on Candle in builds with Candle, camera health in the minimal build)." },
    Opt { env: "MODEL_WATCH_S", flag: "--model-watch", default: "2", help: "Seconds between checks of model config and model files for changes (reloaded without restart). 0: no watching." },
    Opt { env: "DEFAULT_BACKEND", flag: "--backend", default: "candle", help: "Backend for model configs that name none: candle | onnx | dual." },
    Opt { env: "ENABLE_DUAL_BACKEND", flag: "--dual", default: "false", help: "Run every ML model on both backends and publish comparisons (true | false)." },
    Opt { env: "GPU_ENABLED", flag: "--gpu", default: "false", help: "Allow backends to use a GPU when the model config allows it (true | false)." },
    Opt { env: "GPU_DEVICE", flag: "--gpu-device", default: "0", help: "CUDA device ordinal for models whose config names no `inference.gpu_device`." },
    Opt { env: "GPU_POLICY", flag: "--gpu-policy", default: "fallback", help: "When a GPU is asked for and cannot be used (no driver or device, library or provider missing, build without `cuda`): fallback (run on the CPU, warn, and show `gpu_fallback` with the reason in metrics, /readyz, /models and every result) or require (refuse to load the model)." },
    Opt { env: "AIO_BROKER_HOSTNAME", flag: "--broker-host", default: "localhost", help: "MQTT broker host. Empty: no MQTT (HTTP /infer only)." },
    Opt { env: "AIO_BROKER_TCP_PORT", flag: "--broker-port", default: "1883", help: "MQTT broker TCP port." },
    Opt { env: "AIO_MQTT_CLIENT_ID", flag: "--client-id", default: "ai-edge-inference", help: "MQTT client id; also fills {client_id} in the status and error topics." },
    Opt { env: "AIO_MQTT_CLEAN_START", flag: "--clean-start", default: "false", help: "Start a fresh MQTT session (true) or resume the broker-kept one, with the frames it queued while we were away (false)." },
    Opt { env: "AIO_MQTT_SESSION_EXPIRY", flag: "--session-expiry", default: "3600", help: "Seconds the broker keeps our MQTT session (and queues QoS 1 frames) after a disconnect." },
    Opt { env: "AIO_MQTT_USE_TLS", flag: "--tls", default: "false", help: "Connect to the broker over TLS (rustls) (true | false)." },
    Opt { env: "AIO_TLS_CA_FILE", flag: "--tls-ca-file", default: "", help: "PEM file of the CA certificates the broker's certificate must chain to; required with TLS. Re-read on each connect once it changes." },
    Opt { env: "MQTT_TLS_CERT_FILE", flag: "--tls-cert-file", default: "", help: "PEM client certificate (chain) for brokers that require one; needs MQTT_TLS_KEY_FILE." },
    Opt { env: "MQTT_TLS_KEY_FILE", flag: "--tls-key-file", default: "", help: "PEM private key of MQTT_TLS_CERT_FILE." },
    Opt { env: "MQTT_TLS_SERVER_NAME", flag: "--tls-server-name", default: "", help: "Name the broker's certificate must carry. Empty: AIO_BROKER_HOSTNAME." },
    Opt { env: "MQTT_AUTH", flag: "--mqtt-auth", default: "auto", help: "Broker authentication: none | password | k8s-sat | auto (k8s-sat when AIO_SAT_FILE exists, else password when MQTT_USERNAME is set, else none)." },
    Opt { env: "MQTT_USERNAME", flag: "--mqtt-username", default: "", help: "MQTT user name (password authentication)." },
    Opt { env: "MQTT_PASSWORD_FILE", flag: "--mqtt-password-file", default: "", help: "File holding the MQTT password (re-read on each connect)." },
    Opt { env: "AIO_SAT_FILE", flag: "--sat-file", default: "/var/run/secrets/tokens/broker-sat", help: "Kubernetes service-account token for the AIO broker's K8S-SAT authentication. Re-read when it changes or nears expiry; the service then reconnects with it." },
    Opt { env: "MQTT_KEEP_ALIVE_S", flag: "--keep-alive", default: "30", help: "MQTT keep-alive interval in seconds (5..=3600)." },
    Opt { env: "MQTT_OFFLINE_QUEUE", flag: "--offline-queue", default: "1000", help: "Results kept while the broker is unreachable, published after reconnect; beyond it the oldest are dropped and counted." },
    Opt { env: "MQTT_DEDUP_WINDOW", flag: "--dedup-window", default: "1024", help: "Recent QoS 1 messages remembered so a redelivered frame is answered once (0: off)." },
    Opt { env: "MQTT_INPUT_TOPICS", flag: "--input-topics", default: "edge-ai/+/+/+/camera/snapshots", help: "Comma-separated input filters for models whose config has none. `+` levels may be named `{name}`." },
    Opt { env: "MQTT_OUTPUT_TOPIC_TEMPLATE", flag: "--output-topic", default: "edge-ai/{business_unit}/{facility}/{gateway_id}/ai/inference/vision", help: "Result topic template for models whose config has none." },
    Opt { env: "MQTT_COMPARISON_TOPIC_TEMPLATE", flag: "--comparison-topic", default: "edge-ai/{business_unit}/{facility}/{gateway_id}/ai/comparison", help: "Dual-backend comparison topic template for models whose config has none." },
    Opt { env: "MQTT_STATUS_TOPIC", flag: "--status-topic", default: "edge-ai/services/{client_id}/ai/status", help: "Retained service status topic: `online` on connect, `offline` as last will." },
    Opt { env: "SITE", flag: "--site", default: "", help: "This gateway's place in the topic tree, `business_unit/facility/gateway_id`. Set: the status also goes to `edge-ai/{business_unit}/{facility}/{gateway_id}/ai/status`, and the metrics snapshots to that gateway's `ai/metrics`. Empty: neither." },
    Opt { env: "MQTT_METRICS_TOPIC", flag: "--metrics-topic", default: "", help: "Topic of the periodic metrics snapshot ({client_id}, {business_unit}, {facility}, {gateway_id}). Empty: `edge-ai/{business_unit}/{facility}/{gateway_id}/ai/metrics` with SITE set, else `edge-ai/services/{client_id}/ai/metrics`." },
    Opt { env: "METRICS_INTERVAL_S", flag: "--metrics-interval", default: "60", help: "Seconds between metrics snapshots published to MQTT_METRICS_TOPIC (the numbers /metrics shows). 0: off." },
    Opt { env: "MQTT_ERROR_TOPIC", flag: "--error-topic", default: "edge-ai/services/{client_id}/ai/errors", help: "Topic for error results (bad payloads, corrupt JPEGs, dropped frames)." },
    Opt { env: "HTTP_ADDR", flag: "--http-addr", default: "0.0.0.0:8080", help: "Listen address for the read-only endpoints: /healthz, /readyz, /metrics, /models. Empty: off." },
    Opt { env: "HTTP_ADMIN_ADDR", flag: "--http-admin-addr", default: "127.0.0.1:8081", help: "Listen address for the mutating endpoints: POST /infer and POST /models/{name}/reload. The same as HTTP_ADDR: one listener for all. Empty: off." },
    Opt { env: "HTTP_TOKEN_FILE", flag: "--http-token-file", default: "", help: "File holding a bearer token that the mutating endpoints require (re-read when it changes). Empty: they are open to whoever reaches HTTP_ADMIN_ADDR." },
    Opt { env: "QUEUE_DEPTH", flag: "--queue-depth", default: "4", help: "Frame slots (preallocated buffers) in the ring (1..=256)." },
    Opt { env: "MAX_FPS_PER_SOURCE", flag: "--max-fps", default: "0", help: "Most frames per second taken from one camera; the rest get a `dropped: rate_limited` answer. 0: no limit." },
    Opt { env: "DROP_SUPERSEDED", flag: "--drop-superseded", default: "true", help: "Live monitoring: a newer frame from a camera replaces its frame still waiting for a worker (answered `dropped: superseded`). false: every frame is inferred, in order." },
    Opt { env: "MAX_FRAME_AGE_S", flag: "--max-frame-age", default: "0", help: "Seconds after which a frame not yet inferred is answered `dropped: stale` instead, judged from the envelope's `timestamp` when it has one, else from its arrival. 0: no limit." },
    Opt { env: "WORKERS", flag: "--workers", default: "0", help: "Worker tasks decoding and inferring in parallel; 0: one per CPU core." },
    Opt { env: "MAX_PAYLOAD_BYTES", flag: "--max-payload", default: "4194304", help: "Largest accepted MQTT payload or /infer body in bytes." },
    Opt { env: "MAX_IMAGE_WIDTH", flag: "--max-width", default: "2560", help: "Widest accepted image in pixels (sizes the frame slots)." },
    Opt { env: "MAX_IMAGE_HEIGHT", flag: "--max-height", default: "1440", help: "Tallest accepted image in pixels (sizes the frame slots)." },
    Opt { env: "CANDLE_THREADS", flag: "--candle-threads", default: "0", help: "CPU threads of the Candle backend, process-wide (0: one per CPU)." },
    Opt { env: "CANDLE_ISA", flag: "--candle-isa", default: "auto", help: "Instruction set of the Candle kernels: auto (the best this CPU has), v4 (AVX-512), v3 (AVX2+FMA) or base. A cap: asking for more than the CPU has gives what it has." },
    Opt { env: "ORT_DYLIB_PATH", flag: "--ort-library", default: "", help: "ONNX Runtime shared library (libonnxruntime.so.1.x) for the onnx backend. Empty: look beside the binary." },
    Opt { env: "SHUTDOWN_TIMEOUT_S", flag: "--shutdown-timeout", default: "10", help: "On SIGTERM/SIGINT: seconds to finish the frames in flight and flush their results before exiting anyway (unanswered frames stay unacknowledged and are redelivered)." },
    Opt { env: "RUST_LOG", flag: "--log", default: "info", help: "Log filter (env_logger syntax), e.g. `info` or `ai_edge_inference=debug`." },
    Opt { env: "LOG_FORMAT", flag: "--log-format", default: "text", help: "Log lines as text (fields as key=value) or json (one object a line: timestamp, level, target, message and the line's fields, e.g. model, device, topic, reason)." },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(pub String);

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validated service settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub model_config_path: Option<PathBuf>,
    /// Seconds between model file checks; 0: off.
    pub model_watch_s: u64,
    pub default_backend: BackendKind,
    pub enable_dual: bool,
    pub gpu_enabled: bool,
    pub gpu_device: u32,
    pub gpu_policy: model::GpuPolicy,
    /// `None`: MQTT is off.
    pub broker: Option<(String, u16)>,
    pub client_id: String,
    pub keep_alive_s: u64,
    pub clean_start: bool,
    pub session_expiry_s: u32,
    /// TLS to the broker; `None`: plain TCP.
    pub tls: Option<TlsSettings>,
    pub auth: AuthSettings,
    pub offline_queue: usize,
    pub dedup_window: usize,
    pub input_topics: Vec<String>,
    pub output_topic_template: String,
    pub comparison_topic_template: String,
    pub status_topic: String,
    pub error_topic: String,
    /// This gateway's business unit, facility and gateway id (`SITE`), when set.
    pub site: Option<Site>,
    /// The metrics snapshot topic, rendered (`MQTT_METRICS_TOPIC`).
    pub metrics_topic: String,
    /// Seconds between metrics snapshots; 0: off.
    pub metrics_interval_s: u64,
    /// `None`: HTTP is off.
    pub http_addr: Option<String>,
    /// Where the mutating endpoints listen; `None`: off.
    pub http_admin_addr: Option<String>,
    /// Bearer token file guarding the mutating endpoints.
    pub http_token_file: Option<PathBuf>,
    pub queue_depth: usize,
    /// Frames per second per source; 0: unlimited.
    pub max_fps_per_source: f64,
    pub workers: usize,
    /// A newer frame of a camera supersedes its waiting one.
    pub drop_superseded: bool,
    /// Seconds after which an uninferred frame is stale; 0: never.
    pub max_frame_age_s: f64,
    pub max_payload_bytes: usize,
    pub max_image_width: u32,
    pub max_image_height: u32,
    /// The ONNX Runtime library, when set.
    pub ort_library: Option<PathBuf>,
    /// Candle's CPU threads; 0: one per CPU.
    pub candle_threads: usize,
    /// The Candle kernels' instruction set cap: "auto", "v4", "v3" or "base".
    pub candle_isa: String,
    /// Seconds a graceful stop may take.
    pub shutdown_timeout_s: u64,
    pub log: String,
    pub log_format: LogFormat,
}

/// A gateway's place in the design's topic tree: `edge-ai/{business_unit}/{facility}/{gateway_id}/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub business_unit: String,
    pub facility: String,
    pub gateway_id: String,
}

impl Site {
    /// `business_unit/facility/gateway_id`, each a plain topic level.
    pub fn parse(text: &str) -> Result<Site, String> {
        let levels: Vec<&str> = text.split('/').collect();
        let [business_unit, facility, gateway_id] = levels[..] else {
            return Err(format!(
                "`business_unit/facility/gateway_id` (three levels), got {} in `{text}`",
                levels.len()
            ));
        };
        for l in [business_unit, facility, gateway_id] {
            if l.is_empty() || l.contains(['+', '#', '{', '}']) || l.chars().any(char::is_control) {
                return Err(format!("plain topic levels, got `{l}` in `{text}`"));
            }
        }
        Ok(Site {
            business_unit: business_unit.into(),
            facility: facility.into(),
            gateway_id: gateway_id.into(),
        })
    }

    /// `edge-ai/{business_unit}/{facility}/{gateway_id}/{rest}`.
    pub fn topic(&self, rest: &str) -> String {
        format!(
            "edge-ai/{}/{}/{}/{rest}",
            self.business_unit, self.facility, self.gateway_id
        )
    }
}

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// TLS to the broker (rustls).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub ca_file: PathBuf,
    /// Client certificate chain and key, for brokers that authenticate clients by certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name the broker's certificate must carry; `None`: the broker host.
    pub server_name: Option<String>,
}

/// How the service authenticates to the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthSettings {
    None,
    Password {
        username: String,
        password_file: Option<PathBuf>,
    },
    /// MQTT v5 enhanced authentication, method `K8S-SAT`, with the token in this file.
    K8sSat {
        token_file: PathBuf,
    },
}

impl Settings {
    /// Reads the environment, then applies `--flag value` / `--flag=value`
    /// pairs from `args`; returns the settings and the arguments that are not
    /// setting flags (subcommand, files).
    pub fn from_env_and_args(
        env: impl Fn(&str) -> Option<String>,
        args: &[String],
    ) -> Result<(Settings, Vec<String>), SettingsError> {
        let mut values: HashMap<&'static str, String> = HashMap::new();
        for o in OPTIONS {
            values.insert(o.env, env(o.env).unwrap_or_else(|| o.default.to_owned()));
        }
        let mut rest = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (a.as_str(), None),
            };
            if let Some(o) = OPTIONS.iter().find(|o| o.flag == flag) {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| SettingsError(format!("{flag} needs a value")))?
                    }
                };
                values.insert(o.env, v);
            } else {
                rest.push(a.clone());
            }
            i += 1;
        }
        let get = |k: &str| values[k].trim().to_owned();
        let mut s = Settings {
            model_config_path: non_empty(get("MODEL_CONFIG_PATH")).map(PathBuf::from),
            model_watch_s: parse_num("MODEL_WATCH_S", &get("MODEL_WATCH_S"), 0, 3600)?,
            default_backend: match get("DEFAULT_BACKEND").as_str() {
                "candle" => BackendKind::Candle,
                "onnx" => BackendKind::Onnx,
                "dual" => BackendKind::Dual,
                other => return Err(bad("DEFAULT_BACKEND", "candle, onnx or dual", other)),
            },
            enable_dual: parse_bool("ENABLE_DUAL_BACKEND", &get("ENABLE_DUAL_BACKEND"))?,
            gpu_enabled: parse_bool("GPU_ENABLED", &get("GPU_ENABLED"))?,
            gpu_device: parse_num("GPU_DEVICE", &get("GPU_DEVICE"), 0, 255)? as u32,
            gpu_policy: match get("GPU_POLICY").as_str() {
                "fallback" => model::GpuPolicy::Fallback,
                "require" => model::GpuPolicy::Require,
                other => return Err(bad("GPU_POLICY", "fallback or require", other)),
            },
            broker: match non_empty(get("AIO_BROKER_HOSTNAME")) {
                None => None,
                Some(h) => Some((
                    h,
                    parse_num("AIO_BROKER_TCP_PORT", &get("AIO_BROKER_TCP_PORT"), 1, 65535)? as u16,
                )),
            },
            client_id: non_empty(get("AIO_MQTT_CLIENT_ID"))
                .ok_or_else(|| bad("AIO_MQTT_CLIENT_ID", "a non-empty client id", ""))?,
            keep_alive_s: parse_num("MQTT_KEEP_ALIVE_S", &get("MQTT_KEEP_ALIVE_S"), 5, 3600)?,
            clean_start: parse_bool("AIO_MQTT_CLEAN_START", &get("AIO_MQTT_CLEAN_START"))?,
            session_expiry_s: parse_num(
                "AIO_MQTT_SESSION_EXPIRY",
                &get("AIO_MQTT_SESSION_EXPIRY"),
                0,
                u32::MAX as u64,
            )? as u32,
            tls: match parse_bool("AIO_MQTT_USE_TLS", &get("AIO_MQTT_USE_TLS"))? {
                false => None,
                true => Some(TlsSettings {
                    ca_file: non_empty(get("AIO_TLS_CA_FILE")).map(PathBuf::from).ok_or_else(|| {
                        bad(
                            "AIO_TLS_CA_FILE",
                            "a CA certificate file when AIO_MQTT_USE_TLS is true",
                            "",
                        )
                    })?,
                    client_cert: match (
                        non_empty(get("MQTT_TLS_CERT_FILE")),
                        non_empty(get("MQTT_TLS_KEY_FILE")),
                    ) {
                        (None, None) => None,
                        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                        (Some(_), None) => return Err(bad("MQTT_TLS_KEY_FILE", "the key of MQTT_TLS_CERT_FILE", "")),
                        (None, Some(_)) => {
                            return Err(bad("MQTT_TLS_CERT_FILE", "the certificate of MQTT_TLS_KEY_FILE", ""))
                        }
                    },
                    server_name: non_empty(get("MQTT_TLS_SERVER_NAME")),
                }),
            },
            auth: {
                let username = non_empty(get("MQTT_USERNAME"));
                let password_file = non_empty(get("MQTT_PASSWORD_FILE")).map(PathBuf::from);
                let sat = PathBuf::from(get("AIO_SAT_FILE"));
                let password = |username: Option<String>| match username {
                    Some(username) => Ok(AuthSettings::Password {
                        username,
                        password_file: password_file.clone(),
                    }),
                    None => Err(bad("MQTT_USERNAME", "a user name for password authentication", "")),
                };
                match get("MQTT_AUTH").as_str() {
                    "none" => AuthSettings::None,
                    "password" => password(username)?,
                    "k8s-sat" => AuthSettings::K8sSat { token_file: sat },
                    "auto" if !sat.as_os_str().is_empty() && sat.exists() => AuthSettings::K8sSat { token_file: sat },
                    "auto" if username.is_some() => password(username)?,
                    "auto" => AuthSettings::None,
                    other => return Err(bad("MQTT_AUTH", "none, password, k8s-sat or auto", other)),
                }
            },
            offline_queue: parse_num("MQTT_OFFLINE_QUEUE", &get("MQTT_OFFLINE_QUEUE"), 0, 1_000_000)? as usize,
            dedup_window: parse_num("MQTT_DEDUP_WINDOW", &get("MQTT_DEDUP_WINDOW"), 0, 1_000_000)? as usize,
            input_topics: get("MQTT_INPUT_TOPICS")
                .split(',')
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect(),
            output_topic_template: get("MQTT_OUTPUT_TOPIC_TEMPLATE"),
            comparison_topic_template: get("MQTT_COMPARISON_TOPIC_TEMPLATE"),
            status_topic: get("MQTT_STATUS_TOPIC"),
            error_topic: get("MQTT_ERROR_TOPIC"),
            site: match non_empty(get("SITE")) {
                None => None,
                Some(s) => Some(Site::parse(&s).map_err(|e| SettingsError(format!("SITE: expected {e}")))?),
            },
            metrics_topic: get("MQTT_METRICS_TOPIC"),
            metrics_interval_s: parse_num("METRICS_INTERVAL_S", &get("METRICS_INTERVAL_S"), 0, 86_400)?,
            http_addr: non_empty(get("HTTP_ADDR")),
            http_admin_addr: non_empty(get("HTTP_ADMIN_ADDR")),
            http_token_file: non_empty(get("HTTP_TOKEN_FILE")).map(PathBuf::from),
            queue_depth: parse_num("QUEUE_DEPTH", &get("QUEUE_DEPTH"), 1, 256)? as usize,
            max_fps_per_source: parse_float(
                "MAX_FPS_PER_SOURCE",
                &get("MAX_FPS_PER_SOURCE"),
                1000.0,
                "frames per second",
            )?,
            workers: match parse_num("WORKERS", &get("WORKERS"), 0, 256)? as usize {
                0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                n => n,
            },
            drop_superseded: parse_bool("DROP_SUPERSEDED", &get("DROP_SUPERSEDED"))?,
            max_frame_age_s: parse_float("MAX_FRAME_AGE_S", &get("MAX_FRAME_AGE_S"), 86_400.0, "seconds")?,
            max_payload_bytes: parse_num("MAX_PAYLOAD_BYTES", &get("MAX_PAYLOAD_BYTES"), 1024, 256 << 20)? as usize,
            max_image_width: parse_num("MAX_IMAGE_WIDTH", &get("MAX_IMAGE_WIDTH"), 16, 16384)? as u32,
            max_image_height: parse_num("MAX_IMAGE_HEIGHT", &get("MAX_IMAGE_HEIGHT"), 16, 16384)? as u32,
            ort_library: non_empty(get("ORT_DYLIB_PATH")).map(PathBuf::from),
            candle_threads: parse_num("CANDLE_THREADS", &get("CANDLE_THREADS"), 0, 1024)? as usize,
            candle_isa: match get("CANDLE_ISA").as_str() {
                v @ ("auto" | "v4" | "v3" | "base") => v.to_owned(),
                v => return Err(bad("CANDLE_ISA", "auto, v4, v3 or base", v)),
            },
            shutdown_timeout_s: parse_num("SHUTDOWN_TIMEOUT_S", &get("SHUTDOWN_TIMEOUT_S"), 0, 3600)?,
            log: get("RUST_LOG"),
            log_format: match get("LOG_FORMAT").as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                v => return Err(bad("LOG_FORMAT", "text or json", v)),
            },
        };
        if s.input_topics.is_empty() {
            return Err(bad("MQTT_INPUT_TOPICS", "at least one topic filter", ""));
        }
        for (k, t) in [
            ("MQTT_STATUS_TOPIC", &s.status_topic),
            ("MQTT_ERROR_TOPIC", &s.error_topic),
        ] {
            let tpl = crate::topic::TopicTemplate::parse(t).map_err(|e| SettingsError(format!("{k}: {e}")))?;
            let other = tpl.var_names().find(|v| *v != "client_id").map(str::to_owned);
            if let Some(v) = other {
                return Err(SettingsError(format!(
                    "{k}: only {{client_id}} can be used here, found {{{v}}}"
                )));
            }
        }
        s.metrics_topic = metrics_topic(&s.metrics_topic, &s.client_id, s.site.as_ref())?;
        Ok((s, rest))
    }
}

/// `MQTT_METRICS_TOPIC` rendered: its `{client_id}` and, with a site, the site's levels.
fn metrics_topic(template: &str, client_id: &str, site: Option<&Site>) -> Result<String, SettingsError> {
    let template = match (template.trim(), site) {
        ("", Some(_)) => "edge-ai/{business_unit}/{facility}/{gateway_id}/ai/metrics",
        ("", None) => "edge-ai/services/{client_id}/ai/metrics",
        (t, _) => t,
    };
    let tpl =
        crate::topic::TopicTemplate::parse(template).map_err(|e| SettingsError(format!("MQTT_METRICS_TOPIC: {e}")))?;
    let mut vars = vec![("client_id", client_id)];
    if let Some(s) = site {
        vars.extend([
            ("business_unit", s.business_unit.as_str()),
            ("facility", s.facility.as_str()),
            ("gateway_id", s.gateway_id.as_str()),
        ]);
    }
    tpl.render_vars(&vars).map_err(|v| {
        SettingsError(format!(
            "MQTT_METRICS_TOPIC: {{{v}}} cannot be filled here (it needs SITE, or is not one of client_id, business_unit, facility, gateway_id)"
        ))
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn bad(key: &str, expected: &str, found: &str) -> SettingsError {
    let flag = OPTIONS.iter().find(|o| o.env == key).map(|o| o.flag).unwrap_or("");
    SettingsError(format!("{key} ({flag}): expected {expected}, found `{found}`"))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, SettingsError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(bad(key, "true or false", v)),
    }
}

/// A number of `unit` in `0..=max` (fractions allowed).
fn parse_float(key: &str, v: &str, max: f64, unit: &str) -> Result<f64, SettingsError> {
    match v.parse::<f64>() {
        Ok(f) if (0.0..=max).contains(&f) => Ok(f),
        _ => Err(bad(key, &format!("a number of {unit} in 0..={max}"), v)),
    }
}

fn parse_num(key: &str, v: &str, min: u64, max: u64) -> Result<u64, SettingsError> {
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(key, &format!("a whole number in {min}..={max}"), v)),
    }
}

/// The `--help` text for the settings, one block per option.
pub fn help_text() -> String {
    let mut s = String::new();
    for o in OPTIONS {
        let default = if o.default.is_empty() { "(empty)" } else { o.default };
        s.push_str(&format!(
            "  {:<16} {:<28} default: {}\n      {}\n",
            o.flag, o.env, default, o.help
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_env_and_flags_layer_in_that_order() {
        let env = |k: &str| match k {
            "AIO_BROKER_TCP_PORT" => Some("1884".to_owned()),
            "QUEUE_DEPTH" => Some("3".to_owned()),
            _ => None,
        };
        let (s, rest) =
            Settings::from_env_and_args(env, &args(&["infer", "--queue-depth", "9", "--http-addr=", "a.jpg"])).unwrap();
        assert_eq!(rest, ["infer", "a.jpg"]);
        assert_eq!(s.broker, Some(("localhost".to_owned(), 1884)));
        assert_eq!(s.queue_depth, 9);
        assert_eq!(s.http_addr, None);
        assert_eq!(s.default_backend, BackendKind::Candle);
        assert_eq!(s.input_topics, ["edge-ai/+/+/+/camera/snapshots"]);
    }

    #[test]
    fn bad_values_name_the_variable_and_flag() {
        let err = Settings::from_env_and_args(|k| (k == "DEFAULT_BACKEND").then(|| "tflite".into()), &[]).unwrap_err();
        assert_eq!(
            err.0,
            "DEFAULT_BACKEND (--backend): expected candle, onnx or dual, found `tflite`"
        );
        let err = Settings::from_env_and_args(|_| None, &args(&["--queue-depth", "0"])).unwrap_err();
        assert!(
            err.0
                .starts_with("QUEUE_DEPTH (--queue-depth): expected a whole number in 1..=256"),
            "{err}"
        );
        let err = Settings::from_env_and_args(|_| None, &args(&["--status-topic", "s/{facility}"])).unwrap_err();
        assert!(err.0.contains("only {client_id}"), "{err}");
        assert!(Settings::from_env_and_args(|_| None, &args(&["--broker-port"])).is_err());
    }
}
