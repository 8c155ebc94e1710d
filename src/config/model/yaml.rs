//! Typed getters over YAML values: each error names the file, the key and
//! what was expected. Knows no schema; `parse.rs` says which keys exist.

use yaml_rust2::Yaml;

use super::ConfigError;

pub(super) struct Doc {
    pub(super) file: String,
}

impl Doc {
    pub(super) fn err(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_owned(),
            message,
        }
    }

    pub(super) fn known_keys(&self, v: &Yaml, prefix: &str, known: &[&str]) -> Result<(), ConfigError> {
        let hash = match v {
            Yaml::Hash(h) => h,
            Yaml::BadValue => return Ok(()),
            other => {
                let key = prefix.trim_end_matches('.');
                return Err(self.err(key, format!("expected a mapping, found {}", kind(other))));
            }
        };
        for k in hash.keys() {
            let name = scalar_text(k).unwrap_or_default();
            if !known.contains(&name.as_str()) {
                return Err(self.err(
                    &format!("{prefix}{name}"),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn string(&self, v: &Yaml, key: &str) -> Result<Option<String>, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::String(s) => Ok(Some(s.trim().to_owned())),
            other => Err(self.err(key, format!("expected a string, found {}", kind(other)))),
        }
    }

    pub(super) fn float(&self, v: &Yaml, key: &str, default: f32, min: f32, max: f32) -> Result<f32, ConfigError> {
        let x = match v {
            Yaml::BadValue | Yaml::Null => return Ok(default),
            Yaml::Integer(i) => *i as f64,
            Yaml::Real(_) => v.as_f64().unwrap_or(f64::NAN),
            other => return Err(self.err(key, format!("expected a number, found {}", kind(other)))),
        };
        if !(min as f64..=max as f64).contains(&x) {
            return Err(self.err(key, format!("expected a number in {min}..={max}, found {x}")));
        }
        Ok(x as f32)
    }

    pub(super) fn int(&self, v: &Yaml, key: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(default),
            Yaml::Integer(i) if (min as i64..=max as i64).contains(i) => Ok(*i as u64),
            other => Err(self.err(
                key,
                format!("expected a whole number in {min}..={max}, found {}", kind(other)),
            )),
        }
    }

    pub(super) fn boolean(&self, v: &Yaml, key: &str, default: bool) -> Result<bool, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(default),
            Yaml::Boolean(b) => Ok(*b),
            other => Err(self.err(key, format!("expected true or false, found {}", kind(other)))),
        }
    }

    /// A list item: unlike a key, an item is never absent, so an empty one (`[224, ~]`,
    /// `[224, &a]`) is an error here instead of taking the key's default.
    pub(super) fn item<'a>(&self, v: &'a Yaml, key: &str) -> Result<&'a Yaml, ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Err(self.err(key, format!("a list item is empty (found {})", kind(v)))),
            v => Ok(v),
        }
    }

    pub(super) fn triple(&self, v: &Yaml, key: &str, default: [f32; 3]) -> Result<[f32; 3], ConfigError> {
        match v {
            Yaml::BadValue | Yaml::Null => Ok(default),
            Yaml::Array(a) if a.len() == 3 => {
                let mut out = [0.0; 3];
                for (i, x) in a.iter().enumerate() {
                    let k = format!("{key}[{i}]");
                    out[i] = self.float(self.item(x, &k)?, &k, 0.0, -1e6, 1e6)?;
                }
                Ok(out)
            }
            other => Err(self.err(key, format!("expected a list of 3 numbers, found {}", kind(other)))),
        }
    }
}

pub(super) fn scalar_text(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Real(r) => Some(r.clone()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn kind(v: &Yaml) -> String {
    match v {
        Yaml::Real(r) => format!("the number {r}"),
        Yaml::Integer(i) => format!("the number {i}"),
        Yaml::String(s) => format!("the string `{s}`"),
        Yaml::Boolean(b) => format!("`{b}`"),
        Yaml::Array(_) => "a list".into(),
        Yaml::Hash(_) => "a mapping".into(),
        Yaml::Alias(_) => "an alias".into(),
        Yaml::Null => "null".into(),
        Yaml::BadValue => "nothing".into(),
    }
}
