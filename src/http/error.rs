//! The one error type of the HTTP edge: `{"code": ..., "message": ...}` with a status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::protocol::{ClientError, ErrorCode};
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: ClientError,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: ErrorCode,
        message: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            error: ClientError::new(code, message),
        }
    }

    pub fn bad_request(
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
