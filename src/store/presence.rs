//! Live presence in Redis: which connections are in a room now, on any node (see
//! `presence.lua`). Every change returns the room's whole presence and a version, so the node
//! that made it can tell the room, and clients keep the newest snapshot.

use std::time::Duration;

use fred::types::Value;
use serde::{Deserialize, Serialize};

use super::{value_str, Store, StoreError};

/// One connection as presence records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Present {
    /// `<node>-<conn>`: unique across nodes.
    #[serde(rename = "c")]
    pub conn: String,
    #[serde(rename = "r")]
    pub role: String,
    /// The token subject, when authenticated.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

/// A room's presence: its version and who is in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceSet {
    pub version: u64,
    pub present: Vec<Present>,
}

/// What a presence call does.
#[derive(Debug, Clone, Copy)]
pub enum PresenceChange<'a> {
    /// These connections are here until `expires` (refreshed by the node's heartbeat).
    Enter(&'a [Present]),
    Refresh(&'a [Present]),
    Leave(&'a [Present]),
    Read,
}

impl Store {
    /// Applies `change` to a room's presence and returns the presence after it. Connections
    /// entered or refreshed count for `ttl` from now.
    pub async fn presence(
        &self,
        sid: &str,
        change: PresenceChange<'_>,
        ttl: Duration,
    ) -> Result<PresenceSet, StoreError> {
        let now = crate::protocol::now_ms();
        let expires = (now + ttl.as_millis() as u64).to_string();
        let member = |p: &Present| serde_json::to_string(p).unwrap_or_default();
        let (op, rest): (&str, Vec<String>) = match change {
            PresenceChange::Enter(ps) => (
                "enter",
                ps.iter()
                    .flat_map(|p| [expires.clone(), member(p)])
                    .collect(),
            ),
            PresenceChange::Refresh(ps) => (
                "refresh",
                ps.iter()
                    .flat_map(|p| [expires.clone(), member(p)])
                    .collect(),
            ),
            PresenceChange::Leave(ps) => ("leave", ps.iter().map(member).collect()),
            PresenceChange::Read => ("read", Vec::new()),
        };
        let keys = vec![self.keys.presence(sid), self.keys.presence_version(sid)];
        let mut args = vec![
            now.to_string(),
            // The set outlives its last refresh a little, never the room (`--room-idle-ttl`).
            (self.room_ttl(ttl * 2).as_millis() as u64).to_string(),
            op.to_owned(),
        ];
        args.extend(rest);
        let reply: Value = self.eval_script(&self.scripts.presence, keys, args).await?;
        let Value::Array(items) = reply else {
            return Err(StoreError::Reply("presence reply is not an array"));
        };
        let mut it = items.into_iter();
        let version = it.next().and_then(|v| v.as_u64()).unwrap_or(0);
        let present = it
            .filter_map(|v| value_str(&v))
            .filter_map(|m| serde_json::from_str(&m).ok())
            .collect();
        Ok(PresenceSet { version, present })
    }
}
