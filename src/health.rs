//! Camera health: the job the `minimal` build does without ML, and a
//! built-in model in every build.
//!
//! Owns: per-frame image statistics (brightness, blur as variance of the
//! Laplacian, frozen-frame detection by content hash) and the per-camera
//! memory that frozen detection needs. Pure computation over decoded RGB.

use std::sync::Mutex;

use crate::cameras::Table;
use crate::config::model::Health;

/// Cameras remembered for frozen-frame detection and rate limiting; beyond
/// this the least recently seen is forgotten (`cameras.rs`).
pub const MAX_CAMERAS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HealthReport {
    pub width: u32,
    pub height: u32,
    /// Mean luma, 0..255.
    pub mean_brightness: f32,
    /// Variance of the 4-neighbour Laplacian of luma; low means blurry.
    pub blur_score: f32,
    pub black_frame: bool,
    pub blurry: bool,
    /// Identical to the previous frame of the same camera.
    pub frozen: bool,
}

impl HealthReport {
    pub fn alert(&self) -> bool {
        self.black_frame || self.blurry || self.frozen
    }
}

/// Scratch for three rows of luma, sized once for the widest image.
#[derive(Debug, Default)]
pub struct Scratch {
    rows: [Vec<i32>; 3],
}

impl Scratch {
    pub fn with_capacity(max_width: usize) -> Scratch {
        Scratch {
            rows: std::array::from_fn(|_| Vec::with_capacity(max_width)),
        }
    }
}

/// Statistics of one packed RGB8 image (no frozen check; see [`Monitor`]).
pub fn analyse(rgb: &[u8], width: u32, height: u32, t: &Health, scratch: &mut Scratch) -> HealthReport {
    let (w, h) = (width as usize, height as usize);
    let luma_row = |y: usize, out: &mut Vec<i32>| {
        out.clear();
        out.extend(rgb[y * w * 3..(y + 1) * w * 3].chunks_exact(3).map(|p| {
            // BT.601 luma in 8.8 fixed point.
            (77 * p[0] as i32 + 150 * p[1] as i32 + 29 * p[2] as i32 + 128) >> 8
        }));
    };
    let mut luma_sum: u64 = 0;
    let (mut lap_sum, mut lap_sq, mut lap_n) = (0i64, 0i64, 0i64);
    // rows[k] holds luma of row y-1+k as the window slides.
    for y in 0..h {
        scratch.rows.rotate_left(1);
        luma_row(y, &mut scratch.rows[2]);
        luma_sum += scratch.rows[2].iter().map(|&v| v as u64).sum::<u64>();
        if y >= 2 && w >= 3 {
            let [up, mid, down] = &scratch.rows;
            for x in 1..w - 1 {
                let l = 4 * mid[x] - mid[x - 1] - mid[x + 1] - up[x] - down[x];
                lap_sum += l as i64;
                lap_sq += (l * l) as i64;
            }
            lap_n += (w - 2) as i64;
        }
    }
    let mean = if w * h > 0 {
        luma_sum as f64 / (w * h) as f64
    } else {
        0.0
    };
    let blur = if lap_n > 0 {
        let m = lap_sum as f64 / lap_n as f64;
        (lap_sq as f64 / lap_n as f64 - m * m).max(0.0)
    } else {
        0.0
    };
    HealthReport {
        width,
        height,
        mean_brightness: mean as f32,
        blur_score: blur as f32,
        black_frame: mean < t.black_threshold as f64,
        // A black frame has no texture; call it black, not blurry.
        blurry: mean >= t.black_threshold as f64 && blur < t.blur_threshold as f64,
        frozen: false,
    }
}

/// A frame's content fingerprint (`hash.rs`): equal images hash equal, and a
/// live camera's sensor noise changes it every frame.
pub fn content_hash(bytes: &[u8]) -> u64 {
    crate::hash::of(bytes)
}

/// Remembers each camera's last frame hash to spot frozen streams.
#[derive(Debug)]
pub struct Monitor {
    last: Mutex<Table<Option<u64>>>,
}

impl Default for Monitor {
    fn default() -> Monitor {
        Monitor {
            last: Mutex::new(Table::new(MAX_CAMERAS)),
        }
    }
}

impl Monitor {
    /// Records `hash` for `camera`; true when it equals the previous one.
    pub fn frozen(&self, camera: &str, hash: u64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.touch(camera, || None);
        let same = *prev == Some(hash);
        *prev = Some(hash);
        same
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Health = Health {
        black_threshold: 16.0,
        blur_threshold: 20.0,
    };

    #[test]
    fn black_flat_and_textured_frames() {
        let mut s = Scratch::with_capacity(64);
        let black = vec![0u8; 64 * 48 * 3];
        let r = analyse(&black, 64, 48, &T, &mut s);
        assert!(r.black_frame && !r.blurry && r.mean_brightness == 0.0);

        let grey = vec![128u8; 64 * 48 * 3];
        let r = analyse(&grey, 64, 48, &T, &mut s);
        assert!(!r.black_frame && r.blurry && r.blur_score == 0.0);
        assert!((r.mean_brightness - 128.0).abs() < 1.0);

        // A checkerboard is as sharp as it gets: Laplacian +-1020 everywhere.
        let checker: Vec<u8> = (0..64 * 48)
            .flat_map(|i| {
                let v = if (i % 64 + i / 64) % 2 == 0 { 255 } else { 0 };
                [v, v, v]
            })
            .collect();
        let r = analyse(&checker, 64, 48, &T, &mut s);
        assert!(!r.blurry && r.blur_score > 1e5, "{r:?}");
    }

    #[test]
    fn frozen_is_per_camera() {
        let m = Monitor::default();
        let a = content_hash(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let b = content_hash(&[1, 2, 3, 4, 5, 6, 7, 8, 10]);
        assert_ne!(a, b);
        assert!(!m.frozen("cam1", a));
        assert!(!m.frozen("cam2", a));
        assert!(m.frozen("cam1", a));
        assert!(!m.frozen("cam1", b));
    }
}
