//! Faults on the broker side, against a real mosquitto: restarts in the
//! middle of a stream must not lose a frame or answer one twice.

mod support;

use std::time::{Duration, Instant};

use support::*;

const IN_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/camera/snapshots";
const RESULT_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/ai/inference/vision";
const ERROR_TOPIC: &str = "edge-ai/services/svc/ai/errors";

/// A few thousand QoS 1 frames while mosquitto (with persistence) is stopped
/// and started three times: every frame gets exactly one answer (one
/// `result_id`, on the result or the error topic). The same message may
/// arrive twice at the subscriber (QoS 1 is at-least-once on that hop too);
/// it then carries the same `result_id`, and that is counted, not failed.
#[test]
fn every_frame_gets_exactly_one_answer_across_broker_restarts() {
    const FRAMES: usize = 3000;
    let mut broker = Broker::start_persistent();
    let port = broker.port.to_string();
    let (_dir, health) = camera_health_config();
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", &health),
    ]);
    svc.wait_ready();
    let results = Peer::connect_persistent(broker.port, &[RESULT_TOPIC, ERROR_TOPIC]);
    let camera = Peer::connect_persistent(broker.port, &[]);
    let jpeg = base64(&fixture("black.jpg"));

    let mut restarts = 0;
    for i in 0..FRAMES {
        camera.publish(
            IN_TOPIC,
            snapshot_b64(&format!("cam-{}", i % 4), &format!("f-{i}"), &jpeg),
        );
        if i % 1000 == 500 {
            broker.restart();
            restarts += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(restarts, 3);

    let all = results.wait_until("an answer for every frame", |m| {
        answers(m, RESULT_TOPIC, ERROR_TOPIC).len() >= FRAMES
    });
    // A second answer would come soon after the first; give it time to show.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
    }
    let all_after = results.received.lock().unwrap().clone();
    let got = answers(&all_after, RESULT_TOPIC, ERROR_TOPIC);
    assert_eq!(got.len(), FRAMES, "answers for frames that were never sent?");
    for i in 0..FRAMES {
        let ids = &got[&format!("f-{i}")];
        assert_eq!(ids.len(), 1, "frame f-{i} answered {} times: {ids:?}", ids.len());
    }
    let errors = all_after.iter().filter(|m| m.topic == ERROR_TOPIC).count();
    eprintln!(
        "{FRAMES} frames, {restarts} broker restarts: {} messages received ({} before settling), {errors} error answers, {} repeats caught by the service, {} transport redeliveries to the subscriber",
        all_after.len(),
        all.len(),
        svc.metric("aei_messages_repeated_total{why=\"redelivered\"}"),
        all_after.len().saturating_sub(FRAMES)
    );
    assert!(svc.metric("aei_mqtt_connects_total") >= 4.0);
    assert_eq!(svc.metric("aei_offline_queue_dropped_total"), 0.0);
}
