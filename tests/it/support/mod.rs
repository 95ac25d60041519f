#![allow(dead_code)]

pub mod redis;
pub mod relay;
pub mod sse;
pub mod ws;

pub use self::redis::RedisServer;
pub use relay::{Relay, RelayProcess, WorkerProcess};
pub use sse::SseReader;
pub use testkit::{Callback, FakeLlm, Mode};
pub use ws::WsClient;

use std::sync::atomic::{AtomicU64, Ordering};

/// A room id unique in this test run, so tests never share a room.
pub fn unique_sid(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Flags that lift the per-connection and per-room rate limits, for tests that flood on purpose.
pub const NO_RATE_LIMITS: &[&str] = &[
    "--msgs-per-sec",
    "100000",
    "--msgs-burst",
    "100000",
    "--room-msgs-per-sec",
    "100000",
    "--room-msgs-burst",
    "100000",
];
