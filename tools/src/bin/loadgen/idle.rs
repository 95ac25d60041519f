//! Idle mode: many connections that only listen; the relay's resident memory per connection
//! and the time it takes to connect them all.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::procfs::{rss_kib, run_prefix, CpuMark};
use crate::run::POLL;
use crate::session::Phase;
use crate::target::{check_open_files, failure_kind, open_ready, Failures, Ready, Target, Ws};
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
    let ready = Ready::for_idle(target.server);
    let opened = match gate.acquire().await {
        Ok(_permit) => open_ready(&target, Some(source), &sid, Some(lean), ready, "").await,
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

pub async fn idle_mode(args: IdleArgs) -> Result<bool> {
    validate_idle(&args)?;
    let target = Arc::new(Target::parse(&args.url, args.server)?);
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
        "server": match args.server {
            Server::Relay => "relay",
            Server::Reference => "reference",
        },
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
