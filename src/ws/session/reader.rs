//! The reader: WebSocket frames in, [`Ingress`](crate::ingress::Ingress) submits out. Keeps up
//! to `--send-window` submits in flight (pipelined on the shared Redis client) and hands their
//! acks and errors to the writer in the order the frames came.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures_channel::mpsc;
use futures_util::stream::{FuturesOrdered, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_util::sync::CancellationToken;

use super::Ctrl;
use crate::ingress::{Conn, Refused, Submission, Submitted};
use crate::protocol::{ack_frame, error_frame, ClientError, Close, ErrorCode};
use crate::state::Shared;
use crate::ws::heartbeat::Heard;

pub(super) struct Reader {
    pub(super) shared: Arc<Shared>,
    pub(super) conn: Conn,
    pub(super) ctrl: mpsc::Sender<Ctrl>,
    /// When the peer was last heard from (read by the writer's heartbeat).
    pub(super) heard: Heard,
}

impl Reader {
    /// Reads until the client leaves or the session stops; returns the stream, so the session can
    /// wait for the client's close frame after sending its own, and the connection's sending
    /// context, for its `session.leave`.
    pub(super) async fn run(
        mut self,
        mut stream: SplitStream<WebSocket>,
        stop: CancellationToken,
    ) -> (SplitStream<WebSocket>, Conn) {
        let window = self.shared.session.send_window;
        let mut inflight: FuturesOrdered<Submission> = FuturesOrdered::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shared.token.cancelled() => break,
                Some(result) = inflight.next(), if !inflight.is_empty() => {
                    if let Some(frame) = reply(result) {
                        if self.ctrl.send(Ctrl::Frame(frame)).await.is_err() {
                            break;
                        }
                    }
                }
                msg = stream.next(), if inflight.len() < window => {
                    let ctrl = match msg {
                        Some(Ok(Message::Text(text))) => {
                            self.heard.now();
                            crate::metrics::HOT.frames_in.increment(1);
                            match self.shared.ingress.submit_text(&mut self.conn, text.as_str()) {
                                Ok(submission) => {
                                    inflight.push_back(submission);
                                    continue;
                                }
                                Err(refused) if refused.abusive => {
                                    tracing::warn!("closing a client that ignores rate limits");
                                    let _ = self.ctrl.send(Ctrl::Close(Close::RateLimitsIgnored)).await;
                                    break;
                                }
                                Err(refused) => {
                                    Ctrl::Frame(error_frame(&refused.error, refused.cid.as_deref()))
                                }
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let err = ClientError::new(
                                ErrorCode::BinaryUnsupported,
                                "binary frames are not supported; send JSON text frames",
                            );
                            Ctrl::Frame(error_frame(&err, None))
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            self.heard.now();
                            // Control frames cost a read and (a ping) a pong: they are paid
                            // from the same budget, without an error frame per refusal.
                            match self.shared.ingress.admit(&mut self.conn) {
                                Err(refused) if refused.abusive => {
                                    tracing::warn!("closing a client that floods control frames");
                                    let _ = self.ctrl.send(Ctrl::Close(Close::RateLimitsIgnored)).await;
                                    break;
                                }
                                _ => continue,
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Err(err)) => {
                            tracing::debug!(cause = %err, "read error");
                            if let Some(close) = violation(err) {
                                if close == Close::FrameTooBig {
                                    let e = ClientError::new(
                                        ErrorCode::FrameTooLarge,
                                        format!("frame too large (max {} bytes)", self.shared.session.limits.max_frame_bytes),
                                    );
                                    let _ = self.ctrl.send(Ctrl::Frame(error_frame(&e, None))).await;
                                }
                                let _ = self.ctrl.send(Ctrl::Close(close)).await;
                            }
                            break;
                        }
                    };
                    if self.ctrl.send(ctrl).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Finish what was accepted: every submit in flight still gets its ack or error.
        while let Some(result) = inflight.next().await {
            if let Some(frame) = reply(result) {
                let _ = self.ctrl.send(Ctrl::Frame(frame)).await;
            }
        }
        (stream, self.conn)
    }
}

/// The frame answering a submit: an ack for a stored envelope, an error for a refusal, nothing
/// for a transient frame.
fn reply(result: Result<Submitted, Refused>) -> Option<String> {
    match result {
        Ok(Submitted::Stored { id, cid, .. }) => Some(ack_frame(cid.as_deref(), id)),
        Ok(Submitted::Transient { .. }) => None,
        Err(refused) => Some(error_frame(&refused.error, refused.cid.as_deref())),
    }
}

/// The close for a read error the client caused; `None` when the connection just failed (reset,
/// I/O error), where there is no one left to tell.
fn violation(err: axum::Error) -> Option<Close> {
    let err = err.into_inner().downcast::<WsError>().ok()?;
    match *err {
        WsError::Capacity(_) => Some(Close::FrameTooBig),
        WsError::Utf8(_) => Some(Close::InvalidUtf8),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some(Close::ProtocolViolation),
        _ => None,
    }
}
