//! The service's life under a supervisor: systemd's notify protocol (READY,
//! WATCHDOG, STOPPING) over a socket the test owns, and a graceful stop on
//! SIGTERM that answers the frames in flight, leaves the rest to be
//! redelivered, publishes `offline` and exits 0.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::*;

const IN_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/camera/snapshots";
const RESULT_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/ai/inference/vision";
const ERROR_TOPIC: &str = "edge-ai/services/svc/ai/errors";
const STATUS_TOPIC: &str = "edge-ai/services/svc/ai/status";

/// Reads notify datagrams until `want` has been seen (or the deadline).
fn expect(sock: &UnixDatagram, seen: &mut Vec<String>, want: &str, times: usize) {
    let end = Instant::now() + DEADLINE;
    let mut buf = [0u8; 512];
    while seen.iter().filter(|s| *s == want).count() < times {
        assert!(Instant::now() < end, "no {want} x{times}; got {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn sd_notify_ready_watchdog_stopping_and_a_graceful_stop_that_loses_no_frame() {
    let broker = Broker::start_persistent();
    let port = broker.port.to_string();
    let dir = TempDir::new("notify");
    let sock_path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (_cfg, health) = camera_health_config();
    let env = [
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", port.as_str()),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", health.as_str()),
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
    ];
    let mut svc = Service::start(&env);
    let mut seen = Vec::new();
    expect(&sock, &mut seen, "READY=1", 1);
    expect(&sock, &mut seen, "WATCHDOG=1", 3);
    svc.wait_ready();

    let results = Peer::connect_persistent(broker.port, &[RESULT_TOPIC, ERROR_TOPIC, STATUS_TOPIC]);
    let camera = Peer::connect_persistent(broker.port, &[]);
    let jpeg = base64(&fixture("rocket-1080p.jpg"));
    const FRAMES: usize = 600;
    for i in 0..FRAMES {
        camera.publish(
            IN_TOPIC,
            snapshot_b64(&format!("cam-{}", i % 8), &format!("g-{i}"), &jpeg),
        );
    }
    // Stop while the burst is being worked through.
    results.wait_until("the first answers", |m| m.iter().any(|m| m.topic == RESULT_TOPIC));
    svc.signal("TERM");
    expect(&sock, &mut seen, "STOPPING=1", 1);
    let status = svc.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(svc.log_line("published the `offline` status").is_some());
    results.wait_until("the `offline` status from the service itself", |m| {
        m.iter()
            .any(|m| m.topic == STATUS_TOPIC && get_str(&m.json(), &["status"]).as_deref() == Some("offline"))
    });
    let first_ids: std::collections::HashSet<String> = results
        .received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|m| get_str(&m.json(), &["result_id"]))
        .collect();

    // What the first instance left unanswered, the next one gets from the broker.
    let mut env2 = env.to_vec();
    env2.retain(|(k, _)| !k.starts_with("NOTIFY") && !k.starts_with("WATCHDOG"));
    let _svc2 = Service::start(&env2);
    let all = results.wait_until("an answer for every frame", |m| {
        answers(m, RESULT_TOPIC, ERROR_TOPIC).len() == FRAMES
    });
    let ids = answers(&all, RESULT_TOPIC, ERROR_TOPIC);
    for (c, set) in &ids {
        let who: Vec<&str> = set
            .iter()
            .map(|id| if first_ids.contains(id) { "first" } else { "second" })
            .collect();
        assert_eq!(
            set.len(),
            1,
            "frame {c} answered {} times: {set:?} by {who:?}",
            set.len()
        );
    }
    let by_second = ids.values().flatten().filter(|id| !first_ids.contains(*id)).count();
    eprintln!(
        "{FRAMES} frames: {} answered before the stop, {by_second} after it by the next instance",
        FRAMES - by_second
    );
    assert!(
        by_second > 0,
        "the stop came after every frame was answered; the test did not stop mid-stream"
    );
    assert!(by_second < FRAMES);
}
