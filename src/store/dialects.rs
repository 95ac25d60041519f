//! What the dialect adapters (`crate::dialect`) need from Redis beyond the one way in and out:
//! the voice dialect's request rate per session, and where a finished turn's reply is.

use std::time::Duration;

use fred::interfaces::KeysInterface;
use fred::types::Value;

use super::{value_str, Store, StoreError};
use crate::protocol::StreamId;

/// What [`Store::voice_request`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoiceRate {
    /// Counted: the request may be stored.
    Counted,
    /// The session does not exist (never created, or deleted); nothing was counted.
    NoSession,
    /// The window is full; the oldest request in it leaves after this long.
    Limited { retry_after: Duration },
}

impl Store {
    /// Counts one voice request for session `sid` if the session exists and fewer than `limit`
    /// were counted in the last `window` (a sliding window shared by every node: the log lives
    /// in Redis, timed by Redis's clock).
    pub async fn voice_request(
        &self,
        sid: &str,
        limit: u32,
        window: Duration,
    ) -> Result<VoiceRate, StoreError> {
        let keys = vec![
            self.inner.keys.room(sid),
            self.inner.keys.session_record(sid),
            self.inner.keys.voice_rate(sid),
        ];
        let member = uuid::Uuid::new_v4().simple().to_string();
        let args = vec![
            limit.to_string(),
            (window.as_millis() as u64).max(1).to_string(),
            member,
        ];
        let reply = self
            .eval_script(&self.inner.scripts.voice_rate, keys, args)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(StoreError::Reply("voice rate reply is not an array"));
        };
        match parts.first().and_then(value_str).as_deref() {
            Some("ok") => Ok(VoiceRate::Counted),
            Some("missing") => Ok(VoiceRate::NoSession),
            Some("limited") => {
                let ms = parts.get(1).and_then(Value::as_u64).unwrap_or(1000);
                Ok(VoiceRate::Limited {
                    retry_after: Duration::from_millis(ms),
                })
            }
            _ => Err(StoreError::Reply("voice rate reply unknown")),
        }
    }

    /// The id of the final entry of `turn`, if it has one (read from the turn's done-marker,
    /// kept a day): a client following a finished turn starts reading the room right there.
    pub async fn turn_reply(
        &self,
        sid: &str,
        turn: StreamId,
    ) -> Result<Option<StreamId>, StoreError> {
        let marker: Option<String> = self
            .inner
            .client
            .get(self.inner.keys.turn(sid, turn))
            .await?;
        Ok(marker
            .as_deref()
            .and_then(|m| m.strip_prefix("done:"))
            .and_then(|id| id.parse().ok()))
    }
}
