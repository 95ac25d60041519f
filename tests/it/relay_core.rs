//! Rooms, delivery order, stored fields, acks.

use serde_json::{json, Value};

use crate::support::{redis::xrange, unique_sid, RedisServer, Relay, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participants_see_every_message_in_stream_order() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("two");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;

    let mut acked = Vec::new();
    for i in 0..5 {
        let cid = a.chat("A", &format!("a{i}")).await;
        acked.push(a.expect_ack(&cid).await);
        let cid = b.chat("B", &format!("b{i}")).await;
        acked.push(b.expect_ack(&cid).await);
    }
    // The sender receives its own messages too (delivery comes from the stream).
    let seen_a: Vec<String> = a
        .collect_messages(10)
        .await
        .iter()
        .map(|m| m["hd"]["id"].as_str().unwrap().to_owned())
        .collect();
    let seen_b: Vec<String> = b
        .collect_messages(10)
        .await
        .iter()
        .map(|m| m["hd"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen_a, seen_b, "both members see one order");

    let client = redis.client().await;
    let stored: Vec<String> = xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == "chat.message"))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(seen_a, stored, "delivery order is stream order");
    let mut sorted_acks = acked.clone();
    sorted_acks.sort_by_key(|id| {
        id.split_once('-')
            .map(|(m, s)| (m.parse::<u64>().unwrap(), s.parse::<u64>().unwrap()))
    });
    assert_eq!(sorted_acks, stored, "every ack names a stored entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_participants_and_rooms_are_isolated() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let room1 = unique_sid("iso1");
    let room2 = unique_sid("iso2");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={room1}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={room1}&role=B"))).await;
    let mut u = WsClient::join(&relay.ws_url(&format!("sid={room1}"))).await;
    let mut other = WsClient::join(&relay.ws_url(&format!("sid={room2}&role=A"))).await;

    let cid = u.chat("user", "hello from user").await;
    u.expect_ack(&cid).await;
    for c in [&mut a, &mut b, &mut u] {
        let m = c.collect_messages(1).await.remove(0);
        assert_eq!(m["bd"]["text"], "hello from user");
        assert_eq!(m["hd"]["role"], "user");
    }
    // The other room hears nothing of room1; its next message is its own.
    let cid = other.chat("A", "room2 only").await;
    other.expect_ack(&cid).await;
    let m = other.collect_messages(1).await.remove(0);
    assert_eq!(m["bd"]["text"], "room2 only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_fields_and_utf8_round_trip() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("utf8");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let text = "안녕하세요! こんにちは 你好 🎉👩‍👩‍👧 \"quoted\" \\ back";
    a.send_json(&json!({"hd": {"event": "chat.message", "role": "A", "cid": "k1", "timestamp": "2024-01-01T00:00:00Z"}, "bd": {"text": text}})).await;
    let id = a.expect_ack("k1").await;
    let live = a.collect_messages(1).await.remove(0);
    assert_eq!(live["bd"]["text"], text);
    assert_eq!(live["hd"]["id"], id.as_str());
    assert_eq!(live["hd"]["sid"], sid.as_str());
    assert_eq!(
        live["hd"]["timestamp"], "2024-01-01T00:00:00Z",
        "unknown header fields are kept"
    );
    assert!(live["hd"]["ts"].as_u64().is_some());

    let client = redis.client().await;
    let entries = xrange(&client, &format!("chat:session:{sid}")).await;
    let (sid_entry, fields) = entries
        .iter()
        .find(|(eid, _)| *eid == id)
        .expect("acked id is stored");
    assert_eq!(sid_entry, &id);
    let get = |k: &str| {
        fields
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("participant"), "A");
    assert_eq!(get("event"), "chat.message");
    let body = get("body");
    assert!(
        body.contains("안녕하세요") && body.contains("🎉"),
        "body readable in redis-cli: {body}"
    );
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["hd"]["role"], "A");
    assert_eq!(body["hd"]["sid"], sid.as_str());
    assert_eq!(body["hd"]["cid"], "k1");
    assert_eq!(body["bd"]["text"], text);
    // The join entry is stored too, so history shows who was there.
    assert_eq!(
        entries[0].1.iter().find(|(k, _)| k == "event").unwrap().1,
        "session.join"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_broadcast_not_stored_and_leave_is_stored() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("typing");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    a.expect_event("session.join").await; // B's join
    b.send_json(&json!({"hd": {"event": "chat.typing", "role": "B"}, "bd": {}}))
        .await;
    let t = a.expect_event("chat.typing").await;
    assert_eq!(t["hd"]["role"], "B");
    assert!(t["hd"].get("id").is_none(), "typing has no stream id");
    b.close().await;
    let left = a.expect_event("session.leave").await;
    assert_eq!(left["hd"]["role"], "B");
    let client = redis.client().await;
    let events: Vec<String> = xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .map(|(_, f)| f.into_iter().find(|(k, _)| k == "event").unwrap().1)
        .collect();
    assert_eq!(events, ["session.join", "session.join", "session.leave"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_a_cid_returns_the_original_id_and_stores_nothing() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("dedup");
    let key = format!("chat:session:{sid}");
    let client = redis.client().await;
    let msg = json!({"hd": {"event": "chat.message", "role": "A", "cid": "once"}, "bd": {"text": "only once"}});
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.send_json(&msg).await;
    let first = a.expect_ack("once").await;
    let len = crate::support::redis::xlen(&client, &key).await;
    // The ack was "lost": the client resends on a new connection.
    a.close().await;
    let mut again = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    again.send_json(&msg).await;
    assert_eq!(
        again.expect_ack("once").await,
        first,
        "same id for the same cid"
    );
    // A different role with the same cid is a different sender.
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    b.send_json(&json!({"hd": {"event": "chat.message", "role": "B", "cid": "once"}, "bd": {"text": "mine"}})).await;
    let other = b.expect_ack("once").await;
    assert_ne!(other, first);
    // Joins/leaves were added meanwhile, but only one more chat.message.
    let messages: Vec<String> = xrange(&client, &key)
        .await
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == "chat.message"))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(messages, [first, other]);
    assert!(crate::support::redis::xlen(&client, &key).await > len);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_appends_and_closes_with_1001() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("shutdown");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "last words").await;
    let id = a.expect_ack(&cid).await;
    relay.shutdown().await;
    a.expect_catalogued_close(chat_relay::protocol::Close::Shutdown)
        .await;
    let client = redis.client().await;
    let stored = xrange(&client, &format!("chat:session:{sid}")).await;
    assert!(
        stored.iter().any(|(i, _)| *i == id),
        "the acked message is stored"
    );
    assert_eq!(
        stored
            .last()
            .unwrap()
            .1
            .iter()
            .find(|(k, _)| k == "event")
            .unwrap()
            .1,
        "session.leave",
        "the leave is recorded on the way out"
    );
}

/// `run` checks its configuration itself: a caller that skipped `validate()` gets an error,
/// not a panic (`--ping-secs 0` used to panic in the session's ping interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_invalid_configuration() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: chat_relay::ServeConfig,
    }
    let cfg = <Cli as clap::Parser>::try_parse_from([
        "test",
        "--ping-secs",
        "0",
        "--redis-url",
        "redis://127.0.0.1:1",
    ])
    .unwrap()
    .serve;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = chat_relay::run(listener, cfg, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, chat_relay::RelayError::Config(_)), "{err}");
    assert!(err.to_string().contains("--ping-secs"), "{err}");
}

/// A batch published as ids alone (`-i`) whose bodies this node does not hold — another
/// node's, or a hold dropped when the script's reply was lost — is read from the stream: the
/// member gets the entry once, in order, and the next live entry after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_without_held_bodies_are_read_from_the_stream() {
    use fred::prelude::*;

    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("held");
    let key = format!("chat:session:{sid}");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.chat("A", "before").await;
    let before = a.collect_messages(1).await;
    assert_eq!(before[0]["bd"]["text"], "before");

    // Stored behind the relay's back, then announced the way append.lua announces a batch
    // whose committing node holds the bodies: this relay holds none under that token.
    let client = redis.client().await;
    let body =
        json!({"hd": {"event": "chat.message", "role": "B"}, "bd": {"text": "from the stream"}})
            .to_string();
    let id = store_by_hand(&client, &key, "B", "chat.message", &body).await;
    let _: i64 = client
        .spublish(&key, format!("-i 0.0\n{id} -"))
        .await
        .unwrap();
    let got = a.collect_messages(1).await;
    assert_eq!(got[0]["hd"]["id"], id.as_str());
    assert_eq!(got[0]["bd"]["text"], "from the stream");

    a.chat("A", "after").await;
    let after = a.collect_messages(1).await;
    assert_eq!(after[0]["bd"]["text"], "after", "live again, nothing twice");
}

/// Batches that mix senders and events (two roles sending without waiting, a member joining
/// meanwhile) store every entry with its own participant and event, and the room's counters
/// agree with the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batches_keep_each_entrys_participant_and_event() {
    use std::collections::HashMap;

    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("kinds");
    let url = |role: &str| relay.ws_url(&format!("sid={sid}&role={role}"));
    let mut a = WsClient::join(&url("A")).await;
    let mut b = WsClient::join(&url("B")).await;
    const N: usize = 40;
    let mut late = None;
    for i in 0..N {
        a.chat("A", &format!("a{i}")).await;
        b.chat("B", &format!("b{i}")).await;
        if i == N / 2 {
            late = Some(WsClient::join(&relay.ws_url(&format!("sid={sid}"))).await);
        }
    }
    a.collect_messages(2 * N).await;
    b.collect_messages(2 * N).await;

    let client = redis.client().await;
    let entries = xrange(&client, &format!("chat:session:{sid}")).await;
    let (mut participants, mut events) = (HashMap::new(), HashMap::new());
    for (id, fields) in &entries {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).unwrap().1.clone();
        let body: Value = serde_json::from_str(&get("body")).unwrap();
        assert_eq!(get("event"), body["hd"]["event"].as_str().unwrap(), "{id}");
        assert_eq!(
            get("participant"),
            body["hd"]["role"].as_str().unwrap(),
            "{id}"
        );
        *participants.entry(get("participant")).or_insert(0u64) += 1;
        *events.entry(get("event")).or_insert(0u64) += 1;
    }
    assert_eq!(events["chat.message"], 2 * N as u64);
    assert_eq!(events["session.join"], 3);
    let info = relay.room_info(&sid).await;
    for (name, n) in &participants {
        assert_eq!(info["participants"][name], *n, "{name}: {info}");
    }
    for (name, n) in &events {
        assert_eq!(info["events"][name], *n, "{name}: {info}");
    }
    drop(late);
}

/// Live frames of an LLM turn that come after its stored end (a deposed worker still
/// streaming, a recovery's fresh start read just before the end was stored) are not sent:
/// clients drop a turn at its end, and a late delta would start a reply from nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_frames_of_an_ended_turn_are_dropped() {
    use fred::prelude::*;

    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("ended");
    let key = format!("chat:session:{sid}");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.chat("A", "hello").await;
    a.collect_messages(1).await;

    let client = redis.client().await;
    let turn = "1000-0";
    let live = |kind: &str, attempt: u32, seq: i64, event: &str, bd: serde_json::Value| {
        let frame = json!({"hd": {"event": event, "role": "llm", "sid": sid, "ts": 1,
            "turn_id": turn}, "bd": bd});
        format!("-{kind} {turn} {attempt} {seq}\n{frame}")
    };
    let publish = |payload: String| {
        let (client, key) = (client.clone(), key.clone());
        async move {
            let _: i64 = client.spublish(&key, payload).await.unwrap();
        }
    };
    let start = json!({"text": "", "seq": -1, "attempt": 1});
    publish(live("s", 1, -1, "llm.start", start)).await;
    a.expect_event("llm.start").await;
    publish(live(
        "d",
        1,
        0,
        "llm.delta",
        json!({"delta": "Hel", "seq": 0}),
    ))
    .await;
    let delta = a.expect_event("llm.delta").await;
    assert_eq!(delta["bd"]["delta"], "Hel");

    // The turn's end, stored and announced as a single entry.
    let body = json!({"hd": {"event": "llm.response", "role": "llm", "sid": sid, "ts": 2,
        "turn_id": turn}, "bd": {"text": "Hello", "reason": "stop"}})
    .to_string();
    let id = store_by_hand(&client, &key, "llm", "llm.response", &body).await;
    publish(format!("{id}\n{body}")).await;
    let end = a.expect_event("llm.response").await;
    assert_eq!(end["hd"]["id"], id.as_str());

    publish(live(
        "d",
        1,
        1,
        "llm.delta",
        json!({"delta": "lo", "seq": 1}),
    ))
    .await;
    let again = json!({"text": "Hello", "seq": 1, "attempt": 2});
    publish(live("s", 2, 1, "llm.start", again)).await;
    a.chat("A", "after").await;
    loop {
        let v = a.next_json().await;
        let event = v["hd"]["event"].as_str().unwrap_or_default().to_owned();
        assert!(
            !event.starts_with("llm."),
            "a late frame of an ended turn: {v}"
        );
        if event == "chat.message" {
            assert_eq!(v["bd"]["text"], "after");
            break;
        }
    }
}

/// An entry `XADD`ed behind the relay's back (as redis-cli would); its id.
async fn store_by_hand(
    client: &fred::clients::Client,
    key: &str,
    participant: &str,
    event: &str,
    body: &str,
) -> String {
    use fred::prelude::*;
    let fields = vec![
        ("participant", participant),
        ("event", event),
        ("body", body),
    ];
    client.xadd(key, false, None, "*", fields).await.unwrap()
}
