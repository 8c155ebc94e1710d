//! The one EXIF field the service needs: the orientation (tag 0x0112) in
//! IFD0. Everything else in the block is skipped; anything malformed reads as
//! "no orientation", never as an error: a picture is not refused for its tags.

use super::Orientation;

/// The orientation in an EXIF block (a TIFF header and IFD0, with or without
/// the `Exif\0\0` prefix of a JPEG APP1 segment).
pub(super) fn orientation(exif: &[u8]) -> Orientation {
    read(exif.strip_prefix(b"Exif\0\0").unwrap_or(exif))
        .map(Orientation::from_exif)
        .unwrap_or_default()
}

fn read(b: &[u8]) -> Option<u16> {
    let big = match b.get(..4)? {
        b"MM\0*" => true,
        b"II*\0" => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let v: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big {
            u16::from_be_bytes(v)
        } else {
            u16::from_le_bytes(v)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let v: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        })
    };
    let ifd = u32_at(4)? as usize;
    let entries = u16_at(ifd)? as usize;
    (0..entries).find_map(|i| {
        let at = ifd.checked_add(2 + i * 12)?;
        // SHORT (3), count 1: the value is in the entry's first two value bytes.
        (u16_at(at)? == 0x0112 && u16_at(at + 2)? == 3 && u32_at(at + 4)? == 1).then(|| u16_at(at + 8))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(big: bool, value: u16) -> Vec<u8> {
        let u16b = |v: u16| if big { v.to_be_bytes() } else { v.to_le_bytes() };
        let u32b = |v: u32| if big { v.to_be_bytes() } else { v.to_le_bytes() };
        let mut b = if big { b"MM\0*".to_vec() } else { b"II*\0".to_vec() };
        b.extend(u32b(8));
        b.extend(u16b(2));
        // An unrelated entry (ImageDescription), then the orientation.
        b.extend(u16b(0x010e));
        b.extend(u16b(2));
        b.extend(u32b(4));
        b.extend(u32b(0));
        b.extend(u16b(0x0112));
        b.extend(u16b(3));
        b.extend(u32b(1));
        b.extend(u16b(value));
        b.extend([0, 0]);
        b.extend(u32b(0));
        b
    }

    #[test]
    fn reads_the_orientation_in_either_byte_order() {
        assert_eq!(orientation(&block(false, 6)), Orientation::from_exif(6));
        assert_eq!(orientation(&block(true, 8)), Orientation::from_exif(8));
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(block(true, 3));
        assert_eq!(orientation(&app1), Orientation::from_exif(3));
    }

    #[test]
    fn malformed_blocks_read_as_upright() {
        let good = block(false, 6);
        // The value ends at byte 32; any shorter block has no orientation.
        for cut in 0..32 {
            let o = orientation(&good[..cut]);
            assert!(o.is_identity(), "cut at {cut}");
        }
        assert!(orientation(&block(false, 0)).is_identity());
        assert!(orientation(&block(false, 9)).is_identity());
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(orientation(&huge).is_identity());
    }
}
