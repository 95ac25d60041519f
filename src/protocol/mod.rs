//! Wire types shared by every other module: stream ids, roles, event names, client errors.
//!
//! Nothing here does I/O, so the whole protocol is unit-tested in-process and fuzzed
//! (see `inbound`), and the store, rooms and sessions agree on one vocabulary.

mod close;
mod error;
mod event;
mod inbound;
mod outbound;
mod scan;
mod stream_id;

pub use close::{Close, Reconnect};
pub use error::{ClientError, ErrorCode};
pub use event::EventKind;
pub use inbound::{check_frame, parse_client_frame, Body, Inbound, Limits};
pub use outbound::{
    ack_frame, delivery_frame, ended_turn, error_frame, llm_start_frame, new_body, now_ms,
    resume_gap_frame, transient_frame, StoredBody,
};
pub use stream_id::StreamId;

/// The role the relay's own LLM participant speaks as; never accepted from a client.
pub const LLM_ROLE: &str = "llm";

/// The role given to an envelope without `hd.role` (the prior design's default).
pub const DEFAULT_ROLE: &str = "user";

/// Header fields only the relay may set. A client's copies are dropped so a delivered frame's
/// `hd.id` or `hd.sid` is always the relay's, never a client's forgery. `dialect` and
/// `max_tokens` are set by the dialect adapters (`crate::dialect`) on the requests they store:
/// which way in a request came, and the longest reply it wants.
pub const SERVER_HEADER_FIELDS: &[&str] = &[
    "id",
    "sid",
    "ts",
    "conn",
    "code",
    "turn_id",
    "sub",
    "dialect",
    "max_tokens",
];

/// The emotions an `llm.request` may carry in `bd.emotion` (the voice-chat backend's list); each
/// shapes the LLM's system prompt (`llm::Emotions`).
pub const EMOTIONS: [&str; 8] = [
    "happy",
    "sad",
    "angry",
    "anxious",
    "neutral",
    "surprised",
    "disgusted",
    "fearful",
];

/// Room ids: `[A-Za-z0-9._-]{1,128}`. Keeps keys readable in redis-cli, keeps `{`/`}` (cluster
/// hash tags) and whitespace out of key names.
pub fn valid_sid(sid: &str) -> bool {
    (1..=128).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Role names follow the same alphabet as room ids but shorter; they end up in stream fields.
pub fn valid_role_name(role: &str) -> bool {
    (1..=32).contains(&role.len())
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sid_alphabet_and_length() {
        assert!(valid_sid("room001"));
        assert!(valid_sid("a.b_c-D"));
        assert!(valid_sid(&"x".repeat(128)));
        assert!(!valid_sid(&"x".repeat(129)));
        assert!(!valid_sid(""));
        assert!(!valid_sid("room{1}"));
        assert!(!valid_sid("room 1"));
        assert!(!valid_sid("방"));
    }
}
