//! Wires the relay together and runs it until the shutdown token fires.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthConfigError, Authenticator};
use crate::config::{ConfigError, ServeConfig, Toggle};
use crate::dispatch::RolePolicy;
use crate::http::HttpSettings;
use crate::ingress::{BudgetSettings, Ingress};
use crate::limits::MemberSlots;
use crate::room::{Presence, Rooms};
use crate::state::{ApiSettings, SessionSettings, Shared};
use crate::store::StoreError;

/// Failure to start the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot set up the Redis client")]
    Store(#[from] StoreError),
    #[error("invalid authentication settings")]
    Auth(#[from] AuthConfigError),
}

/// Checks `cfg`, then serves WebSocket and HTTP on `listener` until `token` is cancelled, then
/// closes sessions
/// (1001), lets in-flight appends finish within the grace period, and disconnects from Redis.
pub async fn run(
    listener: TcpListener,
    cfg: ServeConfig,
    token: CancellationToken,
) -> Result<(), RelayError> {
    cfg.validate()?;
    crate::metrics::install();
    let auth = Authenticator::from_args(&cfg.auth)?;
    let store = cfg.redis.store()?;
    let tracker = TaskTracker::new();
    if cfg.llm == Toggle::On {
        let (store, args, token, t) = (
            store.clone(),
            cfg.llm_args.clone(),
            token.clone(),
            tracker.clone(),
        );
        tracker.spawn(async move {
            if let Err(err) = crate::llm::run_worker(store, args, token, t).await {
                tracing::error!(cause = %err, "LLM participant stopped");
            }
        });
    }
    let rooms = Rooms::start(store.clone(), &tracker, token.clone())?;
    let node = node_id();
    let presence = Presence::start(store.clone(), &node, &tracker, token.clone());
    let ingress = Ingress::new(
        store.clone(),
        RolePolicy::new(&cfg.roles),
        cfg.limits(),
        &BudgetSettings {
            msgs_per_sec: cfg.msgs_per_sec,
            msgs_burst: cfg.msgs_burst,
            room_msgs_per_sec: cfg.room_msgs_per_sec,
            room_msgs_burst: cfg.room_msgs_burst,
            room_creations_per_sec: cfg.room_creations_per_sec,
            room_creations_burst: cfg.room_creations_burst,
            handshakes_per_sec: cfg.handshakes_per_sec,
            handshakes_burst: cfg.handshakes_burst,
            abuse_strikes: cfg.abuse_strikes,
        },
    )?;
    let ingress = ingress.with_cancel_policy(cfg.llm_cancel);
    ingress.spawn_eviction(&tracker, token.clone());
    let shared = Arc::new(Shared {
        store: store.clone(),
        rooms,
        presence,
        ingress,
        auth,
        members: MemberSlots::new(cfg.max_conns_per_room, cfg.max_conns_per_ip),
        session: SessionSettings {
            limits: cfg.limits(),
            outbound_queue: cfg.outbound_queue,
            send_window: cfg.send_window,
            ping_interval: Duration::from_secs(cfg.ping_secs),
            write_timeout: Duration::from_secs(cfg.write_timeout_secs),
        },
        api: ApiSettings {
            require_session: cfg.require_session,
            chat_timeout: Duration::from_secs(cfg.chat_timeout_secs),
            llm_base_url: cfg.llm_args.llm_base_url.clone(),
        },
        dialects: cfg.dialects.clone(),
        token: token.clone(),
        tracker: tracker.clone(),
        next_conn: AtomicU64::new(1),
        node_id: node,
    });

    let http = HttpSettings {
        max_body: cfg.max_frame_bytes,
        timeout: Duration::from_secs(cfg.http_timeout_secs),
        allowed_origins: cfg.auth.allowed_origins.clone(),
    };
    let app = crate::http::router(&http)
        .merge(crate::ws::router())
        .merge(crate::dialect::router())
        .with_state(shared.clone());
    let app = crate::http::observed(crate::http::guarded(app, &shared.auth), &shared.node_id);
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, redis = %cfg.redis.redis_url, node = %shared.node_id, "relay listening");
    crate::net::serve(listener, app, cfg.net()?, token.clone(), tracker.clone()).await;

    tracker.close();
    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "shutdown grace expired with tasks still running"
        );
    }
    store.quit().await;
    tracing::info!("relay stopped");
    Ok(())
}

/// A name for this process, unique among the nodes with a margin: it keys the node's presence
/// entries and prefixes its connection ids. 48 random bits (the standard library seeds its hash
/// keys randomly per process), mixed with the pid and the clock.
fn node_id() -> String {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let random =
        std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()));
    format!("{:012x}", random & 0xffff_ffff_ffff)
}
