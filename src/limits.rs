//! Abuse limits that need state: token buckets (messages per connection and per room) and
//! connection counts per client address. Every limit is per relay node; the LLM turn limit,
//! which must hold across nodes, lives in Redis (see `llm`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

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
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3.0, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0), "burst spent");
        assert!(!b.try_take(t0 + Duration::from_millis(400)));
        assert!(
            b.try_take(t0 + Duration::from_millis(900)),
            "one token after 0.5 s at 2/s"
        );
        assert!(b.try_take(t0 + Duration::from_secs(10)));
        let mut later = t0 + Duration::from_secs(10);
        let mut n = 0;
        while b.try_take(later) {
            n += 1;
            later += Duration::from_nanos(1);
        }
        assert_eq!(n, 2, "never more than the burst");
    }

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
