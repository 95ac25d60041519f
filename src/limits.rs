//! Counted slots per key, per relay node: open TCP connections per address, WebSockets and event
//! streams per address and per room. (Message budgets are token buckets in `ingress`; the LLM
//! turn limit, which must hold across nodes, lives in Redis: see `llm`.)

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// How many slots each key holds. Cheap to clone (one map shared by all clones).
#[derive(Debug)]
pub(crate) struct Slots<K: Eq + Hash> {
    counts: Arc<DashMap<K, usize>>,
}

impl<K: Eq + Hash> Default for Slots<K> {
    fn default() -> Self {
        Self {
            counts: Arc::default(),
        }
    }
}

impl<K: Eq + Hash> Clone for Slots<K> {
    fn clone(&self) -> Self {
        Self {
            counts: self.counts.clone(),
        }
    }
}

/// Holds one slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot<K: Eq + Hash> {
    counts: Arc<DashMap<K, usize>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Slots<K> {
    /// A slot for `key`, or `None` when it already holds `max`. Check and count are one step, so
    /// concurrent callers cannot both take the last slot.
    pub(crate) fn acquire(&self, key: K, max: usize) -> Option<Slot<K>> {
        let mut count = self.counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Slot {
            counts: self.counts.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        self.counts.remove_if_mut(&self.key, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// A long-lived member of a room: each kind has its own per-room and per-address count, so
/// many event streams never fill a room for WebSockets (or the other way round).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MemberKind {
    WebSocket,
    EventStream,
}

/// Why a member was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The room holds `--max-conns-per-room` members of this kind on this node.
    Room,
    /// The address holds `--max-conns-per-ip` members of this kind on this node.
    Address,
}

/// Member slots per room and per client address, by kind.
#[derive(Debug, Clone)]
pub(crate) struct MemberSlots {
    per_room: Slots<(MemberKind, Arc<str>)>,
    per_addr: Slots<(MemberKind, IpAddr)>,
    max_per_room: usize,
    max_per_addr: usize,
}

/// A member's slots (its room's, when it is bound to one, and its address's); dropping it frees
/// them.
#[derive(Debug)]
pub(crate) struct MemberSlot {
    _room: Option<Slot<(MemberKind, Arc<str>)>>,
    _addr: Slot<(MemberKind, IpAddr)>,
}

impl MemberSlots {
    pub(crate) fn new(max_per_room: usize, max_per_addr: usize) -> Self {
        Self {
            per_room: Slots::default(),
            per_addr: Slots::default(),
            max_per_room,
            max_per_addr,
        }
    }

    /// The slots of a new member of `kind` in `room` (when it is bound to one: the evaluation
    /// dialect's socket names a session per frame) from `addr` (a limit key), or which limit is
    /// full.
    pub(crate) fn acquire(
        &self,
        kind: MemberKind,
        room: Option<&str>,
        addr: IpAddr,
    ) -> Result<MemberSlot, Full> {
        let room = match room {
            Some(room) => Some(
                self.per_room
                    .acquire((kind, room.into()), self.max_per_room)
                    .ok_or(Full::Room)?,
            ),
            None => None,
        };
        let addr = self
            .per_addr
            .acquire((kind, addr), self.max_per_addr)
            .ok_or(Full::Address)?;
        Ok(MemberSlot {
            _room: room,
            _addr: addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_released() {
        let c = Slots::<IpAddr>::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = c.acquire(ip, 2).unwrap();
        let _b = c.acquire(ip, 2).unwrap();
        assert!(c.acquire(ip, 2).is_none());
        drop(a);
        assert!(c.acquire(ip, 2).is_some(), "a dropped slot is free again");
        let _c = c.acquire(ip, 2).expect("and so is the temporary one");
        assert!(c.acquire(ip, 2).is_none());
    }

    #[test]
    fn kinds_count_apart() {
        let m = MemberSlots::new(1, 5);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let _ws = m.acquire(MemberKind::WebSocket, Some("r"), ip).unwrap();
        assert_eq!(
            m.acquire(MemberKind::WebSocket, Some("r"), ip).unwrap_err(),
            Full::Room
        );
        let _sse = m.acquire(MemberKind::EventStream, Some("r"), ip).unwrap();
        let m = MemberSlots::new(5, 1);
        let _a = m.acquire(MemberKind::EventStream, Some("a"), ip).unwrap();
        assert_eq!(
            m.acquire(MemberKind::EventStream, Some("b"), ip)
                .unwrap_err(),
            Full::Address
        );
        assert!(m.acquire(MemberKind::WebSocket, Some("b"), ip).is_ok());
    }
}
