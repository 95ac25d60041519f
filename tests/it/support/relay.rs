//! A relay under test: in-process on port 0, or the real binary as a child process.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use chat_relay::ServeConfig;

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    serve: ServeConfig,
}

pub struct Relay {
    pub addr: SocketAddr,
    pub token: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on `redis_url` with extra `serve` flags.
    pub async fn start(redis_url: &str, extra: &[&str]) -> Relay {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            chat_relay::telemetry::init(&chat_relay::config::LogArgs {
                log_format: chat_relay::config::LogFormat::Text,
                log_level: filter,
            });
        }
        let mut args = vec![
            "test",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            redis_url,
            "--redis-timeout-ms",
            "1000",
        ];
        args.extend_from_slice(extra);
        let cfg = TestCli::try_parse_from(args).expect("test config").serve;
        cfg.validate().expect("valid test config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let token = CancellationToken::new();
        let t = token.clone();
        let handle = tokio::spawn(async move {
            if let Err(err) = chat_relay::run(listener, cfg, t).await {
                eprintln!("relay exited with error: {err:?}");
            }
        });
        Relay {
            addr,
            token,
            handle: Some(handle),
        }
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/session/chat?{query}", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET /v1/sessions/{sid}` as JSON.
    pub async fn room_info(&self, sid: &str) -> serde_json::Value {
        reqwest::get(self.http(&format!("/v1/sessions/{sid}")))
            .await
            .expect("room info")
            .json()
            .await
            .expect("room info is JSON")
    }

    /// `POST /v1/sessions/{sid}/messages` with `envelope`.
    pub async fn post(&self, sid: &str, envelope: &serde_json::Value) -> reqwest::Response {
        static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        HTTP.get_or_init(reqwest::Client::new)
            .post(self.http(&format!("/v1/sessions/{sid}/messages")))
            .json(envelope)
            .send()
            .await
            .expect("POST")
    }

    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The real `chat-relay serve` binary, for multi-process and crash tests.
pub struct RelayProcess {
    pub port: u16,
    child: Option<Child>,
}

impl RelayProcess {
    pub fn start(redis_url: &str, extra: &[&str]) -> RelayProcess {
        let port = super::redis::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_chat-relay"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis-url",
                redis_url,
            ])
            .args(extra)
            .env("RELAY_LOG", "chat_relay=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chat-relay");
        let p = RelayProcess {
            port,
            child: Some(child),
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("chat-relay on port {} did not start", self.port);
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/v1/session/chat?{query}", self.port)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real `chat-relay llm-worker` binary.
pub struct WorkerProcess {
    child: Option<Child>,
}

impl WorkerProcess {
    pub fn start(redis_url: &str, extra: &[&str]) -> WorkerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_chat-relay"))
            .args(["llm-worker", "--redis-url", redis_url])
            .args(extra)
            .env("RELAY_LOG", "chat_relay=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chat-relay llm-worker");
        WorkerProcess { child: Some(child) }
    }

    /// SIGKILL: a crash mid-turn.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
