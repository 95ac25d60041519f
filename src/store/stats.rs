//! A room's counters (`chat:stats:{<room key>}`), kept by `append.lua` and `finish.lua` in the
//! same script as each `XADD`, so `GET /v1/sessions/{sid}` reads one hash instead of the
//! stream. They count every entry ever stored, including those retention has trimmed since;
//! entries written by hand (redis-cli `XADD`) are not counted.

use std::collections::BTreeMap;

use fred::prelude::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};

use super::{value_str, Store, StoreError};

/// Entries stored in a room, by participant and by event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomStats {
    pub participants: BTreeMap<String, u64>,
    pub events: BTreeMap<String, u64>,
}

impl Store {
    /// The room's counters; empty for a room with no entries (or from before the counters).
    pub async fn room_stats(&self, sid: &str) -> Result<RoomStats, StoreError> {
        let cmd = CustomCommand::new_static("HGETALL", ClusterHash::FirstKey, false);
        let reply: Value = self
            .client
            .custom(cmd, vec![Value::from(self.keys.stats(sid))])
            .await?;
        Ok(parse_stats(reply))
    }
}

/// `HGETALL` (a flat array with RESP2, a map with RESP3) → counters; unknown fields are skipped.
fn parse_stats(reply: Value) -> RoomStats {
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
        _ => Vec::new(),
    };
    let mut stats = RoomStats::default();
    for (field, value) in pairs {
        let Some(n) = value.as_u64() else { continue };
        if let Some(p) = field.strip_prefix("p:") {
            stats.participants.insert(p.to_owned(), n);
        } else if let Some(e) = field.strip_prefix("e:") {
            stats.events.insert(e.to_owned(), n);
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_by_prefix() {
        let reply = Value::Array(
            ["p:A", "3", "e:chat.message", "2", "x", "1", "p:B", "nope"]
                .into_iter()
                .map(Value::from)
                .collect(),
        );
        let stats = parse_stats(reply);
        assert_eq!(stats.participants.get("A"), Some(&3));
        assert_eq!(stats.participants.get("B"), None);
        assert_eq!(stats.events.get("chat.message"), Some(&2));
        assert_eq!(parse_stats(Value::Null), RoomStats::default());
    }
}
