//! Hostile HTTP clients against the running service: odd routes, methods,
//! heads and bodies, with and without the token, slow and idle connections.
//! The service must stay up, answer every well-formed request with a 4xx or
//! its right answer (never a 5xx but 503/504 where documented), and keep
//! `/healthz` answering within 100 ms throughout.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// Sends `raw` and returns the status of the first response (None: closed without one).
fn raw(addr: &str, raw: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(raw);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// GETs /healthz on a fresh connection every 20 ms; records the slowest answer and failures.
struct ProbeWatch {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProbeWatch {
    fn start(addr: &str) -> ProbeWatch {
        let (stop, worst_us, failures, probes) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let addr = addr.to_owned();
        let thread = {
            let (stop, worst_us, failures, probes) = (stop.clone(), worst_us.clone(), failures.clone(), probes.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let t = Instant::now();
                    let status = raw(&addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    let us = t.elapsed().as_micros() as u64;
                    probes.fetch_add(1, Relaxed);
                    if status != Some(200) {
                        failures.fetch_add(1, Relaxed);
                    }
                    worst_us.fetch_max(us, Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        ProbeWatch {
            stop,
            worst_us,
            failures,
            probes,
            thread: Some(thread),
        }
    }

    /// Stops and returns (probes, failures, slowest).
    fn finish(mut self) -> (u64, u64, Duration) {
        self.stop.store(true, Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.probes.load(Relaxed),
            self.failures.load(Relaxed),
            Duration::from_micros(self.worst_us.load(Relaxed)),
        )
    }
}

const TOKEN: &str = "s3cret-token";

/// Every request of the suite against `addr`; returns how many were tried.
/// `role` is what the listener serves: "probes", "admin" or "both".
fn hostile_requests(addr: &str, token: bool, role: &str) -> usize {
    let mut tried = 0;
    let mut check = |what: &str, req: Vec<u8>, ok: &dyn Fn(Option<u16>) -> bool| {
        tried += 1;
        let status = raw(addr, &req);
        assert!(ok(status), "{what}: answered {status:?}");
    };
    let no_5xx = |s: Option<u16>| s.is_none_or(|s| s < 500 || s == 503 || s == 504);
    let methods = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "FOO", "get",
    ];
    let long = format!("/{}", "a".repeat(9000));
    let paths: Vec<&str> = vec![
        "/healthz",
        "/readyz",
        "/metrics",
        "/models",
        "/infer",
        "/models/camera-health/reload",
        "/models/",
        "/models//reload",
        "/models/reload",
        "/models/../reload",
        "/models/a/b/reload",
        "/models/%2e%2e/reload",
        "/../../etc/passwd",
        "/infer?model=",
        "/infer?model=nope",
        "/infer?model=camera-health&model=x",
        "/infer?",
        "*",
        "http://x/healthz",
        "//",
        &long,
    ];
    let auths: Vec<Option<String>> = vec![
        None,
        Some(format!("Bearer {TOKEN}")),
        Some("Bearer wrong".into()),
        Some("Bearer".into()),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Bearer {}", "x".repeat(8000))),
    ];
    let jpeg = fixture("astronaut.jpg");
    for m in methods {
        for p in &paths {
            for a in &auths {
                let authed = !token || a.as_deref() == Some(&format!("Bearer {TOKEN}"));
                let mut req = format!("{m} {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
                if let Some(a) = a {
                    req.push_str(&format!("Authorization: {a}\r\n"));
                }
                let body: &[u8] = if m == "POST" && p.starts_with("/infer") {
                    &jpeg
                } else {
                    b""
                };
                req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                let mut req = req.into_bytes();
                req.extend_from_slice(body);
                let what = format!("{m} {} auth={a:?}", &p[..p.len().min(40)]);
                let reload = p.starts_with("/models/") && p.ends_with("/reload") && *p != "/models/reload";
                check(&what, req, &|s| {
                    no_5xx(s)
                        // Without the token nothing is reloaded or inferred.
                        && (authed || !(m == "POST" && (reload || p.starts_with("/infer"))) || s != Some(200))
                        // A reload of a name that is not one is never a success.
                        && !(reload && *p != "/models/camera-health/reload" && s == Some(200))
                });
            }
        }
    }
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let head_cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        (
            "no colon",
            b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n".to_vec(),
            Some(400),
        ),
        (
            "not HTTP",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
            Some(400),
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            Some(400),
        ),
        ("non-UTF-8 path", b"GET /\xff\xfe HTTP/1.1\r\n\r\n".to_vec(), Some(400)),
        ("NUL in path", b"GET /he\0althz HTTP/1.1\r\n\r\n".to_vec(), Some(400)),
        (
            "non-ASCII value",
            b"GET /healthz HTTP/1.1\r\nX: \xff\xfe\r\nConnection: close\r\n\r\n".to_vec(),
            Some(200),
        ),
        (
            "200 headers",
            format!("GET /healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(200)).into_bytes(),
            Some(431),
        ),
        (
            "32 KiB header",
            format!("GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(32 * 1024)).into_bytes(),
            Some(431),
        ),
        (
            "100 KiB path",
            format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(100 * 1024)).into_bytes(),
            Some(431),
        ),
        (
            "two lengths",
            format!("POST /infer HTTP/1.1\r\n{auth}Content-Length: 3\r\nContent-Length: 4\r\n\r\nabc").into_bytes(),
            Some(400),
        ),
        (
            "negative length",
            format!("POST /infer HTTP/1.1\r\n{auth}Content-Length: -3\r\n\r\nabc").into_bytes(),
            Some(400),
        ),
        (
            "length and chunked",
            format!("POST /infer HTTP/1.1\r\n{auth}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                .into_bytes(),
            Some(400),
        ),
        (
            "gzip encoding",
            format!("POST /infer HTTP/1.1\r\n{auth}Transfer-Encoding: gzip\r\n\r\nabc").into_bytes(),
            Some(400),
        ),
        (
            "huge length",
            format!("POST /infer HTTP/1.1\r\n{auth}Content-Length: 999999999999999999\r\n\r\nabc").into_bytes(),
            Some(413),
        ),
        (
            "bad chunk size",
            format!("POST /infer HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
                .into_bytes(),
            Some(400),
        ),
        (
            "chunk over the limit",
            format!("POST /infer HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\nfffffff\r\nabc").into_bytes(),
            Some(413),
        ),
        (
            "short body then close",
            format!("POST /infer HTTP/1.1\r\n{auth}Content-Length: 1000\r\n\r\nabc").into_bytes(),
            Some(400),
        ),
        (
            "body on GET",
            b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            Some(200),
        ),
        ("HTTP/1.0", b"GET /healthz HTTP/1.0\r\n\r\n".to_vec(), Some(200)),
        (
            "absolute form",
            b"GET http://x/healthz HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            Some(404),
        ),
        (
            "reload, empty name",
            format!("POST /models//reload HTTP/1.1\r\n{auth}Content-Length: 0\r\n\r\n").into_bytes(),
            Some(404),
        ),
        (
            "reload, no name",
            format!("POST /models/reload HTTP/1.1\r\n{auth}Content-Length: 0\r\n\r\n").into_bytes(),
            Some(404),
        ),
    ];
    for (what, req, mut want) in head_cases {
        // A parsed request on a route this listener does not serve is a 404.
        let text = String::from_utf8_lossy(&req);
        let probe_route = text.starts_with("GET /healthz");
        let admin_route = text.starts_with("POST ");
        let parsed =
            want.is_some_and(|w| w != 400 && w != 431) || what == "bad chunk size" || what == "short body then close";
        if parsed && ((probe_route && role == "admin") || (admin_route && role == "probes")) {
            want = Some(404);
        }
        // The "short body" case needs the client to stop sending: shut the write side.
        tried += 1;
        let got = if what == "short body then close" {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&req).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf)
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
        } else {
            raw(addr, &req)
        };
        assert!(
            got == want || (want.is_some_and(|w| w >= 400) && got.is_none()),
            "{what}: answered {got:?}, expected {want:?}"
        );
        assert!(no_5xx(got), "{what}: {got:?}");
    }
    if role != "both" {
        return tried;
    }
    // Two requests in one write get two answers; chunked and 100-continue bodies are read.
    tried += 1;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut both = String::new();
    let _ = s.read_to_string(&mut both);
    assert_eq!(both.matches("HTTP/1.1 200").count(), 2, "{both}");
    tried += 1;
    let mut req =
        format!("POST /infer HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes();
    for part in jpeg.chunks(7000) {
        req.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
    assert_eq!(raw(addr, &req), Some(200), "chunked /infer");
    tried += 1;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /infer HTTP/1.1\r\n{auth}Expect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        jpeg.len()
    )
    .unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(&jpeg).unwrap();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    tried
}

/// Slow and idle clients: slowloris heads, slow uploads and more idle
/// connections than a listener keeps. Returns how many connections were opened.
fn slow_clients(addr: &str, slow_uploads: bool) -> usize {
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let mut threads = Vec::new();
    for i in 0..12 {
        let addr = addr.to_owned();
        threads.push(std::thread::spawn(move || {
            // A head one byte a second: closed by the head deadline (10 s).
            let Ok(mut s) = TcpStream::connect(&addr) else { return };
            let head = format!("GET /healthz?slow={i} HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(40));
            for b in head.bytes() {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        }));
    }
    // More slow uploads than a listener keeps connections (256): every connection is inside a
    // request, and the probes are served from the listener's reserve.
    let uploads = if slow_uploads { 270 } else { 3 };
    for _ in 0..uploads {
        let (addr, auth) = (addr.to_owned(), auth.clone());
        threads.push(std::thread::spawn(move || {
            // An upload of 150 kB at 1 kB/s: it would take 150 s; it holds a request, not the probes.
            let Ok(mut s) = TcpStream::connect(&addr) else { return };
            let _ = write!(s, "POST /infer HTTP/1.1\r\n{auth}Content-Length: 150000\r\n\r\n");
            for _ in 0..14 {
                if s.write_all(&[0xffu8; 1000]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        }));
    }
    // More idle connections than one listener keeps (256): the idlest are closed for new ones.
    let idle: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    let opened = 12 + uploads + idle.len();
    for t in threads {
        t.join().unwrap();
    }
    drop(idle);
    opened
}

fn suite(svc: &Service, probe_addr: &str, admin_addr: &str, token: bool) -> usize {
    let watch = ProbeWatch::start(probe_addr);
    let mut tried = 0;
    if probe_addr != admin_addr {
        tried += hostile_requests(admin_addr, token, "admin");
        tried += hostile_requests(probe_addr, token, "probes");
    } else {
        tried += hostile_requests(admin_addr, token, "both");
    }
    let slow = slow_clients(admin_addr, true) + slow_clients(probe_addr, false);
    let (probes, failures, worst) = watch.finish();
    println!(
        "{tried} hostile requests and {slow} slow or idle connections (token: {token}); \
         {probes} probes, {failures} failed, slowest {worst:?}"
    );
    assert_eq!(failures, 0, "probes failed");
    // Well inside the kubelet's default probe timeout (1 s) on a shared machine; a SYN the
    // kernel dropped from a full accept queue costs a one-second retransmit and fails this.
    assert!(worst < Duration::from_millis(500), "slowest /healthz took {worst:?}");
    assert!(probes > 100, "{probes} probes");
    for reason in ["bad_request", "head_too_large", "timeout", "evicted", "busy"] {
        let n = svc.metric(&format!("aei_http_refused_total{{reason=\"{reason}\"}}"));
        assert!(n >= 1.0, "aei_http_refused_total{{reason=\"{reason}\"}} = {n}");
    }
    tried
}

#[test]
fn hostile_http_clients_never_stop_the_service_or_its_probes() {
    let (_dir, health) = camera_health_config();
    let dir = TempDir::new("hostile");
    let token_path = dir.write("token", TOKEN);
    let shared = format!("127.0.0.1:{}", free_port());
    // One listener serving every route, behind the token: the most exposed set-up.
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MAX_PAYLOAD_BYTES", "200000"),
        ("MODEL_CONFIG_PATH", &health),
        ("HTTP_ADDR", &shared),
        ("HTTP_ADMIN_ADDR", &shared),
        ("HTTP_TOKEN_FILE", token_path.to_str().unwrap()),
    ]);
    let mut tried = suite(&svc, &shared, &shared, true);
    assert!(svc.still_running());
    // Separate listeners, no token.
    let mut open = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MAX_PAYLOAD_BYTES", "200000"),
        ("MODEL_CONFIG_PATH", &health),
    ]);
    let (probe, admin) = (open.http().to_owned(), open.admin().to_owned());
    tried += suite(&open, &probe, &admin, false);
    assert!(open.still_running());
    for (s, admin) in [(&svc, shared.as_str()), (&open, admin.as_str())] {
        let (code, body) = http_request_with(
            admin,
            "POST",
            "/infer",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            &fixture("chelsea.jpg"),
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(s.get("/healthz").0, 200);
    }
    println!("{tried} hostile requests in all; both services still serve");
}
