//! TLS to the broker: a rustls client config (ring provider) from PEM files,
//! and the check that tells when those files changed.
//!
//! Owns: reading CA, client certificate and key files; the optional server
//! name the broker's certificate is checked against. rumqttc does the
//! handshake with what this builds.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::filewatch::Watched;

use crate::config::TlsSettings;

/// A rustls client config for `t`; the error names the file and what is wrong with it.
pub fn client_config(t: &TlsSettings) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in certs(&t.ca_file)? {
        roots
            .add(cert)
            .map_err(|e| format!("CA file {}: unusable certificate: {e}", t.ca_file.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("CA file {}: {e}", t.ca_file.display()))?;
    let builder = match &t.server_name {
        None => builder.with_webpki_verifier(webpki),
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|e| format!("MQTT_TLS_SERVER_NAME `{name}`: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner: webpki, name }))
        }
    };
    let config = match &t.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("client key file {}: no usable private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
        }
    };
    Ok(Arc::new(config))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

/// The files a TLS config is built from, and their modification times when it was built.
pub struct Files(Vec<Watched>);

impl Files {
    pub fn of(t: &TlsSettings) -> Files {
        let mut paths = vec![t.ca_file.clone()];
        if let Some((c, k)) = &t.client_cert {
            paths.push(c.clone());
            paths.push(k.clone());
        }
        Files(paths.into_iter().map(Watched::new).collect())
    }

    /// True once since any file changed.
    pub fn changed(&mut self) -> bool {
        // Every file's stamp is brought up to date, not only the first changed one's.
        self.0.iter_mut().fold(false, |any, f| f.changed() | any)
    }
}

/// Checks the broker's certificate against a configured name instead of the
/// host connected to (an IP address, or a service name the certificate does
/// not carry). Everything else is webpki's check, unchanged.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _host: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
