//! Post-processing shared by every backend: raw output tensors -> the
//! predictions users act on.
//!
//! Owns: softmax / top-k for classifiers; YOLO decoding (v5 with objectness,
//! v8/v11/v12 without, channels-first or -last), class-aware or agnostic NMS;
//! alert decisions. Pure functions over slices, writing into buffers sized
//! at load, so nothing here allocates per frame.

use crate::config::model::YoloVersion;

/// One detection in model-input pixels, `[x1, y1, x2, y2]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub class_id: usize,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// Most candidates kept before NMS (as Ultralytics' `max_nms`).
pub const MAX_CANDIDATES: usize = 30_000;

/// Softmax in place (numerically stable).
pub fn softmax_inplace(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    if sum > 0.0 {
        v.iter_mut().for_each(|x| *x /= sum);
    }
}

/// True when `v` already is a probability distribution.
pub fn looks_like_probabilities(v: &[f32]) -> bool {
    let sum: f32 = v.iter().sum();
    v.iter().all(|x| (0.0..=1.0).contains(x)) && (sum - 1.0).abs() < 1e-3
}

/// The `k` best (index, score) pairs at or above `threshold`, best first,
/// into `out` (cleared; holds at most `k`).
pub fn top_k(scores: &[f32], k: usize, threshold: f32, out: &mut Vec<(usize, f32)>) {
    out.clear();
    for (i, &s) in scores.iter().enumerate() {
        // NaN scores never qualify.
        if s.is_nan() || s < threshold {
            continue;
        }
        if out.len() == k {
            if out.last().is_some_and(|l| s <= l.1) {
                continue;
            }
            out.pop();
        }
        let at = out.partition_point(|e| e.1 >= s);
        out.insert(at, (i, s));
    }
}

/// How a YOLO output tensor is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct YoloLayout {
    /// Anchors (candidate boxes).
    pub anchors: usize,
    pub classes: usize,
    /// `[1, attrs, anchors]` (Ultralytics export) rather than `[1, anchors, attrs]`.
    pub channels_first: bool,
    pub objectness: bool,
}

/// Works out the layout of a `[1, A, B]` output; `classes` is the label count when known.
pub fn yolo_layout(shape: &[usize], classes: Option<usize>, version: YoloVersion) -> Result<YoloLayout, String> {
    let (a, b) = match shape {
        [1, a, b] | [a, b] => (*a, *b),
        _ => {
            return Err(format!(
                "expected a YOLO output of shape [1, 4+C, N] or [1, N, 4+C], found {shape:?}"
            ))
        }
    };
    let fixed_for = |attrs: usize, c: usize| match version {
        YoloVersion::V5 => (attrs == 5 + c).then_some(true),
        YoloVersion::V8 => (attrs == 4 + c).then_some(false),
        YoloVersion::Auto => (attrs == 4 + c).then_some(false).or((attrs == 5 + c).then_some(true)),
    };
    let (attrs, anchors, channels_first, objectness) = match classes {
        // With the class count known, the attribute axis is the one that fits it.
        Some(c) => match (fixed_for(a, c), fixed_for(b, c)) {
            (Some(obj), _) => (a, b, true, obj),
            (None, Some(obj)) => (b, a, false, obj),
            (None, None) => {
                return Err(format!(
                    "YOLO output {shape:?} does not fit {c} labels (expected 4+{c} or 5+{c} attributes)"
                ))
            }
        },
        // Otherwise it is the short one (84 against 8400).
        None => {
            let (attrs, anchors, first) = if a <= b { (a, b, true) } else { (b, a, false) };
            (attrs, anchors, first, version == YoloVersion::V5)
        }
    };
    let fixed = if objectness { 5 } else { 4 };
    if attrs <= fixed {
        return Err(format!("YOLO output {shape:?} has no class scores"));
    }
    Ok(YoloLayout {
        anchors,
        classes: attrs - fixed,
        channels_first,
        objectness,
    })
}

/// Decodes candidates scoring at least `conf` into `out` (cleared; at most
/// its capacity or [`MAX_CANDIDATES`]).
pub fn decode_yolo(values: &[f32], l: &YoloLayout, conf: f32, out: &mut Vec<Detection>) {
    out.clear();
    let attrs = l.classes + if l.objectness { 5 } else { 4 };
    if values.len() < attrs * l.anchors {
        return;
    }
    let at = |anchor: usize, attr: usize| -> f32 {
        if l.channels_first {
            values[attr * l.anchors + anchor]
        } else {
            values[anchor * attrs + attr]
        }
    };
    let first_class = if l.objectness { 5 } else { 4 };
    let cap = out.capacity().clamp(1, MAX_CANDIDATES);
    for i in 0..l.anchors {
        let obj = if l.objectness { at(i, 4) } else { 1.0 };
        if obj < conf {
            continue;
        }
        let (mut best, mut best_c) = (f32::NEG_INFINITY, 0);
        for c in 0..l.classes {
            let s = at(i, first_class + c);
            if s > best {
                best = s;
                best_c = c;
            }
        }
        let score = best * obj;
        if score.is_nan() || score < conf || out.len() == cap {
            continue;
        }
        let (cx, cy, w, h) = (at(i, 0), at(i, 1), at(i, 2), at(i, 3));
        out.push(Detection {
            class_id: best_c,
            score,
            bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
        });
    }
}

pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy NMS: sorts `candidates` by score and keeps at most `max` boxes into
/// `kept` (cleared), suppressing overlaps of the same class (or any class
/// when `agnostic`).
pub fn nms(candidates: &mut [Detection], iou_threshold: f32, agnostic: bool, max: usize, kept: &mut Vec<Detection>) {
    kept.clear();
    candidates.sort_unstable_by(|a, b| b.score.total_cmp(&a.score));
    for d in candidates.iter() {
        if kept.len() == max {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| (agnostic || k.class_id == d.class_id) && iou(&k.bbox, &d.bbox) > iou_threshold);
        if !suppressed {
            kept.push(*d);
        }
    }
}

/// Dual mode, classification: the same top-1 class and every probability
/// within `tolerance`.
pub fn probabilities_match(a: &[f32], b: &[f32], tolerance: f32) -> bool {
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|(i, _)| i);
    a.len() == b.len() && argmax(a) == argmax(b) && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tolerance)
}

/// Dual mode, detection: a one-to-one match by class with IoU of at least `iou`.
pub fn detections_match(a: &[Detection], b: &[Detection], iou_min: f32) -> bool {
    if a.len() != b.len() || a.len() > 64 {
        return a.is_empty() && b.is_empty();
    }
    let mut used = 0u64;
    a.iter().all(|da| {
        let hit = b
            .iter()
            .enumerate()
            .find(|(j, db)| used & (1 << j) == 0 && db.class_id == da.class_id && iou(&da.bbox, &db.bbox) >= iou_min);
        match hit {
            Some((j, _)) => {
                used |= 1 << j;
                true
            }
            None => false,
        }
    })
}

/// True when any prediction of an alert class reaches that class's threshold.
pub fn alert<'a>(alerts: &[(String, f32)], predictions: impl IntoIterator<Item = (&'a str, f32)>) -> bool {
    predictions
        .into_iter()
        .any(|(label, conf)| alerts.iter().any(|(l, t)| l == label && conf >= *t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_and_alerts() {
        assert!((iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 1.0, 3.0, 3.0]) - 1.0 / 7.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
        let alerts = vec![("person".to_owned(), 0.5)];
        assert!(alert(&alerts, [("car", 0.9), ("person", 0.6)]));
        assert!(!alert(&alerts, [("person", 0.4)]));
    }

    #[test]
    fn softmax_and_probability_detection() {
        let mut v = [1.0, 2.0, 3.0];
        softmax_inplace(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((v[2] - 0.665_241_2).abs() < 1e-6);
        assert!(looks_like_probabilities(&v));
        assert!(!looks_like_probabilities(&[1.0, 2.0, 3.0]));
        assert!(!looks_like_probabilities(&[0.2, 0.2]));
    }

    #[test]
    fn top_k_keeps_the_best_in_order_above_threshold() {
        let mut out = Vec::with_capacity(3);
        top_k(&[0.1, 0.5, 0.05, 0.9, 0.3, 0.5, f32::NAN], 3, 0.2, &mut out);
        assert_eq!(out, [(3, 0.9), (1, 0.5), (5, 0.5)]);
        top_k(&[0.1, 0.15], 3, 0.2, &mut out);
        assert!(out.is_empty());
    }

    fn yolo_v8(anchors: &[[f32; 6]]) -> Vec<f32> {
        // [1, 4+2, N] channels-first: cx, cy, w, h, class0, class1.
        let n = anchors.len();
        let mut v = vec![0.0; 6 * n];
        for (i, a) in anchors.iter().enumerate() {
            for (k, x) in a.iter().enumerate() {
                v[k * n + i] = *x;
            }
        }
        v
    }

    #[test]
    fn layouts_are_told_apart() {
        let l = yolo_layout(&[1, 84, 8400], Some(80), YoloVersion::Auto).unwrap();
        assert_eq!(
            l,
            YoloLayout {
                anchors: 8400,
                classes: 80,
                channels_first: true,
                objectness: false
            }
        );
        let l = yolo_layout(&[1, 25200, 85], Some(80), YoloVersion::Auto).unwrap();
        assert_eq!(
            l,
            YoloLayout {
                anchors: 25200,
                classes: 80,
                channels_first: false,
                objectness: true
            }
        );
        let l = yolo_layout(&[1, 8400, 84], None, YoloVersion::Auto).unwrap();
        assert!(!l.channels_first && !l.objectness && l.classes == 80);
        let e = yolo_layout(&[1, 84, 8400], Some(3), YoloVersion::Auto).unwrap_err();
        assert!(e.contains("does not fit 3 labels"), "{e}");
        assert!(yolo_layout(&[1, 85, 8400], None, YoloVersion::V5).unwrap().objectness);
        assert!(yolo_layout(&[1, 1000], None, YoloVersion::Auto).is_err());
        assert!(yolo_layout(&[1, 2, 3, 4], None, YoloVersion::Auto).is_err());
    }

    #[test]
    fn decode_and_class_aware_nms() {
        let v = yolo_v8(&[
            [50.0, 50.0, 20.0, 20.0, 0.9, 0.1],   // class 0, kept
            [51.0, 51.0, 20.0, 20.0, 0.8, 0.1],   // overlaps the first, same class: suppressed
            [51.0, 51.0, 20.0, 20.0, 0.05, 0.7],  // overlaps, other class: kept (class-aware)
            [200.0, 200.0, 10.0, 10.0, 0.6, 0.0], // far away: kept
            [300.0, 300.0, 10.0, 10.0, 0.1, 0.2], // under the threshold
        ]);
        let l = yolo_layout(&[1, 6, 5], Some(2), YoloVersion::Auto).unwrap();
        let mut cands = Vec::with_capacity(16);
        decode_yolo(&v, &l, 0.25, &mut cands);
        assert_eq!(cands.len(), 4);
        assert_eq!(cands[0].bbox, [40.0, 40.0, 60.0, 60.0]);
        let mut kept = Vec::with_capacity(10);
        nms(&mut cands, 0.45, false, 10, &mut kept);
        let got: Vec<(usize, f32)> = kept.iter().map(|d| (d.class_id, d.score)).collect();
        assert_eq!(got, [(0, 0.9), (1, 0.7), (0, 0.6)]);
        nms(&mut cands, 0.45, true, 10, &mut kept);
        assert_eq!(kept.len(), 2, "agnostic NMS also drops the other-class overlap");
        nms(&mut cands, 0.45, false, 1, &mut kept);
        assert_eq!(kept.len(), 1, "max detections");
    }

    #[test]
    fn v5_objectness_multiplies_class_scores() {
        // [1, N, 5+1] channels-last.
        let v = [10.0, 10.0, 4.0, 4.0, 0.5, 0.8, 10.0, 10.0, 4.0, 4.0, 0.1, 0.9];
        let l = yolo_layout(&[1, 2, 6], Some(1), YoloVersion::Auto).unwrap();
        assert!(l.objectness && !l.channels_first);
        let mut out = Vec::with_capacity(4);
        decode_yolo(&v, &l, 0.25, &mut out);
        assert_eq!(out.len(), 1);
        assert!((out[0].score - 0.4).abs() < 1e-6);
    }

    #[test]
    fn dual_agreement() {
        assert!(probabilities_match(&[0.1, 0.9], &[0.1004, 0.8996], 1e-3));
        assert!(!probabilities_match(&[0.1, 0.9], &[0.12, 0.88], 1e-3));
        assert!(!probabilities_match(&[0.49, 0.51], &[0.51, 0.49], 0.1), "top-1 differs");
        let d = |c, x: f32| Detection {
            class_id: c,
            score: 0.9,
            bbox: [x, 0.0, x + 10.0, 10.0],
        };
        assert!(detections_match(
            &[d(0, 0.0), d(1, 50.0)],
            &[d(1, 50.2), d(0, 0.1)],
            0.9
        ));
        assert!(!detections_match(&[d(0, 0.0)], &[d(1, 0.0)], 0.9), "class differs");
        assert!(!detections_match(&[d(0, 0.0)], &[d(0, 3.0)], 0.9), "IoU too low");
        assert!(
            !detections_match(&[d(0, 0.0), d(0, 0.0)], &[d(0, 0.0)], 0.9),
            "counts differ"
        );
        assert!(
            !detections_match(&[d(0, 0.0), d(0, 0.1)], &[d(0, 0.0), d(1, 0.0)], 0.9),
            "one to one"
        );
        assert!(detections_match(&[], &[], 0.9));
    }
}
