//! A usage-callback endpoint (`POST /usage`) that fails a given number of times before it
//! accepts: what `--llm-usage-callback-url` posts each turn's usage to.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Callback {
    pub addr: SocketAddr,
    /// Every body posted, the refused ones included.
    pub received: Arc<Mutex<Vec<Value>>>,
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
        let received = Arc::new(Mutex::new(Vec::new()));
        let r = received.clone();
        let app = Router::new().route(
            "/usage",
            post(move |Json(v): Json<Value>| {
                let r = r.clone();
                async move {
                    let mut g = r.lock().unwrap_or_else(|p| p.into_inner());
                    g.push(v);
                    if g.len() <= failures {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Callback { addr, received })
    }

    pub fn url(&self) -> String {
        format!("http://{}/usage", self.addr)
    }
}
