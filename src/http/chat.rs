//! The chatbot front ends' REST + SSE chat API, as an adapter over the room:
//!
//! - `POST /api/chat` `{"session_id", "message"}` → `200 {"message_id", "role": "assistant",
//!   "content", "created_at", "usage": {...}}` once the reply is stored;
//! - `POST /api/chat/stream` (same body) → `text/event-stream`: `start` (`{"message_id",
//!   "turn_id"}`), `delta` (`{"content"}`) per piece of text, then `done` (`{"message_id",
//!   "content", "usage", "reason"}`) or `error` (`{"code", "message"}`).
//!
//! Nothing here stores or validates by itself. The message goes in through the one way in
//! ([`Ingress`](crate::ingress::Ingress)) as an `llm.request` of the requester's role (`user`,
//! or the token's), so WebSocket members see it live like any other; the LLM participant answers
//! it as any turn; the reply comes back out through the one way out (a [`Cursor`] joined
//! before the request is stored, so nothing is missed), read by a [`TurnFollow`]. The turn
//! belongs to the room, not to this request: a client that goes away changes nothing — the
//! request is stored (its append runs as a task of its own) and answered, and the reply stored.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::history::authorize;
use super::sessions::{json_object, rfc3339};
use super::{checked_sid, ApiError};
use crate::ingress::Submitted;
use crate::protocol::{ClientError, ErrorCode, StreamId};
use crate::room::{usage_counts, CursorEnd, Failure, Reply, TurnReader, TurnStep};
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub(super) struct ChatQuery {
    token: Option<String>,
}

/// A request stored, and the reader of its turn.
struct Asked {
    sid: String,
    /// The request's entry id, which is also the turn's id.
    turn: StreamId,
    reader: TurnReader,
    deadline: Instant,
}

/// `POST /api/chat`: the whole reply, once stored.
pub(super) async fn chat(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<ChatQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mut asked = ask(&shared, peer, q.token.as_deref(), &headers, &body).await?;
    loop {
        let step = match tokio::time::timeout_at(asked.deadline, asked.reader.next()).await {
            Err(_) => return Err(timed_out(&shared).into_api()),
            Ok(Err(end)) => return Err(cursor_ended(&asked.sid, end).into_api()),
            Ok(Ok(None)) => return Err(internal("the reply ended without an end")),
            Ok(Ok(Some(step))) => step,
        };
        match step {
            TurnStep::Done(reply) => {
                let mut body = done_json(&reply, asked.turn);
                body["role"] = json!("assistant");
                body["created_at"] = json!(rfc3339(reply.id.ms));
                body["session_id"] = json!(asked.sid);
                return Ok(Json(body));
            }
            TurnStep::Failed(failure) => return Err(Ended::from(&failure).into_api()),
            TurnStep::Text(_) | TurnStep::Restart { .. } => {}
        }
    }
}

/// `POST /api/chat/stream`: the reply as Server-Sent Events. Refusals before the request is
/// stored (bad body, unknown session, token, budgets) are plain JSON errors with their status;
/// once the stream started, the end is `done` or `error`.
pub(super) async fn chat_stream(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<ChatQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let asked = ask(&shared, peer, q.token.as_deref(), &headers, &body).await?;
    let ids = json!({
        "message_id": asked.turn.to_string(),
        "turn_id": asked.turn.to_string(),
        "session_id": asked.sid,
    });
    let timeout = timed_out(&shared);
    let state = Streaming {
        asked,
        start: Some(event("start", &ids)),
        ended: false,
        timeout,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let ev = st.next().await?;
        Some((ev, st))
    })
    .map(Ok)
    .take_until(shared.token.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One SSE response in progress.
struct Streaming {
    asked: Asked,
    /// The `start` event, until it is sent.
    start: Option<Event>,
    /// `done` or `error` was sent: nothing follows it.
    ended: bool,
    timeout: Ended,
}

impl Streaming {
    async fn next(&mut self) -> Option<Event> {
        if let Some(start) = self.start.take() {
            return Some(start);
        }
        if self.ended {
            return None;
        }
        let step = tokio::time::timeout_at(self.asked.deadline, self.asked.reader.next()).await;
        let step = match step {
            Err(_) => return Some(self.end(&self.timeout.clone())),
            Ok(Err(end)) => return Some(self.end(&cursor_ended(&self.asked.sid, end))),
            Ok(Ok(None)) => return None,
            Ok(Ok(Some(step))) => step,
        };
        Some(match step {
            TurnStep::Text(content) => event("delta", &json!({"content": content})),
            TurnStep::Restart { attempt } => event(
                "start",
                &json!({
                    "message_id": self.asked.turn.to_string(),
                    "turn_id": self.asked.turn.to_string(),
                    "session_id": self.asked.sid,
                    "restart": true,
                    "attempt": attempt,
                }),
            ),
            TurnStep::Done(reply) => {
                self.ended = true;
                event("done", &done_json(&reply, self.asked.turn))
            }
            TurnStep::Failed(failure) => {
                self.ended = true;
                error_event(&Ended::from(&failure), Some(&failure))
            }
        })
    }

    fn end(&mut self, why: &Ended) -> Event {
        self.ended = true;
        error_event(why, None)
    }
}

/// Validates the body, checks the token and the session, stores the message through the
/// ingress, then follows its turn. Every refusal is an [`ApiError`] before anything is stored.
async fn ask(
    shared: &Shared,
    peer: SocketAddr,
    token: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Asked, ApiError> {
    let body = json_object(body, false)?;
    let sid = match body.get("session_id") {
        Some(Value::String(s)) => checked_sid(Some(s))?.to_owned(),
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidSid,
                "session_id is missing: create a session with POST /api/sessions first",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidSid,
                "session_id must be a string",
            ))
        }
    };
    let message = match body.get("message") {
        Some(Value::String(m)) => m,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                ErrorCode::EmptyText,
                "message is missing",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBody,
                "message must be a string",
            ))
        }
    };
    let grant = authorize(shared, headers, token, &sid)?;
    if !shared.store.session_exists(&sid).await? {
        return Err(ApiError::no_session(&sid));
    }
    let mut conn = shared
        .ingress
        .conn(&sid, &grant, None)
        .map_err(ApiError::for_conn)?
        .with_addr(peer.ip())
        .require_room();
    let frame = json!({"hd": {"event": "llm.request"}, "bd": {"text": message}}).to_string();
    let submission = shared
        .ingress
        .submit_text(&mut conn, &frame)
        .map_err(|r| ApiError::for_submit(r.error))?;
    let stored = shared
        .submit_detached(submission)
        .await
        .map_err(|r| ApiError::for_submit(r.error))?;
    let Submitted::Stored { id, .. } = stored else {
        return Err(internal("the message was not stored"));
    };
    tracing::info!(room = %sid, turn = %id, "chat request stored");
    let deadline = Instant::now() + shared.api.chat_timeout;
    let reader = shared
        .follow_turn(&sid, id)
        .await
        .map_err(|end| cursor_ended(&sid, end).into_api())?;
    Ok(Asked {
        sid,
        turn: id,
        reader,
        deadline,
    })
}

fn internal(message: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        message,
    )
}

/// How a turn ended without a reply, for the client: status, code, message.
#[derive(Debug, Clone)]
struct Ended {
    status: StatusCode,
    error: ClientError,
}

impl Ended {
    fn into_api(self) -> ApiError {
        crate::metrics::error(self.error.code.as_str());
        ApiError {
            status: self.status,
            error: self.error,
        }
    }
}

impl From<&Failure> for Ended {
    /// A stored `llm.error`: its code in the catalogue, with its human message.
    fn from(f: &Failure) -> Self {
        let code = f.error_code();
        let status = match code {
            ErrorCode::LlmTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::LlmRejected | ErrorCode::LlmBadResponse => StatusCode::BAD_GATEWAY,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Ended {
            status,
            error: ClientError::new(code, f.message.clone()),
        }
    }
}

fn timed_out(shared: &Shared) -> Ended {
    Ended {
        status: StatusCode::GATEWAY_TIMEOUT,
        error: ClientError::new(
            ErrorCode::LlmTimeout,
            format!(
                "the AI did not answer within {} s; its reply will still be stored in the session",
                shared.api.chat_timeout.as_secs()
            ),
        ),
    }
}

fn cursor_ended(sid: &str, end: CursorEnd) -> Ended {
    match end {
        CursorEnd::Deleted => Ended {
            status: StatusCode::NOT_FOUND,
            error: ClientError::session_deleted(),
        },
        CursorEnd::Slow => Ended {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: ClientError::slow_consumer(),
        },
        CursorEnd::Store(err) => {
            tracing::warn!(room = %sid, cause = %err, "chat: cannot read the room");
            Ended {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: ClientError::store_unavailable(),
            }
        }
    }
}

/// `{"message_id", "content", "usage", "reason", "turn_id"}`.
fn done_json(reply: &Reply, turn: StreamId) -> Value {
    json!({
        "message_id": reply.id.to_string(),
        "content": reply.text,
        "usage": usage_counts(&reply.usage),
        "reason": reply.reason,
        "turn_id": turn.to_string(),
    })
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// `event: error`, `{"code", "message"}` (with the stored error's id and usage when the turn
/// stored one).
fn error_event(why: &Ended, failure: Option<&Failure>) -> Event {
    crate::metrics::error(why.error.code.as_str());
    let mut data = json!({"code": why.error.code.as_str(), "message": why.error.message});
    if let Some(f) = failure {
        data["message_id"] = json!(f.id.to_string());
        if let Some(usage) = &f.usage {
            data["usage"] = usage_counts(usage);
        }
    }
    event("error", &data)
}
