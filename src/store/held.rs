//! Bodies a node keeps for its own feed, so a batch it commits need not travel through Redis
//! twice.
//!
//! Profiled under S1 (BENCHMARKS.md), about a fifth of Redis's CPU went to building the batch's
//! publish payload in Lua: Redis's Lua hashes every string it makes in full, and
//! `table.concat` makes several (its buffer spills every 8 KiB), so each body was hashed two
//! or three times more after arriving as an argument. When the committing node is the room's
//! only subscriber — one relay, or a room whose members are all on one node — nobody else
//! needs the bodies: the node holds them here under a token, `append.lua` publishes only the
//! token and the batch's ids (`-i`), and the node's feed pairs them again.
//!
//! Whatever goes wrong ends in the stream, never in a wrong delivery: a token from another
//! node (its node part differs), or one this node no longer holds (the script's reply was lost,
//! or the feed lagged or reconnected, and the hold was dropped), makes the feed recover the room
//! from its stream. A token is never reused: a node part chosen at random when the store is
//! built, then a counter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashSet;

/// A hold whose `-i` message never came (the node unsubscribed between the script's check and
/// its publish) is swept after this long; a lost subscription or a lagging feed drops them all
/// at once ([`Held::clear`]), so what is held stays a round trip's worth of batches.
const STALE: Duration = Duration::from_secs(10);
/// Holds between sweeps for stale ones.
const SWEEP_EVERY: u64 = 1024;

#[derive(Debug)]
pub(super) struct Held {
    /// This node's part of every token.
    node: u64,
    next: AtomicU64,
    batches: Mutex<HashMap<u64, (Instant, Vec<String>)>>,
    /// Rooms whose channel this node's feed has subscribed to (confirmed by Redis).
    following: DashSet<String>,
}

impl Default for Held {
    fn default() -> Self {
        let node = uuid::Uuid::new_v4().as_u64_pair().0;
        Held {
            node,
            next: AtomicU64::new(0),
            batches: Mutex::default(),
            following: DashSet::new(),
        }
    }
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (Instant, Vec<String>)>> {
        self.batches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this node's feed receives the room's channel.
    pub(super) fn follows(&self, sid: &str) -> bool {
        self.following.contains(sid)
    }

    pub(super) fn set_following(&self, sid: &str, following: bool) {
        if following {
            self.following.insert(sid.to_owned());
        } else {
            self.following.remove(sid);
        }
    }

    /// Keeps a batch's bodies (in batch order) until its `-i` message comes; the token as
    /// `append.lua` publishes it.
    pub(super) fn hold(&self, bodies: Vec<String>) -> (u64, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut batches = self.lock();
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            batches.retain(|_, (at, _)| at.elapsed() < STALE);
        }
        batches.insert(n, (Instant::now(), bodies));
        (n, format!("{:x}.{n:x}", self.node))
    }

    /// Drops a hold whose `-i` message will not come (or may not: the reply was lost).
    pub(super) fn release(&self, n: u64) {
        self.lock().remove(&n);
    }

    /// Drops every hold: the feed lost messages (it lagged or reconnected), and the rooms catch
    /// up from their streams anyway.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// The bodies held under a published token, once; `None` for another node's token or one
    /// no longer held.
    pub(super) fn take(&self, token: &str) -> Option<Vec<String>> {
        let (node, n) = token.split_once('.')?;
        if u64::from_str_radix(node, 16).ok()? != self.node {
            return None;
        }
        let n = u64::from_str_radix(n, 16).ok()?;
        self.lock().remove(&n).map(|(_, bodies)| bodies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gives_its_bodies_once_and_only_on_its_node() {
        let (here, there) = (Held::default(), Held::default());
        let (_, token) = here.hold(vec!["a".into(), "b".into()]);
        assert_eq!(there.take(&token), None, "another node's token");
        assert_eq!(here.take(&token), Some(vec!["a".into(), "b".into()]));
        assert_eq!(here.take(&token), None, "taken already");
        let (n, token) = here.hold(vec!["c".into()]);
        here.release(n);
        assert_eq!(here.take(&token), None, "released");
        let (_, token) = here.hold(vec!["d".into()]);
        here.clear();
        assert_eq!(here.take(&token), None, "cleared");
        assert_eq!(here.take("nonsense"), None);
    }
}
