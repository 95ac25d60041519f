//! The usage callback: each turn's token counts POSTed to a core service, retried with
//! exponential backoff, on its own task so the room never waits for it.

use std::time::Duration;

use backon::Retryable;
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

pub const ATTEMPTS: usize = 3;

/// A refusal or failure of one delivery attempt.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("refused with HTTP {0}")]
    Status(u16),
    #[error("request failed")]
    Request(#[from] reqwest::Error),
}

/// POSTs the report, up to [`ATTEMPTS`] times (backoff 200 ms, 400 ms); `true` on a 2xx.
pub async fn report(http: &reqwest::Client, url: &str, report: &UsageReport) -> bool {
    let attempt = || async {
        let r = http
            .post(url)
            .timeout(Duration::from_secs(5))
            .json(report)
            .send()
            .await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(Failed::Status(r.status().as_u16()))
        }
    };
    let res = attempt
        .retry(crate::retry::bounded(
            Duration::from_millis(200),
            Duration::from_secs(2),
            ATTEMPTS - 1,
        ))
        .notify(|err, _| tracing::warn!(cause = %err, "usage callback failed; retrying"))
        .await;
    if let Err(err) = res {
        tracing::error!(turn = %report.turn_id, cause = %err, "usage callback gave up after {ATTEMPTS} attempts");
        return false;
    }
    true
}
