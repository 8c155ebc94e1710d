//! Zones: which of a model's polygon zones a detection is in.
//!
//! A zone is drawn for some cameras (device ids or topic filters; none: all),
//! in normalised image coordinates, and cares about some classes (none: all)
//! and boxes of at least `min_area` of the image. A box is in it when its
//! anchor point (the bottom centre, where a person stands, or the centre) is
//! inside the polygon (even-odd rule; a point on an edge may fall either way).
//! A detection's zones are a 64-bit mask over the model's zones, so the frame
//! path allocates nothing for them.

use crate::config::model::{Anchor, CameraMatch, Zone};

/// Which zones apply to a frame from `device` on `topic`: a mask over `zones`.
pub fn for_camera(zones: &[Zone], device: &str, topic: &str) -> u64 {
    let mut mask = 0u64;
    for (i, z) in zones.iter().enumerate() {
        let applies = z.cameras.is_empty()
            || z.cameras.iter().any(|c| match c {
                CameraMatch::Device(d) => d == device,
                CameraMatch::Topic(f) => f.matches(topic),
            });
        if applies {
            mask |= 1 << i;
        }
    }
    mask
}

/// The zones among `camera` (a mask from `for_camera`) that a `label` box `[x1, y1, x2, y2]`
/// in a `width` x `height` image is in.
pub fn containing(zones: &[Zone], camera: u64, label: &str, bbox: [f32; 4], width: u32, height: u32) -> u64 {
    let (w, h) = (width.max(1) as f32, height.max(1) as f32);
    let area = ((bbox[2] - bbox[0]).max(0.0) * (bbox[3] - bbox[1]).max(0.0)) / (w * h);
    let mut mask = 0u64;
    for (i, z) in zones.iter().enumerate() {
        if camera & (1 << i) == 0 || area < z.min_area {
            continue;
        }
        if !z.classes.is_empty() && !z.classes.iter().any(|c| c == label) {
            continue;
        }
        let x = (bbox[0] + bbox[2]) / 2.0 / w;
        let y = match z.anchor {
            Anchor::BottomCenter => bbox[3] / h,
            Anchor::Center => (bbox[1] + bbox[3]) / 2.0 / h,
        };
        if inside(&z.polygon, x, y) {
            mask |= 1 << i;
        }
    }
    mask
}

/// Even-odd rule: a ray to the right crosses the polygon's edges an odd number of times.
fn inside(polygon: &[[f32; 2]], x: f32, y: f32) -> bool {
    let mut odd = false;
    let mut j = polygon.len().wrapping_sub(1);
    for (i, &[xi, yi]) in polygon.iter().enumerate() {
        let [xj, yj] = polygon[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            odd = !odd;
        }
        j = i;
    }
    odd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicFilter;

    fn zone(name: &str, polygon: &[[f32; 2]]) -> Zone {
        Zone {
            name: name.into(),
            cameras: Vec::new(),
            polygon: polygon.to_vec(),
            classes: Vec::new(),
            min_area: 0.0,
            anchor: Anchor::BottomCenter,
        }
    }

    #[test]
    fn the_bottom_centre_decides_and_concave_polygons_work() {
        // The lower half, and an L: the right column plus the bottom row.
        let lower = zone("lower", &[[0.0, 0.5], [1.0, 0.5], [1.0, 1.0], [0.0, 1.0]]);
        let l = zone(
            "l",
            &[[0.6, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.8], [0.6, 0.8]],
        );
        let zones = [lower, l];
        let all = for_camera(&zones, "cam", "t");
        assert_eq!(all, 0b11);
        // A person standing at the bottom left: feet in both zones, head in neither.
        let feet = containing(&zones, all, "person", [10.0, 20.0, 30.0, 95.0], 100, 100);
        assert_eq!(feet, 0b11);
        // The same box judged by its centre (y 0.575): in the lower half only.
        let mut centre = zones.clone();
        centre.iter_mut().for_each(|z| z.anchor = Anchor::Center);
        assert_eq!(
            containing(&centre, all, "person", [10.0, 20.0, 30.0, 95.0], 100, 100),
            0b01
        );
        // Inside the L's notch (x 0.3, y 0.6): lower half, not the L.
        assert_eq!(
            containing(&zones, all, "person", [20.0, 10.0, 40.0, 60.0], 100, 100),
            0b01
        );
        // Above both.
        assert_eq!(containing(&zones, all, "person", [20.0, 0.0, 40.0, 30.0], 100, 100), 0);
        // Non-square images are normalised per axis.
        assert_eq!(
            containing(&zones, all, "person", [100.0, 0.0, 300.0, 190.0], 400, 200),
            0b11
        );
    }

    #[test]
    fn cameras_classes_and_area_filter() {
        let mut z = zone("dock", &[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]);
        z.cameras = vec![
            CameraMatch::Device("cam-1".into()),
            CameraMatch::Topic(TopicFilter::parse("plant/+/dock/snapshots").unwrap()),
        ];
        z.classes = vec!["person".into()];
        z.min_area = 0.05;
        let zones = [z];
        assert_eq!(for_camera(&zones, "cam-1", "x"), 1);
        assert_eq!(for_camera(&zones, "cam-2", "plant/a/dock/snapshots"), 1);
        assert_eq!(for_camera(&zones, "cam-2", "plant/a/gate/snapshots"), 0);
        let box_ = [10.0, 10.0, 40.0, 40.0]; // 9% of 100x100
        assert_eq!(containing(&zones, 1, "person", box_, 100, 100), 1);
        assert_eq!(
            containing(&zones, 1, "car", box_, 100, 100),
            0,
            "not a class the zone cares about"
        );
        assert_eq!(
            containing(&zones, 1, "person", [10.0, 10.0, 20.0, 20.0], 100, 100),
            0,
            "1%: too small"
        );
        assert_eq!(
            containing(&zones, 0, "person", box_, 100, 100),
            0,
            "not drawn for this camera"
        );
    }
}
