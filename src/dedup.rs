//! Redelivery detection: a fixed window of recently admitted QoS 1/2
//! messages, so a frame the broker (or its publisher) sends again after a
//! broken connection is answered once.
//!
//! Owns: the window and the message key. The policy (which messages may be
//! treated as repeats) is `pipeline.rs`'s: an envelope (JSON with its own
//! timestamp and ids) that is byte-identical to a recent one is a repeat; a raw
//! JPEG is a repeat only when the broker marks it DUP with the same packet id,
//! because a frozen camera sends byte-identical JPEGs that must be answered.

/// What the window knows of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not in the window (now recorded as in flight).
    New,
    /// Admitted and not yet answered; `pkid` is the delivery it came with.
    InFlight { pkid: u16 },
    /// Answered: its result is with the MQTT client.
    Answered,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    key: u64,
    pkid: u16,
    answered: bool,
    used: bool,
}

/// The last `capacity` messages, oldest overwritten first, with a hashed
/// index from key to its newest entry: a lookup costs the same for a window
/// of 10 or 1,000,000. Both are allocated once, at their full size.
pub struct Window {
    entries: Box<[Entry]>,
    index: std::collections::HashMap<u64, usize>,
    next: usize,
}

impl Window {
    /// `None` for capacity 0 (detection off).
    pub fn new(capacity: usize) -> Option<Window> {
        (capacity > 0).then(|| Window {
            entries: vec![Entry::default(); capacity].into_boxed_slice(),
            index: std::collections::HashMap::with_capacity(capacity),
            next: 0,
        })
    }

    /// The newest entry for `key` (a key can be present twice: a raw frame
    /// repeated on a reused packet id).
    fn find(&self, key: u64) -> Option<usize> {
        self.index
            .get(&key)
            .copied()
            .filter(|&i| self.entries[i].used && self.entries[i].key == key)
    }

    /// Looks `key` up; records it as in flight when it is new.
    pub fn check(&mut self, key: u64, pkid: u16) -> Seen {
        match self.find(key) {
            Some(i) if self.entries[i].answered => Seen::Answered,
            Some(i) => Seen::InFlight {
                pkid: self.entries[i].pkid,
            },
            None => {
                self.insert(key, pkid);
                Seen::New
            }
        }
    }

    /// Records `key` as in flight without looking it up.
    pub fn insert(&mut self, key: u64, pkid: u16) {
        let old = self.entries[self.next];
        // The overwritten entry leaves the index, unless a newer one holds its key.
        if old.used && self.index.get(&old.key) == Some(&self.next) {
            self.index.remove(&old.key);
        }
        self.index.insert(key, self.next);
        self.entries[self.next] = Entry {
            key,
            pkid,
            answered: false,
            used: true,
        };
        self.next = (self.next + 1) % self.entries.len();
    }

    /// Marks the newest entry for `key` answered.
    pub fn answered(&mut self, key: u64) {
        if let Some(i) = self.find(key) {
            self.entries[i].answered = true;
        }
    }
}

/// A 64-bit key of a message: its topic, payload and, for raw frames, the
/// packet id. Not cryptographic; a collision among the window's entries is
/// about 2^-50 likely.
pub fn key(topic: &[u8], payload: &[u8], pkid: Option<u16>) -> u64 {
    let mut h = crate::hash::Hasher::new(pkid.map_or(0, |p| p as u64 + 1));
    h.bytes(topic);
    h.bytes(payload);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_seen_in_flight_then_answered() {
        let mut w = Window::new(4).unwrap();
        let k = key(b"t", b"frame", None);
        assert_eq!(w.check(k, 7), Seen::New);
        assert_eq!(w.check(k, 9), Seen::InFlight { pkid: 7 });
        w.answered(k);
        assert_eq!(w.check(k, 9), Seen::Answered);
    }

    #[test]
    fn the_oldest_entry_gives_way() {
        let mut w = Window::new(2).unwrap();
        let keys: Vec<u64> = (0..3u8).map(|i| key(b"t", &[i], None)).collect();
        for k in &keys {
            assert_eq!(w.check(*k, 1), Seen::New);
        }
        assert_eq!(w.check(keys[0], 1), Seen::New, "evicted, so new again");
        assert_eq!(w.check(keys[2], 1), Seen::InFlight { pkid: 1 });
    }

    #[test]
    fn the_index_follows_the_ring_through_repeats_and_wraparound() {
        let mut w = Window::new(3).unwrap();
        let (a, b, c, d) = (1u64, 2, 3, 4);
        w.insert(a, 1);
        w.insert(a, 2); // a raw frame repeated on another packet id: the newest counts
        assert_eq!(w.check(a, 9), Seen::InFlight { pkid: 2 });
        w.insert(b, 3); // overwrites nothing yet
        w.insert(c, 4); // overwrites the older `a`; the newer one stays indexed
        assert_eq!(w.check(a, 9), Seen::InFlight { pkid: 2 });
        w.insert(d, 5); // overwrites the newer `a`
        assert_eq!(w.check(a, 9), Seen::New);
        assert_eq!(w.check(c, 9), Seen::InFlight { pkid: 4 });
        // The index holds one entry per key in the window, never more.
        assert_eq!(w.index.len(), 3);
    }

    #[test]
    fn keys_differ_by_topic_payload_packet_id_and_length() {
        let base = key(b"a/b", b"payload", Some(3));
        assert_ne!(base, key(b"a/c", b"payload", Some(3)));
        assert_ne!(base, key(b"a/b", b"paylaod", Some(3)));
        assert_ne!(base, key(b"a/b", b"payload", Some(4)));
        assert_ne!(base, key(b"a/b", b"payload", None));
        assert_ne!(key(b"t", b"x", None), key(b"t", b"x\0", None));
        assert_ne!(key(b"ab", b"", None), key(b"a", b"b", None));
        assert_eq!(base, key(b"a/b", b"payload", Some(3)));
    }

    #[test]
    fn zero_capacity_is_off() {
        assert!(Window::new(0).is_none());
    }
}
