//! The HTTP API: paged history, room info, health.

use serde_json::Value;

use crate::support::{unique_sid, RedisServer, Relay, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_oldest_first() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("hist");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let cid = a.chat("A", &format!("m{i}")).await;
        ids.push(a.expect_ack(&cid).await);
    }
    let http = reqwest::Client::new();
    let get = |q: String| {
        let http = http.clone();
        let url = relay.http(&format!("/v1/sessions/{sid}/messages?{q}"));
        async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    // Page forward from the start in pages of 10, skipping the join entry.
    let mut seen = Vec::new();
    let mut after = "0".to_owned();
    loop {
        let page = get(format!("after={after}&limit=10")).await;
        let msgs = page["messages"].as_array().unwrap().clone();
        for m in &msgs {
            if m["hd"]["event"] == "chat.message" {
                seen.push(m["hd"]["id"].as_str().unwrap().to_owned());
            }
        }
        if msgs.len() < 10 {
            break;
        }
        after = page["next_after"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, ids);
    // Newest page, oldest first.
    let newest = get("limit=5".into()).await;
    let newest: Vec<&str> = newest["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hd"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        newest,
        ids[20..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    // Scrolling back from before=ids[20].
    let back = get(format!("before={}&limit=5", ids[20])).await;
    let back: Vec<&str> = back["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hd"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        back,
        ids[15..20].iter().map(String::as_str).collect::<Vec<_>>()
    );
    // A window.
    let win = get(format!("after={}&before={}&limit=100", ids[2], ids[6])).await;
    assert_eq!(win["count"], 3);

    let bad = http
        .get(relay.http(&format!("/v1/sessions/{sid}/messages?limit=0")))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad = http
        .get(relay.http(&format!("/v1/sessions/{sid}/messages?after=x")))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["code"],
        "invalid_last_id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_info_and_health() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let http = reqwest::Client::new();
    let sid = unique_sid("info");

    let missing = http
        .get(relay.http(&format!("/v1/sessions/{sid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert!(body["message"].as_str().unwrap().contains(&sid));

    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    for _ in 0..2 {
        let cid = a.chat("A", "hi").await;
        a.expect_ack(&cid).await;
    }
    let cid = b.chat("B", "hi").await;
    b.expect_ack(&cid).await;
    let info = relay.room_info(&sid).await;
    assert_eq!(info["exists"], true);
    assert_eq!(info["length"], 5);
    assert_eq!(info["participants"]["A"], 3, "{info}");
    assert_eq!(info["participants"]["B"], 2);
    assert_eq!(info["events"]["chat.message"], 3);
    assert_eq!(info["connected_here"], 2);
    assert!(info["first_id"].is_string() && info["last_id"].is_string());

    let h = http.get(relay.http("/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let r = http.get(relay.http("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let nf = http.get(relay.http("/nope")).send().await.unwrap();
    assert_eq!(nf.status(), 404);
    assert_eq!(nf.json::<Value>().await.unwrap()["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed_in_prometheus_format() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("metrics");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "counted").await;
    a.expect_ack(&cid).await;
    a.collect_messages(1).await;
    a.send_text("not json").await;
    a.expect_error().await;
    let body = reqwest::get(relay.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "chat_relay_connections",
        "chat_relay_rooms",
        "chat_relay_frames_in_total",
        "chat_relay_frames_out_total",
        "chat_relay_entries_stored_total{event=\"chat.message\"}",
        "chat_relay_append_seconds_bucket",
        "chat_relay_delivery_lag_seconds_bucket",
        "chat_relay_errors_total{code=\"bad_json\"}",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
}
