//! Reading one LLM turn, from its request on, as a member of its room: what an adapter that
//! shows a single reply needs (the REST chat API, the dialect sockets), whether it just stored
//! the request or comes back to a turn it asked for earlier (a resent request, on any node).
//!
//! A [`Cursor`] joins the room and replays after the request — or from the turn's reply when
//! the turn is over (its done-marker says where) — then goes live, with the catch-up `llm.start`
//! of a turn in progress in between; a [`TurnFollow`] turns what it reads into append-only text.
//! Joining after the request was stored misses nothing: the replay has every stored entry after
//! it, the catch-up the text streamed so far, the member queue every frame since the join.

use std::collections::VecDeque;

use super::{ConnId, Cursor, CursorEnd, Rooms, TurnFollow, TurnStep};
use crate::protocol::StreamId;
use crate::store::Store;

/// One turn followed to its end. Dropping it leaves the room.
pub(crate) struct TurnReader {
    cursor: Cursor,
    follow: TurnFollow,
    steps: VecDeque<TurnStep>,
    /// The turn's `Done` or `Failed` was returned: nothing follows.
    ended: bool,
}

impl TurnReader {
    /// Joins room `sid` as member `conn` (a queue of `queue` frames) to follow `turn`, the id of
    /// the request it answers. [`CursorEnd::Deleted`] when the session does not exist (any more).
    pub(crate) async fn join(
        rooms: &Rooms,
        store: &Store,
        sid: &str,
        conn: ConnId,
        queue: usize,
        turn: StreamId,
    ) -> Result<TurnReader, CursorEnd> {
        let cursor = Cursor::join(rooms, store, sid, conn, queue)
            .await
            .map_err(CursorEnd::Store)?;
        // Checked once a member: a delete from now on ends the cursor, and one before it left
        // no session (a room joined after its delete would wait for ever).
        let (exists, reply) =
            tokio::try_join!(store.session_exists(sid), store.turn_reply(sid, turn))
                .map_err(CursorEnd::Store)?;
        if !exists {
            return Err(CursorEnd::Deleted);
        }
        let from = reply.map_or(turn, StreamId::prev);
        Ok(TurnReader {
            cursor: cursor.replay_after(from),
            follow: TurnFollow::new(turn),
            steps: VecDeque::new(),
            ended: false,
        })
    }

    /// The next step of the turn; `None` once its `Done` or `Failed` was returned. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Option<TurnStep>, CursorEnd> {
        loop {
            if let Some(step) = self.steps.pop_front() {
                if matches!(step, TurnStep::Done(_) | TurnStep::Failed(_)) {
                    self.ended = true;
                    self.steps.clear();
                }
                return Ok(Some(step));
            }
            if self.ended {
                return Ok(None);
            }
            let out = self.cursor.next().await?;
            self.steps.extend(self.follow.on(&out));
        }
    }
}
