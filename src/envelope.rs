//! Ingest payload forms, detected per message, parsed without allocating:
//!
//! 1. the design's JSON envelope: `device_id`, `timestamp`, `image_data`
//!    (base64 JPEG), `metadata`;
//! 2. the `image_snapshot` v1 envelope: `message_type`, `schema_version`,
//!    `camera_id`, `device_name`, `timestamp`, `image_data`, `metadata`,
//!    `correlation_id`, `location`;
//! 3. raw JPEG bytes (AIO Media Connector snapshot-to-mqtt), the device
//!    being named by the topic.
//!
//! Owns: form detection, field extraction, base64 decoding into a buffer it
//! is handed. Knows nothing of topics, slots or MQTT.

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use crate::json::{self, Value};

/// Standard alphabet; padding optional (some cameras strip it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The design's JSON: `device_id`, `timestamp`, base64 `image_data`, `metadata`.
    DeviceEnvelope,
    ImageSnapshot,
    RawJpeg,
    /// A JPEG body posted to `/infer`, or a file given to the `infer` command.
    OneShot,
    /// A sensor reading (JSON numbers) for a sensor model (`sensor.rs`).
    Reading,
}

impl Form {
    pub const ALL: [Form; 5] = [
        Form::DeviceEnvelope,
        Form::ImageSnapshot,
        Form::RawJpeg,
        Form::OneShot,
        Form::Reading,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Form::DeviceEnvelope => "device_envelope",
            Form::ImageSnapshot => "image_snapshot",
            Form::RawJpeg => "raw_jpeg",
            Form::OneShot => "oneshot",
            Form::Reading => "sensor_reading",
        }
    }
}

/// Where the JPEG bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image<'a> {
    Raw(&'a [u8]),
    /// Base64 text, still JSON-escaped when `escaped`.
    Base64 {
        text: &'a [u8],
        escaped: bool,
    },
}

/// A parsed message, borrowing from the payload. `*_json` fields are raw,
/// validated JSON text to pass through into results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub form: Form,
    pub device_id: Option<&'a str>,
    pub image: Image<'a>,
    pub timestamp_json: Option<&'a [u8]>,
    pub metadata_json: Option<&'a [u8]>,
    pub correlation_id_json: Option<&'a [u8]>,
    pub location_json: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    BadJson(json::SyntaxError),
    /// A field is missing or has the wrong type.
    BadField {
        field: &'static str,
        expected: &'static str,
    },
    UnsupportedSchema,
    BadBase64(String),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::BadJson(e) => {
                write!(f, "payload starts like JSON but is not valid: {e}")
            }
            EnvelopeError::BadField { field, expected } => {
                write!(f, "envelope field `{field}`: expected {expected}")
            }
            EnvelopeError::UnsupportedSchema => {
                f.write_str("image_snapshot envelope with a schema_version other than 1.x")
            }
            EnvelopeError::BadBase64(e) => write!(f, "`image_data` is not valid base64: {e}"),
        }
    }
}

impl<'a> Envelope<'a> {
    /// Raw image bytes: no envelope, nothing but the image.
    pub fn raw(payload: &'a [u8]) -> Envelope<'a> {
        Envelope {
            form: Form::RawJpeg,
            device_id: None,
            image: Image::Raw(payload),
            timestamp_json: None,
            metadata_json: None,
            correlation_id_json: None,
            location_json: None,
        }
    }
}

/// Whether the payload is a JSON object (an envelope) rather than raw image bytes.
pub fn is_json_object(payload: &[u8]) -> bool {
    payload.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{')
}

/// Detects the form and parses. Payloads that are neither JSON objects nor
/// JPEGs come back as `RawJpeg` and are refused by the decoder with the reason.
pub fn parse(payload: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    if !is_json_object(payload) {
        return Ok(Envelope::raw(payload));
    }
    let mut f = Fields::default();
    json::for_each_member(payload, |key, v| match key {
        b"message_type" => f.message_type = Some(v),
        b"schema_version" => f.schema_version = Some(v),
        b"device_id" => f.device_id = Some(v),
        b"camera_id" => f.camera_id = Some(v),
        b"device_name" => f.device_name = Some(v),
        b"image_data" => f.image_data = Some(v),
        b"timestamp" => f.timestamp = Some(v),
        b"metadata" => f.metadata = Some(v),
        b"correlation_id" => f.correlation_id = Some(v),
        b"location" => f.location = Some(v),
        _ => {}
    })
    .map_err(EnvelopeError::BadJson)?;

    let snapshot = match f.message_type {
        Some(v) if v.as_plain_str() == Some("image_snapshot") => true,
        None => f.camera_id.is_some(),
        Some(_) => false,
    };
    let (form, device) = if snapshot {
        if let Some(v) = f.schema_version {
            if !v.as_plain_str().is_some_and(|s| s == "1" || s.starts_with("1.")) {
                return Err(EnvelopeError::UnsupportedSchema);
            }
        }
        let dev = plain_str(f.camera_id, "camera_id")?.or(plain_str(f.device_name, "device_name")?);
        (
            Form::ImageSnapshot,
            dev.ok_or(EnvelopeError::BadField {
                field: "camera_id",
                expected: "a string",
            })?,
        )
    } else {
        let dev = plain_str(f.device_id, "device_id")?;
        (
            Form::DeviceEnvelope,
            dev.ok_or(EnvelopeError::BadField {
                field: "device_id",
                expected: "a string",
            })?,
        )
    };
    if device.is_empty() {
        return Err(EnvelopeError::BadField {
            field: "device_id",
            expected: "a non-empty string",
        });
    }
    let image = match f.image_data {
        Some(Value::Str { raw, escaped }) => Image::Base64 { text: raw, escaped },
        _ => {
            return Err(EnvelopeError::BadField {
                field: "image_data",
                expected: "a base64 JPEG string",
            })
        }
    };
    let metadata = match f.metadata {
        None | Some(Value::Null) | Some(Value::Object(_)) => raw_json(f.metadata, payload),
        Some(_) => {
            return Err(EnvelopeError::BadField {
                field: "metadata",
                expected: "an object",
            })
        }
    };
    Ok(Envelope {
        form,
        device_id: Some(device),
        image,
        timestamp_json: raw_json(f.timestamp, payload),
        metadata_json: metadata,
        correlation_id_json: raw_json(f.correlation_id, payload),
        location_json: raw_json(f.location, payload),
    })
}

#[derive(Default)]
struct Fields<'a> {
    message_type: Option<Value<'a>>,
    schema_version: Option<Value<'a>>,
    device_id: Option<Value<'a>>,
    camera_id: Option<Value<'a>>,
    device_name: Option<Value<'a>>,
    image_data: Option<Value<'a>>,
    timestamp: Option<Value<'a>>,
    metadata: Option<Value<'a>>,
    correlation_id: Option<Value<'a>>,
    location: Option<Value<'a>>,
}

/// A present, non-null value's JSON text.
fn raw_json<'a>(v: Option<Value<'a>>, payload: &'a [u8]) -> Option<&'a [u8]> {
    v.filter(|v| *v != Value::Null).map(|v| v.raw_json(payload))
}

fn plain_str<'a>(v: Option<Value<'a>>, field: &'static str) -> Result<Option<&'a str>, EnvelopeError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_plain_str().map(Some).ok_or(EnvelopeError::BadField {
            field,
            expected: "a plain string without escape sequences",
        }),
    }
}

/// Decodes base64 `text` into `out` (whose length is its fixed capacity);
/// `scratch` takes the unescaped text when the JSON string had escapes.
/// Returns the decoded length.
pub fn decode_base64(
    text: &[u8],
    escaped: bool,
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<usize, EnvelopeError> {
    let text = if escaped {
        if !json::unescape_ascii_into(text, scratch) {
            return Err(EnvelopeError::BadBase64("escape sequence that is not base64".into()));
        }
        scratch.as_slice()
    } else {
        text
    };
    // Tolerate a data URI prefix: data:image/jpeg;base64,....
    let text = match text.strip_prefix(b"data:") {
        Some(rest) => match rest.iter().position(|&c| c == b',') {
            Some(i) => &rest[i + 1..],
            None => return Err(EnvelopeError::BadBase64("data URI without a comma".into())),
        },
        None => text,
    };
    if text.is_empty() {
        return Err(EnvelopeError::BadBase64("it is empty".into()));
    }
    if text.len() / 4 * 3 > out.len() + 3 {
        return Err(EnvelopeError::BadBase64(format!(
            "decoded image would exceed the {} byte buffer",
            out.len()
        )));
    }
    B64.decode_slice(text, out)
        .map_err(|e| EnvelopeError::BadBase64(e.to_string()))
}

/// The instant an envelope's raw `timestamp` JSON names: a number of seconds
/// since the Unix epoch (milliseconds when it is above 1e11, as JavaScript
/// clocks send), or an RFC 3339 / ISO 8601 string (`2026-01-01T10:00:00.5Z`,
/// `+02:00` offsets, a space for the `T`). `None` for anything else.
pub fn timestamp_of(raw: &[u8]) -> Option<std::time::SystemTime> {
    use std::time::{Duration, UNIX_EPOCH};
    let text = std::str::from_utf8(raw).ok()?.trim();
    if let Some(s) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        let secs = rfc3339_seconds(s)?;
        return (secs >= 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(secs));
    }
    let n: f64 = text.parse().ok()?;
    let secs = if n > 1e11 { n / 1000.0 } else { n };
    (secs.is_finite() && (0.0..4e11).contains(&secs)).then(|| UNIX_EPOCH + Duration::from_secs_f64(secs))
}

/// Seconds since the epoch of `YYYY-MM-DD[T ]hh:mm:ss[.frac](Z|±hh:mm)`.
fn rfc3339_seconds(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + i64::from(c - b'0')))
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0.0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac = format!("0.{}", s.get(start..i)?).parse().ok()?;
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset) as f64 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_all_three_forms() {
        let d = parse(
            br#"{"device_id":"cam-1","timestamp":"2026-01-01T00:00:00Z","image_data":"/9j/","metadata":{"line":2}}"#,
        )
        .unwrap();
        assert_eq!(d.form, Form::DeviceEnvelope);
        assert_eq!(d.device_id, Some("cam-1"));
        assert_eq!(
            d.image,
            Image::Base64 {
                text: b"/9j/",
                escaped: false
            }
        );
        assert_eq!(d.metadata_json, Some(&br#"{"line":2}"#[..]));
        assert_eq!(d.timestamp_json, Some(&br#""2026-01-01T00:00:00Z""#[..]));

        let s = parse(br#"{"message_type":"image_snapshot","schema_version":"1.0","camera_id":"c7","device_name":"dock","timestamp":1767225600,"image_data":"\/9j\/","correlation_id":"abc","location":{"zone":"A"}}"#).unwrap();
        assert_eq!(s.form, Form::ImageSnapshot);
        assert_eq!(s.device_id, Some("c7"));
        assert_eq!(
            s.image,
            Image::Base64 {
                text: br"\/9j\/",
                escaped: true
            }
        );
        assert_eq!(s.correlation_id_json, Some(&br#""abc""#[..]));
        assert_eq!(s.timestamp_json, Some(&b"1767225600"[..]));

        let r = parse(&[0xFF, 0xD8, 0xFF, 0xE0]).unwrap();
        assert_eq!(r.form, Form::RawJpeg);
        assert_eq!(r.device_id, None);
    }

    #[test]
    fn refuses_bad_envelopes_with_reasons() {
        assert!(matches!(
            parse(b"{\"device_id\": \"x\", "),
            Err(EnvelopeError::BadJson(_))
        ));
        assert_eq!(
            parse(br#"{"device_id":"x"}"#).unwrap_err(),
            EnvelopeError::BadField {
                field: "image_data",
                expected: "a base64 JPEG string"
            }
        );
        assert_eq!(
            parse(br#"{"image_data":"AAAA"}"#).unwrap_err(),
            EnvelopeError::BadField {
                field: "device_id",
                expected: "a string"
            }
        );
        assert_eq!(
            parse(br#"{"message_type":"image_snapshot","schema_version":"2.0","camera_id":"c","image_data":""}"#)
                .unwrap_err(),
            EnvelopeError::UnsupportedSchema
        );
        assert_eq!(
            parse(br#"{"device_id":"x","image_data":"AAAA","metadata":[1]}"#).unwrap_err(),
            EnvelopeError::BadField {
                field: "metadata",
                expected: "an object"
            }
        );
    }

    #[test]
    fn base64_with_escapes_data_uri_and_errors() {
        let mut scratch = Vec::new();
        let mut out = vec![0u8; 16];
        let n = decode_base64(br"\/9j\/\n4A==", true, &mut scratch, &mut out).unwrap();
        assert_eq!(&out[..n], &[0xFF, 0xD8, 0xFF, 0xE0]);
        let n = decode_base64(b"data:image/jpeg;base64,/9j/4A", false, &mut scratch, &mut out).unwrap();
        assert_eq!(&out[..n], &[0xFF, 0xD8, 0xFF, 0xE0]);
        assert!(matches!(
            decode_base64(b"!!!!", false, &mut scratch, &mut out),
            Err(EnvelopeError::BadBase64(_))
        ));
        assert!(matches!(
            decode_base64(&[b'A'; 64], false, &mut scratch, &mut out),
            Err(EnvelopeError::BadBase64(_))
        ));
        assert!(matches!(
            decode_base64(b"", false, &mut scratch, &mut out),
            Err(EnvelopeError::BadBase64(_))
        ));
    }

    #[test]
    fn timestamps_as_cameras_send_them() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |raw: &str| timestamp_of(raw.as_bytes()).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
        assert_eq!(at("1767225600"), Some(1_767_225_600.0));
        assert_eq!(at("1767225600.25"), Some(1_767_225_600.25));
        assert_eq!(at("1767225600250"), Some(1_767_225_600.25), "milliseconds");
        assert_eq!(at(r#""2026-01-01T00:00:00Z""#), Some(1_767_225_600.0));
        assert_eq!(at(r#""2026-01-01 00:00:00.5Z""#), Some(1_767_225_600.5));
        assert_eq!(at(r#""2026-01-01T02:00:00+02:00""#), Some(1_767_225_600.0));
        assert_eq!(at(r#""2000-02-29T12:00:00Z""#), Some(951_825_600.0));
        for bad in [
            r#""yesterday""#,
            r#""2026-13-01T00:00:00Z""#,
            r#""2026-01-01T00:00:00""#,
            "-5",
            "null",
            "{}",
            "1e400",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
        assert!(timestamp_of(b"1767225600").unwrap() < UNIX_EPOCH + Duration::from_secs(1_767_225_601));
    }
}
