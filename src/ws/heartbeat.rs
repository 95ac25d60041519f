//! What a relay WebSocket's writer waits for besides frames: the next ping, a peer that stopped
//! answering, and the token's expiry. One implementation for the room socket and the dialect
//! sockets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::Close;

/// When the peer was last heard from: the reader marks it, the writer's [`Heartbeat`] reads it.
#[derive(Debug, Clone)]
pub(crate) struct Heard {
    started: Instant,
    /// In ms since `started`.
    at_ms: Arc<AtomicU64>,
}

impl Heard {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            at_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The peer sent something (any frame, a pong included).
    pub(crate) fn now(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let alive = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(alive - self.at_ms.load(Ordering::Relaxed).min(alive))
    }
}

/// Pings every interval; ends the socket when the peer was silent for three intervals or the
/// token expired.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    heard: Heard,
    every: Duration,
    ping: tokio::time::Interval,
    expires: Option<tokio::time::Instant>,
}

impl Heartbeat {
    pub(crate) fn new(
        heard: Heard,
        every: Duration,
        expires: Option<tokio::time::Instant>,
    ) -> Self {
        Self {
            heard,
            every,
            ping: tokio::time::interval_at(tokio::time::Instant::now() + every, every),
            expires,
        }
    }

    /// `Ok(())`: time to send a ping. `Err(close)`: the socket ends. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<(), Close> {
        let expiry = async {
            match self.expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = expiry => Err(Close::TokenExpired),
            _ = self.ping.tick() => {
                let silent = self.heard.silent_for();
                if silent > 3 * self.every {
                    tracing::info!(silent_ms = silent.as_millis() as u64, "peer stopped answering pings");
                    return Err(Close::NoPong);
                }
                Ok(())
            }
        }
    }
}
