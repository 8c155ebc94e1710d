//! Zones and alert rules end to end: YOLOv12n on ONNX Runtime (`models/fetch`), a real
//! mosquitto, and a camera whose snapshots show a person (astronaut) or none (coffee). The
//! person stands in the `floor` zone; a 2-of-3 rule on it raises exactly one `start` when the
//! person has been seen in two of three snapshots and one `end` once they are gone, with no
//! flapping on the snapshot in between; each result carries the zones of its detections and
//! the per-zone counts.
#![cfg(feature = "onnx")]

mod support;

use miniserde::json::Value;
use support::*;

const TOPIC: &str = "edge-ai/acme/plant-1/gw-1/camera/snapshots";
const RESULTS: &str = "edge-ai/acme/plant-1/gw-1/ai/inference/vision";
const ALERTS: &str = "edge-ai/acme/plant-1/gw-1/ai/alerts";
const PICTURES: &str = "edge-ai/acme/plant-1/gw-1/ai/annotated";

fn config(dir: &TempDir) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("models/yolov12n.yaml")).unwrap();
    let model = root().join("models/.cache/yolov12n.onnx");
    let text = text
        .replace(
            "model_path: .cache/yolov12n.onnx",
            &format!("model_path: {}", model.display()),
        )
        .replace(
            "mqtt:\n",
            "tracking:\n  enabled: true\nannotations:\n  min_interval_s: 0\nmqtt:\n  annotated_topic_template: \"edge-ai/{business_unit}/{facility}/{gateway_id}/ai/annotated\"\n",
        );
    dir.write(
        "yolo.yaml",
        &format!(
            "{text}\nzones:\n  - name: floor\n    polygon: [[0, 0.5], [1, 0.5], [1, 1], [0, 1]]\n    classes: [person]\n\
             \x20 - name: ceiling\n    polygon: [[0, 0], [1, 0], [1, 0.3], [0, 0.3]]\n\
             alert_rules:\n  - name: person-on-floor\n    classes: [person]\n    zone: floor\n    min_confidence: 0.5\n    k: 2\n    n: 3\n"
        ),
    )
}

#[test]
fn a_person_entering_and_leaving_a_zone_gives_one_start_and_one_end() {
    let broker = Broker::start();
    let dir = TempDir::new("zones");
    let cfg = config(&dir);
    let port = broker.port.to_string();
    let ort = ort_library();
    let s = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ("DROP_SUPERSEDED", "false"),
        ("MODEL_WATCH_S", "0"),
    ]);
    s.wait_ready();
    let peer = Peer::connect(broker.port, &[RESULTS, ALERTS, PICTURES]);
    let (person, empty) = (fixture("astronaut.jpg"), fixture("coffee.jpg"));
    // One snapshot at a time, each answered before the next, as a 1 fps camera would.
    let seq = [false, true, false, true, true, true, false, false, false];
    for (i, &p) in seq.iter().enumerate() {
        peer.publish(TOPIC, if p { person.clone() } else { empty.clone() });
        peer.wait_until(&format!("result {}", i + 1), |m| {
            m.iter().filter(|m| m.topic == RESULTS).count() > i
        });
    }
    // Give a late event time to arrive before counting.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let msgs = peer.wait_until("every result", |m| {
        m.iter().filter(|m| m.topic == RESULTS).count() == seq.len()
    });
    let events: Vec<Value> = msgs.iter().filter(|m| m.topic == ALERTS).map(Msg::json).collect();
    let phases: Vec<String> = events.iter().map(|e| get_str(e, &["event"]).unwrap()).collect();
    assert_eq!(phases, ["start", "end"], "{events:?}");
    let (start, end) = (&events[0], &events[1]);
    assert_eq!(get_str(start, &["message_type"]).as_deref(), Some("ai_alert_event"));
    assert_eq!(get_str(start, &["rule"]).as_deref(), Some("person-on-floor"));
    assert_eq!(get_str(start, &["zone"]).as_deref(), Some("floor"));
    assert_eq!(get_str(start, &["alert_id"]), get_str(end, &["alert_id"]));
    assert!(num(get(start, &["peak_confidence"]).unwrap()) >= 0.5);
    assert_eq!(num(get(start, &["count"]).unwrap()), 1.0);
    // The results that raised it are named, and are real results' ids.
    let results: Vec<Value> = msgs.iter().filter(|m| m.topic == RESULTS).map(Msg::json).collect();
    let ids: Vec<String> = results.iter().map(|r| get_str(r, &["result_id"]).unwrap()).collect();
    let Some(Value::Array(caused)) = get(end, &["result_ids"]) else {
        panic!("{end:?}")
    };
    let caused: Vec<String> = caused.iter().map(|v| get_str(v, &[]).unwrap()).collect();
    // The 2-of-3 window that raised it (snapshots 2 and 4), then the two that kept it open.
    assert_eq!(
        caused,
        [ids[1].clone(), ids[3].clone(), ids[4].clone(), ids[5].clone()],
        "the four snapshots with the person"
    );
    assert!(get_str(end, &["first_seen"]).unwrap() <= get_str(end, &["last_seen"]).unwrap());

    // A person's result: the detection is in `floor`, not `ceiling`; the counts say so.
    let r = &results[1];
    let Some(Value::Array(p)) = get(r, &["predictions"]) else {
        panic!("{r:?}")
    };
    let person_det = p
        .iter()
        .find(|d| get_str(d, &["label"]).as_deref() == Some("person"))
        .expect("a person in astronaut.jpg");
    let Some(Value::Array(z)) = get(person_det, &["zones"]) else {
        panic!("{person_det:?}")
    };
    assert_eq!(z.len(), 1);
    assert_eq!(get_str(&z[0], &[]).as_deref(), Some("floor"));
    assert_eq!(num(get(r, &["zone_counts", "floor"]).unwrap()), 1.0);
    assert_eq!(num(get(r, &["zone_counts", "ceiling"]).unwrap()), 0.0);
    // Tracking: the person keeps one track id through the snapshots they are in (one missed
    // snapshot between them is bridged); the cup on the table is someone else.
    let person_ids: Vec<f64> = [1, 3, 4, 5]
        .iter()
        .map(|&i| {
            let Some(Value::Array(p)) = get(&results[i], &["predictions"]) else {
                panic!("{:?}", results[i])
            };
            let d = p
                .iter()
                .find(|d| get_str(d, &["label"]).as_deref() == Some("person"))
                .unwrap();
            num(get(d, &["track_id"]).expect("a track id"))
        })
        .collect();
    assert!(person_ids.iter().all(|&id| id == person_ids[0]), "{person_ids:?}");
    let Some(Value::Array(cup)) = get(&results[0], &["predictions"]) else {
        panic!()
    };
    assert!(cup.iter().all(|d| num(get(d, &["track_id"]).unwrap()) != person_ids[0]));
    // No person: no zone counted, but the zones are still reported.
    assert_eq!(num(get(&results[0], &["zone_counts", "floor"]).unwrap()), 0.0);
    // The frames that started and ended the alert, annotated: the start's shows the person's
    // box in its class colour on the left edge, and both the `floor` zone's top edge.
    let pictures: Vec<&Msg> = msgs.iter().filter(|m| m.topic == PICTURES).collect();
    assert_eq!(pictures.len(), 2, "one picture for the start, one for the end");
    let mut rgb = vec![0u8; 1 << 24];
    let d = ai_edge_inference::decode::decode_into(&pictures[0].payload, &mut rgb, 2048, 2048).unwrap();
    let (w, h) = (d.width as usize, d.height as usize);
    let b: Vec<f64> = match get(person_det, &["bbox"]) {
        Some(Value::Array(b)) => b.iter().map(num).collect(),
        other => panic!("{other:?}"),
    };
    let at = |x: usize, y: usize| [rgb[(y * w + x) * 3], rgb[(y * w + x) * 3 + 1], rgb[(y * w + x) * 3 + 2]];
    let near = |p: [u8; 3], c: [u8; 3]| p.iter().zip(c).all(|(&a, b)| (a as i32 - b as i32).abs() <= 48);
    let class = num(get(person_det, &["class_id"]).unwrap()) as usize;
    let t = ai_edge_inference::annotate::line_width(w as u32, h as u32) as usize;
    let mid_y = ((b[1] + b[3]) / 2.0) as usize;
    let x = (b[0].round() as usize).min(w - 1) + t / 2;
    assert!(
        near(at(x, mid_y), ai_edge_inference::annotate::colour(class)),
        "the person's left edge at ({x}, {mid_y}) is {:?}",
        at(x, mid_y)
    );
    // Away from the boxes, the zone's top edge (y = h / 2) is white.
    let zone_y = h / 2;
    let white = (0..w)
        .filter(|&x| near(at(x, zone_y), ai_edge_inference::annotate::ZONE_COLOUR))
        .count();
    assert!(white * 2 > w, "{white} of {w} pixels on the zone edge are white");
    assert_eq!(s.metric("aei_pictures_total{outcome=\"drawn\"}"), 2.0);
    assert_eq!(s.metric("aei_messages_published_total{kind=\"picture\"}"), 2.0);
    assert_eq!(s.metric("aei_alert_events_total{event=\"start\"}"), 1.0);
    assert_eq!(s.metric("aei_alert_events_total{event=\"end\"}"), 1.0);
    assert_eq!(s.metric("aei_alert_events_total{event=\"update\"}"), 0.0);
}

#[test]
fn bad_zones_and_rules_are_config_errors() {
    let dir = TempDir::new("zones-bad");
    let base = std::fs::read_to_string(root().join("models/yolov12n.yaml")).unwrap();
    for (extra, want) in [
        (
            "zones:\n  - name: a\n    polygon: [[0, 0], [1, 1]]\n",
            "needs 3 to 64 points",
        ),
        (
            "zones:\n  - name: a\n    polygon: [[0, 0], [1.5, 0], [1, 1]]\n",
            "zones[0].polygon[1][0]",
        ),
        ("alert_rules:\n  - name: r\n    zone: nowhere\n", "no zone `nowhere`"),
        ("alert_rules:\n  - name: r\n    k: 4\n    n: 3\n", "k must be at most n"),
        (
            "zones:\n  - name: a\n    polygon: [[0, 0], [1, 0], [1, 1]]\n    anchor: top\n",
            "expected bottom_center or center",
        ),
        ("annotations:\n  quality: 0\n", "annotations.quality"),
        ("annotations:\n  colour: red\n", "colour"),
    ] {
        let p = dir.write("m.yaml", &format!("{base}\n{extra}"));
        let out = binary()
            .env_clear()
            .args(["check-config", p.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{extra}: {err}");
    }
    // Pictures go out on alert starts and ends: a topic for them needs rules.
    let p = dir.write(
        "m.yaml",
        &base.replace(
            "mqtt:\n",
            "mqtt:\n  annotated_topic_template: \"x/{gateway_id}/annotated\"\n",
        ),
    );
    let out = binary()
        .env_clear()
        .args(["check-config", p.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("add alert_rules"), "{err}");
}

/// With `alert_state_file`, an alert open when the service stops is still open after it starts
/// again: no second `start` for the person still there, and one `end`, with the alert's own id,
/// once they are gone. (Without the file, the new process would start a new alert.)
#[test]
fn an_open_alert_survives_a_restart_with_a_state_file() {
    let broker = Broker::start();
    let dir = TempDir::new("alert-state");
    let cfg = config(&dir);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let cfg = dir.write("yolo.yaml", &format!("{text}alert_state_file: state/alerts.json\n"));
    std::fs::create_dir(dir.0.join("state")).unwrap();
    let port = broker.port.to_string();
    let ort = ort_library();
    let env = [
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", port.as_str()),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ("DROP_SUPERSEDED", "false"),
        ("MODEL_WATCH_S", "0"),
    ];
    let peer = Peer::connect(broker.port, &[RESULTS, ALERTS]);
    let (person, empty) = (fixture("astronaut.jpg"), fixture("coffee.jpg"));
    let mut answered = 0;
    let mut send = |peer: &Peer, jpeg: &[u8]| {
        peer.publish(TOPIC, jpeg.to_vec());
        answered += 1;
        let n = answered;
        peer.wait_until(&format!("result {n}"), |m| {
            m.iter().filter(|m| m.topic == RESULTS).count() >= n
        });
    };
    let mut s = Service::start(&env);
    s.wait_ready();
    send(&peer, &person);
    send(&peer, &person);
    s.signal("TERM");
    assert!(s.wait_exit().success());
    let saved = std::fs::read_to_string(dir.0.join("state/alerts.json")).unwrap();
    assert!(saved.contains("\"active\":{"), "the open alert is in the file: {saved}");

    let s = Service::start(&env);
    s.wait_ready();
    assert!(s.log_line("1 open alerts").is_some(), "the new process read it back");
    send(&peer, &person);
    for _ in 0..3 {
        send(&peer, &empty);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let msgs = peer.wait_until("every result", |m| m.iter().filter(|m| m.topic == RESULTS).count() == 6);
    let events: Vec<Value> = msgs.iter().filter(|m| m.topic == ALERTS).map(Msg::json).collect();
    let phases: Vec<String> = events.iter().map(|e| get_str(e, &["event"]).unwrap()).collect();
    assert_eq!(phases, ["start", "end"], "{events:?}");
    assert_eq!(get_str(&events[0], &["alert_id"]), get_str(&events[1], &["alert_id"]));
    // The end names hits from both processes (their result ids have different boot ids).
    let Some(Value::Array(ids)) = get(&events[1], &["result_ids"]) else {
        panic!("{:?}", events[1])
    };
    let boots: std::collections::HashSet<String> = ids
        .iter()
        .map(|v| get_str(v, &[]).unwrap().split('-').next().unwrap().to_owned())
        .collect();
    assert_eq!(boots.len(), 2, "{ids:?}");
}
