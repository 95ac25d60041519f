//! A Server-Sent Events reader: over reqwest, or over a raw socket with a tiny receive buffer
//! for clients that stop reading.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

type Body = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

pub struct SseReader {
    body: Body,
    /// Bytes, not text: a chunk may end inside a UTF-8 character.
    buf: Vec<u8>,
}

/// One event: (`event:`, `id:`, `data:` parsed as JSON).
pub type SseEvent = (String, Option<String>, Value);

impl SseReader {
    pub async fn open(url: &str, last_event_id: Option<&str>) -> SseReader {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        Self::from_response(req.send().await.unwrap())
    }

    /// The event stream of a response already received (e.g. to a POST); it must be one.
    pub fn from_response(resp: reqwest::Response) -> SseReader {
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseReader {
            body: Box::pin(resp.bytes_stream().map(|r| r.map_err(|e| e.to_string()))),
            buf: Vec::new(),
        }
    }

    /// `GET path` on a socket with a 4 KiB receive buffer: once the caller stops reading, the
    /// relay's writes stall after a few KB instead of after megabytes.
    pub async fn open_small_buffer(addr: SocketAddr, path: &str) -> SseReader {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(addr).await.unwrap();
        let head =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut r = BufReader::new(tcp);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut chunked = false;
        loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            if line.trim().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
        }
        assert!(chunked, "an event stream is sent chunked");
        // Chunked transfer coding: `<hex size>\r\n<data>\r\n`, ended by a zero-size chunk.
        let body = futures_util::stream::unfold(r, |mut r| async move {
            let mut size = String::new();
            r.read_line(&mut size).await.ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                return None;
            }
            let mut data = vec![0; size + 2];
            r.read_exact(&mut data).await.ok()?;
            data.truncate(size);
            Some((Ok(Bytes::from(data)), r))
        });
        SseReader {
            body: Box::pin(body),
            buf: Vec::new(),
        }
    }

    /// The next event, `presence` snapshots skipped (they report who is connected, not the
    /// room's traffic; [`SseReader::next_any`] returns them too).
    pub async fn next(&mut self) -> SseEvent {
        loop {
            let ev = self.next_any().await;
            if ev.0 != "presence" {
                return ev;
            }
        }
    }

    pub async fn next_any(&mut self) -> SseEvent {
        self.next_or_end().await.expect("stream open")
    }

    /// The next event with data (keep-alive comments are skipped), or `None` when the stream
    /// ended.
    pub async fn next_or_end(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("events are UTF-8");
                let (mut event, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((event, id, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("SSE event within 10 s")?
                .unwrap();
            self.buf.extend_from_slice(&chunk);
        }
    }
}
