//! The accept loop: HTTP/1.1 and WebSocket upgrades on one listener, with what `axum::serve`
//! leaves out (it has no header-read timeout and no per-address connection cap):
//!
//! - a **header-read timeout** (`--header-read-timeout-secs`): hyper's, which runs whenever the
//!   connection waits for a request head — from the first byte of a new connection, and between
//!   keep-alive requests — so a slowloris holding a partial request line is cut;
//! - an **idle timeout** (`--idle-timeout-secs`): a connection that has not upgraded and moved no
//!   byte either way for that long is shut down (gracefully: a response in flight finishes);
//! - a **write-stall timeout** (`--write-timeout-secs`) on every socket ([`io::Watched`]), which
//!   cuts event-stream readers that stopped reading and frees what was queued for them;
//! - a **per-address cap on open TCP connections** (`--max-tcp-conns-per-ip`), answered with a
//!   `429` JSON body before the request is read; trusted proxies are exempt (they carry many
//!   clients);
//! - the **client address** ([`ClientAddr`], from [`TrustedProxies`]) as a request extension,
//!   beside `ConnectInfo<SocketAddr>` (the TCP peer);
//! - `TCP_NODELAY`, and graceful shutdown when the token fires.
//!
//! HTTP/1.1 only, as `axum::serve` was in this build: HTTP/2 would bring a second protocol
//! with no header-read timeout, for no client that needs it.

mod client_addr;
mod io;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub use client_addr::BadProxy;
pub(crate) use client_addr::{ClientAddr, TrustedProxies};

use crate::limits::Slots;
use crate::protocol::ErrorCode;
use io::{Activity, Watched};

/// The largest request head hyper buffers. Heads beyond it get hyper's own (empty) `431`; the
/// HTTP layer refuses smaller excesses with JSON (see `http::middleware`).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header lines hyper parses; the HTTP layer's own, lower limit answers with JSON.
const MAX_HEADER_LINES: usize = 200;
/// How often a connection checks whether it has been idle too long.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a connection refused at accept may take to receive its 429.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after an accept error other than a dropped connection (e.g. out of file descriptors),
/// so the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connection settings from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct NetSettings {
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) max_tcp_conns_per_ip: usize,
    pub(crate) trusted_proxies: TrustedProxies,
}

/// Serves `app` on `listener` until `token` fires. Connection tasks run on `tracker`, so the
/// caller's shutdown wait covers them too.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: NetSettings,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADER_LINES);
    let tcp = Slots::default();
    let trusted = Arc::new(settings.trusted_proxies.clone());
    loop {
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failed(err).await;
                    continue;
                }
            },
        };
        // Small frames must leave at once: Nagle's algorithm would hold them for the peer's ACK.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(cause = %err, "TCP_NODELAY not set");
        }
        let peer_ip = peer.ip().to_canonical();
        let slot = if trusted.contains(peer_ip) {
            None
        } else {
            let key = ClientAddr(peer_ip).limit_key();
            match tcp.acquire(key, settings.max_tcp_conns_per_ip) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%peer, "too many open connections from this address");
                    crate::metrics::error(ErrorCode::TooManyConnections.as_str());
                    tokio::spawn(refuse(stream));
                    continue;
                }
            }
        };
        let activity = Activity::new();
        let io = Watched::new(stream, activity.clone(), settings.write_timeout, slot);
        let trusted = trusted.clone();
        let service = app.clone().map_request(move |mut req: Request<Incoming>| {
            let client = trusted.client(peer, req.headers());
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(client);
            req
        });
        let connection = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .with_upgrades();
        let (token, idle_timeout) = (token.clone(), settings.idle_timeout);
        // Until the connection ends or upgrades (the upgraded socket then belongs to its
        // WebSocket session): shut down gracefully on the token, or once idle too long.
        tracker.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut check = tokio::time::interval(IDLE_CHECK_EVERY.min(idle_timeout));
            let mut closing = false;
            loop {
                tokio::select! {
                    done = connection.as_mut() => {
                        if let Err(err) = done {
                            tracing::debug!(%peer, cause = %err, "connection ended with an error");
                        }
                        return;
                    }
                    _ = token.cancelled(), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = check.tick(), if !closing => {
                        if activity.idle_for() >= idle_timeout {
                            tracing::debug!(%peer, "idle connection closed");
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        });
    }
}

/// Answers a connection over the per-address cap with a JSON 429, without reading its request.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::json!({
        "code": ErrorCode::TooManyConnections.as_str(),
        "message": "too many open connections from your address",
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent before closing: closing with unread data resets the
        // connection, and the client could lose the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

async fn accept_failed(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(cause = %err, "accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}
