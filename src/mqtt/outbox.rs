//! The offline result queue: results made while the broker is unreachable
//! wait here, oldest dropped first when full, and go out after reconnect.

use std::collections::VecDeque;

use crate::messages::Outbound;

pub struct Outbox {
    queue: VecDeque<Outbound>,
    capacity: usize,
}

impl Outbox {
    /// Allocated once at its full size.
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            queue: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Queues `o`; returns true when that dropped a result (the oldest, or
    /// `o` itself when the capacity is 0).
    pub fn push(&mut self, o: Outbound) -> bool {
        if self.capacity == 0 {
            return true;
        }
        let dropped = self.queue.len() == self.capacity && self.queue.pop_front().is_some();
        self.queue.push_back(o);
        dropped
    }

    pub fn pop(&mut self) -> Option<Outbound> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u8) -> Outbound {
        Outbound {
            topic: "t".into(),
            payload: vec![i],
            error: false,
        }
    }

    #[test]
    fn keeps_the_newest_and_counts_what_it_drops() {
        let mut q = Outbox::new(2);
        assert!(!q.push(msg(1)));
        assert!(!q.push(msg(2)));
        assert!(q.push(msg(3)), "full: the oldest goes");
        assert_eq!(q.pop().unwrap().payload, [2]);
        assert_eq!(q.pop().unwrap().payload, [3]);
        assert_eq!(q.len(), 0);
        let mut none = Outbox::new(0);
        assert!(none.push(msg(1)));
        assert_eq!(none.len(), 0);
    }
}
