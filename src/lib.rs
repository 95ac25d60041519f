//! chat-relay: a real-time chat relay in which people and an LLM talk in rooms, with Redis
//! Streams as the durable, ordered log.
//!
//! # Layout
//!
//! ```text
//!  client ──ws──▶ ws::session reader ─┐                                  (XADD + PUBLISH,
//!  client ─POST─▶ http::live publish ─┼▶ ingress::submit ──▶ store.append ──▶ Redis
//!  voice / eval ─▶ dialect::{voice,eval}┘ (budgets, dispatch,                 one Lua script)
//!                  (translate only)       append / publish)                    │
//!  client ◀──ws── ws::session writer ─┐                                        │
//!  client ◀─SSE── http::live events ──┼─ room::Cursor ◀── room::Room ◀── SUBSCRIBE chat:session:<sid>
//!  voice / eval ◀─ room::TurnReader ──┘ (resume_gap, replay    (fan-out; recovers from XRANGE
//!   (and /api/chat: one turn)            after last_id, live,   when the subscription was lost)
//!                                        skip ids already sent)
//! ```
//!
//! Dependencies point one way: `protocol` ← `store` ← `room` ← `ingress` ← `ws`/`http` ←
//! `relay` (which builds `state::Shared`, the handle `ws` and `http` read). Only `store` talks
//! to Redis. Under all of it, `net` accepts connections (hyper's HTTP/1 server with the
//! timeouts and caps `axum::serve` lacks) and names each request's client address, which every
//! per-address limit (`limits`, `ingress` budgets) uses.

pub mod auth;
pub mod client;
pub mod config;
pub mod dialect;
pub mod dispatch;
pub mod http;
mod ingress;
pub mod limits;
pub mod llm;
pub mod metrics;
mod net;
pub mod protocol;
pub mod relay;
mod retry;
pub mod room;
mod state;
pub mod store;
pub mod telemetry;
pub mod ws;

pub use config::ServeConfig;
pub use net::BadProxy;
pub use relay::run;

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
