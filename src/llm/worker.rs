//! The worker: discovers rooms, reads the consumer group, hands triggers to turns, claims what
//! dead workers left, and routes cancels to the turn they stop.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::prompt::{Emotions, EmotionsError, DEFAULT_SYSTEM_PROMPT};
use super::provider::{LlmError, Provider, ProviderSettings};
use super::rooms::ReadSet;
use super::{LlmArgs, ReplyPolicy};
use crate::protocol::{valid_sid, StreamId, LLM_ROLE};
use crate::retry::until_ok;
use crate::store::{BlockingConn, DeletionCursor, Entry, FeedEvent, GroupEntry, Store, StoreError};

/// How long one `XREADGROUP` blocks; also the longest delay before a newly found room is read.
const BLOCK: Duration = Duration::from_millis(1000);
const READ_COUNT: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("Redis client setup failed")]
    Store(#[from] StoreError),
    #[error("LLM client setup failed")]
    Llm(#[from] LlmError),
    #[error("cannot read the system prompt file")]
    Prompt(#[source] std::io::Error),
    #[error(transparent)]
    Emotions(#[from] EmotionsError),
}

/// State shared by the worker's loops and its turns.
#[derive(Debug)]
pub(super) struct Ctx {
    pub store: Store,
    pub args: LlmArgs,
    pub provider: Provider,
    pub system_prompt: String,
    /// Guidance per emotion for the system prompt (`--llm-emotion-prompts`).
    pub emotions: Emotions,
    pub consumer: String,
    pub token: CancellationToken,
    pub tracker: TaskTracker,
    pub http: reqwest::Client,
    /// The rooms this worker reads (those with traffic lately).
    rooms: ReadSet,
    /// Turns running on this worker, with the token that cancels each.
    pub active: DashMap<(String, StreamId), CancellationToken>,
    /// Rung when a room has new entries (cluster mode, where reads cannot block on every room).
    wake: Notify,
    /// Rung when a turn queued a usage callback.
    pub usage_wake: Notify,
    slots: Arc<Semaphore>,
    /// How far this worker has read the deletion log.
    deletions: DeletionCursor,
}

/// Runs the LLM participant until `token` is cancelled. Unfinished turns are left pending, so
/// another worker claims them.
pub async fn run_worker(
    store: Store,
    args: LlmArgs,
    token: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), WorkerError> {
    args.warn_if_risky();
    let provider = Provider::new(ProviderSettings {
        base_url: args.llm_base_url.clone(),
        api_key: args.llm_api_key.clone(),
        model: args.llm_model.clone(),
        max_tokens: args.llm_max_tokens,
        connect_timeout: Duration::from_millis(args.llm_connect_timeout_ms),
        idle_timeout: Duration::from_secs(args.llm_idle_timeout_secs.max(1)),
        attempts: args.llm_attempts.max(1),
    })?;
    let system_prompt = match (&args.llm_system_prompt, &args.llm_system_prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(WorkerError::Prompt)?,
        (None, None) => DEFAULT_SYSTEM_PROMPT.to_owned(),
    };
    let emotions = match &args.llm_emotion_prompts {
        Some(path) => Emotions::from_file(path)?,
        None => Emotions::default(),
    };
    let consumer = args.llm_consumer.clone().unwrap_or_else(default_consumer);
    let wake_after = store.wake_after();
    let ctx = Arc::new(Ctx {
        slots: Arc::new(Semaphore::new(args.llm_concurrency.max(1))),
        store,
        args,
        provider,
        system_prompt,
        emotions,
        consumer,
        token: token.clone(),
        tracker: tracker.clone(),
        http: reqwest::Client::new(),
        rooms: ReadSet::new(wake_after),
        active: DashMap::new(),
        wake: Notify::new(),
        usage_wake: Notify::new(),
        deletions: DeletionCursor::default(),
    });
    tracing::info!(consumer = %ctx.consumer, model = %ctx.provider.model(), base_url = %ctx.args.llm_base_url, "LLM participant starting");

    // Registry position first, then the scan: a room created in between is seen by the tail.
    let registry_from = until_ok(&ctx.token, "reading the room registry", || {
        ctx.store.registry_tail()
    })
    .await;
    if let Some(tail) = until_ok(&ctx.token, "reading the deletion log", || {
        ctx.store.deletions_tail()
    })
    .await
    {
        ctx.deletions.start_at(tail);
    }
    let existing = until_ok(&ctx.token, "scanning for rooms", || ctx.store.scan_rooms()).await;
    if let (Some(from), Some(existing)) = (registry_from, existing) {
        for sid in existing {
            // Rooms from before this relay version have no group: start at their end rather
            // than answering their whole history.
            if let Err(err) = ctx.store.ensure_group(&sid, "$").await {
                tracing::debug!(room = %sid, cause = %err, "cannot create group");
                continue;
            }
            ctx.rooms.touch(&sid);
        }
        tracker.spawn(registry_loop(ctx.clone(), from));
        tracker.spawn(cancel_loop(ctx.clone()));
        tracker.spawn(claim_loop(ctx.clone()));
        if let Some(url) = ctx.args.usage_callback_url.clone() {
            tracker.spawn(super::usage::deliver_loop(ctx.clone(), url));
        }
        read_loop(ctx).await?;
    }
    Ok(())
}

fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

async fn read_loop(ctx: Arc<Ctx>) -> Result<(), WorkerError> {
    let conn = ctx.store.blocking_conn(BLOCK)?;
    // This consumer's own unacknowledged entries first (a restart mid-turn), then new ones.
    let mut pending = true;
    let mut delays = crate::retry::until_back();
    while !ctx.token.is_cancelled() {
        let rooms = ctx.rooms.all();
        if rooms.is_empty() {
            tokio::select! {
                _ = ctx.token.cancelled() => break,
                _ = tokio::time::sleep(BLOCK) => continue,
            }
        }
        let read = tokio::select! {
            _ = ctx.token.cancelled() => break,
            r = read_rooms(&ctx, &conn, &rooms, pending) => r,
        };
        match read {
            Ok(entries) => {
                tracing::trace!(
                    rooms = rooms.len(),
                    entries = entries.len(),
                    pending,
                    "group read"
                );
                delays.reset();
                if pending && (entries.len() as u64) < READ_COUNT {
                    pending = false;
                }
                handle_batch(&ctx, entries).await;
            }
            Err(err) => {
                let details = match &err {
                    StoreError::Redis(e) => e.details().to_owned(),
                    StoreError::Reply(_) => String::new(),
                };
                // NOGROUP: a room's stream (and group) is gone, or only its group. UNBLOCKED: a
                // stream the blocked read named was deleted meanwhile.
                if details.contains("NOGROUP") || details.contains("UNBLOCKED") {
                    // What every session delete and room expiry causes: not worth a warning.
                    // Rooms whose stream is gone are forgotten, lost groups remade.
                    if !forget_deleted_rooms(&ctx).await {
                        repair_groups(&ctx, &rooms).await;
                    }
                    tracing::info!(cause = %details, "a room's stream or group was gone; rooms repaired, reading again");
                } else {
                    tracing::warn!(cause = %err, %details, "reading the LLM group failed; retrying");
                }
                if !delays.wait(&ctx.token).await {
                    break;
                }
            }
        }
    }
    tracing::info!("LLM participant stopped reading");
    Ok(())
}

/// One read over every known room. On a single Redis, one `XREADGROUP ... BLOCK` names them
/// all. On a cluster a command may only name keys of one hash slot, so rooms are read per slot
/// without blocking, and an idle worker waits for a room's live feed to wake it (or a second).
async fn read_rooms(
    ctx: &Ctx,
    conn: &BlockingConn,
    rooms: &[String],
    pending: bool,
) -> Result<Vec<GroupEntry>, StoreError> {
    let store = &ctx.store;
    if !store.is_clustered() {
        let block = (!pending).then_some(BLOCK);
        return store
            .group_read(conn, &ctx.consumer, rooms, pending, READ_COUNT, block)
            .await;
    }
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for sid in rooms {
        by_slot
            .entry(store.room_slot(sid))
            .or_default()
            .push(sid.clone());
    }
    let mut entries = Vec::new();
    for group in by_slot.values() {
        entries.extend(
            store
                .group_read(conn, &ctx.consumer, group, pending, READ_COUNT, None)
                .await?,
        );
    }
    if entries.is_empty() && !pending {
        let _ = tokio::time::timeout(BLOCK, ctx.wake.notified()).await;
    }
    Ok(entries)
}

/// Forgets the rooms whose session was deleted since this worker last read the deletion log:
/// what a `NOGROUP` read usually means, found without a call per room read (every delete makes
/// every worker's read fail once). `false` when the log named none of them (a room expired, or
/// its group was lost): the caller checks every room.
async fn forget_deleted_rooms(ctx: &Ctx) -> bool {
    let Ok(Some(logged)) = ctx.deletions.read_new(&ctx.store).await else {
        return false;
    };
    let mut forgot = false;
    for (_, sid) in logged {
        // A session created again under the same id since has its stream and group.
        if ctx.rooms.contains(&sid) && matches!(ctx.store.session_exists(&sid).await, Ok(false)) {
            tracing::debug!(room = %sid, "session deleted; no longer read");
            ctx.rooms.forget(&sid);
            forgot = true;
        }
    }
    forgot
}

/// A group vanished (Redis restarted without its data): recreate it where the stream still
/// exists, forget rooms whose stream is gone.
async fn repair_groups(ctx: &Ctx, rooms: &[String]) {
    for sid in rooms {
        match ctx.store.ensure_group(sid, "0").await {
            Ok(true) => tracing::info!(room = %sid, "recreated the LLM group"),
            Ok(false) => {}
            Err(_) => ctx.rooms.forget(sid),
        }
    }
}

/// Acks what needs no answer (in one XACK per room) and starts a turn for each trigger.
async fn handle_batch(ctx: &Arc<Ctx>, entries: Vec<GroupEntry>) {
    let mut skip: HashMap<String, Vec<StreamId>> = HashMap::new();
    for ge in entries {
        match &ge.entry {
            Some(entry) if is_trigger(entry, ctx.args.llm_reply) => start_turn(ctx, ge).await,
            Some(_) => skip.entry(ge.sid).or_default().push(ge.id),
            None => {
                tracing::warn!(room = %ge.sid, id = %ge.id, "pending entry was trimmed; acknowledging it");
                skip.entry(ge.sid).or_default().push(ge.id);
            }
        }
    }
    for (sid, ids) in skip {
        for id in ids {
            if let Err(err) = ctx.store.ack(&sid, id).await {
                tracing::warn!(room = %sid, cause = %err, "ack failed; the entry will be re-read");
            }
        }
    }
}

async fn start_turn(ctx: &Arc<Ctx>, ge: GroupEntry) {
    let Some(request) = ge.entry else { return };
    let key = (ge.sid.clone(), ge.id);
    if ctx.active.contains_key(&key) {
        return; // already being answered here (re-read or claimed while running)
    }
    let permit = tokio::select! {
        _ = ctx.token.cancelled() => return,
        p = ctx.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
    };
    let cancel = ctx.token.child_token();
    tracing::debug!(room = %ge.sid, id = %ge.id, "starting a turn");
    ctx.active.insert(key, cancel.clone());
    ctx.tracker.spawn(super::turn::run(
        ctx.clone(),
        ge.sid,
        ge.id,
        request,
        cancel,
        permit,
    ));
}

/// Whether an entry asks for an answer under `policy`. The LLM never answers itself.
pub(super) fn is_trigger(entry: &Entry, policy: ReplyPolicy) -> bool {
    if entry.participant == LLM_ROLE {
        return false;
    }
    match entry.event.as_str() {
        "llm.request" => true,
        "chat.message" => match policy {
            ReplyPolicy::Request => false,
            ReplyPolicy::All => true,
            ReplyPolicy::Mention => serde_json::from_str::<Value>(&entry.body)
                .ok()
                .and_then(|b| {
                    b.pointer("/bd/text")
                        .and_then(Value::as_str)
                        .map(mentions_llm)
                })
                .unwrap_or(false),
        },
        _ => false,
    }
}

fn mentions_llm(text: &str) -> bool {
    text.to_lowercase().contains("@llm")
}

/// Follows the room registry so new rooms are read within one BLOCK.
async fn registry_loop(ctx: Arc<Ctx>, mut after: String) {
    let conn = match ctx.store.blocking_conn(Duration::from_secs(5)) {
        Ok(c) => c,
        Err(err) => {
            tracing::error!(cause = %err, "cannot open the registry connection");
            return;
        }
    };
    while !ctx.token.is_cancelled() {
        let read = tokio::select! {
            _ = ctx.token.cancelled() => return,
            r = ctx.store.read_registry(&conn, &after, Duration::from_secs(5)) => r,
        };
        match read {
            Ok(rooms) => {
                for (id, sid) in rooms {
                    after = id;
                    if !valid_sid(&sid) {
                        continue;
                    }
                    if ctx.rooms.contains(&sid) {
                        ctx.rooms.touch(&sid);
                        continue;
                    }
                    // A new room, or one that woke up after the window: its group exists (the
                    // append script creates it with the stream); make sure anyway.
                    if let Err(err) = ctx.store.ensure_group(&sid, "0").await {
                        tracing::debug!(room = %sid, cause = %err, "announced room has no stream");
                        continue;
                    }
                    tracing::debug!(room = %sid, "reading a room");
                    ctx.rooms.touch(&sid);
                }
            }
            Err(err) => {
                tracing::debug!(cause = %err, "registry read failed; retrying");
                tokio::select! {
                    _ = ctx.token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// Cancels reach the worker generating the turn over pub/sub; a missed notice is caught by the
/// turn's periodic check of the cancel flag. On a cluster the same feed carries room activity,
/// which wakes the group reads (they cannot block on rooms of several slots).
async fn cancel_loop(ctx: Arc<Ctx>) {
    let mut feed = match ctx.store.feed() {
        Ok(f) => f,
        Err(err) => {
            tracing::error!(cause = %err, "cannot open the cancel subscription");
            return;
        }
    };
    let handle = feed.handle();
    let clustered = ctx.store.is_clustered();
    let follow = || async {
        handle.follow_cancels().await?;
        if clustered {
            handle.follow_llm_wakeups().await?;
        }
        Ok::<(), StoreError>(())
    };
    if until_ok(&ctx.token, "subscribing to cancel notices", follow)
        .await
        .is_none()
    {
        return;
    }
    loop {
        let event = tokio::select! {
            _ = ctx.token.cancelled() => break,
            ev = feed.next() => ev,
        };
        match event {
            Some(FeedEvent::Cancel { sid, turn }) => {
                if let Some(cancel) = ctx
                    .active
                    .get(&(sid.clone(), turn))
                    .map(|c| c.value().clone())
                {
                    tracing::info!(room = %sid, turn = %turn, "turn cancelled");
                    cancel.cancel();
                }
            }
            Some(FeedEvent::Activity) => ctx.wake.notify_one(),
            // A lost notice is caught by the turn's own check of the cancel flag.
            Some(FeedEvent::Resync | FeedEvent::Live { .. }) => {}
            None => break,
        }
    }
    handle.close().await;
}

/// Claims requests whose worker died (idle past `--llm-claim-idle-secs`) and answers them, or
/// dead-letters those delivered too often.
async fn claim_loop(ctx: Arc<Ctx>) {
    let idle = ctx.args.claim_idle();
    let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(500)));
    loop {
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
        }
        forget_idle_rooms(&ctx).await;
        for sid in ctx.rooms.all() {
            let claimed = match ctx.store.claim_idle(&sid, &ctx.consumer, idle).await {
                Ok(c) => c,
                Err(err) => {
                    tracing::debug!(room = %sid, cause = %err, "claim failed");
                    continue;
                }
            };
            for (ge, deliveries) in claimed {
                if deliveries > ctx.args.llm_max_deliveries {
                    tracing::error!(room = %sid, id = %ge.id, deliveries, "LLM request failed too often; moving it to the dead-letter stream");
                    if let Err(err) = ctx.store.dead_letter(&ge, deliveries).await {
                        tracing::warn!(cause = %err, "dead-lettering failed");
                    }
                    continue;
                }
                tracing::info!(room = %sid, id = %ge.id, deliveries, "claimed an abandoned LLM request");
                handle_batch(&ctx, vec![ge]).await;
            }
        }
    }
}

/// Stops reading rooms silent for the wake window, unless requests of theirs are still pending
/// (a dead worker's turn, to be claimed) or a turn of theirs runs here.
async fn forget_idle_rooms(ctx: &Ctx) {
    for sid in ctx.rooms.idle() {
        if ctx.active.iter().any(|t| t.key().0 == sid) {
            continue;
        }
        match ctx.store.pending_count(&sid).await {
            Ok(0) => {
                if ctx.rooms.forget_if_idle(&sid) {
                    tracing::debug!(room = %sid, "room idle; no longer read");
                }
            }
            Ok(_) => {}
            // The stream (and its group) is gone: the room expired or was deleted.
            Err(StoreError::Redis(e)) if e.details().contains("NOGROUP") => {
                ctx.rooms.forget(&sid);
            }
            Err(err) => tracing::debug!(room = %sid, cause = %err, "cannot check pending requests"),
        }
    }
    metrics::gauge!(crate::metrics::LLM_ROOMS).set(ctx.rooms.len() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(participant: &str, event: &str, text: &str) -> Entry {
        Entry {
            id: StreamId::new(1, 0),
            participant: participant.into(),
            event: event.into(),
            body: serde_json::json!({"hd": {"event": event}, "bd": {"text": text}}).to_string(),
        }
    }

    #[test]
    fn triggers_follow_the_policy() {
        use ReplyPolicy::*;
        assert!(is_trigger(&e("A", "llm.request", "x"), Request));
        assert!(!is_trigger(&e("A", "chat.message", "hi @llm"), Request));
        assert!(is_trigger(&e("A", "chat.message", "hi @LLM"), Mention));
        assert!(!is_trigger(&e("A", "chat.message", "hi llm"), Mention));
        assert!(is_trigger(&e("A", "chat.message", "hi"), All));
        assert!(
            !is_trigger(&e("llm", "chat.message", "@llm"), All),
            "never answers itself"
        );
        assert!(!is_trigger(&e("llm", "llm.request", "x"), All));
        assert!(!is_trigger(&e("A", "session.join", ""), All));
    }
}
