//! Step 4 of [`Ingress::submit`](super::Ingress::submit), the I/O: an envelope on its way into
//! its room's stream ([`StoreJob`]), the room created on the way when the client may create one,
//! and a cancel checked (who may send it) and signalled to the LLM workers.

use std::future::Future;
use std::pin::Pin;

use super::budget::{Buckets, ClientKey};
use super::{Refused, Submitted};
use crate::dispatch::StoreEnvelope;
use crate::protocol::{ClientError, ErrorCode, StreamId};
use crate::store::{Appended, Store, StoreError};

/// Whether an entry may ask the LLM participant for an answer (`llm.request`, or a message that
/// mentions `@llm`); a wake-up for anything else only costs a worker an empty read.
fn asks_llm(envelope: &StoreEnvelope) -> bool {
    envelope.event == "llm.request"
        || (envelope.event == "chat.message" && mentions_llm(&envelope.body))
}

/// Whether a stored body mentions `@llm`, in any case, without a lowercased copy per message.
fn mentions_llm(body: &str) -> bool {
    body.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"@llm"))
}

/// Who sends an envelope: the role it speaks as and, when authenticated, the token subject.
#[derive(Debug, Clone, Copy)]
struct Speaker<'a> {
    role: &'a str,
    sub: Option<&'a str>,
}

/// Whether `who` may cancel `turn`: only who asked for it (the same token subject, or without
/// auth the same role). `Some(error)` refuses.
async fn may_cancel(
    store: &Store,
    sid: &str,
    turn: StreamId,
    who: Speaker<'_>,
) -> Result<Option<ClientError>, StoreError> {
    let request = store
        .range_after(sid, Some(turn.prev()), Some(turn), 1)
        .await?
        .into_iter()
        .find(|e| e.id == turn);
    let Some(request) = request else {
        return Ok(Some(ClientError::new(
            ErrorCode::NotFound,
            format!("there is no LLM turn {turn} in this room"),
        )));
    };
    let asked_by_sub = serde_json::from_str::<serde_json::Value>(&request.body)
        .ok()
        .and_then(|b| {
            b.pointer("/hd/sub")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        });
    let allowed = match (who.sub, asked_by_sub.as_deref()) {
        (Some(sub), Some(asker)) => sub == asker,
        (Some(_), None) | (None, Some(_)) => false,
        (None, None) => who.role == request.participant,
    };
    Ok((!allowed).then(|| {
        ClientError::new(
            ErrorCode::ForbiddenCancel,
            "only who asked for this reply can cancel it",
        )
    }))
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendRefused {
    /// The room does not exist, and this connection may only append to one that does
    /// (`--require-session`, the chat API; or the session was deleted).
    #[error("no such room")]
    NoRoom,
    /// It would have created the room, and the client's room-creation budget is spent.
    #[error("room creation budget spent")]
    NewRoomLimited,
    #[error("append failed")]
    Store(#[from] StoreError),
}

impl AppendRefused {
    /// What the client is told (logged and counted here).
    pub(super) fn client_error(&self, sid: &str) -> ClientError {
        let error = match self {
            AppendRefused::NoRoom => ClientError::no_session(sid),
            AppendRefused::NewRoomLimited => {
                tracing::debug!(room = %sid, "room creation refused: budget spent");
                ClientError::room_creation_limited()
            }
            AppendRefused::Store(err) => {
                tracing::warn!(room = %sid, cause = %err, "append failed");
                ClientError::store_unavailable()
            }
        };
        crate::metrics::error(error.code.as_str());
        error
    }
}

/// The first try of an append, queued when called: to the room if it exists (`None` if not).
type Queued = Pin<Box<dyn Future<Output = Result<Option<Appended>, StoreError>> + Send>>;

/// Finishes an append whose first try went to the room if it exists: `first` when that stored
/// it; else refused when the room must exist, or else appended creating the room, paid from the
/// client's room-creation budget. (One more round trip, only for new rooms.)
#[allow(clippy::too_many_arguments, reason = "one append, spelled out")]
pub(super) async fn or_create(
    first: Option<Appended>,
    must_exist: bool,
    store: &Store,
    creations: &Buckets<ClientKey>,
    client: &ClientKey,
    sid: &str,
    role: &str,
    event: &'static str,
    body: &str,
    dedup: Option<(&str, &str)>,
) -> Result<Appended, AppendRefused> {
    match first {
        Some(appended) => Ok(appended),
        None if must_exist => Err(AppendRefused::NoRoom),
        None if !creations.try_take(client) => Err(AppendRefused::NewRoomLimited),
        None => Ok(store.append(sid, role, event, body, dedup).await?),
    }
}

/// Whose an envelope is for idempotence: the token's subject, else the role.
fn dedup_pair<'a>(
    sender: Option<&'a str>,
    envelope: &'a StoreEnvelope,
) -> Option<(&'a str, &'a str)> {
    let sender = sender.unwrap_or(envelope.role.as_str());
    envelope.cid.as_deref().map(|c| (sender, c))
}

/// An envelope on its way into its room's stream, with what its append needs (idempotent on
/// the sender's `cid`; the sender is the token's subject, else the role).
///
/// The common case — the room exists and there is nothing to signal — awaits only the queued
/// append: the future each frame keeps in flight stays small (it was 5.7 KiB, allocated and
/// moved per frame, with every rare step inline), and the rare steps are boxed apart when they
/// happen.
pub(super) struct StoreJob {
    pub(super) store: Store,
    pub(super) creations: Buckets<ClientKey>,
    pub(super) client: ClientKey,
    pub(super) sid: String,
    pub(super) sender: Option<String>,
    pub(super) envelope: StoreEnvelope,
    /// Only to a room that exists; otherwise a new room is paid from the client's
    /// room-creation budget.
    pub(super) existing: bool,
}

impl StoreJob {
    /// Queues the append to the room if it exists, now.
    pub(super) fn queue(&self) -> Queued {
        let envelope = &self.envelope;
        Box::pin(self.store.append_existing(
            &self.sid,
            envelope.role.as_str(),
            envelope.event,
            envelope.body.as_str(),
            dedup_pair(self.sender.as_deref(), envelope),
        ))
    }

    /// Whether a stored append still has something to tell the LLM workers: a cancel, or (on
    /// a cluster, where they do not follow every room) a request.
    fn signals(&self) -> bool {
        self.envelope.cancels.is_some() || (self.store.is_clustered() && asks_llm(&self.envelope))
    }

    pub(super) async fn finish(self, queued: Queued) -> Result<Submitted, Refused> {
        match queued.await {
            Ok(Some(appended)) if !self.signals() => Ok(self.stored(appended)),
            first => Box::pin(self.finish_rare(first)).await,
        }
    }

    fn stored(self, appended: Appended) -> Submitted {
        Submitted::Stored {
            id: appended.id,
            cid: self.envelope.cid,
            duplicate: appended.duplicate,
        }
    }

    /// A room to create (or refuse), a cancel or a wake-up to send.
    async fn finish_rare(
        self,
        first: Result<Option<Appended>, StoreError>,
    ) -> Result<Submitted, Refused> {
        let done = async {
            let envelope = &self.envelope;
            let appended = or_create(
                first?,
                self.existing,
                &self.store,
                &self.creations,
                &self.client,
                &self.sid,
                envelope.role.as_str(),
                envelope.event,
                envelope.body.as_str(),
                dedup_pair(self.sender.as_deref(), envelope),
            )
            .await?;
            let (store, sid) = (&self.store, self.sid.as_str());
            if store.is_clustered() && asks_llm(&self.envelope) {
                if let Err(err) = store.wake_llm(sid).await {
                    tracing::debug!(room = %sid, cause = %err, "LLM wake-up not sent; a worker polls");
                }
            }
            if let Some(turn) = self.envelope.cancels {
                if let Err(err) = store.signal_cancel(sid, turn).await {
                    tracing::warn!(room = %sid, cause = %err, "cancel stored but not signalled");
                }
            }
            Ok::<_, AppendRefused>(appended)
        }
        .await;
        match done {
            Ok(appended) => Ok(self.stored(appended)),
            Err(refused) => Err(Refused::new(
                refused.client_error(&self.sid),
                self.envelope.cid,
            )),
        }
    }

    /// A cancel: only who asked for the turn may send it (`--llm-cancel requester`).
    pub(super) async fn check_cancel_then_store(self) -> Result<Submitted, Refused> {
        if let Some(turn) = self.envelope.cancels {
            let who = Speaker {
                role: &self.envelope.role,
                sub: self.sender.as_deref(),
            };
            match may_cancel(&self.store, &self.sid, turn, who).await {
                Ok(None) => {}
                Ok(Some(error)) => {
                    crate::metrics::error(error.code.as_str());
                    return Err(Refused::new(error, self.envelope.cid));
                }
                Err(err) => {
                    tracing::warn!(room = %self.sid, cause = %err, "cannot check who may cancel");
                    crate::metrics::error(ErrorCode::StoreUnavailable.as_str());
                    return Err(Refused::new(
                        ClientError::store_unavailable(),
                        self.envelope.cid,
                    ));
                }
            }
        }
        let queued = self.queue();
        self.finish(queued).await
    }
}
