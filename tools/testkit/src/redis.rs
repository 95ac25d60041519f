//! A real redis-server on a free loopback port, started and stopped by PID, so a test or a fault
//! run can crash it (`SIGKILL`), shut it down (`SIGTERM`) and start it again on the same port
//! and data directory (with `--appendonly yes` it then reloads its AOF).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fred::prelude::*;

use crate::port::free_port;
use crate::process::{stop_child, Signal};

/// How long a start may take before it counts as failed.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// After a SIGTERM, how long redis-server may take to exit before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Options for [`RedisServer::builder`].
#[derive(Debug, Default, Clone)]
pub struct RedisBuilder {
    port: Option<u16>,
    dir: Option<PathBuf>,
    args: Vec<String>,
}

impl RedisBuilder {
    /// Listen on this port (default: a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Data directory (AOF, RDB), kept when the server is dropped. Default: a directory under
    /// the system temp dir, removed on drop.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Extra redis-server arguments. They come after the defaults (`--save ""`,
    /// `--appendonly no`), so they override them: `["--appendonly", "yes"]`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts it and waits until it answers `PING`.
    pub fn start(self) -> io::Result<RedisServer> {
        let port = match self.port {
            Some(p) => p,
            None => crate::port::free_ports(1)?
                .first()
                .copied()
                .ok_or_else(|| io::Error::other("no free port"))?,
        };
        let (dir, remove_dir) = match self.dir {
            Some(d) => (d, false),
            None => (
                std::env::temp_dir()
                    .join(format!("chat-relay-redis-{}-{port}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&dir)?;
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            remove_dir,
            args: self.args,
        };
        server.start_again()?;
        Ok(server)
    }
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    remove_dir: bool,
    args: Vec<String>,
}

impl RedisServer {
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// A throwaway server (no persistence). Panics when redis-server cannot start.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Extra redis-server arguments, e.g. `["--appendonly", "yes"]`. Panics when it cannot start.
    #[allow(clippy::expect_used)]
    pub fn start_with(extra: &[&str]) -> Self {
        Self::builder()
            .port(free_port())
            .args(extra.iter().copied())
            .start()
            .expect("redis-server must be installed (scripts/setup.sh)")
    }

    /// Starts the process again after a stop: same port, same arguments, same data directory.
    pub fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "no"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run redis-server: {e}")))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if ping(self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "redis-server on port {} exited: {status}",
                        self.port
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("redis-server on port {} did not answer PING", self.port),
        ))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process we started is still running (it may have died on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kill the server (SIGKILL) — a crash, not a shutdown.
    pub fn stop(&mut self) {
        self.stop_with(Signal::Kill);
    }

    /// Stops the server with `sig` and waits for it to exit (SIGKILL after 5 s for SIGTERM).
    pub fn stop_with(&mut self, sig: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = stop_child(&mut child, sig, TERM_GRACE);
        }
    }

    /// Kill, then start again on the same port (same data directory). Panics if it cannot.
    #[allow(clippy::expect_used)]
    pub fn restart(&mut self) {
        self.stop();
        self.start_again().expect("restart redis-server");
    }

    /// A fred client for assertions against the stream. Panics if it cannot connect.
    #[allow(clippy::expect_used)]
    pub async fn client(&self) -> Client {
        let client = Client::new(
            Config::from_url(&self.url()).expect("url"),
            None,
            None,
            None,
        );
        client.init().await.expect("connect to test redis");
        client
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether a redis-server answers `PING` on `127.0.0.1:port` (half a second at most).
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// `XRANGE key - +` as (id, fields) pairs. Panics on a Redis error (a test helper).
#[allow(clippy::expect_used)]
pub async fn xrange(client: &Client, key: &str) -> Vec<(String, Vec<(String, String)>)> {
    client
        .xrange::<Vec<(String, Vec<(String, String)>)>, _, _, _>(key, "-", "+", None)
        .await
        .expect("xrange")
}

/// `XLEN key`. Panics on a Redis error (a test helper).
#[allow(clippy::expect_used)]
pub async fn xlen(client: &Client, key: &str) -> u64 {
    client.xlen(key).await.expect("xlen")
}
