//! Per-camera state with a bound: a table of at most `capacity` cameras that
//! forgets the one seen least recently when a new one arrives.
//!
//! Owns: the bound and the eviction order. Device ids come from outside, so a
//! flood of made-up ids costs only the oldest entries, never the state of the
//! cameras that keep sending (the rate limiter's budget, the frozen-frame
//! monitor's last hash).

use std::collections::HashMap;

/// At most `capacity` cameras' `V`, least recently seen evicted first.
///
/// Seeing a known camera costs a hash lookup and allocates nothing; a new
/// camera in a full table costs one pass over the table to find the oldest.
#[derive(Debug)]
pub struct Table<V> {
    capacity: usize,
    /// Camera -> (value, when last seen as a tick).
    entries: HashMap<String, (V, u64)>,
    tick: u64,
}

impl<V> Table<V> {
    pub fn new(capacity: usize) -> Table<V> {
        Table {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `camera`'s value, marked as seen now; a new camera gets `new()`,
    /// evicting the least recently seen one when the table is full.
    pub fn touch(&mut self, camera: &str, new: impl FnOnce() -> V) -> &mut V {
        self.tick += 1;
        let tick = self.tick;
        if !self.entries.contains_key(camera) {
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, seen))| *seen)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.entries.remove(&k);
                }
            }
            self.entries.insert(camera.to_owned(), (new(), tick));
        }
        let (value, seen) = self.entries.get_mut(camera).expect("present: found or inserted above");
        *seen = tick;
        value
    }

    /// Every camera's value, in no particular order (does not count as seeing them).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.entries.iter().map(|(k, (v, _))| (k.as_str(), v))
    }

    /// Whether `camera` is in the table (does not count as seeing it).
    pub fn contains(&self, camera: &str) -> bool {
        self.entries.contains_key(camera)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_new_ids_evicts_the_least_recently_seen_only() {
        let mut t: Table<u32> = Table::new(3);
        *t.touch("real-1", || 0) += 1;
        *t.touch("real-2", || 0) += 1;
        for i in 0..100 {
            // The real cameras keep sending between the fake ids.
            *t.touch("real-1", || 0) += 1;
            *t.touch("real-2", || 0) += 1;
            t.touch(&format!("fake-{i}"), || 0);
            assert_eq!(t.len(), 3);
        }
        assert_eq!(*t.touch("real-1", || 0), 101, "real-1 was never forgotten");
        assert_eq!(*t.touch("real-2", || 0), 101);
        assert!(t.contains("fake-99") && !t.contains("fake-98"));
    }
}
