//! Prometheus metrics, served at `GET /metrics`. Every name is here, with what it counts.
//!
//! Hot paths record once per event, not once per socket: fan-out adds the number of members it
//! queued a frame for in one increment.

use std::sync::{LazyLock, OnceLock};

use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Handles of the metrics recorded per frame or per entry, resolved once: `counter!` looks its
/// key up in the registry on every call, which S1's profile showed per message. Resolved on
/// first use, which is after [`install`] (the relay installs the recorder before it serves).
pub(crate) struct Hot {
    pub(crate) frames_in: Counter,
    pub(crate) frames_out: Counter,
    pub(crate) delivery_lag: Histogram,
}

pub(crate) static HOT: LazyLock<Hot> = LazyLock::new(|| Hot {
    frames_in: metrics::counter!(FRAMES_IN),
    frames_out: metrics::counter!(FRAMES_OUT),
    delivery_lag: metrics::histogram!(DELIVERY_LAG_SECONDS),
});

/// Open WebSocket connections (gauge).
pub(crate) const CONNECTIONS: &str = "chat_relay_connections";
/// Rooms with a live subscription on this node (gauge).
pub(crate) const ROOMS: &str = "chat_relay_rooms";
/// Text frames received from clients.
pub(crate) const FRAMES_IN: &str = "chat_relay_frames_in_total";
/// Room frames queued to sockets (stored entries and live frames, per member).
pub(crate) const FRAMES_OUT: &str = "chat_relay_frames_out_total";
/// Entries appended to room streams, by `event`.
pub(crate) const STORED: &str = "chat_relay_entries_stored_total";
/// Append latency (XADD + PUBLISH script), seconds.
pub(crate) const APPEND_SECONDS: &str = "chat_relay_append_seconds";
/// Entries per append script call (group commit), a histogram.
pub(crate) const APPEND_BATCH_ENTRIES: &str = "chat_relay_append_batch_entries";
/// From an entry's stream id (its XADD time) to its fan-out on this node, seconds.
pub(crate) const DELIVERY_LAG_SECONDS: &str = "chat_relay_delivery_lag_seconds";
/// Clients disconnected because their queue was full.
pub(crate) const SLOW_DISCONNECTS: &str = "chat_relay_slow_disconnects_total";
/// Error frames and refusals sent to clients, by `code`.
pub(crate) const ERRORS: &str = "chat_relay_errors_total";
/// LLM turns ended, by `outcome` (`response`, `cancelled`, `error`, `rate_limited`).
pub(crate) const LLM_TURNS: &str = "chat_relay_llm_turns_total";
/// LLM tokens, by `kind` (`prompt`, `completion`).
pub(crate) const LLM_TOKENS: &str = "chat_relay_llm_tokens_total";
/// From asking the provider to its first token, seconds.
pub(crate) const LLM_FIRST_TOKEN_SECONDS: &str = "chat_relay_llm_first_token_seconds";
/// A whole LLM turn at the provider, seconds.
pub(crate) const LLM_TURN_SECONDS: &str = "chat_relay_llm_turn_seconds";

/// Rooms an LLM worker reads (gauge).
pub(crate) const LLM_ROOMS: &str = "chat_relay_llm_rooms";
/// Usage callbacks waiting in the outbox (gauge, as last seen by this worker).
pub(crate) const USAGE_PENDING: &str = "chat_relay_usage_callbacks_pending";
/// Usage callback attempts, by `outcome` (`delivered`, `retry`, `dead`).
pub(crate) const USAGE_CALLBACKS: &str = "chat_relay_usage_callbacks_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls (more relays in one test process) share
/// it. `None` if another recorder was installed first.
pub(crate) fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Suffix("seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ],
            );
            let builder = match builder {
                Ok(b) => b,
                Err(err) => {
                    tracing::warn!(cause = %err, "metrics buckets rejected; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "Open WebSocket connections");
    describe_gauge!(ROOMS, "Rooms with a live subscription on this node");
    describe_counter!(FRAMES_IN, "Text frames received from clients");
    describe_counter!(FRAMES_OUT, "Room frames queued to sockets");
    describe_counter!(STORED, "Entries appended to room streams, by event");
    describe_histogram!(
        APPEND_SECONDS,
        Unit::Seconds,
        "Append (one group-commit script call) latency"
    );
    describe_histogram!(
        APPEND_BATCH_ENTRIES,
        "Entries stored per append script call (group commit)"
    );
    describe_histogram!(
        DELIVERY_LAG_SECONDS,
        Unit::Seconds,
        "Stream id time to fan-out on this node"
    );
    describe_counter!(SLOW_DISCONNECTS, "Clients dropped for a full queue");
    describe_counter!(ERRORS, "Errors sent to clients, by code");
    describe_counter!(LLM_TURNS, "LLM turns ended, by outcome");
    describe_counter!(LLM_TOKENS, "LLM tokens, by kind");
    describe_histogram!(
        LLM_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Provider time to first token"
    );
    describe_gauge!(
        LLM_ROOMS,
        "Rooms an LLM worker reads (traffic within the wake window)"
    );
    describe_gauge!(USAGE_PENDING, "Usage callbacks waiting in the outbox");
    describe_counter!(USAGE_CALLBACKS, "Usage callback attempts, by outcome");
    describe_histogram!(
        LLM_TURN_SECONDS,
        Unit::Seconds,
        "Provider time for a whole turn"
    );
}

/// The Prometheus text exposition of every metric.
pub(crate) fn render() -> String {
    match install() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::from("# metrics recorder unavailable\n"),
    }
}

/// Counts an error sent to a client.
pub(crate) fn error(code: &'static str) {
    metrics::counter!(ERRORS, "code" => code).increment(1);
}

/// One open WebSocket (of any dialect) in [`CONNECTIONS`] while it lives, however it ends.
#[derive(Debug)]
pub(crate) struct Connected(());

impl Connected {
    pub(crate) fn open() -> Self {
        metrics::gauge!(CONNECTIONS).increment(1.0);
        Connected(())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS).decrement(1.0);
    }
}
