//! The publisher thread: drains the pipeline's answers and acknowledgements
//! into the client in order, keeps results in the bounded offline queue while
//! disconnected, publishes status changes, and the `offline` status on stop.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Client;

use super::outbox::Outbox;
use super::{status_message, Problems};
use crate::messages::{Outbound, ToMqtt};
use crate::metrics::Metrics;

/// What the publisher thread works with.
pub(super) struct Publisher {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// Results kept while disconnected.
    pub offline_queue: usize,
    pub status_topics: Vec<String>,
    /// The metrics snapshot's topic and writer, when snapshots are on.
    pub metrics_snapshot: Option<(String, super::WriteSnapshot)>,
    pub client_id: String,
    pub problems: Problems,
    /// Set when a status change waits to be published.
    pub status_dirty: Arc<AtomicBool>,
    /// Set once the final DISCONNECT is out (the event thread then stops).
    pub stopping: Arc<AtomicBool>,
}

/// Runs until `ToMqtt::Shutdown` (or the pipeline's end), then disconnects.
pub(super) fn run(outbound: async_channel::Receiver<ToMqtt>, p: Publisher) {
    let Publisher {
        client,
        metrics,
        offline_queue,
        status_topics,
        metrics_snapshot,
        client_id,
        problems,
        status_dirty,
        stopping,
    } = p;
    let mut outbox = Outbox::new(offline_queue);
    while let Ok(next) = outbound.recv_blocking() {
        let online = metrics.mqtt_connected.load(Relaxed);
        if online {
            while let Some(o) = outbox.pop() {
                publish(&client, &metrics, o);
            }
        }
        match next {
            ToMqtt::Flush => {}
            ToMqtt::MetricsTick => {
                if let (true, Some((topic, write))) = (online, &metrics_snapshot) {
                    let mut payload = Vec::with_capacity(4096);
                    write(&mut payload);
                    if let Err(e) = client.publish(topic.as_str(), QoS::AtLeastOnce, false, payload) {
                        metrics.publish_failed.fetch_add(1, Relaxed);
                        log::warn!(topic = topic.as_str(); "cannot publish the metrics snapshot: {e}");
                    }
                }
            }
            // Offline, it would be stale by the next CONNACK, which publishes a fresh one.
            ToMqtt::StatusChanged if !online => {}
            ToMqtt::StatusChanged => status_dirty.store(true, Relaxed),
            ToMqtt::Shutdown => {
                if !online && outbox.len() > 0 {
                    log::warn!("stopping while disconnected: {} queued results are lost", outbox.len());
                }
                let offline = status_message(false, &client_id, &[]);
                if online
                    && status_topics.iter().all(|t| {
                        client
                            .publish(t.as_str(), QoS::AtLeastOnce, true, offline.clone())
                            .is_ok()
                    })
                {
                    log::info!("published the `offline` status");
                }
                stopping.store(true, Relaxed);
                break;
            }
            ToMqtt::Publish(o) if online => publish(&client, &metrics, o),
            ToMqtt::Publish(o) => {
                if outbox.push(o) {
                    metrics.offline_dropped.fetch_add(1, Relaxed);
                    log::warn!("offline result queue full (MQTT_OFFLINE_QUEUE); dropped its oldest result");
                }
            }
            // An acknowledgement for a connection that is gone means nothing to the
            // broker: it sends the frame again and the redelivery window answers it.
            ToMqtt::Ack(_) if !online => {}
            ToMqtt::Ack(a) => {
                let qos = if a.exactly_once {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos, Vec::<u8>::new(), None);
                p.pkid = a.pkid;
                if let Err(e) = client.ack(&p) {
                    log::warn!("MQTT client refused an acknowledgement: {e}");
                }
            }
        }
        if online && status_dirty.swap(false, Relaxed) {
            let s = status_message(true, &client_id, &problems());
            for topic in &status_topics {
                if let Err(e) = client.publish(topic.as_str(), QoS::AtLeastOnce, true, s.clone()) {
                    log::warn!(topic = topic.as_str(); "cannot publish the status: {e}");
                }
            }
        }
        metrics.offline_queued.store(outbox.len() as u64, Relaxed);
    }
    let _ = client.disconnect();
}

fn publish(client: &Client, metrics: &Metrics, o: Outbound) {
    if let Err(e) = client.publish(o.topic, QoS::AtLeastOnce, false, o.payload) {
        metrics.publish_failed.fetch_add(1, Relaxed);
        log::warn!("MQTT client refused a publish: {e}");
    }
}
