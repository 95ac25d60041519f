//! The deletion log: `DELETE /api/sessions/{id}` writes the session's id to a capped stream
//! (`chat:deleted`) just before the room-deleted notice goes out, so whoever may have missed the
//! notice finds out which sessions went: a relay node whose subscriber was away (it closes the
//! rooms' members), an LLM worker whose group read failed on a deleted stream (it stops
//! reading those rooms). Ids of the log are on its own clock (its own shard on Redis Cluster),
//! so a reader compares them only with ids of the log.

use std::sync::{Mutex, MutexGuard};

use fred::interfaces::StreamsInterface;
use fred::types::Value;

use super::{value_str, Store, StoreError};
use crate::protocol::StreamId;

/// Deleted sessions the log keeps (about: it is trimmed with `~`). A reader away for longer
/// than this many deletes misses the oldest.
const KEPT: u64 = 10_000;
/// Entries read at once.
const PAGE: u64 = 1_000;

impl Store {
    /// Logs that `sid` is about to be deleted.
    pub(super) async fn log_deletion(&self, sid: &str) -> Result<(), StoreError> {
        let _: Value = self
            .inner
            .client
            .xadd(
                self.inner.keys.deletions(),
                false,
                ("MAXLEN", "~", KEPT),
                "*",
                vec![("sid", sid)],
            )
            .await?;
        Ok(())
    }

    /// The log's newest id (`0-0` when it is empty): where a reader starts.
    pub async fn deletions_tail(&self) -> Result<StreamId, StoreError> {
        let reply: Value = self
            .inner
            .client
            .xrevrange(self.inner.keys.deletions(), "+", "-", Some(1))
            .await?;
        Ok(items(reply).first().map_or(StreamId::ZERO, |(id, _)| *id))
    }

    async fn deletions_after(
        &self,
        after: StreamId,
    ) -> Result<Vec<(StreamId, String)>, StoreError> {
        let reply: Value = self
            .inner
            .client
            .xrange(
                self.inner.keys.deletions(),
                format!("({after}"),
                "+",
                Some(PAGE),
            )
            .await?;
        Ok(items(reply))
    }
}

/// How far one reader has read the log. One read at a time: a burst of callers (resyncs, failed
/// reads) reads each entry once.
#[derive(Debug, Default)]
pub(crate) struct DeletionCursor {
    read: Mutex<Option<StreamId>>,
    reader: tokio::sync::Mutex<()>,
}

impl DeletionCursor {
    fn read(&self) -> MutexGuard<'_, Option<StreamId>> {
        self.read
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts at `tail` (from [`Store::deletions_tail`]) unless started already.
    pub(crate) fn start_at(&self, tail: StreamId) {
        self.read().get_or_insert(tail);
    }

    /// The sessions logged since the last read (or the start), oldest first, as `(log id,
    /// sid)`; `None` before the start. The cursor moves only when the whole read succeeded, so
    /// a failed one can simply be tried again.
    pub(crate) async fn read_new(
        &self,
        store: &Store,
    ) -> Result<Option<Vec<(StreamId, String)>>, StoreError> {
        let _one = self.reader.lock().await;
        let Some(mut after) = *self.read() else {
            return Ok(None);
        };
        let mut logged = Vec::new();
        loop {
            let page = store.deletions_after(after).await?;
            let full = page.len() as u64 == PAGE;
            if let Some((last, _)) = page.last() {
                after = *last;
            }
            logged.extend(page);
            if !full {
                break;
            }
        }
        let mut read = self.read();
        *read = (*read).max(Some(after));
        Ok(Some(logged))
    }
}

/// Log entries, `[id, ["sid", sid]]` each → `(id, sid)`.
fn items(reply: Value) -> Vec<(StreamId, String)> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = pair.first().and_then(value_str)?.parse().ok()?;
            let Some(Value::Array(fields)) = pair.get(1) else {
                return None;
            };
            Some((id, fields.get(1).and_then(value_str)?))
        })
        .collect()
}
