//! Who is in a room now, on any node: each node records its connections in Redis (see
//! `store::presence`) and refreshes them with a heartbeat, so a node killed with `kill -9`
//! loses its connections after [`PRESENCE_TTL`] at most. Every change is told to the room as a
//! `presence` frame carrying the whole, versioned snapshot; a member gets one when it joins.
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
use crate::store::{PresenceChange, PresenceSet, Present, Store, StoreError};

/// A connection not refreshed for this long no longer counts (its node died).
pub(crate) const PRESENCE_TTL: Duration = Duration::from_secs(20);
/// How often a node refreshes its connections (and notices others' that expired).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// This node's side of presence. Cheap to share (`Arc`).
#[derive(Debug)]
pub(crate) struct Presence {
    store: Store,
    /// Connections on this node, per room.
    local: DashMap<String, HashMap<String, Present>>,
    /// The newest version this node told each room about.
    told: DashMap<String, u64>,
    tracker: TaskTracker,
}

/// A connection's place in its room's presence; dropping it leaves (in the background).
#[derive(Debug)]
pub(crate) struct PresenceGuard {
    presence: Arc<Presence>,
    sid: String,
    me: Present,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let (presence, sid, me) = (self.presence.clone(), self.sid.clone(), self.me.clone());
        self.presence.tracker.spawn(async move {
            presence.leave(&sid, me).await;
        });
    }
}

impl Presence {
    /// Starts the heartbeat on `tracker`.
    pub(crate) fn start(
        store: Store,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> Arc<Self> {
        let presence = Arc::new(Presence {
            store,
            local: DashMap::new(),
            told: DashMap::new(),
            tracker: tracker.clone(),
        });
        tracker.spawn(presence.clone().heartbeat(token));
        presence
    }

    /// Records a connection in its room and tells the room. Best effort: a Redis failure is
    /// logged, and the next heartbeat records the connection anyway.
    pub(crate) async fn enter(self: &Arc<Self>, sid: &str, me: Present) -> PresenceGuard {
        self.local
            .entry(sid.to_owned())
            .or_default()
            .insert(me.conn.clone(), me.clone());
        let changed = self
            .store
            .presence(
                sid,
                PresenceChange::Enter(std::slice::from_ref(&me)),
                PRESENCE_TTL,
            )
            .await;
        self.tell(sid, changed).await;
        PresenceGuard {
            presence: self.clone(),
            sid: sid.to_owned(),
            me,
        }
    }

    async fn leave(&self, sid: &str, me: Present) {
        self.local.remove_if_mut(sid, |_, conns| {
            conns.remove(&me.conn);
            conns.is_empty()
        });
        let changed = self
            .store
            .presence(
                sid,
                PresenceChange::Leave(std::slice::from_ref(&me)),
                PRESENCE_TTL,
            )
            .await;
        self.tell(sid, changed).await;
        if !self.local.contains_key(sid) {
            self.told.remove(sid);
        }
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

    /// Refreshes this node's connections in every room it has some, which also drops the
    /// expired connections of dead nodes; the rooms hear of every change.
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
            let rooms: Vec<(String, Vec<Present>)> = self
                .local
                .iter()
                .map(|r| (r.key().clone(), r.value().values().cloned().collect()))
                .collect();
            for (sid, conns) in rooms {
                let changed = self
                    .store
                    .presence(&sid, PresenceChange::Refresh(&conns), PRESENCE_TTL)
                    .await;
                self.tell(&sid, changed).await;
                // Live members keep their room from expiring (`--room-idle-ttl`).
                if let Err(err) = self.store.keep_room_alive(&sid).await {
                    tracing::debug!(room = %sid, cause = %err, "room not kept alive");
                }
            }
        }
    }
}

/// `{"version","connections","members":[{"role","sub"?,"connections"}]}`: one member per
/// (role, subject), however many connections (tabs) it has.
pub(crate) fn summary(set: &PresenceSet) -> Value {
    let mut members: BTreeMap<(&str, Option<&str>), u64> = BTreeMap::new();
    for p in &set.present {
        *members.entry((&p.role, p.sub.as_deref())).or_default() += 1;
    }
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
        "connections": set.present.len(),
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

    fn p(conn: &str, role: &str, sub: Option<&str>) -> Present {
        Present {
            conn: conn.into(),
            role: role.into(),
            sub: sub.map(str::to_owned),
        }
    }

    #[test]
    fn two_tabs_are_one_member_with_two_connections() {
        let set = PresenceSet {
            version: 7,
            present: vec![
                p("n1-1", "A", Some("alice")),
                p("n2-4", "A", Some("alice")),
                p("n1-2", "B", None),
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
