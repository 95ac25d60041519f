//! One LLM turn: lease, context, streamed generation to the room, and the one final entry.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::prompt::{self, emotion_guidance};
use super::provider::{Event, LlmError, Usage};
use super::usage::{self, UsageReport};
use super::worker::Ctx;
use crate::protocol::{new_body, transient_frame, StreamId, LLM_ROLE};
use crate::store::{Entry, Finished, StoreError, TurnLock};

/// How the generation ended.
#[derive(Debug)]
enum Outcome {
    Done { reason: String },
    Cancelled,
    Failed(LlmError),
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
    let lease = ctx.args.claim_idle();
    let token = crate::store::lease_token(&ctx.consumer, turn);
    match store.turn_lock(sid, turn, &token, lease).await? {
        TurnLock::Acquired => {}
        TurnLock::Busy => return Ok(()),
        TurnLock::Done(_) => return store.ack(sid, turn).await,
    }
    if store.is_cancelled(sid, turn).await? {
        return finish(ctx, sid, turn, String::new(), Outcome::Cancelled, None).await;
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
        );
        return finish_entry(ctx, sid, turn, "llm.error", &body).await;
    }

    let request_body: Value = serde_json::from_str(&request.body).unwrap_or(Value::Null);
    let emotion = request_body
        .pointer("/bd/emotion")
        .and_then(Value::as_str)
        .filter(|e| emotion_guidance(e).is_some());
    let history = store
        .range_before(
            sid,
            Some(StreamId::new(turn.ms, turn.seq.saturating_add(1))),
            ctx.args.llm_context.max(1),
        )
        .await?;
    let messages = prompt::build(&ctx.system_prompt, emotion, &history);

    tracing::debug!(messages = messages.len(), "asking the model");
    let header = turn_header(turn, ctx.provider.model());
    let _ = store
        .publish_transient(
            sid,
            &transient_frame("llm.start", LLM_ROLE, sid, &header, &json!({})),
        )
        .await;

    let mut text = String::new();
    let mut usage: Option<Usage> = None;
    let outcome = generate(
        ctx, sid, turn, &token, cancel, &messages, &header, &mut text, &mut usage,
    )
    .await;
    if let Outcome::Failed(err) = &outcome {
        tracing::error!(cause = %err, code = err.code(), partial_chars = text.chars().count(), "LLM turn failed");
    }
    finish(ctx, sid, turn, text, outcome, usage).await
}

#[allow(clippy::too_many_arguments)]
async fn generate(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    token: &str,
    cancel: &CancellationToken,
    messages: &[prompt::ChatMessage],
    header: &Map<String, Value>,
    text: &mut String,
    usage: &mut Option<Usage>,
) -> Outcome {
    let asked = std::time::Instant::now();
    let mut completion = tokio::select! {
        _ = cancel.cancelled() => return Outcome::Cancelled,
        c = ctx.provider.stream(messages) => match c {
            Ok(c) => c,
            Err(err) => return Outcome::Failed(err),
        },
    };
    let mut first_token = true;
    // Keep the lease and the entry's claim fresh, and catch cancels whose notice was missed.
    let renew_every = (ctx.args.claim_idle() / 3).max(Duration::from_millis(300));
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut seq: u64 = 0;
    let mut reason = String::from("stop");
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Outcome::Cancelled,
            _ = renew.tick() => {
                let _ = ctx.store.turn_lock(sid, turn, token, ctx.args.claim_idle()).await;
                let _ = ctx.store.touch_claim(sid, &ctx.consumer, turn).await;
                if ctx.store.is_cancelled(sid, turn).await.unwrap_or(false) {
                    return Outcome::Cancelled;
                }
            }
            ev = completion.next() => match ev {
                Ok(Some(Event::Delta(delta))) => {
                    if first_token {
                        first_token = false;
                        metrics::histogram!(crate::metrics::LLM_FIRST_TOKEN_SECONDS).record(asked.elapsed().as_secs_f64());
                    }
                    let frame = transient_frame("llm.delta", LLM_ROLE, sid, header, &json!({"delta": delta, "seq": seq}));
                    if let Err(err) = ctx.store.publish_transient(sid, &frame).await {
                        tracing::debug!(cause = %err, "delta not published");
                    }
                    seq += 1;
                    text.push_str(&delta);
                }
                Ok(Some(Event::Finish(r))) => reason = r,
                Ok(Some(Event::Usage(u))) => *usage = Some(u),
                Ok(None) => {
                    metrics::histogram!(crate::metrics::LLM_TURN_SECONDS).record(asked.elapsed().as_secs_f64());
                    return Outcome::Done { reason };
                }
                Err(err) => return Outcome::Failed(err),
            },
        }
    }
}

fn turn_header(turn: StreamId, model: &str) -> Map<String, Value> {
    let mut header = Map::new();
    header.insert("turn_id".into(), Value::String(turn.to_string()));
    header.insert("model".into(), Value::String(model.to_owned()));
    header
}

fn error_body(sid: &str, turn: StreamId, code: &str, message: &str, partial: &str) -> String {
    let mut header = Map::new();
    header.insert("turn_id".into(), Value::String(turn.to_string()));
    header.insert("code".into(), Value::String(code.to_owned()));
    let mut bd = json!({"message": message});
    if !partial.is_empty() {
        bd["partial"] = Value::String(partial.to_owned());
    }
    new_body("llm.error", LLM_ROLE, None, sid, &header, &bd)
}

async fn finish(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    text: String,
    outcome: Outcome,
    usage: Option<Usage>,
) -> Result<(), StoreError> {
    let (event, body) = match &outcome {
        Outcome::Failed(err) => (
            "llm.error",
            error_body(sid, turn, err.code(), err.human(), &text),
        ),
        Outcome::Done { reason } => (
            "llm.response",
            response_body(ctx, sid, turn, &text, reason, usage),
        ),
        Outcome::Cancelled => (
            "llm.response",
            response_body(ctx, sid, turn, &text, "cancelled", usage),
        ),
    };
    finish_entry(ctx, sid, turn, event, &body).await?;
    let outcome_label = match &outcome {
        Outcome::Failed(_) => "error",
        Outcome::Done { .. } => "response",
        Outcome::Cancelled => "cancelled",
    };
    metrics::counter!(crate::metrics::LLM_TURNS, "outcome" => outcome_label).increment(1);
    if let Some(u) = usage {
        metrics::counter!(crate::metrics::LLM_TOKENS, "kind" => "prompt")
            .increment(u.prompt_tokens);
        metrics::counter!(crate::metrics::LLM_TOKENS, "kind" => "completion")
            .increment(u.completion_tokens);
    }
    if let (Some(u), Some(url)) = (usage, ctx.args.usage_callback_url.clone()) {
        let report = UsageReport::new(sid, &turn.to_string(), ctx.provider.model(), u);
        let http = ctx.http.clone();
        ctx.tracker.spawn(async move {
            usage::report(&http, &url, &report).await;
        });
    }
    Ok(())
}

fn response_body(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    text: &str,
    reason: &str,
    usage: Option<Usage>,
) -> String {
    let header = turn_header(turn, ctx.provider.model());
    let bd = json!({"text": text, "reason": reason, "usage": usage});
    new_body("llm.response", LLM_ROLE, None, sid, &header, &bd)
}

/// Stores the final entry (retrying through a short Redis outage). Exactly one final entry per
/// turn: the script refuses a second one.
async fn finish_entry(
    ctx: &Ctx,
    sid: &str,
    turn: StreamId,
    event: &str,
    body: &str,
) -> Result<(), StoreError> {
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match ctx
            .store
            .finish_turn(sid, turn, LLM_ROLE, event, body)
            .await
        {
            Ok(Finished::Stored(id)) => {
                tracing::info!(event, id = %id, "turn finished");
                return Ok(());
            }
            Ok(Finished::AlreadyDone(id)) => {
                tracing::info!(existing = ?id.map(|i| i.to_string()), "turn was already answered; dropping this reply");
                return Ok(());
            }
            Err(err) if tries < 8 && !ctx.token.is_cancelled() => {
                tracing::warn!(cause = %err, "cannot store the turn's end yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(4));
                tries += 1;
            }
            Err(err) => return Err(err),
        }
    }
}
