//! Reading a room's stream: ranges of entries (catch-up, history, replay) and its summary, and
//! the parsing of stream replies that the LLM group's reads share.

use fred::interfaces::{KeysInterface, StreamsInterface};
use fred::types::Value;

use super::keys::field;
use super::{Entry, Store, StoreError, StreamInfo};
use crate::protocol::StreamId;

impl Store {
    /// Entries with `after < id` (and `id <= until` when given), oldest first, at most `count`.
    pub async fn range_after(
        &self,
        sid: &str,
        after: Option<StreamId>,
        until: Option<StreamId>,
        count: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        let start = match after {
            // Nothing follows the greatest id; Redis would refuse `(` on it as an error.
            Some(StreamId::MAX) => return Ok(Vec::new()),
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let end = until.map_or_else(|| "+".to_owned(), |id| id.to_string());
        let reply: Value = self
            .inner
            .client
            .xrange(self.inner.keys.room(sid), start, end, Some(count))
            .await?;
        parse_entries(reply)
    }

    /// The newest entries with `id < before` (all when `None`), returned oldest first.
    pub async fn range_before(
        &self,
        sid: &str,
        before: Option<StreamId>,
        count: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        let end = match before {
            // Nothing precedes `0-0`; Redis would refuse `(` on it as an error.
            Some(StreamId::ZERO) => return Ok(Vec::new()),
            Some(id) => format!("({id}"),
            None => "+".to_owned(),
        };
        let reply: Value = self
            .inner
            .client
            .xrevrange(self.inner.keys.room(sid), end, "-", Some(count))
            .await?;
        let mut entries = parse_entries(reply)?;
        entries.reverse();
        Ok(entries)
    }

    /// The room's stream summary, or `None` when the room has never been written.
    pub async fn info(&self, sid: &str) -> Result<Option<StreamInfo>, StoreError> {
        let key = self.inner.keys.room(sid);
        let exists: i64 = self.inner.client.exists(&key).await?;
        if exists == 0 {
            return Ok(None);
        }
        let reply: Value = self.inner.client.xinfo_stream(&key, false, None).await?;
        parse_stream_info(reply).map(Some)
    }
}

pub(super) fn value_str(v: &Value) -> Option<String> {
    v.as_str().map(|s| s.into_owned())
}

/// `XRANGE`-shaped reply → entries. Entries whose payload is nil (deleted while pending) or that
/// lack fields are skipped rather than failing the whole read.
pub(crate) fn parse_entries(reply: Value) -> Result<Vec<Entry>, StoreError> {
    let items = match reply {
        Value::Array(items) => items,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(StoreError::Reply("stream range is not an array")),
    };
    Ok(items
        .into_iter()
        .filter_map(parse_item)
        .filter_map(|(_, entry)| entry)
        .collect())
}

/// One `[id, [field, value, ...]]` item of a stream reply. The entry is `None` when its payload
/// is nil (deleted while pending) or has no fields.
pub(crate) fn parse_item(item: Value) -> Option<(StreamId, Option<Entry>)> {
    let Value::Array(pair) = item else {
        return None;
    };
    let mut pair = pair.into_iter();
    let id: StreamId = pair.next().as_ref().and_then(value_str)?.parse().ok()?;
    Some((
        id,
        pair.next().and_then(|fields| entry_from_fields(id, fields)),
    ))
}

fn entry_from_fields(id: StreamId, fields: Value) -> Option<Entry> {
    let Value::Array(fields) = fields else {
        return None;
    };
    let mut entry = Entry {
        id,
        participant: String::new(),
        event: String::new(),
        body: String::new(),
    };
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let (Some(k), Some(v)) = (value_str(&k), value_str(&v)) else {
            continue;
        };
        match k.as_str() {
            field::PARTICIPANT => entry.participant = v,
            field::EVENT => entry.event = v,
            field::BODY => entry.body = v,
            _ => {}
        }
    }
    Some(entry)
}

fn parse_stream_info(reply: Value) -> Result<StreamInfo, StoreError> {
    let pairs: Vec<(String, Value)> = match reply {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = value_str(&k) {
                    pairs.push((k, v));
                }
            }
            pairs
        }
        Value::Map(map) => map
            .inner()
            .into_iter()
            .filter_map(|(k, v)| k.as_str().map(|k| (k.to_string(), v)))
            .collect(),
        _ => return Err(StoreError::Reply("XINFO STREAM is not a map")),
    };
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let entry_id = |v: Option<Value>| -> Option<StreamId> {
        match v? {
            Value::Array(e) => e.first().and_then(value_str).and_then(|s| s.parse().ok()),
            _ => None,
        }
    };
    let length = match get("length") {
        Some(Value::Integer(n)) => n.max(0) as u64,
        _ => return Err(StoreError::Reply("XINFO STREAM has no length")),
    };
    let last_generated_id = get("last-generated-id")
        .as_ref()
        .and_then(value_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let entries_added = match get("entries-added") {
        Some(Value::Integer(n)) => Some(n.max(0) as u64),
        _ => None,
    };
    Ok(StreamInfo {
        entries_added,
        length,
        first_id: entry_id(get("first-entry")),
        last_id: entry_id(get("last-entry")),
        last_generated_id,
    })
}
