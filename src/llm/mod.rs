//! The LLM participant: a consumer-group worker that answers in the room as role `llm`.
//!
//! # Events
//! | event | stored? | what |
//! |---|---|---|
//! | `llm.start` | no (live only) | a turn began; `hd.turn_id` = id of the entry answered |
//! | `llm.delta` | no (live only) | `bd.delta` text piece, `bd.seq` 0, 1, 2, … |
//! | `llm.response` | yes | the whole reply `bd.text`, `bd.reason` (`stop`, `length`, `cancelled`), `bd.usage` |
//! | `llm.error` | yes | `hd.code` + a short human `bd.message` |
//!
//! Deltas travel like typing notices, over the room's pub/sub channel, so every member on every
//! node sees them live while the stream keeps one readable entry per reply.
//!
//! # Exactly once
//! Every room stream has the consumer group `llm` (created at `0` with the room by the append
//! script). Workers read it with `XREADGROUP` on dedicated connections; entries they do not act on
//! are acked at once. A turn is answered under a lease (`SET NX PX`, renewed while generating, as
//! is the entry's claim) and ended by one script that stores the final entry, marks the turn done
//! and `XACK`s the request — so however workers crash or race, a turn gets one final entry. A
//! worker that dies mid-turn leaves the entry pending; after `--llm-claim-idle` another worker
//! `XAUTOCLAIM`s it and answers. After `--llm-max-deliveries` failed deliveries an entry goes to
//! the dead-letter stream.
//!
//! # Finding rooms
//! Workers do not poll keys. At start they `SCAN` once for rooms from before them; afterwards they
//! tail the registry stream `chat:rooms` (`XREAD BLOCK`), to which relays add a room when they
//! create it and re-announce it while it is active.

mod prompt;
mod provider;
mod rooms;
mod turn;
mod usage;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

pub use worker::{run_worker, WorkerError};

/// Which chat messages the LLM answers (`llm.request` always is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplyPolicy {
    /// Only `llm.request` envelopes.
    Request,
    /// Also chat messages that mention `@llm`.
    Mention,
    /// Every chat message.
    All,
}

/// LLM participant flags, shared by `serve` and `llm-worker`.
#[derive(Debug, Clone, Args)]
pub struct LlmArgs {
    /// OpenAI-compatible API base (…/v1). scripts/run.sh starts a local model here by default.
    #[arg(
        long,
        env = "RELAY_LLM_BASE_URL",
        default_value = "http://127.0.0.1:8001/v1"
    )]
    pub llm_base_url: String,
    /// API key sent as a bearer token, if the server wants one.
    #[arg(long, env = "RELAY_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,
    /// Model name sent to the API.
    #[arg(long, env = "RELAY_LLM_MODEL", default_value = "smollm2")]
    pub llm_model: String,
    /// Which chat messages get an answer (llm.request always does).
    #[arg(long, env = "RELAY_LLM_REPLY", value_enum, default_value_t = ReplyPolicy::Mention)]
    pub llm_reply: ReplyPolicy,
    /// System prompt (default: a helpful third participant, short answers).
    #[arg(long, env = "RELAY_LLM_SYSTEM_PROMPT")]
    pub llm_system_prompt: Option<String>,
    /// Read the system prompt from this file.
    #[arg(
        long,
        env = "RELAY_LLM_SYSTEM_PROMPT_FILE",
        conflicts_with = "llm_system_prompt"
    )]
    pub llm_system_prompt_file: Option<PathBuf>,
    /// Replace the built-in guidance per emotion (`bd.emotion` of a request) with this file's: a
    /// JSON object such as `{"anxious": "...", "sad": "..."}`; emotions it does not name keep
    /// the built-in line, an empty string turns one off.
    #[arg(long, env = "RELAY_LLM_EMOTION_PROMPTS")]
    pub llm_emotion_prompts: Option<PathBuf>,
    /// Room entries given to the model as context.
    #[arg(long, env = "RELAY_LLM_CONTEXT", default_value_t = 20)]
    pub llm_context: u64,
    /// Most tokens of one reply (a request may ask for fewer: the voice dialect asks for 200).
    #[arg(long, env = "RELAY_LLM_MAX_TOKENS", default_value_t = 200)]
    pub llm_max_tokens: u32,
    /// Connect timeout to the LLM server, ms.
    #[arg(long, env = "RELAY_LLM_CONNECT_TIMEOUT_MS", default_value_t = 3000)]
    pub llm_connect_timeout_ms: u64,
    /// Longest silence from the LLM server (before the first byte, between chunks), s.
    #[arg(long, env = "RELAY_LLM_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub llm_idle_timeout_secs: u64,
    /// Attempts to start a completion (retries only happen before the first token).
    #[arg(long, env = "RELAY_LLM_ATTEMPTS", default_value_t = 3)]
    pub llm_attempts: u32,
    /// A request pending this long (its worker died) is claimed by another worker, s.
    #[arg(long, env = "RELAY_LLM_CLAIM_IDLE_SECS", default_value_t = 30)]
    pub llm_claim_idle_secs: u64,
    /// Deliveries after which a request goes to the dead-letter stream.
    #[arg(long, env = "RELAY_LLM_MAX_DELIVERIES", default_value_t = 3)]
    pub llm_max_deliveries: u64,
    /// LLM turns per room per minute; more get `llm.error` with code `rate_limited`.
    #[arg(long, env = "RELAY_LLM_TURNS_PER_MINUTE", default_value_t = 10)]
    pub llm_turns_per_minute: u64,
    /// Turns one worker generates at once.
    #[arg(long, env = "RELAY_LLM_CONCURRENCY", default_value_t = 8)]
    pub llm_concurrency: usize,
    /// POST each turn's token usage here (JSON, `Idempotency-Key: <turn_id>`), retried with
    /// exponential backoff from a durable outbox in Redis.
    #[arg(long, env = "RELAY_USAGE_CALLBACK_URL")]
    pub usage_callback_url: Option<String>,
    /// Sign usage callbacks: header `X-Chat-Relay-Signature-256: sha256=<HMAC-SHA256 of the body>`.
    #[arg(long, env = "RELAY_USAGE_CALLBACK_SECRET", hide_env_values = true)]
    pub usage_callback_secret: Option<String>,
    /// How long a usage callback is retried before it goes to the dead-letter stream, s.
    #[arg(long, env = "RELAY_USAGE_CALLBACK_MAX_SECS", default_value_t = 3600)]
    pub usage_callback_max_secs: u64,
    /// Consumer name in the group (default: host-pid); must differ between workers.
    #[arg(long, env = "RELAY_LLM_CONSUMER")]
    pub llm_consumer: Option<String>,
}

impl LlmArgs {
    pub fn claim_idle(&self) -> Duration {
        Duration::from_secs(self.llm_claim_idle_secs.max(1))
    }

    /// Warns when a slow but healthy turn could be claimed by a second worker.
    pub fn warn_if_risky(&self) {
        if self.llm_claim_idle_secs < self.llm_idle_timeout_secs {
            tracing::warn!(
                claim_idle_secs = self.llm_claim_idle_secs,
                idle_timeout_secs = self.llm_idle_timeout_secs,
                "--llm-claim-idle-secs is shorter than --llm-idle-timeout-secs; claims are renewed while generating, but a stalled renewal could let a second worker start the same turn (it would still not reply twice)"
            );
        }
    }
}
