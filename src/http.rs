//! HTTP (tiny_http) on threads of its own: probes, metrics, one-shot infer.
//!
//! Owns: routes, status codes and body limits. `GET /healthz`, `GET /readyz`,
//! `GET /metrics`, `POST /infer[?model=NAME]` (a JPEG body in, the same JSON
//! result as MQTT out). Frames go through the pipeline like MQTT ones.

use std::io::Read as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::metrics::Metrics;
use crate::models::Models;
use crate::pipeline::Incoming;

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
    pub models: Arc<Models>,
    /// When set, `POST /infer` needs its bearer token.
    pub token: Option<TokenFile>,
    pub metrics: Arc<Metrics>,
    pub incoming: async_channel::Sender<Incoming>,
    pub mqtt_enabled: bool,
    pub max_body: usize,
}

/// Binds `addr` (errors name it) and serves on background threads.
pub fn start(addr: &str, state: HttpState) -> Result<(String, Vec<std::thread::JoinHandle<()>>), String> {
    let server = Server::http(addr).map_err(|e| format!("cannot listen on HTTP_ADDR `{addr}`: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_else(|| addr.to_owned());
    let server = Arc::new(server);
    let state = Arc::new(state);
    let handles = (0..THREADS)
        .map(|i| {
            let server = server.clone();
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(rq) = server.recv() {
                        state.metrics.http_requests.fetch_add(1, Relaxed);
                        handle(&state, rq);
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

fn handle(state: &HttpState, mut rq: Request) {
    let url = rq.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = rq.method().clone();
    let resp = match (&method, path) {
        (Method::Get | Method::Head, "/healthz") => {
            Response::from_string("ok\n").with_header(header("Content-Type", "text/plain"))
        }
        (Method::Get | Method::Head, "/readyz") => {
            let (ready, body) = readiness(state);
            json_response(if ready { 200 } else { 503 }, body)
        }
        (Method::Get | Method::Head, "/metrics") => {
            Response::from_string(state.metrics.render(&state.models.summary()))
                .with_header(header("Content-Type", "text/plain; version=0.0.4; charset=utf-8"))
        }
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
            error_body("not found; try /healthz, /readyz, /metrics or POST /infer"),
        ),
    };
    if let Err(e) = rq.respond(resp) {
        log::debug!("HTTP response to {method} {path} failed: {e}");
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
    }
    #[derive(miniserde::Serialize)]
    struct Ready {
        ready: bool,
        models: Vec<Model>,
        mqtt: Mqtt,
    }
    let connected = state.metrics.mqtt_connected.load(Relaxed);
    let ready = state.models.all_ready() && (!state.mqtt_enabled || connected);
    let body = Ready {
        ready,
        models: state
            .models
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
        mqtt: Mqtt {
            enabled: state.mqtt_enabled,
            connected,
        },
    };
    (ready, miniserde::json::to_string(&body).into_bytes())
}

fn infer(state: &HttpState, rq: &mut Request, query: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let model = match query.split('&').find_map(|kv| kv.strip_prefix("model=")) {
        Some(name) => match state.models.find(name) {
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
