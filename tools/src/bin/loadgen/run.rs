//! A run: rooms of clients started together, then drained until every owed delivery arrived,
//! deliveries stall, or the deadline passes; the figures come from the clients' reports.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::procfs::{run_prefix, CpuMark};
use crate::session::{client, ClientReport, ClientSpec, Phase, Progress, SenderPlan};
use crate::stats::Stats;
use crate::target::{check_open_files, node_of, Nodes};
use crate::{RunArgs, MAX_CONNECTIONS, MAX_SECS, MAX_SIZE, MAX_TOTAL_MESSAGES};

/// After every sender is answered, how long deliveries may stall before the rest counts as lost.
const DRAIN_STALL: Duration = Duration::from_secs(5);
/// How often the coordinator looks at the shared counters.
pub const POLL: Duration = Duration::from_millis(20);

/// The run's shape after defaults and checks.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// Relay nodes the clients are spread over.
    pub nodes: usize,
    pub rooms: usize,
    pub clients: usize,
    pub senders: usize,
    pub messages: u64,
    pace: Option<Duration>,
}

impl RunPlan {
    fn from_args(args: &RunArgs, nodes: usize) -> Result<Self> {
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
            nodes,
            rooms: args.rooms,
            clients: args.clients,
            senders,
            messages,
            pace,
        })
    }

    pub fn connections(&self) -> usize {
        self.rooms * self.clients
    }

    pub fn total_senders(&self) -> u64 {
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
            node: node_of(room, index, self.nodes),
            client: (room * self.clients + index) as u32,
            sid: format!("{prefix}-{room}"),
            plan,
        }
    }
}

/// How the send/drain phase ended.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd {
    /// All senders answered.
    pub senders_done_at: Option<Instant>,
    /// Last time the delivery count moved.
    pub last_delivery_at: Instant,
    pub timed_out: bool,
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

pub async fn run_mode(args: RunArgs) -> Result<bool> {
    let nodes = Nodes::parse(&args.url, args.server, &args.relay_pid, &args.redis_pid)?;
    let plan = RunPlan::from_args(&args, nodes.len())?;
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
                nodes.targets[spec.node].clone(),
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
    let before = CpuMark::take(&nodes.relay_pids, &nodes.redis_pids);
    let _ = phase_tx.send(Phase::Running(before.at));
    let end = wait_drained(
        &progress,
        plan.total_senders(),
        before.at,
        deadline,
        args.json,
    )
    .await;
    let after = CpuMark::take(&nodes.relay_pids, &nodes.redis_pids);
    let _ = phase_tx.send(Phase::Stop);
    let (reports, lost_tasks) = collect(handles).await;

    let mut stats = Stats::from_reports(&reports, &plan);
    stats.connect_secs = connect_secs;
    stats.lost_tasks = lost_tasks;
    stats.timed_out = end.timed_out;
    stats.timing(&before, &after, end);
    stats.node_rss(&nodes);
    for line in &stats.loss_detail {
        eprintln!("loadgen: loss: {line}");
    }
    if !args.json {
        stats.failures.print();
        stats.print_human(&plan, &args, &nodes);
    }
    println!("{}", stats.to_json(&plan, &args, &nodes));
    Ok(stats.passed())
}
