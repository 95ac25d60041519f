//! The writer: the only task that touches the socket's sink. It sends what the room's
//! [`Cursor`] yields (gap notice, replay, live), the reader's acks and errors, and pings, and
//! decides how the session ends.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures_channel::mpsc;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};

use super::Ctrl;
use crate::protocol::Close;
use crate::room::{Cursor, CursorEnd};
use crate::state::Shared;
use crate::ws::heartbeat::Heartbeat;

/// Frames written to a socket per flush, at most.
const WRITE_BATCH: usize = 64;

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    /// Pings, a silent peer, the token's expiry.
    pub(super) heartbeat: Heartbeat,
}

impl Writer {
    /// Writes until something ends the session; returns the close to send.
    pub(super) async fn run(
        mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        mut cursor: Cursor,
        mut ctrl_rx: mpsc::Receiver<Ctrl>,
    ) -> Close {
        let write_timeout = self.shared.session.write_timeout;
        loop {
            let msg = tokio::select! {
                biased;
                beat = self.heartbeat.next() => match beat {
                    Ok(()) => Message::Ping(Default::default()),
                    Err(close) => return close,
                },
                ctrl = ctrl_rx.next() => match ctrl {
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
            };
            // Write what else is ready for this socket in the same flush, from both queues:
            // one syscall for a burst (a batch's deliveries, its acks, a history page)
            // instead of one per frame. A close or the reader's end found on the way is acted
            // on once what came before it is written.
            let mut then = None;
            let batch = async {
                sink.feed(msg).await?;
                for _ in 1..WRITE_BATCH {
                    if let Some(out) = cursor.try_next() {
                        sink.feed(Message::Text(out.frame)).await?;
                        continue;
                    }
                    match ctrl_rx.try_recv() {
                        Ok(Ctrl::Frame(frame)) => sink.feed(Message::Text(frame.into())).await?,
                        Ok(Ctrl::Close(close)) => {
                            then = Some(close);
                            break;
                        }
                        Err(mpsc::TryRecvError::Closed) => {
                            then = Some(self.reader_done());
                            break;
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                    }
                }
                sink.flush().await
            };
            if !matches!(tokio::time::timeout(write_timeout, batch).await, Ok(Ok(()))) {
                return Close::NoPong;
            }
            if let Some(close) = then {
                return close;
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
