//! Live feeds from Redis pub/sub, decoded: room channels for relay nodes, cancel notices and
//! wake-ups for LLM workers.
//!
//! Room channels are sharded channels (`SPUBLISH` from the scripts, `SSUBSCRIBE` here; Redis
//! 7.0 or newer): on Redis Cluster a message then travels only within the shard that owns the
//! room's slot, instead of to every node of the cluster as a plain `PUBLISH` does. The channel
//! is named like the room's key, so it hashes to the same slot. On a single Redis sharded
//! channels behave like plain ones.
//!
//! A [`Feed`] owns one subscriber connection. Subscriptions do not survive a reconnect, so the
//! feed subscribes again to everything it follows (here, once for every user) and then reports
//! [`FeedEvent::Resync`]: messages may have been missed meanwhile, and whoever follows the feed
//! catches up from the streams. A reader that lags behind the connection gets `Resync` too.
//! fred's own `resubscribe_all` is not used: it sends a PSUBSCRIBE even with no patterns, which
//! never completes.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::Server;
use fred::types::{Message, MessageKind};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use super::held::Held;
use super::keys::{Keys, TRANSIENT_MARK};
use super::{Live, StoreError, TurnMark};
use crate::protocol::StreamId;

/// Longest wait for the server to confirm a re-subscription after a reconnect.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a feed delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A stored entry or a transient frame on a followed room's channel.
    Live { sid: String, live: Live },
    /// Someone cancelled an LLM turn.
    Cancel { sid: String, turn: StreamId },
    /// A room received something an LLM worker may have to answer (only with
    /// [`FeedHandle::follow_llm_wakeups`]).
    Activity,
    /// Messages may have been lost (the connection dropped or the reader lagged); the feed is
    /// subscribed again to everything it follows.
    Resync,
}

/// The receiving half of a feed: one task reads it.
#[derive(Debug)]
pub struct Feed {
    handle: FeedHandle,
    messages: Receiver<Message>,
    reconnects: Receiver<Server>,
}

/// The controlling half: follow and unfollow from any task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FeedHandle {
    sub: SubscriberClient,
    keys: Keys,
    /// The bodies of this node's own batches published as `-i` (and which rooms it follows).
    held: Arc<Held>,
    /// Serialises (un)subscriptions so that an UNSUBSCRIBE for a room that is being dropped
    /// cannot overtake the SUBSCRIBE of the same room joined again at once.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Feed {
    pub(super) fn new(sub: SubscriberClient, keys: Keys, held: Arc<Held>) -> Feed {
        let messages = sub.message_rx();
        let reconnects = sub.reconnect_rx();
        sub.connect();
        Feed {
            handle: FeedHandle {
                sub,
                keys,
                held,
                lock: Arc::new(tokio::sync::Mutex::new(())),
            },
            messages,
            reconnects,
        }
    }

    pub fn handle(&self) -> FeedHandle {
        self.handle.clone()
    }

    /// The next event; `None` once the connection is closed for good ([`FeedHandle::close`]).
    /// Cancel-safe: dropping the future loses nothing but a pending re-subscription, which the
    /// next call starts again.
    pub async fn next(&mut self) -> Option<FeedEvent> {
        loop {
            tokio::select! {
                msg = self.messages.recv() => match msg {
                    Ok(msg) => {
                        if let Some(ev) = self.handle.decode(&msg) {
                            return Some(ev);
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "pub/sub feed lagged");
                        // Their `-i` messages may be among the lost: the rooms read the stream.
                        self.handle.held.clear();
                        return Some(FeedEvent::Resync);
                    }
                    Err(RecvError::Closed) => return None,
                },
                ev = self.reconnects.recv() => match ev {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        self.handle.held.clear();
                        self.handle.resubscribe().await;
                        return Some(FeedEvent::Resync);
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

impl FeedHandle {
    /// Follows a room's live channel.
    pub async fn follow_room(&self, sid: &str) -> Result<(), StoreError> {
        let _guard = self.lock.lock().await;
        self.sub.ssubscribe(self.keys.channel(sid)).await?;
        self.held.set_following(sid, true);
        Ok(())
    }

    /// Stops following a room if `drop_room` (called under the subscription lock) says so.
    /// Returns what `drop_room` returned.
    pub async fn unfollow_room_if(&self, sid: &str, drop_room: impl FnOnce() -> bool) -> bool {
        let _guard = self.lock.lock().await;
        if !drop_room() {
            return false;
        }
        self.held.set_following(sid, false);
        if let Err(err) = self.sub.sunsubscribe(self.keys.channel(sid)).await {
            tracing::debug!(room = %sid, cause = %err, "unsubscribe failed");
        }
        true
    }

    /// Follows cancel notices (LLM workers).
    pub async fn follow_cancels(&self) -> Result<(), StoreError> {
        let _guard = self.lock.lock().await;
        self.sub.subscribe(self.keys.cancel_channel()).await?;
        Ok(())
    }

    /// Follows the LLM wake-up channel (LLM workers on Redis Cluster, where a group read cannot
    /// block on rooms of several slots): relays publish on it when they store an entry that
    /// asks the LLM, so the worker reads at once instead of at its next poll.
    pub async fn follow_llm_wakeups(&self) -> Result<(), StoreError> {
        let _guard = self.lock.lock().await;
        self.sub.subscribe(self.keys.llm_wake_channel()).await?;
        Ok(())
    }

    pub async fn close(&self) {
        let _ = self.sub.quit().await;
    }

    fn decode(&self, msg: &Message) -> Option<FeedEvent> {
        if msg.kind == MessageKind::Message && msg.channel == self.keys.llm_wake_channel() {
            return Some(FeedEvent::Activity);
        }
        let payload = msg.value.as_str()?;
        if msg.channel == self.keys.cancel_channel() {
            let (sid, turn) = decode_cancel(&payload)?;
            return Some(FeedEvent::Cancel {
                sid: sid.to_owned(),
                turn,
            });
        }
        let sid = self.keys.sid_of(&msg.channel)?;
        let (head, rest) = payload.split_once('\n')?;
        let live = if head == TRANSIENT_MARK {
            Live::Transient(rest.to_owned())
        } else if head == DELETED_MARK {
            Live::Deleted
        } else if let Some(mark) = decode_turn_mark(head) {
            Live::Turn {
                mark,
                frame: rest.to_owned(),
            }
        } else if let Some(token) = head.strip_prefix(HELD_MARK) {
            let live = self
                .held
                .take(token)
                .and_then(|bodies| pair_held(rest, bodies))
                .map_or(Live::Missed, Live::Entries);
            let missed = matches!(live, Live::Missed);
            tracing::trace!(room = %sid, token, ids = rest, missed, "held batch");
            live
        } else if head == BATCH_MARK {
            match decode_batch(rest) {
                Some(entries) => Live::Entries(entries),
                None => {
                    // Cannot happen (the script writes lengths it measured); if it did, the
                    // rooms catch up from their streams rather than miss the batch.
                    tracing::warn!(room = %sid, "malformed batch on a room channel");
                    return Some(FeedEvent::Resync);
                }
            }
        } else {
            Live::Entries(vec![(head.parse().ok()?, rest.to_owned())])
        };
        Some(FeedEvent::Live {
            sid: sid.to_owned(),
            live,
        })
    }

    /// Subscribes again to every channel and pattern this feed follows, retrying until it
    /// works (the caller's cancellation ends the wait).
    async fn resubscribe(&self) {
        let mut delays = crate::retry::until_back();
        loop {
            let res = {
                let _guard = self.lock.lock().await;
                tokio::time::timeout(RESUBSCRIBE_TIMEOUT, self.subscribe_tracked()).await
            };
            match res {
                Ok(Ok(())) => return,
                Ok(Err(err)) => tracing::warn!(cause = %err, "resubscribe failed; retrying"),
                Err(_) => tracing::warn!("resubscribe timed out; retrying"),
            }
            tokio::time::sleep(delays.next_delay()).await;
        }
    }

    async fn subscribe_tracked(&self) -> Result<(), StoreError> {
        let channels: Vec<String> = self
            .sub
            .tracked_channels()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        if !channels.is_empty() {
            self.sub.subscribe(channels).await?;
        }
        // One SSUBSCRIBE per hash slot: a command may name channels of one slot only.
        let mut by_slot: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
        for channel in self.sub.tracked_shard_channels() {
            let channel = channel.to_string();
            by_slot
                .entry(fred::util::redis_keyslot(channel.as_bytes()))
                .or_default()
                .push(channel);
        }
        for channels in by_slot.into_values() {
            self.sub.ssubscribe(channels).await?;
        }
        Ok(())
    }
}

/// The pub/sub payload of a live LLM frame: `-s <turn> <attempt> <seq>` (start) or `-d ...`
/// (delta), a newline, the frame. Stored entries start with their id and typing frames with a
/// lone `-`, so the three never mix.
pub(crate) fn encode_turn_frame(mark: TurnMark, frame: &str) -> String {
    let kind = if mark.start { 's' } else { 'd' };
    format!(
        "-{kind} {} {} {}\n{frame}",
        mark.turn, mark.attempt, mark.seq
    )
}

fn decode_turn_mark(head: &str) -> Option<TurnMark> {
    let start = match head.get(..3)? {
        "-s " => true,
        "-d " => false,
        _ => return None,
    };
    let mut parts = head[3..].split(' ');
    let mark = TurnMark {
        turn: parts.next()?.parse().ok()?,
        attempt: parts.next()?.parse().ok()?,
        seq: parts.next()?.parse().ok()?,
        start,
    };
    parts.next().is_none().then_some(mark)
}

/// First line of the notice that a room was deleted; nothing follows it. Like the other
/// non-entry marks it starts with `-`, which no stream id does.
const DELETED_MARK: &str = "-x";

/// First line of a group commit's batch of entries (more than one), published by `append.lua`:
/// then, per entry, `<id> <body length in bytes>\n<body>`, with nothing in between.
const BATCH_MARK: &str = "-b";

/// First line of a batch whose bodies the committing node holds (see `held.rs`), then its
/// token: `-i <token>`, then a line with each entry's id in batch order, `-` for one not
/// stored (a duplicate, or refused), separated by spaces.
const HELD_MARK: &str = "-i ";

/// A held batch's stored entries: the published ids with the held bodies, or `None` when
/// they do not match (then the room reads the stream instead).
fn pair_held(ids: &str, bodies: Vec<String>) -> Option<Vec<(StreamId, String)>> {
    let ids: Vec<&str> = ids.split(' ').collect();
    if ids.len() != bodies.len() {
        return None;
    }
    let mut entries = Vec::with_capacity(ids.len());
    for (id, body) in ids.into_iter().zip(bodies) {
        if id != "-" {
            entries.push((id.parse().ok()?, body));
        }
    }
    Some(entries)
}

/// The entries of a batch, or `None` when it is malformed.
fn decode_batch(mut rest: &str) -> Option<Vec<(StreamId, String)>> {
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let (head, tail) = rest.split_once('\n')?;
        let (id, len) = head.split_once(' ')?;
        let len: usize = len.parse().ok()?;
        let body = tail.get(..len)?;
        entries.push((id.parse().ok()?, body.to_owned()));
        rest = &tail[len..];
    }
    Some(entries)
}

/// The payload of the room-deleted notice, which `session_delete.lua` publishes on the room's
/// channel in the script that deletes the room.
pub(super) fn encode_deleted() -> String {
    format!("{DELETED_MARK}\n")
}

/// The payload of a cancel notice on the cancel channel.
pub(super) fn encode_cancel(sid: &str, turn: StreamId) -> String {
    format!("{sid} {turn}")
}

fn decode_cancel(payload: &str) -> Option<(&str, StreamId)> {
    let (sid, turn) = payload.split_once(' ')?;
    Some((sid, turn.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_into_their_entries() {
        // As append.lua writes it: bodies may hold anything, newlines and spaces included.
        let a = "{\"bd\":{\"text\":\"one\\n\"}}";
        let b = "{\"bd\": {\"text\": \"two\nlines é\"}}";
        let payload = format!("1-0 {}\n{a}2-5 {}\n{b}", a.len(), b.len());
        let entries = decode_batch(&payload).unwrap();
        assert_eq!(
            entries,
            vec![
                ("1-0".parse().unwrap(), a.to_owned()),
                ("2-5".parse().unwrap(), b.to_owned())
            ]
        );
        assert_eq!(decode_batch("1-0 99\n{}"), None, "a length past the end");
        assert_eq!(decode_batch("1-0 x\n{}"), None, "no length");
    }

    #[test]
    fn held_batches_pair_ids_with_bodies() {
        let bodies = || vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(
            pair_held("1-0 - 2-5", bodies()),
            Some(vec![
                ("1-0".parse().unwrap(), "a".to_owned()),
                ("2-5".parse().unwrap(), "c".to_owned())
            ])
        );
        assert_eq!(pair_held("1-0 2-5", bodies()), None, "one id short");
        assert_eq!(pair_held("1-0 x 2-5", bodies()), None, "not an id");
    }

    #[test]
    fn turn_frames_round_trip() {
        let mark = TurnMark {
            turn: StreamId::new(17, 2),
            attempt: 2,
            seq: -1,
            start: true,
        };
        let payload = encode_turn_frame(mark, "{\"hd\":{}}");
        let (head, frame) = payload.split_once('\n').unwrap();
        assert_eq!(decode_turn_mark(head), Some(mark));
        assert_eq!(frame, "{\"hd\":{}}");
        assert_eq!(decode_turn_mark("-"), None);
        assert_eq!(decode_turn_mark("-d 1-0 1"), None);
        assert_eq!(decode_turn_mark("17-2"), None);
    }

    #[test]
    fn deleted_notice_is_neither_an_entry_nor_a_turn_frame() {
        let payload = encode_deleted();
        let (head, rest) = payload.split_once('\n').unwrap();
        assert_eq!((head, rest), (DELETED_MARK, ""));
        assert_eq!(decode_turn_mark(head), None);
        assert!(head.parse::<StreamId>().is_err());
    }

    #[test]
    fn cancel_notice_round_trips() {
        let turn = StreamId::new(1_700_000_000_000, 3);
        let payload = encode_cancel("room-1", turn);
        assert_eq!(decode_cancel(&payload), Some(("room-1", turn)));
        assert_eq!(decode_cancel("room-1"), None);
        assert_eq!(decode_cancel("room-1 nope"), None);
    }
}
