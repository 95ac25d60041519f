//! The world a fault run plays with (Redis or the cluster, two relay nodes, two LLM workers)
//! and the faults themselves, each logged with its time since the run and since sending began.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use testkit::{RedisServer, Signal};

use crate::cluster::Cluster;
use crate::drive::{room_glob, room_sid};
use crate::lock;
use crate::plan::Action;
use crate::procs::Procs;
use crate::redis::{self, RelayNames};

/// How long a (re)started node may take to answer `/healthz`.
const NODE_READY_WITHIN: Duration = Duration::from_secs(20);
/// How long to wait for some worker to be in the middle of a turn before killing one anyway.
const BUSY_WORKER_WAIT: Duration = Duration::from_secs(5);

/// Redis as the run uses it.
pub enum RedisSide {
    Standalone(Arc<Mutex<RedisServer>>),
    Cluster(Cluster),
}

pub struct World {
    pub tmp: PathBuf,
    pub procs: Procs,
    pub redis: RedisSide,
    pub node_ports: [u16; 2],
    pub llm_port: u16,
    pub names: RelayNames,
    pub run: String,
    pub rooms: usize,
    started: Instant,
    sending_began: OnceLock<Instant>,
    killed_worker: Option<usize>,
    killed_master: Option<u16>,
}

impl World {
    /// `ports`: node 1, node 2, the fake LLM.
    pub fn new(
        tmp: PathBuf,
        procs: Procs,
        redis: RedisSide,
        ports: [u16; 3],
        names: RelayNames,
        run: String,
        rooms: usize,
    ) -> Self {
        Self {
            tmp,
            procs,
            redis,
            node_ports: [ports[0], ports[1]],
            llm_port: ports[2],
            names,
            run,
            rooms,
            started: Instant::now(),
            sending_began: OnceLock::new(),
            killed_worker: None,
            killed_master: None,
        }
    }

    /// A line on stderr, with the time since the run started.
    pub fn say(&self, what: &str) {
        eprintln!(
            "[chaos run {:6.1}s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }

    pub fn sending_began(&self) {
        let _ = self.sending_began.set(Instant::now());
    }

    /// Logs a fault on stderr and in `faults.log`.
    fn fault(&self, what: &str) {
        let script = self.started.elapsed().as_secs_f64();
        let send = self
            .sending_began
            .get()
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.say(&format!("FAULT (+{send:.1}s after sending began): {what}"));
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let line = format!("script {script:6.1}s  send+{send:5.1}s  epoch {epoch:.6}  {what}\n");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.join("faults.log"))
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// The faults logged so far, one a line.
    pub fn fault_log(&self) -> String {
        std::fs::read_to_string(self.tmp.join("faults.log")).unwrap_or_default()
    }

    /// `--redis-url URL` or `--redis-cluster SEEDS`, plus the names every process must share.
    pub fn redis_flags(&self) -> Vec<String> {
        let mut flags = match &self.redis {
            RedisSide::Standalone(r) => vec!["--redis-url".into(), lock(r).url()],
            RedisSide::Cluster(c) => vec!["--redis-cluster".into(), c.seeds.clone()],
        };
        flags.extend([
            "--key-prefix".into(),
            self.names.keys.prefix().to_owned(),
            "--llm-group".into(),
            self.names.llm_group.clone(),
            "--redis-timeout-ms".into(),
            "1000".into(),
        ]);
        flags
    }

    fn node_args(&self, i: usize) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.node_ports[i - 1]),
        ];
        args.extend(self.redis_flags());
        for flag in [
            "--llm off",
            "--msgs-per-sec 100000",
            "--msgs-burst 100000",
            "--room-msgs-per-sec 100000",
            "--room-msgs-burst 100000",
        ] {
            args.extend(flag.split(' ').map(str::to_owned));
        }
        args
    }

    fn worker_args(&self, i: usize) -> Vec<String> {
        let mut args: Vec<String> = vec!["llm-worker".into()];
        args.extend(self.redis_flags());
        args.extend([
            "--llm-base-url".into(),
            format!("http://127.0.0.1:{}/v1", self.llm_port),
            "--llm-consumer".into(),
            format!("w{i}"),
        ]);
        for flag in [
            "--llm-claim-idle-secs 2",
            "--llm-turns-per-minute 100000",
            "--llm-concurrency 32",
        ] {
            args.extend(flag.split(' ').map(str::to_owned));
        }
        args
    }

    /// Starts node `i` (1 or 2) and waits until it answers `/healthz`.
    pub async fn start_node(&self, i: usize) -> Result<()> {
        let name = format!("node{i}");
        if self.procs.alive(&name) {
            return Ok(());
        }
        self.procs.spawn(&name, &self.node_args(i))?;
        let url = format!("http://127.0.0.1:{}/healthz", self.node_ports[i - 1]);
        if !wait_http(&url, NODE_READY_WITHIN).await {
            bail!(
                "node {i} did not come up (see {})",
                self.tmp.join(format!("{name}.log")).display()
            );
        }
        Ok(())
    }

    pub fn start_worker(&self, i: usize) -> Result<()> {
        self.procs
            .spawn(&format!("worker{i}"), &self.worker_args(i))?;
        Ok(())
    }

    /// Plays one step of the timeline. A restart that fails is reported and the run goes on
    /// (the checks will tell what it cost).
    pub async fn play(&mut self, action: Action) {
        let res = match action {
            Action::KillNode(i) => {
                let pid = self.procs.pid(&format!("node{i}")).unwrap_or(0);
                self.fault(&format!("kill -9 node {i} (pid {pid})"));
                self.procs.stop(&format!("node{i}"), Signal::Kill).await;
                Ok(())
            }
            Action::StartNode(i) => {
                let port = self.node_ports[i - 1];
                self.fault(&format!("restart node {i} on :{port}"));
                self.start_node(i).await
            }
            Action::KillRedis(sig) => self.kill_redis(sig).await,
            Action::StartRedis => self.start_redis().await,
            Action::KillBusyWorker => {
                self.kill_busy_worker().await;
                Ok(())
            }
            Action::StartKilledWorker => match self.killed_worker.take() {
                Some(i) => {
                    self.fault(&format!("restart LLM worker w{i}"));
                    self.start_worker(i)
                }
                None => Ok(()),
            },
        };
        if let Err(err) = res {
            self.say(&format!("{err:#}"));
        }
    }

    async fn kill_redis(&mut self, sig: Signal) -> Result<()> {
        match &self.redis {
            RedisSide::Standalone(r) => {
                let pid = lock(r).pid().unwrap_or(0);
                self.fault(&format!("kill -{sig} redis-server (pid {pid})"));
                let r = r.clone();
                tokio::task::spawn_blocking(move || lock(&r).stop_with(sig)).await?;
            }
            RedisSide::Cluster(c) => {
                // The master holding the most of this run's rooms: its restart hurts most.
                let pattern = self.names.keys.room(&room_glob(&self.run));
                let (port, keys) = c.busiest_master(&pattern).await;
                let prefix = pattern.trim_end_matches('*');
                let mut rooms: Vec<u64> = keys
                    .iter()
                    .filter_map(|k| k.strip_prefix(prefix)?.parse().ok())
                    .collect();
                rooms.sort_unstable();
                let rooms: Vec<String> = rooms.iter().map(u64::to_string).collect();
                let pid = c.master_pid(port).unwrap_or(0);
                self.fault(&format!(
                    "kill -TERM redis master :{port} (pid {pid}; rooms {}) (asked: {sig}; a cluster restart uses SIGTERM)",
                    if rooms.is_empty() { "none".to_owned() } else { rooms.join(",") }
                ));
                c.stop_master(port).await;
                self.killed_master = Some(port);
            }
        }
        Ok(())
    }

    async fn start_redis(&mut self) -> Result<()> {
        match &self.redis {
            RedisSide::Standalone(r) => {
                let port = lock(r).port;
                self.fault(&format!("restart redis-server on :{port} (same dir, AOF)"));
                let r = r.clone();
                tokio::task::spawn_blocking(move || lock(&r).start_again()).await??;
            }
            RedisSide::Cluster(c) => {
                let Some(port) = self.killed_master.take() else {
                    return Ok(());
                };
                self.fault(&format!(
                    "restart redis master :{port} (same dir: nodes.conf + AOF)"
                ));
                c.start_master(port, &self.tmp.join("cluster.log")).await?;
                self.fault("cluster_state:ok on every master again");
            }
        }
        Ok(())
    }

    /// The servers whose keys are scanned (a cluster: every master, each SCANs only its own).
    fn redis_ports(&self) -> Vec<u16> {
        match &self.redis {
            RedisSide::Standalone(r) => vec![lock(r).port],
            RedisSide::Cluster(c) => c.ports.clone(),
        }
    }

    /// Turns in progress per worker (1, 2): "room M turn ID", from the lease in each turn key.
    async fn running_turns(&self) -> BTreeMap<usize, Vec<String>> {
        let mut by_worker: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for port in self.redis_ports() {
            let Ok(client) = redis::node(port).await else {
                continue;
            };
            for room in 0..self.rooms {
                let sid = room_sid(&self.run, room);
                let pattern = self.names.keys.turns_pattern(&sid);
                let Ok(keys) = redis::scan(&client, &pattern).await else {
                    break;
                };
                for key in keys {
                    let Ok(Some(value)) = redis::get(&client, &key).await else {
                        continue;
                    };
                    let Some((consumer, turn)) = chat_relay::lease_holder(&value) else {
                        continue;
                    };
                    let worker = match consumer {
                        "w1" => 1,
                        "w2" => 2,
                        _ => continue,
                    };
                    by_worker
                        .entry(worker)
                        .or_default()
                        .push(format!("room {room} turn {turn}"));
                }
            }
            let _ = fred::interfaces::ClientLike::quit(&client).await;
        }
        by_worker
    }

    /// Waits (up to 5 s) until some worker holds a turn lease, then `kill -9`s the worker
    /// holding the most: it dies in the middle of its turns.
    async fn kill_busy_worker(&mut self) {
        let deadline = Instant::now() + BUSY_WORKER_WAIT;
        let mut running = self.running_turns().await;
        while running.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            running = self.running_turns().await;
        }
        let count = |w: usize| running.get(&w).map_or(0, Vec::len);
        let (n1, n2) = (count(1), count(2));
        let victim = if n2 > n1 { 2 } else { 1 };
        let turns = running.remove(&victim).unwrap_or_default();
        let mut shown = turns.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
        if turns.len() > 6 {
            shown.push_str(", ...");
        }
        let name = format!("worker{victim}");
        let pid = self.procs.pid(&name).map_or("?".into(), |p| p.to_string());
        self.fault(&format!(
            "kill -9 LLM worker w{victim} (pid {pid}) in the middle of {} turns (w1 {n1}, w2 {n2} running): {shown}",
            turns.len()
        ));
        self.procs.stop(&name, Signal::Kill).await;
        self.killed_worker = Some(victim);
    }
}

/// Polls `url` until it answers 2xx; `false` after `within`.
pub async fn wait_http(url: &str, within: Duration) -> bool {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
