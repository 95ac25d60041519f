//! Idle mode: many connections that only listen; the relay's resident memory per connection
//! and the time it takes to connect them all.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::procfs::{deltas, rss_kib, run_prefix, total, CpuMark};
use crate::run::POLL;
use crate::session::Phase;
use crate::target::{
    check_open_files, failure_kind, node_of, open_ready, Failures, Nodes, Ready, Target, Ws,
};
use crate::{IdleArgs, Server, MAX_CONNECTIONS, MAX_SECS};

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
    /// Ready connections per relay node.
    ready_on: Vec<AtomicU64>,
}

async fn idle_conn(
    target: Arc<Target>,
    node: usize,
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
    let ready = Ready::for_idle(target.server);
    let opened = match gate.acquire().await {
        Ok(_permit) => open_ready(&target, Some(source), &sid, Some(lean), ready, "").await,
        Err(e) => Err(e.into()),
    };
    match opened {
        Ok(ws) => {
            counters.ready.fetch_add(1, Relaxed);
            counters.ready_on[node].fetch_add(1, Relaxed);
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
    if !(0.0..=MAX_SECS as f64).contains(&args.steady) {
        bail!("--steady must be 0..={MAX_SECS} seconds");
    }
    Ok(())
}

/// Resident memory of each relay node (`None` without a PID).
fn rss_each(nodes: &Nodes) -> Vec<Option<u64>> {
    (0..nodes.len())
        .map(|i| nodes.relay_pid(i).and_then(|p| rss_kib(&p.to_string())))
        .collect()
}

/// The sum, known only when every part is.
fn sum_known(values: &[Option<u64>]) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.iter().copied().sum()
}

/// KiB of growth per connection.
fn per_conn(before: Option<u64>, after: Option<u64>, ready: u64) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if ready > 0 => Some(b.saturating_sub(a) as f64 / ready as f64),
        _ => None,
    }
}

pub async fn idle_mode(args: IdleArgs) -> Result<bool> {
    validate_idle(&args)?;
    let nodes = Nodes::parse(&args.url, args.server, &args.relay_pid, &args.redis_pid)?;
    check_open_files(args.connections);
    let rss_before = rss_each(&nodes);
    let prefix = run_prefix();
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let counters = Arc::new(IdleCounters {
        ready_on: (0..nodes.len()).map(|_| AtomicU64::new(0)).collect(),
        ..IdleCounters::default()
    });
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let before = CpuMark::take(&nodes.relay_pids, &nodes.redis_pids);

    let handles: Vec<JoinHandle<Option<anyhow::Error>>> = (0..args.connections)
        .map(|i| {
            let (room, index) = (i % args.rooms, i / args.rooms);
            let node = node_of(room, index, nodes.len());
            tokio::spawn(idle_conn(
                nodes.targets[node].clone(),
                node,
                args.sources[i % args.sources.len()],
                format!("idle-{prefix}-{room}"),
                gate.clone(),
                phase_rx.clone(),
                counters.clone(),
            ))
        })
        .collect();

    let deadline = before.at + Duration::from_secs(args.timeout);
    let total_conns = args.connections as u64;
    let all_in = loop {
        let done = counters.ready.load(Relaxed) + counters.failed.load(Relaxed);
        if done >= total_conns {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(POLL).await;
    };
    let connected_at = CpuMark::take(&nodes.relay_pids, &nodes.redis_pids);
    let connect_secs = connected_at.at.duration_since(before.at).as_secs_f64();
    let connect_cpu = deltas(&before.relays, &connected_at.relays);
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_after = rss_each(&nodes);
    let own_rss = rss_kib("self");
    let ready = counters.ready.load(Relaxed);
    let ready_on: Vec<u64> = counters.ready_on.iter().map(|n| n.load(Relaxed)).collect();
    let (rss_before_all, rss_after_all) = (sum_known(&rss_before), sum_known(&rss_after));
    let kib_per_conn = per_conn(rss_before_all, rss_after_all, ready);

    // Steady state: what idle connections cost per second (presence heartbeats, pings).
    let steady = (args.steady > 0.0).then_some(args.steady);
    let (steady_relays, steady_redis, steady_secs) = match steady {
        Some(secs) => {
            let a = CpuMark::take(&nodes.relay_pids, &nodes.redis_pids);
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let b = CpuMark::take(&nodes.relay_pids, &nodes.redis_pids);
            let wall = b.at.duration_since(a.at).as_secs_f64();
            (
                deltas(&a.relays, &b.relays),
                deltas(&a.redis, &b.redis),
                wall,
            )
        }
        None => (Vec::new(), Vec::new(), 0.0),
    };
    let round = |x: f64, scale: f64| (x * scale).round() / scale;
    let cores = |cpu: Option<f64>| {
        (steady_secs > 0.0)
            .then_some(cpu)
            .flatten()
            .map(|c| round(c / steady_secs, 1e4))
    };
    // CPU µs per connection per second of idling.
    let us_per_conn_sec = |cpu: Option<f64>| {
        (steady_secs > 0.0 && ready > 0)
            .then_some(cpu)
            .flatten()
            .map(|c| round(c * 1e6 / (ready as f64 * steady_secs), 1e3))
    };

    let relay_nodes: Vec<Value> = (0..nodes.len())
        .map(|i| {
            json!({
                "node": i,
                "url": nodes.url(i),
                "pid": nodes.relay_pid(i),
                "ready": ready_on[i],
                "rss_before_kib": rss_before[i],
                "rss_after_kib": rss_after[i],
                "kib_per_conn": per_conn(rss_before[i], rss_after[i], ready_on[i]).map(|x| round(x, 100.0)),
                "cpu_connect_secs": connect_cpu.get(i).copied().flatten().map(|x| round(x, 100.0)),
                "steady_cpu_cores": cores(steady_relays.get(i).copied().flatten()),
            })
        })
        .collect();
    let redis_nodes: Vec<Value> = nodes
        .redis_pids
        .iter()
        .enumerate()
        .map(|(i, pid)| json!({"pid": pid, "steady_cpu_cores": cores(steady_redis.get(i).copied().flatten())}))
        .collect();
    let (relay_steady, redis_steady) = (total(&steady_relays), total(&steady_redis));
    let report = json!({
        "mode": "idle",
        "server": match args.server {
            Server::Relay => "relay",
            Server::Reference => "reference",
        },
        "connections": args.connections,
        "ready": ready,
        "failed": counters.failed.load(Relaxed),
        "sources": args.sources.len(),
        "rooms": args.rooms,
        "connect_secs": round(connect_secs, 1000.0),
        "connects_per_sec": (ready as f64 / connect_secs.max(1e-3)).round(),
        "relay_rss_before_kib": rss_before_all,
        "relay_rss_after_kib": rss_after_all,
        "relay_kib_per_conn": kib_per_conn.map(|x| round(x, 100.0)),
        "relay_cpu_connect_secs": total(&connect_cpu).map(|x| round(x, 100.0)),
        "loadgen_rss_kib": own_rss,
        "timed_out": !all_in,
        "nodes": nodes.len(),
        "steady_secs": round(steady_secs, 1000.0),
        "relay_steady_cpu_cores": cores(relay_steady),
        "relay_steady_us_per_conn_sec": us_per_conn_sec(relay_steady),
        "redis_steady_cpu_cores": cores(redis_steady),
        "redis_steady_us_per_conn_sec": us_per_conn_sec(redis_steady),
        "relay_nodes": relay_nodes,
        "redis_nodes": redis_nodes,
    });
    if !args.json {
        println!(
            "idle: {ready}/{} connections in {connect_secs:.2}s ({:.0}/s), relay RSS {:?} → {:?} KiB = {} KiB per connection",
            args.connections,
            ready as f64 / connect_secs.max(1e-3),
            rss_before_all,
            rss_after_all,
            kib_per_conn.map_or("?".into(), |x| format!("{x:.2}"))
        );
        if nodes.len() > 1 {
            for (i, ready) in ready_on.iter().enumerate() {
                println!(
                    "  node {i} {}: {ready} connections, RSS {:?} → {:?} KiB = {} KiB per connection",
                    nodes.url(i),
                    rss_before[i],
                    rss_after[i],
                    per_conn(rss_before[i], rss_after[i], *ready)
                        .map_or("?".into(), |x| format!("{x:.2}"))
                );
            }
        }
        if steady.is_some() {
            println!(
                "idle steady: {steady_secs:.1}s, relay {} cores ({} µs per connection-second), redis {} cores ({} µs per connection-second)",
                report["relay_steady_cpu_cores"],
                report["relay_steady_us_per_conn_sec"],
                report["redis_steady_cpu_cores"],
                report["redis_steady_us_per_conn_sec"]
            );
        }
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
