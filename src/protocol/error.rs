//! The catalogue of errors a client can see. Codes are stable snake_case strings that clients
//! match on; messages are short and human, and never carry internals (no Redis error text).

use std::borrow::Cow;

/// Every error code the relay sends, in one place so docs, tests and clients agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadJson,
    NotObject,
    InvalidHeader,
    InvalidEvent,
    UnknownEvent,
    ReservedEvent,
    InvalidRole,
    ReservedRole,
    RoleMismatch,
    InvalidBody,
    EmptyText,
    TextTooLong,
    /// `bd.emotion` is not one of [`super::EMOTIONS`] (nor null).
    InvalidEmotion,
    FrameTooLarge,
    TooDeep,
    BinaryUnsupported,
    InvalidSid,
    InvalidLastId,
    InvalidCid,
    StoreUnavailable,
    RateLimited,
    RoomRateLimited,
    RoomFull,
    RoomCreationLimited,
    TooManyConnections,
    TooManyHandshakes,
    Unauthorized,
    TokenExpired,
    TokenInvalid,
    ForbiddenRoom,
    ForbiddenOrigin,
    SlowConsumer,
    ForbiddenCancel,
    RequestTimeout,
    NotFound,
    /// `POST /api/sessions` with a `session_id` that is taken.
    SessionExists,
    /// The session was deleted while the client was in it.
    SessionDeleted,
    /// An HTTP method the path does not take (405, with `Allow`).
    MethodNotAllowed,
    /// The LLM server cannot be reached or answers 5xx.
    LlmUnavailable,
    /// The LLM server took too long (or no LLM participant answered in time).
    LlmTimeout,
    /// The LLM server is rate limiting the relay (its 429).
    LlmRateLimited,
    /// The LLM server refused the request (4xx other than 429).
    LlmRejected,
    /// The LLM server sent a reply that could not be read.
    LlmBadResponse,
    UnsupportedMediaType,
    UriTooLong,
    HeadersTooLarge,
    InvalidRequest,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::NotObject => "not_object",
            ErrorCode::InvalidHeader => "invalid_header",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::ReservedEvent => "reserved_event",
            ErrorCode::InvalidRole => "invalid_role",
            ErrorCode::ReservedRole => "reserved_role",
            ErrorCode::RoleMismatch => "role_mismatch",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::EmptyText => "empty_text",
            ErrorCode::TextTooLong => "text_too_long",
            ErrorCode::InvalidEmotion => "invalid_emotion",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::TooDeep => "too_deep",
            ErrorCode::BinaryUnsupported => "binary_unsupported",
            ErrorCode::InvalidSid => "invalid_sid",
            ErrorCode::InvalidLastId => "invalid_last_id",
            ErrorCode::InvalidCid => "invalid_cid",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RoomRateLimited => "room_rate_limited",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::RoomCreationLimited => "room_creation_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TooManyHandshakes => "too_many_handshakes",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::ForbiddenRoom => "forbidden_room",
            ErrorCode::ForbiddenOrigin => "forbidden_origin",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ForbiddenCancel => "forbidden_cancel",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SessionExists => "session_exists",
            ErrorCode::SessionDeleted => "session_deleted",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::LlmUnavailable => "llm_unavailable",
            ErrorCode::LlmTimeout => "llm_timeout",
            ErrorCode::LlmRateLimited => "llm_rate_limited",
            ErrorCode::LlmRejected => "llm_rejected",
            ErrorCode::LlmBadResponse => "llm_bad_response",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether the same request may succeed if simply sent again later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::StoreUnavailable
                | ErrorCode::RateLimited
                | ErrorCode::RoomRateLimited
                | ErrorCode::RoomFull
                | ErrorCode::RoomCreationLimited
                | ErrorCode::TooManyConnections
                | ErrorCode::TooManyHandshakes
                | ErrorCode::SlowConsumer
                | ErrorCode::RequestTimeout
                | ErrorCode::LlmUnavailable
                | ErrorCode::LlmTimeout
                | ErrorCode::LlmRateLimited
                | ErrorCode::Internal
        )
    }
}

/// An error addressed to one client: a stable code plus a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ClientError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl ClientError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn room_rate_limited() -> Self {
        Self::new(
            ErrorCode::RoomRateLimited,
            "this room is receiving too many messages; try again in a moment",
        )
    }

    pub fn room_creation_limited() -> Self {
        Self::new(
            ErrorCode::RoomCreationLimited,
            "you created too many new rooms; try again later or use an existing room",
        )
    }

    pub fn token_expired() -> Self {
        Self::new(
            ErrorCode::TokenExpired,
            "your token has expired; reconnect with a new one",
        )
    }

    pub fn slow_consumer() -> Self {
        Self::new(
            ErrorCode::SlowConsumer,
            "you fell too far behind the room; reconnect with last_id to catch up",
        )
    }

    /// A session (room) that does not exist: never created, or deleted.
    pub fn no_session(sid: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("session {sid} does not exist"))
    }

    pub fn session_deleted() -> Self {
        Self::new(
            ErrorCode::SessionDeleted,
            "this session was deleted; its history is gone",
        )
    }

    pub fn store_unavailable() -> Self {
        Self::new(
            ErrorCode::StoreUnavailable,
            "the message store is temporarily unavailable; your message may not have been stored: resend it with the same hd.cid",
        )
    }
}
