//! The WebSocket dialects of the team's other front ends, spoken in the same rooms as the relay
//! protocol:
//!
//! - the voice-chat client at `/ws/session/{session_id}` ([`voice`]): `request_ai_response` in;
//!   `ai_stream_begin`, `ai_stream_chunk`, `ai_stream_complete` or `ai_stream_error` out;
//! - the evaluation chatbot at `/chat` ([`eval`]): `{session_id, message, turn_id}` and
//!   `{type: "cancel"}` in; `delta`, `done` and `error` out.
//!
//! Each is an adapter and nothing more. A frame in is translated into a relay envelope and goes
//! through the one way in (`ingress`: budgets, validation, the idempotent append, cancels); a
//! reply out is one turn read through the one way out (`room::TurnReader`: a cursor with its
//! replay and catch-up), translated into the dialect's frames. So a room can hold a `{hd,bd}`
//! browser tab, a voice client and an evaluation client at once, with one history in one order.
//! The handshake passes the room socket's door (`ws::open_door`: origin and token;
//! `ws::take_slot`; `ws::accept`: frame caps), and [`socket`] is the plumbing both share.

mod eval;
mod locale;
mod socket;
mod voice;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use clap::Args;

pub(crate) use locale::Locale;

use crate::config::ConfigError;
use crate::state::Shared;

/// The dialects' settings.
#[derive(Debug, Clone, Args)]
pub struct DialectArgs {
    /// Language of the voice dialect's error sentences (`en`, or `ko` for Korean).
    #[arg(long, env = "RELAY_LOCALE", value_enum, default_value_t = Locale::En)]
    pub locale: Locale,
    /// Voice requests per session in any 60 seconds (a sliding window shared by all nodes;
    /// only valid requests count). Separate from --llm-turns-per-minute.
    #[arg(long, env = "RELAY_VOICE_REQUESTS_PER_MINUTE", default_value_t = 10)]
    pub voice_requests_per_minute: u32,
}

impl DialectArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.voice_requests_per_minute == 0 {
            return Err(ConfigError::Zero("--voice-requests-per-minute"));
        }
        Ok(())
    }
}

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/ws/session/{session_id}", get(voice::upgrade))
        .route("/chat", get(eval::upgrade))
}
