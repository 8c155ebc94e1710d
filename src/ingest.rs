//! Ingest: one incoming message -> a filled frame slot, or an error result.
//!
//! Owns: payload limits, envelope detection, device identity, routing a
//! topic to models, and copying the message into a slot (base64 decoded in
//! place). Runs before a worker sees the frame; does not decode JPEG.

use std::fmt;
use std::time::{Instant, SystemTime};

use crate::config::model::MAX_SENSOR_FIELDS;
use crate::envelope::{self, Envelope, Form, Image};
use crate::frame::{FrameError, Route};
use crate::frame::{Origin, ReadingWindow, Slot, MAX_DEVICE_LEN, MAX_TOPIC_LEN};
use crate::metrics::FailReason;
use crate::models::Models;
use crate::result::{self, Source};

/// A message that passed the checks that need no slot.
pub struct Admitted<'a> {
    pub envelope: Envelope<'a>,
    pub device: &'a str,
}

/// Checks size and envelope of a message on `topic` (already routed into
/// `routes`). `oneshot_device` marks a `/infer` body or CLI file: raw JPEG
/// from that device, no envelope.
pub fn admit<'a>(
    topic: &'a str,
    payload: &'a [u8],
    oneshot_device: Option<&'a str>,
    max_payload: usize,
    models: &'a Models,
    routes: &[Route],
) -> Result<Admitted<'a>, FrameError> {
    check_sizes(topic, payload, max_payload)?;
    let (envelope, device) = match oneshot_device {
        Some(d) => (
            Envelope {
                form: Form::OneShot,
                ..Envelope::raw(payload)
            },
            d,
        ),
        None => {
            let e = envelope::parse(payload)?;
            (
                e,
                e.device_id.unwrap_or_else(|| device_from_topic(topic, models, routes)),
            )
        }
    };
    if device.len() > MAX_DEVICE_LEN {
        return Err(FrameError::new(
            FailReason::BadEnvelope,
            format_args!("device id is longer than {MAX_DEVICE_LEN} bytes"),
        ));
    }
    Ok(Admitted { envelope, device })
}

/// The limits every message meets before its contents are read: payload and topic size.
fn check_sizes(topic: &str, payload: &[u8], max_payload: usize) -> Result<(), FrameError> {
    if payload.len() > max_payload {
        return Err(FrameError::new(
            FailReason::PayloadTooLarge,
            format_args!(
                "payload is {} bytes, over MAX_PAYLOAD_BYTES = {max_payload}",
                payload.len()
            ),
        ));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(FrameError::new(
            FailReason::BadEnvelope,
            format_args!("topic is longer than {MAX_TOPIC_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Keeps the routes a message goes to by what it is: a sensor reading goes to the sensor
/// models among them (a payload that is not a picture, on a topic some sensor model reads;
/// on a topic only sensor models read, anything is taken for a reading and refused if it is
/// not one), anything else to the picture models. Returns whether it is a reading.
pub fn split_by_kind(models: &Models, payload: &[u8], routes: &mut Vec<Route>) -> bool {
    let is_sensor = |r: &Route| models.list[r.model as usize].config.model_type.is_sensor();
    let sensors = routes.iter().filter(|r| is_sensor(r)).count();
    if sensors == 0 {
        return false;
    }
    let reading = sensors == routes.len() || crate::sensor::looks_like_reading(payload);
    routes.retain(|r| is_sensor(r) == reading);
    reading
}

/// Checks a sensor reading for each routed sensor model and appends each model's scaled row
/// to `rows` (in route order). Windows are not touched: see [`window_reading`].
pub fn admit_reading<'a>(
    topic: &'a str,
    payload: &'a [u8],
    oneshot_device: Option<&'a str>,
    max_payload: usize,
    models: &'a Models,
    routes: &[Route],
    rows: &mut Vec<f32>,
) -> Result<Admitted<'a>, FrameError> {
    check_sizes(topic, payload, max_payload)?;
    rows.clear();
    let mut first = None;
    for r in routes {
        let Some(s) = &models.list[r.model as usize].config.sensor else {
            continue;
        };
        let mut row = [0f32; MAX_SENSOR_FIELDS];
        let reading =
            crate::sensor::parse(payload, s, &mut row).map_err(|e| FrameError::new(FailReason::BadReading, e))?;
        rows.extend_from_slice(&row[..s.fields.len()]);
        first.get_or_insert(reading);
    }
    let reading = first.unwrap_or_default();
    let device = reading
        .device_id
        .or(oneshot_device)
        .unwrap_or_else(|| device_from_topic(topic, models, routes));
    if device.len() > MAX_DEVICE_LEN {
        return Err(FrameError::new(
            FailReason::BadEnvelope,
            format_args!("device id is longer than {MAX_DEVICE_LEN} bytes"),
        ));
    }
    Ok(Admitted {
        envelope: Envelope {
            form: Form::Reading,
            device_id: reading.device_id,
            image: Image::Raw(&payload[..0]),
            timestamp_json: reading.timestamp_json,
            metadata_json: reading.metadata_json,
            correlation_id_json: reading.correlation_id_json,
            location_json: None,
        },
        device,
    })
}

/// Adds an admitted reading's rows to each routed model's window of the slot's device, and
/// writes each full window into the slot ([`Slot::reading`]). Run by the ingest task, so a
/// device's readings join its windows in the order they arrived. A reading whose timestamp
/// does not come after the device's last one is refused (and joins no window).
pub fn window_reading(slot: &mut Slot, models: &Models, rows: &[f32], now: Instant) -> Result<(), FrameError> {
    let taken = ingest_timestamp(slot);
    let mut at = 0;
    for i in 0..slot.routes.len() {
        let model = &models.list[slot.routes[i].model as usize];
        let (Some(s), Some(w)) = (&model.config.sensor, &model.windows) else {
            continue;
        };
        let n = s.fields.len();
        let row = &rows[at..at + n];
        at += n;
        let start = slot.reading.len();
        let mut windows = w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let filled = windows
            .push(&slot.device, taken, row, now, &mut slot.reading)
            .map_err(|o| {
                let what = match o {
                    crate::sensor::Order::Duplicate => "repeats the timestamp of",
                    crate::sensor::Order::Backwards => "is older than",
                };
                FrameError::new(
                    FailReason::BadReading,
                    format_args!(
                        "out of order: the reading {what} `{}`'s last one for model `{}`",
                        slot.device, model.config.name
                    ),
                )
            })?;
        slot.reading_windows.push(ReadingWindow {
            start,
            len: slot.reading.len() - start,
            filled,
            size: s.window,
        });
    }
    Ok(())
}

/// The instant a reading's `timestamp` names, when it has one.
fn ingest_timestamp(slot: &Slot) -> Option<SystemTime> {
    slot.field(&slot.timestamp_json).and_then(envelope::timestamp_of)
}

/// A raw JPEG names its camera by topic: `{device_id}` or `{asset}` (AIO's
/// `azure-iot-operations/data/<asset>/<stream>`), else the whole topic.
pub fn device_from_topic<'a>(topic: &'a str, models: &Models, routes: &[Route]) -> &'a str {
    for r in routes {
        let f = &models.list[r.model as usize].config.input_topics[r.filter as usize];
        if let Some(v) = f.var(topic, "device_id").or_else(|| f.var(topic, "asset")) {
            return v;
        }
    }
    topic
}

/// Copies an admitted message into `slot` and decodes base64 in place.
/// On error the slot keeps the identity fields, so the error can be reported from it.
pub fn fill(slot: &mut Slot, topic: &str, payload: &[u8], a: &Admitted<'_>, origin: Origin) -> Result<(), FrameError> {
    slot.origin = origin;
    slot.form = a.envelope.form;
    slot.received_at = Instant::now();
    slot.taken_at = taken_at(&a.envelope);
    slot.topic.clear();
    slot.topic.push_str(topic);
    slot.device.clear();
    slot.device.push_str(a.device);
    slot.payload[..payload.len()].copy_from_slice(payload);
    slot.payload_len = payload.len();
    let base = payload.as_ptr() as usize;
    let range = |s: Option<&[u8]>| s.map(|s| s.as_ptr() as usize - base..s.as_ptr() as usize - base + s.len());
    let e = &a.envelope;
    slot.timestamp_json = range(e.timestamp_json);
    slot.metadata_json = range(e.metadata_json);
    slot.correlation_id_json = range(e.correlation_id_json);
    slot.location_json = range(e.location_json);
    match e.image {
        Image::Raw(bytes) => {
            slot.jpeg_in_payload = true;
            slot.jpeg_range = range(Some(bytes)).unwrap_or(0..0);
        }
        Image::Base64 { text, escaped } => {
            slot.jpeg_in_payload = false;
            let n = envelope::decode_base64(text, escaped, &mut slot.b64_scratch, &mut slot.jpeg)?;
            slot.jpeg_range = 0..n;
        }
    }
    Ok(())
}

/// When the frame was taken: its envelope's `timestamp`, else now (its arrival).
pub fn taken_at(e: &Envelope<'_>) -> SystemTime {
    e.timestamp_json
        .and_then(envelope::timestamp_of)
        .unwrap_or_else(SystemTime::now)
}

/// The models a message on `topic` goes to (and which of each one's input
/// filters matched), into `out`.
pub fn route(models: &Models, topic: &str, out: &mut Vec<Route>) {
    out.clear();
    for (mi, m) in models.list.iter().enumerate() {
        if let Some(fi) = m.config.input_topics.iter().position(|f| f.matches(topic)) {
            out.push(Route {
                model: mi as u16,
                filter: fi as u16,
            });
        }
    }
}

/// An error result for a message that never reached a slot.
pub fn write_early_error(buf: &mut Vec<u8>, topic: &str, payload: &[u8], http: bool, err: &FrameError) {
    write_unslotted(
        buf,
        topic,
        payload,
        http,
        err.reason.as_str(),
        format_args!("{}", err.detail),
    );
}

/// An error result (`code`, `reason`) for a message that holds no slot,
/// echoing what can be read of its envelope (its correlation id above all).
pub fn write_unslotted(
    buf: &mut Vec<u8>,
    topic: &str,
    payload: &[u8],
    http: bool,
    code: &str,
    reason: fmt::Arguments<'_>,
) {
    let env = if http || payload.len() > 64 << 20 {
        None
    } else {
        envelope::parse(payload).ok()
    };
    let src = Source {
        device_id: env.and_then(|e| e.device_id),
        form: env
            .map(|e| e.form.as_str())
            .unwrap_or(if http { "oneshot" } else { "unknown" }),
        topic,
        timestamp_json: env.and_then(|e| e.timestamp_json),
        correlation_id_json: env.and_then(|e| e.correlation_id_json),
        location_json: env.and_then(|e| e.location_json),
        metadata_json: env.and_then(|e| e.metadata_json),
    };
    result::write_error(buf, SystemTime::now(), &src, code, reason);
}

/// Per-source rate limit: at most one frame per `1 / fps` seconds from each
/// device; the rest are refused (and answered). Remembers at most
/// `health::MAX_CAMERAS` sources, forgetting the least recently seen.
pub struct RateLimit {
    interval: std::time::Duration,
    /// Each source's last admitted frame.
    last: crate::cameras::Table<Option<Instant>>,
}

impl RateLimit {
    /// `None` when `fps` is 0 (no limit).
    pub fn new(fps: f64) -> Option<RateLimit> {
        (fps > 0.0).then(|| RateLimit {
            interval: std::time::Duration::from_secs_f64(1.0 / fps),
            last: crate::cameras::Table::new(crate::health::MAX_CAMERAS),
        })
    }

    /// Whether a frame from `device` at `now` may pass.
    pub fn admit(&mut self, device: &str, now: Instant) -> bool {
        let last = self.last.touch(device, || None);
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limit_is_per_source() {
        let mut r = RateLimit::new(2.0).unwrap();
        let t = Instant::now();
        assert!(r.admit("a", t));
        assert!(r.admit("b", t), "another source has its own budget");
        assert!(!r.admit("a", t + Duration::from_millis(100)));
        assert!(r.admit("a", t + Duration::from_millis(500)));
        assert!(RateLimit::new(0.0).is_none());
    }

    #[test]
    fn made_up_device_ids_do_not_reset_a_real_cameras_budget() {
        let mut r = RateLimit::new(1.0).unwrap();
        let t = Instant::now();
        assert!(r.admit("real", t));
        for i in 0..2 * crate::health::MAX_CAMERAS {
            assert!(r.admit(&format!("fake-{i}"), t));
            if i % 1000 == 0 {
                assert!(!r.admit("real", t + Duration::from_millis(10)), "after {i} fake ids");
            }
        }
        assert!(!r.admit("real", t + Duration::from_millis(500)));
    }
}
