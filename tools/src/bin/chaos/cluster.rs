//! The fault run's Redis Cluster: three masters started by `scripts/cluster.sh` (the one
//! definition of a local cluster, shared with the integration tests), each with
//! `appendfsync always`. A master is stopped by the PID in its pidfile and started again by the
//! same script, on its `nodes.conf` and AOF.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::redis;

/// How long a restarted master may take until every master reports `cluster_state:ok`.
const OK_WITHIN: Duration = Duration::from_secs(30);

pub struct Cluster {
    script: PathBuf,
    dir: PathBuf,
    pub ports: Vec<u16>,
    /// `127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`, for `--redis-cluster`.
    pub seeds: String,
}

impl Cluster {
    /// A cluster to be started in `dir` (nothing runs yet; [`Cluster::stop`] is safe anyway).
    pub fn new(script: &Path, dir: &Path) -> Cluster {
        Cluster {
            script: script.to_owned(),
            dir: dir.to_owned(),
            ports: Vec::new(),
            seeds: String::new(),
        }
    }

    /// `scripts/cluster.sh start DIR` with `appendfsync always`; its stderr goes to `log`.
    pub async fn start(&mut self, log: &Path) -> Result<()> {
        let out = self.script_cmd(&["start"], log).await?;
        let seeds = out.trim().to_owned();
        let ports = seeds
            .split(',')
            .map(|s| s.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()))
            .collect::<Option<Vec<u16>>>()
            .with_context(|| format!("unexpected seed list: {seeds}"))?;
        if ports.len() != 3 {
            bail!("unexpected seed list: {seeds}");
        }
        self.ports = ports;
        self.seeds = seeds;
        Ok(())
    }

    async fn script_cmd(&self, args: &[&str], log: &Path) -> Result<String> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .arg(args[0])
            .arg(&self.dir)
            .args(&args[1..])
            .env("CLUSTER_APPENDFSYNC", "always")
            .stdin(Stdio::null())
            .stderr(Stdio::from(err));
        let what = format!("{} {}", self.script.display(), args.join(" "));
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .with_context(|| format!("cannot run {what}"))?;
        if !out.status.success() {
            bail!("{what} failed (see {})", log.display());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pid of the master on `port`, from its pidfile.
    pub fn master_pid(&self, port: u16) -> Option<u32> {
        let path = self.dir.join(port.to_string()).join("redis.pid");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// The master holding the most keys matching `pattern` (SCAN sees one node: ask each), and
    /// those keys.
    pub async fn busiest_master(&self, pattern: &str) -> (u16, Vec<String>) {
        let mut best = (self.ports[0], Vec::new());
        let mut most = None;
        for &port in &self.ports {
            let Ok(client) = redis::node(port).await else {
                continue;
            };
            let keys = redis::scan(&client, pattern).await.unwrap_or_default();
            let _ = fred::interfaces::ClientLike::quit(&client).await;
            if most.is_none_or(|m| keys.len() > m) {
                most = Some(keys.len());
                best = (port, keys);
            }
        }
        best
    }

    /// SIGTERM to the master on `port`; waits until it is gone (SIGKILL after 5 s).
    pub async fn stop_master(&self, port: u16) -> Option<u32> {
        let pid = self.master_pid(port)?;
        let _ = testkit::process::signal(pid, testkit::Signal::Term);
        let gone = tokio::task::spawn_blocking(move || {
            testkit::process::wait_gone(pid, Duration::from_secs(5))
        });
        let _ = gone.await;
        Some(pid)
    }

    /// Starts the master on `port` again (same dir), then waits until every master reports
    /// `cluster_state:ok`.
    pub async fn start_master(&self, port: u16, log: &Path) -> Result<()> {
        self.script_cmd(&["start-node", &port.to_string()], log)
            .await?;
        let deadline = Instant::now() + OK_WITHIN;
        loop {
            let mut all = true;
            for &p in &self.ports {
                all &= redis::cluster_ok(p).await;
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the cluster did not report cluster_state:ok within {}s after restarting :{port}",
                    OK_WITHIN.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `redis:PORT` for every master that is not running.
    pub fn masters_down(&self) -> Vec<String> {
        self.ports
            .iter()
            .filter(|&&p| !self.master_pid(p).is_some_and(testkit::process::exists))
            .map(|p| format!("redis:{p}"))
            .collect()
    }

    /// Copies each master's log next to the run's other logs, then `cluster.sh stop` (which
    /// removes its dir).
    pub async fn stop(&self, logs: &Path, log: &Path) {
        for &p in &self.ports {
            let from = self.dir.join(p.to_string()).join("redis.log");
            let _ = std::fs::copy(from, logs.join(format!("redis-{p}.log")));
        }
        let _ = self.script_cmd(&["stop"], log).await;
    }
}
