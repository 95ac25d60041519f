//! One WebSocket connection in one room.
//!
//! Two halves run concurrently. The reader parses frames, dispatches them and keeps up to
//! `send_window` appends in flight (pipelined on the shared Redis client, acked in order). The
//! writer is the only task that touches the socket's sink: it replays history after `last_id`,
//! then forwards the room's live frames, skipping ids it already sent, plus the reader's acks
//! and errors. Every queue is bounded; a client that cannot keep up is disconnected and resumes
//! with `last_id`, because the stream, not the relay's memory, is the buffer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{FuturesOrdered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Grant;
use crate::dispatch::{dispatch, presence_body, Action, ConnCtx};
use crate::limits::{ConnSlot, TokenBucket};
use crate::protocol::{
    ack_frame, delivery_frame, error_frame, parse_client_frame, ClientError, ErrorCode, StreamId,
};
use crate::relay::Shared;
use crate::room::{ConnId, Outbound, Room};

/// What the upgrade handler checked and hands to the session.
#[derive(Debug)]
pub struct SessionParams {
    pub sid: String,
    pub last_id: Option<StreamId>,
    pub role: Option<String>,
    pub grant: Grant,
    pub conn: ConnId,
    /// This connection's place in the per-address count; freed when the session ends.
    pub slot: ConnSlot,
}

/// WebSocket close codes the relay uses (RFC 6455 §7.4 and the IANA registry).
mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Frames written to a socket per flush, at most.
const WRITE_BATCH: usize = 64;
/// History page size for a resume.
const REPLAY_PAGE: u64 = 500;
/// Acks and errors waiting for the writer; when full, the reader stops reading this client.
const CONTROL_QUEUE: usize = 64;

type Pending = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// Why the writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The reader ended (client closed, read error or shutdown).
    ReaderDone,
    /// The room dropped this member: its queue was full.
    Slow,
    /// No pong for three ping intervals, or a write timed out.
    Dead,
    /// History could not be read for the resume.
    StoreDown,
    /// A frame exceeded the hard size cap.
    TooBig,
    /// The token expired while connected.
    TokenExpired,
    /// Rate limits were ignored for too long.
    Abusive,
}

pub async fn run(socket: WebSocket, shared: Arc<Shared>, params: SessionParams) {
    let span = tracing::info_span!("session", room = %params.sid, conn = params.conn);
    session(socket, shared, params).instrument(span).await;
}

async fn session(socket: WebSocket, shared: Arc<Shared>, params: SessionParams) {
    metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
    let _connected = ConnectedGauge;
    let (mut sink, stream) = socket.split();
    let conn_label = format!("{}-{}", shared.node_id, params.conn);
    let mut ctx = ConnCtx::new(params.sid.clone(), params.role.clone());
    ctx.bound_role = params.grant.role.clone();
    ctx.sender = params.grant.sub.clone();
    let (room_tx, room_rx) = mpsc::channel(shared.session.outbound_queue);

    let room = match shared.rooms.join(&params.sid, params.conn, room_tx).await {
        Ok(room) => room,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot join room: store unavailable");
            refuse(&mut sink, ClientError::store_unavailable()).await;
            return;
        }
    };
    let join = presence_body("session.join", &ctx.default_role, &params.sid, &conn_label);
    let joined = match shared
        .store
        .append(&params.sid, &ctx.default_role, "session.join", &join, None)
        .await
    {
        Ok(a) => a.id,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot record join: store unavailable");
            shared.rooms.leave(&room, params.conn);
            refuse(&mut sink, ClientError::store_unavailable()).await;
            return;
        }
    };
    tracing::info!(role = %ctx.default_role, last_id = ?params.last_id.map(|i| i.to_string()), "joined");

    let last_pong = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop = CancellationToken::new();
    let (ctrl_tx, ctrl_rx) = mpsc::channel::<Ctrl>(CONTROL_QUEUE);

    // A fresh client starts at its own join entry; a resuming one right after its last id.
    // Both read that start from the stream rather than trusting the live feed: in a brand-new
    // room the node's SUBSCRIBE may not be active in Redis yet when the join is published.
    let cursor = params.last_id.unwrap_or_else(|| joined.prev());
    let writer = Writer {
        shared: shared.clone(),
        sid: params.sid.clone(),
        last_sent: cursor,
        last_pong: last_pong.clone(),
        started,
        expires: params.grant.expires_at_ms.map(deadline_from_epoch_ms),
        resume_from: params.last_id,
    };
    let now = Instant::now();
    let limits = &shared.limits;
    let reader = Reader {
        shared: shared.clone(),
        ctx: ctx.clone(),
        room: room.clone(),
        ctrl: ctrl_tx,
        last_pong,
        started,
        bucket: TokenBucket::new(limits.msgs_per_sec, limits.msgs_burst, now),
        strikes: 0,
    };
    let read_stop = stop.clone();
    let read = reader.run(stream, read_stop);
    let write = async {
        let end = writer.run(&mut sink, room_rx, ctrl_rx).await;
        stop.cancel();
        end
    };
    let (end, mut stream) = tokio::join!(write, read);

    shared.rooms.leave(&room, params.conn);
    let (code, reason, notice) = match end {
        End::ReaderDone if shared.token.is_cancelled() => {
            (close::GOING_AWAY, "relay shutting down", None)
        }
        End::ReaderDone => (close::NORMAL, "bye", None),
        End::Slow => (
            close::TRY_AGAIN_LATER,
            "too slow: reconnect with last_id",
            Some(ClientError::new(
                ErrorCode::SlowConsumer,
                "you fell too far behind the room; reconnect with last_id to catch up",
            )),
        ),
        End::TokenExpired => (
            close::POLICY,
            "token expired",
            Some(ClientError::new(
                ErrorCode::TokenExpired,
                "your token has expired; reconnect with a new one",
            )),
        ),
        End::Abusive => (
            close::POLICY,
            "rate limits ignored",
            Some(ClientError::new(
                ErrorCode::RateLimited,
                "too many messages for too long; disconnected",
            )),
        ),
        End::Dead => (close::POLICY, "no pong", None),
        End::TooBig => (close::TOO_BIG, "frame too large", None),
        End::StoreDown => (
            close::TRY_AGAIN_LATER,
            "store unavailable",
            Some(ClientError::store_unavailable()),
        ),
    };
    if let Some(err) = notice {
        crate::metrics::error(err.code.as_str());
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(Message::Text(error_frame(&err, None).into())),
        )
        .await;
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }))),
    )
    .await;
    // Read (and drop) what the client still sends until its close frame, briefly: closing a
    // socket with unread data resets it, and the client would lose our close frame and reason.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(msg)) = stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    tracing::info!(?end, code, "left");

    let leave = presence_body("session.leave", &ctx.default_role, &params.sid, &conn_label);
    if let Err(err) = shared
        .store
        .append(
            &params.sid,
            &ctx.default_role,
            "session.leave",
            &leave,
            None,
        )
        .await
    {
        tracing::warn!(cause = %err, "could not record leave");
    }
}

/// Decrements the connection gauge however the session ends.
struct ConnectedGauge;

impl Drop for ConnectedGauge {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
    }
}

/// Send one error frame and close: the connection cannot be served.
async fn refuse(sink: &mut SplitSink<WebSocket, Message>, err: ClientError) {
    let _ = sink
        .send(Message::Text(error_frame(&err, None).into()))
        .await;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: close::TRY_AGAIN_LATER,
            reason: Utf8Bytes::from_static("store unavailable"),
        })))
        .await;
}

struct Writer {
    shared: Arc<Shared>,
    sid: String,
    /// Newest stored entry sent to this client; anything at or below it is a duplicate.
    last_sent: StreamId,
    last_pong: Arc<AtomicU64>,
    started: Instant,
    /// When the connection's token expires.
    expires: Option<tokio::time::Instant>,
    /// The `last_id` the client resumes from, if it resumes.
    resume_from: Option<StreamId>,
}

/// The `resume_gap` notice for a client resuming after `last`, if the stream cannot give it
/// everything after that id: entries after it were trimmed (retention), or the stream is behind
/// it (Redis lost data). Never a silent gap.
///
/// `seen` says whether the entry `last` itself is still in the stream: when it is gone without
/// having been trimmed, the store lost data the client had.
fn resume_gap(
    sid: &str,
    last: StreamId,
    seen: bool,
    info: Option<&crate::store::StreamInfo>,
) -> Option<String> {
    let Some(info) = info else {
        return (last > StreamId::ZERO).then(|| {
            gap_notice(
                sid,
                last,
                "lost",
                "the room's history is gone (the store lost it); showing what comes next",
                None,
            )
        });
    };
    let some_removed = info.entries_added.is_some_and(|added| added > info.length);
    let (reason, message) = if last > info.last_generated_id {
        ("ahead", "the store is behind the last message you saw (it lost recent data); showing what comes next")
    } else if seen || (last == StreamId::ZERO && !some_removed) {
        return None;
    } else if some_removed
        && (last == StreamId::ZERO || info.first_id.is_some_and(|first| last < first))
    {
        (
            "trimmed",
            "older messages after your last one were trimmed; showing what is left",
        )
    } else {
        (
            "lost",
            "the store lost messages you had seen (it restarted without them); showing what is left",
        )
    };
    Some(gap_notice(sid, last, reason, message, info.first_id))
}

fn gap_notice(
    sid: &str,
    last: StreamId,
    reason: &str,
    message: &str,
    oldest: Option<StreamId>,
) -> String {
    serde_json::json!({
        "hd": {"event": "resume_gap", "sid": sid, "ts": crate::protocol::now_ms()},
        "bd": {
            "reason": reason,
            "last_id": last.to_string(),
            "oldest_id": oldest.map(|i| i.to_string()),
            "message": message,
        },
    })
    .to_string()
}

/// A tokio deadline for a wall-clock time in ms since the epoch.
fn deadline_from_epoch_ms(at_ms: u64) -> tokio::time::Instant {
    let left = at_ms.saturating_sub(crate::protocol::now_ms());
    tokio::time::Instant::now() + Duration::from_millis(left)
}

impl Writer {
    async fn run(
        mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        mut room_rx: mpsc::Receiver<Outbound>,
        mut ctrl_rx: mpsc::Receiver<Ctrl>,
    ) -> End {
        let write_timeout = self.shared.session.write_timeout;
        if let Some(last) = self.resume_from {
            let store = &self.shared.store;
            let state = async {
                let info = store.info(&self.sid).await?;
                let seen = last == StreamId::ZERO
                    || store
                        .range_after(&self.sid, Some(last.prev()), Some(last), 1)
                        .await?
                        .first()
                        .is_some_and(|e| e.id == last);
                Ok::<_, crate::store::StoreError>((info, seen))
            };
            match state.await {
                Ok((info, seen)) => {
                    if let Some(notice) = resume_gap(&self.sid, last, seen, info.as_ref()) {
                        tracing::info!(last_id = %last, "resume gap");
                        if !send(sink, Message::Text(notice.into()), write_timeout).await {
                            return End::Dead;
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "resume failed: cannot read the stream's state");
                    return End::StoreDown;
                }
            }
        }
        // History after the cursor first; live frames queue meanwhile and are deduplicated.
        loop {
            let page = match self
                .shared
                .store
                .range_after(&self.sid, Some(self.last_sent), None, REPLAY_PAGE)
                .await
            {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(cause = %err, "resume failed: cannot read history");
                    return End::StoreDown;
                }
            };
            for e in &page {
                let frame = delivery_frame(e.id, &e.participant, &e.event, &e.body);
                if !send(sink, Message::Text(frame.into()), write_timeout).await {
                    return End::Dead;
                }
                self.last_sent = e.id;
            }
            if (page.len() as u64) < REPLAY_PAGE {
                break;
            }
        }

        let ping_every = self.shared.session.ping_interval;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        // Far enough to never fire when the token does not expire.
        let expires = self.expires.unwrap_or_else(|| {
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
        });
        loop {
            let msg = tokio::select! {
                biased;
                _ = tokio::time::sleep_until(expires) => return End::TokenExpired,
                ctrl = ctrl_rx.recv() => match ctrl {
                    Some(Ctrl::Frame(frame)) => Message::Text(frame.into()),
                    Some(Ctrl::TooBig) => return End::TooBig,
                    Some(Ctrl::Abusive) => return End::Abusive,
                    None => return End::ReaderDone,
                },
                out = room_rx.recv() => match out {
                    Some(out) => {
                        if let Some(id) = out.id {
                            if id <= self.last_sent {
                                continue;
                            }
                            self.last_sent = id;
                        }
                        Message::Text(out.frame)
                    }
                    None => {
                        tracing::warn!("disconnecting slow client");
                        return End::Slow;
                    }
                },
                _ = ping.tick() => {
                    let silent_for = self.started.elapsed().as_millis() as u64
                        - self.last_pong.load(Ordering::Relaxed).min(self.started.elapsed().as_millis() as u64);
                    if silent_for > 3 * ping_every.as_millis() as u64 {
                        tracing::info!(silent_ms = silent_for, "peer stopped answering pings");
                        return End::Dead;
                    }
                    Message::Ping(Default::default())
                }
            };
            // Write what else is already queued for this socket in the same flush: one syscall
            // for a burst instead of one per frame.
            let batch = async {
                sink.feed(msg).await?;
                for _ in 1..WRITE_BATCH {
                    let Ok(out) = room_rx.try_recv() else { break };
                    if let Some(id) = out.id {
                        if id <= self.last_sent {
                            continue;
                        }
                        self.last_sent = id;
                    }
                    sink.feed(Message::Text(out.frame)).await?;
                }
                sink.flush().await
            };
            if !matches!(tokio::time::timeout(write_timeout, batch).await, Ok(Ok(()))) {
                return End::Dead;
            }
        }
    }
}

/// One bounded write; `false` when the peer is gone or too slow to take a frame.
async fn send(sink: &mut SplitSink<WebSocket, Message>, msg: Message, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

struct Reader {
    shared: Arc<Shared>,
    ctx: ConnCtx,
    room: Arc<Room>,
    ctrl: mpsc::Sender<Ctrl>,
    last_pong: Arc<AtomicU64>,
    started: Instant,
    /// This connection's frames-per-second budget.
    bucket: TokenBucket,
    /// Consecutive frames refused by a rate limit.
    strikes: u32,
}

impl Reader {
    /// Reads until the client leaves or the session stops; returns the stream so the session can
    /// wait for the client's close frame after sending its own.
    async fn run(
        mut self,
        mut stream: SplitStream<WebSocket>,
        stop: CancellationToken,
    ) -> SplitStream<WebSocket> {
        let window = self.shared.session.send_window;
        let mut inflight: FuturesOrdered<Pending> = FuturesOrdered::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shared.token.cancelled() => break,
                Some(reply) = inflight.next(), if !inflight.is_empty() => {
                    if let Some(frame) = reply {
                        if self.ctrl.send(Ctrl::Frame(frame)).await.is_err() {
                            break;
                        }
                    }
                }
                msg = stream.next(), if inflight.len() < window => {
                    let alive = self.started.elapsed().as_millis() as u64;
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            self.last_pong.store(alive, Ordering::Relaxed);
                            metrics::counter!(crate::metrics::FRAMES_IN).increment(1);
                            match self.handle(text.as_str()) {
                                Handled::Reply(frame) => {
                                    if self.ctrl.send(Ctrl::Frame(frame)).await.is_err() {
                                        break;
                                    }
                                }
                                Handled::Pending(fut) => inflight.push_back(fut),
                                Handled::Abusive => {
                                    tracing::warn!(strikes = self.strikes, "closing a client that ignores rate limits");
                                    let _ = self.ctrl.send(Ctrl::Abusive).await;
                                    break;
                                }
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let err = ClientError::new(
                                ErrorCode::BinaryUnsupported,
                                "binary frames are not supported; send JSON text frames",
                            );
                            if self.ctrl.send(Ctrl::Frame(error_frame(&err, None))).await.is_err() {
                                break;
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            self.last_pong.store(alive, Ordering::Relaxed);
                        }
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Err(err)) => {
                            tracing::debug!(cause = %err, "read error");
                            if is_too_big(&err) {
                                let e = ClientError::new(
                                    ErrorCode::FrameTooLarge,
                                    format!("frame too large (max {} bytes)", self.shared.session.limits.max_frame_bytes),
                                );
                                let _ = self.ctrl.send(Ctrl::Frame(error_frame(&e, None))).await;
                                let _ = self.ctrl.send(Ctrl::TooBig).await;
                            }
                            break;
                        }
                    }
                }
            }
        }
        // Finish what was accepted: every append in flight still gets its ack or error.
        while let Some(reply) = inflight.next().await {
            if let Some(frame) = reply {
                let _ = self.ctrl.send(Ctrl::Frame(frame)).await;
            }
        }
        stream
    }

    fn handle(&mut self, text: &str) -> Handled {
        // Every frame costs budget, valid or not, so garbage floods are limited too.
        if !self.bucket.try_take(Instant::now()) {
            return self.rate_limited(ClientError::new(
                ErrorCode::RateLimited,
                "too many messages; slow down",
            ));
        }
        let inbound = match parse_client_frame(text, &self.shared.session.limits) {
            Ok(i) => i,
            Err(refusal) => {
                tracing::debug!(code = refusal.error.code.as_str(), "refused frame");
                crate::metrics::error(refusal.error.code.as_str());
                return Handled::Reply(error_frame(&refusal.error, refusal.cid.as_deref()));
            }
        };
        let cid = inbound.cid.clone();
        let action = dispatch(inbound, &self.ctx, &self.shared.roles);
        if matches!(action, Ok(Action::Store(_))) {
            let limits = &self.shared.limits;
            if !self
                .room
                .try_send_budget(limits.room_msgs_per_sec, limits.room_msgs_burst)
            {
                let err = ClientError::room_rate_limited();
                let frame = error_frame(&err, cid.as_deref());
                return match self.rate_limited(err) {
                    Handled::Reply(_) => Handled::Reply(frame),
                    other => other,
                };
            }
        }
        self.strikes = 0;
        match action {
            Err(err) => {
                tracing::debug!(code = err.code.as_str(), "refused envelope");
                crate::metrics::error(err.code.as_str());
                Handled::Reply(error_frame(&err, cid.as_deref()))
            }
            Ok(Action::Store(envelope)) => {
                let store = self.shared.store.clone();
                let sid = self.ctx.sid.clone();
                let sender = self.ctx.sender.clone();
                Handled::Pending(Box::pin(async move {
                    let cid = envelope.cid.as_deref();
                    match envelope.apply(&store, &sid, sender.as_deref()).await {
                        Ok(appended) => Some(ack_frame(cid, appended.id)),
                        Err(err) => {
                            tracing::warn!(cause = %err, "append failed");
                            crate::metrics::error(ErrorCode::StoreUnavailable.as_str());
                            Some(error_frame(&ClientError::store_unavailable(), cid))
                        }
                    }
                }))
            }
            Ok(Action::Publish { frame }) => {
                let store = self.shared.store.clone();
                let sid = self.ctx.sid.clone();
                Handled::Pending(Box::pin(async move {
                    if let Err(err) = store.publish_transient(&sid, &frame).await {
                        tracing::debug!(cause = %err, "transient publish failed");
                    }
                    None
                }))
            }
        }
    }
}

enum Handled {
    Reply(String),
    Pending(Pending),
    /// Too many rate-limited frames in a row: disconnect.
    Abusive,
}

impl Reader {
    /// A refusal by a rate limit: an error frame, or a disconnect after too many in a row.
    fn rate_limited(&mut self, err: ClientError) -> Handled {
        self.strikes += 1;
        if self.strikes >= self.shared.limits.abuse_strikes {
            return Handled::Abusive;
        }
        tracing::debug!(code = err.code.as_str(), "rate limited");
        crate::metrics::error(err.code.as_str());
        Handled::Reply(error_frame(&err, None))
    }
}

fn is_too_big(err: &axum::Error) -> bool {
    let text = err.to_string();
    text.contains("too long") || text.contains("too big") || text.contains("Space limit")
}

/// What the reader hands the writer.
#[derive(Debug)]
enum Ctrl {
    /// An ack or error frame for this client only.
    Frame(String),
    /// The client sent a frame beyond the hard size cap: close with 1009.
    TooBig,
    /// The client kept sending past its rate limit: close with 1008.
    Abusive,
}
