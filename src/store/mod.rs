//! The only module that talks to Redis (the only importer of `fred`).
//!
//! # Redis Streams in brief
//! Each room is one stream (`chat:session:<sid>`); `XADD` gives every entry an id `<ms>-<seq>`
//! that only grows, which is the room's single order. Appends go through `append.lua`, which also
//! `SPUBLISH`es the entry on the room's (sharded) channel so every relay node can deliver it live without
//! polling, and creates the LLM consumer group when the room is new. History reads (`XRANGE`)
//! serve resume, recovery after a lost subscription, and the HTTP API.
//!
//! # Connections
//! One shared [`Client`] serves appends and reads; fred pipelines concurrent commands on it.
//! Subscribers and blocking reads get their own connections ([`Store::subscriber`],
//! [`Store::dedicated_client`]): a blocked command stalls everything queued behind it.
//! Every command has a timeout so a dead Redis turns into `store_unavailable`, not silence.

mod commit;
mod deletions;
mod dialects;
mod feed;
mod held;
pub(crate) mod keys;
mod llm_group;
mod presence;
mod reads;
mod sessions;
mod stats;
mod turns;
mod usage;

pub(crate) use deletions::DeletionCursor;
pub use dialects::VoiceRate;
pub(crate) use feed::{Feed, FeedEvent, FeedHandle};
pub use keys::Keys;
pub(crate) use llm_group::GroupEntry;
pub(crate) use presence::{PresenceChange, PresenceCount, PresenceSet};
use reads::value_str;
pub(crate) use reads::{parse_entries, parse_item};
pub(crate) use sessions::{merge_patch, Created, Session};
pub(crate) use stats::RoomStats;
pub use turns::lease_holder;
pub(crate) use turns::{
    lease_token, turn_state_ttl, Finished, Progress, TurnBegin, TurnEnd, TurnLock, TurnProgress,
    TurnState,
};
pub(crate) use usage::PendingCallback;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::prelude::{
    Builder, ClientLike, Config, LuaInterface, PubsubInterface, ReconnectPolicy, TcpConfig,
};
use fred::types::scripts::Script;
use fred::types::Value;

use crate::protocol::StreamId;
use keys::TRANSIENT_MARK;

/// A Lua script with its source, so a cache miss (Redis restarted) can fall back to EVAL.
#[derive(Debug, Clone)]
struct Lua {
    src: &'static str,
    script: Script,
}

impl Lua {
    fn new(src: &'static str) -> Self {
        Self {
            src,
            script: Script::from_lua(src),
        }
    }
}

#[derive(Debug, Clone)]
struct Scripts {
    append: Lua,
    session_patch: Lua,
    session_delete: Lua,
    turn_lock: Lua,
    turn_attempt: Lua,
    turn_begin: Lua,
    turn_progress: Lua,
    active_turns: Lua,
    finish: Lua,
    usage_claim: Lua,
    usage_adopt: Lua,
    usage_settle: Lua,
    usage_forget: Lua,
    voice_rate: Lua,
    presence: Lua,
    room_touch: Lua,
    retention_set: Lua,
}

/// What can go wrong talking to Redis. Callers map it to `store_unavailable` for clients; the
/// cause is kept for logs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("redis command failed")]
    Redis(#[from] fred::error::Error),
    #[error("unexpected reply from redis: {0}")]
    Reply(&'static str),
}

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    /// Per-command timeout: how long a client waits before hearing `store_unavailable`.
    pub command_timeout: Duration,
}

/// A stream entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: StreamId,
    pub participant: String,
    pub event: String,
    pub body: String,
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub id: StreamId,
    /// This append created the room's stream.
    pub created: bool,
    /// Nothing was stored: the (sender, cid) pair was already, as `id`.
    pub duplicate: bool,
}

/// Which room an append may write to (see `append.lua`).
#[derive(Debug, Clone)]
enum Target {
    /// Any room; a new one is created.
    Any,
    /// Only a room that exists.
    Existing,
    /// Only a new room, whose session record is written with the entry.
    New { metadata: String },
}

/// What `append.lua` answered.
#[derive(Debug)]
enum AppendReply {
    Stored(Appended),
    /// [`Target::Existing`]: there is no such room.
    Missing,
    /// [`Target::New`]: the room exists.
    Exists,
}

/// A message from a room's live channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Stored entries (one, or a group commit's batch), in stream order, with each one's id
    /// and body (the stored envelope).
    Entries(Vec<(StreamId, String)>),
    /// A frame that is not stored (typing), ready to send.
    Transient(String),
    /// An LLM turn's `llm.start` or `llm.delta`, ready to send, with where it belongs in the turn.
    Turn { mark: TurnMark, frame: String },
    /// The session was deleted (`DELETE /api/sessions/{id}`): its members are closed.
    Deleted,
    /// Entries were stored but their bodies are not at hand (another node's `-i` message, or
    /// one whose bodies this node no longer holds): the room catches up from its stream.
    Missed,
}

/// Where a live LLM frame belongs: which turn, which attempt, and up to which delta. Lets every
/// connection drop what it already has and never show a delta out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnMark {
    pub turn: StreamId,
    pub attempt: u32,
    /// For a delta, its own seq; for a start, the seq of the last delta its text includes (-1:
    /// none).
    pub seq: i64,
    /// `llm.start` (sets the turn's text) rather than `llm.delta` (appends to it).
    pub start: bool,
}

/// Summary of a room's stream (`XINFO STREAM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub length: u64,
    pub first_id: Option<StreamId>,
    pub last_id: Option<StreamId>,
    /// The greatest id ever generated, even if trimmed or deleted since.
    pub last_generated_id: StreamId,
    /// Entries ever added (Redis ≥ 7.0); more than `length` means some were trimmed or deleted.
    pub entries_added: Option<u64>,
}

/// A connection of its own for blocking reads: a blocked command would stall every command
/// queued behind it on the shared connection.
#[derive(Debug)]
pub struct BlockingConn(Client);

/// Handle to the room streams. Cheap to clone (one reference count): every submit clones it.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug)]
struct Inner {
    client: Client,
    builder: Builder,
    keys: Keys,
    retention: u64,
    dedup_window_secs: u64,
    /// `--room-wake-after`: a room silent this long is announced again by its next entry.
    wake_after: Duration,
    /// `--retention-max-age`, ms (0: none).
    max_age_ms: u64,
    /// `--room-idle-ttl`, ms (0: rooms never expire).
    idle_ttl_ms: u64,
    llm_group: String,
    scripts: Scripts,
    /// Appends waiting for their room's next group commit.
    commits: Arc<commit::Queues>,
    /// Bodies of committed batches kept for this node's own feed.
    held: Arc<held::Held>,
}

impl Store {
    /// Builds the shared client and starts connecting in the background: a relay started while
    /// Redis is down still serves `/healthz` and answers sends with `store_unavailable` until
    /// Redis comes back.
    pub fn connect(
        settings: &RedisSettings,
        keys: Keys,
        retention: u64,
        llm_group: impl Into<String>,
    ) -> Result<Store, StoreError> {
        let mut config = Config::from_url(&settings.url)?;
        config.fail_fast = false;
        let mut builder = Builder::from_config(config);
        let timeout = settings.command_timeout;
        builder
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
                // Pub/sub messages wait here between the socket and our dispatcher; a lag is
                // recovered from the stream, but a roomy buffer makes it rare.
                p.broadcast_channel_capacity = 16 * 1024;
            })
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let client = builder.build()?;
        client.connect();
        Ok(Store {
            inner: Arc::new(Inner {
                client,
                builder,
                keys,
                retention,
                dedup_window_secs: 600,
                wake_after: Duration::from_secs(600),
                max_age_ms: 0,
                idle_ttl_ms: 0,
                llm_group: llm_group.into(),
                scripts: Scripts {
                    append: Lua::new(include_str!("append.lua")),
                    session_patch: Lua::new(include_str!("session_patch.lua")),
                    session_delete: Lua::new(include_str!("session_delete.lua")),
                    turn_lock: Lua::new(include_str!("turn_lock.lua")),
                    turn_attempt: Lua::new(include_str!("turn_attempt.lua")),
                    turn_begin: Lua::new(include_str!("turn_begin.lua")),
                    turn_progress: Lua::new(include_str!("turn_progress.lua")),
                    active_turns: Lua::new(include_str!("active_turns.lua")),
                    finish: Lua::new(include_str!("finish.lua")),
                    usage_claim: Lua::new(include_str!("usage_claim.lua")),
                    usage_adopt: Lua::new(include_str!("usage_adopt.lua")),
                    usage_settle: Lua::new(include_str!("usage_settle.lua")),
                    usage_forget: Lua::new(include_str!("usage_forget.lua")),
                    voice_rate: Lua::new(include_str!("voice_rate.lua")),
                    presence: Lua::new(include_str!("presence.lua")),
                    room_touch: Lua::new(include_str!("room_touch.lua")),
                    retention_set: Lua::new(include_str!("retention_set.lua")),
                },
                commits: Arc::default(),
                held: Arc::default(),
            }),
        })
    }

    /// How long a room may be silent before LLM workers stop reading it (`--room-wake-after`).
    pub fn with_wake_after(mut self, window: Duration) -> Self {
        Arc::make_mut(&mut self.inner).wake_after = window.max(Duration::from_secs(1));
        self
    }

    pub fn wake_after(&self) -> Duration {
        self.inner.wake_after
    }

    /// Retention by age and the rooms' idle expiry (`None`: off).
    pub fn with_expiry(mut self, max_age: Option<Duration>, idle_ttl: Option<Duration>) -> Self {
        Arc::make_mut(&mut self.inner).max_age_ms =
            max_age.map_or(0, |d| d.as_millis().max(1) as u64);
        Arc::make_mut(&mut self.inner).idle_ttl_ms =
            idle_ttl.map_or(0, |d| d.as_millis().max(1) as u64);
        self
    }

    /// `--room-idle-ttl`, if rooms expire.
    pub fn idle_ttl(&self) -> Option<Duration> {
        (self.inner.idle_ttl_ms > 0).then(|| Duration::from_millis(self.inner.idle_ttl_ms))
    }

    /// Keeps a room with live members from expiring (`--room-idle-ttl`): a no-op without one.
    pub async fn keep_room_alive(&self, sid: &str) -> Result<(), StoreError> {
        if self.inner.idle_ttl_ms == 0 {
            return Ok(());
        }
        let keys = vec![
            self.inner.keys.room(sid),
            self.inner.keys.stats(sid),
            self.inner.keys.session_record(sid),
            self.inner.keys.turn_counter(sid),
            self.inner.keys.turn_attempts(sid),
            self.inner.keys.active_turns(sid),
        ];
        let _: Value = self
            .eval_script(
                &self.inner.scripts.room_touch,
                keys,
                vec![self.inner.idle_ttl_ms.to_string()],
            )
            .await?;
        Ok(())
    }

    /// A room key's time to live, no longer than a room lives when idle: a key of an expired
    /// room must not outlive it.
    pub(crate) fn room_ttl(&self, ttl: Duration) -> Duration {
        match self.inner.idle_ttl_ms {
            0 => ttl,
            idle => ttl.min(Duration::from_millis(idle)),
        }
    }

    /// How long a (sender, cid) pair is remembered for idempotent appends.
    pub fn with_dedup_window(mut self, window: Duration) -> Self {
        Arc::make_mut(&mut self.inner).dedup_window_secs = window.as_secs().max(1);
        self
    }

    /// Whether Redis is a cluster: multi-key reads must then stay within one hash slot.
    pub fn is_clustered(&self) -> bool {
        self.inner.client.is_clustered()
    }

    /// The hash slot of a room's keys (all of them share the room key's slot).
    pub fn room_slot(&self, sid: &str) -> u16 {
        fred::util::redis_keyslot(self.inner.keys.room(sid).as_bytes())
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// A live feed on its own subscriber connection (see [`Feed`]).
    pub fn feed(&self) -> Result<Feed, StoreError> {
        let sub = self.inner.builder.build_subscriber_client()?;
        Ok(Feed::new(
            sub,
            self.inner.keys.clone(),
            self.inner.held.clone(),
        ))
    }

    /// A new, unshared connection for blocking reads (`XREAD`/`XREADGROUP BLOCK`), with the
    /// command timeout lifted above `block` so a quiet stream is not reported as a failure.
    pub fn blocking_conn(&self, block: Duration) -> Result<BlockingConn, StoreError> {
        let mut builder = self.inner.builder.clone();
        builder.with_performance_config(|p| {
            p.default_command_timeout += block;
        });
        let client = builder.build()?;
        client.connect();
        Ok(BlockingConn(client))
    }

    /// `PING` — for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: Value = self.inner.client.ping(None).await?;
        Ok(())
    }

    /// Append an envelope to a room and publish it to every node, atomically, in the room's
    /// next group commit (see [`commit`]). Creates the room when it is new. Queued when called,
    /// so a caller's appends are stored in the order it made the calls.
    ///
    /// With `dedup = Some((sender, cid))`, a second append of the same pair within the dedup
    /// window stores nothing and returns the original id: clients resend after a lost ack, and
    /// fred resends commands that were in flight when a connection dropped.
    pub fn append(
        &self,
        sid: &str,
        participant: &str,
        event: &'static str,
        body: &str,
        dedup: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send + 'static {
        let queued = self.queue_append(sid, participant, event, body, dedup, Target::Any);
        async move {
            match queued.await? {
                AppendReply::Stored(appended) => Ok(appended),
                AppendReply::Missing | AppendReply::Exists => {
                    Err(StoreError::Reply("append refused a room it may create"))
                }
            }
        }
    }

    /// [`Store::append`] to a room that exists (its stream or its session record), checked in
    /// the same script: `None`, storing nothing, when there is no such room — it was never
    /// created (`--require-session`), it was deleted, which an append must not undo, or the
    /// append would create it and the caller wants to charge that first.
    pub fn append_existing(
        &self,
        sid: &str,
        participant: &str,
        event: &'static str,
        body: &str,
        dedup: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<Option<Appended>, StoreError>> + Send + 'static {
        let queued = self.queue_append(sid, participant, event, body, dedup, Target::Existing);
        async move {
            match queued.await? {
                AppendReply::Stored(appended) => Ok(Some(appended)),
                AppendReply::Missing => Ok(None),
                AppendReply::Exists => Err(StoreError::Reply("append refused an existing room")),
            }
        }
    }

    /// Runs a script by hash. After a Redis restart the script cache is empty: falling back to
    /// EVAL (which also caches it) rather than SCRIPT LOAD + EVALSHA keeps concurrent calls of
    /// one socket in the order they were issued, since each is retried by exactly one command.
    async fn eval_script<K, A>(&self, lua: &Lua, keys: K, args: Vec<A>) -> Result<Value, StoreError>
    where
        K: Into<fred::types::MultipleKeys> + Clone + Send,
        A: Into<Value> + Clone + Send,
    {
        let args: Vec<Value> = args.into_iter().map(Into::into).collect();
        match self
            .inner
            .client
            .evalsha(lua.script.sha1().clone(), keys.clone(), args.clone())
            .await
        {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                Ok(self.inner.client.eval(lua.src, keys, args).await?)
            }
            other => Ok(other?),
        }
    }

    /// The keys matching `pattern`. A pattern with a hash tag (`*{chat:session:<sid>}*`) is
    /// scanned on the one node that holds the tag's slot (fred routes it by the tag); without
    /// one, on every primary of a cluster.
    pub(crate) async fn scan_keys(
        &self,
        pattern: &str,
        kind: Option<fred::types::scan::ScanType>,
    ) -> Result<Vec<String>, StoreError> {
        use fred::types::scan::Scanner;
        use futures_util::TryStreamExt;

        let keys: Vec<fred::types::Key> =
            if self.inner.client.is_clustered() && !pattern.contains('{') {
                let mut pages =
                    std::pin::pin!(self.inner.client.scan_cluster(pattern, Some(1000), kind));
                let mut keys = Vec::new();
                while let Some(mut page) = pages.try_next().await? {
                    keys.extend(page.take_results().unwrap_or_default());
                    page.next();
                }
                keys
            } else {
                self.inner
                    .client
                    .scan_buffered(pattern, Some(1000), kind)
                    .try_collect()
                    .await?
            };
        Ok(keys
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect())
    }

    /// Publish a frame to the room's live channel without storing it.
    pub async fn publish_transient(&self, sid: &str, frame: &str) -> Result<(), StoreError> {
        let payload = format!("{TRANSIENT_MARK}\n{frame}");
        let _: Value = self
            .inner
            .client
            .spublish(self.inner.keys.channel(sid), payload)
            .await?;
        Ok(())
    }

    /// On Redis Cluster, wakes the LLM workers (they cannot block on rooms of several slots) for
    /// an entry that asks for an answer. Nothing to do on a single Redis, where they block on
    /// every room they read.
    pub async fn wake_llm(&self, sid: &str) -> Result<(), StoreError> {
        if self.is_clustered() {
            let _: Value = self
                .inner
                .client
                .publish(self.inner.keys.llm_wake_channel(), sid)
                .await?;
        }
        Ok(())
    }

    pub async fn quit(&self) {
        let _ = self.inner.client.quit().await;
    }
}
