//! Connection counts per client address, per relay node. (Message budgets are token buckets in
//! `ingress`; the LLM turn limit, which must hold across nodes, lives in Redis: see `llm`.)

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// Open connections per client address on this node.
#[derive(Debug, Default, Clone)]
pub struct ConnCounter {
    counts: Arc<DashMap<IpAddr, usize>>,
}

/// Holds one connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnSlot {
    counts: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl ConnCounter {
    /// A slot for `ip`, or `None` when it already has `max` connections.
    pub fn acquire(&self, ip: IpAddr, max: usize) -> Option<ConnSlot> {
        let mut count = self.counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        drop(count);
        Some(ConnSlot {
            counts: self.counts.clone(),
            ip,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.counts.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_released() {
        let c = ConnCounter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = c.acquire(ip, 2).unwrap();
        let _b = c.acquire(ip, 2).unwrap();
        assert!(c.acquire(ip, 2).is_none());
        drop(a);
        assert!(c.acquire(ip, 2).is_some());
    }
}
