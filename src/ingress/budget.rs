//! Budgets: token buckets from `governor` (GCRA), all per node.
//!
//! - **per client**: a WebSocket connection owns its bucket; HTTP requests (and adapters without
//!   a connection) share one bucket per client — its token subject, else its address — across
//!   all its requests on this node;
//! - **per room**, keyed by room id (not by local membership) and split into [`Lane`]s that each
//!   get the whole room budget, so HTTP publishers cannot starve a room's WebSocket members (or
//!   the other way round), and connect/close churn cannot starve either;
//! - **room creations per client**, charged when an append would create a room's stream;
//! - **handshakes per address** (WebSocket upgrades and event streams).
//!
//! Keyed maps forget buckets that have refilled (indistinguishable from new ones) and are capped
//! ([`Capped`]), so a flood of distinct keys costs bounded memory.

use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A bucket's quota: `per_sec` messages per second, which may be fractional (`0.5` = one every
/// two seconds), after a burst of `burst` (whole messages). `None` when the values cannot make a
/// working bucket (not finite, rate ≤ 0, burst < 1).
pub(crate) fn quota(per_sec: f64, burst: f64) -> Option<Quota> {
    if !(per_sec.is_finite() && per_sec > 0.0 && burst.is_finite() && burst >= 1.0) {
        return None;
    }
    let period = Duration::try_from_secs_f64(1.0 / per_sec)
        .ok()?
        .max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst.min(f64::from(u32::MAX)) as u32)?;
    Some(Quota::with_period(period)?.allow_burst(burst))
}

/// The instants of governor's default clock.
type Instant = <DefaultClock as Clock>::Instant;

/// Buckets by key. Cheap to clone (one map shared by all clones).
pub(crate) struct Buckets<K: Hash + Eq + Clone> {
    limiter: Arc<RateLimiter<K, Capped<K>, DefaultClock, NoOpMiddleware<Instant>>>,
}

impl<K: Hash + Eq + Clone> Clone for Buckets<K> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets of `quota`; at most `max_keys` keys get one of their own (see [`Capped`]).
    pub(crate) fn new(quota: Quota, max_keys: usize) -> Self {
        let store = Capped {
            keys: DashMap::default(),
            overflow: InMemoryState::default(),
            max_keys,
        };
        Self {
            limiter: Arc::new(RateLimiter::new(quota, store, DefaultClock::default())),
        }
    }

    /// Takes one from `key`'s bucket; `false` when it is empty.
    pub(crate) fn try_take(&self, key: &K) -> bool {
        self.limiter.check_key(key).is_ok()
    }

    /// Forgets keys whose bucket has refilled: such a bucket is indistinguishable from a new
    /// one, so this changes no decision, and the map holds only keys that spent within the last
    /// `burst / rate` seconds.
    pub(crate) fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys with a bucket of their own that has not refilled yet.
    pub(crate) fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

impl<K: Hash + Eq + Clone> fmt::Debug for Buckets<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buckets")
            .field("tracked", &self.tracked())
            .finish()
    }
}

/// governor's `DashMap` state store with a cap: once `max_keys` keys have a bucket, a new key
/// shares one overflow bucket with every other new key until eviction makes room. Known keys
/// keep their own buckets, and a flood of distinct keys costs bounded memory (and gets one
/// bucket's worth of frames between all of them).
struct Capped<K: Hash + Eq> {
    keys: DashMap<K, InMemoryState>,
    overflow: InMemoryState,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> StateStore for Capped<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if self.keys.contains_key(key) || self.keys.len() < self.max_keys {
            self.keys.measure_and_replace(key, f)
        } else {
            self.overflow.measure_and_replace(&NotKeyed::NonKey, f)
        }
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Capped<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.keys.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        self.keys.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Which share of a room's budget a stored entry is paid from. Each lane gets the whole
/// `--room-msgs-*` budget, so a room stores at most three times it per node, and no kind of
/// traffic can lock another out: an HTTP client spending the room's budget leaves its
/// WebSocket members theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// Frames from connections that own their budget (WebSockets, dialect sockets).
    Sockets,
    /// HTTP requests and other connectionless adapters.
    Requests,
    /// `session.join` / `session.leave` entries: connect/close churn.
    Presence,
}

/// Who a shared per-client bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    /// The token's subject (`--auth jwt`).
    Subject(Arc<str>),
    /// The client address's limit key (without auth).
    Addr(IpAddr),
    /// Neither was given: all such requests share one bucket.
    Unknown,
}

/// Frames per client.
pub(crate) enum ClientBudget {
    /// The client's bucket on this node, shared by all its requests (see [`ClientKey`]).
    Shared,
    /// A bucket of the connection's own (a WebSocket).
    Own(DefaultDirectRateLimiter),
}

impl ClientBudget {
    pub(crate) fn own(quota: Quota) -> Self {
        ClientBudget::Own(RateLimiter::direct(quota))
    }

    /// Takes one frame from the budget; `clients` and `key` name the shared bucket.
    pub(crate) fn try_take(&self, clients: &Buckets<ClientKey>, key: &ClientKey) -> bool {
        match self {
            ClientBudget::Shared => clients.try_take(key),
            ClientBudget::Own(bucket) => bucket.check().is_ok(),
        }
    }

    /// The room-budget lane frames under this budget are paid from.
    pub(crate) fn lane(&self) -> Lane {
        match self {
            ClientBudget::Shared => Lane::Requests,
            ClientBudget::Own(_) => Lane::Sockets,
        }
    }
}

impl fmt::Debug for ClientBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientBudget::Shared => "Shared",
            ClientBudget::Own(_) => "Own",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// How many of `n` checks spaced `step` apart pass, starting with a full bucket.
    fn passes(q: Quota, n: usize, step: Duration) -> Vec<bool> {
        let clock = FakeRelativeClock::default();
        let lim = RateLimiter::direct_with_clock(q, clock.clone());
        (0..n)
            .map(|_| {
                let ok = lim.check().is_ok();
                clock.advance(step);
                ok
            })
            .collect()
    }

    #[test]
    fn burst_then_refusals_then_the_rate() {
        let q = quota(1.0, 3.0).unwrap();
        let quick = passes(q, 10, Duration::from_millis(1));
        assert_eq!(quick.iter().filter(|p| **p).count(), 3, "{quick:?}");
        assert!(quick[..3].iter().all(|p| *p));
    }

    #[test]
    fn fractional_rates_refill_slowly() {
        // 0.5/s after a burst of 2, one try per second: the burst, plus what refilled while
        // it was spent (t=2), then one message every two seconds. The token bucket this
        // replaced gives the same answers.
        let q = quota(0.5, 2.0).unwrap();
        let each_second = passes(q, 8, Duration::from_secs(1));
        assert_eq!(
            each_second,
            [true, true, true, false, true, false, true, false]
        );
        // 2.5/s with a fractional burst: the burst rounds down to whole messages.
        let q = quota(2.5, 2.9).unwrap();
        assert_eq!(q.burst_size().get(), 2);
        assert_eq!(q.replenish_interval(), Duration::from_millis(400));
    }

    #[test]
    fn impossible_quotas_are_refused() {
        for (rate, burst) in [(0.0, 1.0), (f64::NAN, 1.0), (1.0, 0.5), (-1.0, 3.0)] {
            assert!(quota(rate, burst).is_none(), "{rate} {burst}");
        }
        assert!(
            quota(1e12, 1.0).is_some(),
            "a huge rate is a tiny period, not zero"
        );
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let budgets = Buckets::new(quota(1000.0, 1.0).unwrap(), 10);
        let a: Arc<str> = "a".into();
        assert!(budgets.try_take(&a));
        assert!(!budgets.try_take(&a));
        assert_eq!(budgets.tracked(), 1);
        std::thread::sleep(Duration::from_millis(5));
        budgets.evict_idle();
        assert_eq!(budgets.tracked(), 0, "refilled, so forgotten");
    }

    #[test]
    fn a_full_map_puts_new_keys_in_one_overflow_bucket() {
        let budgets = Buckets::new(quota(1.0, 2.0).unwrap(), 3);
        for k in 0..3 {
            assert!(budgets.try_take(&k));
        }
        assert!(
            budgets.try_take(&3),
            "a fourth key shares the overflow bucket"
        );
        assert!(budgets.try_take(&4));
        assert!(!budgets.try_take(&5), "which two new keys have spent");
        assert!(budgets.try_take(&0), "known keys keep their own buckets");
        assert!(!budgets.try_take(&0));
        assert_eq!(budgets.tracked(), 3, "the map did not grow");
    }

    #[test]
    fn shared_budgets_are_per_client() {
        let clients = Buckets::new(quota(1.0, 2.0).unwrap(), 100);
        let (alice, bob) = (
            ClientKey::Subject("alice".into()),
            ClientKey::Subject("bob".into()),
        );
        let (r1, r2) = (ClientBudget::Shared, ClientBudget::Shared);
        assert!(r1.try_take(&clients, &alice));
        assert!(r2.try_take(&clients, &alice), "two requests, one bucket");
        assert!(!r1.try_take(&clients, &alice));
        assert!(r1.try_take(&clients, &bob));
        assert_eq!(r1.lane(), Lane::Requests);
        assert_eq!(
            ClientBudget::own(quota(1.0, 1.0).unwrap()).lane(),
            Lane::Sockets
        );
    }
}
