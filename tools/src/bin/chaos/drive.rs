//! The drive: clients connect, send, drain and stop in phases; then the streams are read back
//! and the report is built.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chat_relay::protocol::StreamId;
use tokio::sync::{oneshot, watch};

use crate::client::{ClientState, Shared};
use crate::conn::client_task;
use crate::mirror::{llm_turns, Mirror, Reader};
use crate::redis::{llm_group_pending, RedisTarget, RelayNames};
use crate::report::Report;
use crate::{lock, secs, DriveArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
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
pub struct Ctx {
    pub args: DriveArgs,
    pub run: String,
    /// When the driver started (all reported times are relative to it).
    pub t0: Instant,
}

impl Ctx {
    pub fn t(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The room id of room number `room`.
    pub fn sid(&self, room: usize) -> String {
        room_sid(&self.run, room)
    }
}

/// The room id of room number `room` in run `run`.
pub fn room_sid(run: &str, room: usize) -> String {
    format!("chaos-{run}-{room}")
}

/// A glob matching the room ids of run `run`.
pub fn room_glob(run: &str) -> String {
    format!("chaos-{run}-*")
}

/// How a drive ended.
#[derive(Debug)]
pub enum DriveEnd {
    /// Every phase ran: the summary (text, then one JSON line) and whether every check passed.
    Checked { summary: String, passed: bool },
    /// Some clients never joined: the run could not start.
    NotJoined,
    /// The `--timeout` bound was hit.
    TimedOut,
}

impl DriveEnd {
    /// 0 every check passed, 1 a violation or the timeout, 2 the run could not start.
    pub fn exit_code(&self) -> u8 {
        match self {
            DriveEnd::Checked { passed: true, .. } => 0,
            DriveEnd::Checked { passed: false, .. } | DriveEnd::TimedOut => 1,
            DriveEnd::NotJoined => 2,
        }
    }
}

/// `chaos drive`: against nodes someone else started; the summary goes to stdout.
pub async fn drive_alone(args: DriveArgs) -> Result<u8> {
    let end = drive(args, None).await?;
    if let DriveEnd::Checked { summary, .. } = &end {
        print!("{summary}");
    }
    Ok(end.exit_code())
}

/// Runs the drive; `joined` fires when every client is connected and sending starts.
pub async fn drive(args: DriveArgs, joined: Option<oneshot::Sender<()>>) -> Result<DriveEnd> {
    if args.nodes.is_empty() {
        bail!("--nodes: at least one relay");
    }
    for n in &args.nodes {
        relay_tools::loopback::parse(n)?;
    }
    if let Some(r) = &args.redis {
        relay_tools::loopback::parse(r)?;
    }
    for seed in &args.redis_cluster {
        relay_tools::loopback::parse(&format!("redis://{seed}"))?;
    }
    if args.rooms == 0 || args.clients == 0 || args.rooms * args.clients > 5000 {
        bail!("--rooms and --clients: at least 1, at most 5000 clients in all");
    }
    let run = args
        .run
        .clone()
        .unwrap_or_else(|| format!("r{}", relay_tools::clock::epoch_ms() % 100_000_000));
    if run.is_empty() || run.len() > 40 || !run.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("--run: 1-40 ASCII letters or digits");
    }
    let overall = secs(args.timeout);
    let ctx = Arc::new(Ctx {
        args,
        run,
        t0: Instant::now(),
    });
    match tokio::time::timeout(overall, drive_inner(ctx.clone(), joined)).await {
        Ok(res) => res,
        Err(_) => {
            eprintln!(
                "chaos: the drive exceeded --timeout {}s; aborting",
                ctx.args.timeout
            );
            Ok(DriveEnd::TimedOut)
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

/// Reads every room after its mirror's cursor; `false` if some room could not be read.
async fn catch_up_all(reader: &mut Reader, mirrors: &mut [Mirror], sids: &[String]) -> bool {
    let mut ok = true;
    for (m, sid) in mirrors.iter_mut().zip(sids) {
        if let Err(err) = reader.catch_up(sid, m).await {
            eprintln!("[chaos] reading {sid}: {err:#}");
            ok = false;
        }
    }
    ok
}

/// Until every stored `@llm` message has a final entry (or `limit` passes); `true` if so.
async fn wait_llm_turns(
    ctx: &Ctx,
    reader: &mut Reader,
    mirrors: &mut [Mirror],
    sids: &[String],
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    let mut next_progress = Instant::now();
    loop {
        let read_ok = catch_up_all(reader, mirrors, sids).await;
        let (asked, finals) = llm_turns(&ctx.run, mirrors);
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
            return true;
        }
        if Instant::now() >= deadline {
            return false;
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
    }
}

fn said(ctx: &Ctx, what: &str) {
    eprintln!("[chaos t={:5.1}s] {what}", ctx.t());
}

async fn drive_inner(ctx: Arc<Ctx>, joined: Option<oneshot::Sender<()>>) -> Result<DriveEnd> {
    let a = &ctx.args;
    let nodes = a.nodes.len();
    let sids: Vec<String> = (0..a.rooms).map(|m| ctx.sid(m)).collect();
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
    let all_joined = wait_until(&ctx, &clients, "connect", secs(a.join_wait), || {
        clients.iter().all(|c| lock(c).first.is_some())
    })
    .await;
    if !all_joined {
        let missing = clients.iter().filter(|c| lock(c).first.is_none()).count();
        let _ = phase_tx.send(Phase::Stop);
        eprintln!(
            "chaos: {missing} clients could not join within {}s; is the relay up?",
            a.join_wait
        );
        return Ok(DriveEnd::NotJoined);
    }
    if let Some(path) = &a.ready_file {
        std::fs::write(path, format!("{}\n", relay_tools::clock::epoch_ms()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    said(
        &ctx,
        &format!("all {} clients joined; sending", clients.len()),
    );
    let _ = phase_tx.send(Phase::Send);
    if let Some(tx) = joined {
        let _ = tx.send(());
    }

    // 2. Send for the duration.
    let send_until = Instant::now() + secs(a.duration);
    wait_until(&ctx, &clients, "send", secs(a.duration), || {
        Instant::now() >= send_until
    })
    .await;
    let _ = phase_tx.send(Phase::Drain);
    said(&ctx, "sending stopped; waiting for acks");

    // 3. Every message acked (the clients keep resending).
    let all_acked = wait_until(&ctx, &clients, "acks", secs(a.ack_wait), || {
        clients.iter().all(|c| lock(c).unacked.is_empty())
    })
    .await;
    said(
        &ctx,
        if all_acked {
            "every message acked"
        } else {
            "gave up waiting for acks"
        },
    );

    // 4. Every stored @llm message answered (read the streams over HTTP).
    let mut reader = Reader::new(&a.nodes)?;
    let mut mirrors: Vec<Mirror> = (0..a.rooms).map(|_| Mirror::default()).collect();
    let llm_done = wait_llm_turns(&ctx, &mut reader, &mut mirrors, &sids, secs(a.llm_wait)).await;
    said(
        &ctx,
        if llm_done {
            "every LLM turn has its final entry"
        } else {
            "gave up waiting for LLM turns"
        },
    );

    // 5. The tails now; every client must receive its room up to there.
    for (m, sid) in mirrors.iter_mut().zip(&sids) {
        reader.catch_up(sid, m).await?;
    }
    let tails: Vec<Option<StreamId>> = mirrors.iter().map(Mirror::tail).collect();
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
    said(
        &ctx,
        &if drained {
            "every client reached its room's tail".to_owned()
        } else {
            format!("{} clients never reached the tail", lagging.len())
        },
    );

    // Before the clients leave (their session.leave entries are new work for the group).
    let target = match (&a.redis, a.redis_cluster.is_empty()) {
        (Some(url), _) => Some(RedisTarget::Url(url.clone())),
        (None, false) => Some(RedisTarget::Cluster(a.redis_cluster.clone())),
        (None, true) => None,
    };
    let pending = match target {
        Some(target) => Some(llm_group_pending(&target, &RelayNames::defaults()?, &sids).await),
        None => None,
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
    Ok(DriveEnd::Checked {
        summary: report.render(&ctx, &clients, &mirrors),
        passed: report.violations.is_empty(),
    })
}
