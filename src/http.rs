//! HTTP (tiny_http) on threads of its own: probes, metrics, one-shot infer.
//!
//! Owns: routes, status codes, authorisation and body limits. Two listeners
//! (or one serving both): the read-only one (`GET /healthz`, `/readyz`,
//! `/metrics`, `/models`) for probes and scrapers, and the admin one for what
//! changes state or spends CPU (`POST /infer[?model=NAME]`: a JPEG body in,
//! the same JSON result as MQTT out; `POST /models/{name}/reload`), loopback
//! by default and behind the bearer token when one is set. Frames go through
//! the pipeline like MQTT ones.

use std::io::Read as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::metrics::Metrics;
use crate::pipeline::Incoming;
use crate::registry::Registry;

/// How long `/infer` waits for its result.
pub const INFER_TIMEOUT: Duration = Duration::from_secs(30);
const THREADS: usize = 2;

/// A bearer token kept in a file, re-read when the file changes (rotation).
pub struct TokenFile {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<(Option<std::time::SystemTime>, String)>,
}

impl TokenFile {
    /// Reads the token now; an unreadable or empty file is a start-up error.
    pub fn open(path: &std::path::Path) -> Result<TokenFile, String> {
        let t = TokenFile {
            path: path.to_path_buf(),
            cached: std::sync::Mutex::new((None, String::new())),
        };
        if t.current().is_empty() {
            return Err(format!(
                "HTTP_TOKEN_FILE {}: cannot read a token from it",
                path.display()
            ));
        }
        Ok(t)
    }

    fn current(&self) -> String {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if c.0.is_none() || c.0 != mtime {
            match std::fs::read_to_string(&self.path) {
                Ok(t) if !t.trim().is_empty() => *c = (mtime, t.trim().to_owned()),
                // A half-written or vanished file keeps the last good token.
                _ => log::warn!(
                    "HTTP_TOKEN_FILE {}: unreadable or empty; keeping the last token",
                    self.path.display()
                ),
            }
        }
        c.1.clone()
    }

    /// True when `header` is `Bearer <token>` (compared in constant time).
    pub fn allows(&self, header: Option<&str>) -> bool {
        let token = self.current();
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let (a, b) = (given.trim().as_bytes(), token.as_bytes());
        a.len() == b.len() && !token.is_empty() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

pub struct HttpState {
    pub registry: Arc<Registry>,
    /// When set, `POST /infer` needs its bearer token.
    pub token: Option<TokenFile>,
    pub metrics: Arc<Metrics>,
    pub incoming: async_channel::Sender<Incoming>,
    pub mqtt_enabled: bool,
    pub max_body: usize,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `GET` probes, metrics and the model list.
    ReadOnly,
    /// `POST /infer` and `POST /models/{name}/reload`.
    Admin,
    Both,
}

impl Role {
    fn setting(self) -> &'static str {
        match self {
            Role::Admin => "HTTP_ADMIN_ADDR",
            _ => "HTTP_ADDR",
        }
    }
}

/// Binds `addr` (errors name it) and serves `role`'s endpoints on background threads.
pub fn start(
    addr: &str,
    role: Role,
    state: Arc<HttpState>,
) -> Result<(String, Vec<std::thread::JoinHandle<()>>), String> {
    let server = Server::http(addr).map_err(|e| format!("cannot listen on {} `{addr}`: {e}", role.setting()))?;
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_else(|| addr.to_owned());
    let server = Arc::new(server);
    let handles = (0..THREADS)
        .map(|i| {
            let server = server.clone();
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("http-{}{i}", if role == Role::Admin { "admin-" } else { "" }))
                .spawn(move || {
                    while let Ok(rq) = server.recv() {
                        state.metrics.http_requests.fetch_add(1, Relaxed);
                        handle(&state, role, rq);
                    }
                })
                .expect("spawn http thread")
        })
        .collect();
    Ok((bound, handles))
}

fn header(k: &str, v: &str) -> Header {
    Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("static header")
}

fn json_response(status: u16, body: Vec<u8>) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

fn error_body(message: &str) -> Vec<u8> {
    #[derive(miniserde::Serialize)]
    struct E<'a> {
        error: &'a str,
    }
    miniserde::json::to_string(&E { error: message }).into_bytes()
}

fn handle(state: &HttpState, role: Role, mut rq: Request) {
    let url = rq.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = rq.method().clone();
    let admin_path = path == "/infer" || (path.starts_with("/models/") && path.ends_with("/reload"));
    let resp = match (&method, path) {
        _ if role == Role::ReadOnly && admin_path => json_response(
            404,
            error_body("not served here: POST /infer and POST /models/{name}/reload listen on HTTP_ADMIN_ADDR"),
        ),
        _ if role == Role::Admin && !admin_path => json_response(
            404,
            error_body("this is the admin listener (POST /infer, POST /models/{name}/reload); probes and metrics are on HTTP_ADDR"),
        ),
        (Method::Get | Method::Head, "/healthz") => {
            Response::from_string("ok\n").with_header(header("Content-Type", "text/plain"))
        }
        (Method::Get | Method::Head, "/readyz") => {
            let (ready, body) = readiness(state);
            json_response(if ready { 200 } else { 503 }, body)
        }
        (Method::Get | Method::Head, "/metrics") => Response::from_string(metrics_text(state))
            .with_header(header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")),
        (Method::Get | Method::Head, "/models") => json_response(200, models_json(state)),
        (Method::Post, p) if p.starts_with("/models/") && p.ends_with("/reload") => reload(state, &rq, p),
        (Method::Post, "/infer") if !authorized(state, &rq) => json_response(
            401,
            error_body("POST /infer needs `Authorization: Bearer <token>` (HTTP_TOKEN_FILE)"),
        )
        .with_header(header("WWW-Authenticate", "Bearer")),
        (Method::Post, "/infer") => infer(state, &mut rq, query),
        (_, "/healthz" | "/readyz" | "/metrics") => json_response(405, error_body("method not allowed; use GET")),
        (_, "/infer") => json_response(405, error_body("method not allowed; POST a JPEG body")),
        _ => json_response(
            404,
            error_body("not found; try /healthz, /readyz, /metrics, /models or POST /infer"),
        ),
    };
    if let Err(e) = rq.respond(resp) {
        log::debug!("HTTP response to {method} {path} failed: {e}");
    }
}

/// `POST /models/{name}/reload` (behind the bearer token when one is set).
fn reload(state: &HttpState, rq: &Request, path: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let name = &path["/models/".len()..path.len() - "/reload".len()];
    if !authorized(state, rq) {
        return json_response(
            401,
            error_body("reloading needs `Authorization: Bearer <token>` (HTTP_TOKEN_FILE)"),
        )
        .with_header(header("WWW-Authenticate", "Bearer"));
    }
    #[derive(miniserde::Serialize)]
    struct Reloaded<'a> {
        reloaded: &'a str,
    }
    match state.registry.reload(name) {
        Ok(()) => json_response(
            200,
            miniserde::json::to_string(&Reloaded { reloaded: name }).into_bytes(),
        ),
        Err(e) if e.starts_with("no model named") => json_response(404, error_body(&e)),
        Err(e) => json_response(422, error_body(&e)),
    }
}

fn authorized(state: &HttpState, rq: &Request) -> bool {
    match &state.token {
        None => true,
        Some(t) => {
            let h = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.as_str());
            t.allows(h)
        }
    }
}

fn metrics_text(state: &HttpState) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut o = state.metrics.render(&state.registry.snapshot().summary());
    let r = &state.registry;
    let _ = writeln!(
        o,
        "# HELP aei_model_reloads_total Models reloaded without a restart.\n# TYPE aei_model_reloads_total counter"
    );
    let _ = writeln!(o, "aei_model_reloads_total {}", r.reloads.load(Relaxed));
    let _ = writeln!(
        o,
        "# HELP aei_model_reload_failures_total Reloads refused; the previous model kept serving.\n# TYPE aei_model_reload_failures_total counter"
    );
    let _ = writeln!(o, "aei_model_reload_failures_total {}", r.reload_failures.load(Relaxed));
    o
}

/// `GET /models`: every loaded model with its version (file hash), backend,
/// provider, load time, frames answered and last reload error.
fn models_json(state: &HttpState) -> Vec<u8> {
    #[derive(miniserde::Serialize)]
    struct M {
        name: String,
        backend: String,
        model_type: String,
        provider: String,
        source: String,
        model_hash: String,
        loaded_at_unix_s: u64,
        frames: u64,
        reload_error: Option<String>,
    }
    let errors = state
        .registry
        .reload_errors
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    let list: Vec<M> = state
        .registry
        .snapshot()
        .list
        .iter()
        .map(|m| M {
            name: m.config.name.clone(),
            backend: m.backend_name().into(),
            model_type: m.config.model_type.as_str().into(),
            provider: m.provider.clone(),
            source: m
                .config
                .source
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "built-in".into()),
            model_hash: format!("{:016x}", m.hash),
            loaded_at_unix_s: m
                .loaded_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            frames: m.frames.load(std::sync::atomic::Ordering::Relaxed),
            reload_error: errors.get(&m.config.name).cloned(),
        })
        .collect();
    miniserde::json::to_string(&list).into_bytes()
}

fn readiness(state: &HttpState) -> (bool, Vec<u8>) {
    #[derive(miniserde::Serialize)]
    struct Model {
        name: String,
        backend: String,
        model_type: String,
        provider: String,
        ready: bool,
        error: Option<String>,
    }
    #[derive(miniserde::Serialize)]
    struct Mqtt {
        enabled: bool,
        connected: bool,
        /// Why the last connection attempt failed, if it did.
        last_error: Option<String>,
    }
    #[derive(miniserde::Serialize)]
    struct Problem {
        model: String,
        error: String,
    }
    #[derive(miniserde::Serialize)]
    struct Ready {
        ready: bool,
        models: Vec<Model>,
        /// Failed loads and reloads (an old version keeps serving) and config files not added.
        model_errors: Vec<Problem>,
        mqtt: Mqtt,
    }
    let connected = state.metrics.mqtt_connected.load(Relaxed);
    let models = state.registry.snapshot();
    let ready = models.all_ready() && (!state.mqtt_enabled || connected);
    let body = Ready {
        ready,
        models: models
            .summary()
            .into_iter()
            .map(|m| Model {
                name: m.name,
                backend: m.backend.into(),
                model_type: m.model_type.into(),
                provider: m.provider,
                ready: m.ready,
                error: m.error,
            })
            .collect(),
        model_errors: state
            .registry
            .problems()
            .into_iter()
            .map(|(model, error)| Problem { model, error })
            .collect(),
        mqtt: Mqtt {
            enabled: state.mqtt_enabled,
            connected,
            last_error: Some(state.metrics.mqtt_last_error.lock().unwrap().clone())
                .filter(|e| !connected && !e.is_empty()),
        },
    };
    (ready, miniserde::json::to_string(&body).into_bytes())
}

fn infer(state: &HttpState, rq: &mut Request, query: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let model = match query.split('&').find_map(|kv| kv.strip_prefix("model=")) {
        Some(name) => match state.registry.snapshot().find(name) {
            Some(i) => i,
            None => return json_response(404, error_body(&format!("no model named `{name}`"))),
        },
        None => 0,
    };
    if rq.body_length().is_some_and(|n| n > state.max_body) {
        state.metrics.failed(crate::metrics::FailReason::PayloadTooLarge);
        return json_response(
            413,
            error_body(&format!("body over MAX_PAYLOAD_BYTES = {}", state.max_body)),
        );
    }
    // Read at most one byte past the limit, so chunked bodies are bounded too.
    let mut body = Vec::with_capacity(rq.body_length().unwrap_or(64 * 1024).min(state.max_body + 1));
    if let Err(e) = rq.as_reader().take(state.max_body as u64 + 1).read_to_end(&mut body) {
        return json_response(400, error_body(&format!("cannot read body: {e}")));
    }
    let (tx, rx) = async_channel::bounded(1);
    let msg = Incoming {
        topic: Bytes::from_static(b"http/infer"),
        payload: Bytes::from(body),
        reply: Some(tx),
        model: Some(model),
        ack: None,
        dup: false,
    };
    if state.incoming.send_blocking(msg).is_err() {
        return json_response(503, error_body("the pipeline is shutting down"));
    }
    match smol::block_on(async {
        smol::future::or(async { rx.recv().await.ok() }, async {
            smol::Timer::after(INFER_TIMEOUT).await;
            None
        })
        .await
    }) {
        Some(reply) => json_response(reply.status, reply.body),
        None => json_response(504, error_body("no result within 30 s")),
    }
}
