//! The HTTP middleware, mostly from `tower-http`: request ids and tracing for every request
//! (WebSocket handshakes included); the rules every request passes before routing ([`guarded`]:
//! head sizes, the origin rule for browser requests, JSON bodies); for the room API a body
//! limit, a timeout on the routes that do not stream, and CORS when `--allowed-origins` names
//! the pages that may call it; security headers for the page.
//!
//! Every refusal is the catalogue's `{"code","message"}`: those the layers, extractors and the
//! router answer by themselves (plain text or empty: 400, 405, 408, 413, ...) are rewritten by
//! [`json_errors`], which keeps their status and headers (`Allow` on a 405).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{
    ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ORIGIN,
    TRANSFER_ENCODING, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::{Level, Span};

use super::ApiError;
use crate::auth::Authenticator;
use crate::net::ClientAddr;
use crate::protocol::ErrorCode;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request target (path and query) answered; longer gets `414 uri_too_long`.
const MAX_URI_BYTES: usize = 16 * 1024;
/// Most header bytes (names and values) and lines answered; more gets `431
/// headers_too_large`. Both sit below hyper's own limits (`net`), whose refusals are not JSON.
const MAX_HEADER_BYTES: usize = 32 * 1024;
const MAX_HEADER_LINES: usize = 100;
/// The page's policy: its own scripts, styles and connections only (the WebSocket included:
/// `'self'` covers `ws:`/`wss:` to the same host), no plugins, never framed.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

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

/// Request ids (set, echoed in the response) and one tracing span per request around `app`,
/// and the catalogue's JSON for errors that routing and the layers answer by themselves
/// ([`json_errors`]), on every route, the WebSocket's included.
pub(crate) fn observed(app: Router, node_id: &str) -> Router {
    let ids = NodeRequestIds {
        node: node_id.into(),
        next: Arc::new(AtomicU64::new(1)),
    };
    let trace = TraceLayer::new_for_http()
        .make_span_with(request_span)
        .on_failure(DefaultOnFailure::new().level(Level::WARN));
    app.layer(axum::middleware::map_response(json_errors))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
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
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers([
                AUTHORIZATION,
                CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([X_REQUEST_ID])
            .max_age(Duration::from_secs(600)),
    )
}

/// The rules every request passes before routing, and the JSON rewrite of every refusal:
///
/// - a request target over 16 KiB: `414 uri_too_long`; headers over 32 KiB or 100 lines:
///   `431 headers_too_large`;
/// - a request from a browser page (it has `Origin`) whose origin the WebSocket would refuse:
///   `403 forbidden_origin`, so no page can post into a room with a simple request;
/// - a body that is not `application/json`: `415 unsupported_media_type` (also what keeps
///   cross-site form posts out: they cannot send that type without a preflight);
/// - `X-Content-Type-Options: nosniff` on every response.
pub(crate) fn guarded(app: Router, auth: &Authenticator) -> Router {
    let auth = Arc::new(auth.clone());
    app.layer(axum::middleware::map_request(json_bodies_only))
        .layer(axum::middleware::map_request(move |req: Request<Body>| {
            let auth = auth.clone();
            async move { allowed_origin(&auth, req) }
        }))
        .layer(axum::middleware::map_request(bounded_head))
        .layer(axum::middleware::map_response(json_errors))
        .layer(SetResponseHeaderLayer::overriding(
            X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
}

/// The page's headers: its content security policy, and never in a frame.
pub(crate) fn page<S>(routes: Router<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    routes
        .layer(SetResponseHeaderLayer::overriding(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_CSP),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
}

async fn bounded_head(req: Request<Body>) -> Result<Request<Body>, ApiError> {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            ErrorCode::UriTooLong,
            "the request target (path and query) is longer than 16 KiB",
        ));
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > MAX_HEADER_BYTES || headers.len() > MAX_HEADER_LINES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::HeadersTooLarge,
            "the request headers are larger than 32 KiB or more than 100 lines",
        ));
    }
    Ok(req)
}

fn allowed_origin(auth: &Authenticator, req: Request<Body>) -> Result<Request<Body>, ApiError> {
    if req.headers().contains_key(ORIGIN) && !auth.origin_allowed(req.headers()) {
        tracing::debug!("request from a foreign origin refused");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::ForbiddenOrigin,
            "this page's origin may not use the relay (see --allowed-origins)",
        ));
    }
    Ok(req)
}

async fn json_bodies_only(req: Request<Body>) -> Result<Request<Body>, ApiError> {
    let headers = req.headers();
    let has_body = headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if has_body && !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    Ok(req)
}

/// Rewrites refusals that are not JSON — from a layer, an extractor (a query that does not
/// parse, a parameter given twice), the router (405) — into `{"code","message"}` with the same
/// status and headers, so every refusal a client sees comes from the catalogue.
pub(crate) async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || resp.status().as_u16() < 400 {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let (code, message) = match parts.status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::FrameTooLarge,
            "the body is larger than the largest frame the relay accepts (--max-frame-bytes)",
        ),
        StatusCode::REQUEST_TIMEOUT => (
            ErrorCode::RequestTimeout,
            "the request took too long; try again",
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            "this endpoint does not take that method (see Allow)",
        ),
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such endpoint"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            ErrorCode::UnsupportedMediaType,
            "send the body as JSON with Content-Type: application/json",
        ),
        s if s.is_server_error() => (ErrorCode::Internal, "the relay failed to answer"),
        _ => (ErrorCode::InvalidRequest, "the request is malformed"),
    };
    // An extractor's own text says what was wrong (e.g. "duplicate field `sid`"): short, made
    // by serde from the request, never from internals.
    let detail = match code {
        ErrorCode::InvalidRequest => axum::body::to_bytes(body, 512)
            .await
            .ok()
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
            .filter(|t| !t.trim().is_empty()),
        _ => None,
    };
    // A 405 names the methods the path takes (its `Allow`).
    let detail = detail.or_else(|| {
        let allow = parts.headers.get(ALLOW)?.to_str().ok()?;
        (code == ErrorCode::MethodNotAllowed && !allow.is_empty())
            .then(|| format!("this path does not take that method; it takes {allow}"))
    });
    crate::metrics::error(code.as_str());
    let json = match detail {
        Some(detail) => ApiError::new(parts.status, code, detail),
        None => ApiError::new(parts.status, code, message),
    }
    .into_response();
    let (json_parts, json_body) = json.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, json_body)
}
