//! One turn's reply on an evaluation socket: the room's turn as `delta`s (and a `restart` when
//! a new attempt changed the text), then `done`, or an `error` with the catalogue's code.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{error_frame, Asked, Followed};
use crate::dialect::socket::Outbox;
use crate::protocol::{ClientError, ErrorCode, StreamId};
use crate::room::{usage_counts, CursorEnd, TurnStep};
use crate::state::Shared;

/// One turn's reply as deltas, then `done` or `error`.
pub(super) async fn stream_reply(shared: Arc<Shared>, asked: Asked, out: Outbox) -> Followed {
    let Asked {
        sid, turn, echo, ..
    } = asked;
    let ended = stream_steps(&shared, &sid, turn, &echo, &out).await;
    Followed { sid, turn, ended }
}

/// `true` once the turn's end was sent (`done`, or the error it ended with).
async fn stream_steps(
    shared: &Shared,
    sid: &str,
    turn: StreamId,
    echo: &Value,
    out: &Outbox,
) -> bool {
    let deadline = Instant::now() + shared.api.chat_timeout;
    let mut reader = match shared.follow_turn(sid, turn).await {
        Ok(reader) => reader,
        Err(end) => {
            out.send(error_frame(echo, &ended(sid, end))).await;
            return false;
        }
    };
    loop {
        let step = match tokio::time::timeout_at(deadline, reader.next()).await {
            Err(_) => {
                let error = ClientError::new(
                    ErrorCode::LlmTimeout,
                    format!(
                        "the AI did not answer within {} s; its reply will still be stored in the session",
                        shared.api.chat_timeout.as_secs()
                    ),
                );
                out.send(error_frame(echo, &error)).await;
                return false;
            }
            Ok(Err(end)) => {
                out.send(error_frame(echo, &ended(sid, end))).await;
                return false;
            }
            Ok(Ok(None)) => return true,
            Ok(Ok(Some(step))) => step,
        };
        let (frame, last) = match step {
            TurnStep::Text(content) => (
                json!({"type": "delta", "content": content, "turn_id": echo}),
                false,
            ),
            TurnStep::Restart { attempt } => (
                json!({"type": "restart", "turn_id": echo, "attempt": attempt}),
                false,
            ),
            TurnStep::Done(reply) => (
                json!({
                    "type": "done",
                    "turn_id": echo,
                    "message_id": reply.id.to_string(),
                    "usage": usage_counts(&reply.usage),
                    "reason": reply.reason,
                }),
                true,
            ),
            TurnStep::Failed(failure) => {
                let mut frame = json!({
                    "type": "error",
                    "turn_id": echo,
                    "code": failure.error_code().as_str(),
                    "message": failure.message,
                    "message_id": failure.id.to_string(),
                });
                if let Some(usage) = &failure.usage {
                    frame["usage"] = usage_counts(usage);
                }
                (frame, true)
            }
        };
        if !out.send(frame.to_string()).await {
            return false;
        }
        if last {
            return true;
        }
    }
}

/// A reply the room could not bring to its end.
fn ended(sid: &str, end: CursorEnd) -> ClientError {
    match end {
        CursorEnd::Deleted => ClientError::session_deleted(),
        CursorEnd::Slow => ClientError::slow_consumer(),
        CursorEnd::Store(err) => {
            tracing::warn!(room = %sid, cause = %err, "eval: cannot read the room");
            ClientError::store_unavailable()
        }
    }
}
