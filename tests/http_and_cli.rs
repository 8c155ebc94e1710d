//! The HTTP one-shot path and probes, the CLI jobs, and start-up errors.

mod support;

use support::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn http_probes_and_oneshot_infer() {
    let (_dir, health) = camera_health_config();
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MAX_PAYLOAD_BYTES", "200000"),
        ("MODEL_CONFIG_PATH", &health),
    ]);
    assert_eq!(svc.get("/healthz"), (200, "ok\n".to_owned()));
    let (code, body) = svc.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"enabled\":false") && body.contains("\"name\":\"camera-health\""),
        "{body}"
    );

    // Mutating endpoints live on the admin listener only, and probes on the read-only one.
    let (code, body) = http_request(svc.http(), "POST", "/infer", &fixture("astronaut.jpg"));
    assert_eq!(code, 404, "{}", text(&body));
    assert!(text(&body).contains("HTTP_ADMIN_ADDR"), "{}", text(&body));
    assert_eq!(
        http_request(svc.http(), "POST", "/models/camera-health/reload", b"").0,
        404
    );
    assert_eq!(http_request(svc.admin(), "GET", "/metrics", b"").0, 404);
    assert_ne!(svc.http(), svc.admin());

    let (code, body) = http_request(svc.admin(), "POST", "/infer", &fixture("astronaut.jpg"));
    assert_eq!(code, 200, "{}", text(&body));
    let v: miniserde::json::Value = miniserde::json::from_str(&text(&body)).unwrap();
    assert_eq!(get_str(&v, &["message_type"]).as_deref(), Some("camera_health"));
    assert_eq!(get_str(&v, &["metadata", "source", "form"]).as_deref(), Some("oneshot"));
    assert!(matches!(
        get(&v, &["health", "width"]),
        Some(miniserde::json::Value::Number(_))
    ));

    let (code, body) = http_request(
        svc.admin(),
        "POST",
        "/infer?model=camera-health",
        b"GIF89a\x01\x00\x01\x00",
    );
    assert_eq!(code, 422);
    assert!(text(&body).contains("\"error\":\"unknown_format\""), "{}", text(&body));
    assert!(text(&body).contains("it is a GIF"), "{}", text(&body));

    // A PNG is decoded now; a truncated one is a corrupt image.
    let (code, body) = http_request(
        svc.admin(),
        "POST",
        "/infer?model=camera-health",
        b"\x89PNG\r\n\x1a\nxxxx",
    );
    assert_eq!(code, 422);
    assert!(text(&body).contains("\"error\":\"corrupt_image\""), "{}", text(&body));

    let mut truncated = fixture("coffee.jpg");
    truncated.truncate(5000);
    let (code, body) = http_request(svc.admin(), "POST", "/infer", &truncated);
    assert_eq!(code, 422);
    assert!(text(&body).contains("\"error\":\"corrupt_jpeg\""), "{}", text(&body));

    let (code, _) = http_request(svc.admin(), "POST", "/infer", &fixture("rocket-1080p.jpg"));
    assert_eq!(code, 413);
    let (code, body) = http_request(svc.admin(), "POST", "/infer?model=nope", &fixture("astronaut.jpg"));
    assert_eq!(code, 404, "{}", text(&body));
    assert_eq!(http_request(svc.admin(), "GET", "/infer", b"").0, 405);
    assert_eq!(svc.get("/nowhere").0, 404);

    // Good frames after bad ones still work, and everything was counted.
    assert_eq!(
        http_request(svc.admin(), "POST", "/infer", &fixture("chelsea.jpg")).0,
        200
    );
    assert_eq!(svc.metric("aei_frames_failed_total{reason=\"unknown_format\"}"), 1.0);
    assert_eq!(svc.metric("aei_frames_failed_total{reason=\"corrupt_jpeg\"}"), 1.0);
    assert_eq!(svc.metric("aei_frames_failed_total{reason=\"payload_too_large\"}"), 1.0);
    assert_eq!(svc.metric("aei_frames_failed_total{reason=\"corrupt_image\"}"), 1.0);
    assert_eq!(svc.metric("aei_frames_received_total{form=\"oneshot\"}"), 5.0);
    let (_, metrics) = svc.get("/metrics");
    assert!(metrics.contains("aei_build_info{version=\"0.1.0\""), "{metrics}");
}

#[test]
fn cli_infer_prints_one_result_per_file() {
    let (_dir, health) = camera_health_config();
    let out = binary()
        .args(["infer", "tests/fixtures/astronaut.jpg", "tests/fixtures/black.jpg"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("MODEL_CONFIG_PATH", &health)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2);
    let black: miniserde::json::Value = miniserde::json::from_str(&lines[1]).unwrap();
    assert_eq!(get_bool(&black, &["health", "black_frame"]), Some(true));

    // A file that is not an image: an error result and a failing exit code.
    let out = binary()
        .args(["infer", "Cargo.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("\"error\":\"unknown_format\""),
        "{}",
        text(&out.stdout)
    );
}

/// A classifier's annotated picture: its top classes as a caption, the first line in the top
/// class's colour (the embedded EfficientNet-Lite0 of Candle builds, no files needed).
#[cfg(feature = "candle")]
#[test]
fn cli_infer_annotate_captions_a_classified_picture() {
    let dir = TempDir::new("annotate-default");
    let out = dir.0.join("cat.jpg");
    let o = binary()
        .args([
            "infer",
            "tests/fixtures/chelsea.jpg",
            "--annotate",
            out.to_str().unwrap(),
        ])
        .env_remove("MODEL_CONFIG_PATH")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let result: miniserde::json::Value = miniserde::json::from_str(&text(&o.stdout)).unwrap();
    let top = num(get(&result, &["predictions"])
        .and_then(|p| match p {
            miniserde::json::Value::Array(a) => a.first(),
            _ => None,
        })
        .and_then(|p| get(p, &["class_id"]))
        .unwrap()) as usize;
    let jpeg = std::fs::read(&out).unwrap();
    let mut rgb = vec![0u8; 1 << 22];
    let d = ai_edge_inference::decode::decode_into(&jpeg, &mut rgb, 1024, 1024).unwrap();
    assert_eq!((d.width, d.height), (451, 300), "the frame's own size");
    // The first caption line (8 px glyphs and a 1 px pad at this size) is mostly the top
    // class's colour, which the photo itself does not have there.
    let c = ai_edge_inference::annotate::colour(top);
    let mut orig = vec![0u8; 1 << 22];
    ai_edge_inference::decode::decode_into(&fixture("chelsea.jpg"), &mut orig, 1024, 1024).unwrap();
    let near = |b: &[u8], x: usize, y: usize| {
        let p = &b[(y * d.width as usize + x) * 3..][..3];
        p.iter().zip(c).all(|(&a, b)| (a as i32 - b as i32).abs() <= 48)
    };
    let area = || (0..10).flat_map(|y| (0..40).map(move |x| (x, y)));
    let drawn = area().filter(|&(x, y)| near(&rgb, x, y)).count();
    let was = area().filter(|&(x, y)| near(&orig, x, y)).count();
    assert!(
        drawn >= 160 && was < 40,
        "{drawn} of 400 caption pixels in {c:?} (the photo: {was})"
    );
    // A camera-health model draws nothing: a clear error, no file.
    let (_dir, health) = camera_health_config();
    let o = binary()
        .args([
            "infer",
            "tests/fixtures/chelsea.jpg",
            "--annotate",
            dir.0.join("h.jpg").to_str().unwrap(),
        ])
        .env("MODEL_CONFIG_PATH", &health)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--annotate is for classification and detection models"),
        "{}",
        text(&o.stderr)
    );
    assert!(!dir.0.join("h.jpg").exists());
}

#[test]
fn config_errors_name_file_key_and_expectation() {
    let dir = TempDir::new("badcfg");
    let bad = dir.write(
        "bad.yaml",
        "name: x\nmodel_type: object-detection\nmodel_path: m.onnx\ninference:\n  iou_threshold: 3\n",
    );
    let out = binary().args(["check-config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.yaml: `inference.iou_threshold`: expected a number in 0..=1, found 3"),
        "{err}"
    );

    let good = dir.write(
        "good.yaml",
        "name: gate\nmodel_type: camera-health\nhealth: { blur_threshold: 55 }\n",
    );
    let out = binary()
        .args(["check-config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("blur_threshold: 55"),
        "{}",
        text(&out.stdout)
    );

    // The service refuses to start on a bad config, with the same message.
    let out = binary()
        .env("MODEL_CONFIG_PATH", &bad)
        .env("HTTP_ADDR", "")
        .env("AIO_BROKER_HOSTNAME", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("`inference.iou_threshold`"),
        "{}",
        text(&out.stderr)
    );

    let out = binary()
        .env("QUEUE_DEPTH", "lots")
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("QUEUE_DEPTH (--queue-depth): expected a whole number"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_backend_missing_from_the_build_is_a_clear_startup_error() {
    let dir = TempDir::new("backend");
    // Pick a backend this build lacks; with both compiled in, ask Candle for what it cannot do.
    let (backend, file, want) = if !cfg!(feature = "onnx") {
        (
            "onnx",
            "yolo.onnx",
            "backend `onnx` is not compiled into this build (features: ",
        )
    } else if !cfg!(feature = "candle") {
        (
            "candle",
            "yolo.onnx",
            "backend `candle` is not compiled into this build (features: ",
        )
    } else {
        (
            "candle",
            "yolo.safetensors",
            "backend `candle`: model `det`: the native Candle architectures are classifiers",
        )
    };
    let want = want.to_owned();
    let cfg = dir.write(
        "m.yaml",
        &format!("name: det\nbackend: {backend}\nmodel_type: object-detection\nmodel_path: {file}\n"),
    );
    let out = binary()
        .env("MODEL_CONFIG_PATH", &cfg)
        .env("HTTP_ADDR", "")
        .env("AIO_BROKER_HOSTNAME", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "must fail at start-up, not panic");
    let err = text(&out.stderr);
    assert!(err.contains(&want), "{err}");
    if want.contains("not compiled") {
        assert!(err.contains(&format!("rebuild with `--features {backend}`")), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn help_and_version() {
    let out = binary().arg("--help").output().unwrap();
    let help = text(&out.stdout);
    for var in [
        "MODEL_CONFIG_PATH",
        "DEFAULT_BACKEND",
        "ENABLE_DUAL_BACKEND",
        "AIO_BROKER_HOSTNAME",
        "MQTT_INPUT_TOPICS",
        "HTTP_ADDR",
        "QUEUE_DEPTH",
        "MAX_PAYLOAD_BYTES",
        "GPU_ENABLED",
        "RUST_LOG",
    ] {
        assert!(help.contains(var), "--help must document {var}");
    }
    // The README's configuration table covers every option.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for o in ai_edge_inference::config::OPTIONS {
        assert!(
            readme.contains(&format!("`{}` | `{}`", o.env, o.flag)),
            "README must document {}",
            o.env
        );
        assert!(help.contains(o.env) && help.contains(o.flag));
    }
    // Each command's description follows its own line; the default model is named right.
    let model = help.find("bench model FILE").unwrap();
    let layouts = help.find("bench layouts").unwrap();
    assert!(help[model..layouts].contains("Time one model's backend"), "{help}");
    assert!(help.contains("embedded EfficientNet-Lite0"), "{help}");
    // A number flag that is not a number is an error, not a silent default.
    for args in [
        &["bench", "decode", "tests/fixtures/coffee.jpg", "--iters", "x"][..],
        &["bench", "decode", "tests/fixtures/coffee.jpg", "--size", "0"][..],
        &["bench", "model", "tests/fixtures/coffee.jpg", "--layers", "-1"][..],
    ] {
        let out = binary()
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("expected a whole number"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = binary().arg("--version").output().unwrap();
    assert!(
        text(&out.stdout).starts_with("ai-edge-inference 0.1.0 (commit "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn the_default_build_classifies_a_bundled_photo_out_of_the_box() {
    // No model config: Candle builds run the embedded EfficientNet-Lite0, others camera health.
    let out = binary()
        .args(["infer", "tests/fixtures/coffee.jpg"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("MODEL_CONFIG_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: miniserde::json::Value = miniserde::json::from_str(text(&out.stdout).trim()).unwrap();
    if cfg!(feature = "candle") {
        assert_eq!(get_str(&v, &["backend_used"]).as_deref(), Some("candle"));
        let Some(miniserde::json::Value::Array(p)) = get(&v, &["predictions"]) else {
            panic!()
        };
        assert_eq!(get_str(&p[0], &["label"]).as_deref(), Some("espresso"));
    } else {
        assert_eq!(get_str(&v, &["message_type"]).as_deref(), Some("camera_health"));
    }
}

#[test]
fn infer_needs_the_bearer_token_when_one_is_configured() {
    let (_dir, health) = camera_health_config();
    let secrets = TempDir::new("token");
    let token = secrets.write("token", "s3cret-1\n");
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", &health),
        ("HTTP_TOKEN_FILE", token.to_str().unwrap()),
    ]);
    let jpeg = fixture("chelsea.jpg");
    let post = |auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        http_request_with(svc.admin(), "POST", "/infer", &h, &jpeg).0
    };
    assert_eq!(post(None), 401);
    assert_eq!(post(Some("Bearer nope")), 401);
    assert_eq!(post(Some("Basic s3cret-1")), 401);
    assert_eq!(post(Some("Bearer s3cret-1")), 200);
    // Probes and metrics stay open.
    assert_eq!(svc.get("/healthz").0, 200);
    assert_eq!(svc.get("/metrics").0, 200);
    // A rotated token takes over without a restart.
    std::thread::sleep(std::time::Duration::from_millis(20)); // a new mtime
    std::fs::write(&token, "s3cret-2").unwrap();
    assert_eq!(post(Some("Bearer s3cret-1")), 401);
    assert_eq!(post(Some("Bearer s3cret-2")), 200);

    // An unreadable token file is a start-up error, not an open door.
    let out = binary()
        .env("MODEL_CONFIG_PATH", &health)
        .env("AIO_BROKER_HOSTNAME", "")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("HTTP_TOKEN_FILE", "/nonexistent/token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("HTTP_TOKEN_FILE /nonexistent/token"),
        "{}",
        text(&out.stderr)
    );
}
