//! What chat-relay's integration tests and its tools (load generator, fault run, benchmark)
//! share, so each exists once:
//!
//! - [`FakeLlm`]: an OpenAI-compatible streaming server on a loopback port, with knobs for
//!   answers ([`Mode`]), failures, usage and recorded requests;
//! - [`Callback`]: a usage-callback endpoint that fails a few times first;
//! - [`RedisServer`]: a real redis-server per test or run, crashed, stopped and restarted by PID;
//! - [`free_port`] / [`free_ports`], and [`process`] for signalling what we started.
//!
//! It does not depend on chat-relay: the fakes speak the wire formats, not the relay's types.

mod callback;
mod fake_llm;
mod port;
pub mod process;
pub mod redis;

pub use callback::Callback;
pub use fake_llm::{FakeLlm, Mode};
pub use port::{free_port, free_ports};
pub use process::Signal;
pub use redis::RedisServer;
