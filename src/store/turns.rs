//! An LLM turn in Redis: its lease, its live state while it runs (so any member can catch up
//! mid-reply, on any node, after any crash), the atomic finish with its usage callback, cancel
//! signals and the per-room turn rate.
//!
//! Turn keys carry the room key as a hash tag (`chat:llm:turn:{chat:session:<sid>}:<turn>`), so
//! a script may touch the room and its turn keys together even on Redis Cluster.

use std::time::Duration;

use fred::interfaces::{HashesInterface, KeysInterface, PubsubInterface};
use fred::types::Value;

use super::feed::encode_turn_frame;
use super::{value_str, Store, StoreError, TurnMark};
use crate::protocol::StreamId;

/// The state of a turn's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnLock {
    Acquired,
    /// Another worker holds a live lease.
    Busy,
    /// The turn already has its final entry.
    Done(Option<StreamId>),
    /// The session was deleted: nothing was written.
    Gone,
}

/// The value a worker's lease puts in a turn key: `<consumer>/<turn>` (until the finish script
/// replaces it with `done:<reply id>`).
pub(crate) fn lease_token(consumer: &str, turn: StreamId) -> String {
    format!("{consumer}/{turn}")
}

/// Who holds a turn's lease, read from the turn key's value: the consumer and the turn; `None`
/// for a done-marker or anything else. The fault run uses it to kill a worker mid-turn.
pub fn lease_holder(value: &str) -> Option<(&str, StreamId)> {
    if value.starts_with("done:") {
        return None;
    }
    let (consumer, turn) = value.rsplit_once('/')?;
    Some((consumer, turn.parse().ok()?))
}

/// What [`Store::turn_progress`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Published,
    /// Another attempt owns the turn's state (this worker lost the turn): nothing published.
    Lost,
    /// The session was deleted: nothing published.
    Deleted,
}

/// What [`Store::finish_turn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Stored as this entry; the turn is the room's `ordinal`-th.
    Stored { id: StreamId, ordinal: u64 },
    /// Another worker finished first; nothing was written.
    AlreadyDone(StreamId),
    /// The session was deleted (perhaps created again since): nothing was written.
    Gone,
}

/// A turn in progress as Redis holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnState {
    pub turn: StreamId,
    pub attempt: u32,
    /// The seq of the last delta `text` includes; -1 before the first.
    pub seq: i64,
    pub text: String,
    /// The role that asked.
    pub requester: String,
    /// The token subject that asked, when authenticated.
    pub sub: Option<String>,
    pub started_ms: u64,
    pub model: String,
    /// Estimated prompt tokens of this attempt.
    pub prompt_tokens: u64,
    /// Tokens spent by earlier attempts that died (completion: chunks they streamed).
    pub carried_completion: u64,
    pub carried_prompt: u64,
}

/// The start of an attempt, as [`Store::begin_turn`] records it.
#[derive(Debug, Clone)]
pub struct TurnBegin<'a> {
    pub attempt: u32,
    pub requester: &'a str,
    pub sub: Option<&'a str>,
    pub started_ms: u64,
    pub model: &'a str,
    pub prompt_tokens: u64,
    pub carried_completion: u64,
    pub carried_prompt: u64,
    /// The `llm.start` frame announcing the attempt.
    pub frame: &'a str,
}

/// The next deltas of an attempt, as [`Store::turn_progress`] publishes them.
#[derive(Debug, Clone, Copy)]
pub struct TurnProgress<'a> {
    pub attempt: u32,
    /// The seq of the last delta in `frames`.
    pub seq: i64,
    /// The text so far, these deltas included.
    pub text: &'a str,
    /// The `llm.delta` frames with their seqs, in order.
    pub frames: &'a [(i64, String)],
}

/// The final entry of a turn, as [`Store::finish_turn`] stores it.
#[derive(Debug, Clone)]
pub struct TurnEnd<'a> {
    pub participant: &'a str,
    pub event: &'a str,
    pub body: &'a str,
    /// The usage callback body (a JSON object; the script adds `"turn"`), if tokens were spent.
    pub usage_callback: Option<&'a str>,
}

/// How long the done-marker of a turn is kept: longer than any redelivery can take.
const DONE_TTL_SECS: u64 = 24 * 3600;
/// How long a turn's live state lives without a refresh (the lease renewals and every batch of
/// deltas refresh it): past any Redis restart, and until another worker takes a dead worker's
/// turn over, which reads what the dead attempt spent.
pub(crate) fn turn_state_ttl(lease: Duration) -> Duration {
    (lease * 4).max(Duration::from_secs(600))
}

/// How long a finished turn's live state stays readable (a member catching up at that moment
/// reads it, then finds the final entry in the stream).
const STATE_LINGER_MS: u64 = 10_000;

impl Store {
    /// Takes or renews the lease on a turn.
    pub async fn turn_lock(
        &self,
        sid: &str,
        turn: StreamId,
        token: &str,
        lease: Duration,
    ) -> Result<TurnLock, StoreError> {
        let keys = vec![
            self.inner.keys.turn(sid, turn),
            self.inner.keys.turn_state(sid, turn),
            self.inner.keys.room(sid),
        ];
        let ttl = (turn_state_ttl(lease).as_millis() as u64).to_string();
        let lease = (lease.as_millis() as u64).to_string();
        let turn = turn.to_string();
        let args = vec![
            token,
            lease.as_str(),
            ttl.as_str(),
            self.inner.llm_group.as_str(),
            turn.as_str(),
        ];
        let reply: Value = self
            .eval_script(&self.inner.scripts.turn_lock, keys, args)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(StoreError::Reply("turn lock reply is not an array"));
        };
        match parts.first().and_then(value_str).as_deref() {
            Some("acquired") => Ok(TurnLock::Acquired),
            Some("busy") => Ok(TurnLock::Busy),
            Some("gone") => Ok(TurnLock::Gone),
            Some("done") => Ok(TurnLock::Done(
                parts
                    .get(1)
                    .and_then(value_str)
                    .and_then(|s| s.parse().ok()),
            )),
            _ => Err(StoreError::Reply("turn lock reply unknown")),
        }
    }

    /// Numbers a new attempt at `turn`: one above every attempt started before, even when their
    /// live state is gone. Call it holding the turn's lease. `None`: the session was deleted.
    pub async fn next_attempt(&self, sid: &str, turn: StreamId) -> Result<Option<u32>, StoreError> {
        let keys = vec![
            self.inner.keys.room(sid),
            self.inner.keys.turn_attempts(sid),
        ];
        let reply: Value = self
            .eval_script(
                &self.inner.scripts.turn_attempt,
                keys,
                vec![turn.to_string(), self.inner.llm_group.clone()],
            )
            .await?;
        Ok(match reply.as_i64() {
            Some(0) | None => None,
            Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        })
    }

    /// Records the start of an attempt and publishes its `llm.start`, atomically.
    pub async fn begin_turn(
        &self,
        sid: &str,
        turn: StreamId,
        begin: &TurnBegin<'_>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let keys = vec![
            self.inner.keys.room(sid),
            self.inner.keys.turn_state(sid, turn),
            self.inner.keys.active_turns(sid),
        ];
        let mark = TurnMark {
            turn,
            attempt: begin.attempt,
            seq: -1,
            start: true,
        };
        let args: Vec<String> = vec![
            begin.attempt.to_string(),
            begin.requester.to_owned(),
            begin.sub.unwrap_or("").to_owned(),
            begin.started_ms.to_string(),
            begin.model.to_owned(),
            begin.prompt_tokens.to_string(),
            begin.carried_completion.to_string(),
            begin.carried_prompt.to_string(),
            (ttl.as_millis() as u64).to_string(),
            turn.to_string(),
            encode_turn_frame(mark, begin.frame),
        ];
        let _: Value = self
            .eval_script(&self.inner.scripts.turn_begin, keys, args)
            .await?;
        Ok(())
    }

    /// Publishes the deltas of `progress` and records its text as the text so far, atomically.
    /// `Ok(false)`: the turn belongs to another attempt now; nothing was published.
    pub async fn turn_progress(
        &self,
        sid: &str,
        turn: StreamId,
        progress: &TurnProgress<'_>,
        ttl: Duration,
    ) -> Result<Progress, StoreError> {
        let TurnProgress {
            attempt,
            seq,
            text,
            frames,
        } = *progress;
        let keys = vec![
            self.inner.keys.room(sid),
            self.inner.keys.turn_state(sid, turn),
        ];
        let mut args: Vec<String> = vec![
            attempt.to_string(),
            seq.to_string(),
            text.to_owned(),
            (ttl.as_millis() as u64).to_string(),
            self.inner.llm_group.clone(),
            turn.to_string(),
        ];
        args.extend(frames.iter().map(|(seq, frame)| {
            let mark = TurnMark {
                turn,
                attempt,
                seq: *seq,
                start: false,
            };
            encode_turn_frame(mark, frame)
        }));
        let reply: Value = self
            .eval_script(&self.inner.scripts.turn_progress, keys, args)
            .await?;
        Ok(match reply {
            Value::Integer(1) => Progress::Published,
            Value::Integer(-1) => Progress::Deleted,
            _ => Progress::Lost,
        })
    }

    /// The room's turns in progress, oldest first.
    pub async fn active_turns(&self, sid: &str) -> Result<Vec<TurnState>, StoreError> {
        let prefix = self.inner.keys.turn_state(sid, StreamId::ZERO);
        let prefix = prefix.trim_end_matches(&StreamId::ZERO.to_string());
        let reply: Value = self
            .eval_script(
                &self.inner.scripts.active_turns,
                self.inner.keys.active_turns(sid),
                vec![prefix],
            )
            .await?;
        let Value::Array(items) = reply else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut it = items.into_iter();
        while let (Some(turn), Some(fields)) = (it.next(), it.next()) {
            let Some(turn) = value_str(&turn).and_then(|t| t.parse().ok()) else {
                continue;
            };
            out.push(turn_state(turn, fields));
        }
        Ok(out)
    }

    /// The live state of one turn, if it is in progress (or just ended).
    pub async fn turn_state(
        &self,
        sid: &str,
        turn: StreamId,
    ) -> Result<Option<TurnState>, StoreError> {
        let reply: Value = self
            .inner
            .client
            .hgetall(self.inner.keys.turn_state(sid, turn))
            .await?;
        let state = turn_state(turn, reply);
        Ok((state.attempt > 0).then_some(state))
    }

    /// Stores the turn's final entry, marks it done, acks the request, retires its live state
    /// and queues its usage callback, atomically.
    pub async fn finish_turn(
        &self,
        sid: &str,
        turn: StreamId,
        end: &TurnEnd<'_>,
    ) -> Result<Finished, StoreError> {
        let keys = vec![
            self.inner.keys.room(sid),
            self.inner.keys.turn(sid, turn),
            self.inner.keys.turn_state(sid, turn),
            self.inner.keys.active_turns(sid),
            self.inner.keys.turn_counter(sid),
            self.inner.keys.usage_outbox(sid),
            self.inner.keys.usage_records(sid),
            self.inner.keys.stats(sid),
            self.inner.keys.turn_attempts(sid),
            self.inner.keys.session_record(sid),
        ];
        if end.usage_callback.is_some() {
            // Before the script: the index lives on another shard under Redis Cluster, and a
            // room listed with nothing to send costs one empty read.
            self.note_usage_room(sid).await?;
        }
        let args: Vec<String> = vec![
            self.inner.retention.to_string(),
            end.participant.to_owned(),
            end.event.to_owned(),
            end.body.to_owned(),
            self.inner.llm_group.clone(),
            turn.to_string(),
            self.room_ttl(Duration::from_secs(DONE_TTL_SECS))
                .as_secs()
                .max(1)
                .to_string(),
            STATE_LINGER_MS.to_string(),
            crate::protocol::now_ms().to_string(),
            end.usage_callback.unwrap_or("").to_owned(),
            self.inner.max_age_ms.to_string(),
            self.inner.idle_ttl_ms.to_string(),
        ];
        let reply: Value = self
            .eval_script(&self.inner.scripts.finish, keys, args)
            .await?;
        let Value::Array(parts) = reply else {
            return Err(StoreError::Reply("finish reply is not an array"));
        };
        let id = parts
            .get(1)
            .and_then(value_str)
            .and_then(|s| s.parse().ok());
        match (parts.first().and_then(value_str).as_deref(), id) {
            (Some("stored"), Some(id)) => Ok(Finished::Stored {
                id,
                ordinal: parts.get(2).and_then(Value::as_u64).unwrap_or(0),
            }),
            (Some("done"), Some(id)) => Ok(Finished::AlreadyDone(id)),
            (Some("gone"), _) => Ok(Finished::Gone),
            _ => Err(StoreError::Reply("finish reply unknown")),
        }
    }

    /// Records a cancel for a turn and tells every worker at once.
    pub async fn signal_cancel(&self, sid: &str, turn: StreamId) -> Result<(), StoreError> {
        let _: Value = self
            .inner
            .client
            .set(
                self.inner.keys.cancel_flag(sid, turn),
                1,
                Some(fred::types::Expiration::EX(
                    self.room_ttl(Duration::from_secs(3600)).as_secs().max(1) as i64,
                )),
                None,
                false,
            )
            .await?;
        let _: Value = self
            .inner
            .client
            .publish(
                self.inner.keys.cancel_channel(),
                super::feed::encode_cancel(sid, turn),
            )
            .await?;
        Ok(())
    }

    pub async fn is_cancelled(&self, sid: &str, turn: StreamId) -> Result<bool, StoreError> {
        let n: i64 = self
            .inner
            .client
            .exists(self.inner.keys.cancel_flag(sid, turn))
            .await?;
        Ok(n > 0)
    }

    /// Counts one LLM turn in the room's current window and returns the count so far.
    pub async fn count_turn(&self, sid: &str, window: Duration) -> Result<u64, StoreError> {
        let secs = window.as_secs().max(1);
        let bucket = crate::protocol::now_ms() / 1000 / secs;
        let key = self.inner.keys.turn_rate(sid, bucket);
        let n: i64 = self.inner.client.incr(&key).await?;
        if n == 1 {
            let ttl = self
                .room_ttl(Duration::from_secs(2 * secs))
                .as_secs()
                .max(1);
            let _: Value = self.inner.client.expire(&key, ttl as i64, None).await?;
        }
        Ok(n.max(0) as u64)
    }
}

/// `HGETALL` of a turn's state → [`TurnState`]; missing fields stay at their defaults.
fn turn_state(turn: StreamId, fields: Value) -> TurnState {
    let mut state = TurnState {
        turn,
        seq: -1,
        ..TurnState::default()
    };
    let pairs: Vec<(String, String)> = match fields {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Some(k), Some(v)) = (value_str(&k), value_str(&v)) {
                    pairs.push((k, v));
                }
            }
            pairs
        }
        Value::Map(map) => map
            .inner()
            .into_iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), value_str(&v)?)))
            .collect(),
        _ => Vec::new(),
    };
    for (k, v) in pairs {
        match k.as_str() {
            "attempt" => state.attempt = v.parse().unwrap_or(0),
            "seq" => state.seq = v.parse().unwrap_or(-1),
            "text" => state.text = v,
            "requester" => state.requester = v,
            "sub" => state.sub = (!v.is_empty()).then_some(v),
            "started" => state.started_ms = v.parse().unwrap_or(0),
            "model" => state.model = v,
            "prompt" => state.prompt_tokens = v.parse().unwrap_or(0),
            "carried_completion" => state.carried_completion = v.parse().unwrap_or(0),
            "carried_prompt" => state.carried_prompt = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trip() {
        let turn = StreamId::new(1_700_000_000_000, 3);
        let token = lease_token("w1", turn);
        assert_eq!(lease_holder(&token), Some(("w1", turn)));
        assert_eq!(lease_holder("done:1700000000001-0"), None);
        assert_eq!(lease_holder("garbage"), None);
    }
}
