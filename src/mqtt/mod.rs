//! MQTT: rumqttc's v5 sync client on three threads of its own.
//!
//! Owns: connection options (last will, packet limits, TLS, credentials),
//! the event thread (connects, reconnects with capped exponential backoff and
//! jitter, subscribes on every CONNACK, publishes the retained `online`
//! status, forwards PUBLISHes into the pipeline, reports refused
//! subscriptions and publishes), the publisher thread (drains results into
//! the client, or into the bounded offline queue while disconnected) and the
//! credentials thread (notices rotated tokens and TLS files). Knows nothing
//! of payload forms or models. TLS is `tls.rs`, credentials `auth.rs`, the
//! offline queue `outbox.rs`.

mod auth;
mod outbox;
mod tls;

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Packet, PubAckReason, SubscribeProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use rumqttc::Outgoing;
use rumqttc::{TlsConfiguration, Transport};

use crate::build_info;
use crate::config::{AuthSettings, TlsSettings};
use crate::messages::{Ack, Incoming, Outbound, ToMqtt};
use crate::metrics::Metrics;
use crate::topic::TopicFilter;
use outbox::Outbox;

/// Broker connection facts, from the settings.
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub subscriptions: Arc<Subscriptions>,
    pub status_topic: String,
    pub max_payload: usize,
    /// Start a fresh session (true) or resume the broker-kept one (false).
    pub clean_start: bool,
    /// Seconds the broker keeps the session (and queues QoS 1 frames) while we are away.
    pub session_expiry_s: u32,
    pub tls: Option<TlsSettings>,
    pub auth: AuthSettings,
    /// Results kept while disconnected.
    pub offline_queue: usize,
    /// Most unacknowledged QoS 1/2 frames the broker may send us ([`receive_maximum`]).
    pub receive_maximum: u16,
    /// Model problems for the `online` status.
    pub problems: Problems,
    /// Set when a status change could not be queued; the publisher publishes a fresh status.
    pub status_dirty: Arc<std::sync::atomic::AtomicBool>,
}

/// A model that failed to load or reload, and why (the old version, if
/// any, keeps serving).
pub use crate::models::Problem;

/// The current problems, for the status message.
pub type Problems = Arc<dyn Fn() -> Vec<Problem> + Send + Sync>;

/// The retained status message; `online` carries build facts and the
/// models that failed to load or reload.
pub fn status_message(online: bool, client_id: &str, problems: &[Problem]) -> Vec<u8> {
    #[derive(miniserde::Serialize)]
    struct Status<'a> {
        message_type: &'a str,
        status: &'a str,
        client_id: &'a str,
        version: &'a str,
        commit: &'a str,
        features: &'a str,
        model_errors: &'a [Problem],
    }
    miniserde::json::to_string(&Status {
        message_type: "service_status",
        status: if online { "online" } else { "offline" },
        client_id,
        version: build_info::VERSION,
        commit: build_info::GIT_COMMIT,
        features: build_info::FEATURES,
        model_errors: problems,
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

/// The MQTT v5 Receive Maximum for `slots` frame slots: the broker keeps
/// every QoS 1/2 frame beyond it until we acknowledge one, so the broker,
/// not the service, is the buffer under load. Twice the slots: one frame in
/// every slot and as many again read ahead (held as received, in the ingest
/// channel), so a newer frame of a camera can be seen while its older one
/// waits (`DROP_SUPERSEDED`) and a slot that comes free is filled at once.
pub fn receive_maximum(slots: usize) -> u16 {
    (slots.saturating_mul(2)).clamp(1, u16::MAX as usize) as u16
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

/// The input filters the service wants, kept in step with the broker: set
/// on every CONNACK and changed at run time when model configs come and go.
///
/// Each filter is subscribed with a subscription identifier of its own, so a
/// frame that matches several overlapping filters is taken once: a broker may
/// deliver one copy per matching subscription (mosquitto does); the copy that
/// carries the lowest matching identifier is the one processed, the others are
/// acknowledged and counted. Filters are subscribed with No Local, so the
/// service never receives what it publishes.
pub struct Subscriptions {
    inner: Mutex<SubState>,
}

struct Sub {
    filter: String,
    parsed: Option<TopicFilter>,
    id: usize,
}

struct SubState {
    wanted: Vec<Sub>,
    next_id: usize,
    client: Option<Client>,
    /// Filters of SUBSCRIBEs awaiting their SUBACK, oldest first.
    sent: VecDeque<String>,
}

impl Subscriptions {
    pub fn new(wanted: Vec<String>) -> Arc<Subscriptions> {
        let mut st = SubState {
            wanted: Vec::new(),
            next_id: 1,
            client: None,
            sent: VecDeque::new(),
        };
        for f in wanted {
            st.want(f);
        }
        Arc::new(Subscriptions { inner: Mutex::new(st) })
    }

    /// Changes the wanted filters; subscribes to the new ones and unsubscribes
    /// from the dropped ones now when connected (else on the next CONNACK).
    pub fn set(&self, wanted: Vec<String>) {
        let mut st = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let removed: Vec<String> = st
            .wanted
            .iter()
            .filter(|s| !wanted.contains(&s.filter))
            .map(|s| s.filter.clone())
            .collect();
        st.wanted.retain(|s| wanted.contains(&s.filter));
        let added: Vec<usize> = wanted
            .into_iter()
            .filter_map(|f| (!st.wanted.iter().any(|s| s.filter == f)).then(|| st.want(f)))
            .collect();
        if let Some(client) = st.client.clone() {
            for f in &removed {
                log::info!("unsubscribing from `{f}`: no model reads it any more");
                if let Err(e) = client.try_unsubscribe(f.as_str()) {
                    log::error!("cannot unsubscribe from `{f}`: {e}");
                }
            }
            if !added.is_empty() {
                let names: Vec<&str> = added.iter().map(|&i| st.wanted[i].filter.as_str()).collect();
                log::info!("subscribing to {names:?} for a new model");
            }
            for i in added {
                st.subscribe(&client, i);
            }
        }
    }

    /// Whether a delivery on `topic` that came for subscriptions `ids` is the
    /// copy to process (see the type's comment). A broker that sends no
    /// identifiers sends one copy.
    pub fn first_copy(&self, topic: &str, ids: &[usize]) -> bool {
        if ids.is_empty() {
            return true;
        }
        let st = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lowest = st
            .wanted
            .iter()
            .filter(|s| s.parsed.as_ref().is_some_and(|f| f.matches(topic)))
            .map(|s| s.id)
            .min();
        lowest.is_none_or(|id| ids.contains(&id))
    }

    fn on_connack(&self, client: &Client) {
        let mut st = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.client = Some(client.clone());
        st.sent.clear();
        for i in 0..st.wanted.len() {
            st.subscribe(client, i);
        }
    }

    /// Reports a filter the broker refused (an ACL, a bad filter); returns how many.
    fn on_suback(&self, codes: &[SubscribeReasonCode]) -> usize {
        let filter = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sent
            .pop_front()
            .unwrap_or_default();
        let mut refused = 0;
        for code in codes {
            if !matches!(code, SubscribeReasonCode::Success(_)) {
                refused += 1;
                log::error!(
                    "broker refused the subscription to `{filter}`: {code:?} (is it outside this client's ACL?)"
                );
            }
        }
        refused
    }
}

impl SubState {
    /// Adds `filter` with a fresh identifier; returns its index.
    fn want(&mut self, filter: String) -> usize {
        let parsed = TopicFilter::parse(&filter).ok();
        self.wanted.push(Sub {
            filter,
            parsed,
            id: self.next_id,
        });
        // Identifiers run 1..=268_435_455 in MQTT v5.
        self.next_id = self.next_id % 268_435_455 + 1;
        self.wanted.len() - 1
    }

    fn subscribe(&mut self, client: &Client, i: usize) {
        let s = &self.wanted[i];
        let props = SubscribeProperties {
            id: Some(s.id),
            user_properties: Vec::new(),
        };
        let mut filter = Filter::new(s.filter.clone(), QoS::AtLeastOnce);
        // Never take our own results as input, even when an input filter covers
        // an output topic. (MQTT forbids No Local on shared subscriptions.)
        filter.nolocal = !s.filter.starts_with("$share/");
        match client.try_subscribe_many_with_properties([filter], props) {
            Ok(()) => self.sent.push_back(s.filter.clone()),
            Err(e) => log::error!("cannot subscribe to `{}`: {e}", s.filter),
        }
    }
}

/// What the credentials thread hands the event thread for the next connect.
struct Refresh {
    creds: Mutex<auth::Credentials>,
    creds_changed: AtomicBool,
    transport: Mutex<Option<Transport>>,
    /// A disconnect we asked for (to re-authenticate), not a failure.
    planned: AtomicBool,
}

impl Refresh {
    /// Applies what changed to the options used by the next CONNECT.
    fn apply(&self, opts: &mut MqttOptions) {
        if self.creds_changed.swap(false, Relaxed) {
            self.creds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .apply(opts);
        }
        if let Some(t) = self
            .transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            opts.set_transport(t);
        }
    }
}

/// Starts the event, publisher and credentials threads; returns the first
/// two, which finish after `ToMqtt::Shutdown`. The error is a start-up
/// error: a TLS or secret file that cannot be used.
pub fn start(
    cfg: MqttConfig,
    metrics: Arc<Metrics>,
    incoming: async_channel::Sender<Incoming>,
    outbound: async_channel::Receiver<ToMqtt>,
    flush: async_channel::Sender<ToMqtt>,
) -> Result<Vec<std::thread::JoinHandle<()>>, String> {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_start(cfg.clean_start);
    opts.set_session_expiry_interval(Some(cfg.session_expiry_s));
    // A frame is acknowledged only once its answer is with the client (see messages::ToMqtt).
    opts.set_manual_acks(true);
    // Flow control: no more unacknowledged frames from the broker than the service holds.
    opts.set_receive_maximum(Some(cfg.receive_maximum));
    opts.set_max_packet_size(Some(max_packet_size(cfg.max_payload)));
    opts.set_request_channel_capacity(1024);
    opts.set_network_options(low_latency());
    opts.set_last_will(LastWill::new(
        cfg.status_topic.clone(),
        status_message(false, &cfg.client_id, &[]),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let mut tls_files = None;
    if let Some(t) = &cfg.tls {
        let c = tls::client_config(t)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c)));
        tls_files = Some((t.clone(), tls::Files::of(t)));
    }
    let creds = auth::Credentials::load(&cfg.auth)?;
    creds.apply(&mut opts);
    log::info!(
        "MQTT broker {}:{} over {}, {}",
        cfg.host,
        cfg.port,
        if cfg.tls.is_some() { "TLS" } else { "plain TCP" },
        creds.describe()
    );
    let refresh = Arc::new(Refresh {
        creds: Mutex::new(creds),
        creds_changed: AtomicBool::new(false),
        transport: Mutex::new(None),
        planned: AtomicBool::new(false),
    });
    let (client, mut connection) = Client::new(opts, 1024);
    let subs = cfg.subscriptions.clone();
    let status_topic = cfg.status_topic.clone();
    let client_id = cfg.client_id.clone();
    // Set by the publisher once it has sent the final DISCONNECT.
    let stopping = Arc::new(AtomicBool::new(false));

    let (problems, status_dirty) = (cfg.problems.clone(), cfg.status_dirty.clone());
    let events = {
        let client = client.clone();
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        let stopping = stopping.clone();
        std::thread::Builder::new()
            .name("mqtt-events".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(100);
                let mut last_error = String::new();
                while let Ok(event) = connection.recv() {
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            log::info!("MQTT connected to {}:{} ({:?})", cfg.host, cfg.port, ack.code);
                            metrics.mqtt_connected.store(true, Relaxed);
                            metrics.mqtt_connects.fetch_add(1, Relaxed);
                            backoff = Duration::from_millis(100);
                            last_error.clear();
                            // From this thread only try_*: the request queue is drained by this very loop.
                            subs.on_connack(&client);
                            let online = status_message(true, &cfg.client_id, &(cfg.problems)());
                            if let Err(e) =
                                client.try_publish(cfg.status_topic.as_str(), QoS::AtLeastOnce, true, online)
                            {
                                log::warn!("cannot publish online status: {e}");
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
                            };
                            // Closed: the service is stopping. The frame stays unacknowledged
                            // and the broker delivers it again, to us or a replica.
                            let _ = incoming.send_blocking(msg);
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
            })
            .map_err(|e| e.to_string())?
    };

    // Detached: it has nothing to finish when the service stops.
    {
        let client = client.clone();
        let metrics = metrics.clone();
        let auth_settings = cfg.auth.clone();
        std::thread::Builder::new()
            .name("mqtt-credentials".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                if let Some((t, files)) = tls_files.as_mut() {
                    if files.changed() {
                        match tls::client_config(t) {
                            Ok(c) => {
                                log::info!("TLS files changed; the next connection uses them");
                                *refresh
                                    .transport
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                    Some(Transport::tls_with_config(TlsConfiguration::Rustls(c)));
                            }
                            Err(e) => log::error!("TLS files changed but cannot be used: {e}; keeping the old ones"),
                        }
                    }
                }
                let change = refresh
                    .creds
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .check(std::time::SystemTime::now());
                match change {
                    auth::Change::None => {}
                    auth::Change::NextConnect => {
                        log::info!("MQTT password file changed; the next connection uses it");
                        refresh.creds_changed.store(true, Relaxed);
                    }
                    auth::Change::Reauthenticate => {
                        refresh.creds_changed.store(true, Relaxed);
                        metrics.mqtt_reauthentications.fetch_add(1, Relaxed);
                        let file = auth::token_file(&auth_settings).map(|p| p.display().to_string());
                        if metrics.mqtt_connected.load(Relaxed) {
                            log::info!(
                                "K8S-SAT token in {} rotated; reconnecting to re-authenticate",
                                file.unwrap_or_default()
                            );
                            refresh.planned.store(true, Relaxed);
                            if client.try_disconnect().is_err() {
                                return; // the client is gone: shutting down
                            }
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
    }

    let publisher = std::thread::Builder::new()
        .name("mqtt-publish".into())
        .spawn(move || {
            let mut outbox = Outbox::new(cfg.offline_queue);
            while let Ok(next) = outbound.recv_blocking() {
                let online = metrics.mqtt_connected.load(Relaxed);
                if online {
                    while let Some(o) = outbox.pop() {
                        publish(&client, &metrics, o);
                    }
                }
                match next {
                    ToMqtt::Flush => {}
                    // Offline, it would be stale by the next CONNACK, which publishes a fresh one.
                    ToMqtt::StatusChanged if !online => {}
                    ToMqtt::StatusChanged => status_dirty.store(true, Relaxed),
                    ToMqtt::Shutdown => {
                        if !online && outbox.len() > 0 {
                            log::warn!("stopping while disconnected: {} queued results are lost", outbox.len());
                        }
                        let offline = status_message(false, &client_id, &[]);
                        if online
                            && client
                                .publish(status_topic.as_str(), QoS::AtLeastOnce, true, offline)
                                .is_ok()
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
                    if let Err(e) = client.publish(status_topic.as_str(), QoS::AtLeastOnce, true, s) {
                        log::warn!("cannot publish the status: {e}");
                    }
                }
                metrics.offline_queued.store(outbox.len() as u64, Relaxed);
            }
            let _ = client.disconnect();
        })
        .map_err(|e| e.to_string())?;
    Ok(vec![events, publisher])
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

fn publish(client: &Client, metrics: &Metrics, o: Outbound) {
    if let Err(e) = client.publish(o.topic, QoS::AtLeastOnce, false, o.payload) {
        metrics.publish_failed.fetch_add(1, Relaxed);
        log::warn!("MQTT client refused a publish: {e}");
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
