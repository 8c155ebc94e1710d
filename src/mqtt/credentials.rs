//! The credentials thread: notices rotated TLS files, password files and
//! `K8S-SAT` tokens, and hands them to the event thread for the next CONNECT
//! (reconnecting at once when a token must re-authenticate).

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::Duration;

use rumqttc::v5::{Client, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

use super::{auth, tls};
use crate::config::{AuthSettings, TlsSettings};
use crate::metrics::Metrics;

/// What the credentials thread hands the event thread for the next connect.
pub(super) struct NextConnect {
    pub creds: Mutex<auth::Credentials>,
    pub creds_changed: AtomicBool,
    pub transport: Mutex<Option<Transport>>,
    /// A disconnect we asked for (to re-authenticate), not a failure.
    pub planned: AtomicBool,
}

impl NextConnect {
    /// Applies what changed to the options used by the next CONNECT.
    pub fn apply(&self, opts: &mut MqttOptions) {
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

/// Checks the files once a second, for as long as the client lives.
pub(super) fn watch(
    client: &Client,
    metrics: &Metrics,
    auth_settings: &AuthSettings,
    refresh: &NextConnect,
    mut tls_files: Option<(TlsSettings, tls::Files)>,
) {
    loop {
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
                let file = auth::token_file(auth_settings).map(|p| p.display().to_string());
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
    }
}
