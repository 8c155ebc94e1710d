//! EXIF orientation: how the stored pixels are turned to stand upright
//! (a camera mounted sideways, a phone held in portrait).

/// One of the eight EXIF orientations (1 is upright as stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orientation(u8);

impl Default for Orientation {
    fn default() -> Orientation {
        Orientation(1)
    }
}

impl Orientation {
    /// The EXIF value; anything outside 1..=8 is taken as upright.
    pub fn from_exif(v: u16) -> Orientation {
        match v {
            1..=8 => Orientation(v as u8),
            _ => Orientation(1),
        }
    }

    pub fn exif(self) -> u8 {
        self.0
    }

    pub fn is_identity(self) -> bool {
        self.0 == 1
    }

    /// Degrees the stored image is turned clockwise to stand upright, after a
    /// left-right mirror when [`mirrored`](Self::mirrored) (EXIF's wording).
    pub fn rotation(self) -> u16 {
        match self.0 {
            3 | 4 => 180,
            6 | 7 => 90,
            5 | 8 => 270,
            _ => 0,
        }
    }

    pub fn mirrored(self) -> bool {
        matches!(self.0, 2 | 4 | 5 | 7)
    }

    /// Whether width and height trade places.
    pub fn transposes(self) -> bool {
        self.0 >= 5
    }

    /// Upright pixel `(x, y)` is stored pixel `origin + x * dx + y * dy` of a
    /// `w` x `h` stored image (in pixels).
    fn steps(self, w: isize, h: isize) -> (isize, isize, isize) {
        match self.0 {
            2 => (w - 1, -1, w),
            3 => ((h - 1) * w + w - 1, -1, -w),
            4 => ((h - 1) * w, 1, -w),
            5 => (0, w, 1),
            6 => ((h - 1) * w, -w, 1),
            7 => ((h - 1) * w + w - 1, -w, -1),
            8 => (w - 1, w, -1),
            _ => (0, 1, w),
        }
    }

    /// Writes the upright image of the `w` x `h` packed RGB8 `src` into `dst`
    /// (as long); returns its size.
    pub fn apply(self, src: &[u8], w: u32, h: u32, dst: &mut [u8]) -> (u32, u32) {
        let (uw, uh) = if self.transposes() { (h, w) } else { (w, h) };
        let (origin, dx, dy) = self.steps(w as isize, h as isize);
        // In tiles, so the strided reads of a quarter turn stay in cache.
        const T: u32 = 32;
        for ty in (0..uh).step_by(T as usize) {
            for tx in (0..uw).step_by(T as usize) {
                for y in ty..(ty + T).min(uh) {
                    let row = origin + y as isize * dy;
                    for x in tx..(tx + T).min(uw) {
                        let s = (row + x as isize * dx) as usize * 3;
                        let d = (y as usize * uw as usize + x as usize) * 3;
                        dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
                    }
                }
            }
        }
        (uw, uh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored image each orientation describes, made from an upright one
    /// by EXIF's definition of where row 0 and column 0 are shown.
    fn stored(o: u8, up: &[[u8; 3]], uw: usize, uh: usize) -> (Vec<u8>, u32, u32) {
        let (w, h) = if o >= 5 { (uh, uw) } else { (uw, uh) };
        let mut s = vec![0u8; w * h * 3];
        for sy in 0..h {
            for sx in 0..w {
                // Where stored (sx, sy) is shown, upright.
                let (x, y) = match o {
                    1 => (sx, sy),
                    2 => (w - 1 - sx, sy),
                    3 => (w - 1 - sx, h - 1 - sy),
                    4 => (sx, h - 1 - sy),
                    5 => (sy, sx),
                    6 => (h - 1 - sy, sx),
                    7 => (h - 1 - sy, w - 1 - sx),
                    8 => (sy, w - 1 - sx),
                    _ => unreachable!(),
                };
                s[(sy * w + sx) * 3..][..3].copy_from_slice(&up[y * uw + x]);
            }
        }
        (s, w as u32, h as u32)
    }

    #[test]
    fn every_orientation_turns_the_picture_upright() {
        let (uw, uh) = (37usize, 70usize);
        let up: Vec<[u8; 3]> = (0..uw * uh)
            .map(|i| [(i % 251) as u8, (i / 251) as u8, (i % 7) as u8])
            .collect();
        let flat: Vec<u8> = up.iter().flatten().copied().collect();
        for o in 1..=8u8 {
            let (s, w, h) = stored(o, &up, uw, uh);
            let mut dst = vec![0u8; s.len()];
            let (gw, gh) = Orientation(o).apply(&s, w, h, &mut dst);
            assert_eq!((gw as usize, gh as usize), (uw, uh), "orientation {o}");
            assert!(dst == flat, "orientation {o}");
        }
    }

    #[test]
    fn out_of_range_values_are_upright() {
        assert!(Orientation::from_exif(0).is_identity());
        assert!(Orientation::from_exif(9).is_identity());
        assert_eq!(Orientation::from_exif(6).rotation(), 90);
        assert!(!Orientation::from_exif(6).mirrored());
        assert!(Orientation::from_exif(7).mirrored());
    }
}
