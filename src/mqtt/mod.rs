//! MQTT: rumqttc's v5 sync client on three threads of its own.
//!
//! Owns: connection options (last will, packet limits, TLS, credentials,
//! Receive Maximum), the status message, and starting the threads. The
//! rooms: `events.rs` (the event thread: connect, reconnect, forward
//! deliveries), `publisher.rs` (the publisher thread: answers, acks, the
//! offline queue, status), `credentials.rs` (the thread that notices rotated
//! files), `subscriptions.rs`, `outbox.rs` (the offline queue), `tls.rs`,
//! `auth.rs`. Knows nothing of payload forms or models.

mod auth;
mod credentials;
mod events;
mod outbox;
mod publisher;
mod subscriptions;
mod tls;

pub use subscriptions::Subscriptions;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

use crate::build_info;
use crate::config::Settings;
use crate::messages::{Incoming, ToMqtt};
use crate::metrics::Metrics;
use credentials::NextConnect;

/// What the MQTT threads are started with: the service settings (client id,
/// keep-alive, session, TLS, credentials, queue sizes) and what start-up
/// worked out from them.
pub struct MqttConfig {
    pub settings: Settings,
    /// The broker (`settings.broker`, which is set when MQTT runs).
    pub host: String,
    pub port: u16,
    pub subscriptions: Arc<Subscriptions>,
    /// Where the retained status goes: `MQTT_STATUS_TOPIC` rendered for this client (also the
    /// last will's topic: a will has one), then the site's `ai/status` when `SITE` is set.
    pub status_topics: Vec<String>,
    /// The metrics snapshot: its topic, interval and writer; `None`: off.
    pub metrics_snapshot: Option<MetricsSnapshot>,
    /// Most unacknowledged QoS 1/2 frames the broker may send us ([`receive_maximum`]).
    pub receive_maximum: u16,
    /// Model problems for the `online` status.
    pub problems: Problems,
    /// Set when a status change could not be queued; the publisher publishes a fresh status.
    pub status_dirty: Arc<std::sync::atomic::AtomicBool>,
}

/// Writes the metrics snapshot JSON into the buffer (cleared first).
pub type WriteSnapshot = Arc<dyn Fn(&mut Vec<u8>) + Send + Sync>;

/// The periodic metrics snapshot (`METRICS_INTERVAL_S`).
pub struct MetricsSnapshot {
    pub topic: String,
    pub every: Duration,
    pub write: WriteSnapshot,
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
    let mut opts = MqttOptions::new(cfg.settings.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(cfg.settings.keep_alive_s));
    opts.set_clean_start(cfg.settings.clean_start);
    opts.set_session_expiry_interval(Some(cfg.settings.session_expiry_s));
    // A frame is acknowledged only once its answer is with the client (see messages::ToMqtt).
    opts.set_manual_acks(true);
    // Flow control: no more unacknowledged frames from the broker than the service holds.
    opts.set_receive_maximum(Some(cfg.receive_maximum));
    opts.set_max_packet_size(Some(max_packet_size(cfg.settings.max_payload_bytes)));
    opts.set_request_channel_capacity(1024);
    opts.set_network_options(low_latency());
    let will_topic = cfg.status_topics.first().cloned().unwrap_or_default();
    opts.set_last_will(LastWill::new(
        will_topic,
        status_message(false, &cfg.settings.client_id, &[]),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let mut tls_files = None;
    if let Some(t) = &cfg.settings.tls {
        let c = tls::client_config(t)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c)));
        tls_files = Some((t.clone(), tls::Files::of(t)));
    }
    let creds = auth::Credentials::load(&cfg.settings.auth)?;
    creds.apply(&mut opts);
    log::info!(
        "MQTT broker {}:{} over {}, {}",
        cfg.host,
        cfg.port,
        if cfg.settings.tls.is_some() { "TLS" } else { "plain TCP" },
        creds.describe()
    );
    let refresh = Arc::new(NextConnect {
        creds: Mutex::new(creds),
        creds_changed: AtomicBool::new(false),
        transport: Mutex::new(None),
        planned: AtomicBool::new(false),
    });
    let (client, connection) = Client::new(opts, 1024);
    let subs = cfg.subscriptions.clone();
    let status_topics = cfg.status_topics.clone();
    let metrics_snapshot = cfg
        .metrics_snapshot
        .as_ref()
        .map(|m| (m.topic.clone(), m.write.clone()));
    if let Some(m) = &cfg.metrics_snapshot {
        // Detached: a tick is a message to the publisher, which decides what it means.
        let (every, tick) = (m.every, flush.clone());
        std::thread::Builder::new()
            .name("mqtt-metrics".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                if tick.is_closed() {
                    break;
                }
                // A full queue skips this snapshot; the next one carries the same counters.
                let _ = tick.try_send(ToMqtt::MetricsTick);
            })
            .map_err(|e| e.to_string())?;
    }
    let client_id = cfg.settings.client_id.clone();
    // Set by the publisher once it has sent the final DISCONNECT.
    let stopping = Arc::new(AtomicBool::new(false));

    let (problems, status_dirty) = (cfg.problems.clone(), cfg.status_dirty.clone());
    let (offline_queue, auth_settings) = (cfg.settings.offline_queue, cfg.settings.auth.clone());
    let events = {
        let client = client.clone();
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        let stopping = stopping.clone();
        std::thread::Builder::new()
            .name("mqtt-events".into())
            .spawn(move || {
                events::run(
                    connection,
                    events::Events {
                        cfg,
                        client,
                        metrics,
                        refresh,
                        stopping,
                        subs,
                        incoming,
                        flush,
                    },
                )
            })
            .map_err(|e| e.to_string())?
    };

    // Detached: it has nothing to finish when the service stops.
    {
        let client = client.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("mqtt-credentials".into())
            .spawn(move || credentials::watch(&client, &metrics, &auth_settings, &refresh, tls_files))
            .map_err(|e| e.to_string())?;
    }

    let publisher = std::thread::Builder::new()
        .name("mqtt-publish".into())
        .spawn(move || {
            publisher::run(
                outbound,
                publisher::Publisher {
                    client,
                    metrics,
                    offline_queue,
                    status_topics,
                    metrics_snapshot,
                    client_id,
                    problems,
                    status_dirty,
                    stopping,
                },
            )
        })
        .map_err(|e| e.to_string())?;
    Ok(vec![events, publisher])
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
