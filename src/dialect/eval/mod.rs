//! The evaluation chatbot's dialect: `ws://HOST/chat[?role=A][&token=JWT]`.
//!
//! In: `{"session_id", "message", "turn_id"?}` asks for a reply; `{"type": "cancel", "turn_id"}`
//! stops one. Out: `{"type": "delta", "content", "turn_id"}` per piece of the reply, then
//! `{"type": "done", "turn_id", "message_id", "usage": {"prompt_tokens", "completion_tokens",
//! "total_tokens"}, "reason"}` (`stop`, `length`, `cancelled`), or `{"type": "error", "turn_id",
//! "code", "message"}` with a code from the error catalogue. In the rare case that a worker died
//! mid-reply and the next one's text differs, `{"type": "restart", "turn_id", "attempt"}` says
//! to drop what the deltas brought so far.
//!
//! A connection is not bound to one session: every request names its own, checked against the
//! connection's token like a room socket's (`--auth jwt`), and must exist. The request goes in
//! through the one way in as an `llm.request` with `hd.dialect: "eval"`; its `turn_id` (chosen
//! by the client, or the relay's turn id when absent) becomes the envelope's `hd.cid` (`turn:` +
//! id), so the relay's idempotent append is the map from the client's turn id to the relay's
//! turn: a resend with a turn id already used in that session, by the same sender, on any node,
//! within `--dedup-window-secs`, stores nothing and starts no second LLM call — the client gets
//! that turn's reply from where it is (catch-up), or whole with its `done` again. A cancel is an
//! `llm.cancel` through the same path (only the requester may cancel).
//!
//! Replies stream concurrently (each turn has its own reader, at most [`MAX_FOLLOWING`] per
//! connection); every frame carries its `turn_id`.

mod reply;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::socket::{self, Incoming, Link, Outbox};
use crate::http::ApiError;
use crate::ingress::{Conn, Refused, Submitted};
use crate::limits::MemberSlot;
use crate::net::ClientAddr;
use crate::protocol::{
    check_frame, parse_client_frame, valid_sid, ClientError, Close, ErrorCode, Inbound, StreamId,
};
use crate::state::Shared;
use crate::ws::{accept, open_door, take_slot};
use reply::stream_reply;

/// Replies streaming at once on one connection.
const MAX_FOLLOWING: usize = 8;
/// Turns a connection remembers for cancels, the oldest forgotten first.
const TURNS_KEPT: usize = 256;
/// Sessions a connection keeps its sending context for.
const ROOMS_KEPT: usize = 16;
/// Longest client turn id, in bytes (it travels as `hd.cid`, at most 128 bytes with its prefix).
const MAX_TURN_ID_BYTES: usize = 100;
/// The room of the connection's frame budget, which no frame is stored in.
const GATE: &str = "-";

#[derive(Debug, Deserialize)]
pub(super) struct EvalQuery {
    role: Option<String>,
    token: Option<String>,
}

/// `GET /chat`: the room socket's door — origin, a valid token (each request's session is
/// checked against it later), role, the address's connection limit — then the upgrade.
pub(super) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<ClientAddr>,
    Query(q): Query<EvalQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let door = open_door(&shared, client, &headers, q.token.as_deref(), None)?;
    let gate = shared
        .ingress
        .conn(GATE, &door.grant, q.role.clone())
        .map_err(ApiError::for_conn)?
        .with_addr(client.0)
        .with_budget(shared.ingress.connection_budget());
    let slot = take_slot(&shared, None, client)?;
    let ws = accept(&shared, &door, ws)?;
    let expires = door.grant.deadline();
    let conn_id = shared.next_conn_id();
    let tracker = shared.tracker.clone();
    let response = ws.on_upgrade(move |socket| async move {
        let span = tracing::info_span!("eval", conn = conn_id);
        let eval = Eval {
            shared,
            token: door.token,
            role: q.role,
            addr: client.0,
            gate,
            rooms: HashMap::new(),
            turns: Turns::default(),
            following: HashSet::new(),
            tasks: JoinSet::new(),
        };
        tracker.spawn(eval.run(socket, expires, slot).instrument(span));
    });
    Ok(response.into_response())
}

/// One evaluation connection.
struct Eval {
    shared: Arc<Shared>,
    /// The connection's token, checked again for every session a request names.
    token: Option<String>,
    role: Option<String>,
    addr: IpAddr,
    /// The connection's frame budget: every frame pays, whatever session it names.
    gate: Conn,
    /// Who sends in each session the connection used.
    rooms: HashMap<String, Conn>,
    turns: Turns,
    /// Replies streaming now.
    following: HashSet<(String, StreamId)>,
    tasks: JoinSet<Followed>,
}

/// A turn asked for on this connection.
#[derive(Debug, Clone)]
struct Asked {
    sid: String,
    turn: StreamId,
    /// Its `turn_id` as the client sent it (or the relay's id), echoed in every frame.
    echo: Value,
    ended: bool,
}

/// The connection's turns by the client's turn id, bounded.
#[derive(Debug, Default)]
struct Turns {
    by_id: HashMap<String, Asked>,
    order: VecDeque<String>,
}

impl Turns {
    fn insert(&mut self, key: String, asked: Asked) {
        if self.by_id.insert(key.clone(), asked).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > TURNS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    fn ended(&mut self, sid: &str, turn: StreamId) {
        for asked in self.by_id.values_mut() {
            if asked.turn == turn && asked.sid == sid {
                asked.ended = true;
            }
        }
    }
}

/// A reply's stream that ended; `ended` when it reached the turn's end (done or error).
struct Followed {
    sid: String,
    turn: StreamId,
    ended: bool,
}

/// Why a frame got no further.
enum Fail {
    /// An error frame for the turn the frame named (or null).
    Tell(Value, ClientError),
    Close(Close),
}

impl Fail {
    fn from_refused(turn_id: &Value, r: Refused) -> Self {
        if r.abusive {
            Fail::Close(Close::RateLimitsIgnored)
        } else {
            Fail::Tell(turn_id.clone(), r.error)
        }
    }
}

fn error_frame(turn_id: &Value, error: &ClientError) -> String {
    json!({
        "type": "error",
        "turn_id": turn_id,
        "code": error.code.as_str(),
        "message": error.message,
    })
    .to_string()
}

fn invalid(code: ErrorCode, message: &'static str) -> ClientError {
    ClientError::new(code, message)
}

/// The client's turn id as a key: a string of 1–100 bytes, or an integer; `None` when absent.
fn turn_key(turn_id: &Value) -> Result<Option<String>, ClientError> {
    match turn_id {
        Value::Null => Ok(None),
        Value::String(s) if !s.is_empty() && s.len() <= MAX_TURN_ID_BYTES => Ok(Some(s.clone())),
        Value::Number(n) if n.is_u64() || n.is_i64() => Ok(Some(n.to_string())),
        _ => Err(invalid(
            ErrorCode::InvalidBody,
            "turn_id must be a string of 1-100 bytes (or an integer)",
        )),
    }
}

/// A session id from a frame.
fn session_id(frame: &Map<String, Value>) -> Result<String, ClientError> {
    match frame.get("session_id") {
        Some(Value::String(s)) if valid_sid(s) => Ok(s.clone()),
        None | Some(Value::Null) => Err(invalid(
            ErrorCode::InvalidSid,
            "session_id is missing: create a session with POST /api/sessions first",
        )),
        Some(_) => Err(invalid(
            ErrorCode::InvalidSid,
            "session_id must be 1-128 characters of A-Z a-z 0-9 . _ -",
        )),
    }
}

/// The header fields this dialect sets on what it stores.
fn eval_header() -> Map<String, Value> {
    let mut hd = Map::new();
    hd.insert("dialect".into(), json!("eval"));
    hd
}

impl Eval {
    async fn run(
        self,
        socket: WebSocket,
        expires: Option<tokio::time::Instant>,
        _slot: MemberSlot,
    ) {
        let shared = self.shared.clone();
        let max_bytes = shared.session.limits.max_frame_bytes;
        let notice = move |close: Close| {
            let error = match close {
                Close::FrameTooBig => ClientError::new(
                    ErrorCode::FrameTooLarge,
                    format!("frame too large (max {max_bytes} bytes)"),
                ),
                other => other.notice()?,
            };
            Some(error_frame(&Value::Null, &error))
        };
        socket::serve(socket, &shared, expires, notice, |link| self.read(link)).await;
    }

    async fn read(mut self, mut link: Link) -> (Link, Close) {
        let close = loop {
            tokio::select! {
                incoming = link.next() => {
                    let text = match incoming {
                        Incoming::Gone => break Close::Normal,
                        Incoming::TooBig => break Close::FrameTooBig,
                        Incoming::Text(text) => Some(text),
                        Incoming::Binary => None,
                    };
                    let handled = match self.shared.ingress.admit(&mut self.gate) {
                        Err(refused) => Err(Fail::from_refused(&Value::Null, refused)),
                        Ok(()) => match text {
                            Some(text) => self.frame(text.as_str(), &link.out).await,
                            None => Err(Fail::Tell(Value::Null, invalid(
                                ErrorCode::BinaryUnsupported,
                                "binary frames are not supported; send JSON text frames",
                            ))),
                        },
                    };
                    match handled {
                        Ok(()) => {}
                        Err(Fail::Close(close)) => break close,
                        Err(Fail::Tell(turn_id, error)) => {
                            tracing::debug!(code = error.code.as_str(), "refused");
                            crate::metrics::error(error.code.as_str());
                            if !link.out.send(error_frame(&turn_id, &error)).await {
                                break Close::Normal;
                            }
                        }
                    }
                }
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Ok(done) = done {
                        self.following.remove(&(done.sid.clone(), done.turn));
                        if done.ended {
                            self.turns.ended(&done.sid, done.turn);
                        }
                    }
                }
            }
        };
        // The replies stop streaming here; their turns go on in the room.
        self.tasks.abort_all();
        (link, close)
    }

    async fn frame(&mut self, text: &str, out: &Outbox) -> Result<(), Fail> {
        let limits = &self.shared.session.limits;
        check_frame(text, limits).map_err(|e| Fail::Tell(Value::Null, e))?;
        let frame = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(frame)) => frame,
            Ok(_) => {
                return Err(Fail::Tell(
                    Value::Null,
                    invalid(
                        ErrorCode::NotObject,
                        "send an object: {\"session_id\", \"message\", \"turn_id\"} or {\"type\": \"cancel\", \"turn_id\"}",
                    ),
                ))
            }
            Err(_) => {
                return Err(Fail::Tell(
                    Value::Null,
                    invalid(ErrorCode::BadJson, "frame is not valid JSON"),
                ))
            }
        };
        let turn_id = frame.get("turn_id").cloned().unwrap_or(Value::Null);
        match frame.get("type") {
            None | Some(Value::Null) => self.request(&frame, turn_id, out).await,
            Some(Value::String(t)) if t == "cancel" => self.cancel(&frame, turn_id, out).await,
            Some(_) => Err(Fail::Tell(
                turn_id,
                invalid(
                    ErrorCode::UnknownEvent,
                    "unknown type: send {\"session_id\", \"message\", \"turn_id\"} to ask, {\"type\": \"cancel\", \"turn_id\"} to stop",
                ),
            )),
        }
    }

    /// Stores the request (or finds its turn, for a resend) and streams its reply.
    async fn request(
        &mut self,
        frame: &Map<String, Value>,
        turn_id: Value,
        out: &Outbox,
    ) -> Result<(), Fail> {
        let tell = |error| Fail::Tell(turn_id.clone(), error);
        let key = turn_key(&turn_id).map_err(tell)?;
        let sid = session_id(frame).map_err(tell)?;
        let message = match frame.get("message") {
            Some(Value::String(m)) => m,
            None | Some(Value::Null) => {
                return Err(tell(invalid(ErrorCode::EmptyText, "message is missing")))
            }
            Some(_) => {
                return Err(tell(invalid(
                    ErrorCode::InvalidBody,
                    "message must be a string",
                )))
            }
        };
        let mut hd = json!({"event": "llm.request"});
        if let Some(key) = &key {
            hd["cid"] = json!(format!("turn:{key}"));
        }
        let envelope = json!({"hd": hd, "bd": {"text": message}}).to_string();
        let mut inbound = parse_client_frame(&envelope, &self.shared.session.limits)
            .map_err(|r| tell(r.error))?;
        inbound.extra = eval_header();
        if self.following.len() >= MAX_FOLLOWING {
            return Err(tell(invalid(
                ErrorCode::RateLimited,
                "too many replies streaming on this connection; wait for one to finish",
            )));
        }
        let stored = self.submit(&sid, inbound, &turn_id).await?;
        let Submitted::Stored { id, duplicate, .. } = stored else {
            return Err(tell(invalid(
                ErrorCode::Internal,
                "the message was not stored",
            )));
        };
        tracing::info!(room = %sid, turn = %id, duplicate, "eval request");
        let (key, echo) = match key {
            Some(key) => (key, turn_id),
            None => (id.to_string(), json!(id.to_string())),
        };
        let asked = Asked {
            sid,
            turn: id,
            echo,
            ended: false,
        };
        self.turns.insert(key, asked.clone());
        self.follow(asked, out);
        Ok(())
    }

    /// Stores an `llm.cancel` for a turn asked on this connection (or, with `session_id`, for
    /// a relay turn id), and streams the turn's end to this client.
    async fn cancel(
        &mut self,
        frame: &Map<String, Value>,
        turn_id: Value,
        out: &Outbox,
    ) -> Result<(), Fail> {
        let tell = |error| Fail::Tell(turn_id.clone(), error);
        let Some(key) = turn_key(&turn_id).map_err(tell)? else {
            return Err(tell(invalid(
                ErrorCode::InvalidBody,
                "cancel needs the turn_id of the reply to stop",
            )));
        };
        let asked = match self.turns.by_id.get(&key) {
            Some(asked) if asked.ended => {
                return Err(tell(ClientError::new(
                    ErrorCode::NotFound,
                    format!("turn {key} has already ended"),
                )))
            }
            Some(asked) => asked.clone(),
            None => match (session_id(frame), key.parse::<StreamId>()) {
                (Ok(sid), Ok(turn)) => Asked {
                    sid,
                    turn,
                    echo: turn_id.clone(),
                    ended: false,
                },
                _ => {
                    return Err(tell(ClientError::new(
                        ErrorCode::NotFound,
                        format!("no turn {key} on this connection: resend its request (same turn_id) to follow it, then cancel"),
                    )))
                }
            },
        };
        let envelope = json!({
            "hd": {"event": "llm.cancel"},
            "bd": {"turn_id": asked.turn.to_string()},
        });
        let mut inbound = parse_client_frame(&envelope.to_string(), &self.shared.session.limits)
            .map_err(|r| tell(r.error))?;
        inbound.extra = eval_header();
        self.submit(&asked.sid, inbound, &turn_id).await?;
        tracing::info!(room = %asked.sid, turn = %asked.turn, "eval cancel");
        self.follow(asked, out);
        Ok(())
    }

    /// Through the one way in, as who sends in session `sid`.
    async fn submit(
        &mut self,
        sid: &str,
        inbound: Inbound,
        turn_id: &Value,
    ) -> Result<Submitted, Fail> {
        let shared = self.shared.clone();
        let conn = self.room(sid).map_err(|e| Fail::Tell(turn_id.clone(), e))?;
        let submission = shared
            .ingress
            .submit(conn, inbound)
            .map_err(|r| Fail::from_refused(turn_id, r))?;
        shared
            .submit_detached(submission)
            .await
            .map_err(|r| Fail::from_refused(turn_id, r))
    }

    /// Who sends in session `sid`: the token checked for it once, then kept.
    fn room(&mut self, sid: &str) -> Result<&mut Conn, ClientError> {
        if !self.rooms.contains_key(sid) {
            let grant = self
                .shared
                .auth
                .authorize(self.token.as_deref(), sid)
                .map_err(|denied| denied.error)?;
            let conn = self
                .shared
                .ingress
                .conn(sid, &grant, self.role.clone())?
                .with_addr(self.addr)
                .require_room();
            if self.rooms.len() >= ROOMS_KEPT {
                let old = self.rooms.keys().next().cloned();
                if let Some(old) = old {
                    self.rooms.remove(&old);
                }
            }
            self.rooms.insert(sid.to_owned(), conn);
        }
        self.rooms
            .get_mut(sid)
            .ok_or_else(|| invalid(ErrorCode::Internal, "the session could not be used"))
    }

    /// Streams a turn's reply to the client, unless it streams already.
    fn follow(&mut self, asked: Asked, out: &Outbox) {
        if !self.following.insert((asked.sid.clone(), asked.turn)) {
            return;
        }
        let task = stream_reply(self.shared.clone(), asked, out.clone()).in_current_span();
        self.tasks.spawn(task);
    }
}
