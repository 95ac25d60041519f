//! `loadgen`: load generator and delivery checker for the relay. Loopback only.
//!
//! ```text
//! loadgen run  --url ws://127.0.0.1:3000 --rooms 50 --clients 4 --messages 200 --window 32
//! loadgen run  --url ws://127.0.0.1:3000 --rooms 1 --clients 200 --senders 20 --rate 2000 --duration 10
//! loadgen idle --url ws://127.0.0.1:3000 --connections 5000 --relay-pid PID
//! loadgen llm  --url ws://127.0.0.1:3000 --clients 100 --turns 10
//! loadgen run  --server reference --url ws://127.0.0.1:18201 ...   # the lean reference relay
//! loadgen run  --url ws://127.0.0.1:3001,ws://127.0.0.1:3002 --relay-pid P1,P2 --redis-pid R1,R2,R3 ...
//! ```
//!
//! Several relay nodes: `--url` takes a list, and the clients of each room are spread over the
//! nodes round-robin (client `i` of room `r` on node `(r + i) % nodes`), so every room with at
//! least as many clients as nodes has members on every node and its messages cross nodes
//! through Redis. `--relay-pid` lists the nodes' PIDs in the same order as `--url`: CPU time,
//! memory, connections and deliveries are reported per node and in total. `--redis-pid` may list
//! a cluster's masters; their CPU time is reported per process and in total.
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
//! `--server reference` measures `reference-relay` (benchmark baseline; same `{hd,bd}` protocol,
//! no join, no ack, no stream id): a client is ready once its own probe frame comes back, and a
//! sender's message counts as answered when it receives its own copy.
//!
//! Open files: this binary does not raise its own `RLIMIT_NOFILE` (that needs libc, and the crate
//! forbids unsafe code); `scripts/bench.sh` runs `ulimit -n` before starting the relay and
//! loadgen. A connect failing with EMFILE is reported as such.

// `json!` with the run's ~40 figures nests deeper than the default limit.
#![recursion_limit = "256"]

mod histogram;
mod idle;
mod llm;
mod observe;
mod procfs;
mod run;
mod session;
mod stats;
mod target;

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Upper bounds, so a typo cannot turn a benchmark into a denial of service on the machine.
const MAX_CONNECTIONS: usize = 200_000;
const MAX_TOTAL_MESSAGES: u64 = 100_000_000;
const MAX_SECS: u64 = 3_600;
/// The relay refuses frames above 64 KiB by default; stay below with the envelope around the text.
const MAX_SIZE: usize = 60_000;

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

/// Which server loadgen talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Server {
    /// chat-relay: `session.join` on connect, `chat.ack` per message, `hd.id` on deliveries.
    Relay,
    /// reference-relay: frames are echoed unchanged to the room, the sender included.
    Reference,
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
    /// Relay address, `ws://HOST:PORT` with a loopback HOST; several (comma-separated or
    /// repeated) spread each room's clients over the nodes round-robin.
    #[arg(
        long,
        env = "LOADGEN_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:3000"
    )]
    url: Vec<String>,
    /// The server's protocol: chat-relay, or the lean reference relay.
    #[arg(long, value_enum, default_value_t = Server::Relay)]
    server: Server,
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
    /// Relay process ids, one per `--url` in the same order (comma-separated or repeated):
    /// report their CPU time during the run, per node and in total.
    #[arg(long, value_delimiter = ',')]
    relay_pid: Vec<u32>,
    /// Redis process ids (a cluster's masters: comma-separated or repeated): report their CPU
    /// time during the run, per process and in total.
    #[arg(long, value_delimiter = ',')]
    redis_pid: Vec<u32>,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Print only one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct IdleArgs {
    /// Relay address, `ws://HOST:PORT` with a loopback HOST; several (comma-separated or
    /// repeated) spread each room's connections over the nodes round-robin.
    #[arg(
        long,
        env = "LOADGEN_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:3000"
    )]
    url: Vec<String>,
    /// The server's protocol: chat-relay (wait for `session.join`), or the reference relay
    /// (connected once the handshake is done).
    #[arg(long, value_enum, default_value_t = Server::Relay)]
    server: Server,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Local source addresses, used round-robin (each gives its own ~28k ephemeral ports).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Rooms the connections are spread over (`idle-<prefix>-<i % rooms>`).
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Relay process ids, one per `--url` in the same order (comma-separated or repeated):
    /// report each one's resident memory per connection.
    #[arg(long, value_delimiter = ',')]
    relay_pid: Vec<u32>,
    /// Redis process ids (a cluster's masters), for their CPU time while the connections idle
    /// (with `--steady`).
    #[arg(long, value_delimiter = ',')]
    redis_pid: Vec<u32>,
    /// Seconds to measure the relays' and Redis' CPU time while every connection idles
    /// (presence heartbeats, pings), after `--settle`; 0 = skip.
    #[arg(long, default_value_t = 0.0)]
    steady: f64,
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
        Mode::Run(args) => run::run_mode(args).await,
        Mode::Idle(args) => idle::idle_mode(args).await,
        Mode::Llm(args) => llm::llm_mode(args).await,
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
