//! The voice-chat dialect: `ws://HOST/ws/session/{session_id}[?role=A][&token=JWT]`.
//!
//! In: `{"type":"request_ai_response","data":{"message","emotion"?,"timestamp"?}}`. Out, per
//! request and in request order: `ai_stream_begin`, `ai_stream_chunk` (`data.chunk`) per piece
//! of the reply, `ai_stream_complete` — or `ai_stream_error` (`data.error`, a short sentence in
//! the relay's `--locale`, and `data.code` from the error catalogue). Every `data` also carries
//! the `turn_id` it belongs to once there is one.
//!
//! A request is checked in this order, each refusal storing nothing and leaving the socket
//! open: the connection's frame budget; the frame's size and depth; JSON, `type`, `data`; then
//! as an `llm.request` by the one way in (message 1–2000 characters after trimming, emotion one
//! of the list or null); the timestamp; then, in one Redis script, that the session exists and
//! that its sliding window (`--voice-requests-per-minute`, shared by every node) has room —
//! only valid requests count. It is stored as `llm.request` with `bd.text`, `bd.emotion`,
//! `bd.timestamp` and `hd.dialect: "voice"`, `hd.max_tokens: 200` (short replies for speech),
//! in the connection's role, only while the session exists (the append checks it).
//!
//! Replies go out one request at a time, like the voice backend answered them: a later
//! request's begin comes after the earlier one's complete, and its refusals after too, so a
//! client never reads an error in the middle of another reply. Each reply is read by a
//! [`TurnReader`](crate::room::TurnReader), so the chunks add up to the stored reply even when a
//! worker died mid-turn (a new attempt that changes the text starts with another
//! `ai_stream_begin`, `data.restart: true`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::locale::{Locale, Sentence};
use super::socket::{self, Incoming, Link, Outbox};
use crate::http::{checked_sid, ApiError};
use crate::ingress::{Conn, Submitted};
use crate::limits::MemberSlot;
use crate::net::ClientAddr;
use crate::protocol::{check_frame, parse_client_frame, ClientError, Close, ErrorCode, StreamId};
use crate::room::{usage_counts, ConnId, CursorEnd, Member, TurnStep};
use crate::state::Shared;
use crate::store::VoiceRate;
use crate::ws::{accept, open_door, take_slot};

/// Output tokens of a reply for speech: two or three sentences.
const REPLY_MAX_TOKENS: u64 = 200;
/// Requests stored and waiting for their reply to be spoken, per connection; a client further
/// ahead is not read until one is answered.
const QUEUED: usize = 16;
/// The rate limit's window.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
pub(super) struct VoiceQuery {
    role: Option<String>,
    token: Option<String>,
}

/// `GET /ws/session/{session_id}`: the room socket's door (origin, token for this session,
/// role, connection limits), then the upgrade. A session that does not exist is no refusal
/// here: each request is answered "the session has expired", as the voice backend did.
pub(super) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<ClientAddr>,
    Path(session_id): Path<String>,
    Query(q): Query<VoiceQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let sid = checked_sid(Some(&session_id))?.to_owned();
    let door = open_door(&shared, client, &headers, q.token.as_deref(), Some(&sid))?;
    let conn = shared
        .ingress
        .conn(&sid, &door.grant, q.role)
        .map_err(ApiError::for_conn)?
        .with_addr(client.0)
        .with_budget(shared.ingress.connection_budget())
        .require_room();
    let slot = take_slot(&shared, Some(&sid), client)?;
    let ws = accept(&shared, &door, ws)?;
    let expires = door.grant.deadline();
    let conn_id = shared.next_conn_id();
    let tracker = shared.tracker.clone();
    let response = ws.on_upgrade(move |socket| async move {
        let span = tracing::info_span!("voice", room = %sid, conn = conn_id);
        let voice = Voice {
            locale: shared.dialects.locale,
            shared,
            conn,
            addr: client.0,
        };
        tracker.spawn(voice.run(socket, conn_id, expires, slot).instrument(span));
    });
    Ok(response.into_response())
}

/// One voice connection.
struct Voice {
    shared: Arc<Shared>,
    /// Who sends, in which session (bound to it for the connection's life).
    conn: Conn,
    locale: Locale,
    addr: IpAddr,
}

/// What the connection owes the client next, in request order.
enum Job {
    Answer(StreamId),
    Refuse(Trouble),
}

/// A refusal or failure, as the voice client is told.
#[derive(Debug, Clone)]
struct Trouble {
    sentence: Sentence,
    code: &'static str,
    turn: Option<StreamId>,
    /// For "too many requests": when the window has room again.
    retry_after: Option<Duration>,
}

impl Trouble {
    fn new(sentence: Sentence, code: ErrorCode) -> Self {
        Self {
            sentence,
            code: code.as_str(),
            turn: None,
            retry_after: None,
        }
    }

    fn of_turn(mut self, turn: StreamId) -> Self {
        self.turn = Some(turn);
        self
    }

    /// A refusal by the one way in, in the voice client's words.
    fn refused(error: &ClientError, max_chars: usize) -> Self {
        let sentence = match error.code {
            ErrorCode::EmptyText => Sentence::EmptyMessage,
            ErrorCode::TextTooLong | ErrorCode::FrameTooLarge => {
                Sentence::MessageTooLong { max: max_chars }
            }
            ErrorCode::InvalidEmotion => Sentence::InvalidEmotion,
            ErrorCode::NotFound | ErrorCode::SessionDeleted => Sentence::SessionExpired,
            ErrorCode::RateLimited | ErrorCode::RoomRateLimited => Sentence::TooManyRequests,
            ErrorCode::StoreUnavailable | ErrorCode::SlowConsumer | ErrorCode::Internal => {
                Sentence::ServiceUnavailable
            }
            _ => Sentence::InvalidFormat,
        };
        Self::new(sentence, error.code)
    }

    fn frame(&self, locale: Locale) -> String {
        let mut data = json!({"error": self.sentence.say(locale), "code": self.code});
        if let Some(turn) = self.turn {
            data["turn_id"] = json!(turn.to_string());
        }
        if let Some(wait) = self.retry_after {
            data["retry_after_ms"] = json!(wait.as_millis() as u64);
        }
        frame("ai_stream_error", data)
    }
}

fn frame(kind: &str, data: Value) -> String {
    json!({"type": kind, "data": data}).to_string()
}

/// The frame announcing a close the writer or the reader chose, if it needs one.
fn close_notice(close: Close, locale: Locale, max_chars: usize) -> Option<String> {
    let trouble = match close {
        Close::TokenExpired => Trouble::new(Sentence::SignInExpired, ErrorCode::TokenExpired),
        Close::RateLimitsIgnored => Trouble::new(Sentence::TooManyRequests, ErrorCode::RateLimited),
        Close::FrameTooBig => Trouble::new(
            Sentence::MessageTooLong { max: max_chars },
            ErrorCode::FrameTooLarge,
        ),
        Close::Shutdown | Close::StoreUnavailable | Close::SlowConsumer => {
            Trouble::new(Sentence::ServiceUnavailable, ErrorCode::StoreUnavailable)
        }
        _ => return None,
    };
    Some(trouble.frame(locale))
}

impl Voice {
    async fn run(
        self,
        socket: WebSocket,
        conn_id: ConnId,
        expires: Option<tokio::time::Instant>,
        _slot: MemberSlot,
    ) {
        let shared = self.shared.clone();
        // A voice client is in the room's live presence like any member, while it is connected.
        let me = Member {
            role: self.conn.default_role().to_owned(),
            sub: self.conn.sender().map(str::to_owned),
        };
        let _present = shared.presence.enter(self.conn.sid(), conn_id, me).await;
        let (locale, max_chars) = (self.locale, shared.session.limits.max_text_chars);
        let notice = move |close| close_notice(close, locale, max_chars);
        socket::serve(socket, &shared, expires, notice, |link| self.read(link)).await;
    }

    /// Reads requests until the client leaves; a task of its own answers them in order.
    async fn read(mut self, mut link: Link) -> (Link, Close) {
        let (jobs, queue) = mpsc::channel::<Job>(QUEUED);
        let mut answering = JoinSet::new();
        answering.spawn(
            answer_in_order(
                self.shared.clone(),
                self.conn.sid().to_owned(),
                queue,
                link.out.clone(),
                self.locale,
            )
            .in_current_span(),
        );
        let close = loop {
            let text = match link.next().await {
                Incoming::Gone => break Close::Normal,
                Incoming::TooBig => break Close::FrameTooBig,
                Incoming::Text(text) => Some(text),
                Incoming::Binary => None,
            };
            // Paid for every frame, valid or not, before anything else.
            let admitted = self.shared.ingress.admit(&mut self.conn);
            if admitted.as_ref().is_err_and(|refused| refused.abusive) {
                tracing::warn!(addr = %self.addr, "closing a client that ignores rate limits");
                break Close::RateLimitsIgnored;
            }
            // A request is only stored once its answer has a place in the queue.
            let permit = tokio::select! {
                _ = link.stopped() => break Close::Normal,
                permit = jobs.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break Close::Normal,
                },
            };
            let job = match (admitted, text) {
                (Err(_), _) => Job::Refuse(Trouble::new(
                    Sentence::TooManyRequests,
                    ErrorCode::RateLimited,
                )),
                (Ok(()), None) => Job::Refuse(Trouble::new(
                    Sentence::InvalidFormat,
                    ErrorCode::BinaryUnsupported,
                )),
                (Ok(()), Some(text)) => match self.request(text.as_str()).await {
                    Ok(turn) => Job::Answer(turn),
                    Err(Refusal::Tell(trouble)) => Job::Refuse(trouble),
                    Err(Refusal::Close(close)) => break close,
                },
            };
            permit.send(job);
        };
        // The answers of requests already queued are dropped with the socket; their turns go
        // on in the room.
        answering.abort_all();
        (link, close)
    }

    /// Checks and stores one request; its turn's id.
    async fn request(&mut self, text: &str) -> Result<StreamId, Refusal> {
        let limits = &self.shared.session.limits;
        let max_chars = limits.max_text_chars;
        let tell = |sentence, code| Refusal::Tell(Trouble::new(sentence, code));
        check_frame(text, limits).map_err(|e| Refusal::Tell(Trouble::refused(&e, max_chars)))?;
        let Ok(Value::Object(mut frame)) = serde_json::from_str::<Value>(text) else {
            return Err(tell(Sentence::InvalidFormat, ErrorCode::BadJson));
        };
        match frame.get("type").and_then(Value::as_str) {
            Some("request_ai_response") => {}
            Some(_) => return Err(tell(Sentence::UnknownType, ErrorCode::UnknownEvent)),
            None => return Err(tell(Sentence::InvalidFormat, ErrorCode::InvalidHeader)),
        }
        let Some(Value::Object(mut data)) = frame.remove("data") else {
            return Err(tell(Sentence::InvalidFormat, ErrorCode::InvalidBody));
        };
        let message = match data.remove("message") {
            Some(Value::String(m)) => m,
            None | Some(Value::Null) => String::new(), // the relay says "empty"
            Some(_) => return Err(tell(Sentence::InvalidFormat, ErrorCode::InvalidBody)),
        };
        let emotion = data.remove("emotion").unwrap_or(Value::Null);
        let timestamp = data.remove("timestamp").unwrap_or(Value::Null);
        // The relay's own rules for a request: message, then emotion.
        let envelope = json!({
            "hd": {"event": "llm.request"},
            "bd": {"text": message, "emotion": emotion, "timestamp": timestamp},
        });
        let mut inbound = parse_client_frame(&envelope.to_string(), limits)
            .map_err(|r| Refusal::Tell(Trouble::refused(&r.error, max_chars)))?;
        if !(timestamp.is_null() || timestamp.is_u64()) {
            return Err(tell(Sentence::InvalidTimestamp, ErrorCode::InvalidBody));
        }
        inbound.extra = voice_header();

        let sid = self.conn.sid().to_owned();
        let per_minute = self.shared.dialects.voice_requests_per_minute;
        match self
            .shared
            .store
            .voice_request(&sid, per_minute, WINDOW)
            .await
        {
            Ok(VoiceRate::Counted) => {}
            Ok(VoiceRate::NoSession) => {
                return Err(tell(Sentence::SessionExpired, ErrorCode::NotFound));
            }
            Ok(VoiceRate::Limited { retry_after }) => {
                crate::metrics::error(ErrorCode::RateLimited.as_str());
                let mut trouble = Trouble::new(Sentence::TooManyRequests, ErrorCode::RateLimited);
                trouble.retry_after = Some(retry_after);
                return Err(Refusal::Tell(trouble));
            }
            Err(err) => {
                tracing::warn!(cause = %err, "cannot count a voice request");
                return Err(tell(
                    Sentence::ServiceUnavailable,
                    ErrorCode::StoreUnavailable,
                ));
            }
        }
        let refused = |r: crate::ingress::Refused| {
            if r.abusive {
                Refusal::Close(Close::RateLimitsIgnored)
            } else {
                Refusal::Tell(Trouble::refused(&r.error, max_chars))
            }
        };
        let submission = self
            .shared
            .ingress
            .submit(&mut self.conn, inbound)
            .map_err(refused)?;
        match self
            .shared
            .submit_detached(submission)
            .await
            .map_err(refused)?
        {
            Submitted::Stored { id, .. } => {
                tracing::info!(turn = %id, "voice request stored");
                Ok(id)
            }
            Submitted::Transient { .. } => {
                Err(tell(Sentence::ServiceUnavailable, ErrorCode::Internal))
            }
        }
    }
}

/// Why a request got no turn.
enum Refusal {
    Tell(Trouble),
    Close(Close),
}

/// The header fields the voice dialect sets on the requests it stores.
fn voice_header() -> Map<String, Value> {
    let mut hd = Map::new();
    hd.insert("dialect".into(), json!("voice"));
    hd.insert("max_tokens".into(), json!(REPLY_MAX_TOKENS));
    hd
}

/// Answers the connection's requests one after the other, as long as the socket is there.
async fn answer_in_order(
    shared: Arc<Shared>,
    sid: String,
    mut queue: mpsc::Receiver<Job>,
    out: Outbox,
    locale: Locale,
) {
    while let Some(job) = queue.recv().await {
        let sent = match job {
            Job::Refuse(trouble) => out.send(trouble.frame(locale)).await,
            Job::Answer(turn) => answer(&shared, &sid, turn, &out, locale).await,
        };
        if !sent {
            return;
        }
    }
}

/// Speaks one turn: begin, chunks, then complete or an error. `false` once the socket is gone.
async fn answer(shared: &Shared, sid: &str, turn: StreamId, out: &Outbox, locale: Locale) -> bool {
    let id = turn.to_string();
    if !out
        .send(frame("ai_stream_begin", json!({"turn_id": id})))
        .await
    {
        return false;
    }
    let deadline = Instant::now() + shared.api.chat_timeout;
    let mut reader = match shared.follow_turn(sid, turn).await {
        Ok(reader) => reader,
        Err(end) => return out.send(ended(end).of_turn(turn).frame(locale)).await,
    };
    loop {
        let step = match tokio::time::timeout_at(deadline, reader.next()).await {
            Err(_) => {
                let trouble = Trouble::new(Sentence::AiTimeout, ErrorCode::LlmTimeout);
                return out.send(trouble.of_turn(turn).frame(locale)).await;
            }
            Ok(Err(end)) => return out.send(ended(end).of_turn(turn).frame(locale)).await,
            Ok(Ok(None)) => return true,
            Ok(Ok(Some(step))) => step,
        };
        let frame = match step {
            TurnStep::Text(chunk) => {
                frame("ai_stream_chunk", json!({"chunk": chunk, "turn_id": id}))
            }
            TurnStep::Restart { attempt } => frame(
                "ai_stream_begin",
                json!({"turn_id": id, "restart": true, "attempt": attempt}),
            ),
            TurnStep::Done(reply) => frame(
                "ai_stream_complete",
                json!({
                    "turn_id": id,
                    "message_id": reply.id.to_string(),
                    "reason": reply.reason,
                    "usage": usage_counts(&reply.usage),
                }),
            ),
            TurnStep::Failed(failure) => {
                let code = failure.error_code();
                let sentence = match code {
                    ErrorCode::RateLimited => Sentence::TooManyRequests,
                    ErrorCode::LlmTimeout => Sentence::AiTimeout,
                    _ => Sentence::AiUnavailable,
                };
                Trouble::new(sentence, code).of_turn(turn).frame(locale)
            }
        };
        if !out.send(frame).await {
            return false;
        }
    }
}

/// A reply the room could not bring to its end.
fn ended(end: CursorEnd) -> Trouble {
    match end {
        CursorEnd::Deleted => Trouble::new(Sentence::SessionExpired, ErrorCode::SessionDeleted),
        CursorEnd::Slow => Trouble::new(Sentence::ServiceUnavailable, ErrorCode::SlowConsumer),
        CursorEnd::Store(err) => {
            tracing::warn!(cause = %err, "voice: cannot read the room");
            Trouble::new(Sentence::ServiceUnavailable, ErrorCode::StoreUnavailable)
        }
    }
}
