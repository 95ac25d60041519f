//! HTTP ways in and out of a room, for bots, curl and clients that cannot hold a WebSocket:
//! `POST /v1/sessions/{sid}/messages` (one envelope through the same [`Ingress`] as a
//! WebSocket frame) and `GET /v1/sessions/{sid}/events` (Server-Sent Events through the same
//! [`Cursor`] as the WebSocket writer: resumable with `Last-Event-ID`, `resume_gap` when the
//! history cannot be complete, a final `error` event when the client falls behind).
//!
//! [`Ingress`]: crate::ingress::Ingress

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{checked_sid, ApiError};
use crate::auth::request_token;
use crate::ingress::Submitted;
use crate::limits::{MemberKind, MemberSlot};
use crate::net::ClientAddr;
use crate::protocol::{error_frame, ClientError, ErrorCode, StreamId};
use crate::room::{Cursor, CursorEnd, Outbound};
use crate::state::Shared;

#[derive(Debug, Deserialize)]
pub(super) struct LiveQuery {
    token: Option<String>,
    role: Option<String>,
    last_id: Option<String>,
}

fn refused(status: StatusCode, error: ClientError) -> ApiError {
    refused_with(ApiError { status, error })
}

/// Refusals made here, before [`Ingress`](crate::ingress::Ingress) (which counts its own).
fn refused_with(err: ApiError) -> ApiError {
    crate::metrics::error(err.error.code.as_str());
    err
}

/// One envelope in, `201 {"id": "<stream id>"}` out; refusals are 4xx with `{code, message}`.
pub(super) async fn publish(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<ClientAddr>,
    Path(sid): Path<String>,
    Query(q): Query<LiveQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    let (token, _) = request_token(q.token.as_deref(), &headers);
    let grant = shared
        .auth
        .authorize(token.as_deref(), sid)
        .map_err(|d| refused(d.status, d.error))?;
    let mut conn = shared
        .ingress
        .conn(sid, &grant, q.role)
        .map_err(|e| refused_with(ApiError::for_conn(e)))?
        .with_addr(client.0);
    if shared.api.require_session {
        conn = conn.require_room();
    }
    let text = std::str::from_utf8(&body).map_err(|_| {
        refused(
            StatusCode::BAD_REQUEST,
            ClientError::new(ErrorCode::BadJson, "body is not UTF-8 JSON"),
        )
    })?;
    let submitted = shared
        .ingress
        .submit_text(&mut conn, text)
        .map_err(|r| ApiError::for_submit(r.error))?
        .await
        .map_err(|r| ApiError::for_submit(r.error))?;
    Ok(match submitted {
        Submitted::Stored { id, duplicate, .. } => {
            let status = if duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body = json!({"id": id.to_string(), "duplicate": duplicate});
            (status, Json(body)).into_response()
        }
        Submitted::Transient { published: true } => StatusCode::ACCEPTED.into_response(),
        Submitted::Transient { published: false } => {
            ApiError::for_submit(ClientError::store_unavailable()).into_response()
        }
    })
}

/// The room as Server-Sent Events: `event:` = `hd.event`, `id:` = stream id (stored entries
/// only), `data:` = the frame. Resumes after `Last-Event-ID` (or `?last_id=`), with a
/// `resume_gap` event first when entries after it are gone; otherwise starts with what is stored
/// from now on. A client that falls too far behind gets a last `error` event (`slow_consumer`)
/// and the stream ends; it reconnects with `Last-Event-ID`.
///
/// The stream is polled by the response body itself, with no task in between: a client that
/// stops reading stops the cursor, its member queue fills, and the room drops it.
pub(super) async fn events(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<ClientAddr>,
    Path(sid): Path<String>,
    Query(q): Query<LiveQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    if !shared.ingress.admit_handshake(client.limit_key()) {
        return Err(ApiError::too_many_handshakes());
    }
    let sid = checked_sid(Some(&sid))?;
    let (token, _) = request_token(q.token.as_deref(), &headers);
    let grant = shared
        .auth
        .authorize(token.as_deref(), sid)
        .map_err(|d| refused(d.status, d.error))?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.last_id)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<StreamId>())
        .transpose()
        .map_err(|_| {
            ApiError::bad_request(
                ErrorCode::InvalidLastId,
                "Last-Event-ID must be a stream id",
            )
        })?;
    // Counted apart from WebSockets: streams never fill a room or an address for them.
    let slot = shared
        .members
        .acquire(MemberKind::EventStream, Some(sid), client.limit_key())
        .map_err(ApiError::full)?;

    let cursor = Cursor::join(
        &shared.rooms,
        &shared.store,
        sid,
        shared.next_conn_id(),
        shared.session.outbound_queue,
    )
    .await?;
    let cursor = match resume {
        Some(last) => cursor.resume_after(last),
        // After what is stored right now (read after joining, so nothing falls in between).
        None => {
            let end = shared.store.range_before(sid, None, 1).await?;
            cursor.replay_after(end.last().map_or(StreamId::ZERO, |e| e.id))
        }
    };
    let tail = Tail {
        cursor,
        // Like a WebSocket: the stream ends when its token expires.
        expires: grant.deadline(),
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(Some(tail), |tail| async move {
        let mut tail = tail?;
        match tail.next().await {
            Ok(out) => Some((sse_event(out.frame.as_str(), out.id), Some(tail))),
            Err(end) => Some((final_event(tail.cursor.sid(), end), None)),
        }
    })
    .map(Ok)
    .take_until(shared.token.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One event stream's state: its cursor, its token's expiry, its member slot.
struct Tail {
    cursor: Cursor,
    expires: Option<tokio::time::Instant>,
    _slot: MemberSlot,
}

/// Why an event stream ends.
enum End {
    Cursor(CursorEnd),
    TokenExpired,
}

impl Tail {
    async fn next(&mut self) -> Result<Outbound, End> {
        let Some(at) = self.expires else {
            return self.cursor.next().await.map_err(End::Cursor);
        };
        // `Cursor::next` is cancel-safe: losing this race to the deadline drops nothing.
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(at) => Err(End::TokenExpired),
            out = self.cursor.next() => out.map_err(End::Cursor),
        }
    }
}

/// The `error` event that ends a stream: `slow_consumer`, `token_expired`, or
/// `store_unavailable` when the history could not be read.
fn final_event(sid: &str, end: End) -> Event {
    let err = match end {
        End::Cursor(CursorEnd::Slow) => {
            tracing::info!(room = %sid, "SSE client too slow; ending its stream");
            ClientError::slow_consumer()
        }
        End::Cursor(CursorEnd::Store(err)) => {
            tracing::warn!(room = %sid, cause = %err, "SSE replay failed");
            ClientError::store_unavailable()
        }
        End::Cursor(CursorEnd::Deleted) => ClientError::session_deleted(),
        End::TokenExpired => {
            tracing::info!(room = %sid, "SSE token expired; ending its stream");
            ClientError::token_expired()
        }
    };
    crate::metrics::error(err.code.as_str());
    Event::default()
        .event("error")
        .data(error_frame(&err, None))
}

fn sse_event(frame: &str, id: Option<StreamId>) -> Event {
    let name = serde_json::from_str::<Value>(frame)
        .ok()
        .and_then(|v| v["hd"]["event"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "message".to_owned());
    let ev = Event::default().event(name).data(frame);
    match id {
        Some(id) => ev.id(id.to_string()),
        None => ev,
    }
}
