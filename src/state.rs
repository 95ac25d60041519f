//! State shared by every request and session of one relay, built once by [`crate::relay::run`].
//!
//! Its own module so dependencies point one way: `ws` and `http` read it, `relay` builds it,
//! and neither side imports the other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::dialect::DialectArgs;
use crate::ingress::{Ingress, Refused, Submission, Submitted};
use crate::limits::MemberSlots;
use crate::protocol::{ClientError, ErrorCode, Limits, StreamId};
use crate::room::{ConnId, CursorEnd, Presence, Rooms, TurnReader};
use crate::store::Store;

/// Per-connection settings every session reads.
#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    pub(crate) limits: Limits,
    pub(crate) outbound_queue: usize,
    pub(crate) send_window: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) write_timeout: Duration,
}

/// What the sessions and chat API need from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct ApiSettings {
    /// `--require-session`: joins, publishes and LLM turns only in rooms that exist.
    pub(crate) require_session: bool,
    /// `--chat-timeout-secs`: how long `POST /api/chat` waits for the reply.
    pub(crate) chat_timeout: Duration,
    /// The LLM server's API base (`--llm-base-url`), for `GET /api/health`.
    pub(crate) llm_base_url: String,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) rooms: Rooms,
    /// Who is in each room now, across nodes.
    pub(crate) presence: std::sync::Arc<Presence>,
    /// The one way in: every adapter submits through it.
    pub(crate) ingress: Ingress,
    pub(crate) auth: Authenticator,
    /// WebSockets and event streams per room and per client address (on this node).
    pub(crate) members: MemberSlots,
    pub(crate) session: SessionSettings,
    pub(crate) api: ApiSettings,
    /// The voice and evaluation dialects' settings.
    pub(crate) dialects: DialectArgs,
    /// Fires on shutdown.
    pub(crate) token: CancellationToken,
    /// Sessions and background tasks; shutdown waits for them within the grace period.
    pub(crate) tracker: TaskTracker,
    pub(crate) next_conn: AtomicU64,
    /// Distinguishes this process's connection ids in `session.join` entries and request ids.
    pub(crate) node_id: String,
}

impl Shared {
    /// A connection (or SSE stream) number unique on this node.
    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs the I/O of a submit as a task of its own: the append completes (and a request is
    /// answered in the room) even when the client that sent it goes away meanwhile.
    pub(crate) async fn submit_detached(
        &self,
        submission: Submission,
    ) -> Result<Submitted, Refused> {
        self.tracker.spawn(submission).await.unwrap_or_else(|_| {
            Err(Refused {
                error: ClientError::new(ErrorCode::Internal, "the message could not be stored"),
                cid: None,
                abusive: false,
            })
        })
    }

    /// Follows one LLM turn as a member of its room (see [`TurnReader`]).
    pub(crate) async fn follow_turn(
        &self,
        sid: &str,
        turn: StreamId,
    ) -> Result<TurnReader, CursorEnd> {
        let queue = self.session.outbound_queue;
        TurnReader::join(
            &self.rooms,
            &self.store,
            sid,
            self.next_conn_id(),
            queue,
            turn,
        )
        .await
    }
}
