//! The one error type of the HTTP edge: `{"code": ..., "message": ...}` with a status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::limits::Full;
use crate::protocol::{ClientError, ErrorCode};
use crate::store::StoreError;

#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub error: ClientError,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: ErrorCode,
        message: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            error: ClientError::new(code, message),
        }
    }

    /// A connection or request refused while establishing who sends (`?role=`, token role).
    pub(crate) fn for_conn(error: ClientError) -> Self {
        let status = match error.code {
            ErrorCode::RoleMismatch => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        };
        Self { status, error }
    }

    /// A submitted envelope refused: the status for each code a submit can refuse with.
    pub(crate) fn for_submit(error: ClientError) -> Self {
        let status = match error.code {
            ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RoleMismatch | ErrorCode::ReservedRole | ErrorCode::ForbiddenCancel => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::RateLimited
            | ErrorCode::RoomRateLimited
            | ErrorCode::RoomCreationLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self { status, error }
    }

    /// `404 not_found`: "session <sid> does not exist".
    pub(crate) fn no_session(sid: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            error: ClientError::no_session(sid),
        }
    }

    /// An address past its handshake budget (`--handshakes-*`).
    pub(crate) fn too_many_handshakes() -> Self {
        crate::metrics::error(ErrorCode::TooManyHandshakes.as_str());
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyHandshakes,
            "too many connection attempts from your address; retry with a backoff",
        )
    }

    /// A member limit that is full (`--max-conns-per-room`, `--max-conns-per-ip`).
    pub(crate) fn full(full: Full) -> Self {
        let (code, message) = match full {
            Full::Room => (
                ErrorCode::RoomFull,
                "this room has too many connections; try again later",
            ),
            Full::Address => (
                ErrorCode::TooManyConnections,
                "too many connections from your address",
            ),
        };
        crate::metrics::error(code.as_str());
        Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
    }

    pub(crate) fn bad_request(
        code: ErrorCode,
        message: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::error!(cause = %err, source = ?std::error::Error::source(&err), "store error on HTTP request");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: ClientError::store_unavailable(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.error.code.as_str(),
            "message": self.error.message,
        });
        (self.status, Json(body)).into_response()
    }
}
