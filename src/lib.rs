//! chat-relay: a real-time chat relay in which people and an LLM talk in rooms, with Redis
//! Streams as the durable, ordered log.
//!
//! # Layout
//!
//! ```text
//!  client ──ws──▶ ws::session reader ─┐                          (group commit per room: XADD each,
//!  client ─POST─▶ http::live publish ─┼▶ ingress::submit ──▶ store.append ──▶ Redis
//!  voice / eval ─▶ dialect::{voice,eval}┘ (budgets, dispatch,       SPUBLISH once, one Lua script)
//!                  (translate only)       append / publish)                    │
//!  client ◀──ws── ws::session writer ─┐                                        │
//!  client ◀─SSE── http::live events ──┼─ room::Cursor ◀── room::Room ◀── SSUBSCRIBE chat:session:<sid>
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

#![warn(unreachable_pub)]

mod auth;
pub mod client;
pub mod config;
mod dialect;
pub mod dispatch;
mod http;
mod ingress;
mod limits;
mod llm;
mod metrics;
mod net;
pub mod protocol;
mod relay;
mod retry;
mod room;
mod state;
mod store;
pub mod telemetry;
mod ws;

// The library's surface: what the binary, the tests, the benchmarks and the tools use. Every
// other item is `pub(crate)` at most (`unreachable_pub` is on), so this list is the API.
pub use auth::{mint, parse_ttl, MintError};
pub use config::ServeConfig;
pub use llm::{run_worker, WorkerError};
pub use net::BadProxy;
pub use relay::{run, RelayError};
pub use store::{lease_holder, Keys, RedisSettings, Store, StoreError, VoiceRate};

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
