//! Test peers: a real mosquitto on a free port, the service binary, an MQTT
//! test client (rumqttc) and a tiny HTTP client. No fixed ports, no sleeps
//! as synchronisation: every wait is for an event, with a deadline.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod sat_broker;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};

pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).expect("fixture")
}

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The ONNX Runtime library: `ORT_DYLIB_PATH`, else the one `models/fetch` caches.
pub fn ort_library() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/.cache/libonnxruntime.so.1.32.0"))
}

/// Backend settings for tests that load models in-process.
pub fn backend_env() -> ai_edge_inference::backend::BackendEnv {
    ai_edge_inference::backend::BackendEnv {
        ort_library: Some(ort_library()),
    }
}

/// The service settings with every default.
pub fn settings() -> ai_edge_inference::config::Settings {
    ai_edge_inference::config::Settings::from_env_and_args(|_| None, &[])
        .unwrap()
        .0
}

/// A JSON number as f64.
pub fn num(v: &miniserde::json::Value) -> f64 {
    use miniserde::json::{Number, Value};
    match v {
        Value::Number(Number::F64(f)) => *f,
        Value::Number(Number::U64(u)) => *u as f64,
        Value::Number(Number::I64(i)) => *i as f64,
        other => panic!("not a number: {other:?}"),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("aei-{tag}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A model config for the camera-health job on the default topics (the
/// built-in default of Candle builds is a classifier instead).
pub fn camera_health_config() -> (TempDir, String) {
    let dir = TempDir::new("health");
    let p = dir.write("camera-health.yaml", "name: camera-health\nmodel_type: camera-health\n");
    let p = p.to_str().unwrap().to_owned();
    (dir, p)
}

/// A config in `dir` for EfficientNet-Lite0 on Candle from `weights` (a file
/// name in `dir`): the bundled ImageNet labels, the model's preprocessing.
pub fn lite0_config(dir: &TempDir, weights: &str) -> PathBuf {
    dir.write(
        "lite0.yaml",
        &format!(
            "name: lite0\nbackend: candle\nmodel_type: image-classification\nmodel_path: {weights}\n\
             labels: {}/models/imagenet-labels.txt\npreprocessing: {{ resize: [224, 224], mode: center-crop, resize_short: 256, \
             normalize: false, mean: [127, 127, 127], std: [128, 128, 128] }}\ninference: {{ confidence_threshold: 0.0 }}\n",
            root().display()
        ),
    )
}

/// The top-1 label `POST /infer` answers for `jpeg` (the answer must be 200).
pub fn top_label(admin: &str, jpeg: &[u8]) -> String {
    let (code, body) = http_request(admin, "POST", "/infer", jpeg);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let v: miniserde::json::Value = miniserde::json::from_str(std::str::from_utf8(&body).unwrap()).unwrap();
    let Some(miniserde::json::Value::Array(p)) = get(&v, &["predictions"]) else {
        panic!("no predictions: {}", String::from_utf8_lossy(&body))
    };
    get_str(&p[0], &["label"]).unwrap()
}

/// Polls `ok` until it holds; panics after `DEADLINE`.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// mosquitto on 127.0.0.1 and a free port, with a generated config.
pub struct Broker {
    pub port: u16,
    child: Child,
    conf: PathBuf,
    pub dir: TempDir,
    /// Where a persistent broker keeps its database.
    data: Option<TempDir>,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Broker {
        Broker::start_with(
            port,
            &format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
    }

    /// A broker that keeps sessions and queued messages across restarts
    /// (written to disk when it stops), with no cap on queued messages.
    pub fn start_persistent() -> Broker {
        let port = free_port();
        let dir = TempDir::new("mosquitto-data");
        // mosquitto started as root drops to its own user, which must be able to write here.
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nset_tcp_nodelay true\n",
            dir.0.display()
        );
        let mut b = Broker::start_with(port, &conf);
        b.data = Some(dir);
        b
    }

    /// `config` is the listener part; logging and size settings are added.
    pub fn start_with(port: u16, config: &str) -> Broker {
        let dir = TempDir::new("mosquitto");
        let conf = dir.write(
            "mosquitto.conf",
            &format!("{config}\nlog_dest stderr\nmessage_size_limit 0\n"),
        );
        let child = spawn_mosquitto(&conf);
        wait_for("mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Broker {
            port,
            child,
            conf,
            dir,
            data: None,
        }
    }

    /// Stops the broker with SIGTERM (it saves its state) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn_mosquitto(&self.conf);
        wait_for("mosquitto to listen again", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// An outage: stops the broker (it saves its state), keeps it down for `d`, then starts it
    /// again on the same port. Clients queue what they publish meanwhile and send it on reconnect.
    pub fn outage(&mut self, d: Duration) {
        self.stop();
        std::thread::sleep(d);
        self.child = spawn_mosquitto(&self.conf);
        wait_for("mosquitto to listen again", || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn spawn_mosquitto(conf: &Path) -> Child {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto");
    let log = std::env::var_os("AEI_TEST_LOG").is_some();
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(if log { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .expect("mosquitto must be installed (apt-get install mosquitto)")
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service binary, with its log collected.
pub struct Service {
    child: Child,
    pub http: Option<String>,
    /// The admin listener (POST /infer, reloads).
    pub admin: Option<String>,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ai-edge-inference"))
}

impl Service {
    /// Starts `run` with `env` (HTTP on a free loopback port unless set).
    pub fn start(env: &[(&str, &str)]) -> Service {
        let mut cmd = binary();
        cmd.env_clear()
            .env("RUST_LOG", "info")
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("HTTP_ADMIN_ADDR", "127.0.0.1:0")
            .env("AIO_MQTT_CLIENT_ID", format!("aei-test-{}", free_port()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if std::env::var_os("AEI_TEST_LOG").is_some() {
                        eprintln!("service: {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut s = Service {
            child,
            http: None,
            admin: None,
            log,
        };
        let end = Instant::now() + DEADLINE;
        loop {
            let addr_after = |s: &Service, needle: &str| {
                s.log_line(needle).and_then(|l| {
                    l.split(needle)
                        .nth(1)
                        .and_then(|r| r.split(|c: char| c.is_whitespace() || c == ')').next())
                        .map(str::to_owned)
                })
            };
            if let Some(addr) = addr_after(&s, "HTTP listening on http://") {
                s.http = Some(addr);
            }
            if let Some(addr) = addr_after(&s, "HTTP admin listening on http://") {
                s.admin = Some(addr);
            }
            if s.log_line("ready: ").is_some() {
                return s;
            }
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!(
                    "service exited with {status} at start-up:\n{}",
                    s.log.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < end,
                "service did not start:\n{}",
                s.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_log(&self, needle: &str) -> String {
        wait_for(&format!("`{needle}` in the log"), || self.log_line(needle).is_some());
        self.log_line(needle).unwrap()
    }

    pub fn log_line(&self, needle: &str) -> Option<String> {
        self.log.lock().unwrap().iter().find(|l| l.contains(needle)).cloned()
    }

    pub fn http(&self) -> &str {
        self.http.as_deref().expect("HTTP is on")
    }

    pub fn admin(&self) -> &str {
        self.admin.as_deref().expect("the HTTP admin listener is on")
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let (s, b) = http_request(self.http(), "GET", path, &[]);
        (s, String::from_utf8_lossy(&b).into_owned())
    }

    pub fn wait_ready(&self) {
        wait_for("/readyz = 200", || self.get("/readyz").0 == 200);
    }

    /// A metric's value from `/metrics` (the line that starts with `series `).
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    /// Sends a signal (e.g. "HUP") to the service process.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -s {name}");
    }

    /// Waits for the process to exit on its own; panics after `DEADLINE`.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "the service did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http_request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http_request_with(addr, method, path, &[], body)
}

/// `http_request` with extra headers.
pub fn http_request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    // The server may answer (413) before reading the whole body.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response head");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = resp[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn json(&self) -> miniserde::json::Value {
        miniserde::json::from_str(std::str::from_utf8(&self.payload).unwrap()).unwrap()
    }
}

/// An MQTT test client that records everything it receives.
pub struct Peer {
    pub client: Client,
    pub received: Arc<Mutex<Vec<Msg>>>,
    connected: Arc<Mutex<bool>>,
}

impl Peer {
    pub fn connect(port: u16, subscribe: &[&str]) -> Peer {
        let opts = MqttOptions::new(format!("peer-{}", free_port()), "127.0.0.1", port);
        Peer::connect_with(opts, subscribe)
    }

    /// A peer whose session (and QoS 1 messages in flight either way) survives
    /// broker restarts.
    pub fn connect_persistent(port: u16, subscribe: &[&str]) -> Peer {
        let mut opts = MqttOptions::new(format!("peer-{}", free_port()), "127.0.0.1", port);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(600));
        Peer::connect_with(opts, subscribe)
    }

    pub fn connect_with(mut opts: MqttOptions, subscribe: &[&str]) -> Peer {
        opts.set_max_packet_size(Some(64 << 20));
        let (client, mut conn) = Client::new(opts, 1024);
        let received = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(Mutex::new(false));
        let subs: Vec<String> = subscribe.iter().map(|s| s.to_string()).collect();
        {
            let received = received.clone();
            let connected = connected.clone();
            let client = client.clone();
            std::thread::spawn(move || {
                for ev in conn.iter() {
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            for s in &subs {
                                client.try_subscribe(s.as_str(), QoS::AtLeastOnce).unwrap();
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => *connected.lock().unwrap() = true,
                        Ok(Event::Incoming(Packet::Publish(p))) => received.lock().unwrap().push(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        }),
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
        }
        if subscribe.is_empty() {
            *connected.lock().unwrap() = true;
        }
        let peer = Peer {
            client,
            received,
            connected,
        };
        wait_for("test client to subscribe", || *peer.connected.lock().unwrap());
        peer
    }

    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).unwrap();
    }

    /// Waits until `pred` holds for the received messages, then returns them.
    pub fn wait_until(&self, what: &str, pred: impl Fn(&[Msg]) -> bool) -> Vec<Msg> {
        let end = Instant::now() + DEADLINE;
        loop {
            {
                let r = self.received.lock().unwrap();
                if pred(&r) {
                    return r.clone();
                }
                assert!(
                    Instant::now() < end,
                    "timed out waiting for {what}; got {} messages:\n{}",
                    r.len(),
                    r.iter()
                        .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Field lookup in a miniserde JSON value by path.
pub fn get<'v>(v: &'v miniserde::json::Value, path: &[&str]) -> Option<&'v miniserde::json::Value> {
    let mut cur = v;
    for k in path {
        match cur {
            miniserde::json::Value::Object(o) => cur = o.get(*k)?,
            _ => return None,
        }
    }
    Some(cur)
}

pub fn get_str(v: &miniserde::json::Value, path: &[&str]) -> Option<String> {
    match get(v, path)? {
        miniserde::json::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

pub fn get_bool(v: &miniserde::json::Value, path: &[&str]) -> Option<bool> {
    match get(v, path)? {
        miniserde::json::Value::Bool(b) => Some(*b),
        _ => None,
    }
}

pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Counts of messages per key.
pub fn count_by<K: std::hash::Hash + Eq>(msgs: &[Msg], key: impl Fn(&Msg) -> Option<K>) -> HashMap<K, usize> {
    let mut m = HashMap::new();
    for msg in msgs {
        if let Some(k) = key(msg) {
            *m.entry(k).or_insert(0) += 1;
        }
    }
    m
}

/// An `image_snapshot` envelope with its JPEG already in base64 (streams
/// of thousands of frames encode it once).
pub fn snapshot_b64(camera: &str, corr: &str, jpeg_b64: &str) -> Vec<u8> {
    format!(
        r#"{{"message_type":"image_snapshot","schema_version":"1.0","camera_id":"{camera}","timestamp":1795780800,"image_data":"{jpeg_b64}","correlation_id":"{corr}"}}"#
    )
    .into_bytes()
}

/// `correlation id -> result ids` over the results (on `result_topic`) and
/// error results (on `error_topic`) received: one id per frame means one answer.
pub fn answers(
    msgs: &[Msg],
    result_topic: &str,
    error_topic: &str,
) -> HashMap<String, std::collections::HashSet<String>> {
    let mut m: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for msg in msgs {
        let v = msg.json();
        let corr = if msg.topic == result_topic {
            get_str(&v, &["metadata", "source", "correlation_id"])
        } else if msg.topic == error_topic {
            get_str(&v, &["source", "correlation_id"])
        } else {
            None
        };
        if let (Some(c), Some(id)) = (corr, get_str(&v, &["result_id"])) {
            m.entry(c).or_default().insert(id);
        }
    }
    m
}
