//! Honest answers: a client's bad input is a client error (or a well-defined empty answer),
//! never a retryable `store_unavailable`; protocol violations close with the code that names
//! them.

use serde_json::{json, Value};

use crate::support::redis::xlen;
use crate::support::{unique_sid, RedisServer, Relay, SseReader, WsClient};

const MAX_ID: &str = "18446744073709551615-18446744073709551615";

/// Ids at the ends of the id space used to reach Redis as ranges it refuses (`(0-0` before,
/// `(max` after): 503 `store_unavailable` over HTTP, a 1013 loop over the WebSocket, silence over
/// SSE. Nothing is before `0-0` and nothing after the greatest id: empty pages; a resume from an
/// id the stream never reached gets `resume_gap` (`ahead`) and then what is stored next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_at_the_ends_of_the_id_space_are_answered_not_retried() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("ends");
    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "first"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    for query in ["before=0", "before=0-0", &format!("after={MAX_ID}")] {
        let r = reqwest::get(relay.http(&format!("/v1/sessions/{sid}/messages?{query}")))
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (status, &body["count"]),
            (200, &json!(0)),
            "{query}: {body}"
        );
    }

    let mut ws =
        WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id={MAX_ID}"))).await;
    let gap = ws.expect_event("resume_gap").await;
    assert_eq!(gap["bd"]["reason"], "ahead", "{gap}");
    let mut sse = SseReader::open(
        &relay.http(&format!("/v1/sessions/{sid}/events")),
        Some(MAX_ID),
    )
    .await;
    let (event, _, gap) = sse.next().await;
    assert_eq!(
        (event.as_str(), &gap["bd"]["reason"]),
        ("resume_gap", &json!("ahead"))
    );

    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "next"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let m = ws.collect_messages(1).await.remove(0);
    assert_eq!(m["bd"]["text"], "next");
    loop {
        let (event, _, data) = sse.next().await;
        if event == "chat.message" {
            assert_eq!(data["bd"]["text"], "next");
            break;
        }
        assert_ne!(event, "error", "{data}");
    }
}

/// Zero-width and other invisible characters alone are an empty message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_only_messages_are_empty() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("zw");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let client = redis.client().await;
    let key = format!("chat:session:{sid}");
    let before = xlen(&client, &key).await;
    for text in [
        "\u{200B}",
        "\u{200C}\u{200D}",
        "\u{2060}",
        "\u{FEFF}",
        " \u{200B}\u{200B} ",
    ] {
        a.send_json(&json!({"hd": {"event": "chat.message", "role": "A", "cid": "zw"}, "bd": {"text": text}}))
            .await;
        assert_eq!(
            a.expect_error().await["hd"]["code"],
            "empty_text",
            "{text:?}"
        );
        let r = relay
            .post(
                &sid,
                &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": text}}),
            )
            .await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "empty_text");
    }
    assert_eq!(xlen(&client, &key).await, before, "nothing stored");
    // Visible text with joiners and variation selectors is kept as sent.
    let family = "👨\u{200D}👩\u{200D}👧 ❤\u{FE0F}";
    let cid = a.chat("A", family).await;
    a.expect_ack(&cid).await;
    assert_eq!(a.collect_messages(1).await[0]["bd"]["text"], family);
}

/// A WebSocket spoken byte by byte, for frames no client library would send.
struct RawWs {
    tcp: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades, then reads up to this connection's own `session.join`.
    async fn join(relay: &Relay, query: &str) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        let head = format!(
            "GET /v1/session/chat?{query} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            relay.addr
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        let mut ws = RawWs {
            tcp,
            buf: buf.split_off(end),
        };
        loop {
            match ws.frame().await {
                Some((1, text)) if String::from_utf8_lossy(&text).contains("session.join") => {
                    return ws
                }
                Some(_) => {}
                None => panic!("closed before session.join"),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        // The relay may already have closed (after an earlier frame in a flood).
        let _ = self.tcp.write_all(bytes).await;
    }

    /// The next server frame (opcode, payload); `None` when the connection ends.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 2 {
                let (op, len7) = (self.buf[0] & 0x0f, (self.buf[1] & 0x7f) as usize);
                let (len, at) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                self.tcp.read(&mut chunk),
            )
            .await
            .expect("a frame within 10 s")
            .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The close code and reason the relay sends, skipping other frames.
    async fn close_frame(&mut self) -> Option<(u16, String)> {
        loop {
            match self.frame().await? {
                (8, p) if p.len() >= 2 => {
                    return Some((
                        u16::from_be_bytes([p[0], p[1]]),
                        String::from_utf8_lossy(&p[2..]).into_owned(),
                    ))
                }
                _ => {}
            }
        }
    }
}

/// A client frame: FIN and opcode byte, payload, masked (unless `masked` is false).
fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Invalid UTF-8 closes with 1007; framing violations with 1002 (a ping over 125 bytes too, not
/// `frame_too_large`); all from the close catalogue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1007_or_1002() {
    use chat_relay::protocol::Close;
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("violations");
    let cases: Vec<(&str, Vec<u8>, Close)> = vec![
        (
            "invalid UTF-8 text",
            client_frame(0x81, &[0xff, 0xfe, 0xfd], true),
            Close::InvalidUtf8,
        ),
        (
            "unmasked frame",
            client_frame(0x81, b"hi", false),
            Close::ProtocolViolation,
        ),
        (
            "reserved bit",
            client_frame(0xC1, b"hi", true),
            Close::ProtocolViolation,
        ),
        (
            "reserved data opcode",
            client_frame(0x83, b"", true),
            Close::ProtocolViolation,
        ),
        (
            "reserved control opcode",
            client_frame(0x8B, b"", true),
            Close::ProtocolViolation,
        ),
        (
            "continuation of nothing",
            client_frame(0x80, b"x", true),
            Close::ProtocolViolation,
        ),
        (
            "fragmented ping",
            client_frame(0x09, b"", true),
            Close::ProtocolViolation,
        ),
        (
            "ping over 125 bytes",
            client_frame(0x89, &[b'p'; 126], true),
            Close::ProtocolViolation,
        ),
    ];
    for (what, frame, close) in cases {
        let mut ws = RawWs::join(&relay, &format!("sid={sid}&role=A")).await;
        ws.send(&frame).await;
        let got = ws.close_frame().await;
        assert_eq!(
            got,
            Some((close.code(), close.reason().to_owned())),
            "{what}"
        );
    }
}

/// Pings are paid from the connection's budget: a ping flood ends in the `rate limits ignored`
/// close like a message flood, and a calm client's pings are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_are_closed() {
    use chat_relay::protocol::Close;
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--msgs-per-sec",
            "2",
            "--msgs-burst",
            "5",
            "--abuse-strikes",
            "30",
        ],
    )
    .await;
    let sid = unique_sid("pings");
    let mut calm = RawWs::join(&relay, &format!("sid={sid}&role=B")).await;
    calm.send(&client_frame(0x89, b"are you there", true)).await;
    loop {
        let (op, payload) = calm.frame().await.expect("a pong");
        if op == 0xA {
            assert_eq!(payload, b"are you there");
            break;
        }
    }
    let mut flood = RawWs::join(&relay, &format!("sid={sid}&role=A")).await;
    let burst: Vec<u8> = (0..2000)
        .flat_map(|_| client_frame(0x89, b"", true))
        .collect();
    flood.send(&burst).await;
    assert_eq!(
        flood.close_frame().await,
        Some((
            Close::RateLimitsIgnored.code(),
            Close::RateLimitsIgnored.reason().to_owned()
        ))
    );
}

/// A raw HTTP/1.1 exchange: writes `head` (and nothing more), reads the answer until the relay
/// closes or 5 s pass; (status, headers, body).
async fn raw_http(relay: &Relay, head: &[u8]) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(head).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // One complete answer is enough.
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                });
                if len.is_some_and(|n| body.len() >= n) {
                    return;
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn coded(body: &str) -> (String, bool) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    (
        v["code"].as_str().unwrap_or("").to_owned(),
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
    )
}

/// Every refusal anywhere on the HTTP surface is `{"code","message"}` JSON: duplicate query
/// parameters, bodies over the limit (refused without reading them), overlong targets and
/// headers, wrong methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_refusal_is_coded_json() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--max-frame-bytes", "1024"]).await;
    let sid = unique_sid("refusals");
    let get = |target: String, extra: String| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n").into_bytes()
    };
    let long_header = format!("X-Big: {}\r\n", "h".repeat(40 * 1024));
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("duplicate query parameter", get(format!("/v1/sessions/{sid}/messages?limit=1&limit=2"), String::new()), 400, "invalid_request"),
        ("duplicate handshake parameter", get(format!("/v1/session/chat?sid={sid}&sid=other"), String::new()), 400, "invalid_request"),
        ("target over 16 KiB", get(format!("/v1/sessions/{sid}/messages?after={}", "1".repeat(20 * 1024)), String::new()), 414, "uri_too_long"),
        ("headers over 32 KiB", get("/healthz".into(), long_header), 431, "headers_too_large"),
        ("more than 100 header lines", get("/healthz".into(), many_headers), 431, "headers_too_large"),
        ("wrong method", b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(), 405, "method_not_allowed"),
        ("wrong method on the WebSocket route", b"DELETE /v1/session/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405, "method_not_allowed"),
        // Headers only: the relay must answer without waiting for (or buffering) 10 MB.
        ("body over the frame limit", format!("POST /v1/sessions/{sid}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n").into_bytes(), 413, "frame_too_large"),
        ("unknown path", get("/nope".into(), String::new()), 404, "not_found"),
    ];
    for (what, request, status, code) in cases {
        let (got, head, body) = raw_http(&relay, &request).await;
        assert_eq!(got, status, "{what}: {head}");
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        let (got_code, has_message) = coded(&body);
        assert_eq!(got_code, code, "{what}: {body}");
        assert!(has_message, "{what}: {body}");
        if status == 405 {
            assert!(
                head.contains("\r\nallow: "),
                "{what} names the allowed methods: {head}"
            );
        }
    }
    let (_, _, body) = raw_http(
        &relay,
        &get(
            format!("/v1/sessions/{sid}/messages?limit=1&limit=2"),
            String::new(),
        ),
    )
    .await;
    assert!(body.contains("duplicate"), "says what was wrong: {body}");
}
