//! The shared redis-server harness (a real server per test on a free port, killed by PID) and
//! its assertion helpers, from the workspace's testkit.

pub use testkit::redis::{xlen, xrange};
pub use testkit::{free_port, RedisServer};
