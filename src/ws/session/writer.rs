//! The writer: the only task that touches the socket's sink. It sends what the room's
//! [`Cursor`] yields (gap notice, replay, live), the reader's acks and errors, and pings, and
//! decides how the session ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;

use super::Ctrl;
use crate::protocol::Close;
use crate::room::{Cursor, CursorEnd};
use crate::state::Shared;

/// Frames written to a socket per flush, at most.
const WRITE_BATCH: usize = 64;

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    /// When the reader last heard from the peer, in ms since `started`.
    pub(super) last_pong: Arc<AtomicU64>,
    pub(super) started: Instant,
    /// When the connection's token expires.
    pub(super) expires: Option<tokio::time::Instant>,
}

impl Writer {
    /// Writes until something ends the session; returns the close to send.
    pub(super) async fn run(
        self,
        sink: &mut SplitSink<WebSocket, Message>,
        mut cursor: Cursor,
        mut ctrl_rx: mpsc::Receiver<Ctrl>,
    ) -> Close {
        let write_timeout = self.shared.session.write_timeout;
        let ping_every = self.shared.session.ping_interval;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        // Far enough to never fire when the token does not expire.
        let expires = self.expires.unwrap_or_else(|| {
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
        });
        loop {
            let msg = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(expires) => return Close::TokenExpired,
                ctrl = ctrl_rx.recv() => match ctrl {
                    Some(Ctrl::Frame(frame)) => Message::Text(frame.into()),
                    Some(Ctrl::Close(close)) => return close,
                    None => return self.reader_done(),
                },
                out = cursor.next() => match out {
                    Ok(out) => Message::Text(out.frame),
                    Err(CursorEnd::Slow) => return Close::SlowConsumer,
                    Err(CursorEnd::Deleted) => return Close::SessionDeleted,
                    Err(CursorEnd::Store(err)) => {
                        tracing::warn!(cause = %err, "resume failed: cannot read the room's history");
                        return Close::StoreUnavailable;
                    }
                },
                _ = ping.tick() => {
                    let alive = self.started.elapsed().as_millis() as u64;
                    let silent_for = alive - self.last_pong.load(Ordering::Relaxed).min(alive);
                    if silent_for > 3 * ping_every.as_millis() as u64 {
                        tracing::info!(silent_ms = silent_for, "peer stopped answering pings");
                        return Close::NoPong;
                    }
                    Message::Ping(Default::default())
                }
            };
            // Write what else is ready for this socket in the same flush: one syscall for a
            // burst (or a history page) instead of one per frame.
            let batch = async {
                sink.feed(msg).await?;
                for _ in 1..WRITE_BATCH {
                    let Some(out) = cursor.try_next() else { break };
                    sink.feed(Message::Text(out.frame)).await?;
                }
                sink.flush().await
            };
            if !matches!(tokio::time::timeout(write_timeout, batch).await, Ok(Ok(()))) {
                return Close::NoPong;
            }
        }
    }

    /// The reader ended: the client closed, the socket failed, or the relay is stopping.
    fn reader_done(&self) -> Close {
        if self.shared.token.is_cancelled() {
            Close::Shutdown
        } else {
            Close::Normal
        }
    }
}
