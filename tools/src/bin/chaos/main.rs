//! `chaos`: the fault run for chat-relay (run by `scripts/chaos.sh`). Loopback only.
//!
//! ```text
//! chaos run [--short] [--cluster] [--keep] [--relay-bin target/debug/chat-relay]
//! chaos drive --nodes ws://127.0.0.1:P1,ws://127.0.0.1:P2 --rooms 4 --clients 4 --duration 10
//! ```
//!
//! `run` is the whole fault run: it starts redis-server (AOF, `appendfsync always`; with
//! `--cluster` a local 3-master cluster via `scripts/cluster.sh`), two relay nodes, two LLM
//! workers and a slow fake OpenAI server, drives clients against the nodes (below) and plays a
//! timeline of faults while they send: `kill -9` a node, restart Redis on its AOF, `kill -9` the
//! LLM worker holding the most turn leases, i.e. mid-turn (see [`plan`]). Then it checks that
//! every process is still up, that no log shows a panic, and prints the faults and the drive's
//! summary. Exit 0: every check passed; 1: a violation (a check, a process that died on its
//! own, a panic, a timeout); 2: the run could not be set up. Logs stay in the temp dir on
//! failure (or with `--keep`).
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
//! | LLM catch-up | a client's rebuilt reply (llm.start sets the text, next-seq deltas append) differs from the stored one, or a delta came out of sequence |
//! | liveness | a message never acked, refused for good, or a client that never caught up |
//!
//! Output: a readable summary on stdout, then one JSON line (`{"chaos": ...}`). Exit code 0 when
//! every check passed, 1 on a violation, 2 when the run could not start (usage, no relay).

mod client;
mod cluster;
mod conn;
mod drive;
mod fault_run;
mod faults;
mod mirror;
mod plan;
mod procs;
mod redis;
mod report;
mod summary;
mod turns;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Samples kept per kind of violation.
const SAMPLES: usize = 10;

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Fault run for chat-relay: processes, faults, clients and checks (loopback only; see scripts/chaos.sh)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The whole fault run: Redis, two relay nodes, two LLM workers, a fake LLM, the clients and
    /// a timeline of faults; then the checks.
    Run(RunArgs),
    /// Only the clients and the checks, against relay nodes started by someone else.
    Drive(DriveArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// CI form: 3 rooms x 4 clients, 10 s of traffic, one round of faults.
    #[arg(long)]
    pub short: bool,
    /// Against a local 3-master Redis Cluster; the Redis fault restarts the busiest master.
    #[arg(long)]
    pub cluster: bool,
    /// Keep the temp dir with every log even when the run passes.
    #[arg(long)]
    pub keep: bool,
    /// The chat-relay binary (default: next to this one, i.e. the same build profile).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// scripts/cluster.sh (default: the one in this source tree).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster.sh"))]
    pub cluster_script: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct DriveArgs {
    /// Relay nodes, `ws://127.0.0.1:PORT`, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// Redis URL (optional): used only to report the LLM group's pending entries at the end.
    #[arg(long, conflicts_with = "redis_cluster")]
    pub redis: Option<String>,
    /// Redis Cluster seeds, `HOST:PORT`, comma-separated (optional, instead of `--redis`).
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Run id: part of room names and cids (default: the current time).
    #[arg(long)]
    pub run: Option<String>,
    /// Rooms.
    #[arg(long, default_value_t = 4)]
    pub rooms: usize,
    /// Clients per room (roles alternate A, B; nodes alternate).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Each client sends one message per interval while connected, ms.
    #[arg(long, default_value_t = 50)]
    pub interval_ms: u64,
    /// Every K-th message of an LLM sender mentions `@llm` (0: never).
    #[arg(long, default_value_t = 20)]
    pub llm_every: u64,
    /// LLM senders per room (the first clients of each room).
    #[arg(long, default_value_t = 1)]
    pub llm_senders: usize,
    /// Resend a message unanswered this long on one connection, ms.
    #[arg(long, default_value_t = 3000)]
    pub ack_timeout_ms: u64,
    /// Longest wait for every client's first connection, s.
    #[arg(long, default_value_t = 20.0)]
    pub join_wait: f64,
    /// After sending: longest wait until every message is acked, s.
    #[arg(long, default_value_t = 20.0)]
    pub ack_wait: f64,
    /// Then: longest wait until every `@llm` turn has its final entry, s.
    #[arg(long, default_value_t = 30.0)]
    pub llm_wait: f64,
    /// Then: longest wait until every client received its room up to the tail, s.
    #[arg(long, default_value_t = 15.0)]
    pub drain_wait: f64,
    /// Bound on the whole drive, s.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Written (with the epoch ms) when every client is connected and sending starts.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Progress line period on stderr, s (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub progress: f64,
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
            Cmd::Run(args) => fault_run::run(args).await,
            Cmd::Drive(args) => drive::drive_alone(args).await,
        }
    });
    // Client tasks still winding down must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    match res {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("chaos: {err:#}");
            ExitCode::from(2)
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
