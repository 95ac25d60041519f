//! `GET /v1/sessions/{sid}` (the room's summary and counters) and
//! `GET /v1/sessions/{sid}/messages` (pages of its stream).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{checked_sid, ApiError};
use crate::auth::{request_token, Grant};
use crate::protocol::{delivery_frame, ErrorCode, StreamId};
use crate::state::Shared;

const DEFAULT_PAGE: u64 = 100;
const MAX_PAGE: u64 = 1000;

/// A page size from `?limit=`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent. Every history
/// route pages the same way.
pub(super) fn page_limit(raw: Option<&str>) -> Result<u64, ApiError> {
    match raw {
        None | Some("") => Ok(DEFAULT_PAGE),
        Some(l) => match l.parse::<u64>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                ErrorCode::InvalidBody,
                format!("limit must be a number from 1 to {MAX_PAGE}"),
            )),
        },
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct TokenQuery {
    token: Option<String>,
}

/// The same rule as the WebSocket: with `--auth jwt`, a token valid for this room.
pub(super) fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    query_token: Option<&str>,
    sid: &str,
) -> Result<Grant, ApiError> {
    let (token, _) = request_token(query_token, headers);
    shared
        .auth
        .authorize(token.as_deref(), sid)
        .map_err(|d| ApiError {
            status: d.status,
            error: d.error,
        })
}

fn parse_id(name: &'static str, raw: Option<&str>) -> Result<Option<StreamId>, ApiError> {
    raw.filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                ApiError::bad_request(
                    ErrorCode::InvalidLastId,
                    format!("{name} must be a stream id such as 1700000000000-0"),
                )
            })
        })
        .transpose()
}

/// Oldest first. With `after`: the page after it; with only `before`: the newest page before
/// it (scrolling back); with neither: the newest `limit` entries. `next_after` continues forward.
/// `404` for a room that does not exist.
pub(super) async fn messages(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    let after = parse_id("after", q.after.as_deref())?;
    let before = parse_id("before", q.before.as_deref())?;
    let limit = page_limit(q.limit.as_deref())?;
    let entries = match after {
        Some(_) => {
            let until = before.map(StreamId::prev);
            shared.store.range_after(sid, after, until, limit).await?
        }
        None => shared.store.range_before(sid, before, limit).await?,
    };
    // An empty page of a room that does not exist is a 404, as for the room's info; a room
    // with entries exists, so only the empty case costs a lookup.
    if entries.is_empty() && !shared.store.session_exists(sid).await? {
        return Err(ApiError::no_session(sid));
    }
    let next_after = entries.last().map(|e| e.id.to_string());
    let messages: Vec<Value> = entries
        .iter()
        .map(|e| {
            let frame = delivery_frame(e.id, &e.participant, &e.event, &e.body);
            serde_json::from_str(&frame).unwrap_or(Value::Null)
        })
        .collect();
    Ok(Json(json!({
        "sid": sid,
        "count": messages.len(),
        "messages": messages,
        "next_after": next_after,
    })))
}

/// Whether the room exists, its length, first/last id, entries stored per participant and per
/// event (from the room's counters: O(1) in the stream's length), and the session's fields as
/// `GET /api/sessions/{id}` shows them (one model: [`crate::store::Session`]).
pub(super) async fn room_info(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    let session = super::sessions::existing(&shared.store, sid).await?;
    let info = session.stream.as_ref();
    let active_turns: Vec<Value> = shared
        .store
        .active_turns(sid)
        .await?
        .iter()
        .map(|t| {
            json!({
                "turn_id": t.turn.to_string(),
                "requester": t.requester,
                "started": t.started_ms,
                "attempt": t.attempt,
                "chars": t.text.chars().count(),
            })
        })
        .collect();
    let members_here = shared.rooms.get(sid).map_or(0, |r| r.member_count());
    let mut body = json!({
        "sid": sid,
        "exists": true,
        "key": shared.store.keys().room(sid),
        "length": info.map_or(0, |i| i.length),
        "first_id": info.and_then(|i| i.first_id).map(|i| i.to_string()),
        "last_id": info.and_then(|i| i.last_id).map(|i| i.to_string()),
        "participants": session.stats.participants,
        "events": session.stats.events,
        "active_turns": active_turns,
        "presence": shared.presence.snapshot(sid).await?,
        "connected_here": members_here,
    });
    if let (Value::Object(body), Value::Object(fields)) =
        (&mut body, super::sessions::session_json(&session))
    {
        body.extend(fields);
    }
    Ok(Json(body))
}

/// `GET /v1/sessions/{sid}/presence`: who is connected now, on any node — one member per role
/// and token subject, with its connections (tabs).
pub(super) async fn presence(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    let mut body = shared.presence.snapshot(sid).await?;
    body["sid"] = Value::String(sid.to_owned());
    Ok(Json(body))
}
