//! One room on this node: its local members and the live cursor that keeps delivery in stream
//! order, exactly once per member, across lost subscriptions.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;

use super::queue::{self, TrySendError};
use crate::protocol::{delivery_frame, ended_turn, StreamId};
use crate::store::{Live, Store, StoreError, TurnMark, TurnState};

/// A frame queued for one socket. `id` is set for stored entries so the session can skip what
/// it already sent during a replay; transient frames have none.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    pub id: Option<StreamId>,
    /// Set for a live LLM frame: which turn, attempt and delta it carries.
    pub turn: Option<TurnMark>,
    pub frame: Utf8Bytes,
}

/// A connection's number on this node.
pub(crate) type ConnId = u64;

/// Live entries held while the room catches up from the stream; beyond this the buffer is
/// dropped and the catch-up simply reads further (the stream is the real buffer).
const RECOVERY_BUFFER: usize = 4096;
/// Page size for catch-up reads.
const RECOVERY_PAGE: u64 = 1000;
/// Ended turns a room remembers while re-base reads are in flight ([`TurnHold::ended`]): how
/// many turns end during one read (at most the Redis command timeout), seldom many.
const ENDED_TURNS: usize = 16;
/// Live LLM frames held while a turn re-base read is in flight; beyond this they go out as
/// they come (a member that was behind may then wait for the turn's stored end). Well below
/// the member queue (`--outbound-queue`, 1024 by default): they are released in one burst.
const TURN_HOLD: usize = 256;

#[derive(Debug)]
pub(crate) struct Room {
    sid: Arc<str>,
    state: Mutex<RoomState>,
    /// Set once this node follows the room's channel: the deletion log's newest id then. A
    /// deletion logged after it was announced while the node was following.
    pub(super) subscribed: tokio::sync::OnceCell<StreamId>,
}

#[derive(Debug)]
struct RoomState {
    members: Vec<Member>,
    /// The newest stored entry this node delivered to the room (or the stream's last id when
    /// the node subscribed). Live entries at or below it are duplicates.
    last_id: StreamId,
    recovering: Option<Recovery>,
    turn_hold: TurnHold,
    /// Set once the registry removed the room; joins then retry with a fresh room.
    closed: bool,
    /// The session was deleted: members were dropped for that reason, not for being slow.
    deleted: bool,
    empty_since: Option<Instant>,
}

#[derive(Debug)]
struct Member {
    conn: ConnId,
    tx: queue::Sender,
}

/// Live LLM frames held back while [`Room::rebase_turns`] reads the turns in progress, so its
/// fresh `llm.start`s reach members before any delta published after the read. Otherwise a
/// member that was behind would get those deltas first (and drop them: they do not follow what
/// it has), then the start, and then drop every later delta as one past a gap, until the
/// turn's stored end.
#[derive(Debug, Default)]
struct TurnHold {
    /// Re-base reads in flight (a later loss's recovery may start one beside an earlier one).
    readers: u32,
    frames: Vec<Outbound>,
    /// More than [`TURN_HOLD`] frames came during these reads: the rest pass at once.
    overflowed: bool,
    /// Where the starts sent by these reads put each turn: held frames at or before that
    /// (attempt, seq) are dropped by every member, and are not released.
    rebased: Vec<TurnMark>,
    /// The LLM turns whose stored end (`llm.response`, `llm.error`) the room delivered during
    /// these reads, oldest first. A read made just before such an end still finds the turn in
    /// progress, and its start must not restart the turn for members: the end went out first,
    /// so nothing would end it again. (An end delivered before a read began was stored before
    /// it, and the read does not find that turn.)
    ended: Vec<StreamId>,
}

/// One re-base read in flight. Dropped (also when the read fails or its task is cancelled),
/// it lets the held frames go once no other read is in flight.
struct TurnHoldGuard<'a>(&'a Room);

impl Drop for TurnHoldGuard<'_> {
    fn drop(&mut self) {
        let room = self.0;
        let mut st = room.lock();
        st.turn_hold.readers = st.turn_hold.readers.saturating_sub(1);
        if st.turn_hold.readers == 0 {
            room.release_held_turn_frames(&mut st);
            st.turn_hold = TurnHold::default();
        }
    }
}

#[derive(Debug, Default)]
struct Recovery {
    buffer: Vec<(StreamId, Outbound)>,
    overflowed: bool,
    /// A catch-up task owns this recovery. Cleared if that task ends before going live (see
    /// [`Room::abandon_catch_up`]), so the next loss starts a new one.
    owned: bool,
}

impl Room {
    pub(super) fn new(sid: &str) -> Self {
        Self {
            sid: sid.into(),
            state: Mutex::new(RoomState {
                members: Vec::new(),
                last_id: StreamId::ZERO,
                recovering: None,
                turn_hold: TurnHold::default(),
                closed: false,
                deleted: false,
                empty_since: Some(Instant::now()),
            }),
            subscribed: tokio::sync::OnceCell::new(),
        }
    }

    pub(crate) fn sid(&self) -> &str {
        &self.sid
    }

    /// The lock is never held across an `.await`; a poisoned lock only means another thread
    /// panicked mid-fan-out, and the state is still consistent enough to keep serving.
    fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a member; `false` if the room was closed meanwhile (the caller retries).
    pub(super) fn add_member(&self, conn: ConnId, tx: queue::Sender) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        st.members.push(Member { conn, tx });
        st.empty_since = None;
        true
    }

    pub(super) fn remove_member(&self, conn: ConnId) {
        let mut st = self.lock();
        st.members.retain(|m| m.conn != conn);
        if st.members.is_empty() && st.empty_since.is_none() {
            st.empty_since = Some(Instant::now());
        }
    }

    /// Whether the session was deleted (its members were closed for that reason).
    pub(crate) fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    pub(crate) fn member_count(&self) -> usize {
        self.lock().members.len()
    }

    /// Marks the room closed if it has been empty for at least `idle`.
    pub(super) fn close_if_idle(&self, idle: std::time::Duration) -> bool {
        let mut st = self.lock();
        let idle_enough =
            st.members.is_empty() && st.empty_since.is_some_and(|t| t.elapsed() >= idle);
        if idle_enough {
            st.closed = true;
        }
        idle_enough
    }

    /// Raise the live cursor to the stream's newest id seen at subscription time.
    pub(super) fn set_baseline(&self, id: StreamId) {
        let mut st = self.lock();
        st.last_id = st.last_id.max(id);
    }

    /// A message from the room's channel.
    pub(super) fn on_live(&self, live: Live) {
        match live {
            Live::Transient(frame) => {
                let out = Outbound {
                    id: None,
                    turn: None,
                    frame: frame.into(),
                };
                let mut st = self.lock();
                self.fan_out(&mut st, &out);
            }
            Live::Turn { mark, frame } => {
                let out = Outbound {
                    id: None,
                    turn: Some(mark),
                    frame: frame.into(),
                };
                let mut st = self.lock();
                let hold = &mut st.turn_hold;
                if hold.readers > 0 && !hold.overflowed {
                    if hold.frames.len() < TURN_HOLD {
                        hold.frames.push(out);
                        return;
                    }
                    hold.overflowed = true;
                    self.release_held_turn_frames(&mut st);
                }
                self.fan_out(&mut st, &out);
            }
            Live::Entries(entries) => {
                // Frames built before taking the lock; one lock for a whole batch.
                let outs: Vec<(StreamId, Outbound)> = entries
                    .iter()
                    .map(|&(id, ref body)| {
                        let frame = delivery_frame(id, "", "", body).into();
                        let out = Outbound {
                            id: Some(id),
                            turn: None,
                            frame,
                        };
                        (id, out)
                    })
                    .collect();
                let mut st = self.lock();
                for (id, out) in outs {
                    tracing::trace!(room = %self.sid, id = %id, recovering = st.recovering.is_some(), last = %st.last_id, "live entry");
                    if let Some(rec) = st.recovering.as_mut() {
                        if rec.buffer.len() < RECOVERY_BUFFER {
                            rec.buffer.push((id, out));
                        } else {
                            rec.overflowed = true;
                            rec.buffer.clear();
                        }
                        continue;
                    }
                    self.deliver_entry(&mut st, id, &out);
                }
            }
            // The registry recovers the room from its stream (`Rooms::follow`).
            Live::Missed => {}
            Live::Deleted => {
                // Dropping the senders ends every member's cursor once it has read what was
                // queued before (`CursorEnd::Deleted`); the room takes no one new.
                let mut st = self.lock();
                st.deleted = true;
                st.closed = true;
                st.members.clear();
                st.empty_since = Some(Instant::now());
            }
        }
    }

    fn deliver_entry(&self, st: &mut RoomState, id: StreamId, out: &Outbound) {
        if id <= st.last_id {
            return;
        }
        st.last_id = id;
        // Only a re-base read in flight needs to know (and most rooms never have one).
        if st.turn_hold.readers > 0 {
            if let Some(turn) = ended_turn(&out.frame) {
                let ended = &mut st.turn_hold.ended;
                if ended.len() == ENDED_TURNS {
                    ended.remove(0);
                }
                ended.push(turn);
            }
        }
        let lag_ms = crate::protocol::now_ms().saturating_sub(id.ms);
        crate::metrics::HOT
            .delivery_lag
            .record(lag_ms as f64 / 1000.0);
        self.fan_out(st, out);
    }

    /// Queue a frame for every member without waiting: a member whose queue is full is
    /// dropped (its session sees the channel close and disconnects it as a slow consumer).
    fn fan_out(&self, st: &mut RoomState, out: &Outbound) {
        let before = st.members.len();
        st.members.retain(|m| match m.tx.try_send(out.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full) => {
                tracing::warn!(room = %self.sid, conn = m.conn, "outbound queue full; dropping slow client");
                metrics::counter!(crate::metrics::SLOW_DISCONNECTS).increment(1);
                false
            }
            Err(TrySendError::Closed) => false,
        });
        let dropped = before - st.members.len();
        crate::metrics::HOT
            .frames_out
            .increment(st.members.len() as u64);
        if dropped > 0 && st.members.is_empty() {
            st.empty_since = Some(Instant::now());
        }
    }

    /// Start buffering live entries: the subscription was lost or lagged, so entries may be
    /// missing between the cursor and whatever arrives next. Returns whether the caller must
    /// start the catch-up ([`Room::catch_up`]); `false` when one is already under way.
    ///
    /// One catch-up per room at a time: two would share one buffer and one `overflowed` flag,
    /// and one could go live on a read made before the lost entries were stored while the
    /// other dropped the buffer that held them; live entries then raise the cursor past them
    /// (the cluster fault run saw a whole 64-entry batch skipped that way). During a recovery
    /// under way the new loss also left a hole in its buffer, and its read in flight may
    /// predate the lost entries: the buffer is dropped as if it had overflowed, so that
    /// recovery reads the stream again before it goes live.
    pub(super) fn begin_recovery(&self) -> bool {
        let mut st = self.lock();
        let (under_way, last) = (st.recovering.is_some(), st.last_id);
        tracing::debug!(room = %self.sid, under_way, %last, "entries may be missed; recovering");
        match st.recovering.as_mut() {
            None => {
                st.recovering = Some(Recovery {
                    owned: true,
                    ..Recovery::default()
                });
                true
            }
            Some(rec) => {
                rec.overflowed = true;
                rec.buffer.clear();
                !std::mem::replace(&mut rec.owned, true)
            }
        }
    }

    /// The catch-up task ended before going live (it was dropped: a panic beside it, or the
    /// relay stopping). The room keeps buffering, and the next loss starts a new catch-up
    /// instead of counting on this one.
    pub(super) fn abandon_catch_up(&self) {
        if let Some(rec) = self.lock().recovering.as_mut() {
            rec.owned = false;
        }
    }

    /// After [`Room::catch_up`]: LLM deltas are not in the stream, so members may have missed
    /// some. A fresh llm.start per turn in progress re-bases whoever is behind (cursors drop it
    /// for the others). Live LLM frames wait meanwhile ([`TurnHold`]) and follow the starts;
    /// stored entries do not wait, so a turn's end can overtake its held frames (those are then
    /// not sent: see [`Room::release_held_turn_frames`]).
    pub(super) async fn rebase_turns(&self, store: &Store) -> Result<(), StoreError> {
        let hold = self.hold_turn_frames();
        let turns = store.active_turns(&self.sid).await?;
        self.rebase(hold, &turns);
        Ok(())
    }

    /// The starts of a re-base read, then (unless another read is in flight) what was held.
    fn rebase(&self, hold: TurnHoldGuard<'_>, turns: &[TurnState]) {
        {
            let mut st = self.lock();
            for t in turns {
                if !st.turn_hold.ended.contains(&t.turn) {
                    let start = super::cursor::turn_start(&self.sid, t);
                    st.turn_hold.rebased.extend(start.turn);
                    self.fan_out(&mut st, &start);
                }
            }
        }
        drop(hold);
    }

    fn hold_turn_frames(&self) -> TurnHoldGuard<'_> {
        self.lock().turn_hold.readers += 1;
        TurnHoldGuard(self)
    }

    /// Sends the held frames in order, but none of a turn whose end the room delivered
    /// meanwhile (a start would begin it again for members, and nothing would end it) and none
    /// a re-base start made redundant (every member drops those: fewer frames in the burst).
    fn release_held_turn_frames(&self, st: &mut RoomState) {
        for out in std::mem::take(&mut st.turn_hold.frames) {
            let stale = out.turn.is_some_and(|mark| {
                st.turn_hold.ended.contains(&mark.turn)
                    || st.turn_hold.rebased.iter().any(|r| {
                        r.turn == mark.turn && (mark.attempt, mark.seq) <= (r.attempt, r.seq)
                    })
            });
            if !stale {
                self.fan_out(st, &out);
            }
        }
    }

    /// Catch up from the stream after `last_id`, then replay the live entries buffered
    /// meanwhile, then go live. Loops while the buffer overflowed, since those entries are in
    /// the stream too. Retried on its own (never after it went live: a retry then could run
    /// beside the catch-up of a later loss).
    pub(super) async fn catch_up(&self, store: &Store) -> Result<(), StoreError> {
        loop {
            let after = self.lock().last_id;
            let page = store
                .range_after(&self.sid, Some(after), None, RECOVERY_PAGE)
                .await?;
            let full_page = page.len() as u64 == RECOVERY_PAGE;
            // Fields are evaluated only when the event is enabled.
            tracing::debug!(room = %self.sid, %after, n = page.len(),
                last = ?page.last().map(|e| e.id.to_string()), "recovery page");
            {
                let mut st = self.lock();
                for e in &page {
                    let out = Outbound {
                        id: Some(e.id),
                        turn: None,
                        frame: delivery_frame(e.id, &e.participant, &e.event, &e.body).into(),
                    };
                    self.deliver_entry(&mut st, e.id, &out);
                }
                if full_page {
                    continue;
                }
                let Some(rec) = st.recovering.as_mut() else {
                    return Ok(());
                };
                if rec.overflowed {
                    rec.overflowed = false;
                    rec.buffer.clear();
                    continue;
                }
                let buffered = std::mem::take(&mut rec.buffer);
                st.recovering = None;
                for (id, out) in &buffered {
                    self.deliver_entry(&mut st, *id, out);
                }
                if page.is_empty() && buffered.is_empty() {
                    tracing::debug!(room = %self.sid, "recovered; nothing was missed");
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: u64) -> (StreamId, String) {
        (
            StreamId::new(ms, 0),
            format!(r#"{{"hd":{{}},"bd":{{"n":{ms}}}}}"#),
        )
    }

    /// A second loss during a catch-up starts no second one (the first reads the stream again),
    /// and what the first had buffered is dropped: it may sit past a hole.
    #[test]
    fn one_catch_up_per_room() {
        let room = Room::new("r");
        assert!(room.begin_recovery(), "the first loss starts a catch-up");
        room.on_live(Live::Entries(vec![entry(5)]));
        assert_eq!(
            room.lock().recovering.as_ref().map(|r| r.buffer.len()),
            Some(1)
        );
        assert!(!room.begin_recovery(), "one is under way");
        let st = room.lock();
        let rec = st
            .recovering
            .as_ref()
            .map(|r| (r.buffer.len(), r.overflowed));
        assert_eq!(
            rec,
            Some((0, true)),
            "its buffer dropped, the stream read again"
        );
        drop(st);
        room.abandon_catch_up();
        assert!(
            room.begin_recovery(),
            "its task died: the next loss starts another"
        );
        assert!(!room.begin_recovery());
    }

    fn delta(seq: i64) -> Live {
        Live::Turn {
            mark: TurnMark {
                turn: StreamId::new(1, 0),
                attempt: 1,
                seq,
                start: false,
            },
            frame: format!("delta {seq}"),
        }
    }

    /// What a member's queue holds, as (start?, seq).
    fn drain(rx: &mut queue::Receiver) -> Vec<(bool, i64)> {
        std::iter::from_fn(|| rx.try_recv())
            .filter_map(|out| out.turn.map(|m| (m.start, m.seq)))
            .collect()
    }

    /// Deltas published while a re-base read is in flight reach members after its starts, in
    /// their order, once the last read in flight is done (or gave up); those the start already
    /// holds are not sent.
    #[test]
    fn live_turn_frames_wait_for_the_rebase_starts() {
        let room = Room::new("r");
        let (tx, mut rx) = queue::channel(TURN_HOLD + 16);
        assert!(room.add_member(7, tx));
        let turn = TurnState {
            turn: StreamId::new(1, 0),
            attempt: 1,
            seq: 4,
            text: "so far".into(),
            ..TurnState::default()
        };

        let first = room.hold_turn_frames();
        room.on_live(delta(3));
        room.on_live(delta(5));
        let second = room.hold_turn_frames();
        room.on_live(delta(6));
        assert_eq!(drain(&mut rx), [], "held while a read is in flight");
        room.rebase(first, std::slice::from_ref(&turn));
        assert_eq!(
            drain(&mut rx),
            [(true, 4)],
            "the other read still holds them"
        );
        room.rebase(second, &[]);
        assert_eq!(
            drain(&mut rx),
            [(false, 5), (false, 6)],
            "delta 3 is in the start's text"
        );
        room.on_live(delta(7));
        assert_eq!(drain(&mut rx), [(false, 7)], "no read in flight: at once");

        // A failed or cancelled read lets the frames go as well.
        let failed = room.hold_turn_frames();
        room.on_live(delta(8));
        drop(failed);
        assert_eq!(drain(&mut rx), [(false, 8)]);

        // Too many: all go, in order, and the rest pass at once.
        let slow = room.hold_turn_frames();
        let n = TURN_HOLD as i64 + 2;
        for seq in 0..n {
            room.on_live(delta(seq));
        }
        let got = drain(&mut rx);
        assert_eq!(got.len() as i64, n);
        assert!(got.iter().zip(0..).all(|(&(_, seq), i)| seq == i));
        drop(slow);
        assert_eq!(drain(&mut rx), []);
    }

    /// A re-base read made just before a turn's end was stored finds the turn in progress; if
    /// the end reached the room first, the start is not sent (nothing would end it again). Nor
    /// are a turn's live frames held during the read, when its end overtook them.
    #[test]
    fn no_start_for_a_turn_the_room_saw_end() {
        let room = Room::new("r");
        let (tx, mut rx) = queue::channel(16);
        assert!(room.add_member(7, tx));
        let in_progress = |ms| TurnState {
            turn: StreamId::new(ms, 0),
            attempt: 1,
            seq: 2,
            ..TurnState::default()
        };
        let hd = serde_json::json!({"turn_id": "1-0"});
        let hd = hd.as_object().cloned().unwrap_or_default();
        let bd = serde_json::json!({"text": "done"});
        let end = crate::protocol::new_body("llm.response", "llm", None, "r", &hd, &bd);

        let hold = room.hold_turn_frames();
        room.on_live(Live::Entries(vec![(StreamId::new(9, 0), end)]));
        room.rebase(hold, &[in_progress(1), in_progress(2)]);
        let sent = |rx: &mut queue::Receiver| -> Vec<Option<StreamId>> {
            std::iter::from_fn(|| rx.try_recv())
                .map(|out| out.id.or(out.turn.map(|m| m.turn)))
                .collect()
        };
        assert_eq!(
            sent(&mut rx),
            [Some(StreamId::new(9, 0)), Some(StreamId::new(2, 0))],
            "the end, then the start of the other turn only"
        );

        // A short turn starts and ends while a read is in flight.
        let hd = serde_json::json!({"turn_id": "3-0"});
        let hd = hd.as_object().cloned().unwrap_or_default();
        let end = crate::protocol::new_body("llm.error", "llm", None, "r", &hd, &bd);
        let hold = room.hold_turn_frames();
        room.on_live(Live::Turn {
            mark: TurnMark {
                turn: StreamId::new(3, 0),
                attempt: 1,
                seq: -1,
                start: true,
            },
            frame: "start".into(),
        });
        room.on_live(Live::Entries(vec![(StreamId::new(10, 0), end)]));
        drop(hold);
        assert_eq!(sent(&mut rx), [Some(StreamId::new(10, 0))]);
    }
}
