//! One 64-bit hash for the service's fingerprints: a frame's content (frozen
//! camera detection), a message's key in the redelivery window, a model
//! file's version. Fast, not cryptographic: equal input hashes equal, and
//! every input bit reaches every output bit (splitmix64's finaliser).

/// Hashes words and byte strings (each with its length, so `ab`+`` and `a`+`b` differ).
pub struct Hasher(u64);

impl Hasher {
    const M: u64 = 0x9E37_79B9_7F4A_7C15;

    pub fn new(seed: u64) -> Hasher {
        Hasher(seed ^ 0x243F_6A88_85A3_08D3)
    }

    pub fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(23) ^ w).wrapping_mul(Self::M);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(tail));
        self.word(b.len() as u64);
    }

    pub fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The hash of one byte string.
pub fn of(bytes: &[u8]) -> u64 {
    let mut h = Hasher::new(0);
    h.bytes(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_changed_byte_changes_the_hash() {
        let a = super::of(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_ne!(a, super::of(&[1, 2, 3, 4, 5, 6, 7, 8, 10]));
        assert_ne!(a, super::of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]));
        assert_eq!(a, super::of(&[1, 2, 3, 4, 5, 6, 7, 8, 9]));
    }
}
