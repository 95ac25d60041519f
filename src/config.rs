//! Command-line and environment configuration. Every flag has a `RELAY_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::auth::AuthArgs;
use crate::dialect::DialectArgs;
use crate::llm::LlmArgs;
use crate::protocol::{valid_role_name, Limits, LLM_ROLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

/// Who may cancel an LLM turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CancelPolicy {
    /// Only who asked: the same token subject with `--auth jwt`, the same role without.
    Requester,
    /// Any member of the room.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging flags, shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log output format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `chat_relay=debug`.
    #[arg(
        long,
        env = "RELAY_LOG",
        default_value = "chat_relay=info,tower_http=info",
        global = true
    )]
    pub log_level: String,
}

/// Redis connection flags, shared by the relay and the LLM worker.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL (`redis://host:port`, or `redis-cluster://host:port?node=host2:port2` for a cluster).
    #[arg(
        long,
        env = "RELAY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Redis Cluster seed nodes, `host:port,host:port,...` (instead of --redis-url).
    #[arg(long, env = "RELAY_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Timeout for one Redis command; past it a send is answered with `store_unavailable`.
    #[arg(long, env = "RELAY_REDIS_TIMEOUT_MS", default_value_t = 3000)]
    pub redis_timeout_ms: u64,
    /// Prefix of the room stream keys.
    #[arg(long, env = "RELAY_KEY_PREFIX", default_value = "chat:session:")]
    pub key_prefix: String,
    /// Consumer group of the LLM participant, created with each room.
    #[arg(long, env = "RELAY_LLM_GROUP", default_value = "llm")]
    pub llm_group: String,
    /// Stream retention: `XADD ... MAXLEN ~ N`. 0 keeps everything.
    #[arg(long, env = "RELAY_RETENTION", default_value_t = 100_000)]
    pub retention: u64,
    /// Retention by age as entries are added (`XTRIM MINID ~`): `7d`, `12h`, `2s`. Default: none.
    #[arg(long, env = "RELAY_RETENTION_MAX_AGE", value_parser = crate::auth::parse_ttl)]
    pub retention_max_age: Option<Duration>,
    /// A room with no new entry (and no live member) for this long disappears with everything
    /// it owns, through Redis expiry: `30d`, `12h`, `2s`. Default: rooms never expire.
    #[arg(long, env = "RELAY_ROOM_IDLE_TTL", value_parser = crate::auth::parse_ttl)]
    pub room_idle_ttl: Option<Duration>,
    /// How long a sender's `hd.cid` is remembered: a resend within it returns the original id.
    #[arg(long, env = "RELAY_DEDUP_WINDOW_SECS", default_value_t = 600)]
    pub dedup_window_secs: u64,
    /// A room silent this long leaves the LLM workers' reading set; its next entry announces it
    /// again (`30s`, `10m`, `1h`). Relays and workers must agree.
    #[arg(long, env = "RELAY_ROOM_WAKE_AFTER", default_value = "10m", value_parser = crate::auth::parse_ttl)]
    pub room_wake_after: Duration,
}

impl RedisArgs {
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
}

/// `chat-relay serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on for WebSocket and HTTP.
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Connections one room may have on this node.
    #[arg(long, env = "RELAY_MAX_CONNS_PER_ROOM", default_value_t = 1000)]
    pub max_conns_per_room: usize,
    /// WebSockets one client address may have on this node (event streams count apart, with
    /// the same limit).
    #[arg(long, env = "RELAY_MAX_CONNS_PER_IP", default_value_t = 256)]
    pub max_conns_per_ip: usize,
    /// Open TCP connections one client address may have on this node, whatever they carry;
    /// over it a connection gets `429 too_many_connections` before its request is read.
    /// Trusted proxies (--trusted-proxies) are exempt.
    #[arg(long, env = "RELAY_MAX_TCP_CONNS_PER_IP", default_value_t = 1024)]
    pub max_tcp_conns_per_ip: usize,
    /// Seconds a client has to send a whole request head, counted from when the relay waits
    /// for one (a new connection, or the end of the previous response): the slowloris guard.
    #[arg(long, env = "RELAY_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection that has not upgraded to a WebSocket may go without a byte either
    /// way before it is closed.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Reverse proxies (addresses or CIDR networks, comma-separated) whose `Forwarded` or
    /// `X-Forwarded-For` header names the client. Empty: the TCP peer is the client.
    #[arg(long, env = "RELAY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// Frames per second one connection may send (token bucket; see --msgs-burst).
    #[arg(long, env = "RELAY_MSGS_PER_SEC", default_value_t = 20.0)]
    pub msgs_per_sec: f64,
    /// Burst size of the per-connection bucket.
    #[arg(long, env = "RELAY_MSGS_BURST", default_value_t = 40.0)]
    pub msgs_burst: f64,
    /// Stored messages per second one room may take on this node.
    #[arg(long, env = "RELAY_ROOM_MSGS_PER_SEC", default_value_t = 200.0)]
    pub room_msgs_per_sec: f64,
    /// Burst size of the per-room bucket.
    #[arg(long, env = "RELAY_ROOM_MSGS_BURST", default_value_t = 400.0)]
    pub room_msgs_burst: f64,
    /// Rooms one client (token subject, else address) may create per second on this node,
    /// after a burst (--room-creations-burst); may be fractional. Over it: `room_creation_limited`.
    #[arg(long, env = "RELAY_ROOM_CREATIONS_PER_SEC", default_value_t = 1.0)]
    pub room_creations_per_sec: f64,
    /// Burst size of the per-client room-creation bucket.
    #[arg(long, env = "RELAY_ROOM_CREATIONS_BURST", default_value_t = 100.0)]
    pub room_creations_burst: f64,
    /// WebSocket handshakes and event streams one client address may open per second on this
    /// node, after a burst (--handshakes-burst). Over it: `429 too_many_handshakes`.
    #[arg(long, env = "RELAY_HANDSHAKES_PER_SEC", default_value_t = 10.0)]
    pub handshakes_per_sec: f64,
    /// Burst size of the per-address handshake bucket.
    #[arg(long, env = "RELAY_HANDSHAKES_BURST", default_value_t = 100.0)]
    pub handshakes_burst: f64,
    /// Consecutive rate-limited frames after which a connection is closed (1008).
    #[arg(long, env = "RELAY_ABUSE_STRIKES", default_value_t = 100)]
    pub abuse_strikes: u32,
    /// Run the LLM participant inside this process (`off` when workers run separately).
    #[arg(long, env = "RELAY_LLM", value_enum, default_value_t = Toggle::On)]
    pub llm: Toggle,
    #[command(flatten)]
    pub llm_args: LlmArgs,
    /// Who may cancel an LLM turn: `requester` (who asked) or `any` member.
    #[arg(long, env = "RELAY_LLM_CANCEL", value_enum, default_value_t = CancelPolicy::Requester)]
    pub llm_cancel: CancelPolicy,
    /// Largest accepted text frame, in bytes; larger frames get `frame_too_large`.
    #[arg(long, env = "RELAY_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Longest `bd.text`, in characters after trimming.
    #[arg(long, env = "RELAY_MAX_TEXT_CHARS", default_value_t = 2000)]
    pub max_text_chars: usize,
    /// Deepest JSON nesting accepted in a frame.
    #[arg(long, env = "RELAY_MAX_JSON_DEPTH", default_value_t = 32)]
    pub max_json_depth: usize,
    /// Frames queued per socket before the client counts as too slow and is disconnected.
    #[arg(long, env = "RELAY_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Appends one socket may have in flight before its reads pause.
    #[arg(long, env = "RELAY_SEND_WINDOW", default_value_t = 32)]
    pub send_window: usize,
    /// Roles clients may use (comma-separated). `llm` is always refused.
    #[arg(
        long,
        env = "RELAY_ROLES",
        value_delimiter = ',',
        default_value = "A,B,user"
    )]
    pub roles: Vec<String>,
    /// Seconds between WebSocket pings; a peer silent for three intervals is dropped.
    #[arg(long, env = "RELAY_PING_SECS", default_value_t = 20)]
    pub ping_secs: u64,
    /// Seconds one socket write may take before the peer counts as dead.
    #[arg(long, env = "RELAY_WRITE_TIMEOUT_SECS", default_value_t = 10)]
    pub write_timeout_secs: u64,
    /// Seconds an HTTP request may take (not the event stream nor WebSocket sessions).
    #[arg(long, env = "RELAY_HTTP_TIMEOUT_SECS", default_value_t = 30)]
    pub http_timeout_secs: u64,
    /// Only rooms created through `POST /api/sessions` (or with entries already) may be joined,
    /// posted to or asked: others answer 404 `not_found` and store nothing. Off: a room comes
    /// into being with its first message, as with the prior relay.
    #[arg(long, env = "RELAY_REQUIRE_SESSION")]
    pub require_session: bool,
    /// Longest `POST /api/chat` waits for the LLM's reply, s; past it the answer is 504
    /// `llm_timeout` (the turn still finishes and is stored in the session).
    #[arg(long, env = "RELAY_CHAT_TIMEOUT_SECS", default_value_t = 120)]
    pub chat_timeout_secs: u64,
    #[command(flatten)]
    pub dialects: DialectArgs,
    /// Seconds to let sessions and in-flight appends finish on shutdown.
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--roles: '{0}' is not a valid role name ([A-Za-z0-9._-], 1-32 chars)")]
    BadRole(String),
    #[error("--roles must name at least one role other than 'llm'")]
    NoRoles,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0}: the rate must be above 0 and the burst at least 1")]
    Positive(&'static str),
    #[error("--key-prefix must not contain '{{' or '}}' (Redis Cluster hash tags)")]
    BadPrefix,
    #[error(transparent)]
    BadProxy(#[from] crate::net::BadProxy),
}

impl ServeConfig {
    /// Fails on impossible values; warns on risky ones.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for role in &self.roles {
            if !valid_role_name(role) {
                return Err(ConfigError::BadRole(role.clone()));
            }
        }
        if self.roles.iter().all(|r| r == LLM_ROLE) {
            return Err(ConfigError::NoRoles);
        }
        if self.roles.iter().any(|r| r == LLM_ROLE) {
            tracing::warn!("--roles lists 'llm'; it stays reserved for the LLM participant");
        }
        for (name, v) in [
            ("--max-frame-bytes", self.max_frame_bytes),
            ("--max-text-chars", self.max_text_chars),
            ("--max-json-depth", self.max_json_depth),
            ("--outbound-queue", self.outbound_queue),
            ("--send-window", self.send_window),
            ("--max-tcp-conns-per-ip", self.max_tcp_conns_per_ip),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, v) in [
            ("--msgs-per-sec", self.msgs_per_sec),
            ("--msgs-burst", self.msgs_burst),
            ("--room-msgs-per-sec", self.room_msgs_per_sec),
            ("--room-msgs-burst", self.room_msgs_burst),
        ] {
            if v.is_nan() || v < 1.0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, rate, burst) in [
            (
                "--room-creations-per-sec and --room-creations-burst",
                self.room_creations_per_sec,
                self.room_creations_burst,
            ),
            (
                "--handshakes-per-sec and --handshakes-burst",
                self.handshakes_per_sec,
                self.handshakes_burst,
            ),
        ] {
            if !(rate.is_finite() && rate > 0.0 && burst.is_finite() && burst >= 1.0) {
                return Err(ConfigError::Positive(name));
            }
        }
        for (name, v) in [
            ("--ping-secs", self.ping_secs),
            ("--write-timeout-secs", self.write_timeout_secs),
            ("--http-timeout-secs", self.http_timeout_secs),
            ("--chat-timeout-secs", self.chat_timeout_secs),
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--idle-timeout-secs", self.idle_timeout_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        self.dialects.validate()?;
        if self.redis.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::BadPrefix);
        }
        self.trusted_proxies()?;
        if self.max_tcp_conns_per_ip < self.max_conns_per_ip {
            tracing::warn!("--max-tcp-conns-per-ip is below --max-conns-per-ip: an address runs out of TCP connections before it reaches its WebSocket limit");
        }
        if self.redis.retention > 0 && self.redis.retention < 1000 {
            tracing::warn!(retention = self.redis.retention, "short retention: clients resuming after a brief outage may find their last id trimmed");
        }
        Ok(())
    }

    pub(crate) fn trusted_proxies(&self) -> Result<crate::net::TrustedProxies, ConfigError> {
        Ok(crate::net::TrustedProxies::parse(&self.trusted_proxies)?)
    }

    pub(crate) fn net(&self) -> Result<crate::net::NetSettings, ConfigError> {
        Ok(crate::net::NetSettings {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            write_timeout: Duration::from_secs(self.write_timeout_secs),
            max_tcp_conns_per_ip: self.max_tcp_conns_per_ip,
            trusted_proxies: self.trusted_proxies()?,
        })
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_text_chars: self.max_text_chars,
            max_depth: self.max_json_depth,
        }
    }
}

/// `chat-relay llm-worker`: the LLM participant as its own process.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub llm_args: LlmArgs,
}

impl RedisArgs {
    pub fn settings(&self) -> crate::store::RedisSettings {
        let url = match self.redis_cluster.split_first() {
            // fred reads the other seeds from `node` query parameters.
            Some((first, rest)) => {
                let nodes: Vec<String> = rest.iter().map(|n| format!("node={n}")).collect();
                if nodes.is_empty() {
                    format!("redis-cluster://{first}")
                } else {
                    format!("redis-cluster://{first}?{}", nodes.join("&"))
                }
            }
            None => self.redis_url.clone(),
        };
        crate::store::RedisSettings {
            url,
            command_timeout: self.command_timeout(),
        }
    }

    /// A store handle for these settings (connects in the background).
    pub fn store(&self) -> Result<crate::store::Store, crate::store::StoreError> {
        crate::store::Store::connect(
            &self.settings(),
            crate::store::Keys::new(self.key_prefix.clone()),
            self.retention,
            self.llm_group.clone(),
        )
        .map(|s| {
            s.with_dedup_window(std::time::Duration::from_secs(self.dedup_window_secs))
                .with_wake_after(self.room_wake_after)
                .with_expiry(self.retention_max_age, self.room_idle_ttl)
        })
    }
}
