//! HTTP publish and the Server-Sent Events tail.

use serde_json::{json, Value};

use crate::support::{unique_sid, RedisServer, Relay, SseReader, WsClient};

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
        .header("content-type", "application/json")
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

/// The room budget is the room's, not its local members': an HTTP publisher to a room nobody
/// on this node has joined is limited too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_budget_holds_for_http_without_a_local_member() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &["--room-msgs-per-sec", "1", "--room-msgs-burst", "3"],
    )
    .await;
    let sid = unique_sid("httpbudget");
    let mut answers = Vec::new();
    for i in 0..10 {
        let r = relay
            .post(&sid, &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": format!("m{i}")}}))
            .await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        answers.push((status, body["code"].as_str().unwrap_or("").to_owned()));
    }
    let accepted = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(accepted, 3, "{answers:?}");
    assert!(
        answers[3..]
            .iter()
            .all(|(s, c)| *s == 429 && c == "room_rate_limited"),
        "{answers:?}"
    );
    let client = redis.client().await;
    let key = format!("chat:session:{sid}");
    assert_eq!(crate::support::redis::xlen(&client, &key).await, 3);
}

/// `Last-Event-ID` older than what retention kept: `resume_gap` first, then what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_past_trimmed_history_gets_resume_gap() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[crate::support::NO_RATE_LIMITS, &["--retention", "10"]].concat(),
    )
    .await;
    let sid = unique_sid("ssegap");
    let mut first = None;
    for i in 0..400 {
        let r: Value = relay
            .post(&sid, &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": format!("g{i}")}}))
            .await
            .json()
            .await
            .unwrap();
        first.get_or_insert(r["id"].as_str().unwrap().to_owned());
    }
    let first = first.unwrap();
    let url = relay.http(&format!("/v1/sessions/{sid}/events"));
    let mut sse = SseReader::open(&url, Some(&first)).await;
    let (event, id, gap) = sse.next().await;
    assert_eq!((event.as_str(), id), ("resume_gap", None), "{gap}");
    assert_eq!(gap["bd"]["reason"], "trimmed");
    assert_eq!(gap["bd"]["last_id"], first.as_str());
    let oldest = gap["bd"]["oldest_id"].as_str().unwrap().to_owned();
    let (event, id, _) = sse.next().await;
    assert_eq!(event, "chat.message");
    assert_eq!(id.as_deref(), Some(oldest.as_str()), "then what is left");

    // A resume from an id still there gets no notice.
    let mut fine = SseReader::open(&url, Some(&oldest)).await;
    assert_eq!(fine.next().await.0, "chat.message");
}

/// An SSE client that stops reading is dropped by the room like a WebSocket one; when it reads
/// again it gets what was queued, then a last `error` event (`slow_consumer`), then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_reader_gets_a_final_slow_consumer_event() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[crate::support::NO_RATE_LIMITS, &["--outbound-queue", "8"]].concat(),
    )
    .await;
    let sid = unique_sid("sseslow");
    let mut sse =
        SseReader::open_small_buffer(relay.addr, &format!("/v1/sessions/{sid}/events")).await;
    // ~6 KB per message: the stalled socket and the server's buffers fill, then its queue of 8.
    let big = "가".repeat(1990);
    let mut dropped = false;
    for i in 0..5000 {
        let r = relay
            .post(&sid, &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": format!("{i} {big}")}}))
            .await;
        assert_eq!(r.status(), 201);
        if i % 25 == 24 && relay.room_info(&sid).await["connected_here"] == 0 {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the stalled reader was dropped from the room");
    let mut messages = 0;
    loop {
        match sse.next_or_end().await {
            Some((event, _, data)) if event == "error" => {
                assert_eq!(data["hd"]["code"], "slow_consumer", "{data}");
                assert_eq!(data["bd"]["retryable"], true);
                break;
            }
            Some((event, _, _)) if event == "presence" => {}
            Some((event, _, _)) => {
                assert_eq!(event, "chat.message");
                messages += 1;
            }
            None => panic!("the stream ended without an error event after {messages} messages"),
        }
    }
    assert!(messages > 0);
    assert!(sse.next_or_end().await.is_none(), "then the stream ends");
}
