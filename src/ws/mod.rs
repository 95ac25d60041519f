//! `GET /v1/session/chat?sid=ROOM[&last_id=ID][&role=A]`: checks the request, then upgrades.
//!
//! Everything that can be refused is refused here, before the upgrade, with an HTTP status and a
//! JSON body: a WebSocket client sees those as a failed handshake it can read.

mod session;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::http::{checked_sid, ApiError};
use crate::protocol::{ErrorCode, StreamId};
use crate::relay::Shared;

pub use session::SessionParams;

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/v1/session/chat", get(upgrade))
}

#[derive(Debug, Deserialize)]
struct ChatQuery {
    sid: Option<String>,
    last_id: Option<String>,
    role: Option<String>,
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<ChatQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let sid = checked_sid(q.sid.as_deref())?.to_owned();
    let last_id = match q.last_id.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<StreamId>().map_err(|_| {
            ApiError::bad_request(
                ErrorCode::InvalidLastId,
                "last_id must be a stream id such as 1700000000000-0, or 0 for the whole history",
            )
        })?),
    };
    let role = match q.role {
        Some(role) if !role.is_empty() => {
            shared.roles.check(&role).map_err(|error| ApiError {
                status: axum::http::StatusCode::BAD_REQUEST,
                error,
            })?;
            Some(role)
        }
        _ => None,
    };
    let ws = ws.map_err(|rej| {
        ApiError::new(
            rej.status(),
            ErrorCode::InvalidHeader,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        )
    })?;
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let params = SessionParams {
        sid,
        last_id,
        role,
        conn,
    };
    let limits = &shared.session;
    // tungstenite's hard cap sits above our own frame limit, so a frame a little too large gets
    // a readable `frame_too_large` error and only a huge one closes the socket (1009).
    let hard_cap = (limits.limits.max_frame_bytes * 4).max(16 * 1024);
    let tracker = shared.tracker.clone();
    let response = ws
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| async move {
            // Tracked so shutdown waits for sessions to close their sockets and finish appends.
            tracker.spawn(session::run(socket, shared, params));
        });
    Ok(response.into_response())
}
