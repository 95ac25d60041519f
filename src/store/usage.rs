//! The usage-callback outbox: callbacks the finish script queued, delivered by any worker with
//! leases, retries at stored due times, and a dead-letter stream.
//!
//! Each room has its own outbox (a sorted set by due time, beside the room's keys, so the finish
//! script can write it atomically with the final entry even on Redis Cluster). A global index
//! of rooms with callbacks lets workers find them without scanning; a room is listed before its
//! callback is queued and unlisted only when its outbox is empty and nothing was added to it
//! for a while, so no callback is ever left unlisted.
//!
//! Deleting a session must not forget what it owes: its pending callbacks, and those of turns
//! that end after it is gone, move to one more outbox, [`DELETED_SESSIONS`], whose name no
//! session can have, so a `SCAN` for a deleted session's id still finds nothing.

use fred::interfaces::{HashesInterface, SortedSetsInterface, StreamsInterface};
use fred::types::Value;

use super::{value_str, Store, StoreError};

/// A room stays in the index this long after its last callback was queued, even when empty.
const INDEX_GRACE_MS: u64 = 5 * 60 * 1000;

/// The outbox of deleted sessions, in the index like a room's. `:` is not in a session id's
/// alphabet, so no session's keys, and no `SCAN` pattern for one, name it. Its members are
/// `<turn id> <session id>`: turn ids are stream ids, unique only within their session.
pub(crate) const DELETED_SESSIONS: &str = ":deleted";

/// One callback taken for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCallback {
    /// The session and the turn it bills.
    pub sid: String,
    pub turn: String,
    /// Where it waits: the session's own outbox, or [`DELETED_SESSIONS`]; and its name there.
    outbox: String,
    member: String,
    pub body: String,
    pub created_ms: u64,
    /// Attempts so far, this one included.
    pub attempts: u64,
}

impl Store {
    /// Lists a room in the index of rooms with callbacks to deliver.
    pub(super) async fn note_usage_room(&self, sid: &str) -> Result<(), StoreError> {
        let now = crate::protocol::now_ms() as f64;
        let _: Value = self
            .inner
            .client
            .zadd(
                self.inner.keys.usage_rooms(),
                None,
                None,
                false,
                false,
                (now, sid),
            )
            .await?;
        Ok(())
    }

    /// Rooms that may have callbacks to deliver (at most `count`).
    pub async fn usage_rooms(&self, count: i64) -> Result<Vec<String>, StoreError> {
        let reply: Value = self
            .inner
            .client
            .zrange(
                self.inner.keys.usage_rooms(),
                0,
                count - 1,
                None,
                false,
                None,
                false,
            )
            .await?;
        Ok(match reply {
            Value::Array(items) => items.iter().filter_map(value_str).collect(),
            _ => Vec::new(),
        })
    }

    /// Takes up to `count` due callbacks of a room under a lease of `lease_ms`; also returns how
    /// many callbacks the room has pending in all.
    pub async fn claim_usage(
        &self,
        sid: &str,
        lease_ms: u64,
        count: u64,
    ) -> Result<(u64, Vec<PendingCallback>), StoreError> {
        let keys = vec![
            self.inner.keys.usage_outbox(sid),
            self.inner.keys.usage_records(sid),
        ];
        let args = vec![
            crate::protocol::now_ms().to_string(),
            lease_ms.to_string(),
            count.to_string(),
        ];
        let reply: Value = self
            .eval_script(&self.inner.scripts.usage_claim, keys, args)
            .await?;
        let Value::Array(items) = reply else {
            return Err(StoreError::Reply("usage claim reply is not an array"));
        };
        let mut it = items.into_iter();
        let pending = it.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let claimed = it
            .filter_map(|item| {
                let Value::Array(parts) = item else {
                    return None;
                };
                let text = |i: usize| parts.get(i).and_then(value_str);
                let member = text(0)?;
                // Only this module writes members there; one without its session is still
                // delivered (its body names the session) rather than leased forever.
                let (turn, owner) = match sid {
                    DELETED_SESSIONS => member.split_once(' ').unwrap_or((member.as_str(), "")),
                    _ => (member.as_str(), sid),
                };
                Some(PendingCallback {
                    sid: owner.to_owned(),
                    turn: turn.to_owned(),
                    outbox: sid.to_owned(),
                    member: member.clone(),
                    body: text(1)?,
                    created_ms: text(2).and_then(|t| t.parse().ok()).unwrap_or(0),
                    attempts: parts.get(3).and_then(Value::as_u64).unwrap_or(1),
                })
            })
            .collect();
        Ok((pending, claimed))
    }

    /// Delivered: forget the callback.
    pub async fn usage_delivered(&self, cb: &PendingCallback) -> Result<(), StoreError> {
        self.settle_usage(cb, "drop", 0).await
    }

    /// Not delivered yet: try again at `due_ms`.
    pub async fn usage_retry_at(
        &self,
        cb: &PendingCallback,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        self.settle_usage(cb, "retry", due_ms).await
    }

    /// Given up: the callback moves to the dead-letter stream.
    pub async fn usage_dead_letter(
        &self,
        cb: &PendingCallback,
        last_error: &str,
    ) -> Result<(), StoreError> {
        let _: Value = self
            .inner
            .client
            .xadd(
                self.inner.keys.usage_dead(),
                false,
                ("MAXLEN", "~", 100_000),
                "*",
                vec![
                    ("sid", cb.sid.as_str()),
                    ("turn_id", cb.turn.as_str()),
                    ("attempts", &cb.attempts.to_string()),
                    ("last_error", last_error),
                    ("body", cb.body.as_str()),
                ],
            )
            .await?;
        self.settle_usage(cb, "drop", 0).await
    }

    async fn settle_usage(
        &self,
        cb: &PendingCallback,
        how: &str,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        let keys = vec![
            self.inner.keys.usage_outbox(&cb.outbox),
            self.inner.keys.usage_records(&cb.outbox),
        ];
        let args = vec![cb.member.clone(), how.to_owned(), due_ms.to_string()];
        let _: Value = self
            .eval_script(&self.inner.scripts.usage_settle, keys, args)
            .await?;
        Ok(())
    }

    /// The usage callbacks `sid` has queued, as [`Store::adopt_usage`] takes them.
    pub(super) async fn usage_owed(&self, sid: &str) -> Result<Vec<[String; 5]>, StoreError> {
        let due: Value = self
            .inner
            .client
            .zrange(
                self.inner.keys.usage_outbox(sid),
                0,
                -1,
                None,
                false,
                None,
                true,
            )
            .await?;
        // RESP2 answers `[member, score, ...]`, RESP3 `[[member, score], ...]`.
        let flat: Vec<String> = match due {
            Value::Array(items) => items
                .into_iter()
                .flat_map(|item| match item {
                    Value::Array(pair) => pair,
                    other => vec![other],
                })
                .filter_map(|v| value_str(&v))
                .collect(),
            _ => Vec::new(),
        };
        if flat.is_empty() {
            return Ok(Vec::new());
        }
        let records: std::collections::HashMap<String, String> = self
            .inner
            .client
            .hgetall(self.inner.keys.usage_records(sid))
            .await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| {
                let (turn, due) = (&pair[0], &pair[1]);
                let field = |suffix: &str| records.get(&format!("{turn}{suffix}")).cloned();
                Some([
                    turn.clone(),
                    due.clone(),
                    field("")?,
                    field("#created").unwrap_or_else(|| "0".to_owned()),
                    field("#attempts").unwrap_or_else(|| "0".to_owned()),
                ])
            })
            .collect())
    }

    /// Moves callbacks of session `sid` (deleted) to the outbox of deleted sessions. Each is
    /// `(turn id, due ms, body, created ms, attempts so far)`.
    pub(super) async fn adopt_usage(
        &self,
        sid: &str,
        callbacks: &[[String; 5]],
    ) -> Result<(), StoreError> {
        if callbacks.is_empty() {
            return Ok(());
        }
        // Listed first, as for any outbox (see the module's doc).
        self.note_usage_room(DELETED_SESSIONS).await?;
        let keys = vec![
            self.inner.keys.usage_outbox(DELETED_SESSIONS),
            self.inner.keys.usage_records(DELETED_SESSIONS),
        ];
        let mut args = Vec::with_capacity(5 * callbacks.len());
        for [turn, due, body, created, attempts] in callbacks {
            args.extend([
                format!("{turn} {sid}"),
                due.clone(),
                body.clone(),
                created.clone(),
                attempts.clone(),
            ]);
        }
        let _: Value = self
            .eval_script(&self.inner.scripts.usage_adopt, keys, args)
            .await?;
        Ok(())
    }

    /// Queues the callback of a turn that ended after its session was deleted (or deleted and
    /// created again): billed all the same, from the outbox of deleted sessions. Its `turn` is
    /// 0: the room that would have counted it is gone.
    pub async fn bill_deleted_session(
        &self,
        sid: &str,
        turn: crate::protocol::StreamId,
        callback: &str,
    ) -> Result<(), StoreError> {
        let now = crate::protocol::now_ms().to_string();
        let body = with_ordinal(callback, 0);
        self.adopt_usage(
            sid,
            &[[turn.to_string(), now.clone(), body, now, "0".to_owned()]],
        )
        .await
    }

    /// Unlists a room whose outbox is empty, unless a callback was queued there recently.
    pub async fn forget_usage_room(&self, sid: &str) -> Result<(), StoreError> {
        let stale_before = crate::protocol::now_ms().saturating_sub(INDEX_GRACE_MS);
        let args = vec![sid.to_owned(), stale_before.to_string()];
        let _: Value = self
            .eval_script(
                &self.inner.scripts.usage_forget,
                self.inner.keys.usage_rooms(),
                args,
            )
            .await?;
        Ok(())
    }
}

/// The callback body with its turn ordinal, as `finish.lua` completes it: `{...,"turn":n}`.
fn with_ordinal(body: &str, ordinal: u64) -> String {
    let open = body.strip_suffix('}').unwrap_or(body);
    format!("{open},\"turn\":{ordinal}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ordinal_closes_the_body() {
        let body = r#"{"type":"usage","session_id":"s"}"#;
        let full: serde_json::Value = serde_json::from_str(&with_ordinal(body, 0)).unwrap();
        assert_eq!(full["turn"], 0);
        assert_eq!(full["session_id"], "s");
    }
}
