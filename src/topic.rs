//! MQTT topic filters with named wildcards, and output topic templates.
//!
//! Owns: parsing `edge-ai/{business_unit}/+/...` style filters into the
//! subscription form (`+`), matching topics against them, and rendering
//! `{name}` templates from a matched topic without allocating. Knows nothing
//! of MQTT clients or payloads.

use std::fmt;

/// Names given to unnamed `+` levels by well-known topic layouts.
const EDGE_AI_NAMES: [&str; 3] = ["business_unit", "facility", "gateway_id"];
const AIO_NAMES: [&str; 2] = ["asset", "stream"];

/// Variables a template may use besides the filter's wildcards.
pub const BUILTIN_VARS: [&str; 2] = ["device_id", "model_name"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicError(pub String);

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`, bound to a variable name when one is known.
    One(Option<String>),
    /// `#`, only last.
    Rest,
}

/// A subscription filter, e.g. `edge-ai/+/+/+/camera/snapshots` or
/// `$share/vision/edge-ai/{business_unit}/{facility}/{gateway_id}/camera/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    /// What is sent in SUBSCRIBE (named levels replaced by `+`).
    subscription: String,
    /// Levels after any `$share/<group>/` prefix.
    levels: Vec<Level>,
}

impl TopicFilter {
    pub fn parse(text: &str) -> Result<TopicFilter, TopicError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TopicError("empty topic filter".into()));
        }
        let (share, body) = match text.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((group, body)) if !group.is_empty() && !group.contains(['+', '#']) => (Some(group), body),
                _ => return Err(TopicError(format!("`{text}`: expected `$share/<group>/<filter>`"))),
            },
            None => (None, text),
        };
        let raw: Vec<&str> = body.split('/').collect();
        let mut levels = Vec::with_capacity(raw.len());
        for (i, l) in raw.iter().enumerate() {
            let level = match *l {
                "#" if i + 1 == raw.len() => Level::Rest,
                "+" => Level::One(None),
                l if l.starts_with('{') && l.ends_with('}') && l.len() > 2 => {
                    let name = &l[1..l.len() - 1];
                    if !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
                        return Err(TopicError(format!("`{text}`: bad variable name `{name}`")));
                    }
                    Level::One(Some(name.to_owned()))
                }
                l if l.contains(['+', '#', '{', '}']) => {
                    return Err(TopicError(format!(
                        "`{text}`: level `{l}` mixes wildcards or braces with text (use `+`, `#` last, or `{{name}}`)"
                    )))
                }
                l => Level::Literal(l.to_owned()),
            };
            levels.push(level);
        }
        name_well_known(&mut levels);
        let mut subscription = String::new();
        if let Some(group) = share {
            subscription.push_str("$share/");
            subscription.push_str(group);
            subscription.push('/');
        }
        for (i, l) in levels.iter().enumerate() {
            if i > 0 {
                subscription.push('/');
            }
            subscription.push_str(match l {
                Level::Literal(s) => s,
                Level::One(_) => "+",
                Level::Rest => "#",
            });
        }
        Ok(TopicFilter { subscription, levels })
    }

    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// The filter as a config writes it, named levels as `{name}`: it parses back to this
    /// filter (`subscription` would lose the names).
    pub fn text(&self) -> String {
        let mut s = String::new();
        if let Some((group, _)) = self
            .subscription
            .strip_prefix("$share/")
            .and_then(|r| r.split_once('/'))
        {
            s.push_str("$share/");
            s.push_str(group);
            s.push('/');
        }
        for (i, l) in self.levels.iter().enumerate() {
            if i > 0 {
                s.push('/');
            }
            match l {
                Level::Literal(t) => s.push_str(t),
                Level::One(Some(n)) => {
                    s.push('{');
                    s.push_str(n);
                    s.push('}');
                }
                Level::One(None) => s.push('+'),
                Level::Rest => s.push('#'),
            }
        }
        s
    }

    /// The variable names this filter binds.
    pub fn var_names(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|l| match l {
            Level::One(Some(n)) => Some(n.as_str()),
            _ => None,
        })
    }

    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            match level {
                Level::Rest => return !(i == 0 && topic.starts_with('$')),
                Level::One(_) => match parts.next() {
                    Some(p) if !(i == 0 && p.starts_with('$')) => {}
                    _ => return false,
                },
                Level::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The value of variable `name` in `topic` (which must match this filter).
    pub fn var<'t>(&self, topic: &'t str, name: &str) -> Option<&'t str> {
        let idx = self
            .levels
            .iter()
            .position(|l| matches!(l, Level::One(Some(n)) if n == name))?;
        topic.split('/').nth(idx)
    }
}

/// Unnamed `+` levels in the design's and AIO's layouts get their usual names.
fn name_well_known(levels: &mut [Level]) {
    let names: &[&str] = match levels {
        [Level::Literal(a), ..] if a == "edge-ai" => &EDGE_AI_NAMES,
        [Level::Literal(a), Level::Literal(b), ..] if a == "azure-iot-operations" && b == "data" => &AIO_NAMES,
        _ => return,
    };
    let skip = if names.len() == AIO_NAMES.len() { 2 } else { 1 };
    for (level, name) in levels.iter_mut().skip(skip).zip(names) {
        if let Level::One(n @ None) = level {
            *n = Some((*name).to_owned());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(String),
}

/// An output topic template such as
/// `edge-ai/{business_unit}/{facility}/{gateway_id}/ai/inference/vision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    parts: Vec<Part>,
}

/// What a template is rendered from.
pub struct Bindings<'a> {
    pub filter: &'a TopicFilter,
    pub topic: &'a str,
    pub device_id: &'a str,
    pub model_name: &'a str,
}

impl TopicTemplate {
    pub fn parse(text: &str) -> Result<TopicTemplate, TopicError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| TopicError(format!("`{text}`: unclosed `{{`")))?;
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let name = &rest[open + 1..close];
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
                return Err(TopicError(format!("`{text}`: bad variable name `{name}`")));
            }
            parts.push(Part::Var(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(TopicError(format!("`{text}`: unmatched `}}`")));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if text.is_empty() || text.contains(['+', '#']) {
            return Err(TopicError(format!(
                "`{text}`: an output topic must be non-empty and hold no wildcard"
            )));
        }
        Ok(TopicTemplate {
            text: text.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn var_names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(n) => Some(n.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Checks that every variable is bound by `filter` or built in.
    pub fn check_against(&self, filter: &TopicFilter) -> Result<(), TopicError> {
        for name in self.var_names() {
            if !BUILTIN_VARS.contains(&name) && !filter.var_names().any(|n| n == name) {
                return Err(TopicError(format!(
                    "template `{}` uses {{{name}}}, which input topic `{}` does not bind (it binds: {})",
                    self.text,
                    filter.subscription(),
                    list_or_none(filter.var_names().chain(BUILTIN_VARS))
                )));
            }
        }
        Ok(())
    }

    /// Renders into `out` (cleared first). A variable without a value, or
    /// whose value would break the topic (empty, `+`, `#`), renders as `unknown`.
    pub fn render_into(&self, b: &Bindings<'_>, out: &mut String) {
        out.clear();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Var(name) => {
                    let v = match name.as_str() {
                        "device_id" => Some(b.device_id),
                        "model_name" => Some(b.model_name),
                        n => b.filter.var(b.topic, n),
                    };
                    match v {
                        Some(v) if !v.is_empty() && !v.contains(['+', '#', '/']) => out.push_str(v),
                        _ => out.push_str("unknown"),
                    }
                }
            }
        }
    }

    /// Renders a template from named values; `Err` names a variable without one.
    pub fn render_vars(&self, vars: &[(&str, &str)]) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Var(name) => match vars.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => return Err(name.clone()),
                },
            }
        }
        Ok(out)
    }

    /// Renders a template that only uses `{client_id}` (status topics).
    pub fn render_client(&self, client_id: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Var(_) => out.push_str(client_id),
            }
        }
        out
    }
}

fn list_or_none<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_ai_filter_names_its_wildcards() {
        let f = TopicFilter::parse("edge-ai/+/+/+/camera/snapshots").unwrap();
        assert_eq!(f.subscription(), "edge-ai/+/+/+/camera/snapshots");
        assert_eq!(
            f.var_names().collect::<Vec<_>>(),
            ["business_unit", "facility", "gateway_id"]
        );
        let t = "edge-ai/bu1/plant-7/gw-3/camera/snapshots";
        assert!(f.matches(t));
        assert_eq!(f.var(t, "facility"), Some("plant-7"));
        assert!(!f.matches("edge-ai/bu1/plant-7/camera/snapshots"));
        assert!(!f.matches("edge-ai/bu1/plant-7/gw/camera/snapshots/extra"));
    }

    #[test]
    fn aio_and_named_and_shared_filters() {
        let f = TopicFilter::parse("azure-iot-operations/data/+/+").unwrap();
        assert_eq!(
            f.var("azure-iot-operations/data/cam-12/snapshot", "asset"),
            Some("cam-12")
        );
        assert_eq!(
            f.var("azure-iot-operations/data/cam-12/snapshot", "stream"),
            Some("snapshot")
        );

        let f = TopicFilter::parse("$share/vision/site/{line}/#").unwrap();
        assert_eq!(f.subscription(), "$share/vision/site/+/#");
        assert!(f.matches("site/l2/cam/a"));
        assert!(f.matches("site/l2"));
        assert_eq!(f.var("site/l2/cam/a", "line"), Some("l2"));

        assert!(!TopicFilter::parse("#").unwrap().matches("$SYS/broker"));
        assert!(TopicFilter::parse("a/b#").is_err());
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("$share//a").is_err());
        assert!(TopicFilter::parse("a/{bad-name}").is_err());
    }

    #[test]
    fn template_renders_and_checks_bindings() {
        let f = TopicFilter::parse("edge-ai/+/+/+/camera/snapshots").unwrap();
        let t = TopicTemplate::parse("edge-ai/{business_unit}/{facility}/{gateway_id}/ai/inference/vision").unwrap();
        t.check_against(&f).unwrap();
        let mut out = String::new();
        let topic = "edge-ai/bu/fac/gw/camera/snapshots";
        t.render_into(
            &Bindings {
                filter: &f,
                topic,
                device_id: "cam",
                model_name: "m",
            },
            &mut out,
        );
        assert_eq!(out, "edge-ai/bu/fac/gw/ai/inference/vision");

        let aio = TopicFilter::parse("azure-iot-operations/data/+/+").unwrap();
        let err = t.check_against(&aio).unwrap_err().0;
        assert!(
            err.contains("{business_unit}") && err.contains("asset, stream"),
            "{err}"
        );

        let t2 = TopicTemplate::parse("out/{device_id}/{model_name}").unwrap();
        t2.check_against(&aio).unwrap();
        t2.render_into(
            &Bindings {
                filter: &aio,
                topic: "x",
                device_id: "a/b",
                model_name: "m",
            },
            &mut out,
        );
        assert_eq!(out, "out/unknown/m");

        assert!(TopicTemplate::parse("a/{x").is_err());
        assert!(TopicTemplate::parse("a/+/b").is_err());
        assert!(TopicTemplate::parse("a/{}").is_err());
        assert_eq!(
            TopicTemplate::parse("s/{client_id}/st").unwrap().render_client("c1"),
            "s/c1/st"
        );
    }
}
