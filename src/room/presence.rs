//! Who is in a room now, on any node: each node records in Redis, per room, how many
//! connections each member has on it (see `store::presence`), and refreshes that entry with a
//! heartbeat, so a node killed with `kill -9` drops out after [`PRESENCE_TTL`] at most. Every
//! change is told to the room as a `presence` frame carrying the whole, versioned snapshot; a
//! member gets one when it joins.
//!
//! One person with two tabs is one member with two connections: members are counted per
//! (role, token subject). The same heartbeat keeps a room with live members from expiring
//! (`--room-idle-ttl`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::transient_frame;
use crate::room::ConnId;
use crate::store::{PresenceChange, PresenceCount, PresenceSet, Store, StoreError};

/// A node's entry not refreshed for this long no longer counts (the node died).
pub(crate) const PRESENCE_TTL: Duration = Duration::from_secs(20);
/// How often a node refreshes its entries (and notices others' that expired).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Who a connection is, for presence.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Member {
    pub(crate) role: String,
    /// The token subject, when authenticated.
    pub(crate) sub: Option<String>,
}

/// This node's side of presence. Cheap to share (`Arc`).
#[derive(Debug)]
pub(crate) struct Presence {
    store: Store,
    /// Names this node's entries.
    node: String,
    /// Connections on this node, per room.
    local: DashMap<String, HashMap<ConnId, Member>>,
    /// The newest version this node told each room about.
    told: DashMap<String, u64>,
    tracker: TaskTracker,
}

/// A connection's place in its room's presence; dropping it leaves (in the background).
#[derive(Debug)]
pub(crate) struct PresenceGuard {
    presence: Arc<Presence>,
    sid: String,
    conn: ConnId,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let (presence, sid, conn) = (self.presence.clone(), self.sid.clone(), self.conn);
        self.presence.tracker.spawn(async move {
            presence.leave(&sid, conn).await;
        });
    }
}

impl Presence {
    /// Starts the heartbeat on `tracker`. `node` names this node's entries.
    pub(crate) fn start(
        store: Store,
        node: &str,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> Arc<Self> {
        let presence = Arc::new(Presence {
            store,
            node: node.to_owned(),
            local: DashMap::new(),
            told: DashMap::new(),
            tracker: tracker.clone(),
        });
        tracker.spawn(presence.clone().heartbeat(token));
        presence
    }

    /// Records a connection in its room and tells the room. Best effort: a Redis failure is
    /// logged, and the next heartbeat records the connection anyway.
    pub(crate) async fn enter(
        self: &Arc<Self>,
        sid: &str,
        conn: ConnId,
        who: Member,
    ) -> PresenceGuard {
        self.local
            .entry(sid.to_owned())
            .or_default()
            .insert(conn, who);
        self.publish_mine(sid).await;
        PresenceGuard {
            presence: self.clone(),
            sid: sid.to_owned(),
            conn,
        }
    }

    async fn leave(&self, sid: &str, conn: ConnId) {
        self.local.remove_if_mut(sid, |_, conns| {
            conns.remove(&conn);
            conns.is_empty()
        });
        self.publish_mine(sid).await;
        if !self.local.contains_key(sid) {
            self.told.remove(sid);
        }
    }

    /// This node's members in a room, counted (no guard is held past this call).
    fn mine(&self, sid: &str) -> Vec<PresenceCount> {
        let Some(conns) = self.local.get(sid) else {
            return Vec::new();
        };
        let mut counts: BTreeMap<&Member, u64> = BTreeMap::new();
        for who in conns.values() {
            *counts.entry(who).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(who, connections)| PresenceCount {
                role: who.role.clone(),
                sub: who.sub.clone(),
                connections,
            })
            .collect()
    }

    /// Writes this node's entry for a room (or removes it when no one is left) and tells the
    /// room if that changed its presence.
    async fn publish_mine(&self, sid: &str) {
        let members = self.mine(sid);
        let change = if members.is_empty() {
            PresenceChange::Remove { node: &self.node }
        } else {
            PresenceChange::Set {
                node: &self.node,
                members: &members,
            }
        };
        let changed = self.store.presence(sid, change, PRESENCE_TTL).await;
        self.tell(sid, changed).await;
    }

    /// The room's presence now, as the `presence` frame's body.
    pub(crate) async fn snapshot(&self, sid: &str) -> Result<Value, StoreError> {
        let set = self
            .store
            .presence(sid, PresenceChange::Read, PRESENCE_TTL)
            .await?;
        Ok(summary(&set))
    }

    /// Publishes a snapshot the room has not seen yet.
    async fn tell(&self, sid: &str, changed: Result<PresenceSet, StoreError>) {
        let set = match changed {
            Ok(set) => set,
            Err(err) => {
                tracing::debug!(room = %sid, cause = %err, "presence not updated");
                return;
            }
        };
        let newer = {
            let mut told = self.told.entry(sid.to_owned()).or_insert(0);
            let newer = set.version > *told;
            if newer {
                *told = set.version;
            }
            newer
        };
        if newer {
            let frame = presence_frame(sid, &summary(&set));
            if let Err(err) = self.store.publish_transient(sid, &frame).await {
                tracing::debug!(room = %sid, cause = %err, "presence not published");
            }
        }
    }

    /// Refreshes this node's entry in every room it has members in, which also drops the
    /// expired entries of dead nodes; the rooms hear of every change.
    async fn heartbeat(self: Arc<Self>, token: CancellationToken) {
        // Often enough to keep a room with members from expiring, however short its idle ttl.
        let every = match self.store.idle_ttl() {
            Some(idle) => HEARTBEAT.min(idle / 3).max(Duration::from_millis(200)),
            None => HEARTBEAT,
        };
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let rooms: Vec<String> = self.local.iter().map(|r| r.key().clone()).collect();
            for sid in rooms {
                self.publish_mine(&sid).await;
                // Live members keep their room from expiring (`--room-idle-ttl`).
                if let Err(err) = self.store.keep_room_alive(&sid).await {
                    tracing::debug!(room = %sid, cause = %err, "room not kept alive");
                }
            }
        }
    }
}

/// `{"version","connections","members":[{"role","sub"?,"connections"}]}`: one member per
/// (role, subject), however many connections (tabs, nodes) it has.
pub(crate) fn summary(set: &PresenceSet) -> Value {
    let mut members: BTreeMap<(&str, Option<&str>), u64> = BTreeMap::new();
    for count in set.nodes.iter().flatten() {
        *members
            .entry((&count.role, count.sub.as_deref()))
            .or_default() += count.connections;
    }
    let connections: u64 = members.values().sum();
    let members: Vec<Value> = members
        .into_iter()
        .map(|((role, sub), connections)| {
            let mut m = json!({"role": role, "connections": connections});
            if let Some(sub) = sub {
                m["sub"] = Value::String(sub.to_owned());
            }
            m
        })
        .collect();
    json!({
        "version": set.version,
        "connections": connections,
        "members": members,
    })
}

/// The live `presence` frame for a room.
pub(crate) fn presence_frame(sid: &str, summary: &Value) -> String {
    transient_frame("presence", "relay", sid, &Map::new(), summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(role: &str, sub: Option<&str>, connections: u64) -> PresenceCount {
        PresenceCount {
            role: role.into(),
            sub: sub.map(str::to_owned),
            connections,
        }
    }

    #[test]
    fn two_tabs_on_two_nodes_are_one_member_with_two_connections() {
        let set = PresenceSet {
            version: 7,
            nodes: vec![
                vec![c("A", Some("alice"), 1), c("B", None, 1)],
                vec![c("A", Some("alice"), 1)],
            ],
        };
        assert_eq!(
            summary(&set),
            json!({"version": 7, "connections": 3, "members": [
                {"role": "A", "sub": "alice", "connections": 2},
                {"role": "B", "connections": 1},
            ]})
        );
    }
}
