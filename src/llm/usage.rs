//! The usage callback: each turn's token counts POSTed to a core service, retried with
//! exponential backoff, on its own task so the room never waits for it.

use std::time::Duration;

use serde::Serialize;

use super::provider::Usage;

#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    pub session_id: String,
    pub turn_id: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl UsageReport {
    pub fn new(sid: &str, turn: &str, model: &str, usage: Usage) -> Self {
        Self {
            session_id: sid.to_owned(),
            turn_id: turn.to_owned(),
            model: model.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
        }
    }
}

pub const ATTEMPTS: u32 = 3;

/// POSTs the report, up to [`ATTEMPTS`] times (backoff 200 ms, 400 ms); `true` on a 2xx.
pub async fn report(http: &reqwest::Client, url: &str, report: &UsageReport) -> bool {
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        let result = http
            .post(url)
            .timeout(Duration::from_secs(5))
            .json(report)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) => tracing::warn!(
                status = r.status().as_u16(),
                attempt,
                "usage callback refused"
            ),
            Err(err) => tracing::warn!(cause = %err, attempt, "usage callback failed"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    tracing::error!(turn = %report.turn_id, "usage callback gave up after {ATTEMPTS} attempts");
    false
}
