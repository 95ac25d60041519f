//! Every figure of a run, from the clients' reports and the CPU readings around it: the human
//! summary and the one JSON line `scripts/bench.sh` reads.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::histogram::Histogram;
use crate::procfs::{deltas, rss_kib, total, CpuMark};
use crate::run::{RunEnd, RunPlan};
use crate::session::ClientReport;
use crate::target::{failure_kind, Failures, Nodes};
use crate::{RunArgs, Server};

/// How many (receiver, sender) pairs with loss are described on stderr.
const LOSS_DETAIL_LINES: usize = 20;

/// One relay node's share of a run: its clients, what they received, what the node cost.
#[derive(Debug, Default, Clone)]
pub struct NodeStats {
    pub connections: u64,
    /// Deliveries received by the clients connected to this node.
    pub deliveries: u64,
    /// The node's CPU seconds over the measured window.
    pub cpu: Option<f64>,
    pub rss_kib: Option<u64>,
}

/// Every figure a run reports.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: u64,
    pub failures: Failures,
    pub dropped: u64,
    pub drop_reasons: BTreeMap<String, u64>,
    pub lost_tasks: u64,
    pub connect_secs: f64,
    pub sent: u64,
    pub acked: u64,
    pub errors: BTreeMap<String, u64>,
    pub window_stalls: u64,
    pub deliveries: u64,
    pub expected: u64,
    pub loss: u64,
    pub unexpected: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub id_regressions: u64,
    pub foreign: u64,
    pub latency: Histogram,
    pub run_secs: f64,
    pub send_secs: f64,
    /// The window CPU figures cover: start barrier to the end of the drain.
    pub cpu_wall: f64,
    pub loadgen_cpu: Option<f64>,
    /// All relay nodes together.
    pub relay_cpu: Option<f64>,
    /// All Redis processes together.
    pub redis_cpu: Option<f64>,
    pub machine_busy: Option<f64>,
    /// All relay nodes together.
    pub relay_rss_kib: Option<u64>,
    /// Per relay node, in `--url` order.
    pub per_node: Vec<NodeStats>,
    /// CPU seconds per Redis process, in `--redis-pid` order.
    pub redis_cpu_each: Vec<Option<f64>>,
    pub timed_out: bool,
    /// The first few (receiver, sender) pairs with missing messages, for diagnosis.
    pub loss_detail: Vec<String>,
}

impl NodeStats {
    fn us_per_delivery(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.deliveries > 0).then(|| cpu * 1e6 / self.deliveries as f64)
    }
}

impl Stats {
    pub fn from_reports(reports: &[ClientReport], plan: &RunPlan) -> Self {
        let mut s = Stats {
            per_node: vec![NodeStats::default(); plan.nodes],
            ..Stats::default()
        };
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
            if let Some(node) = s.per_node.get_mut(r.node) {
                node.connections += 1;
                node.deliveries += r.seen.deliveries;
            }
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

    pub fn timing(&mut self, before: &CpuMark, after: &CpuMark, end: RunEnd) {
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
        let relays = deltas(&before.relays, &after.relays);
        for (node, cpu) in self.per_node.iter_mut().zip(&relays) {
            node.cpu = *cpu;
        }
        self.relay_cpu = total(&relays);
        self.redis_cpu_each = deltas(&before.redis, &after.redis);
        self.redis_cpu = total(&self.redis_cpu_each);
        self.machine_busy = delta(before.machine, after.machine);
    }

    /// Each node's resident memory now, and their sum.
    pub fn node_rss(&mut self, nodes: &Nodes) {
        for (i, node) in self.per_node.iter_mut().enumerate() {
            node.rss_kib = nodes.relay_pid(i).and_then(|p| rss_kib(&p.to_string()));
        }
        self.relay_rss_kib = if self.per_node.is_empty() || nodes.relay_pids.is_empty() {
            None
        } else {
            self.per_node.iter().map(|n| n.rss_kib).sum()
        };
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

    pub fn passed(&self) -> bool {
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

    pub fn print_human(&self, plan: &RunPlan, args: &RunArgs, nodes: &Nodes) {
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
        if plan.nodes > 1 || self.redis_cpu_each.len() > 1 {
            for (i, node) in self.per_node.iter().enumerate() {
                println!(
                    "node {i}        {} (pid {}): {} connections, {} deliveries, cpu {} s = {} cores, {} µs per delivery",
                    nodes.url(i),
                    nodes.relay_pid(i).map_or("?".into(), |p| p.to_string()),
                    node.connections,
                    node.deliveries,
                    node.cpu.map_or("?".into(), |c| format!("{c:.2}")),
                    cores(node.cpu),
                    node.us_per_delivery().map_or("?".into(), |us| format!("{us:.2}")),
                );
            }
            for (pid, cpu) in nodes.redis_pids.iter().zip(&self.redis_cpu_each) {
                println!(
                    "redis {pid:<7} cpu {} s = {} cores",
                    cpu.map_or("?".into(), |c| format!("{c:.2}")),
                    cores(*cpu)
                );
            }
        }
        println!(
            "result        {}{}",
            if self.passed() { "PASS" } else { "FAIL" },
            if self.timed_out { " (timeout)" } else { "" }
        );
    }

    pub fn to_json(&self, plan: &RunPlan, args: &RunArgs, nodes: &Nodes) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let opt = |x: Option<f64>| x.map(round);
        let per_cpu_sec =
            |n: u64, cpu: Option<f64>| cpu.filter(|c| *c > 0.0).map(|c| (n as f64 / c).round());
        let relay_nodes: Vec<Value> = self
            .per_node
            .iter()
            .enumerate()
            .map(|(i, node)| {
                json!({
                    "node": i,
                    "url": nodes.url(i),
                    "pid": nodes.relay_pid(i),
                    "connections": node.connections,
                    "deliveries": node.deliveries,
                    "cpu_secs": opt(node.cpu),
                    "cpu_cores": opt(self.cores(node.cpu)),
                    "cpu_us_per_delivery": opt(node.us_per_delivery()),
                    "rss_kib": node.rss_kib,
                })
            })
            .collect();
        let redis_nodes: Vec<Value> = nodes
            .redis_pids
            .iter()
            .zip(&self.redis_cpu_each)
            .map(|(pid, cpu)| json!({"pid": pid, "cpu_secs": opt(*cpu), "cpu_cores": opt(self.cores(*cpu))}))
            .collect();
        let mut report = self.base_json(plan, args);
        report["nodes"] = json!(plan.nodes);
        report["appends_per_sec"] = json!(round(self.acked as f64 / self.send_secs));
        report["deliveries_per_append"] =
            json!((self.acked > 0).then(|| round(self.deliveries as f64 / self.acked as f64)));
        report["deliveries_per_relay_cpu_sec"] =
            json!(per_cpu_sec(self.deliveries, self.relay_cpu));
        report["appends_per_redis_cpu_sec"] = json!(per_cpu_sec(self.acked, self.redis_cpu));
        report["relay_nodes"] = Value::Array(relay_nodes);
        report["redis_nodes"] = Value::Array(redis_nodes);
        report
    }

    /// The figures every run has reported since the first version (`scripts/bench.sh` reads
    /// them by name).
    fn base_json(&self, plan: &RunPlan, args: &RunArgs) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let opt = |x: Option<f64>| x.map(round);
        json!({
            "mode": "run",
            "server": match args.server {
                Server::Relay => "relay",
                Server::Reference => "reference",
            },
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
            "redis_cpu_us_per_stored": opt(self.redis_cpu.filter(|_| self.acked > 0).map(|c| c * 1e6 / self.acked as f64)),
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
