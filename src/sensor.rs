//! Sensor readings: one JSON reading -> the model's numbers, and each device's window of its
//! last readings.
//!
//! Owns: the reading's forms (named numeric fields at the top level, a `values` object of
//! them, or a `values` array in the config's field order), its checks (missing fields, wrong
//! types, numbers that are not finite, too many fields, timestamps that go backwards or
//! repeat), scaling, and the windows: at most `max_devices` devices (the least recently heard
//! forgotten first), a device silent for `device_timeout_s` starting afresh. A refused
//! reading never touches a window.
//!
//! Readings are windowed in the order they arrive, by the ingest task (one task, so two
//! workers can never reorder a device's readings); the window's numbers travel in the slot.

use std::time::{Duration, Instant, SystemTime};

use crate::cameras::Table;
use crate::config::model::{Sensor, MAX_SENSOR_FIELDS};
use crate::json::{self, Value};

/// Most members a reading may have; more is refused as too many fields.
pub const MAX_MEMBERS: usize = 256;

/// What a reading says besides its numbers (borrowed from the payload).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading<'a> {
    pub device_id: Option<&'a str>,
    /// The `timestamp` member's JSON text, and the instant it names.
    pub timestamp_json: Option<&'a [u8]>,
    pub timestamp: Option<SystemTime>,
    pub correlation_id_json: Option<&'a [u8]>,
    pub metadata_json: Option<&'a [u8]>,
}

/// Whether a payload looks like a sensor reading rather than a picture: a JSON object with
/// no image in it.
pub fn looks_like_reading(payload: &[u8]) -> bool {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return false;
    }
    let mut image = false;
    let ok = json::for_each_member(payload, |k, _| image |= matches!(k, b"image_data" | b"image" | b"data"));
    ok.is_ok() && !image
}

fn num(v: Value<'_>, name: &str) -> Result<f32, String> {
    match v {
        Value::Number(t) => {
            let x: f64 = std::str::from_utf8(t)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| format!("field `{name}` is not a number"))?;
            let x = x as f32;
            if x.is_finite() {
                Ok(x)
            } else {
                Err(format!("field `{name}` is not a finite number"))
            }
        }
        Value::Str { .. } => Err(format!("field `{name}` is a string; expected a number")),
        Value::Bool(_) => Err(format!("field `{name}` is a boolean; expected a number")),
        Value::Null => Err(format!("field `{name}` is null; expected a number")),
        Value::Object(_) => Err(format!("field `{name}` is an object; expected a number")),
        Value::Array(_) => Err(format!("field `{name}` is an array; expected a number")),
    }
}

/// A member that may be one of the model's fields: its value into `out`, or the first error.
fn take(s: &Sensor, key: &[u8], v: Value<'_>, seen: &mut [bool], out: &mut [f32], err: &mut Option<String>) {
    let Some(i) = s.fields.iter().position(|f| f.as_bytes() == key) else {
        return;
    };
    if seen[i] {
        err.get_or_insert_with(|| format!("field `{}` appears twice", s.fields[i]));
    }
    seen[i] = true;
    match num(v, &s.fields[i]) {
        Ok(x) => out[i] = x,
        Err(e) => {
            err.get_or_insert(e);
        }
    }
}

/// Reads `payload` into `out` (one value per configured field, scaled); the reason on error.
pub fn parse<'a>(payload: &'a [u8], s: &Sensor, out: &mut [f32]) -> Result<Reading<'a>, String> {
    let n = s.fields.len();
    debug_assert!(n <= MAX_SENSOR_FIELDS && out.len() >= n);
    let mut seen = [false; MAX_SENSOR_FIELDS];
    let mut r = Reading::default();
    let mut members = 0usize;
    let mut err: Option<String> = None;
    let mut values: Option<Value<'a>> = None;
    json::for_each_member(payload, |k, v| {
        members += 1;
        match k {
            b"device_id" => r.device_id = v.as_plain_str(),
            b"timestamp" => r.timestamp_json = Some(v.raw_json(payload)),
            b"correlation_id" => r.correlation_id_json = Some(v.raw_json(payload)),
            b"metadata" => r.metadata_json = Some(v.raw_json(payload)),
            b"values" => values = Some(v),
            _ => take(s, k, v, &mut seen, out, &mut err),
        }
    })
    .map_err(|e| format!("not a JSON reading: {e}"))?;
    if members > MAX_MEMBERS {
        return Err(format!("too many fields: {members}, at most {MAX_MEMBERS}"));
    }
    match values {
        Some(Value::Array(a)) => {
            let mut i = 0usize;
            json::for_each_element(a, |v| {
                if i < n {
                    take(s, s.fields[i].as_bytes(), v, &mut seen, out, &mut err);
                }
                i += 1;
            })
            .map_err(|e| format!("`values`: {e}"))?;
            if i > n {
                return Err(format!(
                    "too many fields: `values` has {i}, the model takes {n} ({})",
                    s.fields.join(", ")
                ));
            }
        }
        Some(Value::Object(o)) => {
            let mut inner = 0usize;
            json::for_each_member(o, |k, v| {
                inner += 1;
                take(s, k, v, &mut seen, out, &mut err);
            })
            .map_err(|e| format!("`values`: {e}"))?;
            if inner > MAX_MEMBERS {
                return Err(format!("too many fields: `values` has {inner}, at most {MAX_MEMBERS}"));
            }
        }
        Some(_) => return Err("`values` must be an array of numbers or an object of named numbers".into()),
        None => {}
    }
    if let Some(e) = err {
        return Err(e);
    }
    if let Some(i) = seen[..n].iter().position(|s| !s) {
        return Err(format!(
            "missing field `{}` (the model takes {})",
            s.fields[i],
            s.fields.join(", ")
        ));
    }
    if let Some(t) = r.timestamp_json {
        r.timestamp = Some(
            crate::envelope::timestamp_of(t).ok_or("`timestamp` is not epoch seconds (or ms) or an RFC 3339 time")?,
        );
    }
    for (i, ((x, m), sd)) in out[..n].iter_mut().zip(&s.mean).zip(&s.std).enumerate() {
        *x = (*x - m) / sd;
        if !x.is_finite() {
            return Err(format!("field `{}` is out of range once scaled", s.fields[i]));
        }
    }
    Ok(r)
}

/// One device's last readings, scaled: a ring of `window` rows of `fields` values.
#[derive(Debug)]
struct DeviceWindow {
    rows: Vec<f32>,
    /// Rows filled so far (at most `window`), and the next row to write.
    filled: usize,
    next: usize,
    last_timestamp: Option<SystemTime>,
    last_heard: Instant,
}

/// Every device's window for one sensor model.
#[derive(Debug)]
pub struct Windows {
    table: Table<DeviceWindow>,
    window: usize,
    fields: usize,
    timeout: Duration,
}

/// Why a reading could not join its device's window.
#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    Duplicate,
    Backwards,
}

impl Windows {
    pub fn new(s: &Sensor) -> Windows {
        Windows {
            table: Table::new(s.max_devices),
            window: s.window,
            fields: s.fields.len(),
            timeout: Duration::from_secs(s.device_timeout_s),
        }
    }

    pub fn devices(&self) -> usize {
        self.table.len()
    }

    /// Adds `row` (scaled values) to `device`'s window and appends the window, oldest row
    /// first, to `out` once it is full. Returns how many readings the window holds. A reading
    /// whose timestamp is not after the device's last one is refused and changes nothing.
    pub fn push(
        &mut self,
        device: &str,
        timestamp: Option<SystemTime>,
        row: &[f32],
        now: Instant,
        out: &mut Vec<f32>,
    ) -> Result<usize, Order> {
        let (window, fields, timeout) = (self.window, self.fields, self.timeout);
        let w = self.table.touch(device, || DeviceWindow {
            rows: vec![0.0; window * fields],
            filled: 0,
            next: 0,
            last_timestamp: None,
            last_heard: now,
        });
        if now.saturating_duration_since(w.last_heard) > timeout {
            // Silent too long: what it said before is no context for what it says now.
            w.filled = 0;
            w.next = 0;
            w.last_timestamp = None;
        }
        if let (Some(t), Some(last)) = (timestamp, w.last_timestamp) {
            if t == last {
                return Err(Order::Duplicate);
            }
            if t < last {
                return Err(Order::Backwards);
            }
        }
        w.last_heard = now;
        if timestamp.is_some() {
            w.last_timestamp = timestamp;
        }
        w.rows[w.next * fields..(w.next + 1) * fields].copy_from_slice(&row[..fields]);
        w.next = (w.next + 1) % window;
        w.filled = (w.filled + 1).min(window);
        if w.filled == window {
            // Oldest first: the row after the newest, round to the newest.
            for k in 0..window {
                let r = (w.next + k) % window;
                out.extend_from_slice(&w.rows[r * fields..(r + 1) * fields]);
            }
        }
        Ok(w.filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::SensorScore;

    fn cfg(window: usize) -> Sensor {
        Sensor {
            fields: vec!["temperature".into(), "vibration".into(), "current".into()],
            mean: vec![60.0, 2.0, 10.0],
            std: vec![5.0, 0.5, 1.0],
            window,
            score: SensorScore::ReconstructionError,
            threshold: 1.0,
            max_devices: 2,
            device_timeout_s: 60,
        }
    }

    #[test]
    fn every_form_reads_the_same_scaled_values() {
        let s = cfg(1);
        let mut out = [0f32; 3];
        for text in [
            r#"{"device_id":"pump-1","timestamp":1767225600,"temperature":65,"vibration":2.5,"current":9}"#,
            r#"{"device_id":"pump-1","timestamp":"2026-01-01T00:00:00Z","values":{"current":9,"vibration":2.5,"temperature":65}}"#,
            r#"{"device_id":"pump-1","timestamp":1767225600000,"values":[65,2.5,9],"extra":"ignored"}"#,
        ] {
            let r = parse(text.as_bytes(), &s, &mut out).unwrap();
            assert_eq!(out, [1.0, 1.0, -1.0], "{text}");
            assert_eq!(r.device_id, Some("pump-1"));
            assert_eq!(
                r.timestamp,
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
            );
        }
    }

    #[test]
    fn bad_readings_say_why() {
        let s = cfg(1);
        let mut out = [0f32; 3];
        let many: String = (0..300).map(|i| format!(r#","f{i}":1"#)).collect();
        let too_many = format!(r#"{{"temperature":1,"vibration":1,"current":1{many}}}"#);
        for (text, why) in [
            (r#"{"temperature":1,"vibration":2}"#, "missing field `current`"),
            (
                r#"{"temperature":"hot","vibration":2,"current":3}"#,
                "`temperature` is a string",
            ),
            (
                r#"{"temperature":null,"vibration":2,"current":3}"#,
                "`temperature` is null",
            ),
            (
                r#"{"temperature":1e999,"vibration":2,"current":3}"#,
                "not a finite number",
            ),
            (r#"{"values":[1,2,3,4]}"#, "too many fields"),
            (r#"{"values":[1,2]}"#, "missing field `current`"),
            (r#"{"values":"1,2,3"}"#, "`values` must be"),
            (
                r#"{"temperature":1,"temperature":1,"vibration":2,"current":3}"#,
                "appears twice",
            ),
            (
                r#"{"temperature":1,"vibration":2,"current":3,"timestamp":"yesterday"}"#,
                "`timestamp`",
            ),
            (r#"[1,2,3]"#, "not a JSON reading"),
            (too_many.as_str(), "too many fields"),
        ] {
            let e = parse(text.as_bytes(), &s, &mut out).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn windows_fill_in_order_refuse_going_back_and_expire() {
        let s = cfg(3);
        let mut w = Windows::new(&s);
        let t0 = Instant::now();
        let at = |secs: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + secs));
        let mut out = Vec::new();
        assert_eq!(w.push("a", at(1), &[1.0, 1.0, 1.0], t0, &mut out), Ok(1));
        assert_eq!(w.push("a", at(2), &[2.0, 2.0, 2.0], t0, &mut out), Ok(2));
        assert!(out.is_empty(), "not full yet");
        assert_eq!(w.push("a", at(2), &[9.0; 3], t0, &mut out), Err(Order::Duplicate));
        assert_eq!(w.push("a", at(1), &[9.0; 3], t0, &mut out), Err(Order::Backwards));
        assert_eq!(w.push("a", at(3), &[3.0, 3.0, 3.0], t0, &mut out), Ok(3));
        assert_eq!(
            out,
            [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0],
            "refused readings left no trace"
        );
        out.clear();
        assert_eq!(w.push("a", at(4), &[4.0; 3], t0, &mut out), Ok(3));
        assert_eq!(out, [2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0], "oldest first");
        // Another device has its own window; a third forgets the least recently heard.
        out.clear();
        assert_eq!(w.push("b", at(1), &[5.0; 3], t0, &mut out), Ok(1));
        assert_eq!(w.push("a", at(5), &[5.0; 3], t0, &mut out), Ok(3));
        assert_eq!(w.push("c", at(1), &[5.0; 3], t0, &mut out), Ok(1));
        assert_eq!(w.devices(), 2);
        assert_eq!(w.push("b", at(2), &[5.0; 3], t0, &mut out), Ok(1), "b was forgotten");
        // Silent past the timeout: a fresh window, and an earlier clock is accepted again.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(w.push("b", at(0), &[5.0; 3], later, &mut out), Ok(1));
    }
}
