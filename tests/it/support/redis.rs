//! A real redis-server per test, on a free port, killed by PID.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fred::prelude::*;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Extra redis-server arguments, e.g. `["--appendonly", "yes"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("chat-relay-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .args(["--appendonly", "no"])
        .args(&self.extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (scripts/setup.sh)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 16];
                    if let Ok(n) = s.read(&mut buf) {
                        if buf[..n].starts_with(b"+PONG") {
                            return;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kill the server (SIGKILL) — a crash, not a shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port (same data directory).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A fred client for assertions against the stream.
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `XRANGE key - +` as (id, participant, event, body) tuples.
pub async fn xrange(client: &Client, key: &str) -> Vec<(String, Vec<(String, String)>)> {
    client
        .xrange::<Vec<(String, Vec<(String, String)>)>, _, _, _>(key, "-", "+", None)
        .await
        .expect("xrange")
}

pub async fn xlen(client: &Client, key: &str) -> u64 {
    client.xlen(key).await.expect("xlen")
}
