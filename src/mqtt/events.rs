//! The event thread: drives rumqttc's connection. Connects, reconnects with
//! capped exponential backoff and jitter, subscribes on every CONNACK,
//! publishes the retained `online` status, forwards PUBLISHes into the
//! pipeline (each overlapping copy taken once), and reports refused
//! subscriptions and publishes.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Connection, Event};
use rumqttc::Outgoing;

use super::credentials::NextConnect;
use super::{status_message, with_jitter, MqttConfig, Subscriptions, MAX_BACKOFF};
use crate::messages::{Ack, Incoming, ToMqtt};
use crate::metrics::Metrics;

/// What the event thread works with.
pub(super) struct Events {
    pub cfg: MqttConfig,
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub refresh: Arc<NextConnect>,
    /// Set by the publisher once it has sent the final DISCONNECT.
    pub stopping: Arc<AtomicBool>,
    pub subs: Arc<Subscriptions>,
    pub incoming: async_channel::Sender<Incoming>,
    /// The publisher's queue: told to flush the offline results on CONNACK.
    pub flush: async_channel::Sender<ToMqtt>,
}

/// Runs until the connection ends for good (the service stops).
pub(super) fn run(mut connection: Connection, e: Events) {
    let Events {
        cfg,
        client,
        metrics,
        refresh,
        stopping,
        subs,
        incoming,
        flush,
    } = e;
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    // Deliveries the pipeline had no room for yet, in order. The loop never blocks on the
    // pipeline: the connection must keep moving, because our answers and acknowledgements
    // leave through it, and a pipeline waiting on them while this thread waits on the
    // pipeline would be a deadlock. After a reconnect the broker may resend what the
    // pipeline still holds from the last connection, so the channel alone is not enough.
    // Bounded by what the broker may have out to us (Receive Maximum per connection).
    let mut backlog: std::collections::VecDeque<Incoming> = std::collections::VecDeque::new();
    loop {
        while let Some(m) = backlog.pop_front() {
            match incoming.try_send(m) {
                Ok(()) => {}
                Err(async_channel::TrySendError::Full(m)) => {
                    backlog.push_front(m);
                    break;
                }
                // Closed: the service is stopping. The frames stay unacknowledged and the
                // broker delivers them again, to us or a replica.
                Err(async_channel::TrySendError::Closed(_)) => backlog.clear(),
            }
        }
        let event = if backlog.is_empty() {
            match connection.recv() {
                Ok(e) => e,
                Err(_) => break,
            }
        } else {
            match connection.recv_timeout(Duration::from_millis(5)) {
                Ok(e) => e,
                Err(rumqttc::v5::RecvTimeoutError::Timeout) => continue,
                Err(rumqttc::v5::RecvTimeoutError::Disconnected) => break,
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                log::info!("MQTT connected to {}:{} ({:?})", cfg.host, cfg.port, ack.code);
                metrics.mqtt_connected.store(true, Relaxed);
                metrics.mqtt_connects.fetch_add(1, Relaxed);
                backoff = Duration::from_millis(100);
                last_error.clear();
                // From this thread only try_*: the request queue is drained by this very loop.
                subs.on_connack(&client);
                let online = status_message(true, &cfg.settings.client_id, &(cfg.problems)());
                for topic in &cfg.status_topics {
                    if let Err(e) = client.try_publish(topic.as_str(), QoS::AtLeastOnce, true, online.clone()) {
                        log::warn!(topic = topic.as_str(); "cannot publish online status: {e}");
                    }
                }
                // Results kept while we were away go out now.
                let _ = flush.try_send(ToMqtt::Flush);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = std::str::from_utf8(&p.topic).unwrap_or("");
                let ids = p.properties.as_ref().map(|pr| &pr.subscription_identifiers[..]);
                if !subs.first_copy(topic, ids.unwrap_or(&[])) {
                    metrics.overlap_copies.fetch_add(1, Relaxed);
                    if p.qos != QoS::AtMostOnce {
                        let _ = client.try_ack(&p);
                    }
                    continue;
                }
                let ack = match p.qos {
                    QoS::AtMostOnce => None,
                    qos => Some(Ack {
                        pkid: p.pkid,
                        exactly_once: qos == QoS::ExactlyOnce,
                        key: None,
                    }),
                };
                let msg = Incoming {
                    topic: p.topic,
                    payload: p.payload,
                    reply: None,
                    model: None,
                    ack,
                    dup: p.dup,
                    annotate: false,
                };
                if !backlog.is_empty() {
                    backlog.push_back(msg);
                } else if let Err(async_channel::TrySendError::Full(msg)) = incoming.try_send(msg) {
                    backlog.push_back(msg);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = subs.on_suback(&ack.return_codes);
                metrics.mqtt_subscriptions_refused.fetch_add(refused as u64, Relaxed);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) if !puback_ok(ack.reason) => {
                metrics.publish_refused.fetch_add(1, Relaxed);
                log::error!(
                    "broker refused a message we published: {:?} (is its topic outside this client's ACL?)",
                    ack.reason
                );
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                log::warn!("broker sent DISCONNECT: {:?}", d.reason_code);
            }
            // Our DISCONNECT is out: close the connection (as MQTT asks of the
            // sender) and connect again with the new credentials.
            Ok(Event::Outgoing(Outgoing::Disconnect)) if stopping.load(Relaxed) => {
                drain_until_closed(&mut connection, CLOSE_WAIT);
                break;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if refresh.planned.swap(false, Relaxed) => {
                metrics.mqtt_connected.store(false, Relaxed);
                drain_until_closed(&mut connection, CLOSE_WAIT);
                connection.eventloop.clean();
                log::info!("MQTT reconnecting to re-authenticate with the new token");
            }
            Ok(_) => {}
            Err(_) if stopping.load(Relaxed) => break,
            Err(e) => {
                let was = metrics.mqtt_connected.swap(false, Relaxed);
                metrics.mqtt_connection_errors.fetch_add(1, Relaxed);
                let msg = e.to_string();
                if was {
                    log::warn!("MQTT connection lost: {msg}; reconnecting");
                } else if msg != last_error {
                    log::error!(
                        "MQTT connect to {}:{} failed: {msg}{}; retrying with backoff",
                        cfg.host,
                        cfg.port,
                        hint(&e)
                    );
                } else {
                    log::debug!("MQTT connect failed again: {msg}; retry in {backoff:?}");
                }
                *metrics
                    .mqtt_last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = msg.clone();
                last_error = msg;
                std::thread::sleep(with_jitter(backoff));
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        refresh.apply(&mut connection.eventloop.options);
    }
    metrics.mqtt_connected.store(false, Relaxed);
}

/// How long to wait for the broker to close the connection after our DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// After our DISCONNECT, reads (and drops) what the broker still sends until
/// it closes the connection, or `limit` passes. Closing first ourselves, with
/// its data unread, would reset the connection (RST) and the broker could
/// lose what we sent last: acknowledgements, the `offline` status, the
/// DISCONNECT itself. Deliveries dropped here were not acknowledged; the
/// broker sends them again.
fn drain_until_closed(connection: &mut rumqttc::v5::Connection, limit: Duration) {
    let end = std::time::Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match connection.recv_timeout(left) {
            Ok(Ok(_)) if !left.is_zero() => continue,
            _ => return,
        }
    }
}

fn puback_ok(r: PubAckReason) -> bool {
    matches!(r, PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
}

/// A hint for the connect errors whose cause is usually in the settings.
fn hint(e: &rumqttc::v5::ConnectionError) -> &'static str {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::Tls(_) => " (check AIO_TLS_CA_FILE, MQTT_TLS_SERVER_NAME and the client certificate)",
        E::ConnectionRefused(_) => {
            " (check the credentials: MQTT_AUTH, MQTT_USERNAME and MQTT_PASSWORD_FILE, or AIO_SAT_FILE)"
        }
        _ => "",
    }
}
