//! A real WebSocket client (tokio-tungstenite) with frame helpers that never sleep: every wait is
//! a timeout on the next frame.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    cid: u64,
    /// Frames read while looking for something else (an ack, an error), kept in order for the
    /// next reads so no room traffic is lost to a helper.
    stash: VecDeque<Value>,
    /// The server's close frame (code, reason), once one was read.
    close: Option<(u16, String)>,
    /// How long to wait for each frame.
    patience: std::time::Duration,
}

/// What the next frame was.
#[derive(Debug)]
pub enum Next {
    Json(Value),
    Closed(Option<u16>),
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect");
        WsClient {
            ws,
            cid: 0,
            stash: VecDeque::new(),
            close: None,
            patience: WAIT,
        }
    }

    /// Connect with a tiny kernel receive buffer: a client that stops reading then stalls the
    /// relay's writes after a few KB instead of after megabytes.
    pub async fn connect_small_buffer(url: &str) -> WsClient {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port")
            .parse()
            .expect("socket addr");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let stream = socket.connect(addr).await.expect("tcp connect");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
        WsClient {
            ws,
            cid: 0,
            stash: VecDeque::new(),
            close: None,
            patience: WAIT,
        }
    }

    /// Connect and consume frames up to and including this connection's own `session.join`.
    /// Waits up to `patience` for each frame (a real model on a busy machine is slow).
    pub fn with_patience(mut self, patience: std::time::Duration) -> Self {
        self.patience = patience;
        self
    }

    pub async fn join(url: &str) -> WsClient {
        let mut c = Self::connect(url).await;
        c.expect_event("session.join").await;
        c
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(v.to_string()).await;
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws
            .send(Message::Binary(data.into()))
            .await
            .expect("send binary");
    }

    /// Send a chat.message as `role` with a fresh cid; returns the cid.
    pub async fn chat(&mut self, role: &str, text: &str) -> String {
        // Unique across clients: a cid reused by the same role is an idempotent resend.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.cid = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cid = format!("c{}", self.cid);
        self.send_json(&serde_json::json!({
            "hd": {"event": "chat.message", "role": role, "cid": cid},
            "bd": {"text": text},
        }))
        .await;
        cid
    }

    pub async fn next(&mut self) -> Next {
        loop {
            let msg = tokio::time::timeout(self.patience, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Next::Json(serde_json::from_str(t.as_str()).expect("server sent JSON"))
                }
                Some(Ok(Message::Close(frame))) => {
                    self.close = frame
                        .as_ref()
                        .map(|f| (u16::from(f.code), f.reason.to_string()));
                    return Next::Closed(frame.map(|f| u16::from(f.code)));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Next::Closed(None),
            }
        }
    }

    pub async fn next_json(&mut self) -> Value {
        if let Some(v) = self.stash.pop_front() {
            return v;
        }
        match self.next().await {
            Next::Json(v) => v,
            Next::Closed(code) => panic!("connection closed ({code:?}) while waiting for a frame"),
        }
    }

    /// Skip frames until one with `hd.event == event`.
    pub async fn expect_event(&mut self, event: &str) -> Value {
        loop {
            let v = self.next_json().await;
            if v["hd"]["event"] == event {
                return v;
            }
        }
    }

    /// The ack for `cid` (skipping room traffic); panics on an error frame for it.
    pub async fn expect_ack(&mut self, cid: &str) -> String {
        let v = self.take_reply(cid).await;
        assert_eq!(v["hd"]["event"], "chat.ack", "expected ack, got {v}");
        v["hd"]["id"].as_str().expect("ack id").to_owned()
    }

    /// The ack or error frame answering `cid`; other frames stay queued for later reads.
    pub async fn take_reply(&mut self, cid: &str) -> Value {
        self.take_where(|v| {
            (v["hd"]["event"] == "chat.ack" || v["hd"]["event"] == "error") && v["hd"]["cid"] == cid
        })
        .await
    }

    /// The next error frame; other frames stay queued for later reads.
    pub async fn expect_error(&mut self) -> Value {
        self.take_where(|v| v["hd"]["event"] == "error").await
    }

    /// The first frame matching `pred`, from the stash or the socket; the rest stay queued.
    pub async fn take_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(pos) = self.stash.iter().position(&pred) {
            return self.stash.remove(pos).expect("position is valid");
        }
        loop {
            let v = match self.next().await {
                Next::Json(v) => v,
                Next::Closed(code) => {
                    panic!("connection closed ({code:?}) while waiting for a frame")
                }
            };
            if pred(&v) {
                return v;
            }
            self.stash.push_back(v);
        }
    }

    /// Stored chat.message entries until `n` were seen.
    pub async fn collect_messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.next_json().await;
            if v["hd"]["event"] == "chat.message" {
                out.push(v);
            }
        }
        out
    }

    /// Wait for the server to close; returns the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            if let Next::Closed(code) = self.next().await {
                return code;
            }
        }
    }

    /// Wait for the server to close with `close` from the relay's catalogue: its code and its
    /// reason.
    pub async fn expect_catalogued_close(&mut self, close: chat_relay::protocol::Close) {
        let code = self.expect_close().await;
        assert_eq!(code, Some(close.code()), "{close:?}");
        let reason = self.close.as_ref().map(|(_, r)| r.as_str());
        assert_eq!(reason, Some(close.reason()), "{close:?}");
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}
