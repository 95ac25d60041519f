//! `chaos`: the fault-run driver for chat-relay (run by `scripts/chaos.sh`). Loopback only.
//!
//! ```text
//! chaos drive --nodes ws://127.0.0.1:P1,ws://127.0.0.1:P2 --rooms 4 --clients 4 --duration 10
//! chaos fake-llm --port 0 --delay-ms 100 --tokens 20
//! chaos free-ports 5
//! chaos wait-http http://127.0.0.1:P1/healthz --timeout-secs 20
//! ```
//!
//! `drive` runs `--clients` clients in each of `--rooms` rooms (`chaos-<run>-<m>`), spread over
//! the nodes, alternating roles `A` and `B`. Each client is a small resilient client library:
//!
//! - it sends a `chat.message` every `--interval-ms` with a cid unique in the run
//!   (`<run>-c<client>-s<seq>`) and `bd.client`, `bd.seq`; every `--llm-every`-th message of the
//!   first `--llm-senders` clients of a room mentions `@llm`;
//! - on a disconnect or a failed connect it reconnects with `last_id` = the last stream id it
//!   received, first to its own node, then alternately to the other (a load balancer), with a
//!   backoff of 100 ms doubling to 1 s;
//! - on every (re)connect it resends every message it has no ack for, with the same cid (the
//!   relay answers the original id); a retryable error (`store_unavailable`) is retried after
//!   200 ms, and a message unanswered for `--ack-timeout-ms` on one connection is sent again.
//!
//! It records every stored entry it receives (by `hd.id`) per connection and per client. After
//! `--duration` it stops creating messages, waits (bounded) until every message is acked, until
//! every stored `@llm` turn has a final entry, and until every client has received its room's
//! stream up to the tail, then reads the streams over the relay's HTTP API and checks:
//!
//! | check | violation when |
//! |---|---|
//! | acked but missing | an acked id is not in the stream (or holds another cid) |
//! | stored twice | one cid is stored as two entries |
//! | cid conflict | two acks for one cid name different ids |
//! | duplicates | a client received one id twice (in one connection or across a resume) |
//! | order | a client received an id lower than one it had already received |
//! | gaps | a stored entry after the client's first received id (up to the tail) was never received |
//! | phantom | a client received an id that is not in the stream |
//! | resume_gap | the relay sent a `resume_gap` frame (with AOF `always` nothing may be lost) |
//! | LLM exactly once | a stored `@llm` message has zero or several `llm.response`/`llm.error` entries |
//! | liveness | a message never acked, refused for good, or a client that never caught up |
//!
//! Output: a readable summary on stdout, then one JSON line (`{"chaos": ...}`). Exit code 0 when
//! every check passed, 1 on a violation, 2 when the run could not start (usage, no relay).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

/// Largest page of the HTTP history API.
const PAGE: usize = 1000;
/// Longest wait for one WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A retryable refusal is retried after this long.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Samples kept per kind of violation.
const SAMPLES: usize = 10;

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Fault-run driver and checker for chat-relay (loopback only; see scripts/chaos.sh)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Clients in rooms across relay nodes, reconnecting and resending; checks at the end.
    Drive(DriveArgs),
    /// An OpenAI-compatible streaming server that answers every completion slowly.
    FakeLlm(FakeLlmArgs),
    /// Print N free loopback TCP ports, one a line.
    FreePorts {
        #[arg(default_value_t = 1)]
        n: usize,
    },
    /// Wait until an HTTP URL answers 2xx (exit 1 after the timeout).
    WaitHttp {
        url: String,
        #[arg(long, default_value_t = 20.0)]
        timeout_secs: f64,
    },
}

#[derive(Debug, Clone, Args)]
struct DriveArgs {
    /// Relay nodes, `ws://127.0.0.1:PORT`, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Redis URL (optional): used only to report the LLM group's pending entries at the end.
    #[arg(long, conflicts_with = "redis_cluster")]
    redis: Option<String>,
    /// Redis Cluster seeds, `HOST:PORT`, comma-separated (optional, instead of `--redis`): the
    /// pending entries are read with `redis-cli -c`, which follows each room's slot.
    #[arg(long, value_delimiter = ',')]
    redis_cluster: Vec<String>,
    /// Run id: part of room names and cids (default: the current time).
    #[arg(long)]
    run: Option<String>,
    /// Rooms.
    #[arg(long, default_value_t = 4)]
    rooms: usize,
    /// Clients per room (roles alternate A, B; nodes alternate).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Each client sends one message per interval while connected, ms.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Every K-th message of an LLM sender mentions `@llm` (0: never).
    #[arg(long, default_value_t = 20)]
    llm_every: u64,
    /// LLM senders per room (the first clients of each room).
    #[arg(long, default_value_t = 1)]
    llm_senders: usize,
    /// Resend a message unanswered this long on one connection, ms.
    #[arg(long, default_value_t = 3000)]
    ack_timeout_ms: u64,
    /// Longest wait for every client's first connection, s.
    #[arg(long, default_value_t = 20.0)]
    join_wait: f64,
    /// After sending: longest wait until every message is acked, s.
    #[arg(long, default_value_t = 20.0)]
    ack_wait: f64,
    /// Then: longest wait until every `@llm` turn has its final entry, s.
    #[arg(long, default_value_t = 30.0)]
    llm_wait: f64,
    /// Then: longest wait until every client received its room up to the tail, s.
    #[arg(long, default_value_t = 15.0)]
    drain_wait: f64,
    /// Bound on the whole drive, s.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Written (with the epoch ms) when every client is connected and sending starts.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Progress line period on stderr, s (0: none).
    #[arg(long, default_value_t = 1.0)]
    progress: f64,
}

#[derive(Debug, Clone, Args)]
struct FakeLlmArgs {
    /// Port on 127.0.0.1 (0: any; the address is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Delay before each token, ms.
    #[arg(long, default_value_t = 100)]
    delay_ms: u64,
    /// Tokens per answer.
    #[arg(long, default_value_t = 20)]
    tokens: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("chaos: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Drive(args) => drive(args).await,
            Cmd::FakeLlm(args) => fake_llm(args).await.map(|()| ExitCode::SUCCESS),
            Cmd::FreePorts { n } => free_ports(n).map(|()| ExitCode::SUCCESS),
            Cmd::WaitHttp { url, timeout_secs } => wait_http(&url, timeout_secs).await,
        }
    });
    match res {
        Ok(code) => code,
        Err(err) => {
            eprintln!("chaos: {err:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A Redis stream id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
struct Sid {
    ms: u64,
    seq: u64,
}

impl FromStr for Sid {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Ok(Sid {
            ms: ms.parse().context("stream id ms")?,
            seq: seq.parse().context("stream id seq")?,
        })
    }
}

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// `ws://HOST:PORT` or `http://HOST:PORT` with a loopback host → the socket address.
fn loopback_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .or_else(|| url.strip_prefix("redis://"))
        .with_context(|| format!("{url}: expected ws://, http:// or redis://"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{url}: expected an IP address and port"))?;
    let ip: IpAddr = addr.ip();
    if !ip.is_loopback() {
        bail!("{url}: chaos runs on loopback only");
    }
    Ok(addr)
}

fn free_ports(n: usize) -> Result<()> {
    if n == 0 || n > 64 {
        bail!("free-ports: 1 to 64");
    }
    // All bound at once so they differ; released on return.
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let mut out = std::io::stdout().lock();
    for l in &listeners {
        writeln!(out, "{}", l.local_addr()?.port())?;
    }
    Ok(())
}

async fn wait_http(url: &str, timeout_secs: f64) -> Result<ExitCode> {
    loopback_addr(url)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + secs(timeout_secs);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(ExitCode::SUCCESS);
            }
        }
        if Instant::now() >= deadline {
            eprintln!("chaos: {url} did not answer within {timeout_secs}s");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// fake-llm: an OpenAI-compatible Chat Completions server that streams slowly
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct FakeCfg {
    delay: Duration,
    tokens: usize,
}

async fn fake_llm(args: FakeLlmArgs) -> Result<()> {
    let cfg = Arc::new(FakeCfg {
        delay: Duration::from_millis(args.delay_ms),
        tokens: args.tokens.max(1),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(complete))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(cfg);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{}", args.port))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "fake-llm listening on {addr}")?;
        out.flush()?;
    }
    axum::serve(listener, app).await?;
    Ok(())
}

fn chunk(delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-chaos", "object": "chat.completion.chunk", "created": 1, "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {v}\n\n"))
}

async fn complete(State(cfg): State<Arc<FakeCfg>>, Json(req): Json<Value>) -> Response {
    let include_usage = req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    let prompt_tokens = req["messages"]
        .as_array()
        .map_or(0, |m| m.len() as u64 * 10);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(8);
    let cfg = cfg.as_ref().clone();
    tokio::spawn(async move {
        let _ = tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": null}),
                None,
            )))
            .await;
        for i in 0..cfg.tokens {
            tokio::time::sleep(cfg.delay).await;
            let t = format!("tok{i} ");
            if tx
                .send(Ok(chunk(json!({"content": t}), None)))
                .await
                .is_err()
            {
                return; // the worker hung up (cancelled or killed)
            }
        }
        let _ = tx.send(Ok(chunk(json!({}), Some("stop")))).await;
        if include_usage {
            let n = cfg.tokens as u64;
            let usage = json!({"id": "chatcmpl-chaos", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}});
            let _ = tx.send(Ok(Bytes::from(format!("data: {usage}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

// ---------------------------------------------------------------------------------------------
// drive: the clients
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connect every client; nothing is sent yet.
    Connect,
    /// Create and send messages.
    Send,
    /// No new messages; keep resending what is unacked and keep receiving.
    Drain,
    /// Close every connection.
    Stop,
}

#[derive(Debug)]
struct Ctx {
    args: DriveArgs,
    run: String,
    /// When the driver started (all reported times are relative to it).
    t0: Instant,
}

impl Ctx {
    fn t(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// A message the client created, waiting for its ack.
#[derive(Debug)]
struct Pending {
    cid: String,
    frame: String,
    /// Transmissions so far.
    sends: u32,
    /// When and on which connection it was last sent.
    sent_at: Option<Instant>,
    sent_conn: u64,
    /// A retryable refusal: send again at this time (on the current connection).
    retry_at: Option<Instant>,
    /// Epoch ms when the first transmission, alone in flight, was answered `store_unavailable`.
    unavailable_at: Option<u128>,
}

/// One connection's life, for the report.
#[derive(Debug, Clone, Default)]
struct ConnRecord {
    no: u64,
    node: usize,
    resume_from: Option<Sid>,
    t_start: f64,
    t_end: Option<f64>,
    first: Option<Sid>,
    last: Option<Sid>,
    delivered: u64,
    end: String,
}

#[derive(Debug, Default)]
struct ClientState {
    idx: usize,
    room: usize,
    sid: String,
    role: &'static str,
    home: usize,
    llm_sender: bool,

    // Sending.
    next_seq: u64,
    unacked: BTreeMap<u64, Pending>,
    acked: BTreeMap<u64, Sid>,
    llm_seqs: HashSet<u64>,
    rejected: Vec<(u64, String)>,
    transmissions: u64,
    resent: u64,
    dup_acks: u64,
    cid_conflicts: Vec<String>,
    /// Refused with `store_unavailable` ("nothing was stored") yet stored by that transmission.
    unavailable_but_stored: Vec<String>,

    // Receiving.
    seen: HashSet<Sid>,
    first: Option<Sid>,
    last: Option<Sid>,
    delivered: u64,
    events: BTreeMap<String, u64>,
    dup_in_conn: Vec<(u64, Sid)>,
    dup_across: Vec<(u64, Sid)>,
    order: Vec<(u64, Sid, Sid)>,
    resume_gaps: Vec<Value>,
    errors: BTreeMap<String, u64>,
    llm_starts: u64,
    llm_deltas: u64,
    bad_frames: u64,

    // Connections.
    connected: bool,
    connects: u64,
    connect_failures: u64,
    refusals: BTreeMap<String, u64>,
    conns: Vec<ConnRecord>,
    cur: Option<ConnRecord>,
}

impl ClientState {
    fn cid(run: &str, idx: usize, seq: u64) -> String {
        format!("{run}-c{idx}-s{seq}")
    }

    /// A new message: its frame, kept for resends.
    fn create(&mut self, ctx: &Ctx) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        let cid = Self::cid(&ctx.run, self.idx, seq);
        let llm = self.llm_sender && ctx.args.llm_every > 0 && seq % ctx.args.llm_every == 0;
        let text = if llm {
            format!(
                "@llm chaos {} client {} seq {seq}: please answer",
                ctx.run, self.idx
            )
        } else {
            format!("chaos {} client {} seq {seq}", ctx.run, self.idx)
        };
        if llm {
            self.llm_seqs.insert(seq);
        }
        let frame = json!({
            "hd": {"event": "chat.message", "role": self.role, "cid": cid},
            "bd": {"text": text, "client": self.idx, "seq": seq},
        })
        .to_string();
        self.unacked.insert(
            seq,
            Pending {
                cid,
                frame,
                sends: 0,
                sent_at: None,
                sent_conn: 0,
                retry_at: None,
                unavailable_at: None,
            },
        );
        seq
    }

    /// Marks a message as sent now on connection `conn`; returns its frame.
    fn mark_sent(&mut self, seq: u64, conn: u64) -> Option<String> {
        let p = self.unacked.get_mut(&seq)?;
        if p.sends > 0 {
            self.resent += 1;
        }
        p.sends += 1;
        p.sent_at = Some(Instant::now());
        p.sent_conn = conn;
        p.retry_at = None;
        self.transmissions += 1;
        Some(p.frame.clone())
    }

    fn seq_of(&self, run: &str, cid: &str) -> Option<u64> {
        let prefix = format!("{run}-c{}-s", self.idx);
        cid.strip_prefix(&prefix)?.parse().ok()
    }

    /// One text frame from the relay.
    fn on_frame(&mut self, ctx: &Ctx, conn: u64, conn_seen: &mut HashSet<Sid>, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.bad_frames += 1;
            return;
        };
        let hd = &v["hd"];
        let event = hd["event"].as_str().unwrap_or("").to_owned();
        if event == "chat.ack" {
            let cid = hd["cid"].as_str().unwrap_or("");
            let id = hd["id"].as_str().and_then(|s| s.parse::<Sid>().ok());
            self.on_ack(ctx, cid, id);
            return;
        }
        if let Some(raw) = hd["id"].as_str() {
            let Ok(id) = raw.parse::<Sid>() else {
                self.bad_frames += 1;
                return;
            };
            if !conn_seen.insert(id) {
                if self.dup_in_conn.len() < SAMPLES * 10 {
                    self.dup_in_conn.push((conn, id));
                }
                return;
            }
            if self.seen.contains(&id) {
                if self.dup_across.len() < SAMPLES * 10 {
                    self.dup_across.push((conn, id));
                }
                return;
            }
            if let Some(last) = self.last {
                if id < last && self.order.len() < SAMPLES * 10 {
                    self.order.push((conn, last, id));
                }
            }
            self.seen.insert(id);
            self.first.get_or_insert(id);
            self.last = Some(self.last.map_or(id, |l| l.max(id)));
            self.delivered += 1;
            *self.events.entry(event).or_default() += 1;
            if let Some(cur) = self.cur.as_mut() {
                cur.first.get_or_insert(id);
                cur.last = Some(id);
                cur.delivered += 1;
            }
            return;
        }
        match event.as_str() {
            "error" => {
                let code = hd["code"].as_str().unwrap_or("?").to_owned();
                *self.errors.entry(code.clone()).or_default() += 1;
                let retryable = v["bd"]["retryable"].as_bool().unwrap_or(false);
                let seq = hd["cid"].as_str().and_then(|c| self.seq_of(&ctx.run, c));
                if let Some(seq) = seq {
                    if retryable || code == "store_unavailable" {
                        if let Some(p) = self.unacked.get_mut(&seq) {
                            p.retry_at = Some(Instant::now() + RETRY_AFTER);
                            if code == "store_unavailable" && p.sends == 1 {
                                p.unavailable_at.get_or_insert(epoch_ms());
                            }
                        }
                    } else if self.unacked.remove(&seq).is_some() {
                        self.rejected.push((seq, code));
                    }
                }
            }
            "resume_gap" => self.resume_gaps.push(v.clone()),
            "llm.start" => self.llm_starts += 1,
            "llm.delta" => self.llm_deltas += 1,
            _ => {}
        }
    }

    fn on_ack(&mut self, ctx: &Ctx, cid: &str, id: Option<Sid>) {
        let (Some(seq), Some(id)) = (self.seq_of(&ctx.run, cid), id) else {
            *self.errors.entry("bad_ack".into()).or_default() += 1;
            return;
        };
        if let Some(p) = self.unacked.remove(&seq) {
            // The entry's id is Redis's clock at the XADD (same host): older than the refusal
            // means the refused transmission itself was stored.
            if let Some(at) = p.unavailable_at {
                if u128::from(id.ms) < at {
                    self.unavailable_but_stored.push(format!(
                        "{cid}: store_unavailable at {at} ms, stored as {id}"
                    ));
                }
            }
            self.acked.insert(seq, id);
        } else if let Some(prev) = self.acked.get(&seq) {
            if *prev == id {
                self.dup_acks += 1;
            } else {
                self.cid_conflicts
                    .push(format!("{cid}: acked as {prev} and as {id}"));
            }
        } else {
            // An ack for a message refused for good earlier: it was stored after all.
            *self.errors.entry("ack_after_refusal".into()).or_default() += 1;
            self.acked.insert(seq, id);
        }
    }
}

type Shared = Arc<Mutex<ClientState>>;

/// How one connection ended.
#[derive(Debug, PartialEq, Eq)]
enum ConnEnd {
    Stopped,
    Closed(String),
}

async fn client_task(ctx: Arc<Ctx>, st: Shared, mut phase: watch::Receiver<Phase>) {
    let nodes = ctx.args.nodes.len();
    let (home, sid, role) = {
        let s = lock(&st);
        (s.home, s.sid.clone(), s.role)
    };
    let mut attempt: usize = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *phase.borrow() == Phase::Stop {
            return;
        }
        let node = (home + attempt) % nodes;
        let last = lock(&st).last;
        let mut url = format!(
            "{}/v1/session/chat?sid={sid}&role={role}",
            ctx.args.nodes[node].trim_end_matches('/')
        );
        if let Some(last) = last {
            url.push_str(&format!("&last_id={last}"));
        }
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await;
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            other => {
                let why = match other {
                    Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                        format!("http {}", resp.status().as_u16())
                    }
                    Ok(Err(e)) => short_error(&e.to_string()),
                    Err(_) => "connect timeout".to_owned(),
                    Ok(Ok(_)) => "?".to_owned(),
                };
                {
                    let mut s = lock(&st);
                    s.connect_failures += 1;
                    *s.refusals.entry(why).or_default() += 1;
                }
                attempt += 1;
                if wait_or_stop(&mut phase, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let started = Instant::now();
        let end = connection(&ctx, &st, ws, node, last, &mut phase).await;
        if end == ConnEnd::Stopped {
            return;
        }
        if started.elapsed() >= Duration::from_secs(1) {
            // It worked for a while: reconnect at once, to its own node first.
            attempt = 0;
            backoff = Duration::from_millis(100);
        } else {
            // Refused at once (e.g. store unavailable at join): back off, try the other node.
            attempt += 1;
            if wait_or_stop(&mut phase, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn short_error(s: &str) -> String {
    if s.contains("Connection refused") {
        "connection refused".into()
    } else if s.contains("reset") {
        "connection reset".into()
    } else {
        s.chars().take(60).collect()
    }
}

/// Sleeps `d`; `true` when the phase became `Stop` meanwhile.
async fn wait_or_stop(phase: &mut watch::Receiver<Phase>, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        if *phase.borrow() == Phase::Stop {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            changed = phase.changed() => if changed.is_err() { return true },
        }
    }
}

async fn connection<S>(
    ctx: &Ctx,
    st: &Shared,
    ws: tokio_tungstenite::WebSocketStream<S>,
    node: usize,
    resume_from: Option<Sid>,
    phase: &mut watch::Receiver<Phase>,
) -> ConnEnd
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let conn = {
        let mut s = lock(st);
        s.connects += 1;
        s.connected = true;
        s.cur = Some(ConnRecord {
            no: s.connects,
            node,
            resume_from,
            t_start: ctx.t(),
            ..Default::default()
        });
        s.connects
    };
    let end = run_connection(ctx, st, &mut sink, &mut stream, conn, phase).await;
    {
        let mut s = lock(st);
        s.connected = false;
        if let Some(mut rec) = s.cur.take() {
            rec.t_end = Some(ctx.t());
            rec.end = match &end {
                ConnEnd::Stopped => "stopped".into(),
                ConnEnd::Closed(why) => why.clone(),
            };
            s.conns.push(rec);
        }
    }
    end
}

async fn run_connection<Si, St>(
    ctx: &Ctx,
    st: &Shared,
    sink: &mut Si,
    stream: &mut St,
    conn: u64,
    phase: &mut watch::Receiver<Phase>,
) -> ConnEnd
where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut conn_seen: HashSet<Sid> = HashSet::new();
    // Resend everything unacked, same cids: the relay answers the original id if it was stored.
    let frames: Vec<String> = {
        let mut s = lock(st);
        let seqs: Vec<u64> = s.unacked.keys().copied().collect();
        seqs.into_iter()
            .filter_map(|q| s.mark_sent(q, conn))
            .collect()
    };
    for f in frames {
        if let Err(e) = sink.send(Message::Text(f.into())).await {
            return ConnEnd::Closed(format!("send: {}", short_error(&e.to_string())));
        }
    }
    let interval = Duration::from_millis(ctx.args.interval_ms.max(1));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut retry = tokio::time::interval(Duration::from_millis(100));
    retry.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let ack_timeout = Duration::from_millis(ctx.args.ack_timeout_ms.max(100));
    loop {
        let current = *phase.borrow();
        if current == Phase::Stop {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
            return ConnEnd::Stopped;
        }
        let sending = current == Phase::Send;
        let out: Vec<String> = tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let mut s = lock(st);
                    s.on_frame(ctx, conn, &mut conn_seen, text.as_str());
                    continue;
                }
                Some(Ok(Message::Close(cf))) => {
                    let why = cf.map_or_else(|| "close".to_owned(), |c| format!("close {} {}", u16::from(c.code), c.reason));
                    return ConnEnd::Closed(why);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return ConnEnd::Closed(format!("read: {}", short_error(&e.to_string()))),
                None => return ConnEnd::Closed("eof".into()),
            },
            _ = tick.tick(), if sending => {
                let mut s = lock(st);
                let seq = s.create(ctx);
                s.mark_sent(seq, conn).into_iter().collect()
            }
            _ = retry.tick() => {
                let now = Instant::now();
                let mut s = lock(st);
                let due: Vec<u64> = s
                    .unacked
                    .iter()
                    .filter(|(_, p)| match p.retry_at {
                        Some(t) => t <= now,
                        None => {
                            p.sent_conn != conn
                                || p.sent_at.is_none_or(|t| now.duration_since(t) >= ack_timeout)
                        }
                    })
                    .map(|(q, _)| *q)
                    .collect();
                due.into_iter().filter_map(|q| s.mark_sent(q, conn)).collect()
            }
            _ = phase.changed() => continue,
        };
        for f in out {
            if let Err(e) = sink.send(Message::Text(f.into())).await {
                return ConnEnd::Closed(format!("send: {}", short_error(&e.to_string())));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// drive: reading the streams back over HTTP
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct StoredEntry {
    id: Sid,
    event: String,
    cid: Option<String>,
    turn_id: Option<Sid>,
    mentions_llm: bool,
    code: Option<String>,
    reason: Option<String>,
}

#[derive(Debug, Default)]
struct Mirror {
    entries: Vec<StoredEntry>,
    ids: HashMap<Sid, usize>,
    cursor: Option<Sid>,
}

impl Mirror {
    fn tail(&self) -> Option<Sid> {
        self.entries.last().map(|e| e.id)
    }
}

struct Reader {
    http: reqwest::Client,
    bases: Vec<String>,
    /// The base that answered last.
    prefer: usize,
}

impl Reader {
    fn new(nodes: &[String]) -> Result<Reader> {
        Ok(Reader {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            bases: nodes
                .iter()
                .map(|n| n.trim_end_matches('/').replacen("ws://", "http://", 1))
                .collect(),
            prefer: 0,
        })
    }

    async fn page(&mut self, sid: &str, after: Option<Sid>) -> Result<Vec<Value>> {
        let after = after.map_or_else(|| "0".to_owned(), |a| a.to_string());
        let mut last_err = None;
        for k in 0..self.bases.len() {
            let i = (self.prefer + k) % self.bases.len();
            let url = format!(
                "{}/v1/sessions/{sid}/messages?after={after}&limit={PAGE}",
                self.bases[i]
            );
            match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                    Ok(v) => {
                        self.prefer = i;
                        return Ok(v["messages"].as_array().cloned().unwrap_or_default());
                    }
                    Err(e) => last_err = Some(anyhow::Error::from(e)),
                },
                Ok(r) => last_err = Some(anyhow::anyhow!("{url}: HTTP {}", r.status())),
                Err(e) => last_err = Some(e.into()),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no node")))
    }

    /// Reads the room's entries after the mirror's cursor.
    async fn catch_up(&mut self, sid: &str, m: &mut Mirror) -> Result<()> {
        loop {
            let page = self.page(sid, m.cursor).await?;
            let n = page.len();
            for f in page {
                let hd = &f["hd"];
                let Some(id) = hd["id"].as_str().and_then(|s| s.parse::<Sid>().ok()) else {
                    continue;
                };
                let text = f["bd"]["text"].as_str().unwrap_or("");
                let event = hd["event"].as_str().unwrap_or("").to_owned();
                let e = StoredEntry {
                    id,
                    mentions_llm: event == "chat.message" && text.to_lowercase().contains("@llm"),
                    event,
                    cid: hd["cid"].as_str().map(str::to_owned),
                    turn_id: hd["turn_id"].as_str().and_then(|s| s.parse().ok()),
                    code: hd["code"].as_str().map(str::to_owned),
                    reason: f["bd"]["reason"].as_str().map(str::to_owned),
                };
                m.cursor = Some(id);
                m.ids.insert(id, m.entries.len());
                m.entries.push(e);
            }
            if n < PAGE {
                return Ok(());
            }
        }
    }
}

/// LLM turn bookkeeping over the mirrors: (asked turn ids per room, final entries per turn id).
/// Final entries (indexes into the room's mirror) per (room, turn id).
type Finals = HashMap<(usize, Sid), Vec<usize>>;

fn llm_turns(run: &str, mirrors: &[Mirror]) -> (Vec<Vec<Sid>>, Finals) {
    let prefix = format!("{run}-");
    let mut asked = Vec::with_capacity(mirrors.len());
    let mut finals: Finals = HashMap::new();
    for (r, m) in mirrors.iter().enumerate() {
        let mut a = Vec::new();
        for (i, e) in m.entries.iter().enumerate() {
            if e.mentions_llm && e.cid.as_deref().is_some_and(|c| c.starts_with(&prefix)) {
                a.push(e.id);
            }
            if e.event == "llm.response" || e.event == "llm.error" {
                if let Some(t) = e.turn_id {
                    finals.entry((r, t)).or_default().push(i);
                }
            }
        }
        asked.push(a);
    }
    (asked, finals)
}

// ---------------------------------------------------------------------------------------------
// drive: orchestration and the report
// ---------------------------------------------------------------------------------------------

async fn drive(args: DriveArgs) -> Result<ExitCode> {
    if args.nodes.is_empty() {
        bail!("--nodes: at least one relay");
    }
    for n in &args.nodes {
        loopback_addr(n)?;
    }
    if let Some(r) = &args.redis {
        loopback_addr(r)?;
    }
    for seed in &args.redis_cluster {
        loopback_addr(&format!("redis://{seed}"))?;
    }
    if args.rooms == 0 || args.clients == 0 || args.rooms * args.clients > 5000 {
        bail!("--rooms and --clients: at least 1, at most 5000 clients in all");
    }
    let run = args
        .run
        .clone()
        .unwrap_or_else(|| format!("r{}", epoch_ms() % 100_000_000));
    if run.is_empty() || run.len() > 40 || !run.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("--run: 1-40 ASCII letters or digits");
    }
    let overall = secs(args.timeout);
    let ctx = Arc::new(Ctx {
        args,
        run,
        t0: Instant::now(),
    });
    match tokio::time::timeout(overall, drive_inner(ctx.clone())).await {
        Ok(res) => res,
        Err(_) => {
            eprintln!(
                "chaos: the drive exceeded --timeout {}s; aborting",
                ctx.args.timeout
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn progress(ctx: &Ctx, clients: &[Shared], label: &str) {
    let (mut sent, mut acked, mut unacked, mut connected, mut connects, mut su, mut delivered) =
        (0u64, 0usize, 0usize, 0usize, 0u64, 0u64, 0u64);
    for c in clients {
        let s = lock(c);
        sent += s.next_seq;
        acked += s.acked.len();
        unacked += s.unacked.len();
        connected += usize::from(s.connected);
        connects += s.connects;
        su += s.errors.get("store_unavailable").copied().unwrap_or(0);
        delivered += s.delivered;
    }
    eprintln!(
        "[chaos t={:5.1}s {label:>7}] sent={sent} acked={acked} unacked={unacked} connected={connected}/{} connects={connects} store_unavailable={su} delivered={delivered}",
        ctx.t(),
        clients.len()
    );
}

/// Polls `done` every 100 ms (printing progress) until it holds or `limit` passes.
async fn wait_until(
    ctx: &Ctx,
    clients: &[Shared],
    label: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    let every = secs(ctx.args.progress);
    let mut next_progress = Instant::now() + every;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        if !every.is_zero() && Instant::now() >= next_progress {
            progress(ctx, clients, label);
            next_progress += every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn drive_inner(ctx: Arc<Ctx>) -> Result<ExitCode> {
    let a = &ctx.args;
    let nodes = a.nodes.len();
    let sids: Vec<String> = (0..a.rooms)
        .map(|m| format!("chaos-{}-{m}", ctx.run))
        .collect();
    eprintln!(
        "[chaos] run {}: {} rooms x {} clients over {} nodes, {}s of sending every {} ms, @llm every {}",
        ctx.run, a.rooms, a.clients, nodes, a.duration, a.interval_ms, a.llm_every
    );
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let mut clients: Vec<Shared> = Vec::new();
    let mut tasks = Vec::new();
    for idx in 0..a.rooms * a.clients {
        let room = idx / a.clients;
        let c = idx % a.clients;
        let st = Arc::new(Mutex::new(ClientState {
            idx,
            room,
            sid: sids[room].clone(),
            role: if c % 2 == 0 { "A" } else { "B" },
            home: (room + c) % nodes,
            llm_sender: c < a.llm_senders,
            ..Default::default()
        }));
        clients.push(st.clone());
        tasks.push(tokio::spawn(client_task(ctx.clone(), st, phase_rx.clone())));
    }

    // 1. Every client connected and has its first entry (its own join).
    let joined = wait_until(&ctx, &clients, "connect", secs(a.join_wait), || {
        clients.iter().all(|c| lock(c).first.is_some())
    })
    .await;
    if !joined {
        let missing = clients.iter().filter(|c| lock(c).first.is_none()).count();
        let _ = phase_tx.send(Phase::Stop);
        eprintln!(
            "chaos: {missing} clients could not join within {}s; is the relay up?",
            a.join_wait
        );
        return Ok(ExitCode::from(2));
    }
    let t_send = ctx.t();
    if let Some(path) = &a.ready_file {
        std::fs::write(path, format!("{}\n", epoch_ms()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "[chaos t={t_send:5.1}s] all {} clients joined; sending",
        clients.len()
    );
    let _ = phase_tx.send(Phase::Send);

    // 2. Send for the duration.
    let send_until = Instant::now() + secs(a.duration);
    wait_until(&ctx, &clients, "send", secs(a.duration), || {
        Instant::now() >= send_until
    })
    .await;
    let _ = phase_tx.send(Phase::Drain);
    let t_drain = ctx.t();
    eprintln!("[chaos t={t_drain:5.1}s] sending stopped; waiting for acks");

    // 3. Every message acked (the clients keep resending).
    let all_acked = wait_until(&ctx, &clients, "acks", secs(a.ack_wait), || {
        clients.iter().all(|c| lock(c).unacked.is_empty())
    })
    .await;
    let t_acked = ctx.t();
    eprintln!(
        "[chaos t={t_acked:5.1}s] {}",
        if all_acked {
            "every message acked"
        } else {
            "gave up waiting for acks"
        }
    );

    // 4. Every stored @llm message answered (read the streams over HTTP).
    let mut reader = Reader::new(&a.nodes)?;
    let mut mirrors: Vec<Mirror> = (0..a.rooms).map(|_| Mirror::default()).collect();
    let llm_deadline = Instant::now() + secs(a.llm_wait);
    let mut next_progress = Instant::now();
    let llm_done = loop {
        let mut read_ok = true;
        for (m, sid) in mirrors.iter_mut().zip(&sids) {
            if let Err(err) = reader.catch_up(sid, m).await {
                eprintln!("[chaos] reading {sid}: {err:#}");
                read_ok = false;
            }
        }
        let (asked, finals) = llm_turns(&ctx.run, &mirrors);
        let open: usize = asked
            .iter()
            .enumerate()
            .map(|(r, ids)| {
                ids.iter()
                    .filter(|t| !finals.contains_key(&(r, **t)))
                    .count()
            })
            .sum();
        if read_ok && open == 0 {
            break true;
        }
        if Instant::now() >= llm_deadline {
            break false;
        }
        if Instant::now() >= next_progress {
            let total: usize = asked.iter().map(Vec::len).sum();
            eprintln!(
                "[chaos t={:5.1}s     llm] turns asked={total} still unanswered={open}",
                ctx.t()
            );
            next_progress += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let t_llm = ctx.t();
    eprintln!(
        "[chaos t={t_llm:5.1}s] {}",
        if llm_done {
            "every LLM turn has its final entry"
        } else {
            "gave up waiting for LLM turns"
        }
    );

    // 5. The tails now; every client must receive its room up to there.
    for (m, sid) in mirrors.iter_mut().zip(&sids) {
        reader.catch_up(sid, m).await?;
    }
    let tails: Vec<Option<Sid>> = mirrors.iter().map(Mirror::tail).collect();
    let caught_up = |c: &Shared| {
        let s = lock(c);
        match (tails[s.room], s.last) {
            (Some(t), Some(l)) => l >= t,
            (None, _) => true,
            (Some(_), None) => false,
        }
    };
    let drained = wait_until(&ctx, &clients, "deliver", secs(a.drain_wait), || {
        clients.iter().all(caught_up)
    })
    .await;
    let lagging: Vec<usize> = clients
        .iter()
        .filter(|c| !caught_up(c))
        .map(|c| lock(c).idx)
        .collect();
    let t_drained = ctx.t();
    eprintln!(
        "[chaos t={t_drained:5.1}s] {}",
        if drained {
            "every client reached its room's tail".to_owned()
        } else {
            format!("{} clients never reached the tail", lagging.len())
        }
    );

    // Before the clients leave (their session.leave entries are new work for the group).
    let pending = if let Some(url) = &a.redis {
        Some(llm_group_pending(&RedisTarget::Url(url), &sids))
    } else if a.redis_cluster.is_empty() {
        None
    } else {
        Some(llm_group_pending(
            &RedisTarget::Cluster(&a.redis_cluster),
            &sids,
        ))
    };

    // 6. Close everything, read the streams one last time.
    let _ = phase_tx.send(Phase::Stop);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(3), t)
            .await
            .is_err()
        {
            eprintln!("[chaos] a client did not stop in time");
        }
    }
    for (m, sid) in mirrors.iter_mut().zip(&sids) {
        reader.catch_up(sid, m).await?;
    }
    let report = Report::build(&ctx, &clients, &mirrors, &tails, &lagging, pending);
    report.print(&ctx, &clients, &mirrors);
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Where `redis-cli` finds the rooms: one server, or a cluster (any seed, `-c` follows slots).
enum RedisTarget<'a> {
    Url(&'a str),
    Cluster(&'a [String]),
}

/// One `XPENDING <key> llm` count via `redis-cli`; `None` when it could not be read.
fn xpending_count(conn: &[&str], key: &str) -> Option<u64> {
    let o = std::process::Command::new("redis-cli")
        .args(conn)
        .args(["--raw", "XPENDING", key, "llm"])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u64>().ok())
}

/// The LLM group's pending entries per room, via `redis-cli` (information only).
fn llm_group_pending(target: &RedisTarget<'_>, sids: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    for sid in sids {
        let key = format!("chat:session:{sid}");
        let v = match target {
            RedisTarget::Url(url) => xpending_count(&["-u", url], &key),
            // Any seed answers (redirected to the room's master); try the next if one fails.
            RedisTarget::Cluster(seeds) => seeds.iter().find_map(|seed| {
                let (host, port) = seed.rsplit_once(':')?;
                xpending_count(&["-c", "-h", host, "-p", port], &key)
            }),
        };
        out.insert(sid.clone(), v.map_or(Value::Null, Value::from));
    }
    Value::Object(out)
}

#[derive(Debug, Default)]
struct Report {
    json: serde_json::Map<String, Value>,
    violations: Vec<String>,
    details: Vec<String>,
}

impl Report {
    fn build(
        ctx: &Ctx,
        clients: &[Shared],
        mirrors: &[Mirror],
        tails: &[Option<Sid>],
        lagging: &[usize],
        pending: Option<Value>,
    ) -> Report {
        let mut r = Report::default();
        let prefix = format!("{}-", ctx.run);

        // Streams: our messages by cid.
        let mut by_cid: HashMap<&str, Vec<(usize, Sid)>> = HashMap::new();
        let mut stream_chat = 0u64;
        for (room, m) in mirrors.iter().enumerate() {
            for e in &m.entries {
                if e.event != "chat.message" {
                    continue;
                }
                if let Some(cid) = e.cid.as_deref().filter(|c| c.starts_with(&prefix)) {
                    stream_chat += 1;
                    by_cid.entry(cid).or_default().push((room, e.id));
                }
            }
        }
        let stored_twice: Vec<String> = by_cid
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(c, v)| {
                let ids: Vec<String> = v.iter().map(|(_, i)| i.to_string()).collect();
                format!("{c} stored as {}", ids.join(", "))
            })
            .collect();

        // Clients.
        let (mut sent, mut transmissions, mut resent, mut acked, mut never_acked) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut dup_acks, mut delivered_total) = (0u64, 0u64);
        let mut delivered: Vec<u64> = Vec::new();
        let mut acked_missing: Vec<String> = Vec::new();
        let mut acked_cids: HashSet<String> = HashSet::new();
        let mut cid_conflicts: Vec<String> = Vec::new();
        let mut rejected: Vec<String> = Vec::new();
        let mut dup_conn: Vec<String> = Vec::new();
        let mut dup_across: Vec<String> = Vec::new();
        let mut order: Vec<String> = Vec::new();
        let mut gaps: Vec<String> = Vec::new();
        let mut gap_count = 0u64;
        let mut phantom: Vec<String> = Vec::new();
        let mut resume_gaps: Vec<String> = Vec::new();
        let (mut n_dup_conn, mut n_dup_across, mut n_order, mut n_phantom) =
            (0u64, 0u64, 0u64, 0u64);
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
        let (mut connects, mut connect_failures, mut llm_deltas) = (0u64, 0u64, 0u64);
        let mut unavailable_but_stored: Vec<String> = Vec::new();
        let mut gap_clients: Vec<usize> = Vec::new();
        for c in clients {
            let s = lock(c);
            let m = &mirrors[s.room];
            sent += s.next_seq;
            transmissions += s.transmissions;
            resent += s.resent;
            acked += s.acked.len() as u64;
            never_acked += s.unacked.len() as u64;
            dup_acks += s.dup_acks;
            delivered_total += s.delivered;
            delivered.push(s.delivered);
            connects += s.connects;
            connect_failures += s.connect_failures;
            llm_deltas += s.llm_deltas;
            for (k, v) in &s.errors {
                *errors.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &s.refusals {
                *refusals.entry(k.clone()).or_default() += v;
            }
            for (seq, id) in &s.acked {
                let cid = ClientState::cid(&ctx.run, s.idx, *seq);
                let ok = m
                    .ids
                    .get(id)
                    .is_some_and(|&i| m.entries[i].cid.as_deref() == Some(cid.as_str()));
                if !ok {
                    acked_missing.push(format!("client {} {cid} acked as {id} ({})", s.idx, s.sid));
                }
                acked_cids.insert(cid);
            }
            cid_conflicts.extend(s.cid_conflicts.iter().cloned());
            unavailable_but_stored.extend(s.unavailable_but_stored.iter().cloned());
            rejected.extend(
                s.rejected
                    .iter()
                    .map(|(q, code)| format!("client {} seq {q}: {code}", s.idx)),
            );
            n_dup_conn += s.dup_in_conn.len() as u64;
            n_dup_across += s.dup_across.len() as u64;
            n_order += s.order.len() as u64;
            for (conn, id) in &s.dup_in_conn {
                dup_conn.push(format!("client {} conn {conn}: {id} twice", s.idx));
            }
            for (conn, id) in &s.dup_across {
                dup_across.push(format!(
                    "client {} conn {conn}: {id} already received on an earlier connection",
                    s.idx
                ));
            }
            for (conn, last, id) in &s.order {
                order.push(format!("client {} conn {conn}: {id} after {last}", s.idx));
            }
            for g in &s.resume_gaps {
                resume_gaps.push(format!("client {}: {g}", s.idx));
            }
            // Gaps: every stored entry after its first received one, up to the tail.
            if let (Some(first), Some(tail)) = (s.first, tails[s.room]) {
                let missing: Vec<Sid> = m
                    .entries
                    .iter()
                    .filter(|e| e.id > first && e.id <= tail && !s.seen.contains(&e.id))
                    .map(|e| e.id)
                    .collect();
                if !missing.is_empty() {
                    gap_count += missing.len() as u64;
                    gap_clients.push(s.idx);
                    let shown: Vec<String> = missing
                        .iter()
                        .take(SAMPLES)
                        .map(|i| i.to_string())
                        .collect();
                    gaps.push(format!(
                        "client {} ({} on node {}): {} entries missing, e.g. {}",
                        s.idx,
                        s.sid,
                        s.home + 1,
                        missing.len(),
                        shown.join(", ")
                    ));
                }
            }
            for id in &s.seen {
                if !m.ids.contains_key(id) && m.cursor.is_some_and(|c| *id <= c) {
                    n_phantom += 1;
                    if phantom.len() < SAMPLES {
                        phantom.push(format!("client {}: received {id}, not in {}", s.idx, s.sid));
                    }
                }
            }
        }
        let stored_unacked = by_cid.keys().filter(|c| !acked_cids.contains(**c)).count();

        // LLM.
        let (asked, finals) = llm_turns(&ctx.run, mirrors);
        let asked_total: usize = asked.iter().map(Vec::len).sum();
        let mut asked_acked = 0usize;
        let mut once = 0u64;
        let mut unanswered: Vec<String> = Vec::new();
        let mut twice: Vec<String> = Vec::new();
        let mut asked_set: HashSet<(usize, Sid)> = HashSet::new();
        let mut llm_codes: BTreeMap<String, u64> = BTreeMap::new();
        let mut llm_reasons: BTreeMap<String, u64> = BTreeMap::new();
        for (room, ids) in asked.iter().enumerate() {
            let m = &mirrors[room];
            for id in ids {
                asked_set.insert((room, *id));
                if m.ids
                    .get(id)
                    .and_then(|&i| m.entries[i].cid.as_deref())
                    .is_some_and(|c| acked_cids.contains(c))
                {
                    asked_acked += 1;
                }
                match finals.get(&(room, *id)).map(Vec::as_slice) {
                    None | Some([]) => unanswered.push(format!("{} turn {id}", m_sid(ctx, room))),
                    Some([i]) => {
                        once += 1;
                        let e = &m.entries[*i];
                        if e.event == "llm.error" {
                            *llm_codes
                                .entry(e.code.clone().unwrap_or_default())
                                .or_default() += 1;
                        } else {
                            *llm_reasons
                                .entry(e.reason.clone().unwrap_or_default())
                                .or_default() += 1;
                        }
                    }
                    Some(many) => {
                        let ids: Vec<String> = many
                            .iter()
                            .map(|&i| format!("{} {}", m.entries[i].event, m.entries[i].id))
                            .collect();
                        twice.push(format!(
                            "{} turn {id}: {} final entries ({})",
                            m_sid(ctx, room),
                            many.len(),
                            ids.join(", ")
                        ));
                    }
                }
            }
        }
        let unexpected = finals.keys().filter(|k| !asked_set.contains(k)).count();

        let d_min = delivered.iter().copied().min().unwrap_or(0);
        let d_max = delivered.iter().copied().max().unwrap_or(0);
        let mut checks: Vec<(&str, u64, &Vec<String>)> = vec![
            (
                "acked_but_missing",
                acked_missing.len() as u64,
                &acked_missing,
            ),
            ("stored_twice", stored_twice.len() as u64, &stored_twice),
            ("cid_conflicts", cid_conflicts.len() as u64, &cid_conflicts),
            ("duplicates_in_connection", n_dup_conn, &dup_conn),
            ("duplicates_across_resume", n_dup_across, &dup_across),
            ("order_violations", n_order, &order),
            ("gaps", gap_count, &gaps),
            ("phantom_deliveries", n_phantom, &phantom),
            ("resume_gap_frames", resume_gaps.len() as u64, &resume_gaps),
            ("llm_unanswered", unanswered.len() as u64, &unanswered),
            ("llm_answered_twice", twice.len() as u64, &twice),
            ("rejected", rejected.len() as u64, &rejected),
        ];
        let never_acked_list: Vec<String> = clients
            .iter()
            .flat_map(|c| {
                let s = lock(c);
                s.unacked
                    .values()
                    .take(3)
                    .map(|p| format!("{} ({} sends)", p.cid, p.sends))
                    .collect::<Vec<_>>()
            })
            .take(SAMPLES)
            .collect();
        let lagging_list: Vec<String> = lagging
            .iter()
            .map(|i| {
                let s = lock(&clients[*i]);
                format!(
                    "client {} ({}): last {} < tail {}",
                    s.idx,
                    s.sid,
                    s.last.map_or("-".into(), |l| l.to_string()),
                    tails[s.room].map_or("-".into(), |t| t.to_string())
                )
            })
            .collect();
        checks.push(("never_acked", never_acked, &never_acked_list));
        checks.push(("clients_behind_tail", lagging.len() as u64, &lagging_list));

        for (name, n, samples) in &checks {
            r.json.insert((*name).into(), json!(n));
            if *n > 0 {
                r.violations.push(format!("{name}={n}"));
                for s in samples.iter().take(SAMPLES) {
                    r.details.push(format!("{name}: {s}"));
                }
            }
        }
        // Connection histories of the clients with gaps or duplicates, to read with relay logs.
        let mut suspects: Vec<usize> = gap_clients;
        for c in clients {
            let s = lock(c);
            if !s.dup_in_conn.is_empty() || !s.dup_across.is_empty() || !s.order.is_empty() {
                suspects.push(s.idx);
            }
        }
        suspects.sort_unstable();
        suspects.dedup();
        for i in suspects.iter().take(3) {
            let s = lock(&clients[*i]);
            for rec in &s.conns {
                r.details.push(format!(
                    "client {} conn {} node {} resume_from {} t {:.1}..{} first {} last {} delivered {} end {}",
                    s.idx,
                    rec.no,
                    rec.node + 1,
                    rec.resume_from.map_or("-".into(), |x| x.to_string()),
                    rec.t_start,
                    rec.t_end.map_or("-".into(), |t| format!("{t:.1}")),
                    rec.first.map_or("-".into(), |x| x.to_string()),
                    rec.last.map_or("-".into(), |x| x.to_string()),
                    rec.delivered,
                    rec.end
                ));
            }
        }

        let j = &mut r.json;
        j.insert("run".into(), json!(ctx.run));
        j.insert("rooms".into(), json!(ctx.args.rooms));
        j.insert("clients".into(), json!(clients.len()));
        j.insert("nodes".into(), json!(ctx.args.nodes.len()));
        j.insert("sent".into(), json!(sent));
        j.insert("transmissions".into(), json!(transmissions));
        j.insert("resent".into(), json!(resent));
        j.insert("acked".into(), json!(acked));
        j.insert("duplicate_acks".into(), json!(dup_acks));
        j.insert("stored".into(), json!(by_cid.len()));
        j.insert("stored_entries".into(), json!(stream_chat));
        j.insert("stored_unacked".into(), json!(stored_unacked));
        j.insert("delivered_total".into(), json!(delivered_total));
        j.insert("delivered_min".into(), json!(d_min));
        j.insert("delivered_max".into(), json!(d_max));
        j.insert("delivered_per_client".into(), json!(delivered));
        j.insert("connects".into(), json!(connects));
        j.insert(
            "reconnects".into(),
            json!(connects.saturating_sub(clients.len() as u64)),
        );
        j.insert("connect_failures".into(), json!(connect_failures));
        j.insert("connect_refusals".into(), json!(refusals));
        j.insert("errors".into(), json!(errors));
        j.insert(
            "store_unavailable_but_stored".into(),
            json!(unavailable_but_stored.len()),
        );
        for d in unavailable_but_stored.iter().take(SAMPLES) {
            r.details
                .push(format!("info: store_unavailable_but_stored: {d}"));
        }
        j.insert("llm_asked".into(), json!(asked_total));
        j.insert("llm_asked_acked".into(), json!(asked_acked));
        j.insert("llm_answered_once".into(), json!(once));
        j.insert("llm_error_codes".into(), json!(llm_codes));
        j.insert("llm_response_reasons".into(), json!(llm_reasons));
        j.insert("llm_finals_for_other_turns".into(), json!(unexpected));
        j.insert("llm_deltas_seen".into(), json!(llm_deltas));
        if let Some(p) = pending {
            j.insert("llm_group_pending".into(), p);
        }
        j.insert(
            "stream_lengths".into(),
            json!(mirrors.iter().map(|m| m.entries.len()).collect::<Vec<_>>()),
        );
        j.insert("violations".into(), json!(r.violations));
        j.insert("ok".into(), json!(r.violations.is_empty()));
        r
    }

    fn print(&self, ctx: &Ctx, clients: &[Shared], mirrors: &[Mirror]) {
        let j = &self.json;
        let g = |k: &str| j.get(k).cloned().unwrap_or(Value::Null);
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("==== chaos run {} ====", ctx.run));
        line(format!(
            "clients {} in {} rooms over {} nodes",
            g("clients"),
            g("rooms"),
            g("nodes")
        ));
        line(format!(
            "messages: sent {}  acked {}  found in streams {} (entries {})  stored-but-unacked {}",
            g("sent"),
            g("acked"),
            g("stored"),
            g("stored_entries"),
            g("stored_unacked")
        ));
        line(format!(
            "          transmissions {}  resent {}  duplicate acks {}  errors {}",
            g("transmissions"),
            g("resent"),
            g("duplicate_acks"),
            g("errors")
        ));
        line(format!(
            "          store_unavailable answered for a transmission that was stored after all: {} (information)",
            g("store_unavailable_but_stored")
        ));
        line(format!(
            "delivered: total {}  per client min {} max {}",
            g("delivered_total"),
            g("delivered_min"),
            g("delivered_max")
        ));
        for (room, m) in mirrors.iter().enumerate() {
            let per: Vec<String> = clients
                .iter()
                .map(|c| lock(c))
                .filter(|s| s.room == room)
                .map(|s| format!("c{}:{}", s.idx, s.delivered))
                .collect();
            line(format!(
                "  {} stream {} entries; delivered {}",
                m_sid(ctx, room),
                m.entries.len(),
                per.join(" ")
            ));
        }
        line(format!(
            "connections: {} ({} reconnects), failed connects {} {}",
            g("connects"),
            g("reconnects"),
            g("connect_failures"),
            g("connect_refusals")
        ));
        line(format!(
            "LLM: turns asked {} (acked {})  answered exactly once {}  unanswered {}  answered twice {}  errors {}  reasons {}",
            g("llm_asked"),
            g("llm_asked_acked"),
            g("llm_answered_once"),
            g("llm_unanswered"),
            g("llm_answered_twice"),
            g("llm_error_codes"),
            g("llm_response_reasons")
        ));
        if let Some(p) = j.get("llm_group_pending") {
            line(format!("LLM group pending at the end: {p}"));
        }
        line("checks (each must be 0):".into());
        for k in [
            "acked_but_missing",
            "stored_twice",
            "cid_conflicts",
            "duplicates_in_connection",
            "duplicates_across_resume",
            "order_violations",
            "gaps",
            "phantom_deliveries",
            "resume_gap_frames",
            "llm_unanswered",
            "llm_answered_twice",
            "rejected",
            "never_acked",
            "clients_behind_tail",
        ] {
            let v = g(k);
            let bad = v.as_u64().unwrap_or(0) > 0;
            line(format!(
                "  {k:<26} {v}{}",
                if bad { "   <-- VIOLATION" } else { "" }
            ));
        }
        for d in &self.details {
            line(format!("  detail: {d}"));
        }
        line(if self.violations.is_empty() {
            "RESULT: PASS".to_owned()
        } else {
            format!("RESULT: FAIL ({})", self.violations.join(", "))
        });
        line(json!({"chaos": Value::Object(j.clone())}).to_string());
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}

fn m_sid(ctx: &Ctx, room: usize) -> String {
    format!("chaos-{}-{room}", ctx.run)
}
