//! The relay's retry schedules, in one place, on the `backon` crate.
//!
//! Two kinds of waiting exist here. Redis (and the subscriptions on it) always comes back, so
//! loops that need it wait for ever with [`until_back`] and let shutdown end the wait. Calls to
//! the outside world (the LLM provider, the usage callback) get a bounded number of attempts.
//! Jitter spreads the retries of many rooms and workers that failed at the same moment.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// For a dependency that will come back: 100 ms doubling to 2 s, with jitter, for ever.
pub(crate) fn until_back() -> Delays {
    Delays::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times(),
    )
}

/// `times` retries after the first attempt, from `first` doubling up to `max`.
pub(crate) fn bounded(first: Duration, max: Duration, times: usize) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_max_times(times)
}

/// A schedule of waits for loops that retry by themselves (and reset after a success).
#[derive(Debug)]
pub(crate) struct Delays {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
}

impl Delays {
    fn new(builder: ExponentialBuilder) -> Self {
        Self {
            current: builder.build(),
            builder,
        }
    }

    /// The wait before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.current.next().unwrap_or(Duration::from_secs(2))
    }

    /// Starts over from the shortest wait (after a success).
    pub(crate) fn reset(&mut self) {
        self.current = self.builder.build();
    }

    /// Sleeps for the next wait; `false` if `token` was cancelled first.
    pub(crate) async fn wait(&mut self, token: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = token.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Runs `op` until it succeeds, waiting [`until_back`] between failures; `None` once `token`
/// is cancelled. Each failure is logged with `what`.
pub(crate) async fn until_ok<T, E, F, Fut>(
    token: &CancellationToken,
    what: &'static str,
    mut op: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = until_back();
    loop {
        let res = tokio::select! {
            _ = token.cancelled() => return None,
            r = op() => r,
        };
        match res {
            Ok(v) => return Some(v),
            Err(err) => tracing::warn!(cause = %err, "{what} failed; retrying"),
        }
        if !delays.wait(token).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_and_reset() {
        let mut d = until_back();
        let first = d.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        for _ in 0..20 {
            assert!(
                d.next_delay() <= Duration::from_secs(4),
                "capped (jitter at most doubles)"
            );
        }
        d.reset();
        assert!(d.next_delay() <= Duration::from_millis(200));
    }
}
