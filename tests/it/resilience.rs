//! Redis outages, resume with last_id, slow clients.

use std::time::Duration;

use serde_json::Value;

use crate::support::{redis::xrange, unique_sid, RedisServer, Relay, WsClient, NO_RATE_LIMITS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_gives_store_unavailable_then_recovers_without_reconnecting() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("outage");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let cid = a.chat("A", "before").await;
    a.expect_ack(&cid).await;
    b.collect_messages(1).await;

    redis.stop();
    let cid = a.chat("A", "during").await;
    let err = a.expect_error().await;
    assert_eq!(err["hd"]["code"], "store_unavailable");
    assert_eq!(err["hd"]["cid"], cid.as_str());
    assert_eq!(err["bd"]["retryable"], true);

    redis.restart();
    // Same sockets: sends succeed again once the client reconnects to Redis.
    let mut id = None;
    for attempt in 0..50 {
        let cid = a.chat("A", &format!("after {attempt}")).await;
        let v = a.take_reply(&cid).await;
        if v["hd"]["event"] == "chat.ack" {
            id = Some(v["hd"]["id"].as_str().unwrap().to_owned());
        }
        if id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = id.expect("sends succeed after Redis restarts");
    // And live delivery resumed for the other member (subscription recovered).
    loop {
        let m = b.collect_messages(1).await.remove(0);
        if m["hd"]["id"] == id.as_str() {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_id_has_no_gap_and_no_duplicate() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), NO_RATE_LIMITS).await;
    let sid = unique_sid("resume");
    let url_a = relay.ws_url(&format!("sid={sid}&role=A"));
    let mut writer = WsClient::join(&url_a).await;
    let writer_task = tokio::spawn(async move {
        for i in 0..200 {
            let cid = writer.chat("A", &format!("w{i}")).await;
            writer.expect_ack(&cid).await;
        }
        writer
    });

    let mut seen: Vec<String> = Vec::new();
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    for round in 0..5 {
        for m in b.collect_messages(15).await {
            seen.push(m["hd"]["id"].as_str().unwrap().to_owned());
        }
        b.close().await;
        let last = seen.last().unwrap().clone();
        b = WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id={last}"))).await;
        let _ = round;
    }
    let _writer = writer_task.await.unwrap();
    // Drain up to the writer's last message.
    let client = redis.client().await;
    let key = format!("chat:session:{sid}");
    let all: Vec<String> = xrange(&client, &key)
        .await
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == "chat.message"))
        .map(|(id, _)| id)
        .collect();
    let first = all.iter().position(|id| *id == seen[0]).unwrap();
    while seen.len() < all.len() - first {
        let m = b.collect_messages(1).await.remove(0);
        seen.push(m["hd"]["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        seen,
        all[first..].to_vec(),
        "resumed sequence equals the stream: no gap, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_zero_replays_everything() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("zero");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    for i in 0..3 {
        let cid = a.chat("A", &format!("z{i}")).await;
        a.expect_ack(&cid).await;
    }
    let mut late = WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id=0"))).await;
    let first = late.next_json().await;
    assert_eq!(first["hd"]["event"], "session.join");
    assert_eq!(first["hd"]["role"], "A", "history starts at the beginning");
    let texts: Vec<Value> = late
        .collect_messages(3)
        .await
        .into_iter()
        .map(|m| m["bd"]["text"].clone())
        .collect();
    assert_eq!(texts, ["z0", "z1", "z2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_others_keep_receiving() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            NO_RATE_LIMITS,
            &["--outbound-queue", "8", "--write-timeout-secs", "2"],
        ]
        .concat(),
    )
    .await;
    let sid = unique_sid("slow");
    let mut slow =
        WsClient::connect_small_buffer(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    slow.expect_event("session.join").await; // and never reads again
    let mut reader = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut writer = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=user"))).await;
    // ~6 KB per message (3-byte characters): with the slow client's small receive buffer, its
    // socket stalls after a few messages and its queue of 8 must fill.
    let big = "가".repeat(1990);
    const N: usize = 800;
    let w = tokio::spawn(async move {
        for i in 0..N {
            let cid = writer.chat("user", &format!("{i} {big}")).await;
            writer.expect_ack(&cid).await;
        }
        writer
    });
    let got = reader.collect_messages(N).await;
    assert_eq!(got.len(), N);
    for (i, m) in got.iter().enumerate() {
        assert!(m["bd"]["text"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{i} ")));
    }
    let _writer = w.await.unwrap();
    // The slow member is gone from the room.
    let mut connected = 0;
    for _ in 0..50 {
        let info = relay.room_info(&sid).await;
        connected = info["connected_here"].as_u64().unwrap();
        if connected == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connected, 2, "the slow client was disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_past_retention_or_lost_data_gets_resume_gap() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[NO_RATE_LIMITS, &["--retention", "10"]].concat(),
    )
    .await;
    let sid = unique_sid("gap");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut first = None;
    for i in 0..400 {
        let cid = a.chat("A", &format!("g{i}")).await;
        let id = a.expect_ack(&cid).await;
        first.get_or_insert(id);
    }
    let first = first.unwrap();
    // MAXLEN ~ trims whole macro nodes, so far fewer than 400 remain and `first` is gone.
    let mut late =
        WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id={first}"))).await;
    let gap = late.next_json().await;
    assert_eq!(gap["hd"]["event"], "resume_gap", "{gap}");
    assert_eq!(gap["bd"]["reason"], "trimmed");
    let oldest = gap["bd"]["oldest_id"].as_str().unwrap().to_owned();
    let next = late.next_json().await;
    assert_eq!(
        next["hd"]["id"],
        oldest.as_str(),
        "then what is left, from the oldest"
    );

    // A resume from an id still in the stream gets no notice.
    let mut fine =
        WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id={oldest}"))).await;
    assert_ne!(fine.next_json().await["hd"]["event"], "resume_gap");

    // Redis restarts without its data: the client's last entry is gone.
    let last = a.chat("A", "last before the loss").await;
    let last_id = a.expect_ack(&last).await;
    redis.restart();
    let mut after = None;
    for _ in 0..100 {
        let (ws, ok) = match tokio_tungstenite::connect_async(
            relay.ws_url(&format!("sid={sid}&role=A&last_id={last_id}")),
        )
        .await
        {
            Ok(ok) => (Some(ok), true),
            Err(_) => (None, false),
        };
        if ok {
            after = ws;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(after);
    let mut c = loop {
        let mut c =
            WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=A&last_id={last_id}"))).await;
        match c.next().await {
            crate::support::ws::Next::Json(v) if v["hd"]["event"] == "resume_gap" => {
                assert_eq!(v["bd"]["reason"], "lost", "{v}");
                break c;
            }
            crate::support::ws::Next::Json(v) if v["hd"]["event"] == "error" => {
                // Redis not reachable yet: store_unavailable, then closed. Retry.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("expected resume_gap, got {other:?}"),
        }
    };
    // Service goes on: the join of this connection follows.
    assert_eq!(c.next_json().await["hd"]["event"], "session.join");
}

/// A client that sends while its resume replays several pages of history: its acks and the
/// replay share the socket, and it still gets the room exactly once, in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_while_resuming_keeps_one_order() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), NO_RATE_LIMITS).await;
    let sid = unique_sid("busyresume");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut cids = Vec::new();
    for i in 0..1200 {
        cids.push(a.chat("A", &format!("h{i}")).await);
    }
    for cid in &cids {
        a.expect_ack(cid).await;
    }
    let mut b = WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id=0"))).await;
    let mut sent = Vec::new();
    for i in 0..100 {
        sent.push(b.chat("B", &format!("r{i}")).await);
    }
    let mut acked = Vec::new();
    for cid in &sent {
        acked.push(b.expect_ack(cid).await);
    }
    let got: Vec<String> = b
        .collect_messages(1300)
        .await
        .iter()
        .map(|m| m["hd"]["id"].as_str().unwrap().to_owned())
        .collect();
    let client = redis.client().await;
    let all: Vec<String> = xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == "chat.message"))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(all.len(), 1300);
    assert_eq!(got, all, "every message once, in stream order");
    assert!(acked.iter().all(|id| all.contains(id)));
}
