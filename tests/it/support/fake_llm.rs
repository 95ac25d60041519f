//! A real HTTP server speaking the OpenAI Chat Completions streaming wire format (SSE chunks,
//! a usage chunk, `[DONE]`), with knobs for failures, stalls and slowness.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// How the next completions are answered.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Stream these tokens, `delay` apart, then finish with usage.
    Tokens {
        tokens: Vec<String>,
        delay: Duration,
    },
    /// Answer with this HTTP status and an error body.
    Status(u16),
    /// Send `tokens` then stop sending anything, keeping the connection open.
    Stall { tokens: Vec<String> },
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    requests: Vec<Value>,
}

#[derive(Clone, Debug)]
pub struct FakeLlm {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeLlm {
    pub async fn start(mode: Mode) -> FakeLlm {
        let inner = Arc::new(Mutex::new(Inner {
            mode,
            requests: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm { addr, inner }
    }

    pub fn tokens(tokens: &[&str], delay: Duration) -> Mode {
        Mode::Tokens {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            delay,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = mode;
    }

    /// The request bodies received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.inner.lock().unwrap().requests.clone()
    }
}

fn chunk(delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {v}\n\n"))
}

async fn complete(State(inner): State<Arc<Mutex<Inner>>>, Json(req): Json<Value>) -> Response {
    let mode = {
        let mut g = inner.lock().unwrap();
        g.requests.push(req.clone());
        g.mode.clone()
    };
    assert_eq!(req["stream"], true, "the relay always streams");
    let (tokens, delay, stall) = match mode {
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            return (
                status,
                Json(json!({"error": {"message": "fake failure", "type": "server_error"}})),
            )
                .into_response();
        }
        Mode::Tokens { tokens, delay } => (tokens, delay, false),
        Mode::Stall { tokens } => (tokens, Duration::ZERO, true),
    };
    let include_usage = req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    let prompt_tokens = req["messages"]
        .as_array()
        .map_or(0, |m| m.len() as u64 * 10);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(8);
    tokio::spawn(async move {
        let _ = tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": null}),
                None,
            )))
            .await;
        let n = tokens.len() as u64;
        for t in tokens {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx
                .send(Ok(chunk(json!({"content": t}), None)))
                .await
                .is_err()
            {
                return; // the client hung up (cancel)
            }
        }
        if stall {
            tx.closed().await;
            return;
        }
        let _ = tx.send(Ok(chunk(json!({}), Some("stop")))).await;
        if include_usage {
            let usage = json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}});
            let _ = tx.send(Ok(Bytes::from(format!("data: {usage}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A usage-callback endpoint that fails `failures` times before accepting.
#[derive(Clone, Debug)]
pub struct Callback {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Value>>>,
}

impl Callback {
    pub async fn start(failures: usize) -> Callback {
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        let app = Router::new().route(
            "/usage",
            post(move |Json(v): Json<Value>| {
                let r = r.clone();
                async move {
                    let mut g = r.lock().unwrap();
                    g.push(v);
                    if g.len() <= failures {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Callback { addr, received }
    }

    pub fn url(&self) -> String {
        format!("http://{}/usage", self.addr)
    }
}
