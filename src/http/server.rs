//! A small HTTP/1.1 server on smol: connections, limits and deadlines.
//!
//! Owns: reading a request head (parsed by `httparse`) within a size, count
//! and time limit, reading a body within the limit its route allows (by
//! `Content-Length` or chunked, with `Expect: 100-continue`), writing the
//! response, keep-alive, and how many connections one listener holds. What a
//! route answers is the [`Handler`]'s business (`http/mod.rs`).
//!
//! Every connection is a task on the listener's own executor, so a slow or
//! silent client costs a few kilobytes and never a thread: probes answer while
//! others upload slowly or hold connections open. At [`Limits::max_connections`]
//! the connection that has waited longest for a request head is closed to make
//! room; when every connection is inside a request, up to
//! [`Limits::probe_reserve`] more are taken for probes only (anything else
//! there is answered 503), so a kubelet's probe still gets its answer. At
//! most [`Limits::max_bodies`] bodies are read at once (the rest wait their
//! turn within their deadline), which bounds the memory bodies take.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::io::{AsyncReadExt as _, AsyncWriteExt as _};
use smol::net::{TcpListener, TcpStream};

use crate::metrics::{HttpRefusal, Metrics};

/// What one listener allows a client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections beyond `max_connections` kept for probes ([`Handler::is_probe`]).
    pub probe_reserve: usize,
    /// Bodies read at the same time.
    pub max_bodies: usize,
    /// Request line and headers together.
    pub head_bytes: usize,
    pub max_headers: usize,
    /// For a whole request head, counted from the first byte awaited (so also
    /// how long an idle keep-alive connection stays open).
    pub head_timeout: Duration,
    /// For a whole body.
    pub body_timeout: Duration,
    /// For writing a whole response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            probe_reserve: 32,
            max_bodies: 16,
            head_bytes: 16 * 1024,
            max_headers: 64,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A request line and its headers.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    /// The target before `?`.
    pub path: String,
    /// The target after `?` (empty when none).
    pub query: String,
    /// Names lower-cased; values as sent (non-UTF-8 bytes replaced).
    pub headers: Vec<(String, String)>,
    framing: Framing,
    close: bool,
    expect_continue: bool,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The declared body size, when the client sent `Content-Length`.
    pub fn content_length(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(n) => Some(n),
            _ => None,
        }
    }

    fn has_body(&self) -> bool {
        !matches!(self.framing, Framing::Length(0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// Why a body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the route's limit (declared or sent).
    TooLarge,
    /// Not all of it arrived within [`Limits::body_timeout`].
    Timeout,
    /// Malformed chunked framing, or the client went away.
    Broken,
}

/// A response: status, content type, extra headers and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

/// What a listener serves.
pub trait Handler: 'static {
    /// How many body bytes this request may send and be read (`None`: answer
    /// without reading it, e.g. a wrong route or a missing token).
    fn body_limit(&self, head: &Head) -> Option<usize>;
    /// The answer to a request; `body` is what [`Handler::body_limit`] allowed
    /// (empty when it allowed none).
    fn respond(&self, head: Head, body: Result<Vec<u8>, BodyError>) -> impl Future<Output = Response>;
    /// Whether a request is a cheap probe, served from the probe reserve.
    fn is_probe(&self, head: &Head) -> bool;
    /// A request head was read (for counting).
    fn on_request(&self) {}
    fn metrics(&self) -> &Metrics;
}

/// Serves `listener` until it fails, on the current (local) executor.
pub async fn serve<H: Handler>(
    ex: Rc<smol::LocalExecutor<'static>>,
    listener: TcpListener,
    handler: Rc<H>,
    limits: Limits,
) {
    // The connections, and the probe reserve's (each may evict its own idlest).
    let main: Rc<RefCell<Table>> = Rc::default();
    let reserve: Rc<RefCell<Table>> = Rc::default();
    let bodies = Rc::new(smol::lock::Semaphore::new(limits.max_bodies.max(1)));
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait and go on.
                log::warn!("HTTP accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Into the main table (evicting its idlest when full), else, when every main
        // connection is inside a request, into the probe reserve (likewise), else 503.
        let metrics = handler.metrics();
        let (table, probes_only) = if main.borrow_mut().make_room(limits.max_connections, MIN_IDLE, metrics) {
            (main.clone(), false)
        } else if reserve
            .borrow_mut()
            .make_room(limits.probe_reserve, Duration::ZERO, metrics)
        {
            (reserve.clone(), true)
        } else {
            handler.metrics().http_refused(HttpRefusal::Busy);
            ex.spawn(async move {
                let mut stream = stream;
                let r = Response::new(503, "application/json", refusal_body(HttpRefusal::Busy))
                    .with_header("Retry-After", "1");
                let _ = with_deadline(limits.write_timeout, write_response(&mut stream, &r, false, true)).await;
            })
            .detach();
            continue;
        };
        let id = next_id;
        next_id += 1;
        let idle_since = Rc::new(Cell::new(Some(Instant::now())));
        let (kill, killed) = async_channel::bounded::<()>(1);
        table.borrow_mut().conns.insert(
            id,
            Entry {
                idle_since: idle_since.clone(),
                _kill: kill,
            },
        );
        let (handler, bodies) = (handler.clone(), bodies.clone());
        ex.spawn(async move {
            let turns = (!probes_only).then_some(&*bodies);
            let conn = connection(stream, &*handler, limits, &idle_since, turns);
            smol::future::or(conn, async {
                let _ = killed.recv().await;
            })
            .await;
            table.borrow_mut().conns.remove(&id);
        })
        .detach();
    }
}

/// A connection that has just opened is not closed to make room for another:
/// it gets this long to send its request head.
const MIN_IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Table {
    conns: HashMap<u64, Entry>,
}

struct Entry {
    /// `Some(since)` while waiting for a request head.
    idle_since: Rc<Cell<Option<Instant>>>,
    /// Dropping it ends the connection's task.
    _kill: async_channel::Sender<()>,
}

impl Table {
    /// Room for one more under `cap`, closing the idlest connection if need be
    /// (one that has waited at least `min_idle` for a head); false when none may go.
    fn make_room(&mut self, cap: usize, min_idle: Duration, metrics: &Metrics) -> bool {
        if self.conns.len() < cap {
            return true;
        }
        let evicted = self.evict_idlest(min_idle);
        if evicted {
            metrics.http_refused(HttpRefusal::Evicted);
        }
        evicted && self.conns.len() < cap
    }

    /// Closes the connection that has waited longest for a head (at least
    /// `min_idle`); false when there is none.
    fn evict_idlest(&mut self, min_idle: Duration) -> bool {
        let idlest = self
            .conns
            .iter()
            .filter_map(|(id, e)| e.idle_since.get().map(|t| (t, *id)))
            .filter(|(t, _)| t.elapsed() >= min_idle)
            .min();
        match idlest {
            Some((_, id)) => {
                self.conns.remove(&id);
                true
            }
            None => false,
        }
    }
}

/// Runs `f` until it finishes or `d` passes (`None`).
async fn with_deadline<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(f.await) }, async {
        smol::Timer::after(d).await;
        None
    })
    .await
}

/// A connection's read side: what was read but not yet used sits in `buf[pos..end]`.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

enum HeadOutcome {
    Head(Head),
    /// The client closed cleanly between requests.
    Closed,
    Refused(HttpRefusal, Option<u16>),
}

/// One connection's requests, in turn. `bodies`: the turns to hold a body;
/// `None` on a connection from the probe reserve, which serves one probe.
async fn connection<H: Handler>(
    stream: TcpStream,
    handler: &H,
    limits: Limits,
    idle_since: &Cell<Option<Instant>>,
    bodies: Option<&smol::lock::Semaphore>,
) {
    let mut c = Conn {
        stream,
        buf: vec![0; limits.head_bytes],
        pos: 0,
        end: 0,
    };
    loop {
        idle_since.set(Some(Instant::now()));
        let outcome = with_deadline(limits.head_timeout, c.read_head(&limits))
            .await
            .unwrap_or(HeadOutcome::Refused(HttpRefusal::Timeout, Some(408)));
        idle_since.set(None);
        let head = match outcome {
            HeadOutcome::Head(h) => h,
            HeadOutcome::Closed => return,
            HeadOutcome::Refused(why, status) => {
                handler.metrics().http_refused(why);
                if let Some(status) = status {
                    let r = Response::new(status, "application/json", refusal_body(why));
                    let _ = with_deadline(limits.write_timeout, write_response(&mut c.stream, &r, false, true)).await;
                }
                return;
            }
        };
        handler.on_request();
        let is_head = head.method == "HEAD";
        let mut close = head.close;
        let Some(bodies) = bodies else {
            // From the probe reserve: probes only, one request, then close.
            let r = if handler.is_probe(&head) {
                handler.respond(head, Ok(Vec::new())).await
            } else {
                handler.metrics().http_refused(HttpRefusal::Busy);
                Response::new(503, "application/json", refusal_body(HttpRefusal::Busy)).with_header("Retry-After", "1")
            };
            let _ = with_deadline(limits.write_timeout, write_response(&mut c.stream, &r, is_head, true)).await;
            return;
        };
        // Held until the answer is written: at most `max_bodies` requests with a body in memory.
        let mut _turn = None;
        let body = match handler.body_limit(&head) {
            Some(limit) => {
                if head.expect_continue && head.content_length().is_none_or(|n| n <= limit as u64) {
                    let ok = with_deadline(
                        limits.write_timeout,
                        c.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
                    )
                    .await;
                    if !matches!(ok, Some(Ok(()))) {
                        return;
                    }
                }
                // Waiting for a turn counts against the body's deadline.
                let b = with_deadline(limits.body_timeout, async {
                    _turn = Some(bodies.acquire().await);
                    c.read_body(head.framing, limit).await
                })
                .await
                .unwrap_or(Err(BodyError::Timeout));
                if b.is_err() {
                    // Where the next request would start is unknown.
                    close = true;
                }
                if b == Err(BodyError::Timeout) {
                    handler.metrics().http_refused(HttpRefusal::Timeout);
                }
                b
            }
            None => {
                if head.has_body() {
                    // Not read: the connection cannot carry another request.
                    close = true;
                }
                Ok(Vec::new())
            }
        };
        let unread_body = close && head.has_body();
        let resp = handler.respond(head, body).await;
        let sent = with_deadline(
            limits.write_timeout,
            write_response(&mut c.stream, &resp, is_head, close),
        )
        .await;
        if !matches!(sent, Some(Ok(()))) || close {
            if unread_body {
                // Let the client read the answer before the unread body makes the kernel reset.
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                let mut sink = [0u8; 4096];
                let _ = with_deadline(Duration::from_secs(2), async {
                    while matches!(c.stream.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            return;
        }
    }
}

fn refusal_body(why: HttpRefusal) -> Vec<u8> {
    let what = match why {
        HttpRefusal::BadRequest => "malformed HTTP/1.1 request",
        HttpRefusal::HeadTooLarge => "request head over its size or header-count limit",
        HttpRefusal::Timeout => "the request did not arrive in time",
        HttpRefusal::Evicted | HttpRefusal::Busy => "too many connections",
    };
    format!("{{\"error\":\"{what}\"}}").into_bytes()
}

impl Conn {
    /// Reads and parses one request head.
    async fn read_head(&mut self, limits: &Limits) -> HeadOutcome {
        // Keep what follows the previous request at the front.
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        loop {
            // Blank lines before a request are allowed (RFC 9112 2.2).
            let lead = self.buf[..self.end]
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            if lead > 0 {
                self.buf.copy_within(lead..self.end, 0);
                self.end -= lead;
            }
            if self.end > 0 {
                let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
                let mut rq = httparse::Request::new(&mut headers);
                match rq.parse(&self.buf[..self.end]) {
                    Ok(httparse::Status::Complete(n)) => {
                        self.pos = n;
                        return match head_of(&rq) {
                            Some(h) => HeadOutcome::Head(h),
                            None => HeadOutcome::Refused(HttpRefusal::BadRequest, Some(400)),
                        };
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return HeadOutcome::Refused(HttpRefusal::HeadTooLarge, Some(431))
                    }
                    Err(_) => return HeadOutcome::Refused(HttpRefusal::BadRequest, Some(400)),
                }
            }
            if self.end == self.buf.len() {
                return HeadOutcome::Refused(HttpRefusal::HeadTooLarge, Some(431));
            }
            match self.stream.read(&mut self.buf[self.end..]).await {
                Ok(0) if self.end == 0 => return HeadOutcome::Closed,
                Ok(0) => return HeadOutcome::Refused(HttpRefusal::BadRequest, None),
                Ok(n) => self.end += n,
                Err(_) => return HeadOutcome::Closed,
            }
        }
    }

    /// Reads at least one more byte into the buffer (after what is unread).
    async fn fill(&mut self) -> Result<(), BodyError> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        match self.stream.read(&mut self.buf[self.end..]).await {
            Ok(0) | Err(_) => Err(BodyError::Broken),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
        }
    }

    /// Appends exactly `n` body bytes to `out`.
    async fn take(&mut self, mut n: u64, out: &mut Vec<u8>) -> Result<(), BodyError> {
        while n > 0 {
            if self.pos == self.end {
                self.fill().await?;
            }
            let k = ((self.end - self.pos) as u64).min(n) as usize;
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.pos += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// One CRLF-terminated line of at most `max` bytes (without the CRLF).
    async fn line(&mut self, max: usize) -> Result<Vec<u8>, BodyError> {
        let mut line = Vec::new();
        loop {
            if self.pos == self.end {
                self.fill().await?;
            }
            let avail = &self.buf[self.pos..self.end];
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&avail[..i]);
                    self.pos += i + 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return if line.len() > max {
                        Err(BodyError::Broken)
                    } else {
                        Ok(line)
                    };
                }
                None => {
                    line.extend_from_slice(avail);
                    self.pos = self.end;
                    if line.len() > max {
                        return Err(BodyError::Broken);
                    }
                }
            }
        }
    }

    async fn read_body(&mut self, framing: Framing, limit: usize) -> Result<Vec<u8>, BodyError> {
        match framing {
            Framing::Length(n) if n > limit as u64 => Err(BodyError::TooLarge),
            Framing::Length(n) => {
                let mut out = Vec::with_capacity(n as usize);
                self.take(n, &mut out).await?;
                Ok(out)
            }
            Framing::Chunked => {
                let mut out = Vec::new();
                loop {
                    let line = self.line(1024).await?;
                    let size = std::str::from_utf8(&line)
                        .ok()
                        .and_then(|l| l.split(';').next())
                        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                        .ok_or(BodyError::Broken)?;
                    if size == 0 {
                        // Trailers, up to the blank line.
                        for _ in 0..64 {
                            if self.line(8 * 1024).await?.is_empty() {
                                return Ok(out);
                            }
                        }
                        return Err(BodyError::Broken);
                    }
                    if out.len() as u64 + size > limit as u64 {
                        return Err(BodyError::TooLarge);
                    }
                    self.take(size, &mut out).await?;
                    if !self.line(0).await?.is_empty() {
                        return Err(BodyError::Broken);
                    }
                }
            }
        }
    }
}

/// The parts of a parsed request the routes use; `None` when its framing is malformed.
fn head_of(rq: &httparse::Request<'_, '_>) -> Option<Head> {
    let (method, target, version) = (rq.method?, rq.path?, rq.version?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers: Vec<(String, String)> = rq
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    fn value<'h>(headers: &'h [(String, String)], name: &'static str) -> impl Iterator<Item = &'h str> {
        headers.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    let mut lengths = value(&headers, "content-length").map(|v| v.trim().parse::<u64>());
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(Ok(n)), None) => Some(n),
        // Unparseable or repeated: request smuggling territory.
        _ => return None,
    };
    drop(lengths);
    let chunked = match value(&headers, "transfer-encoding").collect::<Vec<_>>().as_slice() {
        [] => false,
        [te] if te.trim().eq_ignore_ascii_case("chunked") => true,
        _ => return None,
    };
    let framing = match (chunked, length) {
        (true, Some(_)) => return None,
        (true, None) => Framing::Chunked,
        (false, n) => Framing::Length(n.unwrap_or(0)),
    };
    let connection = value(&headers, "connection")
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    let close = version == 0 && !connection.contains("keep-alive") || connection.contains("close");
    let expect_continue = value(&headers, "expect").any(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    Some(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        framing,
        close,
        expect_continue,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

async fn write_response(stream: &mut TcpStream, r: &Response, is_head: bool, close: bool) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    for (k, v) in &r.headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    if !is_head {
        stream.write_all(&r.body).await?;
    }
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Option<Head> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut rq = httparse::Request::new(&mut headers);
        assert!(rq.parse(raw.as_bytes()).unwrap().is_complete());
        head_of(&rq)
    }

    #[test]
    fn framing_is_refused_when_ambiguous() {
        let h = parse("POST /infer?model=a HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!((h.path.as_str(), h.query.as_str()), ("/infer", "model=a"));
        assert_eq!(h.content_length(), Some(5));
        assert!(!h.close);
        assert!(parse("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_none());
        assert!(parse("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").is_none());
        assert!(parse("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n").is_none());
        assert!(parse("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").is_none());
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(h.close && !h.has_body());
        let h = parse("GET / HTTP/1.1\r\nConnection: Close\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert!(h.close && h.expect_continue);
    }
}
