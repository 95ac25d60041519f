//! The one way out: what a member of a room receives, in stream order, exactly once.
//!
//! Every egress (the WebSocket writer, Server-Sent Events, the dialect adapters to come) reads
//! through a [`Cursor`]:
//!
//! 1. **gap check** (a resume only): a `resume_gap` notice first when the stream cannot give
//!    everything after the client's `last_id` (trimmed by retention, or lost by Redis);
//! 2. **replay**: history after the start id, in pages of [`REPLAY_PAGE`] (`XRANGE`);
//! 3. **catch-up**: an `llm.start` for every LLM turn in progress, with the reply so far as
//!    Redis holds it — after the history the turn answers, before the live deltas that
//!    continue it;
//! 4. **live**: the member's queue, filled by the room since the cursor joined (so nothing
//!    between replay and live is lost), skipping ids already sent, and LLM frames a member
//!    already has: per turn, an `llm.start` only when it moves the text forward (a new attempt,
//!    or further than what was sent) and a delta only when it is the next one. The deltas
//!    included in a turn's state were published together with that state, so after the
//!    catch-up the next delta a member gets is always the one after its text: no gap, no
//!    duplicate.
//!
//! The member queue is bounded; when it is full the room drops the member and the cursor ends
//! with [`CursorEnd::Slow`]: the client resumes with `last_id`, because the stream, not the
//! relay's memory, is the buffer. Dropping the cursor leaves the room.
//!
//! [`Cursor::next`] is cancel-safe, so writers can `select!` on it: a Redis read in progress
//! is kept in the cursor and resumed by the next call, never thrown away and sent again (a
//! client sending fast while it resumes would otherwise restart the page read at every ack).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::{queue, ConnId, Outbound, Room, Rooms};
use crate::protocol::{delivery_frame, ended_turn, llm_start_frame, resume_gap_frame, StreamId};
use crate::store::{Entry, PresenceChange, Store, StoreError, StreamInfo, TurnMark, TurnState};

/// History page size for a replay: one `XRANGE` each.
const REPLAY_PAGE: u64 = 500;

/// A Redis read that outlives one `next()` call.
type Read<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Catch-up frames to send between the replay and the live feed, computed when first needed.
type Prelude = Read<Vec<Outbound>>;

/// Turns whose position a cursor remembers; the oldest are forgotten beyond this (their final
/// entries long delivered).
const TURNS_TRACKED: usize = 64;

/// Why a cursor stops.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CursorEnd {
    /// The room dropped this member: its queue was full.
    #[error("the member fell too far behind the room")]
    Slow,
    /// The session was deleted.
    #[error("the session was deleted")]
    Deleted,
    /// The history (or the stream's state for the gap check) could not be read.
    #[error("cannot read the room's history")]
    Store(#[source] StoreError),
}

/// One member's view of a room: replay, then live. See the module docs.
pub(crate) struct Cursor {
    store: Store,
    member: Member,
    rx: queue::Receiver,
    /// Newest stored entry sent; anything at or below it is a duplicate.
    last_sent: StreamId,
    /// A resume's gap check, still to do: the `resume_gap` notice, if one is due.
    gap_check: Option<Read<Option<Gap>>>,
    /// More history may follow `last_sent`.
    replaying: bool,
    /// The history page being read.
    fetch: Option<Read<Vec<Entry>>>,
    /// The current history page, not yet sent.
    page: VecDeque<Entry>,
    /// The catch-up still to read (it runs once, after the replay).
    prelude: Option<Prelude>,
    /// Catch-up frames not yet sent.
    caught_up: VecDeque<Outbound>,
    /// Per LLM turn, how far this member has it.
    turns: TurnPositions,
}

/// Membership of one room; leaving happens on drop, however the cursor's owner ends.
struct Member {
    rooms: Rooms,
    room: Arc<Room>,
    conn: ConnId,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.rooms.leave(&self.room, self.conn);
    }
}

impl Cursor {
    /// Joins room `sid` as member `conn`: from now on the room queues live frames for it (at
    /// most `capacity`). Without [`Cursor::replay_after`] or [`Cursor::resume_after`] it is
    /// live-only.
    pub(crate) async fn join(
        rooms: &Rooms,
        store: &Store,
        sid: &str,
        conn: ConnId,
        capacity: usize,
    ) -> Result<Cursor, StoreError> {
        let (tx, rx) = queue::channel(capacity);
        let room = rooms.join(sid, conn, tx).await?;
        let prelude = catch_up(store.clone(), sid.to_owned());
        Ok(Cursor {
            store: store.clone(),
            member: Member {
                rooms: rooms.clone(),
                room,
                conn,
            },
            rx,
            last_sent: StreamId::ZERO,
            gap_check: None,
            replaying: false,
            fetch: None,
            page: VecDeque::new(),
            prelude: Some(prelude),
            caught_up: VecDeque::new(),
            turns: TurnPositions::default(),
        })
    }

    /// Replays the history after `id`, then goes live. For a fresh client `id` is where it
    /// starts: just before its own join entry, or the stream's end.
    pub(crate) fn replay_after(mut self, id: StreamId) -> Self {
        self.last_sent = id;
        self.replaying = true;
        self
    }

    /// Resumes a client that has everything up to `last`: a `resume_gap` notice first when the
    /// stream cannot give all that followed, then the replay, then live.
    pub(crate) fn resume_after(mut self, last: StreamId) -> Self {
        let (store, sid) = (self.store.clone(), self.sid().to_owned());
        self.gap_check = Some(Box::pin(
            async move { gap_notice(&store, &sid, last).await },
        ));
        self.replay_after(last)
    }

    pub(crate) fn sid(&self) -> &str {
        self.member.room.sid()
    }

    /// The next frame for this member.
    pub(crate) async fn next(&mut self) -> Result<Outbound, CursorEnd> {
        loop {
            if let Some(out) = self.next_buffered() {
                return Ok(out);
            }
            // Each read is cleared once it completes, before its error is returned: a finished
            // future must not be polled again.
            if let Some(check) = self.gap_check.as_mut() {
                let notice = check.await;
                self.gap_check = None;
                if let Some(gap) = notice.map_err(CursorEnd::Store)? {
                    if let Some(end) = gap.restart_after {
                        self.last_sent = end;
                    }
                    return Ok(Outbound {
                        id: None,
                        turn: None,
                        frame: gap.frame.into(),
                    });
                }
                continue;
            }
            if self.replaying {
                let (store, after) = (&self.store, self.last_sent);
                let sid = self.member.room.sid();
                let fetch = self.fetch.get_or_insert_with(|| {
                    let (store, sid) = (store.clone(), sid.to_owned());
                    Box::pin(async move {
                        store
                            .range_after(&sid, Some(after), None, REPLAY_PAGE)
                            .await
                    })
                });
                let page = fetch.await;
                self.fetch = None;
                let page = page.map_err(CursorEnd::Store)?;
                self.replaying = page.len() as u64 == REPLAY_PAGE;
                // The page's own buffer (`next_buffered` drained the previous one).
                self.page = page.into();
                continue;
            }
            if let Some(prelude) = self.prelude.as_mut() {
                let frames = prelude.await;
                self.prelude = None;
                self.caught_up = frames.map_err(CursorEnd::Store)?.into();
                continue;
            }
            match self.rx.recv().await {
                Some(out) => {
                    if let Some(out) = self.unsent(out) {
                        return Ok(out);
                    }
                }
                None if self.member.room.is_deleted() => return Err(CursorEnd::Deleted),
                None => {
                    tracing::warn!(room = %self.sid(), "disconnecting slow client");
                    return Err(CursorEnd::Slow);
                }
            }
        }
    }

    /// The next frame if one is ready without I/O, so a writer can batch a burst into one flush.
    /// `None` says nothing is ready now (or the cursor ended: [`Cursor::next`] says why).
    pub(crate) fn try_next(&mut self) -> Option<Outbound> {
        if let Some(out) = self.next_buffered() {
            return Some(out);
        }
        if self.gap_check.is_some() || self.replaying || self.prelude.is_some() {
            return None;
        }
        while let Some(out) = self.rx.try_recv() {
            if let Some(out) = self.unsent(out) {
                return Some(out);
            }
        }
        None
    }

    /// A frame from the current history page or the prelude.
    fn next_buffered(&mut self) -> Option<Outbound> {
        while let Some(e) = self.page.pop_front() {
            let out = Outbound {
                id: Some(e.id),
                turn: None,
                frame: delivery_frame(e.id, &e.participant, &e.event, &e.body).into(),
            };
            if let Some(out) = self.unsent(out) {
                return Some(out);
            }
        }
        while let Some(out) = self.caught_up.pop_front() {
            if let Some(out) = self.unsent(out) {
                return Some(out);
            }
        }
        // Both drained: free them, or a member idle after its replay keeps the page's buffer.
        if self.page.capacity() > 0 {
            self.page = VecDeque::new();
        }
        if self.caught_up.capacity() > 0 {
            self.caught_up = VecDeque::new();
        }
        None
    }

    /// `out` unless the member already has it (a stored entry already sent, an LLM frame that
    /// does not move its turn forward); advances the cursor.
    fn unsent(&mut self, out: Outbound) -> Option<Outbound> {
        if let Some(id) = out.id {
            if id <= self.last_sent {
                return None;
            }
            self.last_sent = id;
            self.turns.on_stored(&out.frame);
        }
        if let Some(mark) = out.turn {
            if !self.turns.moves(mark) {
                return None;
            }
        }
        Some(out)
    }
}

/// Per LLM turn, the attempt and the seq of the last frame a member was sent.
///
/// A turn it follows whose stored end (`llm.response`, `llm.error`) was sent takes no more live
/// frames: clients drop a turn's state at its end, so a late delta would begin a reply from
/// nowhere. Late frames can come: a worker whose lease lapsed while Redis was away may still
/// stream an attempt another worker has finished, and a recovery's fresh `llm.start` may be
/// read just before the turn's end was stored. (A cluster fault run once showed every member
/// of a room deltas of a turn with no start, right after a takeover and a Redis restart.)
#[derive(Debug, Default)]
struct TurnPositions(BTreeMap<StreamId, (u32, i64)>);

/// The position of an ended turn: no attempt or seq moves past it.
const ENDED: (u32, i64) = (u32::MAX, i64::MAX);

impl TurnPositions {
    /// Whether a live frame of a turn moves it forward for this member (then it is sent).
    fn moves(&mut self, mark: TurnMark) -> bool {
        let known = self.0.get(&mark.turn).copied();
        let forward = match (mark.start, known) {
            (true, None) => true,
            (true, Some((attempt, seq))) => {
                mark.attempt > attempt || (mark.attempt == attempt && mark.seq > seq)
            }
            // A delta of a turn this member never saw start: the turn ended before the
            // catch-up read it (its final entry follows) — nothing to continue.
            (false, None) => false,
            (false, Some((attempt, seq))) => {
                mark.attempt == attempt && seq.checked_add(1) == Some(mark.seq)
            }
        };
        if forward {
            self.set(mark.turn, (mark.attempt, mark.seq));
        }
        forward
    }

    /// A stored entry was sent: if it is the end of a turn this member follows, the turn is
    /// over. Most members follow no turn, and then no frame is looked at (this runs for every
    /// delivery).
    fn on_stored(&mut self, frame: &str) {
        if self.0.is_empty() {
            return;
        }
        if let Some(turn) = ended_turn(frame) {
            self.end(turn);
        }
    }

    /// The turn's stored end was sent. Only a turn this member follows is marked: marking
    /// every end would let turns that never streamed here (instant errors, say) push a turn
    /// still streaming out of the bounded map.
    fn end(&mut self, turn: StreamId) {
        if let Some(position) = self.0.get_mut(&turn) {
            *position = ENDED;
        }
    }

    fn set(&mut self, turn: StreamId, position: (u32, i64)) {
        self.0.insert(turn, position);
        if self.0.len() > TURNS_TRACKED {
            self.0.pop_first();
        }
    }
}

/// An `llm.start` for every turn in progress in the room, with its text so far, and who is in
/// the room now (a `presence` frame).
fn catch_up(store: Store, sid: String) -> Prelude {
    Box::pin(async move {
        let turns = store.active_turns(&sid).await?;
        let mut frames: Vec<Outbound> = turns.iter().map(|t| turn_start(&sid, t)).collect();
        let present = store
            .presence(&sid, PresenceChange::Read, super::presence::PRESENCE_TTL)
            .await?;
        let frame = super::presence::presence_frame(&sid, &super::presence::summary(&present));
        frames.push(Outbound {
            id: None,
            turn: None,
            frame: frame.into(),
        });
        Ok(frames)
    })
}

/// The `llm.start` that brings a member to where a turn is.
pub(crate) fn turn_start(sid: &str, t: &TurnState) -> Outbound {
    let frame = llm_start_frame(sid, t.turn, &t.model, t.attempt, t.seq, &t.text);
    Outbound {
        id: None,
        turn: Some(TurnMark {
            turn: t.turn,
            attempt: t.attempt,
            seq: t.seq,
            start: true,
        }),
        frame: frame.into(),
    }
}

/// A `resume_gap` notice, and where the cursor goes on from.
struct Gap {
    frame: String,
    /// For a client ahead of the stream (Redis lost recent entries, or the id was never
    /// issued): the stream's newest id, so what is stored next reaches the client even when its
    /// id sorts below the client's `last_id`.
    restart_after: Option<StreamId>,
}

/// The `resume_gap` notice for a client resuming after `last`, if one is due.
async fn gap_notice(store: &Store, sid: &str, last: StreamId) -> Result<Option<Gap>, StoreError> {
    let info = store.info(sid).await?;
    let seen = last == StreamId::ZERO
        || store
            .range_after(sid, Some(last.prev()), Some(last), 1)
            .await?
            .first()
            .is_some_and(|e| e.id == last);
    let Some(frame) = resume_gap(sid, last, seen, info.as_ref()) else {
        return Ok(None);
    };
    tracing::info!(room = %sid, last_id = %last, "resume gap");
    let newest = info.map_or(StreamId::ZERO, |i| i.last_generated_id);
    Ok(Some(Gap {
        frame,
        restart_after: (last > newest).then_some(newest),
    }))
}

/// The `resume_gap` notice for a client resuming after `last`, if the stream cannot give it
/// everything after that id: entries after it were trimmed (retention), or the stream is behind
/// it (Redis lost data). Never a silent gap.
///
/// `seen` says whether the entry `last` itself is still in the stream: when it is gone without
/// having been trimmed, the store lost data the client had.
fn resume_gap(sid: &str, last: StreamId, seen: bool, info: Option<&StreamInfo>) -> Option<String> {
    let Some(info) = info else {
        return (last > StreamId::ZERO).then(|| {
            resume_gap_frame(
                sid,
                last,
                "lost",
                "the room's history is gone (the store lost it); showing what comes next",
                None,
            )
        });
    };
    let some_removed = info.entries_added.is_some_and(|added| added > info.length);
    let (reason, message) = if last > info.last_generated_id {
        ("ahead", "the store is behind the last message you saw (it lost recent data); showing what comes next")
    } else if seen || (last == StreamId::ZERO && !some_removed) {
        return None;
    } else if some_removed
        && (last == StreamId::ZERO || info.first_id.is_some_and(|first| last < first))
    {
        (
            "trimmed",
            "older messages after your last one were trimmed; showing what is left",
        )
    } else {
        (
            "lost",
            "the store lost messages you had seen (it restarted without them); showing what is left",
        )
    };
    Some(resume_gap_frame(sid, last, reason, message, info.first_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn info(length: u64, added: u64, first: u64, last_generated: u64) -> StreamInfo {
        StreamInfo {
            length,
            first_id: Some(StreamId::new(first, 0)),
            last_id: Some(StreamId::new(last_generated, 0)),
            last_generated_id: StreamId::new(last_generated, 0),
            entries_added: Some(added),
        }
    }

    fn reason(notice: Option<String>) -> Option<String> {
        notice.map(|n| {
            let v: Value = serde_json::from_str(&n).unwrap();
            assert_eq!(v["hd"]["event"], "resume_gap");
            v["bd"]["reason"].as_str().unwrap().to_owned()
        })
    }

    fn mark(turn: u64, attempt: u32, seq: i64, start: bool) -> TurnMark {
        TurnMark {
            turn: StreamId::new(turn, 0),
            attempt,
            seq,
            start,
        }
    }

    #[test]
    fn an_ended_turn_takes_no_more_live_frames() {
        let mut turns = TurnPositions::default();
        assert!(turns.moves(mark(7, 1, -1, true)));
        assert!(turns.moves(mark(7, 1, 0, false)));
        assert!(!turns.moves(mark(7, 1, 0, false)), "a duplicate");
        assert!(!turns.moves(mark(7, 1, 2, false)), "a gap");
        assert!(!turns.moves(mark(8, 1, 0, false)), "never started here");
        let end = delivery_frame(
            StreamId::new(9, 0),
            "llm",
            "llm.response",
            r#"{"hd":{"event":"llm.response","role":"llm","sid":"r","ts":9,"turn_id":"7-0"},"bd":{"text":"x"}}"#,
        );
        turns.on_stored(&end);
        assert!(!turns.moves(mark(7, 1, 1, false)), "the next delta, late");
        assert!(!turns.moves(mark(7, 2, -1, true)), "a new attempt, late");
        assert!(turns.moves(mark(8, 1, -1, true)), "other turns go on");
        // Ends of turns that never streamed here take no room from those that do.
        for t in 100..100 + 2 * TURNS_TRACKED as u64 {
            turns.end(StreamId::new(t, 0));
        }
        assert!(
            turns.moves(mark(8, 1, 0, false)),
            "turn 8 is still followed"
        );
    }

    #[test]
    fn gaps_are_named() {
        let id = |ms| StreamId::new(ms, 0);
        let whole = info(10, 10, 1, 10);
        assert_eq!(reason(resume_gap("r", id(5), true, Some(&whole))), None);
        assert_eq!(
            reason(resume_gap("r", StreamId::ZERO, true, Some(&whole))),
            None
        );
        let trimmed = info(5, 10, 6, 10);
        assert_eq!(
            reason(resume_gap("r", id(2), false, Some(&trimmed))).as_deref(),
            Some("trimmed")
        );
        // `last_id=0` asks for whatever history there is: the caller passes `seen`, no notice.
        assert_eq!(
            reason(resume_gap("r", StreamId::ZERO, true, Some(&trimmed))),
            None
        );
        assert_eq!(
            reason(resume_gap("r", id(7), false, Some(&whole))).as_deref(),
            Some("lost")
        );
        assert_eq!(
            reason(resume_gap("r", id(11), false, Some(&whole))).as_deref(),
            Some("ahead")
        );
        assert_eq!(
            reason(resume_gap("r", id(3), false, None)).as_deref(),
            Some("lost")
        );
        assert_eq!(reason(resume_gap("r", StreamId::ZERO, true, None)), None);
    }
}
