//! Models reloaded without a restart: during a stream through a real
//! mosquitto no frame fails because of a swap; a changed YAML is picked up by
//! the watcher; a corrupt model file is refused and the old model answers.

mod support;

use std::time::{Duration, Instant};

use support::*;

const TOPIC: &str = "edge-ai/bu/site/gw/camera/snapshots";
const RESULTS: &str = "edge-ai/bu/site/gw/ai/inference/vision";
const ERRORS: &str = "edge-ai/services/svc/ai/errors";

fn snapshot(camera: &str, corr: &str, jpeg: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"message_type":"image_snapshot","schema_version":"1.0","camera_id":"{camera}","image_data":"{}","correlation_id":"{corr}"}}"#,
        base64(jpeg)
    )
    .into_bytes()
}

#[test]
fn reloads_during_a_stream_lose_no_frame_and_the_watcher_applies_yaml_changes() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let dir = TempDir::new("swap");
    let cfg = dir.write("health.yaml", "name: cam-health\nmodel_type: camera-health\n");
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("MODEL_WATCH_S", "1"),
        ("QUEUE_DEPTH", "32"),
    ]);
    let peer = Peer::connect(broker.port, &[RESULTS, ERRORS]);
    svc.wait_ready();
    let jpeg = fixture("chelsea.jpg");
    const N: usize = 120;
    let http = svc.admin().to_owned();
    let reloader = std::thread::spawn(move || {
        let mut ok = 0;
        for _ in 0..10 {
            if http_request(&http, "POST", "/models/cam-health/reload", b"").0 == 200 {
                ok += 1;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        ok
    });
    for i in 0..N {
        peer.publish(TOPIC, snapshot(&format!("cam-{}", i % 12), &format!("s{i}"), &jpeg));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(reloader.join().unwrap(), 10, "every reload succeeds");
    let corr = |m: &Msg| {
        let v = m.json();
        get_str(&v, &["metadata", "source", "correlation_id"]).or_else(|| get_str(&v, &["source", "correlation_id"]))
    };
    let got = peer.wait_until("an answer per frame", |m| m.iter().filter_map(corr).count() >= N);
    let answers = count_by(&got, corr);
    assert_eq!(answers.len(), N);
    assert!(answers.values().all(|n| *n == 1), "one answer per frame");
    let failed: Vec<String> = got
        .iter()
        .filter(|m| m.topic == ERRORS)
        .filter_map(|m| get_str(&m.json(), &["error"]))
        .filter(|e| e != "dropped")
        .collect();
    assert!(failed.is_empty(), "no frame fails because of a swap: {failed:?}");
    assert_eq!(svc.metric("aei_model_reloads_total"), 10.0);

    // Edit the YAML: every frame becomes "blurry"; the watcher reloads it by itself.
    std::thread::sleep(Duration::from_millis(1100)); // a modification time the watcher can tell apart
    std::fs::write(
        &cfg,
        "name: cam-health\nmodel_type: camera-health\nhealth: { blur_threshold: 1000000000 }\n",
    )
    .unwrap();
    let end = Instant::now() + DEADLINE;
    let mut i = 0;
    loop {
        let c = format!("after-edit-{i}");
        peer.publish(TOPIC, snapshot("cam-edit", &c, &jpeg));
        let got = peer.wait_until("its answer", |m| {
            m.iter().any(|m| corr(m).as_deref() == Some(c.as_str()))
        });
        let m = got.iter().find(|m| corr(m).as_deref() == Some(c.as_str())).unwrap();
        if get_bool(&m.json(), &["health", "blurry"]) == Some(true) {
            break;
        }
        assert!(Instant::now() < end, "the edited YAML was never applied");
        std::thread::sleep(Duration::from_millis(300));
        i += 1;
    }
    assert!(svc.metric("aei_model_reloads_total") >= 11.0);
    let (_, models) = svc.get("/models");
    assert!(
        models.contains("\"name\":\"cam-health\"") && models.contains("\"reload_error\":null"),
        "{models}"
    );
}

#[cfg(feature = "candle")]
#[test]
fn a_corrupt_model_file_is_refused_and_the_old_model_keeps_answering() {
    let dir = TempDir::new("corrupt");
    let weights = dir.0.join("lite0.safetensors");
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/efficientnet-lite0.safetensors"
    ))
    .unwrap();
    std::fs::write(&weights, &good).unwrap();
    let cfg = lite0_config(&dir, "lite0.safetensors");
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("MODEL_WATCH_S", "0"),
    ]);
    let top = |svc: &Service| top_label(svc.admin(), &fixture("coffee.jpg"));
    assert_eq!(top(&svc), "espresso");
    let hash_before = svc.get("/models").1;

    std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
    let (code, body) = http_request(svc.admin(), "POST", "/models/lite0/reload", b"");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("lite0.safetensors"), "names the file: {body}");
    assert_eq!(top(&svc), "espresso", "the old model keeps answering");
    let (_, models) = svc.get("/models");
    assert!(
        models.contains("\"reload_error\":\"") && !models.contains("\"reload_error\":null"),
        "{models}"
    );
    assert_eq!(svc.metric("aei_model_reload_failures_total"), 1.0);
    assert_eq!(svc.get("/readyz").0, 200, "still serving");

    std::fs::write(&weights, &good).unwrap();
    assert_eq!(http_request(svc.admin(), "POST", "/models/lite0/reload", b"").0, 200);
    assert!(svc.get("/models").1.contains("\"reload_error\":null"));
    assert_eq!(top(&svc), "espresso");
    assert_eq!(
        svc.get("/models").1.split("model_hash").nth(1).map(|s| &s[..20]),
        hash_before.split("model_hash").nth(1).map(|s| &s[..20]),
        "same file, same version"
    );
    assert_eq!(http_request(svc.admin(), "POST", "/models/nope/reload", b"").0, 404);
}

#[test]
fn sighup_reloads_every_model() {
    let dir = TempDir::new("hup");
    let cfg = dir.write("health.yaml", "name: cam-health\nmodel_type: camera-health\n");
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("MODEL_WATCH_S", "0"),
    ]);
    let blurry = |svc: &Service| {
        let (code, body) = http_request(svc.admin(), "POST", "/infer", &fixture("chelsea.jpg"));
        assert_eq!(code, 200);
        let v: miniserde::json::Value = miniserde::json::from_str(std::str::from_utf8(&body).unwrap()).unwrap();
        get_bool(&v, &["health", "blurry"]).unwrap()
    };
    assert!(!blurry(&svc));
    std::fs::write(
        &cfg,
        "name: cam-health\nmodel_type: camera-health\nhealth: { blur_threshold: 1000000000 }\n",
    )
    .unwrap();
    assert!(!blurry(&svc), "no watcher: nothing changes by itself");
    svc.signal("HUP");
    let end = Instant::now() + DEADLINE;
    while svc.metric("aei_model_reloads_total") < 1.0 {
        assert!(Instant::now() < end, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(blurry(&svc), "the edited config is live");
    assert!(svc.still_running());
}

/// A config dropped into the watched directory is loaded and its input
/// topic subscribed; a broken one is refused without harm; a removed one
/// stops being served and its topic is unsubscribed.
#[test]
fn configs_added_and_removed_at_run_time_change_models_and_subscriptions() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let dir = TempDir::new("configs");
    dir.write("a.yaml", "name: cam-a\nmodel_type: camera-health\n");
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", dir.0.to_str().unwrap()),
        ("MODEL_WATCH_S", "1"),
    ]);
    svc.wait_ready();
    let peer = Peer::connect(
        broker.port,
        &[RESULTS, "plant/+/health", "edge-ai/services/svc/ai/status"],
    );
    let jpeg = fixture("chelsea.jpg");

    dir.write(
        "b.yaml",
        "name: cam-b\nmodel_type: camera-health\nmqtt:\n  input_topics: [\"plant/{facility}/cam\"]\n  output_topic_template: \"plant/{facility}/health\"\n",
    );
    dir.write("broken.yaml", "name: [unclosed\n");
    wait_for("cam-b to be added", || {
        svc.get("/models").1.contains("\"name\":\"cam-b\"")
    });
    wait_for("the broken config to be refused", || {
        svc.log_line("broken.yaml: not added").is_some()
    });
    wait_for("the subscription for cam-b", || {
        svc.log_line("subscribing to [\"plant/+/cam\"]").is_some()
    });
    // The broker has the new subscription once our own message round-trips through it.
    let i = std::cell::Cell::new(0);
    peer.wait_until("a result from the added model", |m| {
        i.set(i.get() + 1);
        if i.get() % 25 == 1 {
            peer.publish("plant/f1/cam", jpeg.clone());
        }
        m.iter().any(|m| m.topic == "plant/f1/health")
    });
    let (code, ready) = svc.get("/readyz");
    assert_eq!(code, 200, "a refused file does not take the service down");
    assert!(ready.contains("broken.yaml") && ready.contains("not added"), "{ready}");
    // ... and the retained status says so.
    peer.wait_until("a status naming the broken file", |m| {
        m.iter().any(|m| {
            m.topic.ends_with("/status")
                && get_str(&m.json(), &["status"]).as_deref() == Some("online")
                && String::from_utf8_lossy(&m.payload).contains("broken.yaml")
        })
    });

    std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
    wait_for("cam-b to be removed", || {
        !svc.get("/models").1.contains("\"name\":\"cam-b\"")
    });
    wait_for("the unsubscribe", || {
        svc.log_line("unsubscribing from `plant/+/cam`").is_some()
    });
    // cam-a still answers.
    peer.publish(TOPIC, snapshot("cam-1", "after-removal", &jpeg));
    peer.wait_until("cam-a still answering", |m| {
        m.iter()
            .any(|m| m.topic == RESULTS && String::from_utf8_lossy(&m.payload).contains("after-removal"))
    });
}
