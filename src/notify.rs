//! systemd's readiness protocol (sd_notify): `READY=1`, `WATCHDOG=1`,
//! `STOPPING=1` and `STATUS=...` datagrams to the socket in `$NOTIFY_SOCKET`.
//! Without that variable (not under systemd) every call does nothing.
//!
//! Owns: the socket address (a path, or `@name` for the abstract namespace)
//! and the watchdog interval from `$WATCHDOG_USEC`.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where systemd (or a test) listens, read once from the environment.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let p = p.to_string_lossy().into_owned();
            let addr = match p.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt as _;
                    SocketAddr::from_abstract_name(name.as_bytes())
                }
                None => SocketAddr::from_pathname(&p),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(s), Ok(a)) => Some((s, a)),
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("NOTIFY_SOCKET `{p}` unusable: {e}; not notifying systemd");
                    None
                }
            }
        });
        Notifier { target }
    }

    /// Sends one state line (e.g. `READY=1`); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::warn!("sd_notify `{state}` failed: {e}");
            }
        }
    }

    /// The watchdog ping interval: half of `$WATCHDOG_USEC`, when systemd set one for us.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
