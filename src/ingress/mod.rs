//! The one way in: every envelope a client sends — over the WebSocket, `POST .../messages`, and
//! the adapters to come (sessions API, dialect WebSockets) — goes through [`Ingress`].
//!
//! An adapter builds a [`Conn`] once per connection (or request) with [`Ingress::conn`], then for
//! every frame calls [`Ingress::submit_text`] (relay protocol), or [`Ingress::admit`], its own
//! translation to an [`Inbound`], and [`Ingress::submit`] (other dialects). Adapters only
//! translate; the rules live here:
//!
//! 1. the client's budget, charged for every frame, valid or not, so garbage floods are limited
//!    (a connection's own bucket, or for requests one bucket per client shared by all its
//!    requests: see [`budget`]);
//! 2. dispatch: role resolution and what the event means ([`crate::dispatch`], pure);
//! 3. the room's budget, keyed by room id whether or not the room has members on this node, in
//!    the lane of the client's kind ([`Lane`]);
//! 4. the I/O: append (idempotent on the sender's `cid`; an append that would create the room
//!    is charged to the client's room-creation budget first) then the cancel signal, or the
//!    transient publish ([`append`]).
//!
//! Presence entries (`session.join`/`session.leave`) and handshakes are budgeted here too
//! ([`Ingress::admit_handshake`], [`Ingress::admit_join`], [`Ingress::record_presence`]), so
//! connect/close churn is limited like messages.
//!
//! Steps 1–3 run synchronously when the frame is submitted, so budgets are charged in frame
//! order; step 4 is the returned [`Submission`], which the WebSocket reader keeps in flight
//! (up to `--send-window` per socket, acked in order) while it reads on.

mod append;
mod budget;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use append::AppendRefused;
use append::{or_create, StoreJob};
pub(crate) use budget::ClientBudget;
use budget::{quota, Buckets, ClientKey, Lane};

use crate::auth::Grant;
use crate::config::{CancelPolicy, ConfigError};
use crate::dispatch::{dispatch, Action, ConnCtx, RolePolicy};
use crate::protocol::{parse_client_frame, ClientError, ErrorCode, Inbound, Limits, StreamId};
use crate::store::Store;

/// How often buckets that refilled are forgotten.
const EVICT_EVERY: Duration = Duration::from_secs(10);
/// Clients (and addresses) with a bucket of their own, at most, per map; more share one.
const MAX_TRACKED_CLIENTS: usize = 100_000;
/// Rooms (times lanes) with a bucket of their own, at most; more share one.
const MAX_TRACKED_ROOMS: usize = 1_000_000;

/// Budgets as configured (`--msgs-*`, `--room-msgs-*`, `--room-creations-*`,
/// `--handshakes-*`, `--abuse-strikes`).
#[derive(Debug, Clone)]
pub(crate) struct BudgetSettings {
    pub(crate) msgs_per_sec: f64,
    pub(crate) msgs_burst: f64,
    pub(crate) room_msgs_per_sec: f64,
    pub(crate) room_msgs_burst: f64,
    pub(crate) room_creations_per_sec: f64,
    pub(crate) room_creations_burst: f64,
    pub(crate) handshakes_per_sec: f64,
    pub(crate) handshakes_burst: f64,
    pub(crate) abuse_strikes: u32,
}

/// The submit path and its state (one per relay).
#[derive(Debug)]
pub(crate) struct Ingress {
    store: Store,
    roles: RolePolicy,
    limits: Limits,
    /// Stored entries per room and lane.
    rooms: Buckets<(Lane, Arc<str>)>,
    /// Frames per client, for budgets shared by a client's requests.
    clients: Buckets<ClientKey>,
    /// Rooms created per client.
    creations: Buckets<ClientKey>,
    /// WebSocket and event-stream handshakes per client address.
    handshakes: Buckets<IpAddr>,
    /// The quota of a connection's own bucket.
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
    /// The client's address ([`crate::net::ClientAddr`]), for logs and per-address budgets.
    addr: Option<IpAddr>,
    /// Whose shared buckets this connection spends (token subject, else address).
    client: ClientKey,
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

    /// The client's address ([`crate::net::ClientAddr`]), when the adapter gave it.
    pub(crate) fn addr(&self) -> Option<IpAddr> {
        self.addr
    }

    /// The client's address: logged, and the key of its shared buckets when it has no token.
    pub(crate) fn with_addr(mut self, addr: IpAddr) -> Self {
        self.addr = Some(addr);
        if !matches!(self.client, ClientKey::Subject(_)) {
            self.client = ClientKey::Addr(crate::net::ClientAddr(addr).limit_key());
        }
        self
    }

    /// A budget other than the default (the client's shared bucket, for requests): a
    /// connection's own bucket from [`Ingress::connection_budget`]. The budget also picks the
    /// room-budget lane ([`Lane`]).
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
        let creation_quota = quota(budgets.room_creations_per_sec, budgets.room_creations_burst)
            .ok_or(ConfigError::Positive(
                "--room-creations-per-sec and --room-creations-burst",
            ))?;
        let handshake_quota = quota(budgets.handshakes_per_sec, budgets.handshakes_burst).ok_or(
            ConfigError::Positive("--handshakes-per-sec and --handshakes-burst"),
        )?;
        Ok(Self {
            store,
            roles,
            limits,
            rooms: Buckets::new(room_quota, MAX_TRACKED_ROOMS),
            clients: Buckets::new(client_quota, MAX_TRACKED_CLIENTS),
            creations: Buckets::new(creation_quota, MAX_TRACKED_CLIENTS),
            handshakes: Buckets::new(handshake_quota, MAX_TRACKED_CLIENTS),
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

    /// Keeps the budget maps small: a task on `tracker` that forgets refilled buckets.
    pub(crate) fn spawn_eviction(&self, tracker: &TaskTracker, token: CancellationToken) {
        let (rooms, clients) = (self.rooms.clone(), self.clients.clone());
        let (creations, handshakes) = (self.creations.clone(), self.handshakes.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(EVICT_EVERY);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {
                        rooms.evict_idle();
                        clients.evict_idle();
                        creations.evict_idle();
                        handshakes.evict_idle();
                    }
                }
            }
        });
    }

    /// Takes one handshake (WebSocket upgrade, event stream) from the address's budget
    /// (`addr` is a [`crate::net::ClientAddr::limit_key`]); `false` when it is spent.
    pub(crate) fn admit_handshake(&self, addr: IpAddr) -> bool {
        self.handshakes.try_take(&addr)
    }

    /// Takes a new member's `session.join` from the room's presence lane, at the handshake (so a
    /// refusal is a readable HTTP 429 rather than a close).
    pub(crate) fn admit_join(&self, sid: &str) -> Result<(), ClientError> {
        if self.rooms.try_take(&(Lane::Presence, sid.into())) {
            Ok(())
        } else {
            crate::metrics::error(ErrorCode::RoomRateLimited.as_str());
            Err(ClientError::room_rate_limited())
        }
    }

    /// Stores `conn`'s `session.join` or `session.leave` entry (`body` from
    /// [`crate::dispatch::presence_body`]). A join that creates the room is charged to the
    /// client's room-creation budget (it was charged to the presence lane by
    /// [`Ingress::admit_join`]); a leave is charged to the presence lane but never refused: it
    /// ends a join that was admitted.
    pub(crate) async fn record_presence(
        &self,
        conn: &Conn,
        presence: Presence,
        body: &str,
    ) -> Result<StreamId, AppendRefused> {
        if presence == Presence::Leave {
            let _ = self
                .rooms
                .try_take(&(Lane::Presence, conn.room_key.clone()));
        }
        let (sid, role, event) = (&conn.ctx.sid, conn.default_role(), presence.event());
        // A leave never brings back a room that is gone (deleted, or expired).
        let must_exist = conn.existing_room || presence == Presence::Leave;
        let first = self
            .store
            .append_existing(sid, role, event, body, None)
            .await?;
        let appended = or_create(
            first,
            must_exist,
            &self.store,
            &self.creations,
            &conn.client,
            sid,
            role,
            event,
            body,
            None,
        )
        .await?;
        Ok(appended.id)
    }

    /// A connection's (or request's) sending context. `asked` is the role the client asked for
    /// (`?role=`); a token's role binds the connection and must not contradict it.
    ///
    /// Its budget is the client's shared bucket (requests): keyed by the token's subject, else by
    /// the address given with [`Conn::with_addr`] — give it, or every anonymous request without
    /// one shares a single bucket. A connection that owns its budget sets
    /// [`Ingress::connection_budget`] with [`Conn::with_budget`].
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
        let client = grant
            .sub
            .as_deref()
            .map_or(ClientKey::Unknown, |sub| ClientKey::Subject(sub.into()));
        Ok(Conn {
            ctx,
            room_key: sid.into(),
            addr: None,
            client,
            budget: ClientBudget::Shared,
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
        if conn.budget.try_take(&self.clients, &conn.client) {
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
        if matches!(action, Ok(Action::Store(_)))
            && !self
                .rooms
                .try_take(&(conn.budget.lane(), conn.room_key.clone()))
        {
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
                let check_cancel =
                    envelope.cancels.is_some() && self.cancel_policy == CancelPolicy::Requester;
                let job = StoreJob {
                    store: self.store.clone(),
                    creations: self.creations.clone(),
                    client: conn.client.clone(),
                    sid: conn.ctx.sid.clone(),
                    sender: conn.ctx.sender.clone(),
                    envelope,
                    existing: conn.existing_room,
                };
                if check_cancel {
                    // Queued once its sender is known to be allowed.
                    return Ok(Box::pin(job.check_cancel_then_store()));
                }
                // Queued now, so a connection's envelopes are stored in the order it submitted
                // them.
                let queued = job.queue();
                Ok(Box::pin(job.finish(queued)))
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

/// A presence entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    Join,
    Leave,
}

impl Presence {
    pub(crate) fn event(self) -> &'static str {
        match self {
            Presence::Join => "session.join",
            Presence::Leave => "session.leave",
        }
    }
}
