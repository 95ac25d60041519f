//! The catalogue of WebSocket closes the relay sends, beside the error catalogue (`error.rs`).
//!
//! Numeric codes follow RFC 6455 §7.4 and the IANA registry, and clients already match on them,
//! so several closes share a code (1008 and 1013 name several); the variant and its reason
//! tell them apart. Each close says whether a client should reconnect, and how.

use super::{ClientError, ErrorCode};

/// Every close the relay sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Close {
    /// The client closed, or the session ended normally.
    Normal,
    /// The relay is shutting down; another node (or this one, restarted) takes the client.
    Shutdown,
    /// The peer stopped answering pings, or a write to it timed out.
    NoPong,
    /// The connection's token expired while it was open.
    TokenExpired,
    /// The client kept sending past its rate limits (`--abuse-strikes` refusals in a row).
    RateLimitsIgnored,
    /// A frame beyond the hard size cap (4 × `--max-frame-bytes`).
    FrameTooBig,
    /// A text frame (or a close reason) that is not valid UTF-8 (RFC 6455 §8.1).
    InvalidUtf8,
    /// A violation of the WebSocket framing: an unmasked frame, reserved bits or opcodes, a
    /// continuation with nothing to continue, a fragmented or oversized (> 125 bytes) control
    /// frame, a bad close sequence.
    ProtocolViolation,
    /// The client fell too far behind the room: its outbound queue filled.
    SlowConsumer,
    /// Redis could not be reached to join the room or read the history of a resume.
    StoreUnavailable,
    /// The session was deleted (`DELETE /api/sessions/{id}`); there is nothing to come back to.
    SessionDeleted,
    /// Joining would have created the room, and the client is out of its room-creation budget.
    RoomCreationLimited,
}

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Do not reconnect on its own.
    No,
    /// Reconnect (with backoff) and resume with `last_id` = the last `hd.id` received.
    WithLastId,
    /// Reconnect with a fresh token, resuming with `last_id`.
    WithNewToken,
}

impl Close {
    /// Every variant, for docs and tests.
    pub const ALL: [Close; 12] = [
        Close::Normal,
        Close::Shutdown,
        Close::NoPong,
        Close::TokenExpired,
        Close::RateLimitsIgnored,
        Close::FrameTooBig,
        Close::InvalidUtf8,
        Close::ProtocolViolation,
        Close::SlowConsumer,
        Close::StoreUnavailable,
        Close::SessionDeleted,
        Close::RoomCreationLimited,
    ];

    /// The close code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Close::Normal => 1000,
            Close::Shutdown => 1001,
            Close::NoPong | Close::TokenExpired | Close::RateLimitsIgnored => 1008,
            Close::ProtocolViolation => 1002,
            Close::InvalidUtf8 => 1007,
            Close::FrameTooBig => 1009,
            Close::SlowConsumer | Close::StoreUnavailable | Close::RoomCreationLimited => 1013,
            // The private-use range (RFC 6455 §7.4.2), read like HTTP's 404: no registered
            // code says "the resource is gone", and 1000/1001 would invite a reconnect.
            Close::SessionDeleted => 4404,
        }
    }

    /// The close reason: short, stable, and at most 123 bytes (a close frame's payload is 125
    /// bytes, two of which hold the code).
    pub fn reason(self) -> &'static str {
        match self {
            Close::Normal => "bye",
            Close::Shutdown => "relay shutting down",
            Close::NoPong => "no pong",
            Close::TokenExpired => "token expired",
            Close::RateLimitsIgnored => "rate limits ignored",
            Close::FrameTooBig => "frame too large",
            Close::InvalidUtf8 => "invalid UTF-8",
            Close::ProtocolViolation => "protocol violation",
            Close::SlowConsumer => "too slow: reconnect with last_id",
            Close::StoreUnavailable => "store unavailable",
            Close::SessionDeleted => "session deleted",
            Close::RoomCreationLimited => "too many new rooms",
        }
    }

    pub fn reconnect(self) -> Reconnect {
        match self {
            // A client that broke the protocol would break it again.
            Close::Normal
            | Close::RateLimitsIgnored
            | Close::InvalidUtf8
            | Close::ProtocolViolation
            | Close::SessionDeleted => Reconnect::No,
            Close::TokenExpired => Reconnect::WithNewToken,
            Close::Shutdown
            | Close::NoPong
            | Close::FrameTooBig
            | Close::SlowConsumer
            | Close::StoreUnavailable
            | Close::RoomCreationLimited => Reconnect::WithLastId,
        }
    }

    /// The error frame sent just before the close, when the client needs more than the reason
    /// (a close reason is easy to miss; an error frame reaches the same handler as other errors).
    pub fn notice(self) -> Option<ClientError> {
        match self {
            Close::SlowConsumer => Some(ClientError::slow_consumer()),
            Close::TokenExpired => Some(ClientError::token_expired()),
            Close::RateLimitsIgnored => Some(ClientError::new(
                ErrorCode::RateLimited,
                "too many messages for too long; disconnected",
            )),
            Close::StoreUnavailable => Some(ClientError::store_unavailable()),
            Close::SessionDeleted => Some(ClientError::session_deleted()),
            Close::RoomCreationLimited => Some(ClientError::room_creation_limited()),
            Close::Normal
            | Close::Shutdown
            | Close::NoPong
            | Close::FrameTooBig
            | Close::InvalidUtf8
            | Close::ProtocolViolation => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn reasons_fit_a_close_frame_and_tell_variants_apart() {
        let mut seen = HashSet::new();
        for close in Close::ALL {
            assert!(close.reason().len() <= 123, "{close:?}");
            assert!(
                seen.insert((close.code(), close.reason())),
                "{close:?} is not distinct"
            );
        }
    }

    #[test]
    fn codes_clients_rely_on() {
        assert_eq!(Close::Shutdown.code(), 1001);
        assert_eq!(Close::TokenExpired.code(), 1008);
        assert_eq!(Close::FrameTooBig.code(), 1009);
        assert_eq!(Close::InvalidUtf8.code(), 1007);
        assert_eq!(Close::ProtocolViolation.code(), 1002);
        assert_eq!(Close::SlowConsumer.code(), 1013);
        assert_eq!(Close::SlowConsumer.reconnect(), Reconnect::WithLastId);
        assert_eq!(Close::SessionDeleted.code(), 4404);
        assert_eq!(Close::SessionDeleted.reconnect(), Reconnect::No);
    }
}
