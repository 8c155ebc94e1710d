//! Security against real peers: mosquitto with a TLS listener, client
//! certificates and an ACL; and the AIO broker's `K8S-SAT` enhanced
//! authentication against a small test broker (`support/sat_broker.rs`),
//! since no broker installable here speaks it. Certificates are made with the
//! openssl command line for each run.

mod support;

use std::path::Path;
use std::process::Command;

use support::sat_broker::SatBroker;
use support::*;

const IN_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/camera/snapshots";
const RESULT_TOPIC: &str = "edge-ai/bu1/plant-7/gw-3/ai/inference/vision";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a second unrelated CA, a server certificate for `broker.test` and a
/// client certificate for `aei-client`, all P-256.
fn make_pki(dir: &TempDir) {
    let d = &dir.0;
    for ca in ["ca", "other-ca"] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=aei-test-{ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    dir.write(
        "server.ext",
        "subjectAltName=DNS:broker.test\nextendedKeyUsage=serverAuth\n",
    );
    dir.write("client.ext", "extendedKeyUsage=clientAuth\n");
    for (name, cn) in [("server", "broker.test"), ("client", "aei-client")] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    // mosquitto started as root drops to its own user, which must read these.
    for e in std::fs::read_dir(d).unwrap().flatten() {
        std::fs::set_permissions(e.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
}

/// mosquitto with a TLS listener (client certificate required, its CN as the
/// user name, an ACL) and a plain listener for the test's own camera and
/// result reader.
fn tls_broker(pki: &TempDir) -> (Broker, u16) {
    let plain = free_port();
    let tls = free_port();
    let d = pki.0.display();
    pki.write(
        "acl",
        "user aei-client\ntopic read edge-ai/+/+/+/camera/snapshots\ntopic write edge-ai/+/+/+/ai/#\ntopic write edge-ai/services/svc/ai/status\n",
    );
    let conf = format!(
        "per_listener_settings true\n\
         listener {tls} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n\
         require_certificate true\nuse_identity_as_username true\nacl_file {d}/acl\n\
         listener {plain} 127.0.0.1\nallow_anonymous true\n"
    );
    (Broker::start_with(plain, &conf), tls)
}

fn tls_env<'a>(pki: &TempDir, tls_port: &'a str, health: &'a str, ca: &str) -> Vec<(&'static str, String)> {
    let f = |n: &str| pki.0.join(n).display().to_string();
    vec![
        ("AIO_BROKER_HOSTNAME", "127.0.0.1".into()),
        ("AIO_BROKER_TCP_PORT", tls_port.into()),
        ("AIO_MQTT_CLIENT_ID", "svc".into()),
        ("MODEL_CONFIG_PATH", health.into()),
        ("AIO_MQTT_USE_TLS", "true".into()),
        ("AIO_TLS_CA_FILE", f(ca)),
        ("MQTT_TLS_CERT_FILE", f("client.crt")),
        ("MQTT_TLS_KEY_FILE", f("client.key")),
        // The certificate names broker.test; we connect to 127.0.0.1.
        ("MQTT_TLS_SERVER_NAME", "broker.test".into()),
    ]
}

fn start(env: &[(&'static str, String)]) -> Service {
    let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Service::start(&e)
}

#[test]
fn tls_with_a_client_certificate_works_and_acl_refusals_are_reported() {
    let pki = TempDir::new("pki");
    make_pki(&pki);
    let (broker, tls_port) = tls_broker(&pki);
    let (_dir, health) = camera_health_config();
    let port = tls_port.to_string();
    let env = tls_env(&pki, &port, &health, "ca.crt");
    // mosquitto 2.0 accepts any subscription and filters deliveries by the ACL,
    // so refused subscriptions are tested against the SAT test broker below.
    let svc = start(&env);
    svc.wait_ready();
    assert!(svc.log_line("over TLS").is_some());

    let peer = Peer::connect(broker.port, &[RESULT_TOPIC]);
    peer.publish(IN_TOPIC, fixture("chelsea.jpg"));
    peer.wait_until("a result through the TLS connection", |m| {
        m.iter().any(|m| m.topic == RESULT_TOPIC)
    });

    // A corrupt frame's error result goes to a topic the ACL does not allow.
    peer.publish(IN_TOPIC, b"\xff\xd8\xff\xe0 not really".to_vec());
    wait_for("the refused publish to be reported", || {
        svc.metric("aei_publish_refused_total") >= 1.0
    });
    assert!(svc.log_line("broker refused a message we published").is_some());
    // Good frames keep working after the refusals.
    peer.publish(IN_TOPIC, fixture("astronaut.jpg"));
    peer.wait_until("a second result", |m| {
        m.iter().filter(|m| m.topic == RESULT_TOPIC).count() >= 2
    });
}

#[test]
fn a_wrong_ca_is_refused_clearly_and_a_fixed_ca_file_is_picked_up() {
    let pki = TempDir::new("pki");
    make_pki(&pki);
    let (_broker, tls_port) = tls_broker(&pki);
    let (_dir, health) = camera_health_config();
    let trust = pki.0.join("trust.crt");
    std::fs::copy(pki.0.join("other-ca.crt"), &trust).unwrap();
    let port = tls_port.to_string();
    let svc = start(&tls_env(&pki, &port, &health, "trust.crt"));
    let line = svc.wait_log("MQTT connect to 127.0.0.1");
    assert!(
        line.contains("UnknownIssuer") && line.contains("AIO_TLS_CA_FILE"),
        "the error should say the certificate's issuer is unknown and where to look: {line}"
    );
    let (code, body) = svc.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("\"last_error\":\"") && body.contains("UnknownIssuer"),
        "{body}"
    );

    // The operator fixes the CA file; the service uses it on its next attempt.
    std::fs::copy(pki.0.join("ca.crt"), &trust).unwrap();
    svc.wait_ready();
    assert!(svc.log_line("TLS files changed").is_some());
}

fn jwt(iat: u64, exp: u64, id: &str) -> Vec<u8> {
    let claims =
        format!(r#"{{"aud":["aio-internal"],"exp":{exp},"iat":{iat},"sub":"system:serviceaccount:default:{id}"}}"#);
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&claims),
        b64("signature")
    )
    .into_bytes()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What was verified: the CONNECT carries method `K8S-SAT` and the token
/// file's contents as authentication data on a persistent session; when the
/// file is rotated the service sends DISCONNECT (normal) and connects again
/// with the new token, and keeps answering frames.
#[test]
fn k8s_sat_authenticates_and_reauthenticates_when_the_token_rotates() {
    let dir = TempDir::new("sat");
    let t1 = jwt(now_s(), now_s() + 3600, "one");
    let token = dir.0.join("broker-sat");
    std::fs::write(&token, &t1).unwrap();
    let broker = SatBroker::start(&t1);
    let (_cfg, health) = camera_health_config();
    let port = broker.port.to_string();
    let svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("AIO_MQTT_CLIENT_ID", "svc"),
        ("MODEL_CONFIG_PATH", &health),
        ("AIO_SAT_FILE", token.to_str().unwrap()),
        // The test broker refuses the second filter, as an ACL would.
        (
            "MQTT_INPUT_TOPICS",
            "edge-ai/+/+/+/camera/snapshots,forbidden/{business_unit}/{facility}/{gateway_id}/camera",
        ),
    ]);
    svc.wait_ready();
    wait_for("the refused subscription to be reported", || {
        svc.log_line("refused the subscription to `forbidden/+/+/+/camera`")
            .is_some()
    });
    assert_eq!(svc.metric("aei_mqtt_subscriptions_refused_total"), 1.0);
    {
        let st = broker.state.lock().unwrap();
        let c = &st.connects[0];
        assert_eq!(c.method.as_deref(), Some("K8S-SAT"));
        assert_eq!(c.data.as_deref(), Some(&t1[..]));
        assert!(!c.clean_start);
        assert_eq!(c.reason, 0);
    }
    assert!(svc.log_line("K8S-SAT token from").is_some());
    let results = |b: &SatBroker| {
        b.state
            .lock()
            .unwrap()
            .published
            .iter()
            .filter(|(t, _)| t == RESULT_TOPIC)
            .count()
    };
    broker.send(IN_TOPIC, &fixture("chelsea.jpg"));
    wait_for("a result through the SAT broker", || results(&broker) == 1);

    // The kubelet rotates the token (write, then rename into place).
    let t2 = jwt(now_s(), now_s() + 7200, "two");
    broker.state.lock().unwrap().accept = t2.clone();
    std::fs::write(dir.0.join("tmp"), &t2).unwrap();
    std::fs::rename(dir.0.join("tmp"), &token).unwrap();
    wait_for("a CONNECT with the new token", || {
        let st = broker.state.lock().unwrap();
        st.connects.len() == 2 && st.connects[1].reason == 0
    });
    {
        let st = broker.state.lock().unwrap();
        assert_eq!(st.connects[1].data.as_deref(), Some(&t2[..]));
        assert!(
            !st.connects[1].clean_start,
            "the session (and its QoS 1 messages) is kept"
        );
        assert_eq!(st.disconnects, [0], "a normal DISCONNECT first, so no last will fires");
    }
    svc.wait_ready();
    assert_eq!(svc.metric("aei_mqtt_reauthentications_total"), 1.0);
    broker.send(IN_TOPIC, &fixture("astronaut.jpg"));
    wait_for("a result after re-authenticating", || results(&broker) == 2);
}

#[test]
fn a_refused_token_is_reported_and_the_service_stays_up() {
    let dir = TempDir::new("sat-bad");
    let token = dir.0.join("broker-sat");
    std::fs::write(&token, jwt(now_s(), now_s() + 3600, "stale")).unwrap();
    let broker = SatBroker::start(b"another-token");
    let (_cfg, health) = camera_health_config();
    let port = broker.port.to_string();
    let mut svc = Service::start(&[
        ("AIO_BROKER_HOSTNAME", "127.0.0.1"),
        ("AIO_BROKER_TCP_PORT", &port),
        ("MODEL_CONFIG_PATH", &health),
        ("MQTT_AUTH", "k8s-sat"),
        ("AIO_SAT_FILE", token.to_str().unwrap()),
    ]);
    let line = svc.wait_log("MQTT connect to");
    assert!(
        line.contains("NotAuthorized") && line.contains("AIO_SAT_FILE"),
        "{line}"
    );
    assert_eq!(broker.state.lock().unwrap().connects[0].reason, 0x87);
    assert_eq!(svc.get("/readyz").0, 503);
    assert!(svc.still_running());
}

/// User name and password against mosquitto's password file: accepted with the right password
/// (read from MQTT_PASSWORD_FILE), refused with a clear error with a wrong one.
#[test]
fn password_authentication_against_mosquitto() {
    let dir = TempDir::new("passwd");
    let pw = dir.0.join("passwd");
    let ok = Command::new("mosquitto_passwd")
        .args(["-c", "-b", pw.to_str().unwrap(), "aei", "s3cret-pass"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(ok.success());
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let port = free_port();
    let broker = Broker::start_with(
        port,
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            pw.display()
        ),
    );
    let (_cfg, health) = camera_health_config();
    let good = dir.write("good", "s3cret-pass\n");
    let bad = dir.write("bad", "guess\n");
    let p = broker.port.to_string();
    let env = |file: &Path| {
        vec![
            ("AIO_BROKER_HOSTNAME", "127.0.0.1".to_owned()),
            ("AIO_BROKER_TCP_PORT", p.clone()),
            ("MODEL_CONFIG_PATH", health.clone()),
            ("MQTT_USERNAME", "aei".to_owned()),
            ("MQTT_PASSWORD_FILE", file.display().to_string()),
        ]
    };
    let svc = start(&env(&good));
    svc.wait_ready();
    assert!(svc.log_line("user `aei`").is_some());

    let refused = start(&env(&bad));
    let line = refused.wait_log("MQTT connect to");
    assert!(
        line.contains("NotAuthorized") && line.contains("MQTT_PASSWORD_FILE"),
        "{line}"
    );
    assert_eq!(refused.get("/readyz").0, 503);
}
