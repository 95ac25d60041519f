//! The relay processes of a fault run (nodes and LLM workers): started with their logs in the
//! run's directory, stopped by PID with the signal a fault asks for, and checked for a crash
//! nobody asked for.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use testkit::process::stop_child;
use testkit::Signal;

use crate::lock;

/// How long a process may take to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

pub struct Procs {
    dir: PathBuf,
    relay_bin: PathBuf,
    children: Mutex<BTreeMap<String, Child>>,
}

impl Procs {
    pub fn new(dir: &Path, relay_bin: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            relay_bin: relay_bin.to_owned(),
            children: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts `chat-relay ARGS` as `name`, appending its output to `<dir>/<name>.log`. The
    /// environment's `RELAY_*` settings are not passed on: the run sets what it needs.
    pub fn spawn(&self, name: &str, args: &[String]) -> Result<u32> {
        let log = self.dir.join(format!("{name}.log"));
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&self.relay_bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RELAY_") {
                cmd.env_remove(key);
            }
        }
        // The one exception, for tracing a failure: the processes' log filter.
        if let Some(filter) = std::env::var_os("CHAOS_RELAY_LOG") {
            cmd.env("RELAY_LOG", filter);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", self.relay_bin.display()))?;
        let pid = child.id();
        lock(&self.children).insert(name.to_owned(), child);
        Ok(pid)
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        lock(&self.children).get(name).map(Child::id)
    }

    /// Whether `name` was started and is still running.
    pub fn alive(&self, name: &str) -> bool {
        lock(&self.children)
            .get_mut(name)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops `name` with `sig` (SIGKILL after 5 s) and waits for it; its pid, if it was running.
    pub async fn stop(&self, name: &str, sig: Signal) -> Option<u32> {
        let mut child = lock(&self.children).remove(name)?;
        let pid = child.id();
        let _ = tokio::task::spawn_blocking(move || stop_child(&mut child, sig, GRACE)).await;
        Some(pid)
    }

    /// SIGTERM to every process, SIGKILL to those still running 3 s later.
    pub async fn stop_all(&self) {
        let children: Vec<Child> = std::mem::take(&mut *lock(&self.children))
            .into_values()
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for c in &children {
                let _ = testkit::process::signal(c.id(), Signal::Term);
            }
            let mut children = children;
            for c in &mut children {
                let _ = stop_child(c, Signal::Term, Duration::from_secs(3));
            }
        })
        .await;
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // Whatever happened to the run, nothing it started outlives it.
        for child in lock(&self.children).values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
