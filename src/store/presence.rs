//! Live presence in Redis: who is in a room now, on any node (see `presence.lua`). Each node
//! records, per room, how many connections each (role, subject) has on it; every change returns
//! the room's whole presence and a version, so the node that made it can tell the room, and
//! clients keep the newest snapshot.

use std::time::Duration;

use fred::types::Value;
use serde::{Deserialize, Serialize};

use super::{value_str, Store, StoreError};

/// One member's connections on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceCount {
    #[serde(rename = "r")]
    pub role: String,
    /// The token subject, when authenticated.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(rename = "c")]
    pub connections: u64,
}

/// A room's presence: its version and, per live node, its members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceSet {
    pub version: u64,
    pub nodes: Vec<Vec<PresenceCount>>,
}

/// What a presence call does.
#[derive(Debug, Clone, Copy)]
pub enum PresenceChange<'a> {
    /// This node's members in the room (refreshed by its heartbeat).
    Set {
        node: &'a str,
        members: &'a [PresenceCount],
    },
    /// This node has no one in the room any more.
    Remove {
        node: &'a str,
    },
    Read,
}

impl Store {
    /// Applies `change` to a room's presence and returns the presence after it. A node's entry
    /// counts for `ttl` from now.
    pub async fn presence(
        &self,
        sid: &str,
        change: PresenceChange<'_>,
        ttl: Duration,
    ) -> Result<PresenceSet, StoreError> {
        let now = crate::protocol::now_ms();
        let (op, node, members) = match change {
            PresenceChange::Set { node, members } => (
                "set",
                node,
                serde_json::to_string(members).unwrap_or_default(),
            ),
            PresenceChange::Remove { node } => ("remove", node, String::new()),
            PresenceChange::Read => ("read", "", String::new()),
        };
        let keys = vec![
            self.inner.keys.presence(sid),
            self.inner.keys.presence_expiry(sid),
            self.inner.keys.presence_version(sid),
        ];
        let args = vec![
            now.to_string(),
            // The keys outlive their last refresh a little, never the room (`--room-idle-ttl`).
            (self.room_ttl(ttl * 2).as_millis() as u64).to_string(),
            op.to_owned(),
            node.to_owned(),
            members,
            (now + ttl.as_millis() as u64).to_string(),
        ];
        let reply: Value = self
            .eval_script(&self.inner.scripts.presence, keys, args)
            .await?;
        let Value::Array(items) = reply else {
            return Err(StoreError::Reply("presence reply is not an array"));
        };
        let mut it = items.into_iter();
        let version = it.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let nodes = it
            .filter_map(|v| value_str(&v))
            .filter_map(|m| serde_json::from_str(&m).ok())
            .collect();
        Ok(PresenceSet { version, nodes })
    }
}
