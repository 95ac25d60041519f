//! LLM fan-out: one room of members, concurrent LLM turns asked at once, every delta counted at
//! every member with its latency from the relay's `hd.ts`, each turn's `bd.seq` checked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::procfs::cpu_secs;
use crate::target::Target;
use crate::{LlmArgs, Server};

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
                        .push(relay_tools::clock::epoch_ms().saturating_sub(ts) as f64);
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

pub async fn llm_mode(args: LlmArgs) -> Result<bool> {
    Target::parse(&args.url, Server::Relay)?;
    let sid = format!("llmfan-{}", relay_tools::clock::epoch_us());
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
