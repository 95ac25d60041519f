//! The HTTP API: room history and info, publish and events, health, and the browser page.

mod chat;
mod error;
mod health;
mod history;
mod live;
mod middleware;
mod sessions;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub(crate) use error::ApiError;
pub(crate) use middleware::{guarded, observed, HttpSettings};

use crate::protocol::{valid_sid, ErrorCode};
use crate::state::Shared;

pub(crate) fn router(settings: &HttpSettings) -> Router<Arc<Shared>> {
    let api = middleware::api(
        Router::new()
            .route("/v1/sessions/{sid}", get(history::room_info))
            .route("/v1/sessions/{sid}/presence", get(history::presence))
            .route(
                "/v1/sessions/{sid}/messages",
                get(history::messages).post(live::publish),
            )
            .route("/api/sessions", post(sessions::create))
            .route(
                "/api/sessions/{sid}",
                get(sessions::read)
                    .patch(sessions::patch)
                    .delete(sessions::delete),
            )
            .route("/api/sessions/{sid}/messages", get(sessions::messages)),
        // No request timeout: these stream, or wait for the LLM (`--chat-timeout-secs`).
        Router::new()
            .route("/v1/sessions/{sid}/events", get(live::events))
            .route("/api/chat", post(chat::chat))
            .route("/api/chat/stream", post(chat::chat_stream)),
        settings,
    );
    let pages = middleware::quick(
        middleware::page(
            Router::new()
                .route("/", get(index))
                .route("/app.js", get(app_js))
                .route("/style.css", get(style_css)),
        )
        .route("/healthz", get(healthz))
        .route("/api/health", get(health::health))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics)),
        settings,
    );
    // Unknown paths: JSON 404 here; wrong methods: JSON 405 from the error layer.
    api.merge(pages).fallback(not_found)
}

/// Checks a room id from a path or query, as every entry point does.
pub(crate) fn checked_sid(sid: Option<&str>) -> Result<&str, ApiError> {
    match sid {
        Some(s) if valid_sid(s) => Ok(s),
        Some(_) => Err(ApiError::bad_request(
            ErrorCode::InvalidSid,
            "sid must be 1-128 characters of A-Z a-z 0-9 . _ -",
        )),
        None => Err(ApiError::bad_request(
            ErrorCode::InvalidSid,
            "missing sid: connect to /v1/session/chat?sid=ROOM",
        )),
    }
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../../test-clients/web/index.html"))
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../test-clients/web/app.js"),
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../test-clients/web/style.css"),
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match shared.store.ping().await {
        Ok(()) => Json(serde_json::json!({"status": "ready", "redis": "ok"})).into_response(),
        Err(err) => {
            tracing::warn!(cause = %err, "readiness check: redis unreachable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StoreUnavailable,
                "redis is unreachable",
            )
            .into_response()
        }
    }
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}
