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
//! replays the buffer, skipping what it already sent ([`Room::recover`]).

mod cursor;
mod members;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use cursor::{Cursor, CursorEnd};
pub use members::{ConnId, Outbound, Room};

use crate::store::{Store, StoreError};

/// How long an empty room keeps its subscription, so a reconnecting client does not pay for a
/// fresh SUBSCRIBE and baseline read.
const IDLE_ROOM_TTL: Duration = Duration::from_secs(30);
/// Longest wait for the server to confirm a re-SUBSCRIBE after a reconnect.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rooms recovered at once after the subscription is lost.
const RECOVERY_CONCURRENCY: usize = 32;

/// Registry of the rooms with members on this node. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Rooms {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    map: DashMap<String, Arc<Room>>,
    store: Store,
    subscriber: SubscriberClient,
    /// Serialises SUBSCRIBE/UNSUBSCRIBE so a room removed and re-created at once cannot end up
    /// unsubscribed by a late UNSUBSCRIBE of its predecessor.
    sub_lock: tokio::sync::Mutex<()>,
    tracker: TaskTracker,
}

impl Rooms {
    /// Connects the subscriber and starts the live-feed and idle-room tasks on `tracker`.
    pub fn start(
        store: Store,
        tracker: &TaskTracker,
        token: CancellationToken,
    ) -> Result<Rooms, StoreError> {
        let subscriber = store.subscriber()?;
        let rooms = Rooms {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                store,
                subscriber,
                sub_lock: tokio::sync::Mutex::new(()),
                tracker: tracker.clone(),
            }),
        };
        tracker.spawn(rooms.clone().feed(token.clone()));
        tracker.spawn(rooms.clone().reap_idle(token));
        Ok(rooms)
    }

    /// Adds a member to a room, subscribing this node to the room when needed. Frames for the
    /// member arrive on `tx`; the room drops `tx` if the member cannot keep up.
    pub async fn join(
        &self,
        sid: &str,
        conn: ConnId,
        tx: mpsc::Sender<Outbound>,
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

    pub fn leave(&self, room: &Room, conn: ConnId) {
        room.remove_member(conn);
    }

    /// Rooms with at least one subscription on this node.
    pub fn room_count(&self) -> usize {
        self.inner.map.len()
    }

    pub fn get(&self, sid: &str) -> Option<Arc<Room>> {
        self.inner.map.get(sid).map(|r| r.value().clone())
    }

    async fn ensure_subscribed(&self, room: &Arc<Room>) -> Result<(), StoreError> {
        room.subscribed
            .get_or_try_init(|| async {
                let channel = self.inner.store.keys().channel(room.sid());
                {
                    let _guard = self.inner.sub_lock.lock().await;
                    self.inner.subscriber.subscribe(channel).await?;
                }
                // Everything after the stream's current end will arrive live.
                let newest = self.inner.store.range_before(room.sid(), None, 1).await?;
                if let Some(e) = newest.last() {
                    room.set_baseline(e.id);
                }
                Ok::<(), StoreError>(())
            })
            .await?;
        Ok(())
    }

    /// The live feed: one loop over the subscriber's messages, plus recovery when the
    /// subscription was lost (reconnect) or messages were dropped (lag).
    async fn feed(self, token: CancellationToken) {
        let mut messages = self.inner.subscriber.message_rx();
        let mut reconnects = self.inner.subscriber.reconnect_rx();
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                msg = messages.recv() => match msg {
                    Ok(msg) => {
                        let Some((sid, live)) = self.inner.store.parse_live(&msg) else { continue };
                        if let Some(room) = self.get(sid) {
                            room.on_live(live);
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "live feed lagged; recovering rooms from their streams");
                        self.recover_all(false, token.clone());
                    }
                    Err(RecvError::Closed) => break,
                },
                ev = reconnects.recv() => match ev {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        if self.room_count() > 0 {
                            tracing::info!(rooms = self.room_count(), "subscriber reconnected; resubscribing and recovering rooms");
                        }
                        self.recover_all(true, token.clone());
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
        let _ = self.inner.subscriber.quit().await;
    }

    /// Put every room into recovery now (so no live entry slips past the cursor), then
    /// resubscribe if needed and catch each room up from its stream in the background.
    fn recover_all(&self, resubscribe: bool, token: CancellationToken) {
        let rooms: Vec<Arc<Room>> = self.inner.map.iter().map(|r| r.value().clone()).collect();
        if rooms.is_empty() {
            return;
        }
        for room in &rooms {
            room.begin_recovery();
        }
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            if resubscribe {
                loop {
                    let res = {
                        let _guard = this.inner.sub_lock.lock().await;
                        this.resubscribe().await
                    };
                    match res {
                        Ok(()) => break,
                        Err(err) => {
                            tracing::warn!(cause = %err, "resubscribe failed; retrying");
                            tokio::select! {
                                _ = token.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            }
            futures_util::stream::iter(rooms)
                .for_each_concurrent(RECOVERY_CONCURRENCY, |room| {
                    let store = this.inner.store.clone();
                    let token = token.clone();
                    async move {
                        let mut backoff = Duration::from_millis(100);
                        while let Err(err) = room.recover(&store).await {
                            tracing::warn!(room = %room.sid(), cause = %err, "room recovery failed; retrying");
                            tokio::select! {
                                _ = token.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                })
                .await;
        });
    }

    /// Subscribes again to every tracked room channel. (fred's `resubscribe_all` also sends a
    /// PSUBSCRIBE with no patterns, which never completes.)
    async fn resubscribe(&self) -> Result<(), StoreError> {
        let channels: Vec<String> = self
            .inner
            .subscriber
            .tracked_channels()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        if channels.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(
            RESUBSCRIBE_TIMEOUT,
            self.inner.subscriber.subscribe(channels),
        )
        .await
        {
            Ok(res) => Ok(res?),
            Err(_) => Err(StoreError::Reply("SUBSCRIBE timed out")),
        }
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
                let _guard = self.inner.sub_lock.lock().await;
                let removed = self
                    .inner
                    .map
                    .remove_if(&sid, |_, room| room.close_if_idle(IDLE_ROOM_TTL));
                metrics::gauge!(crate::metrics::ROOMS).set(self.inner.map.len() as f64);
                if removed.is_some() {
                    let channel = self.inner.store.keys().channel(&sid);
                    if let Err(err) = self.inner.subscriber.unsubscribe(channel).await {
                        tracing::debug!(room = %sid, cause = %err, "unsubscribe failed");
                    }
                }
            }
        }
    }
}
