//! `GET /v1/session/chat?sid=ROOM[&last_id=ID][&role=A][&token=JWT]`: checks the request
//! (handshake budget, room id, token, role, connection limits, the room's presence budget), then
//! upgrades. (The origin is checked for every request, before routing: `http::guarded`.)
//!
//! Everything that can be refused is refused here, before the upgrade, with an HTTP status and a
//! JSON body: a WebSocket client sees those as a failed handshake it can read. The dialect
//! sockets (`crate::dialect`) pass the same door: [`open_door`], [`take_slot`], [`accept`].

pub(crate) mod heartbeat;
mod session;

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use serde::Deserialize;

use crate::auth::{request_token, Denied, Grant};
use crate::http::{checked_sid, ApiError};
use crate::limits::{MemberKind, MemberSlot};
use crate::net::ClientAddr;
use crate::protocol::{ErrorCode, StreamId};
use crate::state::Shared;

use session::SessionParams;

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new().route("/v1/session/chat", get(upgrade))
}

#[derive(Debug, Deserialize)]
struct ChatQuery {
    sid: Option<String>,
    last_id: Option<String>,
    role: Option<String>,
    token: Option<String>,
}

fn denied(d: Denied) -> ApiError {
    tracing::debug!(code = d.error.code.as_str(), "handshake refused");
    ApiError {
        status: d.status,
        error: d.error,
    }
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<ClientAddr>,
    headers: HeaderMap,
    Query(q): Query<ChatQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let sid = checked_sid(q.sid.as_deref())?.to_owned();
    let door = open_door(&shared, client, &headers, q.token.as_deref(), Some(&sid))?;
    let last_id = match q.last_id.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<StreamId>().map_err(|_| {
            ApiError::bad_request(
                ErrorCode::InvalidLastId,
                "last_id must be a stream id such as 1700000000000-0, or 0 for the whole history",
            )
        })?),
    };
    if shared.api.require_session && !shared.store.session_exists(&sid).await? {
        return Err(ApiError::no_session(&sid));
    }
    let conn = shared
        .ingress
        .conn(&sid, &door.grant, q.role)
        .map_err(ApiError::for_conn)?
        .with_addr(client.0)
        .with_budget(shared.ingress.connection_budget());
    let slot = take_slot(&shared, Some(&sid), client)?;
    // Its `session.join` is paid from the room's presence budget, whatever follows.
    shared
        .ingress
        .admit_join(&sid)
        .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.code, e.message))?;
    let ws = accept(&shared, &door, ws)?;
    let params = SessionParams {
        last_id,
        conn,
        conn_id: shared.next_conn_id(),
        expires: door.grant.deadline(),
        slot,
    };
    let tracker = shared.tracker.clone();
    let response = ws.on_upgrade(move |socket| async move {
        // Tracked so shutdown waits for sessions to close their sockets and finish appends.
        tracker.spawn(session::run(socket, shared, params));
    });
    Ok(response.into_response())
}

/// What a WebSocket handshake established: who connects, and with which token.
#[derive(Debug)]
pub(crate) struct Door {
    pub(crate) grant: Grant,
    /// The token as sent, for the rooms a connection names later (the evaluation dialect's
    /// frames each name their session).
    pub(crate) token: Option<String>,
    /// The token came in the protocol list: the `bearer` protocol is answered.
    token_as_protocol: bool,
}

/// The first checks of every WebSocket endpoint (the room socket and the dialect sockets): the
/// address's handshake budget, then the token — for room `sid`, or, for a connection not bound
/// to one room, only that it is valid. (The page's origin is checked for every request before
/// routing: `http::guarded`.)
pub(crate) fn open_door(
    shared: &Shared,
    client: ClientAddr,
    headers: &HeaderMap,
    query_token: Option<&str>,
    sid: Option<&str>,
) -> Result<Door, ApiError> {
    if !shared.ingress.admit_handshake(client.limit_key()) {
        return Err(ApiError::too_many_handshakes());
    }
    let (token, token_as_protocol) = request_token(query_token, headers);
    let grant = match sid {
        Some(sid) => shared.auth.authorize(token.as_deref(), sid),
        None => shared.auth.authenticate(token.as_deref()),
    }
    .map_err(denied)?;
    Ok(Door {
        grant,
        token,
        token_as_protocol,
    })
}

/// This connection's place among the node's WebSockets: in room `sid` (when it is bound to
/// one) and from its client address; freed when the slot is dropped.
pub(crate) fn take_slot(
    shared: &Shared,
    sid: Option<&str>,
    client: ClientAddr,
) -> Result<MemberSlot, ApiError> {
    shared
        .members
        .acquire(MemberKind::WebSocket, sid, client.limit_key())
        .map_err(ApiError::full)
}

/// Bytes tungstenite reads from a socket at once, and keeps allocated for the connection's life.
/// Small reads cost no syscalls: the socket reads ahead 4 KiB at a time (`net::io`).
const READ_BUFFER: usize = 512;

/// The upgrade, with the socket limits every relay WebSocket has.
pub(crate) fn accept(
    shared: &Shared,
    door: &Door,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, ApiError> {
    let ws = ws.map_err(|rej| {
        ApiError::new(
            rej.status(),
            ErrorCode::InvalidHeader,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        )
    })?;
    let ws = if door.token_as_protocol {
        ws.protocols(["bearer"])
    } else {
        ws
    };
    let hard_cap = (shared.session.limits.max_frame_bytes * 4).max(16 * 1024);
    Ok(ws
        // tungstenite's hard cap sits above our own frame limit, so a frame a little too large
        // gets a readable `frame_too_large` error and only a huge one closes the socket (1009).
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        // Small buffers: an idle connection should cost little more than its socket.
        // tungstenite zero-fills its whole read buffer at the first read, so all of it stays
        // resident for the connection's life (4 KiB was a fifth of an idle connection, #16);
        // a frame longer than this still fits (the buffer grows to the frame), it only takes
        // more reads, served from the socket's read-ahead chunk (`net::io`), not syscalls.
        .read_buffer_size(READ_BUFFER)
        // Each frame is handed to the socket as it is written: a buffer here would keep the
        // capacity of the largest burst a connection ever got (a room's joins, a history page)
        // for the connection's life. The socket holds small writes until the writer's flush
        // (`net::io`), so a burst is still one syscall.
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024))
}

/// Whether a read failed on a frame above the hard size cap (see [`accept`]).
pub(crate) fn frame_too_big(err: &axum::Error) -> bool {
    let text = err.to_string();
    text.contains("too long") || text.contains("too big") || text.contains("Space limit")
}
