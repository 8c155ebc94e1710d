//! A GPU asked for on a machine that cannot give one: never a silent CPU run. This machine has
//! no NVIDIA driver, which is a real "GPU unavailable" case for every build: without the `cuda`
//! feature Candle has no GPU path, with it (the `gpu` profile) cudarc finds no libcuda; the
//! ONNX Runtime library `models/fetch` gives is the CPU build, without the CUDA and TensorRT
//! providers. Under `fallback` the model serves on the CPU and says so in `/readyz`, `/models`,
//! `/metrics`, and every result (HTTP and MQTT); under `require` it is refused with the reason
//! while the others serve; without GPU_ENABLED nothing is asked for and nothing is flagged.
#![cfg(feature = "candle")]

mod support;

use miniserde::json::Value;
use support::*;

const TOPIC: &str = "edge-ai/acme/plant-1/gw-1/camera/snapshots";
const RESULTS: &str = "edge-ai/acme/plant-1/gw-1/ai/inference/vision";

/// Why Candle cannot use a GPU in this build, as the fallback reason starts or contains.
fn candle_reason() -> &'static str {
    if cfg!(feature = "cuda") {
        "the NVIDIA driver (libcuda.so)"
    } else {
        "this build has no CUDA support"
    }
}

fn lite0(dir: &TempDir, name: &str, inference: &str) {
    dir.write(
        &format!("{name}.yaml"),
        &format!(
            "name: {name}\nbackend: candle\nmodel_type: image-classification\nmodel_path: embedded:efficientnet-lite0\n\
             labels: {}/models/imagenet-labels.txt\npreprocessing: {{ resize: [224, 224], mode: center-crop, resize_short: 256, \
             normalize: false, mean: [127, 127, 127], std: [128, 128, 128] }}\ninference: {{ {inference} }}\n",
            root().display()
        ),
    );
}

fn json(text: &str) -> Value {
    miniserde::json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The entry of `name` in a JSON array of models (`/models`, `/readyz`'s `models`).
fn entry<'v>(list: &'v Value, name: &str) -> &'v Value {
    let Value::Array(items) = list else {
        panic!("not a list: {list:?}")
    };
    items
        .iter()
        .find(|m| get_str(m, &["name"]).as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no model `{name}` in {list:?}"))
}

fn infer(s: &Service, model: &str) -> Value {
    let (code, body) = http_request(
        s.admin(),
        "POST",
        &format!("/infer?model={model}"),
        &fixture("coffee.jpg"),
    );
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 200, "{text}");
    json(&text)
}

#[test]
fn fallback_runs_on_the_cpu_and_says_so_everywhere_require_refuses_and_the_others_serve() {
    let broker = Broker::start();
    let dir = TempDir::new("gpu-policy");
    lite0(&dir, "wants-gpu", "gpu_enabled: true, gpu_device: 0");
    lite0(&dir, "needs-gpu", "gpu_enabled: true, gpu_policy: require");
    lite0(&dir, "cpu-only", "gpu_enabled: false");
    let port = broker.port.to_string();
    let s = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("MODEL_CONFIG_PATH", dir.0.to_str().unwrap()),
        ("GPU_ENABLED", "true"),
        ("MODEL_WATCH_S", "0"),
    ]);
    let warning = s.wait_log("model `wants-gpu`: a GPU was asked for but cannot be used");
    assert!(warning.contains(candle_reason()), "{warning}");

    // /readyz: not ready (one model refused), the refusal names the policy and the reason.
    let (code, body) = s.get("/readyz");
    assert_eq!(code, 503, "{body}");
    let ready = json(&body);
    let models = get(&ready, &["models"]).unwrap();
    let wants = entry(models, "wants-gpu");
    assert_eq!(get_str(wants, &["device"]).as_deref(), Some("cpu"));
    assert!(get_str(wants, &["gpu_fallback"]).unwrap().contains(candle_reason()));
    assert_eq!(get_bool(wants, &["ready"]), Some(true));
    let cpu = entry(models, "cpu-only");
    assert_eq!(get_str(cpu, &["device"]).as_deref(), Some("cpu"));
    assert!(
        matches!(get(cpu, &["gpu_fallback"]), None | Some(Value::Null)),
        "{cpu:?}"
    );
    let needs = entry(models, "needs-gpu");
    assert_eq!(get_bool(needs, &["ready"]), Some(false));
    let error = get_str(needs, &["error"]).unwrap();
    assert!(
        error.contains("the GPU policy is `require`") && error.contains(candle_reason()),
        "{error}"
    );

    // /models: only the serving ones, with their device.
    let (_, body) = s.get("/models");
    let list = json(&body);
    assert!(get_str(entry(&list, "wants-gpu"), &["gpu_fallback"])
        .unwrap()
        .contains(candle_reason()));
    assert_eq!(get_str(entry(&list, "cpu-only"), &["device"]).as_deref(), Some("cpu"));

    // /metrics: the fallback is a series of its own, with the reason; the CPU model has none.
    let (_, text) = s.get("/metrics");
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("aei_model_gpu_fallback{"))
        .collect();
    assert_eq!(series.len(), 1, "{series:?}");
    assert!(
        series[0].contains("model=\"wants-gpu\"") && series[0].contains("device=\"cpu\"") && series[0].ends_with(" 1")
    );
    assert!(series[0].contains(candle_reason()), "{}", series[0]);
    assert!(text.contains("aei_model_ready{model=\"wants-gpu\",backend=\"candle\",type=\"image-classification\",provider=\"cpu\",device=\"cpu\"} 1"));

    // Results: the fallen-back model's say so and are still inferred; the CPU model's are plain.
    let r = infer(&s, "wants-gpu");
    assert_eq!(
        get_str(&r, &["backend_used"]).as_deref(),
        Some("candle:cpu:gpu_fallback")
    );
    assert_eq!(get_str(&r, &["metadata", "device"]).as_deref(), Some("cpu"));
    assert!(get_str(&r, &["metadata", "gpu_fallback"])
        .unwrap()
        .contains(candle_reason()));
    let Some(Value::Array(p)) = get(&r, &["predictions"]) else {
        panic!("{r:?}")
    };
    assert_eq!(get_str(&p[0], &["label"]).as_deref(), Some("espresso"));
    let r = infer(&s, "cpu-only");
    assert_eq!(get_str(&r, &["backend_used"]).as_deref(), Some("candle"));
    assert!(get(&r, &["metadata", "gpu_fallback"]).is_none(), "{r:?}");

    // And over MQTT, where the models listen.
    let peer = Peer::connect(broker.port, &[RESULTS]);
    peer.publish(TOPIC, fixture("coffee.jpg"));
    let msgs = peer.wait_until("both serving models' results", |m| {
        m.iter().filter(|m| m.topic == RESULTS).count() >= 2
    });
    let by_model = |name: &str| {
        msgs.iter()
            .map(Msg::json)
            .find(|v| get_str(v, &["model_name"]).as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no result of {name}"))
    };
    let v = by_model("wants-gpu");
    assert_eq!(
        get_str(&v, &["backend_used"]).as_deref(),
        Some("candle:cpu:gpu_fallback")
    );
    assert!(get_str(&v, &["metadata", "gpu_fallback"]).is_some());
    assert_eq!(
        get_str(&by_model("cpu-only"), &["backend_used"]).as_deref(),
        Some("candle")
    );
}

#[test]
fn without_gpu_enabled_no_gpu_is_asked_for_and_nothing_is_flagged() {
    let dir = TempDir::new("gpu-off");
    // The model asks; GPU_ENABLED (default false) forbids, so nothing falls back.
    lite0(&dir, "m", "gpu_enabled: true, gpu_policy: require");
    let s = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", dir.0.to_str().unwrap()),
        ("MODEL_WATCH_S", "0"),
    ]);
    s.wait_ready();
    let (_, text) = s.get("/metrics");
    assert!(!text.contains("aei_model_gpu_fallback{"), "{text}");
    let r = infer(&s, "m");
    assert_eq!(get_str(&r, &["backend_used"]).as_deref(), Some("candle"));
    assert_eq!(get_str(&r, &["metadata", "device"]).as_deref(), Some("cpu"));
    assert!(s.log_line("a GPU was asked for").is_none());
}

#[test]
fn gpu_settings_are_checked_at_start_up() {
    let out = binary()
        .env_clear()
        .env("GPU_POLICY", "maybe")
        .args(["check-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("GPU_POLICY (--gpu-policy): expected fallback or require, found `maybe`"),
        "{err}"
    );
    let dir = TempDir::new("gpu-bad");
    lite0(&dir, "m", "gpu_policy: sometimes");
    let out = binary()
        .env_clear()
        .env("MODEL_CONFIG_PATH", dir.0.to_str().unwrap())
        .args(["check-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("inference.gpu_policy") && err.contains("require, fallback"),
        "{err}"
    );
}

/// ONNX Runtime: the CPU library has neither GPU provider; each is named with why, and the
/// policy decides as for Candle.
#[cfg(feature = "onnx")]
#[test]
fn onnx_runtime_names_each_missing_provider_and_follows_the_policy() {
    let dir = TempDir::new("gpu-ort");
    let model = root().join("models/.cache/efficientnet-lite0.onnx");
    for (name, policy) in [("ort-fallback", "fallback"), ("ort-require", "require")] {
        dir.write(
            &format!("{name}.yaml"),
            &format!(
                "name: {name}\nbackend: onnx\nmodel_type: image-classification\nmodel_path: {}\n\
                 labels: {}/models/imagenet-labels.txt\npreprocessing: {{ resize: [224, 224], mode: center-crop, resize_short: 256, \
                 normalize: false, mean: [127, 127, 127], std: [128, 128, 128] }}\n\
                 inference: {{ gpu_enabled: true, gpu_policy: {policy}, execution_providers: [tensorrt, cuda, cpu], \
                 gpu_memory_limit_mb: 512, tensorrt_fp16: true, tensorrt_engine_cache: trt-cache }}\n",
                model.display(),
                root().display()
            ),
        );
    }
    let ort = ort_library();
    let s = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", dir.0.to_str().unwrap()),
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ("GPU_ENABLED", "true"),
        ("MODEL_WATCH_S", "0"),
    ]);
    let (_, body) = s.get("/readyz");
    let ready = json(&body);
    let models = get(&ready, &["models"]).unwrap();
    let why = get_str(entry(models, "ort-fallback"), &["gpu_fallback"]).unwrap();
    assert!(
        why.contains("tensorrt: not in this ONNX Runtime library")
            && why.contains("cuda: not in this ONNX Runtime library"),
        "{why}"
    );
    let error = get_str(entry(models, "ort-require"), &["error"]).unwrap();
    assert!(
        error.contains("`require`") && error.contains("cuda: not in this ONNX Runtime library"),
        "{error}"
    );
    let r = infer(&s, "ort-fallback");
    assert_eq!(get_str(&r, &["backend_used"]).as_deref(), Some("onnx:cpu:gpu_fallback"));
    assert!(get_str(&r, &["metadata", "gpu_fallback"]).unwrap().contains("tensorrt"));
}
