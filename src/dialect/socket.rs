//! The socket under a dialect: one writer task that alone touches the sink (the dialect's
//! frames in order, pings, the token's expiry, shutdown, the close), and a [`Link`] from which
//! the dialect reads what the client sends. Every queue is bounded: a client that reads slowly
//! makes whoever sends to it wait, until a write times out and the socket closes.

use crate::ws::heartbeat::{Heard, Heartbeat};
use std::time::Duration;

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
    /// When the peer was last heard from (read by the writer's heartbeat).
    heard: Heard,
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
            match msg {
                Some(Ok(Message::Text(text))) => {
                    self.heard.now();
                    crate::metrics::HOT.frames_in.increment(1);
                    return Incoming::Text(text);
                }
                Some(Ok(Message::Binary(_))) => {
                    self.heard.now();
                    return Incoming::Binary;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    self.heard.now();
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
    expires: Option<tokio::time::Instant>,
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
    let heard = Heard::new();
    let link = Link {
        out: Outbox(tx),
        stream,
        heard: heard.clone(),
        stop: stop.clone(),
    };
    let writer = Writer {
        shared,
        heartbeat: Heartbeat::new(heard, shared.session.ping_interval, expires),
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
    heartbeat: Heartbeat,
}

impl Writer<'_> {
    /// Writes until something ends the socket; returns the close to send.
    async fn run(
        mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        mut rx: mpsc::Receiver<Out>,
    ) -> Close {
        let settings = &self.shared.session;
        loop {
            let msg = tokio::select! {
                biased;
                _ = self.shared.token.cancelled() => return Close::Shutdown,
                beat = self.heartbeat.next() => match beat {
                    Ok(()) => Message::Ping(Default::default()),
                    Err(close) => return close,
                },
                out = rx.recv() => match out {
                    Some(Out::Text(frame)) => Message::Text(frame.into()),
                    Some(Out::Close(close)) => return close,
                    None => return Close::Normal,
                },
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
