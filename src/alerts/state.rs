//! The alert state file (`alert_state_file` in a model's config): each camera's rule state
//! (history, open alert, cooldown, last picture) written as JSON, so a restart neither starts
//! an alert that is already open nor forgets to end it.
//!
//! Owns: the file's format (versioned), reading it back (rules matched by name; a file that
//! cannot be read is set aside as `NAME.corrupt`, never overwritten unread), and saving: when an
//! alert starts, updates or ends, else at most every [`SAVE_EVERY_S`], through a temporary file
//! and a rename so a crash leaves the old state or the new one, never half of one.

use std::path::{Path, PathBuf};

use miniserde::{Deserialize, Serialize};

use super::{Alert, Alerts, Camera, RuleState, MAX_CAMERAS, MAX_RESULT_IDS};
use crate::config::model::AlertRule;

/// Unchanged state is saved at most this often (its history bits move with every snapshot).
pub const SAVE_EVERY_S: f64 = 10.0;
/// Files larger than this are not read (a state file holds at most 1024 cameras).
const MAX_FILE: u64 = 64 << 20;
const VERSION: u32 = 1;

/// Where a model's alert state is kept.
#[derive(Debug)]
pub struct StateFile {
    pub path: PathBuf,
    saved_at: f64,
    /// The last save failed (logged once until one succeeds).
    failing: bool,
}

#[derive(Serialize, Deserialize)]
struct FileV1 {
    version: u32,
    model: String,
    next: u64,
    cameras: Vec<CameraV1>,
}

#[derive(Serialize, Deserialize)]
struct CameraV1 {
    camera: String,
    seen: f64,
    last_picture: Option<f64>,
    rules: Vec<RuleV1>,
}

#[derive(Serialize, Deserialize)]
struct RuleV1 {
    name: String,
    history: u64,
    hit_since: Option<f64>,
    clear_since: Option<f64>,
    ended_at: Option<f64>,
    recent: Vec<RecentV1>,
    active: Option<AlertV1>,
}

#[derive(Serialize, Deserialize)]
struct RecentV1 {
    boot: u64,
    seq: u64,
    hit: bool,
}

#[derive(Serialize, Deserialize)]
struct AlertV1 {
    id: u64,
    boot: u64,
    first_seen: f64,
    last_seen: f64,
    peak: f32,
    count: u32,
    results: Vec<ResultV1>,
}

#[derive(Serialize, Deserialize)]
struct ResultV1 {
    boot: u64,
    seq: u64,
}

/// What reading a state file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// No file yet: a fresh start.
    Fresh,
    /// Cameras and open alerts read back.
    Read { cameras: usize, open: usize },
    /// The file could not be used (why); it was renamed to the path given, and the state
    /// starts fresh.
    SetAside(String, PathBuf),
    /// The file is another model's (or could not be set aside): left alone, and this model's
    /// state is not saved.
    NotUsed(String),
}

impl Alerts {
    /// The alerts of `model` kept in `path`: read back when the file exists (rules matched by
    /// name, state of rules no longer configured dropped), saved there from now on.
    pub fn with_state_file(path: &Path, model: &str, rules: &[AlertRule]) -> (Alerts, Restored) {
        let mut a = Alerts::default();
        let restored = match read(path, model) {
            Ok(None) => Restored::Fresh,
            Ok(Some(f)) => {
                a.restore(f, rules);
                Restored::Read {
                    cameras: a.cameras.len(),
                    open: a.open(),
                }
            }
            Err(Unusable::Foreign(why)) => return (a, Restored::NotUsed(why)),
            Err(Unusable::Corrupt(why)) => {
                let aside = path.with_extension("corrupt");
                match std::fs::rename(path, &aside) {
                    Ok(()) => Restored::SetAside(why, aside),
                    // Not renamed: keep the state off the file, so it is never overwritten unread.
                    Err(e) => return (a, Restored::NotUsed(format!("{why}; cannot set it aside: {e}"))),
                }
            }
        };
        a.store = Some(StateFile {
            path: path.to_path_buf(),
            saved_at: f64::NEG_INFINITY,
            failing: false,
        });
        (a, restored)
    }

    /// The state file, if any.
    pub fn state_file(&self) -> Option<&Path> {
        self.store.as_ref().map(|s| s.path.as_path())
    }

    /// Saves the state at `now` (Unix seconds) when `changed` (an event happened) or
    /// [`SAVE_EVERY_S`] passed since the last save. Returns a failure to report: the first of
    /// a run of failures only.
    pub fn save_if_due(&mut self, model: &str, now: f64, changed: bool) -> Option<String> {
        let due = self
            .store
            .as_ref()
            .is_some_and(|s| changed || !(now - s.saved_at < SAVE_EVERY_S && now >= s.saved_at));
        if !due {
            return None;
        }
        let text = miniserde::json::to_string(&self.snapshot(model));
        let store = self.store.as_mut()?;
        store.saved_at = now;
        match write_state(&store.path, &text) {
            Ok(()) => {
                store.failing = false;
                None
            }
            Err(e) if !store.failing => {
                store.failing = true;
                Some(format!("cannot save the alert state to {}: {e}", store.path.display()))
            }
            Err(_) => None,
        }
    }

    fn snapshot(&self, model: &str) -> FileV1 {
        let mut cameras: Vec<CameraV1> = self
            .cameras
            .iter()
            .map(|(name, c)| CameraV1 {
                camera: name.clone(),
                seen: c.seen,
                last_picture: c.last_picture,
                rules: c
                    .rules
                    .iter()
                    .map(|r| RuleV1 {
                        name: r.name.clone(),
                        history: r.history,
                        hit_since: r.hit_since,
                        clear_since: r.clear_since,
                        ended_at: r.ended_at,
                        recent: r
                            .recent
                            .iter()
                            .map(|&((boot, seq), hit)| RecentV1 { boot, seq, hit })
                            .collect(),
                        active: r.active.as_ref().map(|a| AlertV1 {
                            id: a.id,
                            boot: a.boot,
                            first_seen: a.first_seen,
                            last_seen: a.last_seen,
                            peak: a.peak,
                            count: a.count,
                            results: a.results.iter().map(|&(boot, seq)| ResultV1 { boot, seq }).collect(),
                        }),
                    })
                    .collect(),
            })
            .collect();
        cameras.sort_by(|a, b| a.camera.cmp(&b.camera));
        FileV1 {
            version: VERSION,
            model: model.to_owned(),
            next: self.next,
            cameras,
        }
    }

    fn restore(&mut self, f: FileV1, rules: &[AlertRule]) {
        self.next = self.next.max(f.next);
        // The most recently seen cameras, if the file holds more than the bound.
        let mut cameras = f.cameras;
        cameras.sort_by(|a, b| b.seen.total_cmp(&a.seen));
        for c in cameras.into_iter().take(MAX_CAMERAS) {
            let states = c
                .rules
                .into_iter()
                .filter_map(|r| {
                    let index = rules.iter().position(|x| x.name == r.name)?;
                    let mut recent = std::collections::VecDeque::with_capacity(MAX_RESULT_IDS);
                    recent.extend(
                        r.recent
                            .iter()
                            .rev()
                            .take(MAX_RESULT_IDS)
                            .rev()
                            .map(|x| ((x.boot, x.seq), x.hit)),
                    );
                    Some(RuleState {
                        name: r.name,
                        history: r.history,
                        hit_since: r.hit_since,
                        clear_since: r.clear_since,
                        ended_at: r.ended_at,
                        recent,
                        active: r.active.map(|a| Alert {
                            id: a.id,
                            boot: a.boot,
                            rule: index,
                            first_seen: a.first_seen,
                            last_seen: a.last_seen,
                            peak: a.peak,
                            count: a.count,
                            results: a
                                .results
                                .iter()
                                .rev()
                                .take(MAX_RESULT_IDS)
                                .rev()
                                .map(|x| (x.boot, x.seq))
                                .collect(),
                        }),
                    })
                })
                .collect();
            self.cameras.insert(
                c.camera,
                Camera {
                    rules: states,
                    seen: c.seen,
                    last_picture: c.last_picture,
                },
            );
        }
    }
}

enum Unusable {
    /// Unreadable or not a state file: set aside.
    Corrupt(String),
    /// Not this model's, or not a plain file: left alone.
    Foreign(String),
}

/// Reads the state file: `None` when there is none.
fn read(path: &Path, model: &str) -> Result<Option<FileV1>, Unusable> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Unusable::Foreign(format!("cannot read it: {e}"))),
    };
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(Unusable::Foreign(format!("not a file of at most {MAX_FILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Unusable::Corrupt(format!("cannot read it: {e}")))?;
    let f: FileV1 = miniserde::json::from_str(&text)
        .map_err(|_| Unusable::Corrupt("not an alert state file (JSON, version 1)".to_owned()))?;
    if f.version != VERSION {
        return Err(Unusable::Foreign(format!(
            "version {} (this build reads {VERSION})",
            f.version
        )));
    }
    if f.model != model {
        return Err(Unusable::Foreign(format!(
            "it holds model `{}`'s alerts, not `{model}`'s",
            f.model
        )));
    }
    Ok(Some(f))
}

/// Writes `text` to `path` through `PATH.tmp` and a rename.
pub fn write_state(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::super::{Observation, Phase};
    use super::*;

    fn rule(name: &str) -> AlertRule {
        AlertRule {
            name: name.into(),
            classes: vec![],
            zone: None,
            min_confidence: 0.5,
            k: 2,
            n: 3,
            for_s: 0.0,
            cooldown_s: 0.0,
            clear_s: 0.0,
        }
    }

    fn step(a: &mut Alerts, rules: &[AlertRule], now: f64, boot: u64, hit: bool) -> Vec<Phase> {
        let mut ev = Vec::new();
        let obs = vec![
            Observation {
                count: hit as u32,
                peak: 0.7 * hit as u8 as f32
            };
            rules.len()
        ];
        a.observe("cam", now, (boot, now as u64), rules, &obs, &mut ev);
        a.save_if_due("m", now, !ev.is_empty());
        ev.iter().map(|e| e.phase).collect()
    }

    /// A scratch directory, removed when the test ends (pass or fail).
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("aei-alert-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    #[test]
    fn an_open_alert_survives_a_restart_and_ends_once_with_its_id() {
        let d = dir("restart");
        let path = d.0.join("m.json");
        let rules = [rule("r")];
        let (mut a, r) = Alerts::with_state_file(&path, "m", &rules);
        assert_eq!(r, Restored::Fresh);
        assert!(step(&mut a, &rules, 0.0, 7, true).is_empty());
        assert_eq!(step(&mut a, &rules, 1.0, 7, true), [Phase::Start]);
        let id = a.cameras["cam"].rules[0].active.as_ref().unwrap().id;
        drop(a);
        // A new process (another boot id) with a rule added in front.
        let rules2 = [rule("new"), rule("r")];
        let (mut b, r) = Alerts::with_state_file(&path, "m", &rules2);
        assert_eq!(r, Restored::Read { cameras: 1, open: 1 });
        // Still there: no second start; then the person leaves and it ends, as the same alert.
        assert!(step(&mut b, &rules2, 2.0, 9, true).is_empty(), "no second start");
        let mut ev = Vec::new();
        let gone = [Observation::default(); 2];
        b.observe("cam", 3.0, (9, 3), &rules2, &gone, &mut ev);
        b.observe("cam", 4.0, (9, 4), &rules2, &gone, &mut ev);
        let phases: Vec<Phase> = ev.iter().map(|e| e.phase).collect();
        assert_eq!(phases, [Phase::End]);
        let old = &ev[0].alert;
        assert_eq!(old.rule, 1, "`r`, now the second rule");
        assert_eq!((old.id, old.boot), (id, 7), "the alert keeps the id it started with");
        assert_eq!(Vec::from(old.results.clone()), [(7, 0), (7, 1), (9, 2)]);
    }

    #[test]
    fn an_unreadable_file_is_set_aside_not_overwritten() {
        let d = dir("corrupt");
        let path = d.0.join("m.json");
        std::fs::write(&path, "{not json").unwrap();
        let rules = [rule("r")];
        let (mut a, r) = Alerts::with_state_file(&path, "m", &rules);
        let Restored::SetAside(why, aside) = r else {
            panic!("{r:?}")
        };
        assert!(why.contains("not an alert state file"), "{why}");
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), "{not json");
        // Another model's file is not used, and left alone.
        step(&mut a, &rules, 0.0, 1, true);
        let saved = std::fs::read_to_string(&path).unwrap();
        let (mut other, r) = Alerts::with_state_file(&path, "other", &rules);
        assert!(matches!(&r, Restored::NotUsed(w) if w.contains("model `m`")), "{r:?}");
        assert_eq!(other.save_if_due("other", 1.0, true), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), saved, "left alone");
    }

    #[test]
    fn unchanged_state_is_saved_at_most_every_ten_seconds() {
        let d = dir("often");
        let path = d.0.join("m.json");
        let rules = [rule("r")];
        let (mut a, _) = Alerts::with_state_file(&path, "m", &rules);
        step(&mut a, &rules, 100.0, 1, false);
        let first = std::fs::read_to_string(&path).unwrap();
        step(&mut a, &rules, 101.0, 1, false);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            first,
            "not saved again within 10 s"
        );
        step(&mut a, &rules, 111.0, 1, false);
        assert_ne!(std::fs::read_to_string(&path).unwrap(), first);
        // A save that fails is reported once.
        std::fs::remove_dir_all(&d.0).unwrap();
        assert!(a.save_if_due("m", 200.0, true).is_some());
        assert!(a.save_if_due("m", 300.0, true).is_none());
    }
}
