//! The fault run's shape: how many clients for how long, how slow the LLM is, and the timeline
//! of faults, in seconds after every client joined.
//!
//! Full run (two rounds):
//!
//! ```text
//!    3 s  kill -9 node 2          5 s  restart it on the same port
//!    8 s  kill -9 redis          10 s  restart it on the same port and dir (AOF)
//!   12 s  kill -9 the LLM worker holding the most turn leases, i.e. mid-turn (waits up to 5 s
//!         for one to be running)                                           14 s  restart it
//!   16 s  kill -9 node 1         18 s  restart it
//!   20 s  SIGTERM redis          22 s  restart it
//!   24 s  kill -9 the busiest LLM worker again                            26 s  restart it
//! ```
//!
//! `--short` (CI) plays the first round compressed into 8.5 s. On a cluster the Redis fault
//! stops one master (the one holding the most rooms) with SIGTERM and restarts it on its
//! `nodes.conf` and AOF.

use testkit::Signal;

/// One step of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    KillNode(usize),
    StartNode(usize),
    KillRedis(Signal),
    StartRedis,
    KillBusyWorker,
    StartKilledWorker,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub rooms: usize,
    pub clients: usize,
    /// Seconds of sending.
    pub duration: f64,
    pub llm_every: u64,
    /// Tokens per fake LLM answer, and the delay before each.
    pub tokens: usize,
    pub token_ms: u64,
    pub ack_wait: f64,
    pub llm_wait: f64,
    pub drain_wait: f64,
    /// Bound on the whole drive.
    pub deadline: f64,
    /// (seconds after every client joined, action)
    pub timeline: Vec<(f64, Action)>,
}

impl Plan {
    pub fn new(short: bool) -> Self {
        use Action::*;
        if short {
            Plan {
                rooms: 3,
                clients: 4,
                duration: 10.0,
                llm_every: 10,
                tokens: 15,
                token_ms: 100,
                ack_wait: 15.0,
                llm_wait: 10.0,
                drain_wait: 10.0,
                deadline: 75.0,
                timeline: vec![
                    (1.5, KillNode(2)),
                    (3.0, StartNode(2)),
                    (4.5, KillRedis(Signal::Kill)),
                    (6.0, StartRedis),
                    (7.0, KillBusyWorker),
                    (8.5, StartKilledWorker),
                ],
            }
        } else {
            Plan {
                rooms: 8,
                clients: 6,
                duration: 30.0,
                llm_every: 40,
                tokens: 20,
                token_ms: 100,
                ack_wait: 20.0,
                llm_wait: 30.0,
                drain_wait: 15.0,
                deadline: 180.0,
                timeline: vec![
                    (3.0, KillNode(2)),
                    (5.0, StartNode(2)),
                    (8.0, KillRedis(Signal::Kill)),
                    (10.0, StartRedis),
                    (12.0, KillBusyWorker),
                    (14.0, StartKilledWorker),
                    (16.0, KillNode(1)),
                    (18.0, StartNode(1)),
                    (20.0, KillRedis(Signal::Term)),
                    (22.0, StartRedis),
                    (24.0, KillBusyWorker),
                    (26.0, StartKilledWorker),
                ],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_is_undone_within_the_sending_time() {
        for short in [true, false] {
            let plan = Plan::new(short);
            let times: Vec<f64> = plan.timeline.iter().map(|(t, _)| *t).collect();
            assert!(times.windows(2).all(|w| w[0] < w[1]), "in time order");
            assert!(
                times.iter().all(|t| *t < plan.duration),
                "while clients send"
            );
            let mut down = Vec::new();
            for (_, action) in &plan.timeline {
                match action {
                    Action::KillNode(i) => down.push(format!("node{i}")),
                    Action::KillRedis(_) => down.push("redis".into()),
                    Action::KillBusyWorker => down.push("worker".into()),
                    Action::StartNode(i) => assert_eq!(down.pop(), Some(format!("node{i}"))),
                    Action::StartRedis => assert_eq!(down.pop().as_deref(), Some("redis")),
                    Action::StartKilledWorker => assert_eq!(down.pop().as_deref(), Some("worker")),
                }
            }
            assert!(down.is_empty(), "everything restarted");
        }
    }
}
