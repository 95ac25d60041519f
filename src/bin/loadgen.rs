//! `loadgen`: load generator and delivery checker for the relay. Loopback only.
//!
//! ```text
//! loadgen run  --url ws://127.0.0.1:3000 --rooms 50 --clients 4 --messages 200 --window 32
//! loadgen run  --url ws://127.0.0.1:3000 --rooms 1 --clients 200 --senders 20 --rate 2000 --duration 10
//! loadgen idle --url ws://127.0.0.1:3000 --connections 5000 --relay-pid PID
//! ```
//!
//! `run` connects every client (each waits for its own `session.join`), then starts all senders at
//! once. Each `chat.message` body carries `seq` (per sender), `sender` and `t` (send time, µs since
//! the epoch). Every receiver checks, per sender, that each `seq` arrives exactly once and in
//! increasing order, that stream ids only grow, and records `now - t` as the latency. Exit code 1
//! on loss, duplicates, reordering, a failed or dropped connection, or the timeout.
//!
//! `idle` opens many connections that only listen and reports the relay's resident memory per
//! connection (from `/proc/PID/status`).
//!
//! Open files: this binary does not raise its own `RLIMIT_NOFILE` (that needs libc, and the crate
//! forbids unsafe code); `scripts/bench.sh` runs `ulimit -n` before starting the relay and
//! loadgen. A connect failing with EMFILE is reported as such.

// `json!` with the run's ~40 figures nests deeper than the default limit.
#![recursion_limit = "256"]

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Upper bounds, so a typo cannot turn a benchmark into a denial of service on the machine.
const MAX_CONNECTIONS: usize = 200_000;
const MAX_TOTAL_MESSAGES: u64 = 100_000_000;
const MAX_SECS: u64 = 3_600;
/// The relay refuses frames above 64 KiB by default; stay below with the envelope around the text.
const MAX_SIZE: usize = 60_000;
/// `/proc/*/stat` counts CPU time in clock ticks; USER_HZ is 100 on every Linux we run on
/// (`getconf CLK_TCK`), and reading it properly needs libc.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;
/// How long a connection may take to open and receive its own `session.join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// After every sender is answered, how long deliveries may stall before the rest counts as lost.
const DRAIN_STALL: Duration = Duration::from_secs(5);
/// How many (receiver, sender) pairs with loss are described on stderr.
const LOSS_DETAIL_LINES: usize = 20;
/// How often the coordinator looks at the shared counters.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator and delivery checker for chat-relay (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Rooms of clients exchanging chat messages; throughput, latency, loss/dup/order checks.
    Run(RunArgs),
    /// Many idle connections; relay memory per connection and time to connect them.
    Idle(IdleArgs),
    /// LLM fan-out: one room of clients, concurrent LLM turns, every delta to every member.
    Llm(LlmArgs),
}

#[derive(Debug, Clone, Args)]
struct LlmArgs {
    /// Relay address, `ws://HOST:PORT` with a loopback HOST (its LLM participant must be on).
    #[arg(long, default_value = "ws://127.0.0.1:3000")]
    url: String,
    /// Clients in the room (all receive every delta).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// LLM turns asked at once.
    #[arg(long, default_value_t = 10)]
    turns: usize,
    /// The relay's PID, for its CPU time.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Overall bound, seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Print only one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Relay address, `ws://HOST:PORT` with a loopback HOST.
    #[arg(long, env = "LOADGEN_URL", default_value = "ws://127.0.0.1:3000")]
    url: String,
    /// Number of rooms.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Clients per room.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Senders per room (the first S clients of each room); default: every client.
    #[arg(long)]
    senders: Option<usize>,
    /// Messages per sender (ignored with --duration).
    #[arg(long, default_value_t = 100)]
    messages: u64,
    /// Length of `bd.text` in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Unanswered messages in flight per sender (with --rate only a safety cap).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Aggregate send rate across all senders, messages/s (open loop, evenly spread).
    #[arg(long)]
    rate: Option<f64>,
    /// With --rate: send for this many seconds instead of --messages per sender.
    #[arg(long, requires = "rate")]
    duration: Option<f64>,
    /// Bound on the whole run (connect, send, drain), seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Relay process id: report its CPU time during the run.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Redis process id: report its CPU time during the run too.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Print only one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct IdleArgs {
    /// Relay address, `ws://HOST:PORT` with a loopback HOST.
    #[arg(long, env = "LOADGEN_URL", default_value = "ws://127.0.0.1:3000")]
    url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Local source addresses, used round-robin (each gives its own ~28k ephemeral ports).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Rooms the connections are spread over (`idle-<prefix>-<i % rooms>`).
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Relay process id: report its resident memory per connection.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Seconds to keep the connections open after measuring.
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Seconds to wait after the last connect before reading the relay's memory.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Bound on connecting them all, seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Print only one JSON line.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = match Cli::parse().mode {
        Mode::Run(args) => run_mode(args).await,
        Mode::Idle(args) => idle_mode(args).await,
        Mode::Llm(args) => llm_mode(args).await,
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target, connections, errors

/// Where the relay listens. Only loopback addresses, and no DNS: `localhost` means 127.0.0.1.
#[derive(Debug, Clone)]
struct Target {
    authority: String,
    addr: SocketAddr,
}

impl Target {
    fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .context("--url must be ws://HOST:PORT (loopback only, no TLS)")?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('?') {
            bail!("--url must be ws://HOST:PORT without a path");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.contains(']') => {
                (h, p.parse::<u16>().context("bad port in --url")?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse()
                .with_context(|| format!("--url host '{host}' must be an IP or localhost"))?
        };
        if !ip.is_loopback() {
            bail!("refusing non-loopback target {ip}: loadgen only talks to this machine");
        }
        Ok(Self {
            authority: authority.to_owned(),
            addr: SocketAddr::new(ip, port),
        })
    }

    fn room_url(&self, sid: &str) -> String {
        format!("ws://{}/v1/session/chat?sid={sid}&role=A", self.authority)
    }
}

/// TCP connect (optionally from a given local address), then the WebSocket handshake.
async fn open(
    target: &Target,
    source: Option<IpAddr>,
    sid: &str,
    config: Option<WebSocketConfig>,
) -> Result<Ws> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("socket")?;
    if let Some(src) = source {
        socket
            .bind(SocketAddr::new(src, 0))
            .with_context(|| format!("bind {src}"))?;
    }
    let stream = socket.connect(target.addr).await.context("connect")?;
    // Small frames: without this, Nagle would add delayed-ACK latency to every measurement.
    stream.set_nodelay(true).context("nodelay")?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(target.room_url(sid), stream, config)
        .await
        .context("handshake")?;
    Ok(ws)
}

/// Reads until this connection's own `session.join`, the first stored entry a fresh one gets.
async fn await_join(ws: &mut Ws) -> Result<()> {
    while let Some(msg) = ws.next().await {
        match msg.context("read")? {
            Message::Text(text) => {
                if let Ok(frame) = serde_json::from_str::<Frame>(&text) {
                    if frame.hd.event == "session.join" {
                        return Ok(());
                    }
                }
            }
            Message::Close(close) => bail!("closed before session.join: {}", close_reason(close)),
            _ => {}
        }
    }
    bail!("connection ended before session.join")
}

async fn open_and_join(
    target: &Target,
    source: Option<IpAddr>,
    sid: &str,
    config: Option<WebSocketConfig>,
) -> Result<Ws> {
    let attempt = async {
        let mut ws = open(target, source, sid, config).await?;
        await_join(&mut ws).await?;
        Ok(ws)
    };
    tokio::time::timeout(JOIN_TIMEOUT, attempt)
        .await
        .context("timed out opening the connection and waiting for session.join")?
}

/// A short stable name for a connect failure, to count failures by cause.
fn failure_kind(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        let io_err = cause.downcast_ref::<io::Error>().or_else(|| {
            match cause.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Io(e)) => Some(e),
                _ => None,
            }
        });
        if let Some(e) = io_err {
            return match e.raw_os_error() {
                Some(24) => "emfile".into(),
                Some(99) => "eaddrnotavail".into(),
                Some(111) => "econnrefused".into(),
                Some(104) => "econnreset".into(),
                _ => format!("io_{:?}", e.kind()).to_lowercase(),
            };
        }
        if let Some(tungstenite::Error::Http(resp)) = cause.downcast_ref::<tungstenite::Error>() {
            return format!("http_{}", resp.status().as_u16());
        }
        if cause.is::<tokio::time::error::Elapsed>() {
            return "timeout".into();
        }
    }
    "other".into()
}

/// Counts failures by kind, keeps one example message each, and explains the common fixes.
#[derive(Debug, Default)]
struct Failures {
    by_kind: BTreeMap<String, (u64, String)>,
}

impl Failures {
    fn add(&mut self, kind: String, example: String) {
        self.by_kind.entry(kind).or_insert((0, example)).0 += 1;
    }

    fn total(&self) -> u64 {
        self.by_kind.values().map(|(n, _)| n).sum()
    }

    fn print(&self) {
        for (kind, (n, example)) in &self.by_kind {
            eprintln!("loadgen: {n} connection(s) failed: {kind}: {example}");
            match kind.as_str() {
                "emfile" => eprintln!(
                    "loadgen: too many open files (EMFILE): raise the limit with `ulimit -n` \
                     in the shell that starts loadgen and the relay (scripts/bench.sh does)"
                ),
                "eaddrnotavail" => eprintln!(
                    "loadgen: out of local ports: spread connections over more source \
                     addresses with --sources 127.0.0.1,127.0.0.2,..."
                ),
                _ => {}
            }
        }
    }

    fn to_json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .by_kind
            .iter()
            .map(|(k, (n, _))| (k.clone(), json!(n)))
            .collect();
        Value::Object(map)
    }
}

fn close_reason(close: Option<tungstenite::protocol::CloseFrame>) -> String {
    match close {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
        None => "close (no code)".into(),
    }
}

/// Warns early when the open-file limit cannot hold the connections asked for.
fn check_open_files(connections: usize) {
    let Some(limit) = open_file_limit() else {
        return;
    };
    if (connections as u64) + 64 > limit {
        eprintln!(
            "loadgen: warning: {connections} connections but the open-file limit is {limit}; \
             raise it with `ulimit -n` first"
        );
    }
}

fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// /proc readings

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds (fields 14 and 15 of `/proc/PID/stat`).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it start at field 3.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_SEC)
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds all processes used, summed over every core (first line of `/proc/stat`:
/// everything but idle and iowait). Tells how much of the machine other work took.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user/nice).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy as f64 / CLOCK_TICKS_PER_SEC)
}

/// CPU time of loadgen, the machine and (optionally) the relay and Redis at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    at: Instant,
    own: Option<f64>,
    relay: Option<f64>,
    redis: Option<f64>,
    machine: Option<f64>,
}

impl CpuMark {
    fn take(relay_pid: Option<u32>) -> Self {
        Self::take_with(relay_pid, None)
    }

    fn take_with(relay_pid: Option<u32>, redis_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            own: cpu_secs("self"),
            relay: relay_pid.and_then(|p| cpu_secs(&p.to_string())),
            redis: redis_pid.and_then(|p| cpu_secs(&p.to_string())),
            machine: machine_busy_secs(),
        }
    }
}

fn run_prefix() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("lg{ms:x}{:x}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Latency histogram

/// Log-linear histogram of microseconds: exact below 64 µs, then 32 buckets per power of two
/// (≤ 3 % error). Grows on demand, so idle receivers cost nothing.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // ≥ SUB_BITS + 1
        let mantissa = (v >> (exp - SUB_BITS)) - SUB;
        (2 * SUB + u64::from(exp - SUB_BITS - 1) * SUB + mantissa) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let j = i - 2 * SUB;
        let shift = j / SUB + 1;
        ((SUB + j % SUB + 1) << shift) - 1
    }

    fn record(&mut self, v: u64) {
        let i = Self::index(v);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The q-quantile in milliseconds (bucket upper bound, capped at the true maximum).
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max) as f64 / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

/// The parts of a relay frame loadgen looks at; everything else (the text too) is skipped.
#[derive(Debug, Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    hd: Header<'a>,
    #[serde(default)]
    bd: Option<Body>,
}

#[derive(Debug, Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    cid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
struct Body {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    sender: Option<u32>,
    #[serde(default)]
    t: Option<u64>,
}

/// `1700000000000-3` → (1700000000000, 3), to check that stream ids only grow.
fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

// ---------------------------------------------------------------------------------------------
// Run mode: shared state

/// Where the run is; every client watches it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Connecting,
    Running(Instant),
    Stop,
}

/// Counters the coordinator polls while clients run.
#[derive(Debug, Default)]
struct Progress {
    ready: AtomicU64,
    failed: AtomicU64,
    sent: AtomicU64,
    answered: AtomicU64,
    unique_deliveries: AtomicU64,
    senders_done: AtomicU64,
    /// Deliveries owed by senders that are done: their acked messages × clients in the room.
    expected: AtomicU64,
    dropped: AtomicU64,
}

/// Between one sender's write half and read half: the in-flight window and its answers.
#[derive(Debug)]
struct SenderLink {
    window: Semaphore,
    sent: AtomicU64,
    acked: AtomicU64,
    stalls: AtomicU64,
}

impl SenderLink {
    fn new(window: usize) -> Self {
        Self {
            window: Semaphore::new(window),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }
}

/// What one sender does: how many messages, at what pace, and the frame it writes.
#[derive(Debug, Clone)]
struct SenderPlan {
    id: u32,
    messages: u64,
    /// Fixed-rate mode: time between this sender's messages, and its offset in the schedule.
    pace: Option<(Duration, Duration)>,
    window: usize,
    prefix: Arc<str>,
    padding: Arc<str>,
}

impl SenderPlan {
    fn frame(&self, seq: u64) -> String {
        let (prefix, id, pad, t) = (&self.prefix, self.id, &self.padding, now_us());
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
struct ClientSpec {
    room: usize,
    /// Global client number, `room * clients + index`; a sender's id is its client number.
    client: u32,
    sid: String,
    plan: Option<SenderPlan>,
}

// ---------------------------------------------------------------------------------------------
// Run mode: the receiving side

/// Per (receiver, sender): which seqs arrived (a bitset), the highest one, how many distinct.
#[derive(Debug, Default, Clone)]
struct SeqTrack {
    seen: Vec<u64>,
    highest: Option<u64>,
    unique: u64,
}

/// What arrived for one sequence number.
enum Arrival {
    First,
    Late,
    Duplicate,
}

impl SeqTrack {
    fn arrive(&mut self, seq: u64) -> Arrival {
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        let late = self.highest.is_some_and(|h| seq < h);
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        if late {
            Arrival::Late
        } else {
            Arrival::First
        }
    }

    /// The seqs below `upto` that never arrived, as ranges: `0-3,17`.
    fn missing(&self, upto: u64) -> String {
        let has = |seq: u64| {
            self.seen
                .get((seq / 64) as usize)
                .is_some_and(|w| w & (1 << (seq % 64)) != 0)
        };
        let mut ranges: Vec<String> = Vec::new();
        let mut seq = 0;
        while seq < upto {
            if has(seq) {
                seq += 1;
                continue;
            }
            let first = seq;
            while seq < upto && !has(seq) {
                seq += 1;
            }
            ranges.push(if seq - 1 == first {
                first.to_string()
            } else {
                format!("{first}-{}", seq - 1)
            });
        }
        ranges.join(",")
    }
}

/// Everything one connection observed.
#[derive(Debug, Default)]
struct Observed {
    latency: Histogram,
    deliveries: u64,
    duplicates: u64,
    reorders: u64,
    id_regressions: u64,
    foreign: u64,
    per_sender: HashMap<u32, SeqTrack>,
    last_id: (u64, u64),
    errors: BTreeMap<String, u64>,
    dropped: Option<String>,
}

impl Observed {
    fn on_text(&mut self, text: &str, link: Option<&SenderLink>, progress: &Progress) {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            self.foreign += 1;
            return;
        };
        match frame.hd.event.as_ref() {
            "chat.message" => self.on_delivery(&frame, progress),
            "chat.ack" => {
                if let Some(link) = link {
                    link.acked.fetch_add(1, Relaxed);
                    link.window.add_permits(1);
                }
                progress.answered.fetch_add(1, Relaxed);
            }
            "error" => {
                let code = frame.hd.code.as_deref().unwrap_or("unknown");
                *self.errors.entry(code.to_owned()).or_default() += 1;
                // Only answers to our messages (they carry our cid) free a window slot.
                if let (Some(link), Some(_)) = (link, &frame.hd.cid) {
                    link.window.add_permits(1);
                    progress.answered.fetch_add(1, Relaxed);
                }
            }
            _ => {} // joins, leaves, typing: not part of the measurement
        }
    }

    fn on_delivery(&mut self, frame: &Frame, progress: &Progress) {
        let body = frame.bd.as_ref();
        let (Some(seq), Some(sender), Some(t)) = (
            body.and_then(|b| b.seq),
            body.and_then(|b| b.sender),
            body.and_then(|b| b.t),
        ) else {
            self.foreign += 1;
            return;
        };
        self.deliveries += 1;
        self.latency.record(now_us().saturating_sub(t));
        if let Some(id) = frame.hd.id.as_deref().and_then(parse_stream_id) {
            if id <= self.last_id {
                self.id_regressions += 1;
            }
            self.last_id = self.last_id.max(id);
        }
        match self.per_sender.entry(sender).or_default().arrive(seq) {
            Arrival::First => {
                progress.unique_deliveries.fetch_add(1, Relaxed);
            }
            Arrival::Late => {
                self.reorders += 1;
                progress.unique_deliveries.fetch_add(1, Relaxed);
            }
            Arrival::Duplicate => self.duplicates += 1,
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Run mode: the sending side

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

// ---------------------------------------------------------------------------------------------
// Run mode: one client

#[derive(Debug)]
struct ClientReport {
    room: usize,
    client: u32,
    sender: Option<u32>,
    failure: Option<anyhow::Error>,
    seen: Observed,
    sent: u64,
    acked: u64,
    stalls: u64,
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

async fn client(
    target: Arc<Target>,
    spec: ClientSpec,
    room_clients: u64,
    gate: Arc<Semaphore>,
    mut phase: watch::Receiver<Phase>,
    progress: Arc<Progress>,
) -> ClientReport {
    let mut report = ClientReport {
        room: spec.room,
        client: spec.client,
        sender: spec.plan.as_ref().map(|p| p.id),
        failure: None,
        seen: Observed::default(),
        sent: 0,
        acked: 0,
        stalls: 0,
    };
    let opened = match gate.acquire().await {
        Ok(_permit) => open_and_join(&target, None, &spec.sid, None).await,
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

    let link = spec.plan.as_ref().map(|p| SenderLink::new(p.window));
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

// ---------------------------------------------------------------------------------------------
// Run mode: coordinator

/// The run's shape after defaults and checks.
#[derive(Debug, Clone)]
struct RunPlan {
    rooms: usize,
    clients: usize,
    senders: usize,
    messages: u64,
    pace: Option<Duration>,
}

impl RunPlan {
    fn from_args(args: &RunArgs) -> Result<Self> {
        let senders = args.senders.unwrap_or(args.clients);
        let connections = args.rooms.saturating_mul(args.clients);
        if args.rooms == 0 || args.clients == 0 {
            bail!("--rooms and --clients must be at least 1");
        }
        if senders > args.clients {
            bail!(
                "--senders ({senders}) cannot exceed --clients ({})",
                args.clients
            );
        }
        if connections > MAX_CONNECTIONS {
            bail!("at most {MAX_CONNECTIONS} connections");
        }
        if args.size == 0 || args.size > MAX_SIZE {
            bail!("--size must be 1..={MAX_SIZE}");
        }
        if args.window == 0 || args.window > 1_000_000 {
            bail!("--window must be 1..=1000000");
        }
        if args.timeout == 0 || args.timeout > MAX_SECS {
            bail!("--timeout must be 1..={MAX_SECS}");
        }
        let total_senders = (args.rooms * senders).max(1) as f64;
        let (messages, pace) = match args.rate {
            Some(rate) => {
                if !(rate > 0.0 && rate <= 10_000_000.0) {
                    bail!("--rate must be in (0, 10000000]");
                }
                let per_sender = rate / total_senders;
                let messages = match args.duration {
                    Some(d) if d > 0.0 && d <= MAX_SECS as f64 => (per_sender * d).ceil() as u64,
                    Some(_) => bail!("--duration must be in (0, {MAX_SECS}]"),
                    None => args.messages,
                };
                (messages, Some(Duration::from_secs_f64(1.0 / per_sender)))
            }
            None => (args.messages, None),
        };
        if messages.saturating_mul(total_senders as u64) > MAX_TOTAL_MESSAGES {
            bail!("at most {MAX_TOTAL_MESSAGES} messages in total");
        }
        Ok(Self {
            rooms: args.rooms,
            clients: args.clients,
            senders,
            messages,
            pace,
        })
    }

    fn connections(&self) -> usize {
        self.rooms * self.clients
    }

    fn total_senders(&self) -> u64 {
        (self.rooms * self.senders) as u64
    }

    /// Client `index` of `room`; the first `senders` of each room send.
    fn client_spec(
        &self,
        args: &RunArgs,
        prefix: &Arc<str>,
        padding: &Arc<str>,
        room: usize,
        index: usize,
    ) -> ClientSpec {
        let plan = (index < self.senders).then(|| {
            let global = room * self.senders + index;
            SenderPlan {
                id: (room * self.clients + index) as u32,
                messages: self.messages,
                // Spread the senders evenly over one interval so the aggregate rate is smooth.
                pace: self
                    .pace
                    .map(|iv| (iv, iv.mul_f64(global as f64 / self.total_senders() as f64))),
                window: args.window,
                prefix: prefix.clone(),
                padding: padding.clone(),
            }
        });
        ClientSpec {
            room,
            client: (room * self.clients + index) as u32,
            sid: format!("{prefix}-{room}"),
            plan,
        }
    }
}

/// How the send/drain phase ended.
#[derive(Debug, Clone, Copy)]
struct RunEnd {
    /// All senders answered.
    senders_done_at: Option<Instant>,
    /// Last time the delivery count moved.
    last_delivery_at: Instant,
    timed_out: bool,
}

async fn wait_connected(progress: &Progress, total: u64, deadline: Instant) -> bool {
    while progress.ready.load(Relaxed) + progress.failed.load(Relaxed) < total {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
    true
}

/// Polls until every sender is answered and every owed delivery arrived, deliveries stall for
/// `DRAIN_STALL` after the senders are done, or the deadline passes.
async fn wait_drained(
    progress: &Progress,
    senders: u64,
    start: Instant,
    deadline: Instant,
    quiet: bool,
) -> RunEnd {
    let mut end = RunEnd {
        senders_done_at: None,
        last_delivery_at: start,
        timed_out: false,
    };
    let mut last_count = 0;
    let mut next_report = start + Duration::from_secs(1);
    loop {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        let count = progress.unique_deliveries.load(Relaxed);
        if count != last_count {
            last_count = count;
            end.last_delivery_at = now;
        }
        if end.senders_done_at.is_none() && progress.senders_done.load(Relaxed) >= senders {
            end.senders_done_at = Some(now);
        }
        if let Some(done) = end.senders_done_at {
            if count >= progress.expected.load(Relaxed) {
                return end;
            }
            if now.duration_since(end.last_delivery_at.max(done)) > DRAIN_STALL {
                return end;
            }
        }
        if now >= deadline {
            end.timed_out = true;
            return end;
        }
        if !quiet && now >= next_report {
            next_report += Duration::from_secs(1);
            eprintln!(
                "[loadgen] {:5.1}s sent {} answered {} deliveries {}",
                now.duration_since(start).as_secs_f64(),
                progress.sent.load(Relaxed),
                progress.answered.load(Relaxed),
                count
            );
        }
    }
}

async fn collect(handles: Vec<JoinHandle<ClientReport>>) -> (Vec<ClientReport>, u64) {
    let mut reports = Vec::with_capacity(handles.len());
    let mut lost_tasks = 0;
    for handle in handles {
        match tokio::time::timeout(Duration::from_secs(10), handle).await {
            Ok(Ok(report)) => reports.push(report),
            _ => lost_tasks += 1,
        }
    }
    (reports, lost_tasks)
}

async fn run_mode(args: RunArgs) -> Result<bool> {
    let target = Arc::new(Target::parse(&args.url)?);
    let plan = RunPlan::from_args(&args)?;
    check_open_files(plan.connections());
    let began = Instant::now();
    let deadline = began + Duration::from_secs(args.timeout);
    let prefix: Arc<str> = run_prefix().into();
    let padding: Arc<str> = "x".repeat(args.size).into();
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let progress = Arc::new(Progress::default());
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));

    let mut handles = Vec::with_capacity(plan.connections());
    for room in 0..plan.rooms {
        for index in 0..plan.clients {
            let spec = plan.client_spec(&args, &prefix, &padding, room, index);
            handles.push(tokio::spawn(client(
                target.clone(),
                spec,
                plan.clients as u64,
                gate.clone(),
                phase_rx.clone(),
                progress.clone(),
            )));
        }
    }

    let all_in = wait_connected(&progress, plan.connections() as u64, deadline).await;
    let connect_secs = began.elapsed().as_secs_f64();
    let failed = progress.failed.load(Relaxed) > 0;
    if !all_in || failed {
        let _ = phase_tx.send(Phase::Stop);
        let (reports, _) = collect(handles).await;
        let stats = Stats::from_reports(&reports, &plan);
        stats.failures.print();
        eprintln!(
            "loadgen: {} of {} connections ready{}; not starting",
            progress.ready.load(Relaxed),
            plan.connections(),
            if all_in { "" } else { " before the timeout" }
        );
        return Ok(false);
    }

    if !args.json {
        eprintln!(
            "[loadgen] {} connections ready in {connect_secs:.2}s; starting {} senders",
            plan.connections(),
            plan.total_senders()
        );
    }
    let before = CpuMark::take_with(args.relay_pid, args.redis_pid);
    let _ = phase_tx.send(Phase::Running(before.at));
    let end = wait_drained(
        &progress,
        plan.total_senders(),
        before.at,
        deadline,
        args.json,
    )
    .await;
    let after = CpuMark::take_with(args.relay_pid, args.redis_pid);
    let _ = phase_tx.send(Phase::Stop);
    let (reports, lost_tasks) = collect(handles).await;

    let mut stats = Stats::from_reports(&reports, &plan);
    stats.connect_secs = connect_secs;
    stats.lost_tasks = lost_tasks;
    stats.timed_out = end.timed_out;
    stats.timing(before, after, end);
    stats.relay_rss_kib = args.relay_pid.and_then(|p| rss_kib(&p.to_string()));
    for line in &stats.loss_detail {
        eprintln!("loadgen: loss: {line}");
    }
    if !args.json {
        stats.failures.print();
        stats.print_human(&plan, &args);
    }
    println!("{}", stats.to_json(&plan, &args));
    Ok(stats.passed())
}

// ---------------------------------------------------------------------------------------------
// Run mode: figures

/// Every figure a run reports.
#[derive(Debug, Default)]
struct Stats {
    connections: u64,
    failures: Failures,
    dropped: u64,
    drop_reasons: BTreeMap<String, u64>,
    lost_tasks: u64,
    connect_secs: f64,
    sent: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    window_stalls: u64,
    deliveries: u64,
    expected: u64,
    loss: u64,
    unexpected: u64,
    duplicates: u64,
    reorders: u64,
    id_regressions: u64,
    foreign: u64,
    latency: Histogram,
    run_secs: f64,
    send_secs: f64,
    /// The window CPU figures cover: start barrier to the end of the drain.
    cpu_wall: f64,
    loadgen_cpu: Option<f64>,
    relay_cpu: Option<f64>,
    redis_cpu: Option<f64>,
    machine_busy: Option<f64>,
    relay_rss_kib: Option<u64>,
    timed_out: bool,
    /// The first few (receiver, sender) pairs with missing messages, for diagnosis.
    loss_detail: Vec<String>,
}

impl Stats {
    fn from_reports(reports: &[ClientReport], plan: &RunPlan) -> Self {
        let mut s = Stats::default();
        let acked_by: HashMap<u32, (u64, u64)> = reports
            .iter()
            .filter_map(|r| r.sender.map(|id| (id, (r.acked, r.sent))))
            .collect();
        for r in reports {
            if let Some(err) = &r.failure {
                s.failures.add(failure_kind(err), format!("{err:#}"));
                continue;
            }
            s.connections += 1;
            s.absorb(r);
            // Loss and surplus against what the relay acknowledged, per sender of the room.
            for index in 0..plan.senders {
                let id = (r.room * plan.clients + index) as u32;
                let (owed, sent) = acked_by.get(&id).copied().unwrap_or((0, 0));
                let track = r.seen.per_sender.get(&id);
                let got = track.map_or(0, |t| t.unique);
                s.expected += owed;
                s.loss += owed.saturating_sub(got);
                s.unexpected += got.saturating_sub(owed);
                if got < owed && s.loss_detail.len() < LOSS_DETAIL_LINES {
                    let missing = track.map_or_else(
                        || format!("0-{}", sent.saturating_sub(1)),
                        |t| t.missing(sent),
                    );
                    s.loss_detail.push(format!(
                        "client {} (room {}) lacks {} of sender {id}'s messages: seq {missing}",
                        r.client,
                        r.room,
                        owed - got
                    ));
                }
            }
        }
        s
    }

    fn absorb(&mut self, r: &ClientReport) {
        let seen = &r.seen;
        if let Some(reason) = &seen.dropped {
            self.dropped += 1;
            *self.drop_reasons.entry(reason.clone()).or_default() += 1;
        }
        self.sent += r.sent;
        self.acked += r.acked;
        self.window_stalls += r.stalls;
        for (code, n) in &seen.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        self.deliveries += seen.deliveries;
        self.duplicates += seen.duplicates;
        self.reorders += seen.reorders;
        self.id_regressions += seen.id_regressions;
        self.foreign += seen.foreign;
        self.latency.merge(&seen.latency);
    }

    fn timing(&mut self, before: CpuMark, after: CpuMark, end: RunEnd) {
        let last = end
            .last_delivery_at
            .max(end.senders_done_at.unwrap_or(before.at));
        self.run_secs = last.duration_since(before.at).as_secs_f64().max(1e-3);
        self.send_secs = end
            .senders_done_at
            .unwrap_or(after.at)
            .duration_since(before.at)
            .as_secs_f64()
            .max(1e-3);
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        self.cpu_wall = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
        self.loadgen_cpu = delta(before.own, after.own);
        self.relay_cpu = delta(before.relay, after.relay);
        self.redis_cpu = delta(before.redis, after.redis);
        self.machine_busy = delta(before.machine, after.machine);
    }

    /// Cores used on average over the measured window.
    fn cores(&self, cpu: Option<f64>) -> Option<f64> {
        cpu.map(|c| c / self.cpu_wall)
    }

    /// Cores that neither loadgen, the relay nor Redis used: other work on the machine (only
    /// known when both pids were given).
    fn others_cores(&self) -> Option<f64> {
        let rest = self.machine_busy? - self.loadgen_cpu? - self.relay_cpu? - self.redis_cpu?;
        self.cores(Some(rest.max(0.0)))
    }

    fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn passed(&self) -> bool {
        self.failures.total() == 0
            && self.dropped == 0
            && self.lost_tasks == 0
            && !self.timed_out
            && self.loss == 0
            && self.duplicates == 0
            && self.reorders == 0
            && self.id_regressions == 0
            && self.sent == self.acked + self.errors_total()
    }

    fn relay_us_per_delivery(&self) -> Option<f64> {
        let cpu = self.relay_cpu?;
        (self.deliveries > 0).then(|| cpu * 1e6 / self.deliveries as f64)
    }

    fn errors_text(&self) -> String {
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.join(" ")
    }

    fn print_human(&self, plan: &RunPlan, args: &RunArgs) {
        let per_sec = |n: u64, secs: f64| n as f64 / secs;
        println!(
            "rooms {} × clients {} ({} senders each), {} msgs/sender, {} B, {}",
            plan.rooms,
            plan.clients,
            plan.senders,
            plan.messages,
            args.size,
            match args.rate {
                Some(r) => format!("{r} msg/s total (window cap {})", args.window),
                None => format!("window {}", args.window),
            }
        );
        println!(
            "connections   {} ready in {:.2}s, {} failed, {} dropped {:?}",
            self.connections,
            self.connect_secs,
            self.failures.total(),
            self.dropped,
            self.drop_reasons
        );
        println!(
            "sent          {} in {:.2}s = {:.0}/s; acked {}; errors {} {}; window stalls {}",
            self.sent,
            self.send_secs,
            per_sec(self.sent, self.send_secs),
            self.acked,
            self.errors_total(),
            self.errors_text(),
            self.window_stalls
        );
        println!(
            "deliveries    {} of {} expected in {:.2}s = {:.0}/s",
            self.deliveries,
            self.expected,
            self.run_secs,
            per_sec(self.deliveries, self.run_secs)
        );
        println!(
            "checks        loss {}, duplicates {}, reorders {}, id regressions {}, unexpected {}, unparsed {}",
            self.loss, self.duplicates, self.reorders, self.id_regressions, self.unexpected, self.foreign
        );
        println!(
            "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            self.latency.quantile_ms(0.50),
            self.latency.quantile_ms(0.90),
            self.latency.quantile_ms(0.99),
            self.latency.quantile_ms(1.0)
        );
        let cores = |c: Option<f64>| self.cores(c).map_or("?".into(), |c| format!("{c:.2}"));
        println!(
            "cpu cores     loadgen {}, relay {}, redis {}, machine busy {}, others {} (over {:.2}s)",
            cores(self.loadgen_cpu),
            cores(self.relay_cpu),
            cores(self.redis_cpu),
            cores(self.machine_busy),
            self.others_cores().map_or("?".into(), |c| format!("{c:.2}")),
            self.cpu_wall
        );
        if let (Some(cpu), Some(us)) = (self.relay_cpu, self.relay_us_per_delivery()) {
            println!("relay cpu     {cpu:.2}s, {us:.2} µs per delivery");
        }
        println!(
            "result        {}{}",
            if self.passed() { "PASS" } else { "FAIL" },
            if self.timed_out { " (timeout)" } else { "" }
        );
    }

    fn to_json(&self, plan: &RunPlan, args: &RunArgs) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let opt = |x: Option<f64>| x.map(round);
        json!({
            "mode": "run",
            "rooms": plan.rooms,
            "clients": plan.clients,
            "senders": plan.senders,
            "messages_per_sender": plan.messages,
            "size": args.size,
            "window": args.window,
            "rate": args.rate,
            "duration": args.duration,
            "connections": self.connections,
            "connect_failures": self.failures.total(),
            "dropped": self.dropped,
            "connect_secs": round(self.connect_secs),
            "sent": self.sent,
            "acked": self.acked,
            "errors_total": self.errors_total(),
            "errors_text": self.errors_text(),
            "window_stalls": self.window_stalls,
            "send_secs": round(self.send_secs),
            "sent_per_sec": round(self.sent as f64 / self.send_secs),
            "run_secs": round(self.run_secs),
            "deliveries": self.deliveries,
            "deliveries_per_sec": round(self.deliveries as f64 / self.run_secs),
            "expected_deliveries": self.expected,
            "loss": self.loss,
            "duplicates": self.duplicates,
            "reorders": self.reorders,
            "id_regressions": self.id_regressions,
            "unexpected": self.unexpected,
            "unparsed": self.foreign,
            "lat_p50_ms": round(self.latency.quantile_ms(0.50)),
            "lat_p90_ms": round(self.latency.quantile_ms(0.90)),
            "lat_p99_ms": round(self.latency.quantile_ms(0.99)),
            "lat_max_ms": round(self.latency.quantile_ms(1.0)),
            "cpu_window_secs": round(self.cpu_wall),
            "loadgen_cpu_secs": opt(self.loadgen_cpu),
            "loadgen_cpu_cores": opt(self.cores(self.loadgen_cpu)),
            "relay_cpu_secs": opt(self.relay_cpu),
            "relay_cpu_cores": opt(self.cores(self.relay_cpu)),
            "relay_cpu_us_per_delivery": opt(self.relay_us_per_delivery()),
            "relay_cpu_us_per_message": opt(self.relay_cpu.filter(|_| self.sent > 0).map(|c| c * 1e6 / self.sent as f64)),
            "redis_cpu_secs": opt(self.redis_cpu),
            "redis_cpu_cores": opt(self.cores(self.redis_cpu)),
            "machine_busy_cores": opt(self.cores(self.machine_busy)),
            "others_cpu_cores": opt(self.others_cores()),
            "machine_cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "relay_rss_kib": self.relay_rss_kib,
            "timed_out": self.timed_out,
            "passed": self.passed(),
            "errors": self.errors,
            "connect_failure_kinds": self.failures.to_json(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Idle mode

/// Holds one connection open, answering pings (tungstenite replies while reading) until stop.
async fn hold_open(mut ws: Ws, mut phase: watch::Receiver<Phase>, dropped: &AtomicU64) {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    dropped.fetch_add(1, Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = phase.wait_for(|p| *p == Phase::Stop) => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[derive(Debug, Default)]
struct IdleCounters {
    ready: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

async fn idle_conn(
    target: Arc<Target>,
    source: IpAddr,
    sid: String,
    gate: Arc<Semaphore>,
    phase: watch::Receiver<Phase>,
    counters: Arc<IdleCounters>,
) -> Option<anyhow::Error> {
    // Small buffers: tungstenite's 128 KiB read buffer per connection would make loadgen, not
    // the relay, the memory hog with tens of thousands of idle sockets.
    let lean = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let opened = match gate.acquire().await {
        Ok(_permit) => open_and_join(&target, Some(source), &sid, Some(lean)).await,
        Err(e) => Err(e.into()),
    };
    match opened {
        Ok(ws) => {
            counters.ready.fetch_add(1, Relaxed);
            hold_open(ws, phase, &counters.dropped).await;
            None
        }
        Err(e) => {
            counters.failed.fetch_add(1, Relaxed);
            Some(e)
        }
    }
}

fn validate_idle(args: &IdleArgs) -> Result<()> {
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if args.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    if args.sources.is_empty() || args.sources.iter().any(|s| !s.is_loopback()) {
        bail!("--sources must be loopback addresses (127.0.0.0/8)");
    }
    if args.hold > MAX_SECS || args.timeout == 0 || args.timeout > MAX_SECS {
        bail!("--hold and --timeout must be at most {MAX_SECS} seconds");
    }
    if !(0.0..=60.0).contains(&args.settle) {
        bail!("--settle must be 0..=60 seconds");
    }
    Ok(())
}

async fn idle_mode(args: IdleArgs) -> Result<bool> {
    validate_idle(&args)?;
    let target = Arc::new(Target::parse(&args.url)?);
    check_open_files(args.connections);
    let relay = args.relay_pid.map(|p| p.to_string());
    let rss_before = relay.as_deref().and_then(rss_kib);
    let prefix = run_prefix();
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let counters = Arc::new(IdleCounters::default());
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let before = CpuMark::take(args.relay_pid);

    let handles: Vec<JoinHandle<Option<anyhow::Error>>> = (0..args.connections)
        .map(|i| {
            tokio::spawn(idle_conn(
                target.clone(),
                args.sources[i % args.sources.len()],
                format!("idle-{prefix}-{}", i % args.rooms),
                gate.clone(),
                phase_rx.clone(),
                counters.clone(),
            ))
        })
        .collect();

    let deadline = before.at + Duration::from_secs(args.timeout);
    let total = args.connections as u64;
    let all_in = loop {
        let done = counters.ready.load(Relaxed) + counters.failed.load(Relaxed);
        if done >= total {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(POLL).await;
    };
    let connected_at = CpuMark::take(args.relay_pid);
    let connect_secs = connected_at.at.duration_since(before.at).as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_after = relay.as_deref().and_then(rss_kib);
    let own_rss = rss_kib("self");
    let ready = counters.ready.load(Relaxed);
    let per_conn = match (rss_before, rss_after) {
        (Some(a), Some(b)) if ready > 0 => Some(b.saturating_sub(a) as f64 / ready as f64),
        _ => None,
    };

    let report = json!({
        "mode": "idle",
        "connections": args.connections,
        "ready": ready,
        "failed": counters.failed.load(Relaxed),
        "sources": args.sources.len(),
        "rooms": args.rooms,
        "connect_secs": (connect_secs * 1000.0).round() / 1000.0,
        "connects_per_sec": (ready as f64 / connect_secs.max(1e-3)).round(),
        "relay_rss_before_kib": rss_before,
        "relay_rss_after_kib": rss_after,
        "relay_kib_per_conn": per_conn.map(|x| (x * 100.0).round() / 100.0),
        "relay_cpu_connect_secs": match (before.relay, connected_at.relay) {
            (Some(a), Some(b)) => Some(((b - a) * 100.0).round() / 100.0),
            _ => None,
        },
        "loadgen_rss_kib": own_rss,
        "timed_out": !all_in,
    });
    if !args.json {
        println!(
            "idle: {ready}/{} connections in {connect_secs:.2}s ({:.0}/s), relay RSS {:?} → {:?} KiB = {} KiB per connection",
            args.connections,
            ready as f64 / connect_secs.max(1e-3),
            rss_before,
            rss_after,
            per_conn.map_or("?".into(), |x| format!("{x:.2}"))
        );
    }

    if args.hold > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    let _ = phase_tx.send(Phase::Stop);
    let mut failures = Failures::default();
    for handle in handles {
        if let Ok(Ok(Some(err))) = tokio::time::timeout(Duration::from_secs(10), handle).await {
            failures.add(failure_kind(&err), format!("{err:#}"));
        }
    }
    let dropped = counters.dropped.load(Relaxed);
    let mut report = report;
    report["dropped"] = json!(dropped);
    report["failure_kinds"] = failures.to_json();
    let passed = all_in && failures.total() == 0 && dropped == 0;
    report["passed"] = json!(passed);
    if !args.json {
        failures.print();
        println!(
            "result: {} ({} failed, {dropped} dropped while held)",
            if passed { "PASS" } else { "FAIL" },
            failures.total()
        );
    }
    println!("{report}");
    Ok(passed)
}

// ---------------------------------------------------------------------------------------------
// llm: LLM fan-out

/// What one member saw of the turns: deltas (with their latency from `hd.ts`), finals, and
/// whether each turn's `bd.seq` arrived in order without a hole.
#[derive(Debug, Default)]
struct LlmSeen {
    deltas: u64,
    latencies_ms: Vec<f64>,
    finals: usize,
    errors: usize,
    seq_faults: u64,
}

async fn llm_member(
    url: String,
    turns: usize,
    ready: Arc<tokio::sync::Barrier>,
) -> Result<LlmSeen> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("connect")?;
    // Our own session.join first: from then on every live frame of the room reaches us.
    loop {
        let Some(msg) = ws.next().await else {
            bail!("closed before joining")
        };
        if let Message::Text(t) = msg? {
            if t.as_str().contains("\"session.join\"") {
                break;
            }
        }
    }
    ready.wait().await;
    let mut seen = LlmSeen::default();
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    while seen.finals + seen.errors < turns {
        let Some(msg) = ws.next().await else {
            bail!("closed mid-run")
        };
        let Message::Text(t) = msg? else { continue };
        let v: Value = serde_json::from_str(t.as_str()).context("relay sent non-JSON")?;
        match v["hd"]["event"].as_str() {
            Some("llm.delta") => {
                seen.deltas += 1;
                if let Some(ts) = v["hd"]["ts"].as_u64() {
                    seen.latencies_ms
                        .push((now_us() / 1000).saturating_sub(ts) as f64);
                }
                let turn = v["hd"]["turn_id"].as_str().unwrap_or_default().to_owned();
                let expected = next_seq.entry(turn).or_insert(0);
                if v["bd"]["seq"].as_u64() != Some(*expected) {
                    seen.seq_faults += 1;
                }
                *expected = v["bd"]["seq"].as_u64().unwrap_or(*expected) + 1;
            }
            Some("llm.response") => seen.finals += 1,
            Some("llm.error") => seen.errors += 1,
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(seen)
}

async fn llm_mode(args: LlmArgs) -> Result<bool> {
    Target::parse(&args.url)?;
    let sid = format!("llmfan-{}", now_us());
    let base = args.url.trim_end_matches('/');
    let ready = Arc::new(tokio::sync::Barrier::new(args.clients + 1));
    let members: Vec<JoinHandle<Result<LlmSeen>>> = (0..args.clients)
        .map(|i| {
            let url = format!(
                "{base}/v1/session/chat?sid={sid}&role={}",
                if i % 2 == 0 { "A" } else { "B" }
            );
            tokio::spawn(llm_member(url, args.turns, ready.clone()))
        })
        .collect();
    let bound = Duration::from_secs(args.timeout);
    tokio::time::timeout(bound, ready.wait())
        .await
        .context("members did not all join in time")?;
    let relay_cpu_before = args.relay_pid.and_then(|p| cpu_secs(&p.to_string()));
    let started = Instant::now();
    let (mut asker, _) =
        tokio_tungstenite::connect_async(format!("{base}/v1/session/chat?sid={sid}&role=user"))
            .await
            .context("asker connect")?;
    for t in 0..args.turns {
        let req = json!({"hd": {"event": "llm.request", "role": "user", "cid": format!("{sid}-q{t}")},
                         "bd": {"text": format!("question {t}: tell a long story")}});
        asker.send(Message::Text(req.to_string().into())).await?;
    }
    let mut total = LlmSeen::default();
    let mut failed_members = 0;
    for m in members {
        match tokio::time::timeout(bound, m).await {
            Ok(Ok(Ok(seen))) => {
                total.deltas += seen.deltas;
                total.latencies_ms.extend(seen.latencies_ms);
                total.finals += seen.finals;
                total.errors += seen.errors;
                total.seq_faults += seen.seq_faults;
            }
            _ => failed_members += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let relay_cpu = match (
        relay_cpu_before,
        args.relay_pid.and_then(|p| cpu_secs(&p.to_string())),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    total.latencies_ms.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| -> f64 {
        if total.latencies_ms.is_empty() {
            return 0.0;
        }
        let i = ((total.latencies_ms.len() as f64 - 1.0) * p).round() as usize;
        total.latencies_ms[i]
    };
    let ok = failed_members == 0
        && total.errors == 0
        && total.seq_faults == 0
        && total.finals == args.turns * args.clients;
    let line = json!({
        "mode": "llm", "clients": args.clients, "turns": args.turns,
        "deltas": total.deltas, "deltas_per_sec": total.deltas as f64 / secs,
        "finals": total.finals, "llm_errors": total.errors, "seq_faults": total.seq_faults,
        "failed_members": failed_members, "secs": secs,
        "lat_p50_ms": q(0.5), "lat_p99_ms": q(0.99), "lat_max_ms": q(1.0),
        "relay_cpu_secs": relay_cpu,
        "relay_cpu_us_per_delta": relay_cpu.map(|c| c * 1e6 / (total.deltas.max(1) as f64)),
        "ok": ok,
    });
    if !args.json {
        eprintln!(
            "llm fan-out: {} clients × {} turns: {} deltas in {:.2} s = {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, finals {}/{}, errors {}, seq faults {}",
            args.clients, args.turns, total.deltas, secs, total.deltas as f64 / secs, q(0.5), q(0.99),
            total.finals, args.turns * args.clients, total.errors, total.seq_faults
        );
    }
    println!("{line}");
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 12_345, 1 << 30] {
            let i = Histogram::index(v);
            assert!(i >= last);
            last = i;
            let upper = Histogram::upper(i);
            assert!(upper >= v, "{v} → bucket {i} upper {upper}");
            assert!((upper - v) as f64 <= v as f64 * 0.04 + 1.0);
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(v * 1000);
        }
        assert!((h.quantile_ms(0.5) - 500.0).abs() < 20.0);
        assert!((h.quantile_ms(0.99) - 990.0).abs() < 40.0);
        assert_eq!(h.quantile_ms(1.0), 1000.0);
    }

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        assert!(matches!(t.arrive(0), Arrival::First));
        assert!(matches!(t.arrive(2), Arrival::First));
        assert!(matches!(t.arrive(1), Arrival::Late));
        assert!(matches!(t.arrive(2), Arrival::Duplicate));
        assert_eq!(t.unique, 3);
        assert!(matches!(t.arrive(5), Arrival::First));
        assert_eq!(t.missing(9), "3-4,6-8");
    }

    #[test]
    fn loopback_only() {
        assert!(Target::parse("ws://127.0.0.1:3000").is_ok());
        assert!(Target::parse("ws://localhost:3000/").is_ok());
        assert!(Target::parse("ws://[::1]:3000").is_ok());
        assert!(Target::parse("ws://10.0.0.1:3000").is_err());
        assert!(Target::parse("ws://example.com:3000").is_err());
        assert!(Target::parse("wss://127.0.0.1:3000").is_err());
    }

    #[test]
    fn proc_cpu_parses() {
        assert!(cpu_secs("self").is_some());
        assert!(rss_kib("self").is_some());
    }
}
