//! Sessions as a resource: a room created, read, patched and deleted on purpose.
//!
//! A session is a room. Created through the API it has a record (`chat:record:{<room key>}`:
//! created, updated, metadata, version) written by `append.lua` in the same script as its first
//! entry, `session.created`, so the record and the stream exist together or not at all. A room
//! that exists only through its entries (created implicitly by its first message, as before
//! sessions existed) is a session too, without metadata until someone patches it.
//!
//! Deleting removes every key the room owns ([`Keys::room_pattern`](super::Keys::room_pattern))
//! and publishes a room-deleted notice on the room's channel, which every node turns into an
//! error frame and a close for its members.

use std::time::Duration;

use backon::Retryable;
use fred::interfaces::{HashesInterface, KeysInterface, SortedSetsInterface};
use fred::types::Value;
use serde_json::{Map, Value as Json};

use super::feed::encode_deleted;
use super::{value_str, AppendReply, RoomStats, Store, StoreError, StreamInfo, Target};
use crate::protocol::{EventKind, StreamId};

/// How often a patch is retried when other patches keep changing the record under it.
const PATCH_ATTEMPTS: usize = 16;

/// A session as the API shows it: its record (when it has one), and its stream's summary and
/// counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub sid: String,
    /// When it was created: the record's time, or for a room without a record its oldest entry.
    pub created_ms: u64,
    /// The newest of: created, the last metadata change, the last entry.
    pub last_active_ms: u64,
    pub metadata: Map<String, Json>,
    /// Created through the API, or patched since: the room has a record.
    pub recorded: bool,
    /// The record's version (0 without a record); every patch increments it.
    version: u64,
    /// The stream's summary; `None` if the stream is gone but the record is not (deleted by hand).
    pub stream: Option<StreamInfo>,
    pub stats: RoomStats,
}

impl Session {
    /// Entries of the conversation ever stored (see [`EventKind::CONVERSATION`]), from the
    /// room's counters: trimmed entries still count.
    pub fn message_count(&self) -> u64 {
        EventKind::CONVERSATION
            .iter()
            .filter_map(|e| self.stats.events.get(*e))
            .sum()
    }
}

/// What [`Store::create_session`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The record and the stream exist now; `id` is the `session.created` entry.
    New { id: StreamId, created_ms: u64 },
    /// A room with this id exists already (with or without a record); nothing was written.
    Exists,
}

/// The record's fields as stored.
#[derive(Debug, Default)]
struct Record {
    created_ms: u64,
    updated_ms: u64,
    metadata: Map<String, Json>,
    version: u64,
}

impl Store {
    /// Creates a session: its record and its stream, whose first entry is `entry` (a
    /// `session.created` envelope), in one script. Durable in Redis when this returns `New`.
    pub async fn create_session(
        &self,
        sid: &str,
        participant: &str,
        entry: &str,
        metadata: &Map<String, Json>,
    ) -> Result<Created, StoreError> {
        let metadata = Json::Object(metadata.clone()).to_string();
        let target = Target::New { metadata };
        let reply = self
            .queue_append(
                sid,
                participant,
                EventKind::SESSION_CREATED,
                entry,
                None,
                target,
            )
            .await?;
        match reply {
            AppendReply::Stored(appended) => Ok(Created::New {
                id: appended.id,
                created_ms: appended.id.ms,
            }),
            AppendReply::Exists => Ok(Created::Exists),
            AppendReply::Missing => Err(StoreError::Reply("create refused a missing room")),
        }
    }

    /// The session's own retention (`None`: the relay's), read by the append scripts. Nothing
    /// happens when the session does not exist.
    pub async fn set_retention(
        &self,
        sid: &str,
        max_len: Option<u64>,
        max_age: Option<std::time::Duration>,
    ) -> Result<(), StoreError> {
        let args = vec![
            max_len.map_or_else(String::new, |n| n.to_string()),
            max_age.map_or_else(String::new, |d| (d.as_millis().max(1) as u64).to_string()),
        ];
        let _: fred::types::Value = self
            .eval_script(
                &self.inner.scripts.retention_set,
                self.inner.keys.session_record(sid),
                args,
            )
            .await?;
        Ok(())
    }

    /// Whether the room exists: its stream or its session record.
    pub async fn session_exists(&self, sid: &str) -> Result<bool, StoreError> {
        let n: i64 = self
            .inner
            .client
            .exists(vec![
                self.inner.keys.room(sid),
                self.inner.keys.session_record(sid),
            ])
            .await?;
        Ok(n > 0)
    }

    /// The session, or `None` when the room does not exist.
    pub async fn session(&self, sid: &str) -> Result<Option<Session>, StoreError> {
        let (record, stream, stats) =
            tokio::try_join!(self.record(sid), self.info(sid), self.room_stats(sid))?;
        if record.is_none() && stream.is_none() {
            return Ok(None);
        }
        let first_ms = stream
            .as_ref()
            .and_then(|s| s.first_id)
            .map_or(0, |id| id.ms);
        let last_ms = stream
            .as_ref()
            .and_then(|s| s.last_id)
            .map_or(0, |id| id.ms);
        let recorded = record.is_some();
        let record = record.unwrap_or_else(|| Record {
            created_ms: first_ms,
            updated_ms: first_ms,
            ..Record::default()
        });
        Ok(Some(Session {
            sid: sid.to_owned(),
            created_ms: record.created_ms,
            last_active_ms: record.created_ms.max(record.updated_ms).max(last_ms),
            metadata: record.metadata,
            recorded,
            version: record.version,
            stream,
            stats,
        }))
    }

    /// Merges `patch` into the session's metadata (JSON merge patch, RFC 7396: `null` removes a
    /// field, objects merge, anything else replaces) and returns the session as it is now;
    /// `None` when there is no such session. Concurrent patches all apply (compare and set on
    /// the record's version, retried).
    pub async fn patch_session(
        &self,
        sid: &str,
        patch: &Map<String, Json>,
    ) -> Result<Option<Session>, StoreError> {
        for _ in 0..PATCH_ATTEMPTS {
            let Some(session) = self.session(sid).await? else {
                return Ok(None);
            };
            let mut metadata = Json::Object(session.metadata.clone());
            merge_patch(&mut metadata, &Json::Object(patch.clone()));
            let now = crate::protocol::now_ms();
            let args = vec![
                session.version.to_string(),
                metadata.to_string(),
                now.to_string(),
                session.created_ms.to_string(),
            ];
            let keys = vec![
                self.inner.keys.room(sid),
                self.inner.keys.session_record(sid),
            ];
            let reply = self
                .eval_script(&self.inner.scripts.session_patch, keys, args)
                .await?;
            match reply.as_str().as_deref() {
                Some("ok") => return self.session(sid).await,
                Some("missing") => return Ok(None),
                Some("conflict") => continue,
                _ => return Err(StoreError::Reply("session patch reply unknown")),
            }
        }
        Err(StoreError::Reply("session patch kept conflicting"))
    }

    /// Deletes everything the session owns in Redis and closes its members on every node.
    /// `false` when there was no such session.
    ///
    /// First the fixed keys and the notice, in one script (from then on nothing writes to the
    /// room: see `session_delete.lua`); then the keys with variable names, found by `SCAN` on
    /// every primary; then the room's entry in the usage index, which lives on another shard.
    ///
    /// The usage callbacks the session owes are copied to the outbox of deleted sessions
    /// before the script, which hands back (and deletes) what it found, taken too: a reply
    /// lost after the script ran, or a retry of the whole delete, then loses nothing. It runs
    /// in a task of its own, so a caller that goes away (a client hanging up on `DELETE`) does
    /// not stop it half-way.
    pub async fn delete_session(&self, sid: &str) -> Result<bool, StoreError> {
        let (store, owner) = (self.clone(), sid.to_owned());
        tokio::spawn(async move { store.delete_session_now(&owner).await })
            .await
            .unwrap_or(Err(StoreError::Reply("the session delete task failed")))
    }

    async fn delete_session_now(&self, sid: &str) -> Result<bool, StoreError> {
        let k = &self.inner.keys;
        // Logged before the notice goes out, so whoever misses the notice finds the entry (see
        // deletions.rs); an entry for a delete that then fails is harmless, since readers act
        // on it only for a room whose stream is gone.
        if self.session_exists(sid).await? {
            self.log_deletion(sid).await?;
        }
        let owed = self.usage_owed(sid).await?;
        self.adopt_usage(sid, &owed).await?;
        let mut keys = vec![
            k.room(sid),
            k.session_record(sid),
            k.usage_outbox(sid),
            k.usage_records(sid),
            k.stats(sid),
            k.active_turns(sid),
            k.turn_attempts(sid),
            k.turn_counter(sid),
        ];
        keys.extend(k.cid_generations(sid));
        let reply = self
            .eval_script(
                &self.inner.scripts.session_delete,
                keys,
                vec![encode_deleted()],
            )
            .await?;
        let (existed, owed) = deleted_reply(reply)?;
        if !owed.is_empty() {
            // Most were copied above; those queued since exist nowhere else now, so a failure
            // is retried through a short outage, and logged in full if it still fails.
            let adopted = (|| self.adopt_usage(sid, &owed))
                .retry(crate::retry::bounded(
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                    6,
                ))
                .await;
            match adopted {
                Ok(()) => {
                    tracing::info!(room = %sid, callbacks = owed.len(), "usage callbacks of the deleted session moved to the outbox of deleted sessions")
                }
                Err(err) => {
                    tracing::error!(room = %sid, cause = %err, callbacks = ?owed, "usage callbacks of the deleted session lost")
                }
            }
        }
        // Also when it did not exist: a delete that failed half-way is finished by the retry.
        let rest = self.scan_keys(&k.room_pattern(sid), None).await?;
        for chunk in rest.chunks(500) {
            let _: i64 = self.inner.client.del(chunk.to_vec()).await?;
        }
        let _: i64 = self.inner.client.zrem(k.usage_rooms(), sid).await?;
        if existed {
            tracing::info!(room = %sid, keys = rest.len(), "session deleted");
        }
        Ok(existed)
    }

    async fn record(&self, sid: &str) -> Result<Option<Record>, StoreError> {
        let fields: std::collections::HashMap<String, String> = self
            .inner
            .client
            .hgetall(self.inner.keys.session_record(sid))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let num = |name: &str| fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let metadata = match fields.get("metadata").map(|m| serde_json::from_str(m)) {
            Some(Ok(Json::Object(map))) => map,
            // Written by hand or damaged: shown as empty rather than failing every read.
            _ => Map::new(),
        };
        Ok(Some(Record {
            created_ms: num("created"),
            updated_ms: num("updated"),
            metadata,
            version: num("version"),
        }))
    }
}

/// JSON merge patch (RFC 7396).
pub(crate) fn merge_patch(target: &mut Json, patch: &Json) {
    let Json::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Json::Object(Map::new());
    }
    if let Json::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Json::Null), value);
            }
        }
    }
}

/// `session_delete.lua`'s reply: whether the session existed, and the usage callbacks it still
/// owed (turn id, due ms, body, created ms, attempts).
fn deleted_reply(reply: Value) -> Result<(bool, Vec<[String; 5]>), StoreError> {
    let items = match reply {
        Value::Integer(0) => return Ok((false, Vec::new())),
        Value::Array(items) => items,
        _ => return Err(StoreError::Reply("session delete reply unknown")),
    };
    let mut fields = items.iter().skip(1).map(value_str);
    let mut owed = Vec::new();
    while let Some(turn) = fields.next() {
        let mut next = || fields.next().flatten();
        match (turn, next(), next(), next(), next()) {
            (Some(turn), Some(due), Some(body), Some(created), Some(attempts)) => {
                owed.push([turn, due, body, created, attempts])
            }
            _ => return Err(StoreError::Reply("session delete reply unknown")),
        }
    }
    Ok((true, owed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The RFC's own example (section 3).
        let mut doc = json!({
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged"
        });
        let patch = json!({
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null},
            "tags": ["example"]
        });
        merge_patch(&mut doc, &patch);
        assert_eq!(
            doc,
            json!({
                "title": "Hello!",
                "author": {"givenName": "John"},
                "tags": ["example"],
                "content": "This will be unchanged",
                "phoneNumber": "+01-123-456-7890"
            })
        );
        let mut scalar = json!({"a": "b"});
        merge_patch(&mut scalar, &json!({"a": {"bb": {"ccc": null}}}));
        assert_eq!(scalar, json!({"a": {"bb": {}}}));
    }

    #[test]
    fn message_count_counts_the_conversation_only() {
        let mut stats = RoomStats::default();
        for (event, n) in [
            ("chat.message", 3),
            ("llm.request", 1),
            ("llm.response", 1),
            ("session.join", 7),
            ("session.created", 1),
        ] {
            stats.events.insert(event.to_owned(), n);
        }
        let session = Session {
            sid: "r".into(),
            created_ms: 1,
            last_active_ms: 1,
            metadata: Map::new(),
            recorded: true,
            version: 1,
            stream: None,
            stats,
        };
        assert_eq!(session.message_count(), 5);
    }
}
