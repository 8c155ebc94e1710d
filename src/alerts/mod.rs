//! Alert rules with hysteresis, written for snapshots a second or more apart.
//!
//! Per camera and rule: a bit history of the last `n` snapshots (did the rule's classes, in its
//! zone, at its confidence, appear?) and when the condition began or cleared. An alert
//! **starts** when at least `k` of the last `n` snapshots hit (or, with `for_s`, every snapshot
//! for `for_s` seconds), unless the rule's last alert on that camera ended less than
//! `cooldown_s` ago; it **updates** when the number of matching detections changes or the peak
//! confidence rises; it **ends** once the start condition no longer holds and no snapshot has hit
//! for `clear_s` seconds. No tracker: nothing here needs video frame rates.
//!
//! State is bounded (`MAX_CAMERAS`, the least recently seen camera forgotten first, its open
//! alerts with it) and lives beside the model, so a hot swap keeps it (rules are matched by
//! name); a restart loses it unless the model names an `alert_state_file` (`state.rs`). A camera
//! that goes silent keeps its open alerts until it sends again.

mod state;

use std::collections::{HashMap, VecDeque};

use crate::config::model::AlertRule;

pub use state::{write_state, Restored, StateFile, SAVE_EVERY_S};

/// Cameras whose alert state is kept per model.
pub const MAX_CAMERAS: usize = 1024;
/// Result ids kept per alert (the most recent ones).
pub const MAX_RESULT_IDS: usize = 16;
/// A rise in peak confidence that is worth an `update`.
const PEAK_STEP: f32 = 0.05;

/// One rule's view of one snapshot: the matching detections and their best confidence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    pub count: u32,
    pub peak: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Start,
    Update,
    End,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Start, Phase::Update, Phase::End];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Update => "update",
            Phase::End => "end",
        }
    }
}

/// An open (or just ended) alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Unique per `boot`: messages name it `<boot>-a<id>`.
    pub id: u64,
    /// The boot id of the process that raised it (its first result's), kept when the alert
    /// is restored from a state file after a restart.
    pub boot: u64,
    /// Index into the model's `alert_rules`.
    pub rule: usize,
    /// Unix seconds.
    pub first_seen: f64,
    pub last_seen: f64,
    pub peak: f32,
    /// Matching detections in the latest hitting snapshot.
    pub count: u32,
    /// The results that hit, most recent last (`result_id`'s boot and sequence).
    pub results: VecDeque<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub phase: Phase,
    pub alert: Alert,
}

struct RuleState {
    name: String,
    history: u64,
    hit_since: Option<f64>,
    clear_since: Option<f64>,
    active: Option<Alert>,
    ended_at: Option<f64>,
    /// The latest snapshots' result ids and whether each hit: the ones in the window that
    /// raises an alert are named by its `start`.
    recent: VecDeque<((u64, u64), bool)>,
}

impl RuleState {
    fn new(name: &str) -> RuleState {
        RuleState {
            name: name.to_owned(),
            history: 0,
            hit_since: None,
            clear_since: None,
            active: None,
            ended_at: None,
            recent: VecDeque::with_capacity(MAX_RESULT_IDS),
        }
    }
}

struct Camera {
    rules: Vec<RuleState>,
    seen: f64,
    /// When the camera's last annotated picture went to the alert topic.
    last_picture: Option<f64>,
}

#[derive(Default)]
pub struct Alerts {
    cameras: HashMap<String, Camera>,
    next: u64,
    /// Where the state is saved, when the model names a file.
    store: Option<StateFile>,
}

impl Alerts {
    /// Whether `camera` (already observed) may send an annotated picture at `now`, at most one
    /// per `min_interval_s`; a yes counts as sent.
    pub fn picture_due(&mut self, camera: &str, now: f64, min_interval_s: f64) -> bool {
        let Some(c) = self.cameras.get_mut(camera) else {
            return false;
        };
        if c.last_picture.is_some_and(|t| now - t < min_interval_s && now >= t) {
            return false;
        }
        c.last_picture = Some(now);
        true
    }

    /// Open alerts, over every camera.
    pub fn open(&self) -> usize {
        self.cameras
            .values()
            .flat_map(|c| &c.rules)
            .filter(|r| r.active.is_some())
            .count()
    }

    /// One snapshot of `camera` at `now` (Unix seconds), answered by `result`: `obs[i]` is rule
    /// `i`'s view of it. Pushes the events it causes.
    pub fn observe(
        &mut self,
        camera: &str,
        now: f64,
        result: (u64, u64),
        rules: &[AlertRule],
        obs: &[Observation],
        events: &mut Vec<Event>,
    ) {
        if !self.cameras.contains_key(camera) {
            if self.cameras.len() >= MAX_CAMERAS {
                let oldest = self
                    .cameras
                    .iter()
                    .min_by(|a, b| a.1.seen.total_cmp(&b.1.seen))
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.cameras.remove(&k);
                }
            }
            self.cameras.insert(
                camera.to_owned(),
                Camera {
                    rules: Vec::new(),
                    seen: now,
                    last_picture: None,
                },
            );
        }
        let Some(cam) = self.cameras.get_mut(camera) else {
            return;
        };
        cam.seen = now;
        // Rules are matched by name: a reload that changes them keeps the ones it keeps.
        if cam.rules.len() != rules.len() || cam.rules.iter().zip(rules).any(|(s, r)| s.name != r.name) {
            let mut old = std::mem::take(&mut cam.rules);
            cam.rules = rules
                .iter()
                .map(|r| match old.iter().position(|s| s.name == r.name) {
                    Some(i) => old.swap_remove(i),
                    None => RuleState::new(&r.name),
                })
                .collect();
        }
        for (i, (rule, st)) in rules.iter().zip(cam.rules.iter_mut()).enumerate() {
            // A reload may have moved the rule.
            if let Some(a) = &mut st.active {
                a.rule = i;
            }
            let o = obs.get(i).copied().unwrap_or_default();
            let hit = o.count > 0;
            let window = if rule.n >= 64 { u64::MAX } else { (1u64 << rule.n) - 1 };
            st.history = ((st.history << 1) | hit as u64) & window;
            if hit {
                st.hit_since.get_or_insert(now);
                st.clear_since = None;
            } else {
                st.hit_since = None;
                st.clear_since.get_or_insert(now);
            }
            let keep = if rule.for_s > 0.0 {
                MAX_RESULT_IDS
            } else {
                (rule.n as usize).min(MAX_RESULT_IDS)
            };
            if st.recent.len() >= keep {
                st.recent.pop_front();
            }
            st.recent.push_back((result, hit));
            let holds = if rule.for_s > 0.0 {
                st.hit_since.is_some_and(|t| now - t >= rule.for_s)
            } else {
                st.history.count_ones() >= rule.k
            };
            match &mut st.active {
                None if holds && st.ended_at.is_none_or(|e| now - e >= rule.cooldown_s) => {
                    self.next += 1;
                    let mut results = VecDeque::with_capacity(MAX_RESULT_IDS);
                    results.extend(st.recent.iter().filter(|r| r.1).map(|r| r.0));
                    let a = Alert {
                        id: self.next,
                        boot: result.0,
                        rule: i,
                        first_seen: st.hit_since.unwrap_or(now),
                        last_seen: now,
                        peak: o.peak,
                        count: o.count,
                        results,
                    };
                    events.push(Event {
                        phase: Phase::Start,
                        alert: a.clone(),
                    });
                    st.active = Some(a);
                }
                None => {}
                Some(a) if hit => {
                    a.last_seen = now;
                    if a.results.len() == MAX_RESULT_IDS {
                        a.results.pop_front();
                    }
                    a.results.push_back(result);
                    let risen = o.peak >= a.peak + PEAK_STEP;
                    if o.count != a.count || risen {
                        a.count = o.count;
                        a.peak = a.peak.max(o.peak);
                        events.push(Event {
                            phase: Phase::Update,
                            alert: a.clone(),
                        });
                    }
                }
                Some(_) => {
                    let cleared = st.clear_since.is_some_and(|t| now - t >= rule.clear_s);
                    if !holds && cleared {
                        if let Some(a) = st.active.take() {
                            events.push(Event {
                                phase: Phase::End,
                                alert: a,
                            });
                        }
                        st.ended_at = Some(now);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(k: u32, n: u32) -> AlertRule {
        AlertRule {
            name: "r".into(),
            classes: vec!["person".into()],
            zone: None,
            min_confidence: 0.5,
            k,
            n,
            for_s: 0.0,
            cooldown_s: 0.0,
            clear_s: 0.0,
        }
    }

    /// Runs `hits` (0 = no detection) one second apart; the phases of the events, with seconds.
    fn run(a: &mut Alerts, rules: &[AlertRule], start: f64, hits: &[u32]) -> Vec<(Phase, f64)> {
        let mut out = Vec::new();
        for (t, &h) in hits.iter().enumerate() {
            let mut ev = Vec::new();
            let now = start + t as f64;
            let obs = [Observation {
                count: h,
                peak: if h > 0 { 0.6 } else { 0.0 },
            }];
            a.observe("cam", now, (1, t as u64), rules, &obs, &mut ev);
            out.extend(ev.iter().map(|e| (e.phase, now)));
        }
        out
    }

    #[test]
    fn k_of_n_does_not_flap_on_a_single_miss_or_a_single_hit() {
        let rules = [rule(2, 3)];
        let mut a = Alerts::default();
        // A lone hit: nothing. Then a person for a while with one missed snapshot, then gone.
        let mut all = Vec::new();
        for (t, h) in [1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0].into_iter().enumerate() {
            let obs = [Observation {
                count: h,
                peak: 0.6 * h as f32,
            }];
            a.observe("cam", t as f64, (1, t as u64), &rules, &obs, &mut all);
        }
        let ev: Vec<(Phase, f64)> = all.iter().map(|e| (e.phase, e.alert.last_seen)).collect();
        assert_eq!(ev, [(Phase::Start, 5.0), (Phase::End, 9.0)]);
        // The start names both hits of its window; the end, every hit of the alert.
        assert_eq!(Vec::from(all[0].alert.results.clone()), [(1, 4), (1, 5)]);
        assert_eq!(
            Vec::from(all[1].alert.results.clone()),
            [(1, 4), (1, 5), (1, 7), (1, 8), (1, 9)]
        );
        assert_eq!(all[0].alert.first_seen, 4.0, "the first hit of the run that raised it");
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn updates_when_the_count_changes_and_ends_after_clear_s() {
        let mut r = rule(1, 1);
        r.clear_s = 2.0;
        let rules = [r];
        let mut a = Alerts::default();
        let ev = run(&mut a, &rules, 0.0, &[1, 2, 2, 0, 0, 0, 0]);
        // Cleared at t=3; ended once it stayed clear for 2 s (t=5).
        assert_eq!(ev, [(Phase::Start, 0.0), (Phase::Update, 1.0), (Phase::End, 5.0)]);
    }

    #[test]
    fn for_s_waits_and_cooldown_holds_back_a_new_start() {
        let mut r = rule(1, 1);
        r.for_s = 2.0;
        r.cooldown_s = 10.0;
        let rules = [r];
        let mut a = Alerts::default();
        let ev = run(&mut a, &rules, 0.0, &[1, 1, 1, 0, 1, 1, 1, 1]);
        // Started once it held for 2 s (t=2), ended at t=3; held again from t=4, but the
        // cooldown (until t=13) keeps it quiet.
        assert_eq!(ev, [(Phase::Start, 2.0), (Phase::End, 3.0)]);
        let ev = run(&mut a, &rules, 20.0, &[0, 1, 1, 1]);
        assert_eq!(ev, [(Phase::Start, 23.0)]);
    }

    #[test]
    fn state_survives_a_rule_change_by_name_and_cameras_are_bounded() {
        let rules = [rule(1, 1)];
        let mut a = Alerts::default();
        assert_eq!(run(&mut a, &rules, 0.0, &[1]), [(Phase::Start, 0.0)]);
        // A reload adds a rule in front: `r` keeps its open alert.
        let mut other = rule(1, 1);
        other.name = "other".into();
        let rules2 = [other, rules[0].clone()];
        let mut ev = Vec::new();
        a.observe(
            "cam",
            1.0,
            (1, 9),
            &rules2,
            &[Observation::default(), Observation { count: 1, peak: 0.6 }],
            &mut ev,
        );
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(a.open(), 1);
        for i in 0..MAX_CAMERAS + 5 {
            let mut ev = Vec::new();
            a.observe(
                &format!("c{i}"),
                2.0 + i as f64,
                (1, 0),
                &rules,
                &[Observation::default()],
                &mut ev,
            );
        }
        assert_eq!(a.cameras.len(), MAX_CAMERAS);
    }
}
