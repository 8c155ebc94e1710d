//! HTTP on a thread per listener: probes, metrics, one-shot infer.
//!
//! Owns: routes, status codes, authorisation and body limits (connections,
//! parsing and deadlines are `server.rs`'s). Two listeners
//! (or one serving both): the read-only one (`GET /healthz`, `/readyz`,
//! `/metrics`, `/models`) for probes and scrapers, and the admin one for what
//! changes state or spends CPU (`POST /infer[?model=NAME]`: a JPEG body in,
//! the same JSON result as MQTT out; `POST /models/{name}/reload`), loopback
//! by default and behind the bearer token when one is set. Frames go through
//! the pipeline like MQTT ones.

mod server;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use server::{BodyError, Head, Response};

use crate::messages::Incoming;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// How long `/infer` waits for its result.
pub const INFER_TIMEOUT: Duration = Duration::from_secs(30);

/// A bearer token kept in a file, re-read when the file changes (rotation).
pub struct TokenFile {
    path: std::path::PathBuf,
    /// The token, and the file's stamp when it was read.
    cached: std::sync::Mutex<(Option<crate::filewatch::Stamp>, String)>,
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
        let stamp = crate::filewatch::stamp(&self.path);
        let mut c = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if c.0.is_none() || c.0 != stamp {
            match std::fs::read_to_string(&self.path) {
                Ok(t) if !t.trim().is_empty() => *c = (stamp, t.trim().to_owned()),
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

/// Connections the kernel queues for a listener before it accepts them.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds `addr` (errors name it) and serves `role`'s endpoints on a thread
/// of their own (one executor, a task per connection).
pub fn start(
    addr: &str,
    role: Role,
    state: Arc<HttpState>,
) -> Result<(String, Vec<std::thread::JoinHandle<()>>), String> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {} `{addr}`: {e}", role.setting()))?;
    // std listens with a backlog of 128. A burst of connections (hundreds of idle clients at
    // once) overflows that before the accept loop drains it, and the kernel then drops SYNs: a
    // probe's connect waits for its one-second retransmit, the kubelet's default probe timeout.
    // Listening again on a listening socket sets the backlog (capped by net.core.somaxconn).
    socket2::SockRef::from(&listener)
        .listen(LISTEN_BACKLOG)
        .map_err(|e| format!("cannot listen on {} `{addr}`: {e}", role.setting()))?;
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_owned());
    let listener = smol::net::TcpListener::try_from(listener)
        .map_err(|e| format!("cannot listen on {} `{addr}`: {e}", role.setting()))?;
    let handle = std::thread::Builder::new()
        .name(format!("http{}", if role == Role::Admin { "-admin" } else { "" }))
        .spawn(move || {
            let ex = std::rc::Rc::new(smol::LocalExecutor::new());
            let routes = std::rc::Rc::new(Routes { state, role });
            smol::block_on(ex.run(server::serve(ex.clone(), listener, routes, server::Limits::default())));
        })
        .map_err(|e| format!("cannot start the HTTP thread: {e}"))?;
    Ok((bound, vec![handle]))
}

fn json_response(status: u16, body: Vec<u8>) -> Response {
    Response::new(status, "application/json", body)
}

fn error_body(message: &str) -> Vec<u8> {
    #[derive(miniserde::Serialize)]
    struct E<'a> {
        error: &'a str,
    }
    miniserde::json::to_string(&E { error: message }).into_bytes()
}

/// `Some(name)` for `/models/{name}/reload` (the name may be empty or odd; checked later).
fn reload_target(path: &str) -> Option<&str> {
    path.strip_prefix("/models/")?.strip_suffix("/reload")
}

/// A listener's routes.
struct Routes {
    state: Arc<HttpState>,
    role: Role,
}

impl Routes {
    fn is_admin(path: &str) -> bool {
        path == "/infer" || reload_target(path).is_some()
    }

    /// The answer for a request on a route this listener does not serve, if so.
    fn misrouted(&self, path: &str) -> Option<Response> {
        match (self.role, Self::is_admin(path)) {
            (Role::ReadOnly, true) => Some(json_response(
                404,
                error_body("not served here: POST /infer and POST /models/{name}/reload listen on HTTP_ADMIN_ADDR"),
            )),
            (Role::Admin, false) => Some(json_response(
                404,
                error_body("this is the admin listener (POST /infer, POST /models/{name}/reload); probes and metrics are on HTTP_ADDR"),
            )),
            _ => None,
        }
    }
}

impl server::Handler for Routes {
    fn body_limit(&self, head: &Head) -> Option<usize> {
        let infer = head.method == "POST" && head.path == "/infer";
        (infer && self.misrouted(&head.path).is_none() && authorized(&self.state, head)).then_some(self.state.max_body)
    }

    async fn respond(&self, head: Head, body: Result<Vec<u8>, BodyError>) -> Response {
        let state = &self.state;
        if let Some(r) = self.misrouted(&head.path) {
            return r;
        }
        let (method, path) = (head.method.as_str(), head.path.as_str());
        let get = matches!(method, "GET" | "HEAD");
        match path {
            "/healthz" if get => Response::new(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if get => {
                let (ready, body) = readiness(state);
                json_response(if ready { 200 } else { 503 }, body)
            }
            "/metrics" if get => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics_text(state).into_bytes(),
            ),
            "/models" if get => json_response(200, models_json(state)),
            "/healthz" | "/readyz" | "/metrics" | "/models" => {
                json_response(405, error_body("method not allowed; use GET")).with_header("Allow", "GET, HEAD")
            }
            "/infer" if method != "POST" => {
                json_response(405, error_body("method not allowed; POST a JPEG body")).with_header("Allow", "POST")
            }
            "/infer" if !authorized(state, &head) => unauthorized("POST /infer"),
            "/infer" => infer(state, &head.query, body).await,
            p => match reload_target(p) {
                Some(_) if method != "POST" => {
                    json_response(405, error_body("method not allowed; use POST")).with_header("Allow", "POST")
                }
                Some(_) if !authorized(state, &head) => unauthorized("reloading"),
                Some(name) => reload(state, name).await,
                None => json_response(
                    404,
                    error_body("not found; try /healthz, /readyz, /metrics, /models or POST /infer"),
                ),
            },
        }
    }

    fn is_probe(&self, head: &Head) -> bool {
        matches!(head.method.as_str(), "GET" | "HEAD")
            && matches!(head.path.as_str(), "/healthz" | "/readyz" | "/metrics" | "/models")
            && self.misrouted(&head.path).is_none()
    }

    fn on_request(&self) {
        self.state.metrics.http_requests.fetch_add(1, Relaxed);
    }

    fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }
}

fn unauthorized(what: &str) -> Response {
    json_response(
        401,
        error_body(&format!(
            "{what} needs `Authorization: Bearer <token>` (HTTP_TOKEN_FILE)"
        )),
    )
    .with_header("WWW-Authenticate", "Bearer")
}

/// `POST /models/{name}/reload` (authorised by now). Loading runs off the
/// listener's thread, so probes keep answering while a model loads.
async fn reload(state: &HttpState, name: &str) -> Response {
    #[derive(miniserde::Serialize)]
    struct Reloaded<'a> {
        reloaded: &'a str,
    }
    if name.is_empty() || name.contains('/') {
        return json_response(
            404,
            error_body("no model named in the path; use POST /models/{name}/reload"),
        );
    }
    let (registry, owned) = (state.registry.clone(), name.to_owned());
    match smol::unblock(move || registry.reload(&owned)).await {
        Ok(()) => json_response(
            200,
            miniserde::json::to_string(&Reloaded { reloaded: name }).into_bytes(),
        ),
        Err(e) if e.starts_with("no model named") => json_response(404, error_body(&e)),
        Err(e) => json_response(422, error_body(&e)),
    }
}

fn authorized(state: &HttpState, head: &Head) -> bool {
    match &state.token {
        None => true,
        Some(t) => t.allows(head.header("authorization")),
    }
}

fn metrics_text(state: &HttpState) -> String {
    let r = &state.registry;
    state.metrics.render(&r.snapshot().summary(), r.reload_counts())
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
        /// `cpu` or `cuda:N`.
        device: String,
        /// A GPU was asked for and cannot be used: why (the model runs on the CPU).
        gpu_fallback: Option<String>,
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
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
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
            device: m.placement.device.clone(),
            gpu_fallback: m.placement.gpu_fallback.clone(),
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
        device: String,
        gpu_fallback: Option<String>,
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
    struct Ready {
        ready: bool,
        models: Vec<Model>,
        /// Failed loads and reloads (an old version keeps serving) and config files not added.
        model_errors: Vec<crate::models::Problem>,
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
                device: m.device,
                gpu_fallback: m.gpu_fallback,
                ready: m.ready,
                error: m.error,
            })
            .collect(),
        model_errors: state.registry.problems(),
        mqtt: Mqtt {
            enabled: state.mqtt_enabled,
            connected,
            last_error: Some(
                state
                    .metrics
                    .mqtt_last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            )
            .filter(|e| !connected && !e.is_empty()),
        },
    };
    (ready, miniserde::json::to_string(&body).into_bytes())
}

async fn infer(state: &HttpState, query: &str, body: Result<Vec<u8>, BodyError>) -> Response {
    let models = state.registry.snapshot();
    let annotate = match query.split('&').find_map(|kv| kv.strip_prefix("annotate=")) {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(v) => return json_response(400, error_body(&format!("annotate={v}: expected true or false"))),
    };
    let model = match query.split('&').find_map(|kv| kv.strip_prefix("model=")) {
        Some(name) => match models.find(name) {
            Some(i) => i,
            None => return json_response(404, error_body(&format!("no model named `{name}`"))),
        },
        None => 0,
    };
    if annotate && !models.list[model].config.model_type.draws() {
        return json_response(
            400,
            error_body(&format!(
                "annotate=true is for classification and detection models; `{}` is {}",
                models.list[model].config.name,
                models.list[model].config.model_type.as_str()
            )),
        );
    }
    let body = match body {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            state.metrics.failed(crate::metrics::FailReason::PayloadTooLarge);
            return json_response(
                413,
                error_body(&format!("body over MAX_PAYLOAD_BYTES = {}", state.max_body)),
            );
        }
        Err(BodyError::Timeout) => return json_response(408, error_body("the body did not arrive in time")),
        Err(BodyError::Broken) => {
            return json_response(400, error_body("cannot read the body (framing or connection)"))
        }
    };
    let (tx, rx) = async_channel::bounded(1);
    let msg = Incoming {
        topic: Bytes::from_static(b"http/infer"),
        payload: Bytes::from(body),
        reply: Some(tx),
        // The index belongs to this snapshot: the frame runs on the same model set.
        model: Some((models, model)),
        ack: None,
        dup: false,
        annotate,
    };
    if state.incoming.send(msg).await.is_err() {
        return json_response(503, error_body("the pipeline is shutting down"));
    }
    match smol::future::or(async { rx.recv().await.ok() }, async {
        smol::Timer::after(INFER_TIMEOUT).await;
        None
    })
    .await
    {
        Some(reply) => Response::new(reply.status, reply.content_type, reply.body),
        None => json_response(504, error_body("no result within 30 s")),
    }
}
