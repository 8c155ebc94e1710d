//! MQTT: rumqttc's v5 sync client on two threads of its own.
//!
//! Owns: connection options (last will, packet limits), the event thread
//! (connects, reconnects with capped exponential backoff and jitter, subscribes on every CONNACK,
//! publishes the retained `online` status, forwards PUBLISHes into the
//! pipeline) and the publisher thread (drains results into the client).
//! Knows nothing of payload forms or models.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};

use crate::build_info;
use crate::frame::Ack;
use crate::metrics::Metrics;
use crate::pipeline::{Incoming, ToMqtt};

/// Broker connection facts, from the settings.
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub subscriptions: Vec<String>,
    pub status_topic: String,
    pub max_payload: usize,
    /// Start a fresh session (true) or resume the broker-kept one (false).
    pub clean_start: bool,
    /// Seconds the broker keeps the session (and queues QoS 1 frames) while we are away.
    pub session_expiry_s: u32,
}

/// The retained status message; `online` carries build facts.
pub fn status_message(online: bool, client_id: &str) -> Vec<u8> {
    #[derive(miniserde::Serialize)]
    struct Status<'a> {
        message_type: &'a str,
        status: &'a str,
        client_id: &'a str,
        version: &'a str,
        commit: &'a str,
        features: &'a str,
    }
    miniserde::json::to_string(&Status {
        message_type: "service_status",
        status: if online { "online" } else { "offline" },
        client_id,
        version: build_info::VERSION,
        commit: build_info::GIT_COMMIT,
        features: build_info::FEATURES,
    })
    .into_bytes()
}

/// Largest MQTT packet we let the broker send us. Above the payload limit on
/// purpose, so an over-size frame still arrives and gets an error result
/// (a broker silently drops packets over the client's limit).
pub fn max_packet_size(max_payload: usize) -> u32 {
    (max_payload.saturating_mul(4).saturating_add(64 * 1024)).min(268_435_455) as u32
}

/// TCP_NODELAY: a result is one small write that must not wait for Nagle's
/// algorithm and the broker's delayed ACK (about 40 ms per frame without it).
pub fn low_latency() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Longest wait between reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `d` plus up to half of it again, so replicas that lost the broker together
/// do not reconnect in lockstep.
pub fn with_jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    // A cheap scramble of the clock's low bits; good enough to spread reconnects.
    let r = (nanos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    d + d.mul_f64((r % 1000) as f64 / 2000.0)
}

/// Starts the event and publisher threads.
pub fn start(
    cfg: MqttConfig,
    metrics: Arc<Metrics>,
    incoming: async_channel::Sender<Incoming>,
    outbound: async_channel::Receiver<ToMqtt>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_start(cfg.clean_start);
    opts.set_session_expiry_interval(Some(cfg.session_expiry_s));
    // A frame is acknowledged only once its answer is with the client (see pipeline::ToMqtt).
    opts.set_manual_acks(true);
    opts.set_max_packet_size(Some(max_packet_size(cfg.max_payload)));
    opts.set_request_channel_capacity(1024);
    opts.set_network_options(low_latency());
    opts.set_last_will(LastWill::new(
        cfg.status_topic.clone(),
        status_message(false, &cfg.client_id),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let (client, mut connection) = Client::new(opts, 1024);

    let events = {
        let client = client.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("mqtt-events".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(100);
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            log::info!("MQTT connected to {}:{} ({:?})", cfg.host, cfg.port, ack.code);
                            metrics.mqtt_connected.store(true, Relaxed);
                            metrics.mqtt_connects.fetch_add(1, Relaxed);
                            backoff = Duration::from_millis(100);
                            // From this thread only try_*: the request queue is drained by this very loop.
                            for topic in &cfg.subscriptions {
                                if let Err(e) = client.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                                    log::error!("cannot subscribe to `{topic}`: {e}");
                                }
                            }
                            let online = status_message(true, &cfg.client_id);
                            if let Err(e) =
                                client.try_publish(cfg.status_topic.as_str(), QoS::AtLeastOnce, true, online)
                            {
                                log::warn!("cannot publish online status: {e}");
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let ack = match p.qos {
                                QoS::AtMostOnce => None,
                                qos => Some(Ack {
                                    pkid: p.pkid,
                                    exactly_once: qos == QoS::ExactlyOnce,
                                }),
                            };
                            let msg = Incoming {
                                topic: p.topic,
                                payload: p.payload,
                                reply: None,
                                model: None,
                                ack,
                            };
                            if incoming.send_blocking(msg).is_err() {
                                break;
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            if ack
                                .return_codes
                                .iter()
                                .any(|c| !matches!(c, rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                            {
                                log::error!("broker refused a subscription: {:?}", ack.return_codes);
                            }
                        }
                        Ok(Event::Incoming(Packet::Disconnect(d))) => {
                            log::warn!("broker sent DISCONNECT: {:?}", d.reason_code);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let was = metrics.mqtt_connected.swap(false, Relaxed);
                            metrics.mqtt_connection_errors.fetch_add(1, Relaxed);
                            if was {
                                log::warn!("MQTT connection lost: {e}; reconnecting");
                            } else {
                                log::debug!(
                                    "MQTT connect to {}:{} failed: {e}; retry in {backoff:?}",
                                    cfg.host,
                                    cfg.port
                                );
                            }
                            std::thread::sleep(with_jitter(backoff));
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
                metrics.mqtt_connected.store(false, Relaxed);
            })
            .expect("spawn mqtt thread")
    };

    let publisher = std::thread::Builder::new()
        .name("mqtt-publish".into())
        .spawn(move || {
            while let Ok(next) = outbound.recv_blocking() {
                let sent = match next {
                    ToMqtt::Publish(o) => client.publish(o.topic, QoS::AtLeastOnce, false, o.payload),
                    ToMqtt::Ack(a) => {
                        let qos = if a.exactly_once {
                            QoS::ExactlyOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", qos, Vec::<u8>::new(), None);
                        p.pkid = a.pkid;
                        client.ack(&p)
                    }
                };
                if let Err(e) = sent {
                    metrics.publish_failed.fetch_add(1, Relaxed);
                    log::warn!("MQTT client refused a request: {e}");
                }
            }
            let _ = client.disconnect();
        })
        .expect("spawn mqtt thread");
    vec![events, publisher]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_adds_at_most_half() {
        for _ in 0..100 {
            let d = with_jitter(Duration::from_millis(200));
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(300),
                "{d:?}"
            );
        }
    }
}
