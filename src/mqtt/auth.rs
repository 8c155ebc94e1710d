//! Broker credentials: user name and password, or the AIO broker's MQTT v5
//! enhanced authentication with a Kubernetes service-account token
//! (method `K8S-SAT`, data = the token).
//!
//! Owns: reading the secret files, noticing when they change, and telling
//! when a token nears its expiry. rumqttc 0.25 sends the method and data on
//! CONNECT but cannot send or receive AUTH packets, so re-authentication is
//! a planned reconnect with the new token on the persistent session (see
//! `mod.rs`); QoS 1 messages in flight are kept by the broker and re-sent.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::v5::MqttOptions;

use crate::config::AuthSettings;
use crate::filewatch::Watched;

pub const SAT_METHOD: &str = "K8S-SAT";

/// The credentials in use and where they come from.
pub struct Credentials {
    settings: AuthSettings,
    /// The secret last read (token or password).
    secret: Vec<u8>,
    /// The secret's file, when there is one: re-read only once it changed.
    file: Option<Watched>,
    expiry_warned: bool,
}

/// What a check of the secret files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// A new secret, used from the next connection.
    NextConnect,
    /// A new token: reconnect now to re-authenticate with it.
    Reauthenticate,
}

impl Credentials {
    /// Reads the secret files; the error names the file.
    pub fn load(settings: &AuthSettings) -> Result<Credentials, String> {
        let secret = match settings {
            AuthSettings::None => Vec::new(),
            AuthSettings::Password { password_file, .. } => match password_file {
                Some(p) => read_secret(p)?,
                None => Vec::new(),
            },
            AuthSettings::K8sSat { token_file } => {
                let t = read_secret(token_file)?;
                if t.is_empty() {
                    return Err(format!("K8S-SAT token file {} is empty", token_file.display()));
                }
                t
            }
        };
        let file = match settings {
            AuthSettings::Password {
                password_file: Some(p), ..
            } => Some(Watched::new(p)),
            AuthSettings::K8sSat { token_file } => Some(Watched::new(token_file)),
            _ => None,
        };
        Ok(Credentials {
            settings: settings.clone(),
            secret,
            file,
            expiry_warned: false,
        })
    }

    /// How the credentials are described in the log (never the secret).
    pub fn describe(&self) -> String {
        match &self.settings {
            AuthSettings::None => "no authentication".into(),
            AuthSettings::Password { username, .. } => format!("user `{username}`"),
            AuthSettings::K8sSat { token_file } => {
                let exp = jwt_times(&self.secret).and_then(|t| t.1);
                format!(
                    "{SAT_METHOD} token from {}{}",
                    token_file.display(),
                    exp.map(|e| format!(", expires at unix {e}")).unwrap_or_default()
                )
            }
        }
    }

    /// Puts the credentials into the CONNECT options.
    pub fn apply(&self, opts: &mut MqttOptions) {
        match &self.settings {
            AuthSettings::None => {}
            AuthSettings::Password { username, .. } => {
                opts.set_credentials(username.clone(), String::from_utf8_lossy(&self.secret).into_owned());
            }
            AuthSettings::K8sSat { .. } => {
                opts.set_authentication_method(Some(SAT_METHOD.to_owned()));
                opts.set_authentication_data(Some(Bytes::from(self.secret.clone())));
            }
        }
    }

    /// Re-reads the secret file; warns (once per token) when a token is near
    /// its expiry and the file has not been rotated.
    pub fn check(&mut self, now: SystemTime) -> Change {
        let Some(file) = self.file.as_mut() else {
            return Change::None;
        };
        // A file whose stamp changed is read; one whose content also changed is news.
        if file.changed() {
            match read_secret(&file.path) {
                Ok(s) if !s.is_empty() && s != self.secret => {
                    self.secret = s;
                    self.expiry_warned = false;
                    return match self.settings {
                        AuthSettings::K8sSat { .. } => Change::Reauthenticate,
                        _ => Change::NextConnect,
                    };
                }
                Ok(_) => {}
                Err(e) => log::warn!("{e}; keeping the credentials read before"),
            }
        }
        if let (AuthSettings::K8sSat { token_file }, Some(renew)) = (&self.settings, renew_at(&self.secret)) {
            if now >= renew && !self.expiry_warned {
                self.expiry_warned = true;
                log::warn!(
                    "K8S-SAT token in {} nears its expiry and the file has not been rotated; the broker will close the connection when it expires",
                    token_file.display()
                );
            }
        }
        Change::None
    }
}

fn read_secret(p: &Path) -> Result<Vec<u8>, String> {
    let mut s = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
        s.pop();
    }
    Ok(s)
}

/// `iat` and `exp` (seconds since the epoch) of a JWT, read without checking
/// its signature (the broker checks it; we only plan around its lifetime).
pub fn jwt_times(token: &[u8]) -> Option<(Option<u64>, Option<u64>)> {
    use base64::Engine as _;
    #[derive(miniserde::Deserialize)]
    struct Claims {
        iat: Option<u64>,
        exp: Option<u64>,
    }
    let payload = token.split(|&b| b == b'.').nth(1)?;
    let payload: Vec<u8> = payload.iter().copied().filter(|&b| b != b'=').collect();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let c: Claims = miniserde::json::from_str(std::str::from_utf8(&json).ok()?).ok()?;
    Some((c.iat, c.exp))
}

/// When a token should have been replaced: at 80 % of its lifetime (when the
/// kubelet rotates projected tokens), or a minute before `exp` without `iat`.
fn renew_at(token: &[u8]) -> Option<SystemTime> {
    let (iat, exp) = jwt_times(token)?;
    let exp = exp?;
    let at = match iat {
        Some(iat) if iat < exp => iat + (exp - iat) * 4 / 5,
        _ => exp.saturating_sub(60),
    };
    Some(UNIX_EPOCH + Duration::from_secs(at))
}

/// The token file's path, for messages.
pub fn token_file(settings: &AuthSettings) -> Option<&PathBuf> {
    match settings {
        AuthSettings::K8sSat { token_file } => Some(token_file),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> Vec<u8> {
        use base64::Engine as _;
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", e(r#"{"alg":"RS256"}"#), e(claims)).into_bytes()
    }

    #[test]
    fn reads_iat_and_exp_of_a_jwt() {
        assert_eq!(
            jwt_times(&jwt(r#"{"aud":["aio-internal"],"exp":2000,"iat":1000,"sub":"x"}"#)),
            Some((Some(1000), Some(2000)))
        );
        assert_eq!(jwt_times(b"not-a-jwt"), None);
        assert_eq!(
            renew_at(&jwt(r#"{"exp":2000,"iat":1000}"#)),
            Some(UNIX_EPOCH + Duration::from_secs(1800))
        );
        assert_eq!(
            renew_at(&jwt(r#"{"exp":2000}"#)),
            Some(UNIX_EPOCH + Duration::from_secs(1940))
        );
    }
}
