//! Free loopback ports, for servers a test or a tool starts itself.

use std::io;
use std::net::TcpListener;

/// `n` distinct ports nothing listens on now on 127.0.0.1. They are bound all at once (so they
/// differ) and released on return; the caller binds them soon after.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<_>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One free port (see [`free_ports`]). Panics when none can be bound (a test helper).
#[allow(clippy::expect_used)]
pub fn free_port() -> u16 {
    free_ports(1)
        .ok()
        .and_then(|p| p.first().copied())
        .expect("a free port on 127.0.0.1")
}
