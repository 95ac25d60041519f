//! One WebSocket connection in one room: its lifecycle.
//!
//! Join the room (a [`Cursor`]) and record `session.join`; run the [`reader`] and the [`writer`]
//! until one ends; send the close the writer chose from the catalogue ([`Close`]), with its
//! notice; record `session.leave`. The reader turns frames into submits (pipelined, acked in
//! order); the writer is the only task that touches the socket's sink. Every queue is bounded.

mod reader;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_channel::mpsc;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dispatch::presence_body;
use crate::ingress::{AppendRefused, Conn, Presence};
use crate::limits::MemberSlot;
use crate::protocol::{error_frame, Close, StreamId};
use crate::room::Member;
use crate::room::{ConnId, Cursor};
use crate::state::Shared;
use crate::ws::heartbeat::{Heard, Heartbeat};

/// What the upgrade handler checked and hands to the session.
#[derive(Debug)]
pub(crate) struct SessionParams {
    pub(crate) last_id: Option<StreamId>,
    /// Who sends on this connection (room, roles, token subject, budget).
    pub(crate) conn: Conn,
    pub(crate) conn_id: ConnId,
    /// When the connection's token expires.
    pub(crate) expires: Option<tokio::time::Instant>,
    /// This connection's place in the per-address count; freed when the session ends.
    pub(crate) slot: MemberSlot,
}

/// Acks and errors waiting for the writer; when full, the reader stops reading this client.
/// (A `futures` channel, not tokio's: tokio's allocates a 32-slot block and a cache-padded
/// state up front, ~1.3 KiB per connection, where this one allocates per queued frame.)
const CONTROL_QUEUE: usize = 64;
/// How long the last frames of a session (notice, close, the client's close) may take.
const CLOSING_TIMEOUT: Duration = Duration::from_secs(1);

/// What the reader hands the writer.
#[derive(Debug)]
enum Ctrl {
    /// An ack or error frame for this client only.
    Frame(String),
    /// End the session with this close.
    Close(Close),
}

/// The session's task. Not an `async fn`, and the socket is split before `session` starts: an
/// async fn keeps its arguments in its state for its whole life, so a wrapper would hold a
/// second copy of the socket and the parameters (~1 KiB) beside the session's own (#16).
pub(crate) fn run(
    socket: WebSocket,
    shared: Arc<Shared>,
    params: SessionParams,
) -> impl Future<Output = ()> + Send {
    let client = params.conn.addr().map(tracing::field::display);
    let span =
        tracing::info_span!("session", room = %params.conn.sid(), conn = params.conn_id, client);
    let (sink, stream) = socket.split();
    session(sink, stream, shared, params).instrument(span)
}

async fn session(
    mut sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    shared: Arc<Shared>,
    mut params: SessionParams,
) {
    let _connected = crate::metrics::Connected::open();
    let _slot = params.slot;
    let sid = params.conn.sid().to_owned();
    let role = params.conn.default_role().to_owned();
    let conn_label = format!("{}-{}", shared.node_id, params.conn_id);

    // Every Redis round trip of the opening and the closing is awaited boxed: a task's future is
    // as large as its largest state, and these states are several KiB each (fred's command
    // futures), while the session spends its life in the small one that reads and writes
    // (issue #16: the unboxed future was ~38 KiB per connection).
    let cursor = match Box::pin(Cursor::join(
        &shared.rooms,
        &shared.store,
        &sid,
        params.conn_id,
        shared.session.outbound_queue,
    ))
    .await
    {
        Ok(cursor) => cursor,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot join room: store unavailable");
            Box::pin(send_close(&mut sink, Close::StoreUnavailable)).await;
            return;
        }
    };
    let join = presence_body(Presence::Join.event(), &role, &sid, &conn_label);
    if shared.api.require_session {
        params.conn = params.conn.require_room();
    }
    let joined = match Box::pin(
        shared
            .ingress
            .record_presence(&params.conn, Presence::Join, &join),
    )
    .await
    {
        Ok(id) => id,
        Err(refused) => {
            let close = match refused {
                AppendRefused::NoRoom => {
                    tracing::info!("the session was deleted before the join was recorded");
                    Close::SessionDeleted
                }
                AppendRefused::NewRoomLimited => Close::RoomCreationLimited,
                AppendRefused::Store(err) => {
                    tracing::warn!(cause = %err, "cannot record join: store unavailable");
                    Close::StoreUnavailable
                }
            };
            drop(cursor);
            Box::pin(send_close(&mut sink, close)).await;
            return;
        }
    };
    drop(join);
    tracing::info!(%role, last_id = ?params.last_id.map(|i| i.to_string()), "joined");
    // In the room's live presence until the session ends (the guard leaves on drop).
    let me = Member {
        role: role.clone(),
        sub: params.conn.sender().map(str::to_owned),
    };
    let _present = Box::pin(shared.presence.enter(&sid, params.conn_id, me)).await;
    // A fresh client starts at its own join entry; a resuming one right after its last id.
    // Both read that start from the stream rather than trusting the live feed: in a brand-new
    // room the node's SUBSCRIBE may not be active in Redis yet when the join is published.
    let cursor = match params.last_id {
        Some(last) => cursor.resume_after(last),
        None => cursor.replay_after(joined.prev()),
    };

    let heard = Heard::new();
    let stop = CancellationToken::new();
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<Ctrl>(CONTROL_QUEUE);
    let heartbeat = Heartbeat::new(heard.clone(), shared.session.ping_interval, params.expires);
    let (close, (stream, conn)) = tokio::join!(
        async {
            let writer = writer::Writer {
                shared: shared.clone(),
                heartbeat,
            };
            // The cursor is dropped (the room left) as soon as the writer ends.
            let close = writer.run(&mut sink, cursor, ctrl_rx).await;
            stop.cancel();
            close
        },
        reader::Reader {
            shared: shared.clone(),
            // With --require-session a frame must not recreate the room once it is deleted
            // (`require_room` above). Without it, a room whose stream vanished (Redis restarted
            // without persistence) comes back with the next message, as rooms always have.
            conn: params.conn,
            ctrl: ctrl_tx,
            heard,
        }
        .run(stream, stop.clone()),
    );

    Box::pin(finish(
        &shared,
        sink,
        stream,
        close,
        &conn,
        &role,
        &sid,
        &conn_label,
    ))
    .await;
}

/// The end of a session: the close (with its notice), the client's close frame, the
/// `session.leave` entry.
#[allow(
    clippy::too_many_arguments,
    reason = "the session's parts, handed over as the session ends"
)]
async fn finish(
    shared: &Shared,
    mut sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    close: Close,
    conn: &Conn,
    role: &str,
    sid: &str,
    conn_label: &str,
) {
    send_close(&mut sink, close).await;
    // Read (and drop) what the client still sends until its close frame, briefly: closing a
    // socket with unread data resets it, and the client would lose our close frame and reason.
    let _ = tokio::time::timeout(CLOSING_TIMEOUT, async {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    tracing::info!(?close, code = close.code(), "left");

    // Only into a room that still exists: a deleted session gets no entry back.
    let leave = presence_body(Presence::Leave.event(), role, sid, conn_label);
    if let Err(err) = shared
        .ingress
        .record_presence(conn, Presence::Leave, &leave)
        .await
    {
        match err {
            // The session was deleted (or expired): its members leave no entry behind.
            AppendRefused::NoRoom => {
                tracing::debug!("the room is gone; no leave recorded")
            }
            err => tracing::warn!(cause = %err, "could not record leave"),
        }
    }
}

/// The close's notice (an error frame), if it has one, then the close frame; each bounded.
async fn send_close(sink: &mut SplitSink<WebSocket, Message>, close: Close) {
    if let Some(err) = close.notice() {
        crate::metrics::error(err.code.as_str());
        let notice = Message::Text(error_frame(&err, None).into());
        let _ = tokio::time::timeout(CLOSING_TIMEOUT, sink.send(notice)).await;
    }
    let frame = Message::Close(Some(CloseFrame {
        code: close.code(),
        reason: Utf8Bytes::from_static(close.reason()),
    }));
    let _ = tokio::time::timeout(CLOSING_TIMEOUT, sink.send(frame)).await;
}
