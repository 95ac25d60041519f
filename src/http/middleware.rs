//! The HTTP middleware, from `tower-http`: request ids and tracing for every request
//! (WebSocket handshakes included), and for the room API a body limit, a timeout on the
//! routes that do not stream, and CORS when `--allowed-origins` names the pages that may call it.
//! Errors the layers produce themselves (413, 408) are rewritten into the catalogue's JSON.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::{Level, Span};

use super::ApiError;
use crate::net::ClientAddr;
use crate::protocol::ErrorCode;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the HTTP layers need from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct HttpSettings {
    /// Largest request body: the largest frame (`--max-frame-bytes`).
    pub(crate) max_body: usize,
    /// Longest a non-streaming request may take (`--http-timeout-secs`).
    pub(crate) timeout: Duration,
    /// Pages that may call the room API from a browser (`--allowed-origins`; `*` for any).
    pub(crate) allowed_origins: Vec<String>,
}

/// Request ids `<node>-<n>`: short, unique per node, and they name the node in a log search.
/// A request that arrives with `x-request-id` keeps its own.
#[derive(Debug, Clone)]
struct NodeRequestIds {
    node: Arc<str>,
    next: Arc<AtomicU64>,
}

impl MakeRequestId for NodeRequestIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n}", self.node))
            .ok()
            .map(RequestId::new)
    }
}

/// Request ids (set, echoed in the response) and one tracing span per request around `app`.
pub(crate) fn observed(app: Router, node_id: &str) -> Router {
    let ids = NodeRequestIds {
        node: node_id.into(),
        next: Arc::new(AtomicU64::new(1)),
    };
    let trace = TraceLayer::new_for_http()
        .make_span_with(request_span)
        .on_failure(DefaultOnFailure::new().level(Level::WARN));
    app.layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
        .layer(trace)
        .layer(SetRequestIdLayer::new(X_REQUEST_ID, ids))
}

/// The span of one request, with the client's address (see [`ClientAddr`]). The path only: the
/// query may carry a token, which is never logged.
fn request_span(req: &Request<Body>) -> Span {
    let id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| tracing::field::display(*c));
    tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path(), client)
}

/// The room API's layers. `quick` routes get the timeout; `streaming` ones (SSE) do not.
pub(crate) fn api<S>(quick: Router<S>, streaming: Router<S>, settings: &HttpSettings) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let quick = quick.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        settings.timeout,
    ));
    let api = quick
        .merge(streaming)
        // tower-http's limit instead of axum's 2 MB default: one limit, the frame size.
        .layer(RequestBodyLimitLayer::new(settings.max_body))
        .layer(axum::extract::DefaultBodyLimit::disable());
    match cors(&settings.allowed_origins) {
        Some(cors) => api.layer(cors),
        None => api,
    }
}

/// The timeout for routes outside the room API that do not stream (pages, health).
pub(crate) fn quick<S>(routes: Router<S>, settings: &HttpSettings) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    routes.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        settings.timeout,
    ))
}

/// CORS for the room API, only when origins are configured: without it browsers keep their
/// same-origin rule, which is what the relay's own page needs.
fn cors(allowed: &[String]) -> Option<CorsLayer> {
    if allowed.is_empty() {
        return None;
    }
    let origin = if allowed.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            allowed
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                AUTHORIZATION,
                CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([X_REQUEST_ID])
            .max_age(Duration::from_secs(600)),
    )
}

/// Rewrites the bodies of errors the layers answer by themselves (plain text or empty) into
/// `{"code","message"}`, so every error a client sees comes from the catalogue.
pub(crate) async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    match resp.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::FrameTooLarge,
            "the body is larger than the largest frame the relay accepts (--max-frame-bytes)",
        )
        .into_response(),
        StatusCode::REQUEST_TIMEOUT => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            "the request took too long; try again",
        )
        .into_response(),
        _ => resp,
    }
}
