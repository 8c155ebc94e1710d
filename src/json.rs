//! Allocation-free JSON for the frame path: a validating scanner that borrows
//! the members of one top-level object, and a writer that appends to a reused
//! buffer.
//!
//! Owns: JSON syntax only. Knows nothing of envelopes or result schemas (see
//! `envelope.rs` and `result.rs`). Everything off the frame path (status
//! messages, `/models`, `check-config`) uses miniserde instead; miniserde's
//! `to_string` returns a fresh `String` and its `Map`/`Seq` are boxed, so it
//! cannot serve a frame without allocating.

use std::io::Write as _;

/// Deepest nesting accepted inside a value; deeper input is rejected, so a
/// hostile payload cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntaxError {
    pub offset: usize,
    pub what: &'static str,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.what)
    }
}

/// One member value, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// String contents between the quotes, still escaped when `escaped`.
    Str {
        raw: &'a [u8],
        escaped: bool,
    },
    /// The number's text, validated.
    Number(&'a [u8]),
    Bool(bool),
    Null,
    /// The whole object or array text, validated.
    Object(&'a [u8]),
    Array(&'a [u8]),
}

impl<'a> Value<'a> {
    /// The string's text when it needs no unescaping.
    pub fn as_plain_str(&self) -> Option<&'a str> {
        match *self {
            Value::Str { raw, escaped: false } => std::str::from_utf8(raw).ok(),
            _ => None,
        }
    }

    /// The value's JSON text (strings with their quotes), for passing through.
    pub fn raw_json(&self, whole: &'a [u8]) -> &'a [u8] {
        match *self {
            Value::Str { raw, .. } => {
                // The quotes sit right outside `raw` inside `whole`.
                let start = raw.as_ptr() as usize - whole.as_ptr() as usize - 1;
                &whole[start..start + raw.len() + 2]
            }
            Value::Number(r) | Value::Object(r) | Value::Array(r) => r,
            Value::Bool(true) => b"true",
            Value::Bool(false) => b"false",
            Value::Null => b"null",
        }
    }
}

/// Walks the members of a top-level JSON object, calling `member(key, value)`
/// for each. The whole document is validated, trailing bytes included.
pub fn for_each_member<'a>(input: &'a [u8], mut member: impl FnMut(&'a [u8], Value<'a>)) -> Result<(), SyntaxError> {
    let mut s = Scanner { b: input, i: 0 };
    s.ws();
    s.expect(b'{', "expected a JSON object")?;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.ws();
            let (key, _) = s.string()?;
            s.ws();
            s.expect(b':', "expected ':' after key")?;
            s.ws();
            let v = s.value(0)?;
            member(key, v);
            s.ws();
            match s.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(s.err("expected ',' or '}'")),
            }
        }
    }
    s.ws();
    if s.i != s.b.len() {
        return Err(s.err("trailing bytes after the object"));
    }
    Ok(())
}

/// Walks the elements of a JSON array, calling `element(value)` for each; the
/// whole text is validated, trailing bytes included.
pub fn for_each_element<'a>(input: &'a [u8], mut element: impl FnMut(Value<'a>)) -> Result<(), SyntaxError> {
    let mut s = Scanner { b: input, i: 0 };
    s.ws();
    s.expect(b'[', "expected a JSON array")?;
    s.ws();
    if s.peek() == Some(b']') {
        s.i += 1;
    } else {
        loop {
            s.ws();
            let v = s.value(0)?;
            element(v);
            s.ws();
            match s.next() {
                Some(b',') => continue,
                Some(b']') => break,
                _ => return Err(s.err("expected ',' or ']'")),
            }
        }
    }
    s.ws();
    if s.i != s.b.len() {
        return Err(s.err("trailing bytes after the array"));
    }
    Ok(())
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += c.is_some() as usize;
        c
    }
    fn err(&self, what: &'static str) -> SyntaxError {
        SyntaxError { offset: self.i, what }
    }
    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), SyntaxError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string; returns its raw contents and whether it holds escapes.
    fn string(&mut self) -> Result<(&'a [u8], bool), SyntaxError> {
        self.expect(b'"', "expected a string")?;
        let start = self.i;
        let mut escaped = false;
        loop {
            match self.next() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    match self.next() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                        Some(b'u') => {
                            for _ in 0..4 {
                                if !self.next().is_some_and(|c| c.is_ascii_hexdigit()) {
                                    return Err(self.err("bad \\u escape"));
                                }
                            }
                        }
                        _ => return Err(self.err("bad escape")),
                    }
                }
                Some(c) if c < 0x20 => return Err(self.err("control character in string")),
                Some(_) => {}
            }
        }
        let raw = &self.b[start..self.i - 1];
        if std::str::from_utf8(raw).is_err() {
            return Err(SyntaxError {
                offset: start,
                what: "string is not UTF-8",
            });
        }
        Ok((raw, escaped))
    }

    fn number(&mut self) -> Result<&'a [u8], SyntaxError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("bad number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(self.err("bad fraction"));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(self.err("bad exponent"));
            }
            self.digits();
        }
        Ok(&self.b[start..self.i])
    }
    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), SyntaxError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("unknown literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        match self.peek() {
            Some(b'"') => self.string().map(|(raw, escaped)| Value::Str { raw, escaped }),
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            Some(b't') => self.literal(b"true").map(|_| Value::Bool(true)),
            Some(b'f') => self.literal(b"false").map(|_| Value::Bool(false)),
            Some(b'n') => self.literal(b"null").map(|_| Value::Null),
            Some(open @ (b'{' | b'[')) => {
                let start = self.i;
                self.i += 1;
                let close = if open == b'{' { b'}' } else { b']' };
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                } else {
                    loop {
                        self.ws();
                        if open == b'{' {
                            self.string()?;
                            self.ws();
                            self.expect(b':', "expected ':' after key")?;
                            self.ws();
                        }
                        self.value(depth + 1)?;
                        self.ws();
                        match self.next() {
                            Some(b',') => continue,
                            Some(c) if c == close => break,
                            _ => return Err(self.err("expected ',' or a closing bracket")),
                        }
                    }
                }
                let raw = &self.b[start..self.i];
                Ok(if open == b'{' {
                    Value::Object(raw)
                } else {
                    Value::Array(raw)
                })
            }
            _ => Err(self.err("expected a value")),
        }
    }
}

/// Unescapes a JSON string's raw contents into `out` (cleared first),
/// dropping whitespace: used for base64 text, where `\/` and `\n` occur.
/// Returns false on an escape that is not plain ASCII (never valid base64).
pub fn unescape_ascii_into(raw: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        i += 1;
        let c = if c == b'\\' {
            let e = raw.get(i).copied().unwrap_or(b'\\');
            i += 1;
            match e {
                b'/' => b'/',
                b'\\' => b'\\',
                b'"' => b'"',
                b'n' | b'r' | b't' | b'b' | b'f' => continue,
                _ => return false,
            }
        } else {
            c
        };
        if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    true
}

/// Appends JSON to a reused buffer. Keys and strings are escaped; non-finite
/// numbers are written as `null`. Commas are tracked per nesting level.
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    /// Bit i set: the container at depth i already holds a member.
    nonempty: u64,
    depth: u32,
    /// A key was just written: the next value takes no comma.
    after_key: bool,
}

impl<'a> Writer<'a> {
    /// Clears `buf` and starts writing into it.
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        Writer {
            buf,
            nonempty: 0,
            depth: 0,
            after_key: false,
        }
    }

    fn value_start(&mut self) {
        if self.after_key {
            self.after_key = false;
            return;
        }
        let bit = 1u64 << self.depth;
        if self.nonempty & bit != 0 {
            self.buf.push(b',');
        }
        self.nonempty |= bit;
    }

    fn open(&mut self, c: u8) -> &mut Self {
        self.value_start();
        self.buf.push(c);
        self.depth += 1;
        debug_assert!(self.depth < 64, "JSON writer nesting too deep");
        self.nonempty &= !(1u64 << self.depth);
        self
    }
    fn close(&mut self, c: u8) -> &mut Self {
        self.buf.push(c);
        self.depth -= 1;
        self
    }
    pub fn begin_object(&mut self) -> &mut Self {
        self.open(b'{')
    }
    pub fn end_object(&mut self) -> &mut Self {
        self.close(b'}')
    }
    pub fn begin_array(&mut self) -> &mut Self {
        self.open(b'[')
    }
    pub fn end_array(&mut self) -> &mut Self {
        self.close(b']')
    }

    /// Starts an object member; the value call that follows completes it.
    pub fn key(&mut self, k: &str) -> &mut Self {
        self.value_start();
        escape_str(self.buf, k);
        self.buf.push(b':');
        self.after_key = true;
        self
    }

    /// Starts an object member whose key is written from arguments, escaped.
    pub fn key_fmt(&mut self, k: std::fmt::Arguments<'_>) -> &mut Self {
        self.value_start();
        self.buf.push(b'"');
        let _ = std::fmt::Write::write_fmt(&mut EscapingWriter(self.buf), k);
        self.buf.extend_from_slice(b"\":");
        self.after_key = true;
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.value_start();
        escape_str(self.buf, s);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.value_start();
        let _ = write!(self.buf, "{v}");
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.value_start();
        let _ = write!(self.buf, "{v}");
        self
    }
    /// A float with at most `decimals` decimals (trailing zeros kept short).
    pub fn f64(&mut self, v: f64, decimals: usize) -> &mut Self {
        self.value_start();
        if v.is_finite() {
            let _ = write!(self.buf, "{v:.decimals$}");
        } else {
            self.buf.extend_from_slice(b"null");
        }
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.value_start();
        self.buf.extend_from_slice(if v { b"true" } else { b"false" });
        self
    }
    pub fn null(&mut self) -> &mut Self {
        self.value_start();
        self.buf.extend_from_slice(b"null");
        self
    }
    /// Writes already-valid JSON text (validated by the scanner) as a value.
    pub fn raw(&mut self, json: &[u8]) -> &mut Self {
        self.value_start();
        self.buf.extend_from_slice(json);
        self
    }
    /// `now` as an RFC 3339 UTC string with milliseconds.
    pub fn rfc3339(&mut self, now: std::time::SystemTime) -> &mut Self {
        let d = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
        let (y, m, day) = civil_from_days(days);
        self.fmt_str(format_args!(
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            d.subsec_millis()
        ))
    }
    /// Writes a string value from arguments, escaping as it goes.
    pub fn fmt_str(&mut self, args: std::fmt::Arguments<'_>) -> &mut Self {
        self.value_start();
        self.buf.push(b'"');
        let mut w = EscapingWriter(self.buf);
        let _ = std::fmt::Write::write_fmt(&mut w, args);
        self.buf.push(b'"');
        self
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

struct EscapingWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for EscapingWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_body(self.0, s);
        Ok(())
    }
}

fn escape_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    escape_body(buf, s);
    buf.push(b'"');
}

fn escape_body(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            let _ = write!(buf, "\\u{c:04x}");
        } else {
            buf.extend_from_slice(esc);
        }
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn members(s: &str) -> Result<Vec<(String, Value<'_>)>, SyntaxError> {
        let mut v = Vec::new();
        for_each_member(s.as_bytes(), |k, val| {
            v.push((String::from_utf8(k.to_vec()).unwrap(), val))
        })?;
        Ok(v)
    }

    #[test]
    fn scans_members_and_validates() {
        let m = members(r#" {"a": "x\/y", "b": -1.5e3, "c": {"d": [1, {"e": null}]}, "f": true} "#).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[0].1,
            Value::Str {
                raw: br"x\/y",
                escaped: true
            }
        );
        assert_eq!(m[1].1, Value::Number(b"-1.5e3"));
        assert_eq!(m[2].1, Value::Object(br#"{"d": [1, {"e": null}]}"#));
        assert_eq!(m[3].1, Value::Bool(true));
        assert!(members("{}").unwrap().is_empty());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "[]",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1} x",
            "{\"a\":01}",
            "{\"a\":\"\u{1}\"}",
            "{\"a\":tru}",
            "{\"a\":[1,]}",
            "{\"a\":\"\\x\"}",
            "{\"a\":{\"b\" 1}}",
        ] {
            assert!(members(bad).is_err(), "accepted {bad:?}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(40), "]".repeat(40));
        assert_eq!(members(&deep).unwrap_err().what, "nesting too deep");
    }

    #[test]
    fn raw_json_of_string_includes_quotes() {
        let doc = br#"{"k":"v\"w"}"#;
        let mut got = None;
        for_each_member(doc, |_, v| got = Some(v.raw_json(doc))).unwrap();
        assert_eq!(got.unwrap(), br#""v\"w""#);
    }

    #[test]
    fn unescapes_base64_text() {
        let mut out = Vec::new();
        assert!(unescape_ascii_into(br"ab\/c\nd e", &mut out));
        assert_eq!(out, b"ab/cde");
        assert!(!unescape_ascii_into(br"\u00e9", &mut out));
    }

    #[test]
    fn writer_round_trips_through_miniserde() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.begin_object();
        w.key("s").str("q\"u\\o\nte\u{1}");
        w.key("n").u64(7);
        w.key("f").f64(1.23456, 3);
        w.key("nan").f64(f64::NAN, 3);
        w.key("arr").begin_array();
        w.i64(-1).bool(true).null();
        w.begin_object()
            .key("x")
            .fmt_str(format_args!("{}-{}", 1, "a\"b"))
            .end_object();
        w.end_array();
        w.key("raw").raw(br#"{"z":[1]}"#);
        w.end_object();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text,
            r#"{"s":"q\"u\\o\nte\u0001","n":7,"f":1.235,"nan":null,"arr":[-1,true,null,{"x":"1-a\"b"}],"raw":{"z":[1]}}"#
        );
        let v: miniserde::json::Value = miniserde::json::from_str(&text).unwrap();
        assert!(matches!(v, miniserde::json::Value::Object(_)));
    }

    #[test]
    fn rfc3339_dates() {
        let mut buf = Vec::new();
        Writer::new(&mut buf).rfc3339(UNIX_EPOCH + Duration::from_millis(1_767_225_600_123));
        assert_eq!(buf, b"\"2026-01-01T00:00:00.123Z\"");
        Writer::new(&mut buf).rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(buf, b"\"2000-02-29T00:00:00.000Z\"");
    }
}
