//! Message budgets: token buckets from `governor` (GCRA), per client and per room.
//!
//! Room budgets are keyed by room id, not by local membership, so an HTTP publish to a room with
//! no member on this node is limited like a WebSocket frame. Both are per node, as before.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

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

/// Stored messages per room. Cheap to clone (one map shared by all clones).
#[derive(Clone)]
pub(crate) struct RoomBudgets {
    limiter: Arc<DefaultKeyedRateLimiter<Arc<str>>>,
}

impl RoomBudgets {
    pub(crate) fn new(quota: Quota) -> Self {
        Self {
            limiter: Arc::new(RateLimiter::keyed(quota)),
        }
    }

    /// Takes one message from the room's budget; `false` when the room is over it.
    pub(crate) fn try_take(&self, room: &Arc<str>) -> bool {
        self.limiter.check_key(room).is_ok()
    }

    /// Forgets rooms whose bucket has refilled: such a bucket is indistinguishable from a new
    /// one, so this changes no decision, and the map holds only rooms that wrote within the
    /// last `burst / rate` seconds however many rooms exist.
    pub(crate) fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Rooms with a bucket that has not refilled yet.
    pub(crate) fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

impl fmt::Debug for RoomBudgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomBudgets")
            .field("tracked", &self.tracked())
            .finish()
    }
}

/// Frames per client. A WebSocket connection owns its bucket; an HTTP request has none yet
/// (issue 11 adds a bucket keyed by token subject or client address: one more variant here,
/// checked in [`ClientBudget::try_take`], and every adapter gets it).
pub(crate) enum ClientBudget {
    Unlimited,
    Own(DefaultDirectRateLimiter),
}

impl ClientBudget {
    pub(crate) fn own(quota: Quota) -> Self {
        ClientBudget::Own(RateLimiter::direct(quota))
    }

    pub(crate) fn try_take(&self) -> bool {
        match self {
            ClientBudget::Unlimited => true,
            ClientBudget::Own(bucket) => bucket.check().is_ok(),
        }
    }
}

impl fmt::Debug for ClientBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientBudget::Unlimited => "Unlimited",
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
    fn idle_rooms_are_forgotten() {
        let budgets = RoomBudgets::new(quota(1000.0, 1.0).unwrap());
        let a: Arc<str> = "a".into();
        assert!(budgets.try_take(&a));
        assert!(!budgets.try_take(&a));
        assert_eq!(budgets.tracked(), 1);
        std::thread::sleep(Duration::from_millis(5));
        budgets.evict_idle();
        assert_eq!(budgets.tracked(), 0, "refilled, so forgotten");
    }
}
