//! One client of a run: it connects, waits for the start, then sends its plan (if it is a
//! sender) while it reads and checks everything the room delivers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{watch, Semaphore, TryAcquireError};
use tokio_tungstenite::tungstenite::Message;

use crate::observe::Observed;
use crate::target::{close_reason, open_ready, Ready, Target, Ws};
use crate::Server;

/// Where the run is; every client watches it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    Connecting,
    Running(Instant),
    Stop,
}

/// Counters the coordinator polls while clients run.
#[derive(Debug, Default)]
pub struct Progress {
    pub ready: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub unique_deliveries: AtomicU64,
    pub senders_done: AtomicU64,
    /// Deliveries owed by senders that are done: their acked messages × clients in the room.
    pub expected: AtomicU64,
    pub dropped: AtomicU64,
}

/// Between one sender's write half and read half: the in-flight window and its answers.
#[derive(Debug)]
pub struct SenderLink {
    pub id: u32,
    /// The server sends no ack: the sender's own copy of a message answers it.
    pub echo_acks: bool,
    window: Semaphore,
    sent: AtomicU64,
    acked: AtomicU64,
    stalls: AtomicU64,
}

impl SenderLink {
    fn new(plan: &SenderPlan, server: Server) -> Self {
        Self {
            id: plan.id,
            echo_acks: server == Server::Reference,
            window: Semaphore::new(plan.window),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }

    /// One of this sender's messages was answered: stored (`acked`) or refused.
    pub fn answered(&self, acked: bool, progress: &Progress) {
        if acked {
            self.acked.fetch_add(1, Relaxed);
        }
        self.window.add_permits(1);
        progress.answered.fetch_add(1, Relaxed);
    }
}

/// What one sender does: how many messages, at what pace, and the frame it writes.
#[derive(Debug, Clone)]
pub struct SenderPlan {
    pub id: u32,
    pub messages: u64,
    /// Fixed-rate mode: time between this sender's messages, and its offset in the schedule.
    pub pace: Option<(Duration, Duration)>,
    pub window: usize,
    pub prefix: Arc<str>,
    pub padding: Arc<str>,
}

impl SenderPlan {
    fn frame(&self, seq: u64) -> String {
        let (prefix, id, pad) = (&self.prefix, self.id, &self.padding);
        let t = relay_tools::clock::epoch_us();
        format!(
            r#"{{"hd":{{"event":"chat.message","role":"A","cid":"{prefix}.{id}.{seq}"}},"bd":{{"text":"{pad}","seq":{seq},"sender":{id},"t":{t}}}}}"#
        )
    }

    fn due(&self, start: Instant, seq: u64) -> Option<Instant> {
        let (interval, offset) = self.pace?;
        Some(start + offset + interval.mul_f64(seq as f64))
    }
}

/// Which room a client is in and whether (and how) it sends.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub room: usize,
    /// The relay node it connects to (index into `--url`).
    pub node: usize,
    /// Global client number, `room * clients + index`; a sender's id is its client number.
    pub client: u32,
    pub sid: String,
    pub plan: Option<SenderPlan>,
}

/// Reads frames until the run stops or the connection ends.
async fn read_loop(
    stream: &mut SplitStream<Ws>,
    phase: &mut watch::Receiver<Phase>,
    mut seen: Observed,
    link: Option<&SenderLink>,
    progress: &Progress,
) -> Observed {
    loop {
        tokio::select! {
            biased;
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => seen.on_text(&text, link, progress),
                Some(Ok(Message::Close(close))) => {
                    seen.dropped = Some(close_reason(close));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    seen.dropped = Some(format!("read error: {e}"));
                    break;
                }
                None => {
                    seen.dropped = Some("connection ended".into());
                    break;
                }
            },
            _ = phase.wait_for(|p| *p == Phase::Stop) => break,
        }
    }
    if seen.dropped.is_some() {
        progress.dropped.fetch_add(1, Relaxed);
        // A sender waiting for answers on a dead connection would wait forever.
        if let Some(link) = link {
            link.window.close();
        }
    }
    seen
}

/// Writes the plan's messages, batching writes while the window has room, then waits until
/// every message is answered (ack or error).
async fn send_loop(
    sink: &mut SplitSink<Ws, Message>,
    plan: &SenderPlan,
    link: &SenderLink,
    start: Instant,
    progress: &Progress,
) -> Result<()> {
    for seq in 0..plan.messages {
        if let Some(due) = plan.due(start, seq) {
            if due > Instant::now() {
                sink.flush().await?;
                tokio::time::sleep_until(due.into()).await;
            }
        }
        match link.window.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => {
                // Flush before waiting: the answers we wait for need these frames sent.
                sink.flush().await?;
                link.stalls.fetch_add(1, Relaxed);
                link.window.acquire().await?.forget();
            }
            Err(TryAcquireError::Closed) => bail!("connection dropped"),
        }
        sink.feed(Message::text(plan.frame(seq))).await?;
        link.sent.fetch_add(1, Relaxed);
        progress.sent.fetch_add(1, Relaxed);
    }
    sink.flush().await?;
    // Every permit back = every message answered.
    link.window.acquire_many(plan.window as u32).await?.forget();
    Ok(())
}

#[derive(Debug)]
pub struct ClientReport {
    pub room: usize,
    pub node: usize,
    pub client: u32,
    pub sender: Option<u32>,
    pub failure: Option<anyhow::Error>,
    pub seen: Observed,
    pub sent: u64,
    pub acked: u64,
    pub stalls: u64,
}

/// Waits for the start, reading meanwhile so other clients' joins do not pile up in the relay's
/// outbound queue. Frames go through `seen` all the same: when the start is announced, another
/// client may send at once, and `select!` may read that message before it sees the new phase.
async fn wait_start(
    ws: &mut Ws,
    phase: &mut watch::Receiver<Phase>,
    seen: &mut Observed,
    progress: &Progress,
) -> Result<Option<Instant>> {
    loop {
        tokio::select! {
            biased;
            changed = phase.wait_for(|p| *p != Phase::Connecting) => {
                return Ok(match *changed? {
                    Phase::Running(start) => Some(start),
                    _ => None,
                });
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(close))) => bail!("closed before start: {}", close_reason(close)),
                Some(Ok(Message::Text(text))) => seen.on_text(&text, None, progress),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("read error before start: {e}"),
                None => bail!("connection ended before start"),
            },
        }
    }
}

pub async fn client(
    target: Arc<Target>,
    spec: ClientSpec,
    room_clients: u64,
    gate: Arc<Semaphore>,
    mut phase: watch::Receiver<Phase>,
    progress: Arc<Progress>,
) -> ClientReport {
    let mut report = ClientReport {
        room: spec.room,
        node: spec.node,
        client: spec.client,
        sender: spec.plan.as_ref().map(|p| p.id),
        failure: None,
        seen: Observed::default(),
        sent: 0,
        acked: 0,
        stalls: 0,
    };
    let ready = Ready::for_traffic(target.server);
    let probe = format!("{}.probe.{}", spec.sid, spec.client);
    let opened = match gate.acquire().await {
        Ok(_permit) => open_ready(&target, None, &spec.sid, None, ready, &probe).await,
        Err(e) => Err(e.into()),
    };
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            progress.failed.fetch_add(1, Relaxed);
            report.failure = Some(e);
            return report;
        }
    };
    progress.ready.fetch_add(1, Relaxed);
    let mut seen = Observed::default();
    let start = match wait_start(&mut ws, &mut phase, &mut seen, &progress).await {
        Ok(Some(start)) => start,
        Ok(None) => return report, // aborted before the start
        Err(e) => {
            progress.dropped.fetch_add(1, Relaxed);
            report.seen.dropped = Some(format!("{e:#}"));
            return report;
        }
    };

    let link = spec
        .plan
        .as_ref()
        .map(|p| SenderLink::new(p, target.server));
    let (mut sink, mut stream) = ws.split();
    let mut stop = phase.clone();
    let mut send_error = None;
    let sending = async {
        let (Some(plan), Some(link)) = (&spec.plan, &link) else {
            return;
        };
        tokio::select! {
            sent = send_loop(&mut sink, plan, link, start, &progress) => {
                send_error = sent.err().map(|e| format!("send failed: {e:#}"));
            }
            _ = stop.wait_for(|p| *p == Phase::Stop) => {}
        }
        // Done (or given up): what it owes the room is now known.
        let acked = link.acked.load(Relaxed);
        progress.expected.fetch_add(acked * room_clients, Relaxed);
        progress.senders_done.fetch_add(1, Relaxed);
    };
    let reading = read_loop(&mut stream, &mut phase, seen, link.as_ref(), &progress);
    let ((), seen) = tokio::join!(sending, reading);

    report.seen = seen;
    // A failed write counts as a dropped connection, unless the read side already saw it go.
    if report.seen.dropped.is_none() && send_error.is_some() {
        progress.dropped.fetch_add(1, Relaxed);
        report.seen.dropped = send_error;
    }
    if let Some(link) = &link {
        report.sent = link.sent.load(Relaxed);
        report.acked = link.acked.load(Relaxed);
        report.stalls = link.stalls.load(Relaxed);
    }
    if let Ok(mut ws) = sink.reunite(stream) {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    report
}
