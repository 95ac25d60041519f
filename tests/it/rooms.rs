//! Rooms that come and go: retention by age, idle expiry with everything a room owns, LLM
//! workers that read only rooms with traffic, live presence across nodes.

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

/// Flags that let one test client create many rooms quickly.
const MANY_ROOMS: &[&str] = &[
    "--msgs-per-sec",
    "100000",
    "--msgs-burst",
    "100000",
    "--room-creations-per-sec",
    "100000",
    "--room-creations-burst",
    "100000",
];

async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn dbsize(client: &fred::clients::Client) -> u64 {
    use fred::interfaces::ServerInterface;
    client.dbsize().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_older_than_the_max_age_are_trimmed_and_a_resume_past_them_hears_so() {
    // One entry per stream node, so the approximate trim (`MINID ~`) trims entry by entry.
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "1"]);
    let relay =
        crate::support::Relay::start(&redis.url(), &["--llm", "off", "--retention-max-age", "2s"])
            .await;
    let sid = unique_sid("age");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "old news").await;
    let old = a.expect_ack(&cid).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let cid = a.chat("A", "fresh").await;
    let fresh = a.expect_ack(&cid).await;
    let client = redis.client().await;
    let left = crate::support::redis::xrange(&client, &format!("chat:session:{sid}")).await;
    let ids: Vec<&str> = left.iter().map(|(id, _)| id.as_str()).collect();
    assert!(
        !ids.contains(&old.as_str()),
        "the old entry is trimmed: {ids:?}"
    );
    assert!(ids.contains(&fresh.as_str()));
    // A client that had seen only the old entry hears that what followed it is gone.
    let mut late =
        WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id={old}"))).await;
    let gap = late.next_json().await;
    assert_eq!(gap["hd"]["event"], "resume_gap", "{gap}");
    assert_eq!(gap["bd"]["reason"], "trimmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rooms_expire_with_all_their_keys_and_live_rooms_stay() {
    let redis = RedisServer::start();
    let mut flags = vec!["--llm", "off", "--room-idle-ttl", "2s"];
    flags.extend_from_slice(MANY_ROOMS);
    let relay = crate::support::Relay::start(&redis.url(), &flags).await;
    let client = redis.client().await;
    let (gone, live) = (unique_sid("gone"), unique_sid("live"));

    let mut visitor = WsClient::join(&relay.ws_url(&format!("sid={gone}&role=A"))).await;
    let cid = visitor.chat("A", "with a cid, so a dedup key exists").await;
    visitor.expect_ack(&cid).await;
    visitor.close().await;
    let mut stays = WsClient::join(&relay.ws_url(&format!("sid={live}&role=A"))).await;
    let cid = stays.chat("A", "I stay").await;
    stays.expect_ack(&cid).await;
    assert!(!crate::sessions::keys_naming(&client, &gone)
        .await
        .is_empty());

    wait_until(
        Duration::from_secs(10),
        "the idle room's keys to expire",
        || async {
            crate::sessions::keys_naming(&client, &gone)
                .await
                .is_empty()
        },
    )
    .await;
    // The room with a live member outlived the idle ttl several times over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = crate::sessions::keys_naming(&client, &live).await;
    assert!(
        kept.contains(&format!("chat:session:{live}")),
        "a live member keeps its room: {kept:?}"
    );
    let cid = stays.chat("A", "still here").await;
    stays.expect_ack(&cid).await;
    let info = relay.room_info(&live).await;
    assert_eq!(
        info["events"]["chat.message"], 2,
        "its history is whole: {info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_short_lived_rooms_leave_redis_as_they_found_it() {
    let redis = RedisServer::start();
    let mut flags = vec!["--llm", "off", "--room-idle-ttl", "2s"];
    flags.extend_from_slice(MANY_ROOMS);
    let relay = crate::support::Relay::start(&redis.url(), &flags).await;
    let client = redis.client().await;
    let post = |sid: String, i: usize| {
        let relay = &relay;
        async move {
            let r = relay
                .post(&sid, &serde_json::json!({"hd": {"event": "chat.message", "role": "A", "cid": format!("c{i}")}, "bd": {"text": "hello"}}))
                .await;
            assert_eq!(r.status(), 201, "{:?}", r.text().await);
        }
    };
    // One room first, so the relay's global keys (the room registry) exist in the baseline.
    post(unique_sid("warm"), 0).await;
    wait_until(
        Duration::from_secs(10),
        "the warm-up room to expire",
        || async { dbsize(&client).await <= 1 },
    )
    .await;
    let baseline = dbsize(&client).await;

    // Each room holds a stream, its counters, its wake marker and a dedup key while it lives.
    let mut peak = 0;
    for i in 0..1000 {
        post(unique_sid("brief"), i).await;
        if i % 100 == 99 {
            peak = peak.max(dbsize(&client).await);
        }
    }
    assert!(
        peak >= baseline + 400,
        "the rooms were there: {peak} keys at the peak"
    );
    wait_until(Duration::from_secs(20), "every room to expire", || async {
        dbsize(&client).await <= baseline
    })
    .await;
    assert_eq!(dbsize(&client).await, baseline, "back to the baseline");
}

/// The commands Redis runs for `within`, as `redis-cli monitor` prints them.
fn monitor(redis: &RedisServer, within: Duration) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "monitor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli monitor");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    std::thread::sleep(within);
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_reading_idle_rooms_and_answers_when_they_wake() {
    let redis = RedisServer::start();
    let fake = crate::support::FakeLlm::start(crate::support::FakeLlm::tokens(
        &["hi", " there"],
        Duration::ZERO,
    ))
    .await;
    let base = fake.base_url();
    let relay = crate::support::Relay::start(
        &redis.url(),
        &[
            "--llm",
            "off",
            "--room-wake-after",
            "2s",
            "--room-idle-ttl",
            "30s",
        ],
    )
    .await;
    let _worker = crate::support::WorkerProcess::start(
        &redis.url(),
        &[
            "--llm-base-url",
            &base,
            "--llm-claim-idle-secs",
            "2",
            "--room-wake-after",
            "2s",
        ],
    );
    let sid = unique_sid("wake");
    let key = format!("chat:session:{sid}");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let ask = |cid: &str| serde_json::json!({"hd": {"event": "llm.request", "cid": cid}, "bd": {"text": "hello?"}});
    let answered = |v: &Value| v["hd"]["event"] == "llm.response";
    a.send_json(&ask("q1")).await;
    a.expect_ack("q1").await;
    a.take_where(answered).await;
    let busy = monitor(&redis, Duration::from_millis(1500));
    assert!(
        busy.iter()
            .any(|l| l.contains("XREADGROUP") && l.contains(&key)),
        "the worker reads the room while it is busy"
    );

    // Silent for longer than the wake window: the worker no longer names the room.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = monitor(&redis, Duration::from_millis(2500));
    let reads: Vec<&String> = idle.iter().filter(|l| l.contains("XREADGROUP")).collect();
    assert!(
        reads.iter().all(|l| !l.contains(&key)),
        "an idle room is not read: {reads:?}"
    );

    // Its next entry wakes it up: the worker answers again.
    a.send_json(&ask("q2")).await;
    a.expect_ack("q2").await;
    let reply = a.take_where(answered).await;
    assert_eq!(reply["bd"]["text"], "hi there");
}
