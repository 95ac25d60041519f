//! `GET /api/health`: `{"status", "redis", "llm"}` for front ends and load balancers that expect
//! the chatbot backend's health route. `503` with `"status":"degraded"` when Redis does not
//! answer (nothing works without it); an unreachable LLM server is reported but still `200`
//! (people can chat, only the LLM participant is missing).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::state::Shared;

/// Longest wait for the LLM server's answer to the probe.
const LLM_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let (redis, llm) = tokio::join!(shared.store.ping(), llm_reachable(&shared.api.llm_base_url));
    if let Err(err) = &redis {
        tracing::warn!(cause = %err, "health check: redis unreachable");
    }
    let status = if redis.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if redis.is_ok() { "ok" } else { "degraded" },
        "redis": if redis.is_ok() { "ok" } else { "unavailable" },
        "llm": if llm { "ok" } else { "unavailable" },
    });
    (status, Json(body)).into_response()
}

/// Whether the OpenAI-compatible server answers `GET <base>/models` (any status below 500:
/// a server without that route still answers, so it is up). A probe, not the provider: the
/// provider lives with the LLM participant, which may run in other processes.
async fn llm_reachable(base_url: &str) -> bool {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    let Some(client) = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(LLM_PROBE_TIMEOUT)
            .build()
            .ok()
    }) else {
        return false;
    };
    let url = format!("{}/models", base_url.trim_end_matches('/'));
    match client.get(url).send().await {
        Ok(resp) => !resp.status().is_server_error(),
        Err(err) => {
            tracing::debug!(cause = %err, "health check: LLM server unreachable");
            false
        }
    }
}
