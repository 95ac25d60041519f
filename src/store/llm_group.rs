//! Redis operations of the LLM participant's reading side: room discovery (the registry stream
//! and a start-up scan), the consumer group, claims of abandoned requests and dead letters.

use std::time::Duration;

use fred::prelude::{ClientLike, HashesInterface, StreamsInterface};
use fred::types::{ClusterHash, CustomCommand, Value};

use super::{parse_item, value_str, BlockingConn, Entry, Store, StoreError};
use crate::protocol::StreamId;

/// An entry read through the consumer group; `entry` is `None` when it was trimmed or deleted
/// while pending (Redis then returns the id with a nil payload).
#[derive(Debug, Clone)]
pub struct GroupEntry {
    pub sid: String,
    pub id: StreamId,
    pub entry: Option<Entry>,
}

impl Store {
    /// Records that a room exists, for workers that discover rooms by tailing the registry.
    pub async fn announce_room(&self, sid: &str) -> Result<(), StoreError> {
        let _: Value = self
            .inner
            .client
            .xadd(
                self.inner.keys.rooms_registry(),
                false,
                ("MAXLEN", "~", 10_000),
                "*",
                vec![("sid", sid)],
            )
            .await?;
        Ok(())
    }

    /// Registry entries after `after` (blocking up to `block` on `client`), as (id, sid).
    pub async fn read_registry(
        &self,
        conn: &BlockingConn,
        after: &str,
        block: Duration,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let cmd = CustomCommand::new_static("XREAD", ClusterHash::Offset(5), true);
        let args: Vec<Value> = vec![
            "COUNT".into(),
            1000.into(),
            "BLOCK".into(),
            (block.as_millis() as i64).into(),
            "STREAMS".into(),
            self.inner.keys.rooms_registry().into(),
            after.into(),
        ];
        let reply: Value = conn.0.custom(cmd, args).await?;
        let mut out = Vec::new();
        for (_, entries) in stream_pairs(reply) {
            for item in entries {
                let Value::Array(pair) = item else { continue };
                let mut it = pair.into_iter();
                let (Some(id), Some(Value::Array(fields))) = (it.next(), it.next()) else {
                    continue;
                };
                let Some(id) = value_str(&id) else { continue };
                let sid = fields.get(1).and_then(value_str).unwrap_or_default();
                out.push((id, sid));
            }
        }
        Ok(out)
    }

    /// The newest registry id, so a worker can start tailing from "now".
    pub async fn registry_tail(&self) -> Result<String, StoreError> {
        let reply: Value = self
            .inner
            .client
            .xrevrange(self.inner.keys.rooms_registry(), "+", "-", Some(1))
            .await?;
        Ok(super::parse_entries(reply)?
            .first()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.to_string()))
    }

    /// Every room stream, by `SCAN` on every primary (used once at worker start, for rooms from
    /// before it).
    pub async fn scan_rooms(&self) -> Result<Vec<String>, StoreError> {
        let pattern = format!("{}*", self.inner.keys.prefix());
        let keys = self
            .scan_keys(&pattern, Some(fred::types::scan::ScanType::Stream))
            .await?;
        Ok(keys
            .iter()
            .filter_map(|k| self.inner.keys.sid_of(k).map(str::to_owned))
            .collect())
    }

    /// Creates the LLM group on a room at `start` (`0` or `$`); `Ok(false)` if it existed,
    /// `Err` if the stream does not exist.
    pub async fn ensure_group(&self, sid: &str, start: &str) -> Result<bool, StoreError> {
        let res: Result<Value, _> = self
            .inner
            .client
            .xgroup_create(
                self.inner.keys.room(sid),
                self.inner.llm_group.as_str(),
                start,
                false,
            )
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(err) if err.details().starts_with("BUSYGROUP") => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// `XREADGROUP` over many rooms on a dedicated client. `pending` re-reads this consumer's
    /// own unacknowledged entries (`0`) instead of new ones (`>`).
    pub async fn group_read(
        &self,
        conn: &BlockingConn,
        consumer: &str,
        sids: &[String],
        pending: bool,
        count: u64,
        block: Option<Duration>,
    ) -> Result<Vec<GroupEntry>, StoreError> {
        if sids.is_empty() {
            return Ok(Vec::new());
        }
        let offset = if block.is_some() { 8 } else { 6 };
        let cmd =
            CustomCommand::new_static("XREADGROUP", ClusterHash::Offset(offset), block.is_some());
        let mut args: Vec<Value> = vec![
            "GROUP".into(),
            self.inner.llm_group.as_str().into(),
            consumer.into(),
            "COUNT".into(),
            (count as i64).into(),
        ];
        if let Some(block) = block {
            args.push("BLOCK".into());
            args.push((block.as_millis() as i64).into());
        }
        args.push("STREAMS".into());
        for sid in sids {
            args.push(self.inner.keys.room(sid).into());
        }
        let from = if pending { "0" } else { ">" };
        args.extend(sids.iter().map(|_| Value::from(from)));
        let reply: Value = conn.0.custom(cmd, args).await?;
        let mut out = Vec::new();
        for (key, entries) in stream_pairs(reply) {
            let Some(sid) = self.inner.keys.sid_of(&key).map(str::to_owned) else {
                continue;
            };
            for (id, entry) in entries.into_iter().filter_map(parse_item) {
                out.push(GroupEntry {
                    sid: sid.clone(),
                    id,
                    entry,
                });
            }
        }
        Ok(out)
    }

    pub async fn ack(&self, sid: &str, id: StreamId) -> Result<(), StoreError> {
        let _: Value = self
            .inner
            .client
            .xack(
                self.inner.keys.room(sid),
                self.inner.llm_group.as_str(),
                id.to_string(),
            )
            .await?;
        Ok(())
    }

    /// Claims entries of `sid` idle for at least `min_idle` for `consumer` (`XAUTOCLAIM`),
    /// returning them with how often each was delivered before. Deleted entries are acked.
    pub async fn claim_idle(
        &self,
        sid: &str,
        consumer: &str,
        min_idle: Duration,
    ) -> Result<Vec<(GroupEntry, u64)>, StoreError> {
        let key = self.inner.keys.room(sid);
        let mut start = "0-0".to_owned();
        let mut out = Vec::new();
        loop {
            let reply: Value = self
                .inner
                .client
                .xautoclaim(
                    key.as_str(),
                    self.inner.llm_group.as_str(),
                    consumer,
                    min_idle.as_millis() as u64,
                    start.as_str(),
                    Some(100),
                    false,
                )
                .await?;
            let Value::Array(parts) = reply else {
                return Err(StoreError::Reply("XAUTOCLAIM reply is not an array"));
            };
            let mut parts = parts.into_iter();
            let next = parts
                .next()
                .as_ref()
                .and_then(value_str)
                .unwrap_or_else(|| "0-0".into());
            let claimed = parts.next().unwrap_or(Value::Null);
            if let Value::Array(items) = claimed {
                for (id, entry) in items.into_iter().filter_map(parse_item) {
                    let deliveries = self.delivery_count(sid, id).await.unwrap_or(1);
                    out.push((
                        GroupEntry {
                            sid: sid.to_owned(),
                            id,
                            entry,
                        },
                        deliveries,
                    ));
                }
            }
            // Redis 7 lists entries that were deleted while pending; they can never be served.
            if let Some(Value::Array(deleted)) = parts.next() {
                for d in deleted {
                    if let Some(id) = value_str(&d).and_then(|s| s.parse::<StreamId>().ok()) {
                        tracing::warn!(room = %sid, id = %id, "pending LLM entry was trimmed; acknowledging it");
                        self.ack(sid, id).await?;
                    }
                }
            }
            if next == "0-0" {
                return Ok(out);
            }
            start = next;
        }
    }

    /// How many entries of the room's LLM group are pending (read, not yet answered).
    pub async fn pending_count(&self, sid: &str) -> Result<u64, StoreError> {
        let cmd = CustomCommand::new_static("XPENDING", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.inner.keys.room(sid).into(),
            self.inner.llm_group.as_str().into(),
        ];
        let reply: Value = self.inner.client.custom(cmd, args).await?;
        match reply {
            Value::Array(parts) => Ok(parts.first().and_then(Value::as_u64).unwrap_or(0)),
            _ => Err(StoreError::Reply("XPENDING summary is not an array")),
        }
    }

    async fn delivery_count(&self, sid: &str, id: StreamId) -> Result<u64, StoreError> {
        let cmd = CustomCommand::new_static("XPENDING", ClusterHash::FirstKey, false);
        let ids = id.to_string();
        let args: Vec<Value> = vec![
            self.inner.keys.room(sid).into(),
            self.inner.llm_group.as_str().into(),
            ids.as_str().into(),
            ids.as_str().into(),
            1.into(),
        ];
        let reply: Value = self.inner.client.custom(cmd, args).await?;
        if let Value::Array(rows) = reply {
            if let Some(Value::Array(row)) = rows.into_iter().next() {
                if let Some(Value::Integer(n)) = row.get(3) {
                    return Ok((*n).max(0) as u64);
                }
            }
        }
        Ok(0)
    }

    /// Resets the entry's idle time so no other worker claims a turn still being generated.
    pub async fn touch_claim(
        &self,
        sid: &str,
        consumer: &str,
        id: StreamId,
    ) -> Result<(), StoreError> {
        let cmd = CustomCommand::new_static("XCLAIM", ClusterHash::FirstKey, false);
        let args: Vec<Value> = vec![
            self.inner.keys.room(sid).into(),
            self.inner.llm_group.as_str().into(),
            consumer.into(),
            0.into(),
            id.to_string().into(),
            "JUSTID".into(),
        ];
        let _: Value = self.inner.client.custom(cmd, args).await?;
        Ok(())
    }

    /// Moves an entry that failed too often to the dead-letter stream and acknowledges it.
    pub async fn dead_letter(&self, entry: &GroupEntry, deliveries: u64) -> Result<(), StoreError> {
        let body = entry.entry.as_ref().map(|e| e.body.as_str()).unwrap_or("");
        let _: Value = self
            .inner
            .client
            .xadd(
                self.inner.keys.dead_letters(),
                false,
                ("MAXLEN", "~", 10_000),
                "*",
                vec![
                    ("sid", entry.sid.as_str()),
                    ("id", &entry.id.to_string()),
                    ("deliveries", &deliveries.to_string()),
                    ("body", body),
                ],
            )
            .await?;
        let _: Value = self
            .inner
            .client
            .hdel(
                self.inner.keys.turn_attempts(&entry.sid),
                entry.id.to_string(),
            )
            .await?;
        self.ack(&entry.sid, entry.id).await
    }
}

/// `XREAD`/`XREADGROUP` reply → (key, entries) pairs, for RESP2 arrays and RESP3 maps.
fn stream_pairs(reply: Value) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    match reply {
        Value::Array(streams) => {
            for s in streams {
                let Value::Array(pair) = s else { continue };
                let mut it = pair.into_iter();
                let (Some(k), Some(Value::Array(entries))) = (it.next(), it.next()) else {
                    continue;
                };
                if let Some(k) = value_str(&k) {
                    out.push((k, entries));
                }
            }
        }
        Value::Map(map) => {
            for (k, v) in map.inner() {
                if let (Some(k), Value::Array(entries)) = (k.as_str().map(|s| s.to_string()), v) {
                    out.push((k, entries));
                }
            }
        }
        _ => {}
    }
    out
}
