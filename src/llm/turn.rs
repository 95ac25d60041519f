//! One LLM turn: lease, context, an attempt announced with `llm.start`, deltas streamed to the
//! room in coalesced batches that also record the text so far in Redis, and one final entry
//! with the turn's usage and its usage callback.
//!
//! The text so far lives in the turn's state in Redis, written by the same script that
//! publishes the deltas it includes (at most [`FLUSH_EVERY`] apart), so a member who joins,
//! reloads or resumes mid-reply reads it and continues from the next delta, on any node, and a
//! worker that takes a dead worker's turn over knows what was spent.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use serde_json::{json, Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::prompt;
use super::provider::{Event, LlmError, Usage};
use super::worker::Ctx;
use crate::protocol::{llm_start_frame, new_body, transient_frame, StreamId, LLM_ROLE};
use crate::store::{
    Entry, Finished, Progress, StoreError, TurnBegin, TurnEnd, TurnLock, TurnProgress,
};

/// Deltas are published (and the text so far recorded) at most this often per turn.
const FLUSH_EVERY: Duration = Duration::from_millis(40);

/// How the generation ended.
#[derive(Debug)]
enum Outcome {
    Done {
        reason: String,
    },
    Cancelled,
    Failed(LlmError),
    /// Another worker owns the turn now (this one lost its lease): it will finish it.
    Superseded,
}

pub(super) async fn run(
    ctx: Arc<Ctx>,
    sid: String,
    turn: StreamId,
    request: Entry,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let span = tracing::info_span!("llm_turn", room = %sid, turn = %turn);
    async {
        if let Err(err) = answer(&ctx, &sid, turn, &request, &cancel).await {
            // The request stays pending; this or another worker retries it after the claim idle.
            tracing::warn!(cause = %err, "turn not finished; it will be retried");
        }
    }
    .instrument(span)
    .await;
    ctx.active.remove(&(sid, turn));
}

async fn answer(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    request: &Entry,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let store = &ctx.store;
    let token = crate::store::lease_token(&ctx.consumer, turn);
    match lock_turn(ctx, sid, turn, &token).await? {
        TurnLock::Acquired => {}
        TurnLock::Busy => return Ok(()),
        TurnLock::Done(_) => return store.ack(sid, turn).await,
        // Nothing was spent yet, so nothing is owed; the request went with the stream.
        TurnLock::Gone => return Ok(()),
    }
    // The claim restarts with the lease: should this worker die before its first renewal, the
    // request is not claimable before the lease lapses. A failure here only makes that wait
    // (in `lock_turn`) more likely.
    let _ = store.touch_claim(sid, &ctx.consumer, turn).await;
    let model = ctx.provider.model();
    // A dead attempt's state: what it spent is carried into this turn's usage.
    let prior = store.turn_state(sid, turn).await?;
    let carried = prior.as_ref().map_or(Spent::default(), |p| Spent {
        prompt: p.carried_prompt + p.prompt_tokens,
        completion: p.carried_completion + (p.seq + 1).max(0) as u64,
    });
    let mut usage = UsageTally::new(carried);
    if store.is_cancelled(sid, turn).await? {
        let end = Ending::new(ctx, sid, turn, "", Outcome::Cancelled, &usage);
        return finish(ctx, sid, turn, end).await;
    }
    let count = store.count_turn(sid, Duration::from_secs(60)).await?;
    if count > ctx.args.llm_turns_per_minute {
        metrics::counter!(crate::metrics::LLM_TURNS, "outcome" => "rate_limited").increment(1);
        let body = error_body(
            sid,
            turn,
            "rate_limited",
            "too many requests to the AI in this room; please wait a minute",
            "",
            None,
        );
        let end = Ending {
            event: "llm.error",
            body,
            callback: None,
        };
        return finish(ctx, sid, turn, end).await;
    }

    let request_body: Value = serde_json::from_str(&request.body).unwrap_or(Value::Null);
    let guidance = request_body
        .pointer("/bd/emotion")
        .and_then(Value::as_str)
        .and_then(|e| ctx.emotions.guidance(e));
    // A dialect may want shorter replies (`hd.max_tokens`, set by the relay only), never longer.
    let max_tokens = request_body
        .pointer("/hd/max_tokens")
        .and_then(Value::as_u64)
        .map_or(ctx.args.llm_max_tokens, |m| {
            u32::try_from(m.max(1))
                .map_or(ctx.args.llm_max_tokens, |m| m.min(ctx.args.llm_max_tokens))
        });
    let history = store
        .range_before(
            sid,
            Some(StreamId::new(turn.ms, turn.seq.saturating_add(1))),
            ctx.args.llm_context.max(1),
        )
        .await?;
    let messages = prompt::build(&ctx.system_prompt, guidance, &history);
    let speakers = prompt::speakers(&history);
    let stops = prompt::stop_sequences(&speakers);
    let prompt_tokens = prompt::estimate_tokens(&messages);

    let Some(attempt) = store.next_attempt(sid, turn).await? else {
        // Deleted since the lease was taken. What dead attempts spent went with their state.
        tracing::info!("the session was deleted before the turn began");
        return Ok(());
    };
    let header = turn_header(turn, model);
    let start = llm_start_frame(sid, turn, model, attempt, -1, "");
    let requester_sub = request_body.pointer("/hd/sub").and_then(Value::as_str);
    store
        .begin_turn(
            sid,
            turn,
            &TurnBegin {
                attempt,
                requester: &request.participant,
                sub: requester_sub,
                started_ms: prior
                    .as_ref()
                    .map_or_else(crate::protocol::now_ms, |p| p.started_ms),
                model,
                prompt_tokens,
                carried_completion: carried.completion,
                carried_prompt: carried.prompt,
                frame: &start,
            },
            state_ttl(ctx),
        )
        .await?;
    tracing::debug!(attempt, messages = messages.len(), "asking the model");

    let mut out = Deltas {
        ctx,
        sid,
        turn,
        attempt,
        header,
        published: String::new(),
        raw: String::new(),
        skip: None,
        speakers,
        pending: Vec::new(),
        next_seq: 0,
        last_flush: None,
    };
    let ask = Ask {
        messages: &messages,
        stops: &stops,
        max_tokens,
    };
    let outcome = generate(ctx, sid, turn, &token, cancel, &ask, &mut out, &mut usage).await;
    let outcome = match outcome {
        Outcome::Superseded => Outcome::Superseded,
        // Whatever the room has not been sent yet goes out now, so the stored text is exactly
        // what every member rebuilt.
        other => match out.flush(true).await {
            Ok(Progress::Published | Progress::Deleted) => other,
            Ok(Progress::Lost) => Outcome::Superseded,
            Err(err) => return Err(err),
        },
    };
    if matches!(outcome, Outcome::Superseded) {
        tracing::info!("another worker took this turn over; leaving it to that worker");
        return Ok(());
    }
    usage.prompt_estimate = prompt_tokens;
    if let Outcome::Failed(err) = &outcome {
        tracing::error!(cause = %err, code = err.code(), partial_chars = out.published.chars().count(), "LLM turn failed");
    }
    let end = Ending::new(ctx, sid, turn, &out.published, outcome, &usage);
    finish(ctx, sid, turn, end).await
}

/// Takes the turn's lease. One held by another worker may be a dead worker's: a request is
/// claimed once its claim sat idle for a lease's time, and a lease taken (or renewed) after
/// the claim outlives it. Giving up then would cost the request a second delivery for one
/// death (the next claim), and a few deaths and restarts in a row would dead-letter a request
/// that never failed. So a busy lease is waited out for up to one lease time, with this
/// worker's claim kept fresh meanwhile (that counts no delivery); a live holder renews it, and
/// this worker then leaves the turn to it. Only shutdown ends the wait early: a cancelled turn
/// is recorded as such once its lease is taken.
async fn lock_turn(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    token: &str,
) -> Result<TurnLock, StoreError> {
    let lease = ctx.args.claim_idle();
    let give_up = tokio::time::Instant::now() + lease;
    let poll = (lease / 8).max(Duration::from_millis(100));
    loop {
        let lock = ctx.store.turn_lock(sid, turn, token, lease).await?;
        if !matches!(lock, TurnLock::Busy) || tokio::time::Instant::now() >= give_up {
            return Ok(lock);
        }
        let _ = ctx.store.touch_claim(sid, &ctx.consumer, turn).await;
        tokio::select! {
            _ = ctx.token.cancelled() => return Ok(TurnLock::Busy),
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Renews the lease and the entry's claim, and catches a cancel whose notice was missed.
/// `Some`: the turn ends here (another worker took it over, or it was cancelled).
async fn renew_turn(ctx: &Ctx, sid: &str, turn: StreamId, token: &str) -> Option<Outcome> {
    match ctx
        .store
        .turn_lock(sid, turn, token, ctx.args.claim_idle())
        .await
    {
        Ok(TurnLock::Acquired) | Err(_) => {}
        Ok(TurnLock::Busy | TurnLock::Done(_)) => return Some(Outcome::Superseded),
        // The session was deleted: the turn stops, and its end (stored nowhere) bills what was
        // spent.
        Ok(TurnLock::Gone) => return Some(Outcome::Cancelled),
    }
    let _ = ctx.store.touch_claim(sid, &ctx.consumer, turn).await;
    if ctx.store.is_cancelled(sid, turn).await.unwrap_or(false) {
        return Some(Outcome::Cancelled);
    }
    None
}

fn state_ttl(ctx: &Ctx) -> Duration {
    crate::store::turn_state_ttl(ctx.args.claim_idle())
}

/// What the provider is asked for one attempt.
struct Ask<'a> {
    messages: &'a [prompt::ChatMessage],
    stops: &'a [String],
    max_tokens: u32,
}

#[allow(clippy::too_many_arguments)]
async fn generate(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    token: &str,
    cancel: &CancellationToken,
    ask: &Ask<'_>,
    out: &mut Deltas<'_>,
    usage: &mut UsageTally,
) -> Outcome {
    let asked = std::time::Instant::now();
    // The lease and the entry's claim are kept fresh from the first request on: connecting and
    // retrying can outlast a lease, and another worker would take the turn over meanwhile.
    let renew_every = (ctx.args.claim_idle() / 3).max(Duration::from_millis(300));
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let starting = ctx.provider.stream(ask.messages, ask.stops, ask.max_tokens);
    tokio::pin!(starting);
    let mut completion = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Outcome::Cancelled,
            _ = renew.tick() => {
                if let Some(end) = renew_turn(ctx, sid, turn, token).await {
                    return end;
                }
            }
            c = &mut starting => match c {
                Ok(c) => break c,
                Err(err) => return Outcome::Failed(err),
            },
        }
    };
    // From here on the provider has read the prompt: the turn spent tokens.
    usage.provider_called = true;
    let mut first_token = true;
    let mut reason = String::from("stop");
    loop {
        let flush_at = out.flush_due();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Outcome::Cancelled,
            _ = renew.tick() => {
                if let Some(end) = renew_turn(ctx, sid, turn, token).await {
                    return end;
                }
            }
            _ = sleep_until(flush_at), if flush_at.is_some() => {
                match out.flush(false).await {
                    Ok(Progress::Published) => {}
                    Ok(Progress::Lost) => return Outcome::Superseded,
                    // As after a lost renewal: the end bills what was spent.
                    Ok(Progress::Deleted) => return Outcome::Cancelled,
                    Err(err) => tracing::debug!(cause = %err, "deltas not published yet; retrying"),
                }
            }
            ev = completion.next() => match ev {
                Ok(Some(Event::Delta(delta))) => {
                    if first_token {
                        first_token = false;
                        metrics::histogram!(crate::metrics::LLM_FIRST_TOKEN_SECONDS).record(asked.elapsed().as_secs_f64());
                    }
                    usage.chunks += 1;
                    out.push(&delta);
                }
                Ok(Some(Event::Finish(r))) => reason = r,
                Ok(Some(Event::Usage(u))) => usage.reported = Some(u),
                Ok(None) => {
                    metrics::histogram!(crate::metrics::LLM_TURN_SECONDS).record(asked.elapsed().as_secs_f64());
                    return Outcome::Done { reason };
                }
                Err(err) => return Outcome::Failed(err),
            },
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The reply as the room sees it: deltas coalesced into batches, each published together with
/// the text it brings the turn to.
struct Deltas<'a> {
    ctx: &'a Ctx,
    sid: &'a str,
    turn: StreamId,
    attempt: u32,
    header: Map<String, Value>,
    /// The text every member has been sent.
    published: String,
    /// What the model wrote, as it wrote it (before a leading speaker prefix is dropped).
    raw: String,
    /// Bytes of `raw` that are the model's own speaker prefix, once that is decided.
    skip: Option<usize>,
    speakers: Vec<String>,
    /// Deltas not yet published: (seq, text).
    pending: Vec<(i64, String)>,
    next_seq: u64,
    last_flush: Option<tokio::time::Instant>,
}

impl Deltas<'_> {
    fn push(&mut self, delta: &str) {
        let before = self.raw.len();
        self.raw.push_str(delta);
        let from = match self.skip {
            Some(_) => before,
            None => match prompt::speaker_prefix_len(&self.raw, &self.speakers, false) {
                None => return,
                Some(skip) => {
                    self.skip = Some(skip);
                    if skip > 0 {
                        tracing::debug!(prefix = %self.raw[..skip].trim(), "dropping the model's own speaker prefix");
                    }
                    skip
                }
            },
        };
        self.queue(from);
    }

    /// Queues `raw[from..]` as the next delta; a reply never starts with white space.
    fn queue(&mut self, from: usize) {
        let mut text = &self.raw[from..];
        if self.next_seq == 0 {
            text = text.trim_start();
        }
        if !text.is_empty() {
            self.pending.push((self.next_seq as i64, text.to_owned()));
            self.next_seq += 1;
        }
    }

    /// When the pending deltas should go out: at once if the last flush was long enough ago.
    fn flush_due(&self) -> Option<tokio::time::Instant> {
        if self.pending.is_empty() {
            return None;
        }
        Some(
            self.last_flush
                .map_or_else(tokio::time::Instant::now, |t| t + FLUSH_EVERY),
        )
    }

    /// Publishes the pending deltas with the text so far. `last`: the generation ended, so a
    /// reply too short to have decided about a speaker prefix is decided now. Anything but
    /// `Published` leaves the deltas pending.
    async fn flush(&mut self, last: bool) -> Result<Progress, StoreError> {
        if last && self.skip.is_none() {
            let skip = prompt::speaker_prefix_len(&self.raw, &self.speakers, true).unwrap_or(0);
            self.skip = Some(skip);
            self.queue(skip);
        }
        if self.pending.is_empty() {
            return Ok(Progress::Published);
        }
        let mut text = self.published.clone();
        let frames: Vec<(i64, String)> = self
            .pending
            .iter()
            .map(|(seq, delta)| {
                text.push_str(delta);
                let bd = json!({"delta": delta, "seq": seq});
                let frame = transient_frame("llm.delta", LLM_ROLE, self.sid, &self.header, &bd);
                (*seq, frame)
            })
            .collect();
        let seq = frames.last().map_or(-1, |(s, _)| *s);
        self.last_flush = Some(tokio::time::Instant::now());
        let progress = self
            .ctx
            .store
            .turn_progress(
                self.sid,
                self.turn,
                &TurnProgress {
                    attempt: self.attempt,
                    seq,
                    text: &text,
                    frames: &frames,
                },
                state_ttl(self.ctx),
            )
            .await?;
        if progress == Progress::Published {
            self.published = text;
            self.pending.clear();
        }
        Ok(progress)
    }
}

/// Tokens spent by earlier, dead attempts of a turn.
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    prompt: u64,
    completion: u64,
}

/// What a turn spent: the provider's own figures when it sent them, otherwise counted chunks
/// and an estimated prompt.
#[derive(Debug, Clone, Default)]
struct UsageTally {
    carried: Spent,
    provider_called: bool,
    reported: Option<Usage>,
    prompt_estimate: u64,
    chunks: u64,
}

impl UsageTally {
    fn new(carried: Spent) -> Self {
        Self {
            carried,
            ..Self::default()
        }
    }

    fn spent_tokens(&self) -> bool {
        self.provider_called || self.carried.prompt + self.carried.completion > 0
    }

    /// The turn's usage as stored in `bd.usage`.
    fn total(&self) -> Value {
        let carried = self.carried.prompt + self.carried.completion > 0;
        let (prompt, completion, estimated) = match (self.reported, self.provider_called) {
            (Some(u), _) => (u.prompt_tokens, u.completion_tokens, carried),
            (None, true) => (self.prompt_estimate, self.chunks, true),
            (None, false) => (0, 0, true),
        };
        let prompt = prompt + self.carried.prompt;
        let completion = completion + self.carried.completion;
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "estimated": estimated,
        })
    }
}

fn turn_header(turn: StreamId, model: &str) -> Map<String, Value> {
    let mut header = Map::new();
    header.insert("turn_id".into(), Value::String(turn.to_string()));
    header.insert("model".into(), Value::String(model.to_owned()));
    header
}

fn error_body(
    sid: &str,
    turn: StreamId,
    code: &str,
    message: &str,
    text: &str,
    usage: Option<&Value>,
) -> String {
    let mut header = Map::new();
    header.insert("turn_id".into(), Value::String(turn.to_string()));
    header.insert("code".into(), Value::String(code.to_owned()));
    let mut bd = json!({"message": message});
    if !text.is_empty() {
        bd["partial"] = Value::String(text.to_owned());
        bd["text"] = Value::String(text.to_owned());
    }
    if let Some(usage) = usage {
        bd["usage"] = usage.clone();
    }
    new_body("llm.error", LLM_ROLE, None, sid, &header, &bd)
}

/// The final entry of a turn and its usage callback.
struct Ending {
    event: &'static str,
    body: String,
    callback: Option<String>,
}

impl Ending {
    fn new(
        ctx: &Ctx,
        sid: &str,
        turn: StreamId,
        text: &str,
        outcome: Outcome,
        usage: &UsageTally,
    ) -> Ending {
        let model = ctx.provider.model();
        let total = usage.total();
        let (event, reason, body) = match &outcome {
            Outcome::Failed(err) => {
                let spent = usage.spent_tokens().then_some(&total);
                let body = error_body(sid, turn, err.code(), err.human(), text, spent);
                ("llm.error", err.code().to_owned(), body)
            }
            Outcome::Done { reason } => (
                "llm.response",
                reason.clone(),
                response_body(sid, turn, model, text, reason, &total),
            ),
            Outcome::Cancelled | Outcome::Superseded => (
                "llm.response",
                "cancelled".to_owned(),
                response_body(sid, turn, model, text, "cancelled", &total),
            ),
        };
        let label = match &outcome {
            Outcome::Failed(_) => "error",
            Outcome::Done { .. } => "response",
            Outcome::Cancelled | Outcome::Superseded => "cancelled",
        };
        metrics::counter!(crate::metrics::LLM_TURNS, "outcome" => label).increment(1);
        let callback = (usage.spent_tokens() && ctx.args.usage_callback_url.is_some()).then(|| {
            json!({
                "type": "usage",
                "session_id": sid,
                "turn_id": turn.to_string(),
                "model": model,
                "prompt_tokens": total["prompt_tokens"],
                "completion_tokens": total["completion_tokens"],
                "total_tokens": total["total_tokens"],
                "reason": reason,
                "estimated": total["estimated"],
            })
            .to_string()
        });
        if usage.spent_tokens() {
            for (kind, field) in [
                ("prompt", "prompt_tokens"),
                ("completion", "completion_tokens"),
            ] {
                metrics::counter!(crate::metrics::LLM_TOKENS, "kind" => kind)
                    .increment(total[field].as_u64().unwrap_or(0));
            }
        }
        Ending {
            event,
            body,
            callback,
        }
    }
}

fn response_body(
    sid: &str,
    turn: StreamId,
    model: &str,
    text: &str,
    reason: &str,
    usage: &Value,
) -> String {
    let header = turn_header(turn, model);
    let bd = json!({"text": text, "reason": reason, "usage": usage});
    new_body("llm.response", LLM_ROLE, None, sid, &header, &bd)
}

/// Stores the final entry and queues the usage callback (retrying through a short Redis
/// outage). Exactly one final entry per turn: the script refuses a second one.
async fn finish(ctx: &Ctx, sid: &str, turn: StreamId, end: Ending) -> Result<(), StoreError> {
    let turn_end = TurnEnd {
        participant: LLM_ROLE,
        event: end.event,
        body: &end.body,
        usage_callback: end.callback.as_deref(),
    };
    let through_outages =
        || crate::retry::bounded(Duration::from_millis(100), Duration::from_secs(4), 8);
    let stored = (|| ctx.store.finish_turn(sid, turn, &turn_end))
        .retry(through_outages())
        .when(|_| !ctx.token.is_cancelled())
        .notify(|err, _| tracing::warn!(cause = %err, "cannot store the turn's end yet; retrying"))
        .await?;
    match stored {
        Finished::Stored { id, ordinal } => {
            tracing::info!(event = end.event, id = %id, ordinal, "turn finished");
            if end.callback.is_some() {
                ctx.usage_wake.notify_one();
            }
        }
        Finished::AlreadyDone(id) => {
            tracing::info!(existing = %id, "turn was already answered; dropping this reply")
        }
        Finished::Gone => {
            tracing::info!("the session was deleted during the turn; nothing stored");
            // The tokens were spent all the same.
            if let Some(callback) = &end.callback {
                let billed = (|| ctx.store.bill_deleted_session(sid, turn, callback))
                    .retry(through_outages())
                    .when(|_| !ctx.token.is_cancelled())
                    .await;
                match billed {
                    Ok(()) => ctx.usage_wake.notify_one(),
                    // Nothing retries it later: the request went with the stream.
                    Err(err) => {
                        tracing::error!(cause = %err, %callback, "usage callback of a turn whose session was deleted lost")
                    }
                }
            }
        }
    }
    Ok(())
}
