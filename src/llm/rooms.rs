//! The rooms a worker reads: those with traffic lately. A room silent for the wake window
//! leaves the set (unless requests of it are still pending), so `XREADGROUP` names only live
//! rooms however many exist; its next entry announces it again in the registry (the append
//! script notices the room woke up), and the worker picks it up from there — no scan.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct ReadSet {
    rooms: Mutex<HashMap<String, Instant>>,
    window: Duration,
}

impl ReadSet {
    pub(super) fn new(window: Duration) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            window,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The room had traffic (or was announced) just now.
    pub(super) fn touch(&self, sid: &str) {
        let now = Instant::now();
        let mut rooms = self.lock();
        match rooms.get_mut(sid) {
            Some(at) => *at = now,
            None => {
                rooms.insert(sid.to_owned(), now);
            }
        }
    }

    pub(super) fn contains(&self, sid: &str) -> bool {
        self.lock().contains_key(sid)
    }

    /// Every room in the set, to read.
    pub(super) fn all(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Rooms silent for the whole window: candidates to forget.
    pub(super) fn idle(&self) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= self.window)
            .map(|(sid, _)| sid.clone())
            .collect()
    }

    /// Forgets a room if it is still idle (it may have been touched since [`ReadSet::idle`]).
    pub(super) fn forget_if_idle(&self, sid: &str) -> bool {
        let now = Instant::now();
        let mut rooms = self.lock();
        let idle = rooms
            .get(sid)
            .is_some_and(|at| now.duration_since(*at) >= self.window);
        if idle {
            rooms.remove(sid);
        }
        idle
    }

    pub(super) fn forget(&self, sid: &str) {
        self.lock().remove(sid);
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_leave_after_the_window_unless_touched() {
        let set = ReadSet::new(Duration::from_millis(30));
        set.touch("a");
        set.touch("b");
        assert_eq!(set.idle(), Vec::<String>::new());
        std::thread::sleep(Duration::from_millis(40));
        set.touch("b");
        assert_eq!(set.idle(), ["a"]);
        assert!(set.forget_if_idle("a"));
        assert!(!set.forget_if_idle("b"), "b was touched");
        assert_eq!(set.all(), ["b"]);
    }
}
