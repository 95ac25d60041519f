//! A room's counters (`chat:stats:{<room key>}`), kept by `append.lua` and `finish.lua` in the
//! same script as each `XADD`, so `GET /v1/sessions/{sid}` reads one hash instead of the
//! stream. They count every entry ever stored, including those retention has trimmed since;
//! entries written by hand (redis-cli `XADD`) are not counted.

use std::collections::{BTreeMap, HashMap};

use fred::prelude::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};

use super::{Store, StoreError};

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
        let fields: HashMap<String, String> = self
            .inner
            .client
            .custom(cmd, vec![Value::from(self.inner.keys.stats(sid))])
            .await?;
        Ok(RoomStats::from_fields(fields))
    }
}

impl RoomStats {
    /// `p:<participant>` and `e:<event>` fields; anything else is skipped.
    fn from_fields(fields: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut stats = RoomStats::default();
        for (field, value) in fields {
            let Ok(n) = value.parse::<u64>() else {
                continue;
            };
            if let Some(p) = field.strip_prefix("p:") {
                stats.participants.insert(p.to_owned(), n);
            } else if let Some(e) = field.strip_prefix("e:") {
                stats.events.insert(e.to_owned(), n);
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_by_prefix() {
        let fields = [
            ("p:A", "3"),
            ("e:chat.message", "2"),
            ("x", "1"),
            ("p:B", "nope"),
        ];
        let stats = RoomStats::from_fields(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        assert_eq!(stats.participants.get("A"), Some(&3));
        assert_eq!(stats.participants.get("B"), None);
        assert_eq!(stats.events.get("chat.message"), Some(&2));
        assert_eq!(stats.events.len(), 1);
    }
}
