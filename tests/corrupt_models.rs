//! The real model files, truncated and with bits flipped at many offsets,
//! loaded the way a start or a hot reload loads them (parse, compile, warm
//! up): each must load or be refused with a reason, never panic. The service
//! side (refused on reload, the old model answering) is in `hot_swap.rs`.
//!
//! Needs the files `models/fetch` caches (YOLOv12n and EfficientNet-Lite0 as
//! ONNX and `.pth`) and, for the ONNX Runtime cases, its library.
#![cfg(any(feature = "candle", feature = "onnx"))]

mod support;

use ai_edge_inference::config::model;
use ai_edge_inference::models::Models;
use support::*;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Truncations and single-bit flips of `bytes`: spread over the file and
/// dense in its first and last 4 KiB, where containers keep their structure.
fn variants(bytes: &[u8], seed: u64, n: usize) -> Vec<(String, Vec<u8>)> {
    let len = bytes.len();
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for cut in [0, 1, 7, 64, 1000, len / 3, len / 2, len - 1000, len - 8, len - 1] {
        out.push((format!("truncated to {cut}"), bytes[..cut.min(len)].to_vec()));
    }
    for i in 0..n {
        let at = match i % 3 {
            0 => rng.below(4096.min(len)),
            1 => len - 1 - rng.below(4096.min(len)),
            _ => i * len / n,
        };
        let bit = rng.below(8);
        let mut v = bytes.to_vec();
        v[at] ^= 1 << bit;
        out.push((format!("bit {bit} flipped at {at}"), v));
    }
    out
}

/// Loads every variant of `file` through `config` (its `model_path` swapped).
fn sweep(config: &str, file: &str, n: usize) {
    let settings = settings();
    let dir = TempDir::new("corrupt");
    let mut cfg = model::load_file(&root().join("models").join(config), &settings).unwrap();
    let src = source(file);
    let Ok(bytes) = std::fs::read(&src) else {
        panic!("{} is missing: run `bash models/fetch` first", src.display())
    };
    let target = dir.0.join(file);
    cfg.model_path = Some(target.clone());
    let (mut loaded, mut refused) = (0, 0);
    for (what, v) in variants(&bytes, 0x5EED ^ bytes.len() as u64, n) {
        std::fs::write(&target, &v).unwrap();
        let models = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Models::load(vec![cfg.clone()], &backend_env())
        }))
        .unwrap_or_else(|_| panic!("{config} with {file} {what}: panicked"));
        match models.failed.first() {
            Some(f) => {
                let reason = f.to_string();
                assert!(reason.len() > cfg.name.len() + 10, "{what}: a reason, not `{reason}`");
                refused += 1;
            }
            None => loaded += 1,
        }
    }
    println!("{config} on {file}: {loaded} variants loaded, {refused} refused with a reason");
    assert!(refused > 0, "truncations must be refused");
}

/// A model file: fetched into `models/.cache`, or bundled in `models/`.
fn source(file: &str) -> std::path::PathBuf {
    let cached = root().join("models/.cache").join(file);
    if cached.exists() {
        cached
    } else {
        root().join("models").join(file)
    }
}

#[cfg(feature = "candle")]
fn have(file: &str) -> bool {
    source(file).exists()
}

#[test]
#[cfg(feature = "candle-graph")]
fn corrupt_yolov12n_on_candle_is_refused_not_a_crash() {
    assert!(have("yolov12n.onnx"), "run `bash models/fetch`");
    sweep("yolov12n-candle.yaml", "yolov12n.onnx", 90);
}

#[test]
#[cfg(feature = "candle")]
fn corrupt_efficientnet_checkpoints_on_candle_are_refused_not_a_crash() {
    assert!(have("efficientnet-lite0.pth"), "run `bash models/fetch`");
    sweep("efficientnet-lite0-candle.yaml", "efficientnet-lite0.pth", 90);
    sweep("efficientnet-lite0-candle.yaml", "efficientnet-lite0.safetensors", 60);
}

#[test]
#[cfg(feature = "onnx")]
fn corrupt_onnx_files_on_onnx_runtime_are_refused_not_a_crash() {
    sweep("yolov12n.yaml", "yolov12n.onnx", 45);
    sweep("efficientnet-lite0.yaml", "efficientnet-lite0.onnx", 45);
}

/// Through the running service: each corrupt version of the real checkpoint is
/// hot-reloaded; a refused one answers 422 with a reason and the old model
/// keeps answering, and the service never goes down.
#[test]
#[cfg(feature = "candle")]
fn corrupt_checkpoints_hot_reloaded_into_the_service_are_refused_and_the_old_model_serves() {
    let good = std::fs::read(source("efficientnet-lite0.pth")).expect("run `bash models/fetch`");
    let dir = TempDir::new("corrupt-reload");
    let weights = dir.0.join("lite0.pth");
    std::fs::write(&weights, &good).unwrap();
    let cfg = lite0_config(&dir, "lite0.pth");
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("MODEL_WATCH_S", "0"),
    ]);
    let top = |svc: &Service| top_label(svc.admin(), &fixture("coffee.jpg"));
    assert_eq!(top(&svc), "espresso");
    let (mut refused, mut loaded) = (0, 0);
    for (what, v) in variants(&good, 0xC0FFEE, 24) {
        std::fs::write(&weights, &v).unwrap();
        let (code, body) = http_request(svc.admin(), "POST", "/models/lite0/reload", b"");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(svc.still_running(), "{what}: the service died");
        match code {
            422 => {
                assert!(
                    body.contains("lite0.pth") && body.len() > 40,
                    "{what}: a reason: {body}"
                );
                assert_eq!(top(&svc), "espresso", "{what}: the old model keeps answering");
                refused += 1;
            }
            200 => {
                // A flipped bit in a weight loads; put the good file back for the next round.
                std::fs::write(&weights, &good).unwrap();
                assert_eq!(http_request(svc.admin(), "POST", "/models/lite0/reload", b"").0, 200);
                loaded += 1;
            }
            other => panic!("{what}: reload answered {other}: {body}"),
        }
        assert_eq!(svc.get("/healthz").0, 200);
    }
    println!("hot reloads of corrupt checkpoints: {refused} refused with a reason, {loaded} loaded");
    assert!(refused >= 10, "{refused}");
    assert_eq!(svc.metric("aei_model_reload_failures_total"), refused as f64);
}
