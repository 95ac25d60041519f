//! Rooms that come and go: live presence across nodes.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{unique_sid, RedisServer, RelayProcess, WsClient};

fn presence_url(node: &RelayProcess, sid: &str) -> String {
    format!("http://127.0.0.1:{}/v1/sessions/{sid}/presence", node.port)
}

async fn presence(node: &RelayProcess, sid: &str) -> Value {
    reqwest::get(presence_url(node, sid))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `GET .../presence` on `node` shows `connections` connections.
async fn presence_becomes(
    node: &RelayProcess,
    sid: &str,
    connections: u64,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let p = presence(node, sid).await;
        if p["connections"] == connections {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "presence never reached {connections}: {p}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads frames until a `presence` frame with `connections` connections.
async fn presence_frame(c: &mut WsClient, connections: u64) -> Value {
    loop {
        let v = c.next_json().await;
        if v["hd"]["event"] == "presence" && v["bd"]["connections"] == connections {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_counts_tabs_and_forgets_a_killed_node() {
    let redis = RedisServer::start();
    let n1 = RelayProcess::start(&redis.url(), &["--llm", "off"]);
    let mut n2 = RelayProcess::start(&redis.url(), &["--llm", "off"]);
    let sid = unique_sid("presence");
    let q = |role: &str| format!("sid={sid}&role={role}");

    let mut a1 = WsClient::join(&n1.ws_url(&q("A"))).await;
    // A member learns who is here when it joins, without reading history.
    let first = presence_frame(&mut a1, 1).await;
    assert_eq!(
        first["bd"]["members"],
        serde_json::json!([{"role": "A", "connections": 1}])
    );
    let a2 = WsClient::join(&n2.ws_url(&q("A"))).await;
    let _b = WsClient::join(&n2.ws_url(&q("B"))).await;

    let p = presence_becomes(&n1, &sid, 3, Duration::from_secs(5)).await;
    assert_eq!(p["sid"], sid.as_str());
    assert_eq!(
        p["members"],
        serde_json::json!([{"role": "A", "connections": 2}, {"role": "B", "connections": 1}]),
        "two tabs of A are one member with two connections"
    );
    let live = presence_frame(&mut a1, 3).await;
    assert_eq!(
        live["bd"]["members"], p["members"],
        "every change is told to the room"
    );
    let info: Value = reqwest::get(format!("http://127.0.0.1:{}/v1/sessions/{sid}", n2.port))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        info["presence"]["connections"], 3,
        "room info carries presence: {info}"
    );

    // A closes one tab: A is still here, with one connection.
    a2.close().await;
    let p = presence_becomes(&n1, &sid, 2, Duration::from_secs(5)).await;
    assert_eq!(
        p["members"],
        serde_json::json!([{"role": "A", "connections": 1}, {"role": "B", "connections": 1}])
    );

    // Node 2 dies with B on it: B vanishes within the presence TTL (20 s) plus a heartbeat.
    n2.kill();
    let p = presence_becomes(&n1, &sid, 1, Duration::from_secs(30)).await;
    assert_eq!(
        p["members"],
        serde_json::json!([{"role": "A", "connections": 1}])
    );
    // And the members still connected hear of it (from their node's next heartbeat).
    let gone = presence_frame(&mut a1, 1).await;
    assert_eq!(gone["bd"]["members"], p["members"]);
}
