//! The socket under a dialect: one writer task that alone touches the sink (the dialect's
//! frames in order, pings, the token's expiry, shutdown, the close), and a [`Link`] from which
//! the dialect reads what the client sends. Every queue is bounded: a client that reads slowly
//! makes whoever sends to it wait, until a write times out and the socket closes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::Close;
use crate::state::Shared;

/// Frames waiting for the writer.
const OUT_QUEUE: usize = 256;
/// Frames written per flush, at most.
const WRITE_BATCH: usize = 64;
/// How long the last frames of a socket (notice, close, the client's close) may take.
const CLOSING_TIMEOUT: Duration = Duration::from_secs(1);

enum Out {
    Text(String),
    Close(Close),
}

/// Frames to the client, sent in order. Cheap to clone: the tasks that follow turns hold one
/// each.
#[derive(Clone)]
pub(super) struct Outbox(mpsc::Sender<Out>);

impl Outbox {
    /// Queues a frame; `false` once the socket is gone.
    pub(super) async fn send(&self, frame: String) -> bool {
        self.0.send(Out::Text(frame)).await.is_ok()
    }
}

/// What the client sent next.
pub(super) enum Incoming {
    Text(Utf8Bytes),
    Binary,
    /// A frame above the socket's hard size cap: the socket must close (1009).
    TooBig,
    /// The client closed, the socket failed, or the writer ended (a dead peer, an expired
    /// token, shutdown).
    Gone,
}

/// The dialect's side of the socket.
pub(super) struct Link {
    pub(super) out: Outbox,
    stream: SplitStream<WebSocket>,
    /// When the peer was last heard from, in ms since `started` (read by the writer's pings).
    heard: Arc<AtomicU64>,
    started: Instant,
    /// Fires when the writer ended.
    stop: CancellationToken,
}

impl Link {
    /// The next frame the dialect handles; pings and pongs are only noted.
    pub(super) async fn next(&mut self) -> Incoming {
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => return Incoming::Gone,
                msg = self.stream.next() => msg,
            };
            let heard = self.started.elapsed().as_millis() as u64;
            match msg {
                Some(Ok(Message::Text(text))) => {
                    self.heard.store(heard, Ordering::Relaxed);
                    metrics::counter!(crate::metrics::FRAMES_IN).increment(1);
                    return Incoming::Text(text);
                }
                Some(Ok(Message::Binary(_))) => {
                    self.heard.store(heard, Ordering::Relaxed);
                    return Incoming::Binary;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    self.heard.store(heard, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(_))) | None => return Incoming::Gone,
                Some(Err(err)) => {
                    tracing::debug!(cause = %err, "read error");
                    return if crate::ws::frame_too_big(&err) {
                        Incoming::TooBig
                    } else {
                        Incoming::Gone
                    };
                }
            }
        }
    }

    /// Resolves once the writer ended: whatever the dialect awaits should give up then.
    pub(super) async fn stopped(&self) {
        self.stop.cancelled().await;
    }
}

/// Runs one dialect socket: `dialect` reads from the [`Link`] until the client leaves or the
/// socket must close, and returns the link with the close to send. `notice` is the dialect's
/// own frame announcing a close (its error frame), sent just before the close frame.
pub(super) async fn serve<D, F>(
    socket: WebSocket,
    shared: &Shared,
    expires_at_ms: Option<u64>,
    notice: impl Fn(Close) -> Option<String>,
    dialect: D,
) where
    D: FnOnce(Link) -> F,
    F: std::future::Future<Output = (Link, Close)>,
{
    let _connected = crate::metrics::Connected::open();
    let (mut sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let stop = CancellationToken::new();
    let heard = Arc::new(AtomicU64::new(0));
    let link = Link {
        out: Outbox(tx),
        stream,
        heard: heard.clone(),
        started: Instant::now(),
        stop: stop.clone(),
    };
    let writer = Writer {
        shared,
        heard,
        started: link.started,
        expires: expires_at_ms.map(deadline_from_epoch_ms),
    };
    let write = async {
        let close = writer.run(&mut sink, rx).await;
        stop.cancel();
        close
    };
    let read = async {
        let (link, close) = dialect(link).await;
        // After the dialect's last frames; fails at once when the writer has ended already.
        let _ = link.out.0.send(Out::Close(close)).await;
        link
    };
    let (close, mut link) = tokio::join!(write, read);

    if let Some(frame) = notice(close) {
        let _ = tokio::time::timeout(CLOSING_TIMEOUT, sink.send(Message::Text(frame.into()))).await;
    }
    let frame = Message::Close(Some(CloseFrame {
        code: close.code(),
        reason: Utf8Bytes::from_static(close.reason()),
    }));
    let _ = tokio::time::timeout(CLOSING_TIMEOUT, sink.send(frame)).await;
    // Read (and drop) what the client still sends until its close frame, briefly: closing a
    // socket with unread data resets it, and the client would lose our close frame.
    let _ = tokio::time::timeout(CLOSING_TIMEOUT, async {
        while let Some(Ok(msg)) = link.stream.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    tracing::info!(?close, code = close.code(), "left");
}

struct Writer<'a> {
    shared: &'a Shared,
    heard: Arc<AtomicU64>,
    started: Instant,
    expires: Option<tokio::time::Instant>,
}

impl Writer<'_> {
    /// Writes until something ends the socket; returns the close to send.
    async fn run(
        self,
        sink: &mut SplitSink<WebSocket, Message>,
        mut rx: mpsc::Receiver<Out>,
    ) -> Close {
        let settings = &self.shared.session;
        let ping_every = settings.ping_interval;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        // Far enough to never fire when the token does not expire.
        let expires = self.expires.unwrap_or_else(|| {
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)
        });
        loop {
            let msg = tokio::select! {
                biased;
                _ = self.shared.token.cancelled() => return Close::Shutdown,
                _ = tokio::time::sleep_until(expires) => return Close::TokenExpired,
                out = rx.recv() => match out {
                    Some(Out::Text(frame)) => Message::Text(frame.into()),
                    Some(Out::Close(close)) => return close,
                    None => return Close::Normal,
                },
                _ = ping.tick() => {
                    let alive = self.started.elapsed().as_millis() as u64;
                    let silent_for = alive - self.heard.load(Ordering::Relaxed).min(alive);
                    if silent_for > 3 * ping_every.as_millis() as u64 {
                        tracing::info!(silent_ms = silent_for, "peer stopped answering pings");
                        return Close::NoPong;
                    }
                    Message::Ping(Default::default())
                }
            };
            // What else is queued goes out in the same flush.
            let mut closing = None;
            let batch = async {
                sink.feed(msg).await?;
                for _ in 1..WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(Out::Text(frame)) => sink.feed(Message::Text(frame.into())).await?,
                        Ok(Out::Close(close)) => {
                            closing = Some(close);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                sink.flush().await
            };
            if !matches!(
                tokio::time::timeout(settings.write_timeout, batch).await,
                Ok(Ok(()))
            ) {
                return Close::NoPong;
            }
            if let Some(close) = closing {
                return close;
            }
        }
    }
}

/// A tokio deadline for a wall-clock time in ms since the epoch.
fn deadline_from_epoch_ms(at_ms: u64) -> tokio::time::Instant {
    let left = at_ms.saturating_sub(crate::protocol::now_ms());
    tokio::time::Instant::now() + Duration::from_millis(left)
}
