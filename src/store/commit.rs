//! Group commit: the appends that are ready for one room go to Redis as one `append.lua` call.
//!
//! Each room has at most one batch in flight per node. An append joins its room's queue; when no
//! batch is in flight it starts a committer task for the room, which takes everything queued (up
//! to [`MAX_BATCH_ENTRIES`] / [`MAX_BATCH_BYTES`]), stores it with one script call — one set of
//! checks, counters, expiries and one `SPUBLISH` for the batch — answers every append, and goes
//! on until the queue is empty. At low load a batch is the one append that started it, sent at
//! once: there is no timer and no added latency. Under load, whatever arrived during one round
//! trip forms the next batch, so the cost per entry falls as the load rises.
//!
//! Order: appends are queued when they are called (not when their future is first polled), and
//! a room's batches are stored one after the other, so a room's stream holds a node's appends in
//! the order they were called — a socket's frames in the order it sent them.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};

use fred::types::Value;
use tokio::sync::oneshot;

use super::{AppendReply, Appended, Keys, Store, StoreError, Target};

/// Most entries in one script call: a bound on how long Redis is busy with one room.
const MAX_BATCH_ENTRIES: usize = 64;
// `append.lua` numbers an entry's kind in one byte.
const _: () = assert!(MAX_BATCH_ENTRIES < 256);
/// Most body bytes in one script call (a batch always takes at least one entry).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// The rooms with a committer running, and what waits for it.
#[derive(Debug, Default)]
pub(super) struct Queues {
    rooms: Mutex<HashMap<String, VecDeque<Pending>>>,
}

impl Queues {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Pending>>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One append waiting for its batch.
#[derive(Debug)]
struct Pending {
    target: Target,
    participant: String,
    event: &'static str,
    body: String,
    /// The field naming (sender, cid) in the room's cid generations, when the append is
    /// idempotent (see `append.lua`).
    cid: Option<String>,
    reply: oneshot::Sender<Result<AppendReply, StoreError>>,
}

impl Store {
    /// Queues an append for its room's next batch, now; the future answers once the batch is
    /// stored. Dropping the future does not withdraw the append.
    pub(super) fn queue_append(
        &self,
        sid: &str,
        participant: &str,
        event: &'static str,
        body: &str,
        dedup: Option<(&str, &str)>,
        target: Target,
    ) -> impl Future<Output = Result<AppendReply, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            target,
            participant: participant.to_owned(),
            event,
            body: body.to_owned(),
            cid: dedup.map(|(sender, cid)| Keys::cid_field(sender, cid)),
            reply,
        };
        let start = {
            let mut rooms = self.inner.commits.lock();
            match rooms.get_mut(sid) {
                Some(queue) => {
                    queue.push_back(pending);
                    false
                }
                None => {
                    rooms.insert(sid.to_owned(), VecDeque::from([pending]));
                    true
                }
            }
        };
        if start {
            tokio::spawn(self.clone().commit_room(sid.to_owned()));
        }
        async move {
            answer
                .await
                .unwrap_or(Err(StoreError::Reply("the append was abandoned")))
        }
    }

    /// The committer of one room: batches until its queue is empty, then leaves the map (in the
    /// same critical section that finds it empty, so an append queued later starts a new one).
    async fn commit_room(self, sid: String) {
        loop {
            let batch = {
                let mut rooms = self.inner.commits.lock();
                match rooms.get_mut(&sid) {
                    Some(queue) if !queue.is_empty() => take_batch(queue),
                    _ => {
                        rooms.remove(&sid);
                        return;
                    }
                }
            };
            self.commit(&sid, batch).await;
        }
    }

    /// Stores one batch and answers each of its appends.
    async fn commit(&self, sid: &str, mut batch: Vec<Pending>) {
        let started = std::time::Instant::now();
        let outcome = self.run_batch(sid, &mut batch).await;
        metrics::histogram!(crate::metrics::APPEND_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::APPEND_BATCH_ENTRIES).record(batch.len() as f64);
        let replies: Vec<Result<AppendReply, StoreError>> = match outcome {
            Ok((woke, replies)) => {
                let created = replies
                    .iter()
                    .any(|r| matches!(r, AppendReply::Stored(a) if a.created));
                if created || woke {
                    // Outside the script: the registry lives on another shard under Redis
                    // Cluster. A crash right here only delays discovery until a worker's next
                    // start-up scan (or the room's next wake-up).
                    if let Err(err) = self.announce_room(sid).await {
                        tracing::warn!(room = %sid, cause = %err, "could not announce the room");
                    }
                }
                replies.into_iter().map(Ok).collect()
            }
            Err(err) => batch.iter().map(|_| Err(err.clone())).collect(),
        };
        // Counted per run of one event, not per entry: a labelled counter is a registry lookup.
        let mut stored: Option<(&'static str, u64)> = None;
        for (pending, reply) in batch.into_iter().zip(replies) {
            if let Ok(AppendReply::Stored(Appended {
                duplicate: false, ..
            })) = reply
            {
                stored = match stored {
                    Some((event, n)) if event == pending.event => Some((event, n + 1)),
                    other => {
                        count_stored(other);
                        Some((pending.event, 1))
                    }
                };
            }
            // The caller may have gone (its connection closed): the entry is stored regardless.
            let _ = pending.reply.send(reply);
        }
        count_stored(stored);
    }

    /// One `append.lua` call: whether the room woke, and each entry's reply, in order. The
    /// entries' strings move into the command (no copy); they are not needed once sent.
    async fn run_batch(
        &self,
        sid: &str,
        batch: &mut [Pending],
    ) -> Result<(bool, Vec<AppendReply>), StoreError> {
        let keys = &self.inner.keys;
        let [cids_even, cids_odd] = keys.cid_generations(sid);
        let script_keys = vec![
            keys.room(sid),
            keys.stats(sid),
            keys.session_record(sid),
            keys.awake(sid),
            keys.turn_counter(sid),
            keys.turn_attempts(sid),
            keys.active_turns(sid),
            cids_even,
            cids_odd,
        ];
        let window = self
            .room_ttl(std::time::Duration::from_secs(self.inner.dedup_window_secs))
            .as_secs()
            .max(1);
        // One target for the whole batch (`take_batch` never mixes them).
        let (which, metadata) = match batch.first().map(|p| &p.target) {
            Some(Target::Existing) => ("existing", ""),
            Some(Target::New { metadata }) => ("new", metadata.as_str()),
            Some(Target::Any) | None => ("any", ""),
        };
        // The head, 2 per entry, 2 per kind (most batches have one).
        let mut args: Vec<Value> = Vec::with_capacity(10 + 2 * batch.len() + 2);
        args.extend([
            int(self.inner.retention),
            Value::from(self.inner.llm_group.as_str()),
            int(window),
            int(self.inner.max_age_ms),
            int(self.inner.idle_ttl_ms),
            int(self.room_ttl(self.inner.wake_after).as_millis() as u64),
            Value::from_static_str(which),
            Value::from(metadata),
            Value::from_static_str(""), // the hold's token, below
            Value::from_static_str(""), // the entries' kinds, below
        ]);
        // When this node's feed follows the room, it keeps the bodies and the script may
        // publish the ids alone (see held.rs): one copy here saves Redis hashing them again.
        let follows = self.inner.held.follows(sid);
        let mut bodies = Vec::with_capacity(if follows { batch.len() } else { 0 });
        // Each distinct (participant, event) once; per entry its number, from 1, in a byte.
        let mut kinds: Vec<(String, &'static str)> = Vec::new();
        let mut kind_of = Vec::with_capacity(batch.len());
        for p in batch.iter_mut() {
            let kind = match kinds
                .iter()
                .position(|(participant, event)| *participant == p.participant && *event == p.event)
            {
                Some(k) => k,
                None => {
                    kinds.push((std::mem::take(&mut p.participant), p.event));
                    kinds.len() - 1
                }
            };
            kind_of.push(u8::try_from(kind + 1).unwrap_or(u8::MAX));
            let body = std::mem::take(&mut p.body);
            let body = if follows {
                let arg = Value::from(body.as_str());
                bodies.push(body);
                arg
            } else {
                Value::Bytes(body.into())
            };
            args.extend([
                body,
                p.cid
                    .take()
                    .map_or(Value::from_static_str(""), |cid| Value::Bytes(cid.into())),
            ]);
        }
        args[9] = Value::Bytes(kind_of.into());
        for (participant, event) in kinds {
            args.extend([
                Value::Bytes(participant.into()),
                Value::from_static_str(event),
            ]);
        }
        let hold = follows.then(|| self.inner.held.hold(bodies));
        if let Some((_, token)) = &hold {
            args[8] = Value::from(token.as_str());
        }
        let reply = self
            .eval_script(&self.inner.scripts.append, script_keys, args)
            .await
            .and_then(|reply| parse_batch_reply(reply, batch.len()));
        if let Some((n, _)) = hold {
            // Published as `-i` (the feed takes the bodies), or not: then nobody will. On an
            // error the script may have published; the feed then finds no hold and reads the
            // stream.
            if !matches!(reply, Ok((_, true, _))) {
                self.inner.held.release(n);
            }
        }
        reply.map(|(woke, _, replies)| (woke, replies))
    }
}

fn count_stored(run: Option<(&'static str, u64)>) {
    if let Some((event, n)) = run {
        metrics::counter!(crate::metrics::STORED, "event" => event).increment(n);
    }
}

/// A number as a script argument (Redis hands every argument to Lua as a string anyway).
fn int(n: u64) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Takes the next batch from the front of a room's queue: a run of appends with the same target
/// (`append.lua` takes one for the batch), and an append that creates its room alone (it
/// carries the session's metadata).
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut bytes = 0;
    let mut n = 0;
    for p in queue.iter().take(MAX_BATCH_ENTRIES) {
        let joins = match (&queue[0].target, &p.target) {
            (Target::Any, Target::Any) | (Target::Existing, Target::Existing) => true,
            _ => n == 0,
        };
        if n > 0 && (!joins || bytes + p.body.len() > MAX_BATCH_BYTES) {
            break;
        }
        bytes += p.body.len();
        n += 1;
    }
    queue.drain(..n).collect()
}

/// `{woke, held, r1, r2, …}` from `append.lua`.
fn parse_batch_reply(
    reply: Value,
    entries: usize,
) -> Result<(bool, bool, Vec<AppendReply>), StoreError> {
    let Value::Array(parts) = reply else {
        return Err(StoreError::Reply("append script returned no array"));
    };
    let mut parts = parts.into_iter();
    let woke = matches!(parts.next(), Some(Value::Integer(1)));
    let held = matches!(parts.next(), Some(Value::Integer(1)));
    let replies = parts
        .map(parse_entry_reply)
        .collect::<Result<Vec<_>, _>>()?;
    if replies.len() != entries {
        return Err(StoreError::Reply(
            "append script answered another number of entries",
        ));
    }
    Ok((woke, held, replies))
}

/// One entry's reply: `<id>`, `c<id>` (it created the stream), `d<id>` (a duplicate of the
/// entry with that id), `missing` or `exists`.
fn parse_entry_reply(reply: Value) -> Result<AppendReply, StoreError> {
    let reply = reply
        .as_str()
        .ok_or(StoreError::Reply("append script returned no entry reply"))?;
    let (created, duplicate, id) = match reply.as_bytes().first() {
        Some(b'c') => (true, false, &reply[1..]),
        Some(b'd') => (false, true, &reply[1..]),
        _ if reply == "missing" => return Ok(AppendReply::Missing),
        _ if reply == "exists" => return Ok(AppendReply::Exists),
        _ => (false, false, &*reply),
    };
    let id = id
        .parse()
        .map_err(|_| StoreError::Reply("append script returned no id"))?;
    Ok(AppendReply::Stored(Appended {
        id,
        created,
        duplicate,
    }))
}
