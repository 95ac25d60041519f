//! Wall-clock readings for reports and for latency carried in frames (`bd.t`, `hd.ts`).

use std::time::{SystemTime, UNIX_EPOCH};

fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn epoch_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn epoch_us() -> u64 {
    since_epoch().as_micros() as u64
}
