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

/// CPU time of loadgen, the machine and (optionally) the relay and Redis at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    pub at: Instant,
    pub own: Option<f64>,
    pub relay: Option<f64>,
    pub redis: Option<f64>,
    pub machine: Option<f64>,
}

impl CpuMark {
    pub fn take(relay_pid: Option<u32>) -> Self {
        Self::take_with(relay_pid, None)
    }

    pub fn take_with(relay_pid: Option<u32>, redis_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            own: cpu_secs("self"),
            relay: relay_pid.and_then(|p| cpu_secs(&p.to_string())),
            redis: redis_pid.and_then(|p| cpu_secs(&p.to_string())),
            machine: machine_busy_secs(),
        }
    }
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
}
