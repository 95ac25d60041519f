//! A usage-callback endpoint (`POST /usage`) that fails a given number of times before it
//! accepts, or refuses everything while it is set down: what `--usage-callback-url` posts each
//! turn's usage to. Every post is recorded with the headers a biller relies on.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

/// One post as the endpoint saw it.
#[derive(Clone, Debug)]
pub struct Posted {
    pub body: Value,
    /// The raw body, for checking a signature.
    pub raw: String,
    pub idempotency_key: Option<String>,
    pub signature: Option<String>,
    /// Whether it was answered 200.
    pub accepted: bool,
}

#[derive(Debug)]
struct Inner {
    failures_left: usize,
    down: bool,
    posts: Vec<Posted>,
}

#[derive(Clone, Debug)]
pub struct Callback {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Callback {
    /// Answers 503 to the first `failures` posts, then 200. Panics when it cannot listen.
    #[allow(clippy::expect_used)]
    pub async fn start(failures: usize) -> Callback {
        Self::bind(failures)
            .await
            .expect("callback: listen on 127.0.0.1")
    }

    pub async fn bind(failures: usize) -> io::Result<Callback> {
        let inner = Arc::new(Mutex::new(Inner {
            failures_left: failures,
            down: false,
            posts: Vec::new(),
        }));
        let app = Router::new()
            .route("/usage", post(usage))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Callback { addr, inner })
    }

    pub fn url(&self) -> String {
        format!("http://{}/usage", self.addr)
    }

    /// While down, every post is answered 503.
    pub fn set_down(&self, down: bool) {
        lock(&self.inner).down = down;
    }

    /// Every post, refused ones included, in arrival order.
    pub fn posts(&self) -> Vec<Posted> {
        lock(&self.inner).posts.clone()
    }

    /// The bodies of every post, refused ones included.
    pub fn received(&self) -> Vec<Value> {
        self.posts().into_iter().map(|p| p.body).collect()
    }

    /// The posts answered 200.
    pub fn accepted(&self) -> Vec<Posted> {
        self.posts().into_iter().filter(|p| p.accepted).collect()
    }
}

async fn usage(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    raw: String,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut g = lock(&inner);
    let accepted = if g.down {
        false
    } else if g.failures_left > 0 {
        g.failures_left -= 1;
        false
    } else {
        true
    };
    g.posts.push(Posted {
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
        idempotency_key: header("idempotency-key"),
        signature: header("x-chat-relay-signature-256"),
        accepted,
    });
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}
