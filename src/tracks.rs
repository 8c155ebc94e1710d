//! Identity across snapshots, for models with `tracking.enabled`: each detection gets a
//! `track_id` that it keeps from one snapshot of its camera to the next while it stays put
//! enough, so "how many different people were in the zone" can be counted from the results.
//!
//! Owns: matching a snapshot's boxes to the previous snapshot's of the same camera, by class
//! and overlap (IoU), greedily from the best overlap down. The overlap asked for falls as the
//! time between the snapshots grows ([`gate`]): at one snapshot a second a person who walks
//! keeps their box's overlap, but a minute apart nothing does. Its limits, by design (no motion
//! model, no appearance): an object that moves more than about its own width between snapshots,
//! two of the same class that cross, or one missed for more than one snapshot get new ids;
//! snapshots further apart than `max_gap_s` start every identity afresh.
//!
//! State is per camera, bounded (the least recently seen camera forgotten first), and kept
//! across a hot swap like the alert state.

use crate::cameras::Table;
use crate::postprocess::{iou, Detection};

/// Cameras whose previous snapshot is kept per model.
pub const MAX_CAMERAS: usize = 1024;

/// The IoU two boxes of the same class need, `dt` seconds apart, to be the same object: 0.5
/// for snapshots close together, half that at one second, 0.05 at the least.
pub fn gate(dt: f64) -> f32 {
    ((0.5 / (1.0 + dt.max(0.0))) as f32).max(0.05)
}

#[derive(Debug, Clone, Copy)]
struct Track {
    id: u64,
    class_id: usize,
    bbox: [f32; 4],
    /// Snapshots since it was last matched (kept for one missed snapshot).
    missed: u8,
}

#[derive(Debug, Default)]
struct Camera {
    at: f64,
    tracks: Vec<Track>,
    /// Scratch: which tracks this snapshot has matched.
    taken: Vec<bool>,
}

/// Every camera's previous boxes.
#[derive(Debug)]
pub struct Tracks {
    cameras: Table<Camera>,
    next: u64,
}

impl Default for Tracks {
    fn default() -> Tracks {
        Tracks {
            cameras: Table::new(MAX_CAMERAS),
            next: 0,
        }
    }
}

impl Tracks {
    /// Gives each of `dets` (a snapshot of `camera` at `now`, Unix seconds) its track id in
    /// `ids` (same order; cleared first): the id of the previous snapshot's box it matches,
    /// else a new one.
    pub fn assign(&mut self, camera: &str, now: f64, max_gap_s: f64, dets: &[Detection], ids: &mut Vec<u64>) {
        let cam = self.cameras.touch(camera, Camera::default);
        let dt = now - cam.at;
        if !(0.0..=max_gap_s).contains(&dt) {
            cam.tracks.clear();
        }
        cam.at = now;
        ids.clear();
        ids.resize(dets.len(), 0);
        cam.taken.clear();
        cam.taken.resize(cam.tracks.len(), false);
        let g = gate(dt);
        // Greedy, best overlap first: few boxes per snapshot, so a pass per match is cheap
        // and needs no candidate list.
        loop {
            let mut best: Option<(usize, usize, f32)> = None;
            for (i, d) in dets.iter().enumerate() {
                if ids[i] != 0 {
                    continue;
                }
                for (j, t) in cam.tracks.iter().enumerate() {
                    if cam.taken[j] || t.class_id != d.class_id {
                        continue;
                    }
                    let o = iou(&d.bbox, &t.bbox);
                    if o >= g && best.is_none_or(|b| o > b.2) {
                        best = Some((i, j, o));
                    }
                }
            }
            let Some((i, j, _)) = best else { break };
            ids[i] = cam.tracks[j].id;
            cam.taken[j] = true;
        }
        // Unmatched tracks wait one snapshot; matched ones move to their new box.
        let mut k = 0;
        for j in 0..cam.tracks.len() {
            let mut t = cam.tracks[j];
            if cam.taken[j] {
                let i = ids.iter().position(|&id| id == t.id).unwrap_or(0);
                t.bbox = dets[i].bbox;
                t.missed = 0;
            } else {
                t.missed += 1;
                if t.missed > 1 {
                    continue;
                }
            }
            cam.tracks[k] = t;
            k += 1;
        }
        cam.tracks.truncate(k);
        for (i, d) in dets.iter().enumerate() {
            if ids[i] == 0 {
                self.next += 1;
                ids[i] = self.next;
                cam.tracks.push(Track {
                    id: self.next,
                    class_id: d.class_id,
                    bbox: d.bbox,
                    missed: 0,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class_id: usize, x: f32) -> Detection {
        Detection {
            class_id,
            score: 0.9,
            bbox: [x, 100.0, x + 100.0, 300.0],
        }
    }

    #[test]
    fn a_walking_person_keeps_their_id_and_a_newcomer_gets_one() {
        let mut t = Tracks::default();
        let mut ids = Vec::new();
        t.assign("cam", 0.0, 10.0, &[det(0, 0.0)], &mut ids);
        let first = ids[0];
        // One second later, 30 px on (IoU 0.54), and a second person far off.
        t.assign("cam", 1.0, 10.0, &[det(0, 500.0), det(0, 30.0)], &mut ids);
        assert_eq!(ids[1], first);
        assert_ne!(ids[0], first);
        // A cup where the person was is not the person.
        t.assign("cam", 2.0, 10.0, &[det(41, 30.0)], &mut ids);
        assert_ne!(ids[0], first);
        // Missed once, the person is still known; another camera's boxes are its own.
        t.assign("cam", 3.0, 10.0, &[det(0, 40.0)], &mut ids);
        assert_eq!(ids[0], first, "kept through one missed snapshot");
        t.assign("other", 3.0, 10.0, &[det(0, 40.0)], &mut ids);
        assert_ne!(ids[0], first);
    }

    #[test]
    fn the_gate_widens_with_time_and_a_long_gap_forgets() {
        assert!(gate(0.0) > gate(1.0) && gate(1.0) > gate(5.0));
        assert_eq!(gate(1000.0), 0.05);
        let mut t = Tracks::default();
        let mut ids = Vec::new();
        t.assign("cam", 0.0, 10.0, &[det(0, 0.0)], &mut ids);
        let first = ids[0];
        // 70 px in 0.1 s is too far (IoU 0.18 < 0.45); the same 70 px in 3 s is a walk.
        t.assign("cam", 0.1, 10.0, &[det(0, 70.0)], &mut ids);
        assert_ne!(ids[0], first);
        let mut t = Tracks::default();
        t.assign("cam", 0.0, 10.0, &[det(0, 0.0)], &mut ids);
        let first = ids[0];
        t.assign("cam", 3.0, 10.0, &[det(0, 70.0)], &mut ids);
        assert_eq!(ids[0], first);
        // Past max_gap_s, a new identity even in the same place.
        t.assign("cam", 20.0, 10.0, &[det(0, 70.0)], &mut ids);
        assert_ne!(ids[0], first);
    }

    #[test]
    fn two_people_side_by_side_keep_their_own_ids() {
        let mut t = Tracks::default();
        let mut ids = Vec::new();
        t.assign("cam", 0.0, 10.0, &[det(0, 0.0), det(0, 110.0)], &mut ids);
        let (a, b) = (ids[0], ids[1]);
        // Listed the other way round, each moved 20 px right.
        t.assign("cam", 1.0, 10.0, &[det(0, 130.0), det(0, 20.0)], &mut ids);
        assert_eq!((ids[1], ids[0]), (a, b));
    }
}
