//! CPU time and memory of processes, read from `/proc`, to charge a run's cost to the relay,
//! Redis, loadgen and everything else on the machine.

use std::time::Instant;

/// `/proc/*/stat` counts CPU time in clock ticks; USER_HZ is 100 on every Linux we run on
/// (`getconf CLK_TCK`), and reading it properly needs libc.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of a process, in seconds (fields 14 and 15 of `/proc/PID/stat`).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it start at field 3.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_SEC)
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds all processes used, summed over every core (first line of `/proc/stat`:
/// everything but idle and iowait). Tells how much of the machine other work took.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user/nice).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy as f64 / CLOCK_TICKS_PER_SEC)
}

/// CPU time of loadgen, the machine, and the relay nodes and Redis processes given, at one
/// instant. A process that cannot be read (gone, or not ours to read) has `None`.
#[derive(Debug, Clone)]
pub struct CpuMark {
    pub at: Instant,
    pub own: Option<f64>,
    /// One per relay PID, in the order given.
    pub relays: Vec<Option<f64>>,
    /// One per Redis PID, in the order given.
    pub redis: Vec<Option<f64>>,
    pub machine: Option<f64>,
}

impl CpuMark {
    pub fn take(relay_pids: &[u32], redis_pids: &[u32]) -> Self {
        let read = |pids: &[u32]| pids.iter().map(|p| cpu_secs(&p.to_string())).collect();
        Self {
            at: Instant::now(),
            own: cpu_secs("self"),
            relays: read(relay_pids),
            redis: read(redis_pids),
            machine: machine_busy_secs(),
        }
    }
}

/// CPU seconds each process used between two readings (`before` and `after` in the same order).
pub fn deltas(before: &[Option<f64>], after: &[Option<f64>]) -> Vec<Option<f64>> {
    before
        .iter()
        .zip(after)
        .map(|(a, b)| Some(b.as_ref()? - a.as_ref()?))
        .collect()
}

/// The sum, known only when there is at least one value and every one is known: a total that
/// silently left out a process would understate the cost.
pub fn total(values: &[Option<f64>]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.iter().copied().sum()
}

/// A prefix for this run's room names and cids, unique across runs on one Redis.
pub fn run_prefix() -> String {
    format!(
        "lg{:x}{:x}",
        relay_tools::clock::epoch_ms(),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cpu_parses() {
        assert!(cpu_secs("self").is_some());
        assert!(rss_kib("self").is_some());
        assert!(machine_busy_secs().is_some());
    }

    #[test]
    fn totals_need_every_process() {
        assert_eq!(total(&[]), None);
        assert_eq!(total(&[Some(1.0), Some(2.5)]), Some(3.5));
        assert_eq!(total(&[Some(1.0), None]), None);
        let d = deltas(&[Some(1.0), Some(2.0), None], &[Some(1.5), None, Some(3.0)]);
        assert_eq!(d, vec![Some(0.5), None, None]);
    }
}
