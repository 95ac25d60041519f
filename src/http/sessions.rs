//! Sessions as a resource, for chatbot front ends and scenario clients:
//!
//! | route | answer |
//! |---|---|
//! | `POST /api/sessions` `{"session_id"?, "metadata"?}` | `201` the session; `409 session_exists`; `400 invalid_sid` |
//! | `GET /api/sessions/{id}` | `200` the session; `404 not_found` |
//! | `PATCH /api/sessions/{id}` `{"metadata": {...}}` | `200` the session, metadata merged (RFC 7396); `404`; `400` naming the field |
//! | `DELETE /api/sessions/{id}` | `204`; `404` (also the second time) |
//! | `GET /api/sessions/{id}/messages?limit=&after=` | `200 {"session_id", "messages": [...]}` the conversation, oldest first; `404` |
//!
//! A session is a room (see [`crate::store::Session`]): everything here reads and writes the
//! same stream the WebSocket and `/v1/sessions/{sid}` use, and `GET /v1/sessions/{sid}` shows
//! the same session fields.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::history::authorize;
use super::{checked_sid, ApiError};
use crate::protocol::{new_body, ErrorCode, EventKind, StreamId, DEFAULT_ROLE};
use crate::state::Shared;
use crate::store::{Created, Entry, Session, Store, StoreError};

/// Entries read per `XRANGE` while collecting a page of the conversation (joins, leaves and
/// notices in between are skipped).
const SCAN_PAGE: u64 = 500;

#[derive(Debug, Deserialize)]
pub(super) struct ApiQuery {
    token: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// `POST /api/sessions`: creates the record and the room's stream (first entry
/// `session.created`) in one script, then answers `201` — the session exists in Redis when the
/// client reads the answer.
pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<ApiQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = json_object(&body, true)?;
    let sid = match body.get("session_id") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(s)) => checked_sid(Some(s))?.to_owned(),
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidSid,
                "session_id must be a string of 1-128 characters of A-Z a-z 0-9 . _ -",
            ))
        }
    };
    let metadata = metadata_field(&body, false)?.unwrap_or_default();
    let retention = retention(&metadata)?;
    let grant = authorize(&shared, &headers, q.token.as_deref(), &sid)?;
    let role = grant.role.as_deref().unwrap_or(DEFAULT_ROLE);
    let entry = new_body(
        EventKind::SESSION_CREATED,
        role,
        None,
        &sid,
        &Map::new(),
        &json!({"metadata": metadata}),
    );
    match shared
        .store
        .create_session(&sid, role, &entry, &metadata)
        .await?
    {
        Created::New { created_ms, .. } => {
            tracing::info!(room = %sid, "session created");
            if retention != Retention::default() {
                shared
                    .store
                    .set_retention(&sid, retention.max_len, retention.max_age)
                    .await?;
            }
            let created_at = rfc3339(created_ms);
            let body = json!({
                "session_id": sid,
                "id": sid,
                "created_at": created_at,
                "last_accessed": created_at,
                "metadata": metadata,
                "message_count": 0,
            });
            let location = HeaderValue::from_str(&format!("/api/sessions/{sid}")).ok();
            let mut resp = (StatusCode::CREATED, Json(body)).into_response();
            if let Some(location) = location {
                resp.headers_mut().insert(header::LOCATION, location);
            }
            Ok(resp)
        }
        Created::Exists => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::SessionExists,
            format!("session {sid} already exists"),
        )),
    }
}

/// `GET /api/sessions/{id}`.
pub(super) async fn read(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<ApiQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    let session = existing(&shared.store, sid).await?;
    Ok(Json(session_json(&session)))
}

/// `PATCH /api/sessions/{id}` with `{"metadata": {...}}`, merged into the session's metadata.
pub(super) async fn patch(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<ApiQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    let body = json_object(&body, false)?;
    let Some(patch) = metadata_field(&body, true)? else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            "metadata is missing: send {\"metadata\": {...}} with the fields to change (null removes one)",
        ));
    };
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    // Refused before anything is written: the patched metadata must still say a valid retention.
    if let Some(current) = shared.store.session(sid).await? {
        let mut merged = Value::Object(current.metadata.clone());
        crate::store::merge_patch(&mut merged, &Value::Object(patch.clone()));
        if let Value::Object(merged) = &merged {
            retention(merged)?;
        }
    }
    match shared.store.patch_session(sid, &patch).await? {
        Some(session) => {
            let r = retention(&session.metadata)?;
            shared
                .store
                .set_retention(sid, r.max_len, r.max_age)
                .await?;
            Ok(Json(session_json(&session)))
        }
        None => Err(ApiError::no_session(sid)),
    }
}

/// `DELETE /api/sessions/{id}`: everything the session owns in Redis goes, and its members on
/// every node get `session_deleted` and a close.
pub(super) async fn delete(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<ApiQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    if shared.store.delete_session(sid).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::no_session(sid))
    }
}

/// `GET /api/sessions/{id}/messages?limit=&after=`: the conversation (chat messages, LLM
/// requests, replies and errors; no joins, leaves, typing or acks), oldest first. Without
/// `after`: the newest `limit` messages; with it, the `limit` messages after that id.
/// `next_after` continues forward.
pub(super) async fn messages(
    State(shared): State<Arc<Shared>>,
    Path(sid): Path<String>,
    Query(q): Query<ApiQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let sid = checked_sid(Some(&sid))?;
    authorize(&shared, &headers, q.token.as_deref(), sid)?;
    let limit = super::history::page_limit(q.limit.as_deref())?;
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(a.parse::<StreamId>().map_err(|_| {
            ApiError::bad_request(
                ErrorCode::InvalidLastId,
                "after must be a message_id such as 1700000000000-0, or 0 for the start",
            )
        })?),
    };
    if !shared.store.session_exists(sid).await? {
        return Err(ApiError::no_session(sid));
    }
    let entries = conversation(&shared.store, sid, after, limit).await?;
    let messages: Vec<Value> = entries.iter().filter_map(message_json).collect();
    let next_after = entries.last().map(|e| e.id.to_string());
    Ok(Json(json!({
        "session_id": sid,
        "messages": messages,
        "next_after": next_after,
    })))
}

/// The session, or `404 not_found`.
pub(super) async fn existing(store: &Store, sid: &str) -> Result<Session, ApiError> {
    store
        .session(sid)
        .await?
        .ok_or_else(|| ApiError::no_session(sid))
}

/// A session as the API shows it (the fields of issue 13, exactly).
pub(super) fn session_json(s: &Session) -> Value {
    json!({
        "session_id": s.sid,
        "id": s.sid,
        "created_at": rfc3339(s.created_ms),
        "last_accessed": rfc3339(s.last_active_ms),
        "metadata": s.metadata,
        "message_count": s.message_count(),
    })
}

/// Up to `limit` conversational entries: after `after`, or the newest; oldest first.
async fn conversation(
    store: &Store,
    sid: &str,
    after: Option<StreamId>,
    limit: u64,
) -> Result<Vec<Entry>, StoreError> {
    let wanted = |e: &Entry| EventKind::CONVERSATION.contains(&e.event.as_str());
    let mut out = Vec::new();
    match after {
        Some(mut cursor) => loop {
            let page = store
                .range_after(sid, Some(cursor), None, SCAN_PAGE)
                .await?;
            let full = page.len() as u64 == SCAN_PAGE;
            for e in page {
                cursor = e.id;
                if wanted(&e) {
                    out.push(e);
                    if out.len() as u64 == limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
        },
        None => {
            let mut before = None;
            loop {
                let page = store.range_before(sid, before, SCAN_PAGE).await?;
                let full = page.len() as u64 == SCAN_PAGE;
                before = page.first().map(|e| e.id);
                for e in page.into_iter().rev() {
                    if wanted(&e) {
                        out.push(e);
                        if out.len() as u64 == limit {
                            break;
                        }
                    }
                }
                if !full || out.len() as u64 == limit {
                    out.reverse();
                    return Ok(out);
                }
            }
        }
    }
}

/// One message of the conversation: `message_id`, `role` (`user`, `assistant` for the LLM's
/// replies, `system` for its errors), `participant` (the speaker's role: A, B, user, llm),
/// `content`, `created_at`, `token_usage` (LLM entries that spent tokens, else null).
fn message_json(e: &Entry) -> Option<Value> {
    if !EventKind::CONVERSATION.contains(&e.event.as_str()) {
        return None;
    }
    let env: Value = serde_json::from_str(&e.body).unwrap_or(Value::Null);
    let bd = &env["bd"];
    let text = |field: &str| bd[field].as_str().map(str::to_owned);
    let (role, content) = match e.event.as_str() {
        "llm.response" => ("assistant", text("text")),
        "llm.error" => ("system", text("message")),
        _ => ("user", text("text").or_else(|| text("prompt"))),
    };
    // An entry written by hand (redis-cli) may not be an envelope: its body is the content.
    let content = content.unwrap_or_else(|| e.body.clone());
    let mut msg = json!({
        "message_id": e.id.to_string(),
        "role": role,
        "participant": e.participant,
        "content": content,
        "created_at": rfc3339(e.id.ms),
        "token_usage": bd.get("usage").cloned().unwrap_or(Value::Null),
        "event": e.event,
    });
    for (field, value) in [
        ("turn_id", &env["hd"]["turn_id"]),
        ("code", &env["hd"]["code"]),
        ("reason", &bd["reason"]),
    ] {
        if !value.is_null() {
            msg[field] = value.clone();
        }
    }
    Some(msg)
}

/// The body as a JSON object. `optional`: an empty body is an empty object.
pub(super) fn json_object(body: &[u8], optional: bool) -> Result<Map<String, Value>, ApiError> {
    if optional && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            ErrorCode::NotObject,
            "the body must be a JSON object",
        )),
        Err(err) => Err(ApiError::bad_request(
            ErrorCode::BadJson,
            format!("the body is not valid JSON: {err}"),
        )),
    }
}

/// `metadata`, which must be an object when present (`null` counts as absent unless `patch`,
/// where it is refused as well: a merge patch of `null` would erase everything).
fn metadata_field(
    body: &Map<String, Value>,
    patch: bool,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match body.get("metadata") {
        None => Ok(None),
        Some(Value::Null) if !patch => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(_) => Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            "metadata must be a JSON object",
        )),
    }
}

/// A session's own retention, from `metadata.retention`: `{"max_len": 1000, "max_age": "7d"}`
/// (either may be absent; `max_age` also as seconds).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Retention {
    max_len: Option<u64>,
    max_age: Option<std::time::Duration>,
}

fn retention(metadata: &Map<String, Value>) -> Result<Retention, ApiError> {
    let bad = |field: &str, what: &str| {
        ApiError::bad_request(
            ErrorCode::InvalidBody,
            format!("metadata.retention.{field} must be {what}"),
        )
    };
    let Some(r) = metadata.get("retention") else {
        return Ok(Retention::default());
    };
    let Value::Object(r) = r else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBody,
            "metadata.retention must be an object such as {\"max_len\": 1000, \"max_age\": \"7d\"}",
        ));
    };
    let max_len = match r.get("max_len") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| bad("max_len", "a whole number"))?),
    };
    let max_age = match r.get("max_age") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(std::time::Duration::from_secs(
            n.as_u64().filter(|s| *s > 0).ok_or_else(|| {
                bad(
                    "max_age",
                    "a duration such as \"7d\" or a number of seconds",
                )
            })?,
        )),
        Some(Value::String(s)) => Some(
            crate::auth::parse_ttl(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| bad("max_age", "a duration such as \"7d\", \"12h\" or \"30s\""))?,
        ),
        Some(_) => {
            return Err(bad(
                "max_age",
                "a duration such as \"7d\" or a number of seconds",
            ))
        }
    };
    Ok(Retention { max_len, max_age })
}

/// Milliseconds since the epoch as RFC 3339 in UTC (`2024-01-10T16:00:00.123Z`).
pub(super) fn rfc3339(ms: u64) -> String {
    use time::format_description::well_known::Rfc3339;
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc_3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_704_902_400_123), "2024-01-10T16:00:00.123Z");
    }

    #[test]
    fn conversation_entries_become_messages() {
        let entry = |event: &str, participant: &str, body: Value| Entry {
            id: StreamId::new(1_704_902_400_000, 1),
            participant: participant.into(),
            event: event.into(),
            body: body.to_string(),
        };
        let m = message_json(&entry(
            "chat.message",
            "A",
            json!({"hd": {"event": "chat.message"}, "bd": {"text": "hi"}}),
        ))
        .unwrap();
        assert_eq!(m["role"], "user");
        assert_eq!(m["participant"], "A");
        assert_eq!(m["content"], "hi");
        assert_eq!(m["message_id"], "1704902400000-1");
        assert_eq!(m["created_at"], "2024-01-10T16:00:00Z");
        assert!(m["token_usage"].is_null());
        let usage = json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5});
        let m = message_json(&entry(
            "llm.response",
            "llm",
            json!({"hd": {"turn_id": "1-0"}, "bd": {"text": "yo", "usage": usage, "reason": "stop"}}),
        ))
        .unwrap();
        assert_eq!(m["role"], "assistant");
        assert_eq!(m["token_usage"], usage);
        assert_eq!(m["turn_id"], "1-0");
        let m = message_json(&entry(
            "llm.error",
            "llm",
            json!({"hd": {"code": "llm_unavailable"}, "bd": {"message": "down"}}),
        ))
        .unwrap();
        assert_eq!(
            (m["role"].as_str(), m["content"].as_str()),
            (Some("system"), Some("down"))
        );
        assert!(message_json(&entry("session.join", "A", json!({}))).is_none());
    }
}
