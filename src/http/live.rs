//! HTTP ways in and out of a room, for bots, curl and clients that cannot hold a WebSocket:
//! `POST /v1/sessions/{sid}/messages` (one envelope, same rules as the WebSocket) and
//! `GET /v1/sessions/{sid}/events` (Server-Sent Events: the room live, resumable with
//! `Last-Event-ID`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{checked_sid, ApiError};
use crate::auth::request_token;
use crate::dispatch::{dispatch, Action, ConnCtx};
use crate::protocol::{delivery_frame, parse_client_frame, ClientError, ErrorCode, StreamId};
use crate::relay::Shared;

#[derive(Debug, Deserialize)]
pub struct LiveQuery {
    token: Option<String>,
    role: Option<String>,
    last_id: Option<String>,
}

fn refused(status: StatusCode, error: ClientError) -> ApiError {
    crate::metrics::error(error.code.as_str());
    ApiError { status, error }
}

/// One envelope in, `201 {"id": "<stream id>"}` out; refusals are 4xx with `{code, message}`.
pub async fn publish(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<LiveQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let sid = checked_sid(Some(&sid))?.to_owned();
    let (token, _) = request_token(q.token.as_deref(), &headers);
    let grant = shared
        .auth
        .authorize(token.as_deref(), &sid)
        .map_err(|d| refused(d.status, d.error))?;
    let text = std::str::from_utf8(&body).map_err(|_| {
        refused(
            StatusCode::BAD_REQUEST,
            ClientError::new(ErrorCode::BadJson, "body is not UTF-8 JSON"),
        )
    })?;
    let inbound = parse_client_frame(text, &shared.session.limits).map_err(|r| {
        let status = match r.error.code {
            ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        refused(status, r.error)
    })?;
    let default_role = q.role.filter(|r| !r.is_empty());
    if let Some(role) = default_role.as_deref() {
        if grant.role.is_none() {
            shared
                .roles
                .check(role)
                .map_err(|e| refused(StatusCode::BAD_REQUEST, e))?;
        }
    }
    let mut ctx = ConnCtx::new(sid.clone(), default_role);
    ctx.bound_role = grant.role.clone();
    ctx.sender = grant.sub.clone();
    let action = dispatch(inbound, &ctx, &shared.roles).map_err(|e| {
        let status = match e.code {
            ErrorCode::RoleMismatch | ErrorCode::ReservedRole => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        refused(status, e)
    })?;
    let limits = &shared.limits;
    match action {
        Action::Store(envelope) => {
            if let Some(room) = shared.rooms.get(&sid) {
                if !room.try_send_budget(limits.room_msgs_per_sec, limits.room_msgs_burst) {
                    return Err(refused(
                        StatusCode::TOO_MANY_REQUESTS,
                        ClientError::room_rate_limited(),
                    ));
                }
            }
            let appended = envelope
                .apply(&shared.store, &sid, ctx.sender.as_deref())
                .await?;
            let status = if appended.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((
                status,
                Json(json!({"id": appended.id.to_string(), "duplicate": appended.duplicate})),
            )
                .into_response())
        }
        Action::Publish { frame } => {
            shared.store.publish_transient(&sid, &frame).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
    }
}

/// Frames buffered for one SSE client; beyond this it is too slow and the stream ends.
const SSE_QUEUE: usize = 256;
const REPLAY_PAGE: u64 = 500;

/// The room as Server-Sent Events: `event:` = `hd.event`, `id:` = stream id (stored entries
/// only), `data:` = the frame. Resumes after `Last-Event-ID` (or `?last_id=`); otherwise starts
/// with what is stored from now on.
pub async fn events(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<LiveQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let sid = checked_sid(Some(&sid))?.to_owned();
    let (token, _) = request_token(q.token.as_deref(), &headers);
    shared
        .auth
        .authorize(token.as_deref(), &sid)
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

    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (room_tx, mut room_rx) = mpsc::channel(shared.session.outbound_queue);
    let room = shared.rooms.join(&sid, conn, room_tx).await?;
    // Where delivery starts: after the client's id, or after what is stored right now.
    let mut cursor = match resume {
        Some(id) => id,
        None => shared
            .store
            .range_before(&sid, None, 1)
            .await?
            .last()
            .map_or(StreamId::ZERO, |e| e.id),
    };
    let (tx, mut rx) = mpsc::channel::<Event>(SSE_QUEUE);
    let task_shared = shared.clone();
    shared.tracker.spawn(async move {
        let shared = task_shared;
        let token = shared.token.clone();
        'replay: while resume.is_some() {
            let page = match shared
                .store
                .range_after(&sid, Some(cursor), None, REPLAY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(err) => {
                    tracing::warn!(room = %sid, cause = %err, "SSE replay failed");
                    break 'replay;
                }
            };
            for e in &page {
                let frame = delivery_frame(e.id, &e.participant, &e.event, &e.body);
                if tx.send(sse_event(&frame, Some(e.id))).await.is_err() {
                    shared.rooms.leave(&room, conn);
                    return;
                }
                cursor = e.id;
            }
            if (page.len() as u64) < REPLAY_PAGE {
                break;
            }
        }
        loop {
            let out = tokio::select! {
                _ = token.cancelled() => break,
                _ = tx.closed() => break,
                out = room_rx.recv() => out,
            };
            let Some(out) = out else {
                tracing::info!(room = %sid, "SSE client too slow; ending its stream");
                break;
            };
            if let Some(id) = out.id {
                if id <= cursor {
                    continue;
                }
                cursor = id;
            }
            if tx
                .send(sse_event(out.frame.as_str(), out.id))
                .await
                .is_err()
            {
                break;
            }
        }
        shared.rooms.leave(&room, conn);
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|ev| ev.map(Ok)));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
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
