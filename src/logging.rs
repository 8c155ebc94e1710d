//! The process's logger: `RUST_LOG` filters it (env_logger's syntax), `LOG_FORMAT` picks text
//! (env_logger's, with a log line's fields as `key=value`) or JSON, one object a line, for
//! Kubernetes log collectors.
//!
//! Owns: installing the logger and the JSON line format. A log line's fields are the `log`
//! crate's key-values (`log::warn!(model = name, reason = r; "...")`), so the same call site
//! feeds both formats.
//!
//! A JSON line is written into a reused per-thread buffer and goes to stderr in one write, so
//! lines from different threads never interleave and a line allocates nothing once its thread
//! has logged a line as long.

use std::cell::RefCell;
use std::io::Write as _;
use std::time::SystemTime;

use log::kv::{Key, Value, VisitSource};

use crate::config::LogFormat;
use crate::json::Writer;

/// Installs the logger for the process. Call once, before anything logs.
pub fn init(filter: &str, format: LogFormat) {
    let mut b = env_logger::Builder::new();
    b.parse_filters(filter);
    if format == LogFormat::Json {
        b.format(|out, record| {
            LINE.with_borrow_mut(|line| {
                json_line(line, SystemTime::now(), record);
                out.write_all(line)
            })
        });
    }
    b.init();
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The names a line's own members take; a field of the same name is written as `field.NAME`.
const RESERVED: [&str; 4] = ["timestamp", "level", "target", "message"];

/// Writes one record as a JSON object and a newline into `line` (cleared first).
pub fn json_line(line: &mut Vec<u8>, now: SystemTime, record: &log::Record<'_>) {
    let mut w = Writer::new(line);
    w.begin_object();
    w.key("timestamp").rfc3339(now);
    w.key("level").str(record.level().as_str());
    w.key("target").str(record.target());
    w.key("message").fmt_str(*record.args());
    let _ = record.key_values().visit(&mut Fields(&mut w));
    w.end_object();
    line.push(b'\n');
}

/// Writes each key-value as a member: numbers and booleans as themselves, the rest as strings.
struct Fields<'w, 'b>(&'w mut Writer<'b>);

impl<'kvs> VisitSource<'kvs> for Fields<'_, '_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let w = &mut *self.0;
        let k = key.as_str();
        if RESERVED.contains(&k) {
            w.key_fmt(format_args!("field.{k}"));
        } else {
            w.key(k);
        }
        if let Some(v) = value.to_bool() {
            w.bool(v);
        } else if let Some(v) = value.to_u64() {
            w.u64(v);
        } else if let Some(v) = value.to_i64() {
            w.i64(v);
        } else if let Some(v) = value.to_f64() {
            w.f64(v, 6);
        } else {
            w.fmt_str(format_args!("{value}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniserde::json::{self, Value as J};
    use std::time::{Duration, UNIX_EPOCH};

    fn line(record: &log::Record<'_>) -> J {
        let mut buf = Vec::new();
        json_line(&mut buf, UNIX_EPOCH + Duration::from_millis(1_767_225_600_250), record);
        assert_eq!(buf.last(), Some(&b'\n'));
        assert!(
            !buf[..buf.len() - 1].contains(&b'\n'),
            "one line: {}",
            String::from_utf8_lossy(&buf)
        );
        json::from_str(std::str::from_utf8(&buf).unwrap()).unwrap()
    }

    fn get<'v>(v: &'v J, k: &str) -> &'v J {
        match v {
            J::Object(o) => o.get(k).unwrap_or_else(|| panic!("missing {k}")),
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn a_record_with_fields_is_one_json_object() {
        let kvs: [(&str, Value<'_>); 5] = [
            ("model", Value::from("yolo \"v12\"\nn")),
            ("count", Value::from(3u64)),
            ("delta", Value::from(-2i64)),
            ("ok", Value::from(true)),
            ("message", Value::from("a field named like a member")),
        ];
        let (name, why) = ("m", "bad\tfile");
        let v = line(
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("ai_edge_inference::registry")
                .args(format_args!("model `{name}` reload failed: {why}"))
                .key_values(&kvs)
                .build(),
        );
        assert!(matches!(get(&v, "timestamp"), J::String(s) if s == "2026-01-01T00:00:00.250Z"));
        assert!(matches!(get(&v, "level"), J::String(s) if s == "WARN"));
        assert!(matches!(get(&v, "target"), J::String(s) if s == "ai_edge_inference::registry"));
        assert!(matches!(get(&v, "message"), J::String(s) if s == "model `m` reload failed: bad\tfile"));
        assert!(matches!(get(&v, "model"), J::String(s) if s == "yolo \"v12\"\nn"));
        assert!(matches!(get(&v, "count"), J::Number(json::Number::U64(3))));
        assert!(matches!(get(&v, "delta"), J::Number(json::Number::I64(-2))));
        assert!(matches!(get(&v, "ok"), J::Bool(true)));
        assert!(matches!(get(&v, "field.message"), J::String(s) if s == "a field named like a member"));
    }
}
