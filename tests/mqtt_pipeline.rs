//! End to end through a real mosquitto: all three payload forms, every kind
//! of malformed input, drop-oldest under a burst, broker restarts, metrics
//! checked by Prometheus' own linter.

mod support;

use std::process::Command;

use support::*;

const GOOD_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/camera/snapshots";
const RESULT_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/ai/inference/vision";
const ERROR_TOPIC: &str = "edge-ai/services/svc/ai/errors";

fn models_dir() -> TempDir {
    let dir = TempDir::new("models");
    dir.write("edge.yaml", "name: camera-health\nmodel_type: camera-health\n");
    dir.write(
        "aio.yaml",
        "name: dock-health\nmodel_type: camera-health\nmqtt:\n  input_topics: [\"azure-iot-operations/data/+/+\"]\n  output_topic_template: \"azure-iot-operations/data/{asset}/{stream}/ai/health\"\n",
    );
    dir
}

fn design(device: &str, jpeg: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"device_id":"{device}","timestamp":"2026-11-27T10:00:00Z","image_data":"{}","metadata":{{"line":"L2"}}}}"#,
        base64(jpeg)
    )
    .into_bytes()
}

fn snapshot(camera: &str, corr: &str, jpeg: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"message_type":"image_snapshot","schema_version":"1.0","camera_id":"{camera}","device_name":"dock","timestamp":1795780800,"image_data":"{}","correlation_id":"{corr}","location":{{"zone":"A"}}}}"#,
        base64(jpeg)
    )
    .into_bytes()
}

fn is_result_for(m: &Msg, topic: &str, device: &str) -> bool {
    m.topic == topic && get_str(&m.json(), &["device_id"]).as_deref() == Some(device)
}

fn error_on(m: &Msg, source_topic: &str) -> Option<String> {
    if m.topic != ERROR_TOPIC {
        return None;
    }
    let v = m.json();
    (get_str(&v, &["source", "topic"]).as_deref() == Some(source_topic)).then(|| get_str(&v, &["error"]).unwrap())
}

#[test]
fn every_form_is_answered_and_bad_input_never_stops_good_frames() {
    let broker = Broker::start();
    let models = models_dir();
    let port = broker.port.to_string();
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", models.0.to_str().unwrap()),
        ("MAX_PAYLOAD_BYTES", "400000"),
        ("MAX_IMAGE_WIDTH", "1024"),
        ("MAX_IMAGE_HEIGHT", "1024"),
    ]);
    let peer = Peer::connect(broker.port, &["#"]);
    svc.wait_ready();

    // The retained status says online.
    let msgs = peer.wait_until("online status", |m| {
        m.iter().any(|m| m.topic == "edge-ai/services/svc/ai/status")
    });
    let status = msgs
        .iter()
        .find(|m| m.topic == "edge-ai/services/svc/ai/status")
        .unwrap();
    assert_eq!(get_str(&status.json(), &["status"]).as_deref(), Some("online"));

    let astronaut = fixture("astronaut.jpg");
    let mut truncated = astronaut.clone();
    truncated.truncate(astronaut.len() * 2 / 5);
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0".to_vec();
    let mut oversize = vec![0xFF, 0xD8];
    oversize.resize(500_000, 0x42);

    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad-json",
            b"{\"device_id\": \"cam\", \"image_data\": ".to_vec(),
            "bad_json",
        ),
        (
            "bad-base64",
            br#"{"device_id":"cam","image_data":"!!not*base64!!"}"#.to_vec(),
            "bad_base64",
        ),
        (
            "no-image",
            br#"{"device_id":"cam","timestamp":"t"}"#.to_vec(),
            "bad_envelope",
        ),
        (
            "bad-schema",
            br#"{"message_type":"image_snapshot","schema_version":"2.0","camera_id":"c","image_data":"AAAA"}"#.to_vec(),
            "bad_envelope",
        ),
        ("png-header-only", png.clone(), "corrupt_image"),
        ("base64-png-header-only", design("cam", &png), "corrupt_image"),
        ("gif", b"GIF89a\x01\x00\x01\x00".to_vec(), "unknown_format"),
        ("garbage", b"hello, broker".to_vec(), "unknown_format"),
        ("empty", Vec::new(), "unknown_format"),
        ("truncated", truncated, "corrupt_jpeg"),
        ("oversize", oversize, "payload_too_large"),
        ("too-wide", fixture("rocket-1080p.jpg"), "image_too_large"),
    ];
    for (i, (case, payload, want)) in bad.iter().enumerate() {
        let topic = format!("edge-ai/bu1/plant-7/{case}/camera/snapshots");
        peer.publish(&topic, payload.clone());
        let got = peer.wait_until(&format!("error result for {case}"), |m| {
            m.iter().any(|m| error_on(m, &topic).is_some())
        });
        let errors: Vec<String> = got.iter().filter_map(|m| error_on(m, &topic)).collect();
        assert_eq!(errors, [want.to_string()], "{case}");

        // A good frame right after each bad one still gets its result.
        let device = format!("good-{i}");
        peer.publish(GOOD_TOPIC, design(&device, &astronaut));
        peer.wait_until(&format!("result for {device}"), |m| {
            m.iter().any(|m| is_result_for(m, RESULT_TOPIC, &device))
        });
    }

    // The image_snapshot form: correlation id and location echoed.
    peer.publish(GOOD_TOPIC, snapshot("cam-snap", "corr-42", &fixture("coffee.jpg")));
    let got = peer.wait_until("snapshot result", |m| {
        m.iter().any(|m| is_result_for(m, RESULT_TOPIC, "cam-snap"))
    });
    let v = got
        .iter()
        .find(|m| is_result_for(m, RESULT_TOPIC, "cam-snap"))
        .unwrap()
        .json();
    assert_eq!(get_str(&v, &["message_type"]).as_deref(), Some("camera_health"));
    assert_eq!(
        get_str(&v, &["metadata", "source", "correlation_id"]).as_deref(),
        Some("corr-42")
    );
    assert_eq!(
        get_str(&v, &["metadata", "source", "location", "zone"]).as_deref(),
        Some("A")
    );
    assert_eq!(
        get_str(&v, &["metadata", "source", "form"]).as_deref(),
        Some("image_snapshot")
    );

    // Raw JPEG on the AIO Media Connector topic: device from the topic, own output template.
    peer.publish("azure-iot-operations/data/dock-cam/snapshot", fixture("chelsea.jpg"));
    let aio_out = "azure-iot-operations/data/dock-cam/snapshot/ai/health";
    let got = peer.wait_until("AIO result", |m| {
        m.iter().any(|m| is_result_for(m, aio_out, "dock-cam"))
    });
    let v = got.iter().find(|m| m.topic == aio_out).unwrap().json();
    assert_eq!(get_str(&v, &["model_name"]).as_deref(), Some("dock-health"));
    assert_eq!(
        get_str(&v, &["metadata", "source", "form"]).as_deref(),
        Some("raw_jpeg")
    );

    // Raw JPEG on an edge-ai topic; then the very same frame again is frozen.
    peer.publish(GOOD_TOPIC, fixture("chelsea.jpg"));
    peer.wait_until("raw result", |m| {
        m.iter().filter(|m| is_result_for(m, RESULT_TOPIC, GOOD_TOPIC)).count() == 1
    });
    peer.publish(GOOD_TOPIC, fixture("chelsea.jpg"));
    let got = peer.wait_until("frozen result", |m| {
        m.iter().filter(|m| is_result_for(m, RESULT_TOPIC, GOOD_TOPIC)).count() == 2
    });
    let frozen: Vec<bool> = got
        .iter()
        .filter(|m| is_result_for(m, RESULT_TOPIC, GOOD_TOPIC))
        .map(|m| get_bool(&m.json(), &["health", "frozen"]).unwrap())
        .collect();
    assert_eq!(frozen, [false, true]);

    // A black frame raises an alert.
    peer.publish(GOOD_TOPIC, design("cam-black", &fixture("black.jpg")));
    let got = peer.wait_until("black result", |m| {
        m.iter().any(|m| is_result_for(m, RESULT_TOPIC, "cam-black"))
    });
    let v = got
        .iter()
        .find(|m| is_result_for(m, RESULT_TOPIC, "cam-black"))
        .unwrap()
        .json();
    assert_eq!(get_bool(&v, &["health", "black_frame"]), Some(true));
    assert_eq!(get_bool(&v, &["metadata", "alert_triggered"]), Some(true));

    // Metrics count every failure by reason, and pass promtool's linter.
    for (reason, n) in [
        ("bad_json", 1.0),
        ("bad_base64", 1.0),
        ("bad_envelope", 2.0),
        ("unknown_format", 3.0),
        ("corrupt_image", 2.0),
        ("corrupt_jpeg", 1.0),
        ("payload_too_large", 1.0),
        ("image_too_large", 1.0),
    ] {
        assert_eq!(
            svc.metric(&format!("aei_frames_failed_total{{reason=\"{reason}\"}}")),
            n,
            "{reason}"
        );
    }
    assert_eq!(svc.metric("aei_frames_received_total{form=\"raw_jpeg\"}"), 9.0);
    assert_eq!(svc.metric("aei_frames_received_total{form=\"image_snapshot\"}"), 1.0);
    assert_eq!(svc.metric("aei_mqtt_connected"), 1.0);
    assert_eq!(
        svc.metric("aei_messages_published_total{kind=\"error\"}"),
        bad.len() as f64
    );
    // Per camera, for the camera-silent and camera-frozen alerting rules: the frozen camera
    // and the black one say so, and their latest frame's time is now.
    // (Raw JPEGs carry no device id: the topic names the camera.)
    let frozen_device = GOOD_TOPIC;
    assert_eq!(
        svc.metric(&format!("aei_camera_frozen{{device=\"{frozen_device}\"}}")),
        1.0
    );
    assert_eq!(
        svc.metric(&format!("aei_camera_black{{device=\"{frozen_device}\"}}")),
        0.0
    );
    assert_eq!(svc.metric("aei_camera_black{device=\"cam-black\"}"), 1.0);
    assert_eq!(svc.metric("aei_camera_frozen{device=\"cam-black\"}"), 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = svc.metric("aei_camera_last_frame_timestamp_seconds{device=\"cam-black\"}");
    assert!((now - last).abs() < 60.0, "last frame at {last}, now {now}");
    let (_, text) = svc.get("/metrics");
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (apt-get install prometheus)");
    std::io::Write::write_all(lint.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(svc.still_running());
}

#[test]
fn a_burst_drops_the_oldest_waiting_frames_and_answers_every_one() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let (_dir, health) = camera_health_config();
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", &health),
        ("QUEUE_DEPTH", "2"),
        ("WORKERS", "1"),
    ]);
    let peer = Peer::connect(
        broker.port,
        &["edge-ai/bu1/plant-7/gw-3/ai/#", "edge-ai/services/svc/ai/errors"],
    );
    svc.wait_ready();
    let frame = fixture("rocket-1080p.jpg");
    const N: usize = 30;
    for i in 0..N {
        peer.publish(GOOD_TOPIC, snapshot("burst-cam", &format!("f{i}"), &frame));
    }
    let corr = |m: &Msg| {
        let v = m.json();
        get_str(&v, &["metadata", "source", "correlation_id"]).or_else(|| get_str(&v, &["source", "correlation_id"]))
    };
    let got = peer.wait_until("an answer per frame", |m| m.iter().filter_map(corr).count() >= N);
    let per_frame = count_by(&got, corr);
    for i in 0..N {
        assert_eq!(
            per_frame.get(&format!("f{i}")),
            Some(&1),
            "frame f{i} must get exactly one answer"
        );
    }
    let dropped: Vec<&Msg> = got
        .iter()
        .filter(|m| get_str(&m.json(), &["error"]).as_deref() == Some("dropped"))
        .collect();
    assert!(!dropped.is_empty(), "a burst into 2 slots must supersede some frames");
    assert!(dropped
        .iter()
        .all(|m| get_str(&m.json(), &["reason"]).unwrap().starts_with("superseded")));
    assert_eq!(
        svc.metric("aei_frames_dropped_total{reason=\"superseded\"}"),
        dropped.len() as f64
    );
    // The newest frame is never the one that gives way.
    let last = got
        .iter()
        .find(|m| corr(m).as_deref() == Some(&format!("f{}", N - 1)))
        .unwrap();
    assert_eq!(
        get_str(&last.json(), &["message_type"]).as_deref(),
        Some("camera_health")
    );
    assert_eq!(svc.metric("aei_frame_slots{state=\"free\"}"), 2.0);
    assert!(svc.still_running());

    // When the process dies, the broker publishes the retained `offline` last will.
    let watcher = Peer::connect(broker.port, &["edge-ai/services/svc/ai/status"]);
    watcher.wait_until("retained online", |m| m.iter().any(|m| m.retain));
    drop(svc);
    let got = watcher.wait_until("offline last will", |m| {
        m.iter()
            .any(|m| get_str(&m.json(), &["status"]).as_deref() == Some("offline"))
    });
    assert_eq!(
        get_str(&got.last().unwrap().json(), &["message_type"]).as_deref(),
        Some("service_status")
    );
}

#[test]
fn survives_broker_restarts_and_reports_readiness() {
    let port = free_port();
    let p = port.to_string();
    let (_dir, health) = camera_health_config();
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &p),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", &health),
    ]);
    // No broker yet: alive but not ready.
    assert_eq!(svc.get("/healthz").0, 200);
    let (code, body) = svc.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"connected\":false"), "{body}");

    for round in 1..=3 {
        let broker = Broker::start_on(port);
        svc.wait_ready();
        let peer = Peer::connect(port, &[RESULT_TOPIC]);
        let device = format!("after-restart-{round}");
        peer.publish(GOOD_TOPIC, design(&device, &fixture("chelsea.jpg")));
        peer.wait_until("result after (re)connect", |m| {
            m.iter().any(|m| is_result_for(m, RESULT_TOPIC, &device))
        });
        drop(peer);
        drop(broker);
        let end = std::time::Instant::now() + DEADLINE;
        while svc.get("/readyz").0 == 200 {
            assert!(
                std::time::Instant::now() < end,
                "readyz stayed 200 after the broker died"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert!(svc.metric("aei_mqtt_connects_total") >= 3.0);
    assert!(svc.still_running());
}

#[test]
fn a_per_source_rate_limit_answers_the_excess_and_spares_other_cameras() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let (_dir, health) = camera_health_config();
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", &health),
        // One frame per 100 s: only each camera's first frame passes in this test.
        ("MAX_FPS_PER_SOURCE", "0.01"),
    ]);
    let peer = Peer::connect(broker.port, &["edge-ai/bu1/plant-7/gw-3/ai/#", ERROR_TOPIC]);
    svc.wait_ready();
    let jpeg = fixture("chelsea.jpg");
    for i in 0..5 {
        peer.publish(GOOD_TOPIC, snapshot("fast-cam", &format!("r{i}"), &jpeg));
    }
    peer.publish(GOOD_TOPIC, snapshot("calm-cam", "c0", &jpeg));
    let corr = |m: &Msg| {
        let v = m.json();
        get_str(&v, &["metadata", "source", "correlation_id"]).or_else(|| get_str(&v, &["source", "correlation_id"]))
    };
    let got = peer.wait_until("six answers", |m| m.iter().filter_map(corr).count() >= 6);
    let answers = count_by(&got, corr);
    assert_eq!(answers.len(), 6, "{answers:?}");
    assert!(
        answers.values().all(|n| *n == 1),
        "each frame answered once: {answers:?}"
    );
    let results: Vec<String> = got
        .iter()
        .filter(|m| m.topic == RESULT_TOPIC)
        .filter_map(corr)
        .collect();
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results.contains(&"c0".to_owned()), "another camera is not held back");
    let limited = got
        .iter()
        .filter(|m| get_str(&m.json(), &["reason"]).is_some_and(|r| r.starts_with("rate_limited")))
        .count();
    assert_eq!(limited, 4);
    assert_eq!(svc.metric("aei_frames_dropped_total{reason=\"rate_limited\"}"), 4.0);
}

#[test]
fn replicas_split_a_stream_through_a_shared_subscription() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let (_dir, health) = camera_health_config();
    let shared = "$share/vision/edge-ai/+/+/+/camera/snapshots";
    let replicas: Vec<Service> = ["replica-a", "replica-b"]
        .iter()
        .map(|id| {
            Service::start(&[
                ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
                ("AIO_BROKER_TCP_PORT", &port),
                ("AIO_MQTT_CLIENT_ID", id),
                ("MODEL_CONFIG_PATH", &health),
                ("MQTT_INPUT_TOPICS", shared),
                ("QUEUE_DEPTH", "64"),
            ])
        })
        .collect();
    let peer = Peer::connect(
        broker.port,
        &["edge-ai/bu1/plant-7/gw-3/ai/#", "edge-ai/services/+/ai/errors"],
    );
    for r in &replicas {
        r.wait_ready();
    }
    let jpeg = fixture("chelsea.jpg");
    let results = |r: &Service| r.metric("aei_messages_published_total{kind=\"result\"}");
    // Probe until both replicas' shared subscriptions are live (each has answered one).
    let end = std::time::Instant::now() + DEADLINE;
    let mut k = 0;
    while replicas.iter().any(|r| results(r) == 0.0) {
        assert!(std::time::Instant::now() < end, "a replica never got its share");
        let c = format!("probe-{k}");
        peer.publish(GOOD_TOPIC, snapshot("probe-cam", &c, &jpeg));
        peer.wait_until("the probe's answer", |m| {
            m.iter()
                .any(|m| get_str(&m.json(), &["metadata", "source", "correlation_id"]).as_deref() == Some(c.as_str()))
        });
        k += 1;
    }
    let before: Vec<f64> = replicas.iter().map(results).collect();
    const N: usize = 40;
    for i in 0..N {
        peer.publish(GOOD_TOPIC, snapshot(&format!("cam-{}", i % 4), &format!("q{i}"), &jpeg));
    }
    let corr = |m: &Msg| {
        let v = m.json();
        get_str(&v, &["metadata", "source", "correlation_id"])
            .or_else(|| get_str(&v, &["source", "correlation_id"]))
            .filter(|c| c.starts_with('q'))
    };
    let got = peer.wait_until("an answer per frame", |m| m.iter().filter_map(corr).count() >= N);
    let answers = count_by(&got, corr);
    assert_eq!(answers.len(), N);
    assert!(
        answers.values().all(|n| *n == 1),
        "each frame handled by exactly one replica: {answers:?}"
    );
    // `k` probes and `N` frames, all answered with results; the counters may trail the
    // messages by a moment, so read them until they add up.
    let end = std::time::Instant::now() + DEADLINE;
    while replicas.iter().map(results).sum::<f64>() < (k + N) as f64 {
        assert!(std::time::Instant::now() < end, "results missing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        replicas.iter().map(results).sum::<f64>(),
        (k + N) as f64,
        "all results, no errors"
    );
    let per_replica: Vec<f64> = replicas.iter().zip(&before).map(|(r, b)| results(r) - b).collect();
    assert!(
        per_replica.iter().all(|n| *n >= 5.0),
        "both replicas took a share: {per_replica:?}"
    );
}

#[test]
fn frames_unanswered_when_the_service_dies_are_answered_after_it_restarts() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let (_dir, health) = camera_health_config();
    let env = [
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", port.as_str()),
        ("AIO_MQTT_CLIENT_ID", "durable"),
        ("MODEL_CONFIG_PATH", health.as_str()),
        ("QUEUE_DEPTH", "64"),
        // Slow the first life down so frames are still in flight when it is killed.
        ("WORKERS", "1"),
    ];
    let first = Service::start(&env);
    let peer = Peer::connect(
        broker.port,
        &["edge-ai/bu1/plant-7/gw-3/ai/#", "edge-ai/services/durable/ai/errors"],
    );
    first.wait_ready();
    const N: usize = 300;
    let jpeg = fixture("rocket-1080p.jpg");
    for i in 0..N {
        peer.publish(
            GOOD_TOPIC,
            snapshot(&format!("cam-{}", i % 50), &format!("d{i}"), &jpeg),
        );
    }
    let corr = |m: &Msg| {
        let v = m.json();
        get_str(&v, &["metadata", "source", "correlation_id"]).or_else(|| get_str(&v, &["source", "correlation_id"]))
    };
    peer.wait_until("some answers before the crash", |m| {
        m.iter().filter_map(corr).count() >= 10
    });
    drop(first); // SIGKILL: no goodbye, unacknowledged frames stay with the broker's session
    let answered_before = count_by(&peer.received.lock().unwrap(), corr).len();
    assert!(
        answered_before < N,
        "the crash must come mid-stream ({answered_before} of {N} answered)"
    );

    let second = Service::start(&env);
    let got = peer.wait_until("every frame answered", |m| count_by(m, corr).len() >= N);
    let answers = count_by(&got, corr);
    for i in 0..N {
        assert!(answers.contains_key(&format!("d{i}")), "frame d{i} was lost");
    }
    let duplicates = answers.values().filter(|n| **n > 1).count();
    println!("{answered_before} answered before the crash; {duplicates} frames answered twice (QoS 1 redelivery)");
    drop(second);
}

/// Two models whose input filters overlap: mosquitto delivers a matching
/// frame once per subscription, and the service still takes it once, so
/// each model answers it exactly once. The wider filter also covers the
/// other model's output topic: the service must not read its own results.
#[test]
fn a_frame_matching_overlapping_subscriptions_is_answered_once_per_model() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let dir = TempDir::new("overlap");
    dir.write("a.yaml", "name: health-a\nmodel_type: camera-health\n");
    dir.write(
        "b.yaml",
        "name: health-b\nmodel_type: camera-health\nmqtt:\n  input_topics: [\"edge-ai/bu1/#\"]\n  output_topic_template: \"overlap/health-b\"\n",
    );
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", dir.0.to_str().unwrap()),
        ("QUEUE_DEPTH", "16"),
    ]);
    svc.wait_ready();
    let peer = Peer::connect(broker.port, &[RESULT_TOPIC, "overlap/health-b", ERROR_TOPIC]);
    for i in 0..5 {
        peer.publish(GOOD_TOPIC, design(&format!("cam-{i}"), &fixture("chelsea.jpg")));
    }
    peer.wait_until("both models' answers", |m| m.len() >= 10);
    // Extra copies, had they been processed, would be answered right behind these.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let got = peer.received.lock().unwrap().clone();
    let per = count_by(&got, |m| Some((m.topic.clone(), get_str(&m.json(), &["device_id"]))));
    assert_eq!(per.len(), 10, "{per:?}");
    assert!(per.values().all(|&n| n == 1), "{per:?}");
    assert_eq!(svc.metric("aei_messages_received_total"), 5.0);
    assert_eq!(
        svc.metric("aei_messages_repeated_total{why=\"overlapping_subscription\"}"),
        5.0,
        "mosquitto sends a copy per matching subscription"
    );
}
