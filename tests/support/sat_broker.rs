//! A small MQTT v5 broker for one thing mosquitto cannot do: the AIO broker's
//! enhanced authentication with method `K8S-SAT`. It checks the CONNECT's
//! authentication method and data against the token it accepts now, records
//! every CONNECT and DISCONNECT, acknowledges SUBSCRIBE (refusing filters
//! under `forbidden/`, as an ACL would) and QoS 1 PUBLISH,
//! answers PINGREQ, and can push a frame to the connected client. Just enough
//! of MQTT v5 for one client; not a general broker.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A CONNECT as the broker saw it.
#[derive(Debug, Clone)]
pub struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    pub method: Option<String>,
    pub data: Option<Vec<u8>>,
    /// Reason code of the CONNACK sent back (0 = success).
    pub reason: u8,
}

#[derive(Default)]
pub struct SatState {
    /// The token a CONNECT must carry.
    pub accept: Vec<u8>,
    pub connects: Vec<Connect>,
    /// Reason codes of DISCONNECTs the client sent.
    pub disconnects: Vec<u8>,
    /// Topics and payloads the client published.
    pub published: Vec<(String, Vec<u8>)>,
    /// The latest accepted connection (its number, its socket).
    stream: Option<(usize, TcpStream)>,
}

pub struct SatBroker {
    pub port: u16,
    pub state: Arc<Mutex<SatState>>,
}

impl SatBroker {
    pub fn start(token: &[u8]) -> SatBroker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(SatState {
            accept: token.to_vec(),
            ..SatState::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for (n, s) in listener.incoming().flatten().enumerate() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(n, s, &st);
                });
            }
        });
        SatBroker { port, state }
    }

    /// Sends a QoS 0 PUBLISH to the connected client.
    pub fn send(&self, topic: &str, payload: &[u8]) {
        let mut body = Vec::new();
        put_str(&mut body, topic);
        body.push(0); // no properties
        body.extend_from_slice(payload);
        let st = self.state.lock().unwrap();
        let mut s = st.stream.as_ref().expect("a connected client").1.try_clone().unwrap();
        s.write_all(&packet(0x30, &body)).unwrap();
    }
}

fn serve(n: usize, mut s: TcpStream, st: &Mutex<SatState>) -> std::io::Result<()> {
    loop {
        let (kind, body) = read_packet(&mut s)?;
        match kind >> 4 {
            1 => {
                let c = parse_connect(&body);
                let mut g = st.lock().unwrap();
                let seen = g.connects.iter().any(|p| p.client_id == c.client_id && p.reason == 0);
                let reason = match (&c.method, &c.data) {
                    (Some(m), _) if m != "K8S-SAT" => 0x8C, // bad authentication method
                    (Some(_), Some(d)) if *d == g.accept => 0x00,
                    _ => 0x87, // not authorized
                };
                let present = (reason == 0 && !c.clean_start && seen) as u8;
                s.write_all(&packet(0x20, &[present, reason, 0]))?;
                g.connects.push(Connect { reason, ..c });
                if reason != 0 {
                    return Ok(());
                }
                g.stream = Some((n, s.try_clone()?));
            }
            3 => {
                let qos = (kind >> 1) & 3;
                let mut r = Reader(&body);
                let topic = r.str();
                let pkid = if qos > 0 { Some(r.u16()) } else { None };
                r.skip_properties();
                st.lock().unwrap().published.push((topic, r.0.to_vec()));
                if let Some(id) = pkid {
                    s.write_all(&packet(0x40, &id.to_be_bytes()))?;
                }
            }
            8 | 10 => {
                let mut r = Reader(&body);
                let pkid = r.u16();
                r.skip_properties();
                let mut ack = pkid.to_be_bytes().to_vec();
                ack.push(0);
                while !r.0.is_empty() {
                    let filter = r.str();
                    if kind >> 4 == 8 {
                        r.u8();
                        // SUBACK: granted QoS 1, or not authorized.
                        ack.push(if filter.starts_with("forbidden/") { 0x87 } else { 1 });
                    } else {
                        ack.push(0); // UNSUBACK: success
                    }
                }
                s.write_all(&packet(if kind >> 4 == 8 { 0x90 } else { 0xB0 }, &ack))?;
            }
            12 => s.write_all(&[0xD0, 0])?,
            14 => {
                let mut g = st.lock().unwrap();
                g.disconnects.push(body.first().copied().unwrap_or(0));
                // The client may already be connected again on a new socket.
                if g.stream.as_ref().is_some_and(|(m, _)| *m == n) {
                    g.stream = None;
                }
                return s.shutdown(std::net::Shutdown::Both);
            }
            _ => {} // PUBACK and others: nothing to do
        }
    }
}

fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let kind = b[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        s.read_exact(&mut b)?;
        len |= ((b[0] & 0x7F) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![kind];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        p.push(byte);
        if n == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let v = self.0[0];
        self.0 = &self.0[1..];
        v
    }
    fn u16(&mut self) -> u16 {
        (self.u8() as u16) << 8 | self.u8() as u16
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = self.u16() as usize;
        let v = self.0[..n].to_vec();
        self.0 = &self.0[n..];
        v
    }
    fn str(&mut self) -> String {
        String::from_utf8(self.bytes()).unwrap()
    }
    fn varint(&mut self) -> usize {
        let (mut v, mut shift) = (0usize, 0);
        loop {
            let b = self.u8();
            v |= ((b & 0x7F) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return v;
            }
        }
    }
    /// Reads a property block; returns the authentication method and data.
    fn properties(&mut self) -> (Option<String>, Option<Vec<u8>>) {
        let len = self.varint();
        let mut r = Reader(&self.0[..len]);
        self.0 = &self.0[len..];
        let (mut method, mut data) = (None, None);
        while !r.0.is_empty() {
            match r.u8() {
                0x15 => method = Some(r.str()),
                0x16 => data = Some(r.bytes()),
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                    r.u8();
                }
                0x13 | 0x21 | 0x22 | 0x23 => {
                    r.u16();
                }
                0x02 | 0x11 | 0x18 | 0x27 => {
                    r.0 = &r.0[4..];
                }
                0x0B => {
                    r.varint();
                }
                0x03 | 0x08 | 0x09 | 0x12 | 0x1A | 0x1C | 0x1F => {
                    r.bytes();
                }
                0x26 => {
                    r.bytes();
                    r.bytes();
                }
                other => panic!("unknown MQTT property {other:#x}"),
            }
        }
        (method, data)
    }
    fn skip_properties(&mut self) {
        self.properties();
    }
}

fn parse_connect(body: &[u8]) -> Connect {
    let mut r = Reader(body);
    assert_eq!(r.str(), "MQTT");
    assert_eq!(r.u8(), 5, "MQTT v5");
    let flags = r.u8();
    r.u16(); // keep alive
    let (method, data) = r.properties();
    let client_id = r.str();
    Connect {
        client_id,
        clean_start: flags & 0x02 != 0,
        method,
        data,
        reason: 0,
    }
}
