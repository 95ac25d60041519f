//! Stopping processes we started, by PID, with the signal a scenario asks for.

use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal as RawSignal};

/// The signals a test or a fault run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: a shutdown the process may finish gracefully.
    Term,
    /// SIGKILL: a crash.
    Kill,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        })
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a process id"))?;
    let raw = match sig {
        Signal::Term => RawSignal::TERM,
        Signal::Kill => RawSignal::KILL,
    };
    kill_process(pid, raw).map_err(io::Error::from)
}

/// Whether process `pid` exists (it may be a zombie until its parent waits for it).
pub fn exists(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Sends `sig` to a child, waits for it to exit, and SIGKILLs it after `grace`.
pub fn stop_child(child: &mut Child, sig: Signal, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // It may exit between try_wait and the signal: then the wait below reaps it.
    let _ = signal(child.id(), sig);
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` (not our child, e.g. a daemonized redis-server) is gone,
/// SIGKILLing it after `grace`; `false` if it is still there 5 s after that.
pub fn wait_gone(pid: u32, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    let give_up = deadline + Duration::from_secs(5);
    while exists(pid) {
        let now = Instant::now();
        if now >= give_up {
            return false;
        }
        if now >= deadline {
            let _ = signal(pid, Signal::Kill);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
