//! The one way in: every envelope a client sends — over the WebSocket, `POST .../messages`, and
//! the adapters to come (sessions API, dialect WebSockets) — goes through [`Ingress`].
//!
//! An adapter builds a [`Conn`] once per connection (or request) with [`Ingress::conn`], then for
//! every frame calls [`Ingress::submit_text`] (relay protocol), or [`Ingress::admit`], its own
//! translation to an [`Inbound`], and [`Ingress::submit`] (other dialects). Adapters only
//! translate; the rules live here:
//!
//! 1. the client's budget, charged for every frame, valid or not, so garbage floods are limited;
//! 2. dispatch: role resolution and what the event means ([`crate::dispatch`], pure);
//! 3. the room's budget, keyed by room id whether or not the room has members on this node;
//! 4. the I/O: append (idempotent on the sender's `cid`) then the cancel signal, or the
//!    transient publish.
//!
//! Steps 1–3 run synchronously when the frame is submitted, so budgets are charged in frame
//! order; step 4 is the returned [`Submission`], which the WebSocket reader keeps in flight
//! (up to `--send-window` per socket, acked in order) while it reads on.

mod budget;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use budget::ClientBudget;
use budget::{quota, RoomBudgets};

use crate::auth::Grant;
use crate::config::{CancelPolicy, ConfigError};
use crate::dispatch::{dispatch, Action, ConnCtx, RolePolicy, StoreEnvelope};
use crate::protocol::{parse_client_frame, ClientError, ErrorCode, Inbound, Limits, StreamId};
use crate::store::{Appended, Store, StoreError};

/// How often room budgets that refilled are forgotten.
const EVICT_EVERY: Duration = Duration::from_secs(10);

/// Message budgets as configured (`--msgs-*`, `--room-msgs-*`, `--abuse-strikes`).
#[derive(Debug, Clone)]
pub(crate) struct BudgetSettings {
    pub(crate) msgs_per_sec: f64,
    pub(crate) msgs_burst: f64,
    pub(crate) room_msgs_per_sec: f64,
    pub(crate) room_msgs_burst: f64,
    pub(crate) abuse_strikes: u32,
}

/// The submit path and its state (one per relay).
#[derive(Debug)]
pub(crate) struct Ingress {
    store: Store,
    roles: RolePolicy,
    limits: Limits,
    rooms: RoomBudgets,
    client_quota: Quota,
    abuse_strikes: u32,
    cancel_policy: CancelPolicy,
}

/// Who is sending, as an adapter established it for one connection or request.
#[derive(Debug)]
pub(crate) struct Conn {
    ctx: ConnCtx,
    /// The room id as the room-budget key (cloning it costs no allocation per frame).
    room_key: Arc<str>,
    /// The client's address, for logs and (issue 11) per-address budgets.
    addr: Option<IpAddr>,
    budget: ClientBudget,
    /// Rate-limit refusals in a row.
    strikes: u32,
    /// Appends only to a room that exists (checked in the append script): for every adapter
    /// under `--require-session`, and for the chat API, which speaks to sessions only.
    existing_room: bool,
}

impl Conn {
    pub(crate) fn sid(&self) -> &str {
        &self.ctx.sid
    }

    /// The token subject, when authenticated.
    pub(crate) fn sender(&self) -> Option<&str> {
        self.ctx.sender.as_deref()
    }

    /// The role used when a frame names none (`?role=`, the token's role, or `user`).
    pub(crate) fn default_role(&self) -> &str {
        &self.ctx.default_role
    }

    pub(crate) fn with_addr(mut self, addr: IpAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    pub(crate) fn with_budget(mut self, budget: ClientBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Stores only while the room exists; otherwise the frame is refused with `not_found`.
    pub(crate) fn require_room(mut self) -> Self {
        self.existing_room = true;
        self
    }
}

/// What a submitted frame did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// Appended to the room's stream (or, for a resent `cid`, found there: `duplicate`).
    Stored {
        id: StreamId,
        cid: Option<String>,
        duplicate: bool,
    },
    /// A transient frame (typing) went to the room's live channel, or could not (`published`
    /// false; best effort, so the WebSocket does not report it).
    Transient { published: bool },
}

/// A frame the relay will not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) error: ClientError,
    /// The frame's `hd.cid`, when it could be read.
    pub(crate) cid: Option<String>,
    /// The client ignored rate limits `--abuse-strikes` times in a row: a connection ends
    /// ([`crate::protocol::Close::RateLimitsIgnored`]); a request just gets the error.
    pub(crate) abusive: bool,
}

impl Refused {
    fn new(error: ClientError, cid: Option<String>) -> Self {
        Self {
            error,
            cid,
            abusive: false,
        }
    }
}

/// The I/O half of a submit. Owns what it needs, so many can be in flight per connection.
pub(crate) type Submission = Pin<Box<dyn Future<Output = Result<Submitted, Refused>> + Send>>;

impl Ingress {
    pub(crate) fn new(
        store: Store,
        roles: RolePolicy,
        limits: Limits,
        budgets: &BudgetSettings,
    ) -> Result<Self, ConfigError> {
        let client_quota = quota(budgets.msgs_per_sec, budgets.msgs_burst)
            .ok_or(ConfigError::Zero("--msgs-per-sec and --msgs-burst"))?;
        let room_quota = quota(budgets.room_msgs_per_sec, budgets.room_msgs_burst).ok_or(
            ConfigError::Zero("--room-msgs-per-sec and --room-msgs-burst"),
        )?;
        Ok(Self {
            store,
            roles,
            limits,
            rooms: RoomBudgets::new(room_quota),
            client_quota,
            abuse_strikes: budgets.abuse_strikes,
            cancel_policy: CancelPolicy::Requester,
        })
    }

    /// Who may cancel an LLM turn (`--llm-cancel`).
    pub(crate) fn with_cancel_policy(mut self, policy: CancelPolicy) -> Self {
        self.cancel_policy = policy;
        self
    }

    /// Keeps the room-budget map small: a task on `tracker` that forgets refilled buckets.
    pub(crate) fn spawn_eviction(&self, tracker: &TaskTracker, token: CancellationToken) {
        let rooms = self.rooms.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(EVICT_EVERY);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => rooms.evict_idle(),
                }
            }
        });
    }

    /// A connection's (or request's) sending context. `asked` is the role the client asked for
    /// (`?role=`); a token's role binds the connection and must not contradict it.
    pub(crate) fn conn(
        &self,
        sid: &str,
        grant: &Grant,
        asked: Option<String>,
    ) -> Result<Conn, ClientError> {
        let default_role = match (&grant.role, asked.filter(|r| !r.is_empty())) {
            (Some(bound), Some(asked)) if *bound != asked => {
                return Err(ClientError::new(
                    ErrorCode::RoleMismatch,
                    "the token grants another role than ?role= asks for",
                ))
            }
            (Some(bound), _) => Some(bound.clone()),
            (None, Some(asked)) => {
                self.roles.check(&asked)?;
                Some(asked)
            }
            (None, None) => None,
        };
        let mut ctx = ConnCtx::new(sid, default_role);
        ctx.bound_role = grant.role.clone();
        ctx.sender = grant.sub.clone();
        Ok(Conn {
            ctx,
            room_key: sid.into(),
            addr: None,
            budget: ClientBudget::Unlimited,
            strikes: 0,
            existing_room: false,
        })
    }

    /// A fresh per-connection bucket (`--msgs-per-sec`, `--msgs-burst`).
    pub(crate) fn connection_budget(&self) -> ClientBudget {
        ClientBudget::own(self.client_quota)
    }

    /// A relay-protocol frame: [`Ingress::admit`], parse, [`Ingress::submit`].
    pub(crate) fn submit_text(&self, conn: &mut Conn, text: &str) -> Result<Submission, Refused> {
        self.admit(conn)?;
        let inbound = parse_client_frame(text, &self.limits).map_err(|refusal| {
            tracing::debug!(code = refusal.error.code.as_str(), addr = ?conn.addr, "refused frame");
            crate::metrics::error(refusal.error.code.as_str());
            Refused::new(refusal.error, refusal.cid)
        })?;
        self.submit(conn, inbound)
    }

    /// Charges one frame to the client's budget. Call it for every frame read, before
    /// parsing, so that frames which fail to parse are paid for too.
    pub(crate) fn admit(&self, conn: &mut Conn) -> Result<(), Refused> {
        if conn.budget.try_take() {
            return Ok(());
        }
        Err(self.rate_limited(
            conn,
            ClientError::new(ErrorCode::RateLimited, "too many messages; slow down"),
            None,
        ))
    }

    /// Dispatches an envelope, charges the room's budget for stored events, and returns the
    /// I/O to run.
    pub(crate) fn submit(&self, conn: &mut Conn, inbound: Inbound) -> Result<Submission, Refused> {
        let cid = inbound.cid.clone();
        let action = dispatch(inbound, &conn.ctx, &self.roles);
        if matches!(action, Ok(Action::Store(_))) && !self.rooms.try_take(&conn.room_key) {
            return Err(self.rate_limited(conn, ClientError::room_rate_limited(), cid));
        }
        conn.strikes = 0;
        match action {
            Err(error) => {
                tracing::debug!(code = error.code.as_str(), addr = ?conn.addr, "refused envelope");
                crate::metrics::error(error.code.as_str());
                Err(Refused::new(error, cid))
            }
            Ok(Action::Store(envelope)) => {
                let store = self.store.clone();
                let sid = conn.ctx.sid.clone();
                let sender = conn.ctx.sender.clone();
                let check_cancel = self.cancel_policy == CancelPolicy::Requester;
                let existing = conn.existing_room;
                Ok(Box::pin(async move {
                    if let (Some(turn), true) = (envelope.cancels, check_cancel) {
                        let who = Speaker {
                            role: &envelope.role,
                            sub: sender.as_deref(),
                        };
                        match may_cancel(&store, &sid, turn, who).await {
                            Ok(None) => {}
                            Ok(Some(error)) => {
                                crate::metrics::error(error.code.as_str());
                                return Err(Refused::new(error, envelope.cid));
                            }
                            Err(err) => {
                                tracing::warn!(room = %sid, cause = %err, "cannot check who may cancel");
                                crate::metrics::error(ErrorCode::StoreUnavailable.as_str());
                                return Err(Refused::new(
                                    ClientError::store_unavailable(),
                                    envelope.cid,
                                ));
                            }
                        }
                    }
                    let stored =
                        store_envelope(&store, &sid, sender.as_deref(), &envelope, existing).await;
                    match stored {
                        Ok(Some(appended)) => Ok(Submitted::Stored {
                            id: appended.id,
                            cid: envelope.cid,
                            duplicate: appended.duplicate,
                        }),
                        Ok(None) => {
                            crate::metrics::error(ErrorCode::NotFound.as_str());
                            Err(Refused::new(ClientError::no_session(&sid), envelope.cid))
                        }
                        Err(err) => {
                            tracing::warn!(room = %sid, cause = %err, "append failed");
                            crate::metrics::error(ErrorCode::StoreUnavailable.as_str());
                            Err(Refused::new(ClientError::store_unavailable(), envelope.cid))
                        }
                    }
                }))
            }
            Ok(Action::Publish { frame }) => {
                let store = self.store.clone();
                let sid = conn.ctx.sid.clone();
                Ok(Box::pin(async move {
                    let published = match store.publish_transient(&sid, &frame).await {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::debug!(room = %sid, cause = %err, "transient publish failed");
                            false
                        }
                    };
                    Ok(Submitted::Transient { published })
                }))
            }
        }
    }

    /// A refusal by a rate limit; `abusive` once the client collected enough strikes.
    fn rate_limited(&self, conn: &mut Conn, error: ClientError, cid: Option<String>) -> Refused {
        conn.strikes = conn.strikes.saturating_add(1);
        let abusive = conn.strikes >= self.abuse_strikes;
        if !abusive {
            tracing::debug!(code = error.code.as_str(), addr = ?conn.addr, "rate limited");
            crate::metrics::error(error.code.as_str());
        }
        Refused {
            error,
            cid,
            abusive,
        }
    }
}

/// Whether an entry may ask the LLM participant for an answer (`llm.request`, or a message that
/// mentions `@llm`); a wake-up for anything else only costs a worker an empty read.
fn asks_llm(envelope: &StoreEnvelope) -> bool {
    envelope.event == "llm.request"
        || (envelope.event == "chat.message" && envelope.body.to_ascii_lowercase().contains("@llm"))
}

/// Who sends an envelope: the role it speaks as and, when authenticated, the token subject.
#[derive(Debug, Clone, Copy)]
struct Speaker<'a> {
    role: &'a str,
    sub: Option<&'a str>,
}

/// Whether `who` may cancel `turn`: only who asked for it (the same token subject, or without
/// auth the same role). `Some(error)` refuses.
async fn may_cancel(
    store: &Store,
    sid: &str,
    turn: StreamId,
    who: Speaker<'_>,
) -> Result<Option<ClientError>, StoreError> {
    let request = store
        .range_after(sid, Some(turn.prev()), Some(turn), 1)
        .await?
        .into_iter()
        .find(|e| e.id == turn);
    let Some(request) = request else {
        return Ok(Some(ClientError::new(
            ErrorCode::NotFound,
            format!("there is no LLM turn {turn} in this room"),
        )));
    };
    let asked_by_sub = serde_json::from_str::<serde_json::Value>(&request.body)
        .ok()
        .and_then(|b| {
            b.pointer("/hd/sub")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        });
    let allowed = match (who.sub, asked_by_sub.as_deref()) {
        (Some(sub), Some(asker)) => sub == asker,
        (Some(_), None) | (None, Some(_)) => false,
        (None, None) => who.role == request.participant,
    };
    Ok((!allowed).then(|| {
        ClientError::new(
            ErrorCode::ForbiddenCancel,
            "only who asked for this reply can cancel it",
        )
    }))
}

/// Append (idempotent on the sender's `cid`; the sender is the token's subject, else the role),
/// then tell the LLM workers about a cancel. With `existing`, only to a room that exists
/// (`None`: it does not).
async fn store_envelope(
    store: &Store,
    sid: &str,
    sender: Option<&str>,
    envelope: &StoreEnvelope,
    existing: bool,
) -> Result<Option<Appended>, StoreError> {
    let sender = sender.unwrap_or(envelope.role.as_str());
    let dedup = envelope.cid.as_deref().map(|c| (sender, c));
    let (role, event, body) = (&envelope.role, envelope.event, &envelope.body);
    let appended = if existing {
        match store.append_existing(sid, role, event, body, dedup).await? {
            Some(appended) => appended,
            None => return Ok(None),
        }
    } else {
        store.append(sid, role, event, body, dedup).await?
    };
    if store.is_clustered() && asks_llm(envelope) {
        if let Err(err) = store.wake_llm(sid).await {
            tracing::debug!(room = %sid, cause = %err, "LLM wake-up not sent; a worker polls");
        }
    }
    if let Some(turn) = envelope.cancels {
        if let Err(err) = store.signal_cancel(sid, turn).await {
            tracing::warn!(room = %sid, cause = %err, "cancel stored but not signalled");
        }
    }
    Ok(Some(appended))
}
