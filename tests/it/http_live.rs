//! HTTP publish and the Server-Sent Events tail.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::{unique_sid, RedisServer, Relay, WsClient};

/// Minimal SSE reader over a reqwest body: (event, id, data) triples.
struct SseReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl SseReader {
    async fn open(url: &str, last_event_id: Option<&str>) -> SseReader {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseReader {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> (String, Option<String>, Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
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
                return (event, id, serde_json::from_str(&data).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.body.next())
                .await
                .expect("SSE event within 10 s")
                .expect("stream open")
                .unwrap();
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_a_message_and_follow_the_room_over_sse() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("sse");
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        let url = relay.http(&format!("/v1/sessions/{sid}/messages"));
        async move { http.post(url).json(&body).send().await.unwrap() }
    };
    let mut ws = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let mut sse = SseReader::open(&relay.http(&format!("/v1/sessions/{sid}/events")), None).await;

    let r = post(json!({"hd": {"event": "chat.message", "role": "A", "cid": "h1"}, "bd": {"text": "from curl 🎉"}})).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = ws.collect_messages(1).await.remove(0);
    assert_eq!(m["hd"]["id"], id.as_str());
    assert_eq!(m["bd"]["text"], "from curl 🎉");
    let (event, sse_id, data) = sse.next().await;
    assert_eq!(
        (event.as_str(), sse_id.as_deref()),
        ("chat.message", Some(id.as_str()))
    );
    assert_eq!(data["bd"]["text"], "from curl 🎉");

    // Same cid again: same id, nothing new.
    let again = post(json!({"hd": {"event": "chat.message", "role": "A", "cid": "h1"}, "bd": {"text": "from curl 🎉"}})).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());

    // Transient frames reach SSE too, without an id.
    ws.send_json(&json!({"hd": {"event": "chat.typing", "role": "B"}, "bd": {}}))
        .await;
    let (event, sse_id, _) = sse.next().await;
    assert_eq!((event.as_str(), sse_id), ("chat.typing", None));

    // Refusals are JSON with codes, and store nothing.
    for (body, status, code) in [
        (
            json!({"hd": {"event": "chat.message", "role": "llm"}, "bd": {"text": "x"}}),
            403,
            "reserved_role",
        ),
        (json!({"hd": {"event": "nope"}}), 400, "unknown_event"),
        (
            json!({"hd": {"event": "chat.message"}, "bd": {"text": ""}}),
            400,
            "empty_text",
        ),
    ] {
        let r = post(body).await;
        assert_eq!(r.status(), status);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], code);
    }
    let r = http
        .post(relay.http(&format!("/v1/sessions/{sid}/messages")))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_json");

    // Resume with Last-Event-ID: what came after, in order.
    let r2 =
        post(json!({"hd": {"event": "chat.message", "role": "B"}, "bd": {"text": "second"}})).await;
    let id2 = r2.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r3 =
        post(json!({"hd": {"event": "chat.message", "role": "B"}, "bd": {"text": "third"}})).await;
    let id3 = r3.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut resumed = SseReader::open(
        &relay.http(&format!("/v1/sessions/{sid}/events")),
        Some(&id),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let (event, sse_id, _) = resumed.next().await;
        if event == "chat.message" {
            got.push(sse_id.unwrap());
        }
    }
    assert_eq!(got, [id2, id3]);
}
