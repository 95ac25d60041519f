//! The usage callback: each turn that spent tokens is reported once to a billing endpoint.
//!
//! The finish script queues the callback in Redis together with the turn's final entry, so it
//! survives any crash. Any worker delivers it: it takes due callbacks under a lease, POSTs them
//! with `Idempotency-Key: <turn_id>` (and an HMAC-SHA256 signature when a secret is set), and
//! on failure schedules the next attempt with exponential backoff, until
//! `--usage-callback-max-secs` after the turn; then the callback goes to the dead-letter stream.
//! A receiver may see a callback more than once (a worker dying after the POST, before it
//! records the delivery) and must deduplicate on the idempotency key.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

use super::worker::Ctx;
use crate::store::PendingCallback;

/// The signature header, `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub(super) const SIGNATURE_HEADER: &str = "X-Chat-Relay-Signature-256";
/// Callbacks in flight per worker.
const CONCURRENCY: usize = 8;
/// How often the outbox is checked for due callbacks when no turn ends.
const POLL: Duration = Duration::from_millis(500);
/// One POST may take this long.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry waits this long, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Delivers due callbacks until the worker stops.
pub(super) async fn deliver_loop(ctx: Arc<Ctx>, url: String) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    // Longer than a POST can take, so a slow endpoint is not sent the same callback twice.
    let lease = ctx
        .args
        .claim_idle()
        .max(POST_TIMEOUT + Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = ctx.usage_wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
        let rooms = match ctx.store.usage_rooms(1000).await {
            Ok(rooms) => rooms,
            Err(err) => {
                tracing::debug!(cause = %err, "cannot read the usage outbox index");
                continue;
            }
        };
        let mut pending = 0;
        for sid in rooms {
            let free = slots.available_permits() as u64;
            let (left, due) = match ctx
                .store
                .claim_usage(&sid, lease.as_millis() as u64, free)
                .await
            {
                Ok(r) => r,
                Err(err) => {
                    tracing::debug!(room = %sid, cause = %err, "cannot read the usage outbox");
                    continue;
                }
            };
            pending += left;
            if left == 0 {
                if let Err(err) = ctx.store.forget_usage_room(&sid).await {
                    tracing::debug!(room = %sid, cause = %err, "cannot unlist a room");
                }
            }
            for cb in due {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break; // leased but not sent: another worker takes it after the lease
                };
                let (ctx, url) = (ctx.clone(), url.clone());
                ctx.tracker.clone().spawn(async move {
                    deliver(&ctx, &url, cb).await;
                    drop(permit);
                });
            }
        }
        metrics::gauge!(crate::metrics::USAGE_PENDING).set(pending as f64);
    }
}

/// One attempt at one callback, and what follows from it.
async fn deliver(ctx: &Ctx, url: &str, cb: PendingCallback) {
    let result = post(ctx, url, &cb).await;
    let store = &ctx.store;
    let settled = match result {
        Ok(()) => {
            metrics::counter!(crate::metrics::USAGE_CALLBACKS, "outcome" => "delivered")
                .increment(1);
            tracing::info!(room = %cb.sid, turn = %cb.turn, attempts = cb.attempts, "usage callback delivered");
            store.usage_delivered(&cb).await
        }
        Err(err) => {
            let now = crate::protocol::now_ms();
            let deadline = cb.created_ms + ctx.args.usage_callback_max_secs * 1000;
            let wait = backoff(cb.attempts);
            if now + wait.as_millis() as u64 > deadline {
                metrics::counter!(crate::metrics::USAGE_CALLBACKS, "outcome" => "dead")
                    .increment(1);
                tracing::error!(room = %cb.sid, turn = %cb.turn, attempts = cb.attempts, cause = %err, "usage callback given up; moved to the dead-letter stream");
                store.usage_dead_letter(&cb, &err.to_string()).await
            } else {
                metrics::counter!(crate::metrics::USAGE_CALLBACKS, "outcome" => "retry")
                    .increment(1);
                tracing::warn!(room = %cb.sid, turn = %cb.turn, attempts = cb.attempts, retry_in_ms = wait.as_millis() as u64, cause = %err, "usage callback failed");
                store
                    .usage_retry_at(&cb, now + wait.as_millis() as u64)
                    .await
            }
        }
    };
    if let Err(err) = settled {
        // The lease runs out and the callback is tried again: at least once, never lost.
        tracing::warn!(room = %cb.sid, turn = %cb.turn, cause = %err, "cannot record the callback's outcome");
    }
}

/// Why one POST failed.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("refused with HTTP {0}")]
    Status(u16),
    #[error("request failed: {0}")]
    Request(String),
}

async fn post(ctx: &Ctx, url: &str, cb: &PendingCallback) -> Result<(), Failed> {
    let mut req = ctx
        .http
        .post(url)
        .timeout(POST_TIMEOUT)
        .header("content-type", "application/json")
        .header("idempotency-key", cb.turn.as_str())
        .body(cb.body.clone());
    if let Some(secret) = &ctx.args.usage_callback_secret {
        req = req.header(SIGNATURE_HEADER, signature(secret, cb.body.as_bytes()));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Failed::Request(e.without_url().to_string()))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(Failed::Status(resp.status().as_u16()))
    }
}

/// `sha256=<hex>` of HMAC-SHA256 over the body.
pub(super) fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length: the `else` cannot run.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The wait after `attempts` failed attempts.
fn backoff(attempts: u64) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20) as u32;
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
