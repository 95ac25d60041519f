//! A real HTTP server speaking the OpenAI Chat Completions streaming wire format: SSE `data:`
//! chunks (a role chunk, one chunk per token, a `finish_reason` chunk), the usage chunk when the
//! request asks for it (`stream_options.include_usage`), then `data: [DONE]`.
//!
//! One server for every caller: the relay's integration tests (failures, stalls, recorded
//! requests), the fault run (slow answers that a killed worker leaves half-done) and the
//! benchmark's LLM fan-out (fast answers), through the knobs of [`FakeLlm`].

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// How completions are answered, until [`FakeLlm::set_mode`] changes it.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Stream these tokens, waiting `delay` before each, then finish (`finish_reason: "stop"`,
    /// the usage chunk if asked for and allowed, `[DONE]`).
    Tokens {
        tokens: Vec<String>,
        delay: Duration,
    },
    /// Answer with this HTTP status and an OpenAI-style error body; nothing is streamed.
    Status(u16),
    /// Stream `tokens`, then send nothing more and keep the connection open: a hung provider.
    Stall { tokens: Vec<String> },
    /// Stream `tokens`, then drop the connection without a finish chunk or `[DONE]`.
    Disconnect { tokens: Vec<String> },
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    /// Statuses that answer the next requests, before `mode` applies again.
    failures: VecDeque<u16>,
    usage: bool,
    record: bool,
    requests: Vec<Value>,
    received: usize,
    finished: usize,
    hung_up: usize,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panicking test thread must not take the server down with it.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fake OpenAI-compatible provider on a loopback port. Cheap to clone; every clone controls
/// the same server, which runs until the runtime that started it ends.
#[derive(Clone, Debug)]
pub struct FakeLlm {
    pub addr: SocketAddr,
    inner: Shared,
}

impl FakeLlm {
    /// Starts on a free loopback port. Panics when it cannot listen (a test helper).
    #[allow(clippy::expect_used)]
    pub async fn start(mode: Mode) -> FakeLlm {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), mode)
            .await
            .expect("fake LLM: listen on 127.0.0.1")
    }

    /// Starts on `addr` (port 0: any free port; see [`FakeLlm::addr`]).
    pub async fn bind(addr: SocketAddr, mode: Mode) -> io::Result<FakeLlm> {
        let inner = Arc::new(Mutex::new(Inner {
            mode,
            failures: VecDeque::new(),
            usage: true,
            record: true,
            requests: Vec::new(),
            received: 0,
            finished: 0,
            hung_up: 0,
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeLlm { addr, inner })
    }

    /// [`Mode::Tokens`] from string slices.
    pub fn tokens(tokens: &[&str], delay: Duration) -> Mode {
        Mode::Tokens {
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
            delay,
        }
    }

    /// [`Mode::Tokens`] with `n` tokens `tok0 `, `tok1 `, ...: a long answer of known length.
    pub fn numbered(n: usize, delay: Duration) -> Mode {
        Mode::Tokens {
            tokens: (0..n).map(|i| format!("tok{i} ")).collect(),
            delay,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, what `--llm-base-url` expects.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        lock(&self.inner).mode = mode;
    }

    /// The next `n` requests are answered with `status` (then the mode applies again): a
    /// provider that fails a few times before it recovers.
    pub fn fail_next(&self, n: usize, status: u16) {
        lock(&self.inner)
            .failures
            .extend(std::iter::repeat_n(status, n));
    }

    /// Whether the usage chunk is sent to requests that ask for it (default: yes). Off, the
    /// server behaves like a provider that ignores `stream_options`.
    pub fn set_usage(&self, on: bool) {
        lock(&self.inner).usage = on;
    }

    /// Whether request bodies are kept for [`FakeLlm::requests`] (default: yes). A long-running
    /// server (the `fake-llm` tool) turns it off so memory stays flat.
    pub fn set_recording(&self, on: bool) {
        lock(&self.inner).record = on;
    }

    /// The request bodies received so far, in arrival order (e.g. to assert the prompt, `stop`
    /// sequences, `max_tokens` or `stream_options` the relay sent).
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.inner).requests.clone()
    }

    /// Completion requests received, recorded or not.
    pub fn request_count(&self) -> usize {
        lock(&self.inner).received
    }

    /// Streams that ran to `[DONE]`.
    pub fn finished(&self) -> usize {
        lock(&self.inner).finished
    }

    /// Streams the client closed before the end (a cancelled turn, a killed worker).
    pub fn hung_up(&self) -> usize {
        lock(&self.inner).hung_up
    }

    /// Waits until at least `n` requests arrived; `false` when `within` passed first.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.request_count() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn error_body(status: StatusCode, message: &str) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {v}\n\n"))
}

/// How a streamed answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Finish,
    Stall,
    Disconnect,
}

async fn complete(State(inner): State<Shared>, Json(req): Json<Value>) -> Response {
    let (mode, usage_allowed) = {
        let mut g = lock(&inner);
        g.received += 1;
        if g.record {
            g.requests.push(req.clone());
        }
        let mode = match g.failures.pop_front() {
            Some(status) => Mode::Status(status),
            None => g.mode.clone(),
        };
        (mode, g.usage)
    };
    if req["stream"] != true {
        return error_body(
            StatusCode::BAD_REQUEST,
            "this fake only streams (\"stream\": true)",
        );
    }
    let (tokens, delay, end) = match mode {
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error_body(status, "fake failure");
        }
        Mode::Tokens { tokens, delay } => (tokens, delay, End::Finish),
        Mode::Stall { tokens } => (tokens, Duration::ZERO, End::Stall),
        Mode::Disconnect { tokens } => (tokens, Duration::ZERO, End::Disconnect),
    };
    let usage = (usage_allowed
        && req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true)))
    .then(|| {
        let prompt = req["messages"]
            .as_array()
            .map_or(0, |m| m.len() as u64 * 10);
        let completion = tokens.len() as u64;
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}})
    });
    let model = req["model"].as_str().unwrap_or("fake").to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(8);
    tokio::spawn(async move {
        let outcome = stream_answer(&tx, &model, tokens, delay, end, usage).await;
        let mut g = lock(&inner);
        match outcome {
            Outcome::Done => g.finished += 1,
            Outcome::HungUp => g.hung_up += 1,
            Outcome::Cut => {}
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// How one streamed answer went.
enum Outcome {
    Done,
    /// The client closed the connection first.
    HungUp,
    /// We cut it ([`Mode::Disconnect`]).
    Cut,
}

/// Writes one answer into the response body.
async fn stream_answer(
    tx: &tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    model: &str,
    tokens: Vec<String>,
    delay: Duration,
    end: End,
    usage: Option<Value>,
) -> Outcome {
    let role = json!({"role": "assistant", "content": null});
    if tx.send(Ok(chunk(model, role, None))).await.is_err() {
        return Outcome::HungUp;
    }
    for t in tokens {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let piece = chunk(model, json!({ "content": t }), None);
        if tx.send(Ok(piece)).await.is_err() {
            return Outcome::HungUp;
        }
    }
    match end {
        End::Finish => {}
        End::Stall => {
            tx.closed().await;
            return Outcome::HungUp;
        }
        End::Disconnect => {
            let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "fake LLM hangs up");
            let _ = tx.send(Err(cut)).await;
            return Outcome::Cut;
        }
    }
    let mut tail = vec![chunk(model, json!({}), Some("stop"))];
    if let Some(u) = usage {
        tail.push(Bytes::from(format!("data: {u}\n\n")));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    for piece in tail {
        if tx.send(Ok(piece)).await.is_err() {
            return Outcome::HungUp;
        }
    }
    Outcome::Done
}
