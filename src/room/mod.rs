//! The rooms this node serves and the live feed that fills them.
//!
//! Delivery comes from Redis, never from the handler that stored an entry: every append
//! publishes `<id>\n<body>` on the room's channel inside the append script, so every node —
//! this one included — receives the room's entries in stream order. A node subscribes to a
//! room's channel while it has members there (one subscriber connection for all rooms), which
//! costs Redis O(subscribers) per message however many rooms exist.
//!
//! Pub/sub is not durable, so the stream backs it: when the subscriber reconnects or lags, each
//! room buffers live entries, re-reads the stream after the last id it delivered, and then
//! replays the buffer, skipping what it already sent ([`Room::catch_up`]).

mod cursor;
mod follow;
mod members;
mod presence;
mod queue;
mod turn_reader;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use cursor::{Cursor, CursorEnd};
pub(crate) use follow::{usage_counts, Failure, Reply, TurnFollow, TurnStep};
pub(crate) use members::{ConnId, Outbound, Room};
pub(crate) use presence::{Member, Presence};
pub(crate) use turn_reader::TurnReader;

use crate::protocol::StreamId;
use crate::store::{DeletionCursor, Feed, FeedEvent, FeedHandle, Live, Store, StoreError};

/// How long an empty room keeps its subscription, so a reconnecting client does not pay for a
/// fresh SUBSCRIBE and baseline read.
const IDLE_ROOM_TTL: Duration = Duration::from_secs(30);
/// Rooms recovered at once after the subscription is lost.
const RECOVERY_CONCURRENCY: usize = 32;

/// Registry of the rooms with members on this node. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Rooms {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    map: DashMap<String, Arc<Room>>,
    store: Store,
    feed: FeedHandle,
    tracker: TaskTracker,
    /// How far this node has read the deletion log (started when the first room subscribes).
    deletions: DeletionCursor,
}

impl Rooms {
    /// Connects the subscriber and starts the live-feed and idle-room tasks on `tracker`.
    pub(crate) fn start(
        store: Store,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Rooms, StoreError> {
        let feed = store.feed()?;
        let rooms = Rooms {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                store,
                feed: feed.handle(),
                tracker: tracker.clone(),
                deletions: DeletionCursor::default(),
            }),
        };
        tracker.spawn(rooms.clone().follow(feed, token.clone()));
        tracker.spawn(rooms.clone().reap_idle(token));
        Ok(rooms)
    }

    /// Adds a member to a room, subscribing this node to the room when needed. Frames for the
    /// member arrive on `tx`; the room drops `tx` if the member cannot keep up.
    pub(crate) async fn join(
        &self,
        sid: &str,
        conn: ConnId,
        tx: queue::Sender,
    ) -> Result<Arc<Room>, StoreError> {
        loop {
            let room = self
                .inner
                .map
                .entry(sid.to_owned())
                .or_insert_with(|| Arc::new(Room::new(sid)))
                .clone();
            if !room.add_member(conn, tx.clone()) {
                continue; // removed by the reaper between lookup and insert
            }
            metrics::gauge!(crate::metrics::ROOMS).set(self.inner.map.len() as f64);
            if let Err(err) = self.ensure_subscribed(&room).await {
                room.remove_member(conn);
                return Err(err);
            }
            return Ok(room);
        }
    }

    pub(crate) fn leave(&self, room: &Room, conn: ConnId) {
        room.remove_member(conn);
    }

    /// Rooms with at least one subscription on this node.
    pub(crate) fn room_count(&self) -> usize {
        self.inner.map.len()
    }

    pub(crate) fn get(&self, sid: &str) -> Option<Arc<Room>> {
        self.inner.map.get(sid).map(|r| r.value().clone())
    }

    async fn ensure_subscribed(&self, room: &Arc<Room>) -> Result<(), StoreError> {
        room.subscribed
            .get_or_try_init(|| async {
                self.inner.feed.follow_room(room.sid()).await?;
                // Everything after the stream's current end will arrive live, and so will the
                // notice of any deletion logged after the log's current end.
                let store = &self.inner.store;
                let (newest, deletions) = tokio::try_join!(
                    store.range_before(room.sid(), None, 1),
                    store.deletions_tail()
                )?;
                if let Some(e) = newest.last() {
                    room.set_baseline(e.id);
                }
                self.inner.deletions.start_at(deletions);
                Ok::<StreamId, StoreError>(deletions)
            })
            .await?;
        Ok(())
    }

    /// The live feed: stored entries and transient frames to their rooms, and a catch-up of
    /// every room from its stream whenever the feed may have lost messages.
    async fn follow(self, mut feed: Feed, token: CancellationToken) {
        loop {
            let event = tokio::select! {
                _ = token.cancelled() => break,
                ev = feed.next() => ev,
            };
            match event {
                Some(FeedEvent::Live {
                    sid,
                    live: Live::Deleted,
                }) => self.forget_deleted(sid),
                Some(FeedEvent::Live {
                    sid,
                    live: Live::Missed,
                }) => {
                    if let Some(room) = self.get(&sid) {
                        tracing::debug!(room = %sid, "live entries without their bodies; reading the stream");
                        self.recover(vec![room], token.clone());
                    }
                }
                Some(FeedEvent::Live { sid, live }) => {
                    if let Some(room) = self.get(&sid) {
                        room.on_live(live);
                    }
                }
                Some(FeedEvent::Resync) => {
                    if self.room_count() > 0 {
                        tracing::info!(
                            rooms = self.room_count(),
                            "live feed interrupted; recovering rooms from their streams"
                        );
                    }
                    let rooms = self.inner.map.iter().map(|r| r.value().clone()).collect();
                    self.forget_missed_deletes(token.clone());
                    self.recover(rooms, token.clone());
                }
                Some(FeedEvent::Cancel { .. } | FeedEvent::Activity) => {}
                None => break,
            }
        }
        self.inner.feed.close().await;
    }

    /// The session was deleted (on any node): the room closes its members here and leaves the
    /// registry at once, so a later join (the session created again under the same id) starts
    /// a fresh room. The subscription goes too, unless such a join took it over meanwhile.
    fn forget_deleted(&self, sid: String) {
        self.forget_deleted_if(sid, |_| true);
    }

    /// [`Rooms::forget_deleted`] if the registry's room for `sid` passes `check`.
    fn forget_deleted_if(&self, sid: String, check: impl FnOnce(&Arc<Room>) -> bool) {
        let Some((_, room)) = self.inner.map.remove_if(&sid, |_, room| check(room)) else {
            return;
        };
        tracing::info!(room = %sid, members = room.member_count(), "session deleted; closing its members");
        room.on_live(Live::Deleted);
        metrics::gauge!(crate::metrics::ROOMS).set(self.inner.map.len() as f64);
        let rooms = self.clone();
        self.inner.tracker.spawn(async move {
            let map = &rooms.inner.map;
            rooms
                .inner
                .feed
                .unfollow_room_if(&sid, || !map.contains_key(&sid))
                .await;
        });
    }

    /// The feed was away: room-deleted notices may have gone out meanwhile. The deletion log
    /// says which sessions were deleted since this node last read it; a room here is closed as
    /// deleted when its session was logged after the room subscribed and its stream is still
    /// gone (a delete that failed, or a session created again, keeps its members).
    fn forget_missed_deletes(&self, token: CancellationToken) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let store = &this.inner.store;
            let Some(Some(logged)) = crate::retry::until_ok(&token, "reading the deletion log", || {
                this.inner.deletions.read_new(store)
            })
            .await
            else {
                return; // shutting down, or no room has subscribed yet: nothing to miss
            };
            for (when, sid) in logged {
                if token.is_cancelled() {
                    return;
                }
                let Some(room) = this.get(&sid) else {
                    continue;
                };
                if room.subscribed.get().is_none_or(|since| *since >= when) {
                    continue;
                }
                match store.session_exists(&sid).await {
                    Ok(false) => {}
                    Ok(true) => continue,
                    Err(err) => {
                        tracing::warn!(room = %sid, cause = %err, "cannot tell whether a session the deletion log names is gone");
                        continue;
                    }
                }
                tracing::info!(room = %sid, "the room-deleted notice was missed while the feed was away");
                this.forget_deleted_if(sid, |r| Arc::ptr_eq(r, &room));
            }
        });
    }

    /// Puts the rooms into recovery now (so no live entry slips past their cursors), then
    /// catches each one up from its stream in the background (unless it is catching up
    /// already: that catch-up reads the stream again).
    fn recover(&self, rooms: Vec<Arc<Room>>, token: CancellationToken) {
        let rooms: Vec<Arc<Room>> = rooms
            .into_iter()
            .filter(|room| room.begin_recovery())
            .collect();
        if rooms.is_empty() {
            return;
        }
        let store = self.inner.store.clone();
        self.inner.tracker.spawn(async move {
            futures_util::stream::iter(rooms)
                .for_each_concurrent(RECOVERY_CONCURRENCY, |room| {
                    let (store, token) = (&store, &token);
                    async move {
                        // Two steps, each retried alone: once the catch-up went live, a
                        // retry of it could run beside the catch-up of a later loss.
                        let mut task = CatchUpTask {
                            room: &room,
                            live: false,
                        };
                        task.live =
                            crate::retry::until_ok(token, "room recovery", || room.catch_up(store))
                                .await
                                .is_some();
                        drop(task);
                        crate::retry::until_ok(token, "room recovery", || room.rebase_turns(store))
                            .await;
                    }
                })
                .await;
        });
    }

    /// Drops rooms that stayed empty for [`IDLE_ROOM_TTL`] and unsubscribes from them.
    async fn reap_idle(self, token: CancellationToken) {
        let mut tick = tokio::time::interval(IDLE_ROOM_TTL / 3);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let candidates: Vec<String> = self
                .inner
                .map
                .iter()
                .filter(|r| r.value().member_count() == 0)
                .map(|r| r.key().clone())
                .collect();
            for sid in candidates {
                let map = &self.inner.map;
                self.inner
                    .feed
                    .unfollow_room_if(&sid, || {
                        map.remove_if(&sid, |_, room| room.close_if_idle(IDLE_ROOM_TTL))
                            .is_some()
                    })
                    .await;
                metrics::gauge!(crate::metrics::ROOMS).set(map.len() as f64);
            }
        }
    }
}

/// A room's catch-up in its task: if the task is dropped before the catch-up went live (a panic
/// beside it, the relay stopping), the room is told, so the next loss starts another.
struct CatchUpTask<'a> {
    room: &'a Room,
    live: bool,
}

impl Drop for CatchUpTask<'_> {
    fn drop(&mut self) {
        if !self.live {
            self.room.abandon_catch_up();
        }
    }
}
