//! The LLM participant against a real HTTP server speaking the OpenAI streaming format.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::redis::xrange;
use crate::support::{
    unique_sid, Callback, FakeLlm, Mode, RedisServer, Relay, WorkerProcess, WsClient,
};

/// What one client saw of one turn.
struct Turn {
    started: bool,
    deltas: Vec<String>,
    end: Value,
}

/// Reads until the turn's stored end (`llm.response` or `llm.error`), collecting live deltas.
async fn watch_turn(c: &mut WsClient) -> Turn {
    let mut t = Turn {
        started: false,
        deltas: Vec::new(),
        end: Value::Null,
    };
    loop {
        let v = c.next_json().await;
        match v["hd"]["event"].as_str() {
            Some("llm.start") => t.started = true,
            Some("llm.delta") => {
                assert_eq!(
                    v["bd"]["seq"],
                    t.deltas.len(),
                    "deltas arrive in order, none missing"
                );
                assert_eq!(v["hd"]["role"], "llm");
                t.deltas.push(v["bd"]["delta"].as_str().unwrap().to_owned());
            }
            Some("llm.response") | Some("llm.error") => {
                t.end = v;
                return t;
            }
            _ => {}
        }
    }
}

/// Reads past everything else to the first frame of event `event`.
async fn next_event(c: &mut WsClient, event: &str) -> Value {
    loop {
        let v = c.next_json().await;
        if v["hd"]["event"] == event {
            return v;
        }
    }
}

async fn relay_with(redis: &RedisServer, fake: &FakeLlm, extra: &[&str]) -> Relay {
    let base = fake.base_url();
    let mut args = vec![
        "--llm-base-url",
        base.as_str(),
        "--llm-claim-idle-secs",
        "2",
    ];
    args.extend_from_slice(extra);
    Relay::start(&redis.url(), &args).await
}

async fn stored_events(redis: &RedisServer, sid: &str, event: &str) -> Vec<Value> {
    let client = redis.client().await;
    xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == event))
        .map(|(_, f)| {
            serde_json::from_str(&f.into_iter().find(|(k, _)| k == "body").unwrap().1).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mention_gets_a_streamed_reply_seen_by_everyone_and_stored_once() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(
        &["Hel", "lo", " there", "!"],
        Duration::from_millis(20),
    ))
    .await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("llm");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let cid = a.chat("A", "hey @llm, say hello").await;
    let asked = a.expect_ack(&cid).await;

    let ta = watch_turn(&mut a).await;
    let tb = watch_turn(&mut b).await;
    for t in [&ta, &tb] {
        assert!(t.started, "llm.start seen");
        assert_eq!(t.deltas.concat(), "Hello there!");
        assert_eq!(t.end["hd"]["event"], "llm.response");
        assert_eq!(t.end["hd"]["role"], "llm");
        assert_eq!(t.end["hd"]["turn_id"], asked.as_str());
        assert_eq!(t.end["bd"]["text"], "Hello there!");
        assert_eq!(t.end["bd"]["reason"], "stop");
        assert!(
            t.end["bd"]["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "usage stored"
        );
    }
    assert_eq!(ta.end["hd"]["id"], tb.end["hd"]["id"]);
    let responses = stored_events(&redis, &sid, "llm.response").await;
    assert_eq!(responses.len(), 1, "one stored reply");
    // The finish script counts the reply in the room's counters, like the append script.
    let info = relay.room_info(&sid).await;
    assert_eq!(info["participants"]["llm"], 1, "{info}");
    assert_eq!(info["events"]["llm.response"], 1, "{info}");

    // The prompt: people as user turns tagged with their stored role.
    let req = &fake.requests()[0];
    let msgs = req["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "system");
    assert_eq!(msgs.last().unwrap()["content"], "A: hey @llm, say hello");
    assert_eq!(req["max_tokens"], 200);
    assert_eq!(req["stream_options"]["include_usage"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_policies_and_never_answering_itself() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::ZERO)).await;
    // request: only llm.request is answered.
    let relay = relay_with(&redis, &fake, &["--llm-reply", "request"]).await;
    let sid = unique_sid("policy");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "@llm are you there?").await;
    a.expect_ack(&cid).await;
    a.send_json(&json!({"hd": {"event": "llm.request", "role": "A", "cid": "q1"}, "bd": {"prompt": "answer this"}})).await;
    let asked = a.expect_ack("q1").await;
    let t = watch_turn(&mut a).await;
    assert_eq!(
        t.end["hd"]["turn_id"],
        asked.as_str(),
        "the mention was not answered, the request was"
    );
    relay.shutdown().await;

    // all: every chat message, but never its own.
    let relay = relay_with(&redis, &fake, &["--llm-reply", "all"]).await;
    let sid = unique_sid("policy-all");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "no mention here").await;
    let asked = a.expect_ack(&cid).await;
    let t = watch_turn(&mut a).await;
    assert_eq!(t.end["hd"]["turn_id"], asked.as_str());
    // Nothing more comes: the reply does not trigger a reply.
    let cid = a.chat("A", "second").await;
    let second = a.expect_ack(&cid).await;
    let t = watch_turn(&mut a).await;
    assert_eq!(t.end["hd"]["turn_id"], second.as_str());
    assert_eq!(stored_events(&redis, &sid, "llm.response").await.len(), 2);
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_turn_promptly_and_records_the_partial_text() {
    let redis = RedisServer::start();
    let tokens: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
    let fake = FakeLlm::start(Mode::Tokens {
        tokens,
        delay: Duration::from_millis(50),
    })
    .await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("cancel");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    a.send_json(
        &json!({"hd": {"event": "llm.request", "role": "A", "cid": "q"}, "bd": {"text": "count"}}),
    )
    .await;
    let turn = a.expect_ack("q").await;
    // Wait for a few deltas on B, then B cancels.
    let mut seen = 0;
    while seen < 3 {
        let v = b.next_json().await;
        if v["hd"]["event"] == "llm.delta" {
            seen += 1;
        }
    }
    // Only who asked may cancel: B is refused and the turn goes on.
    b.send_json(
        &json!({"hd": {"event": "llm.cancel", "role": "B", "cid": "x"}, "bd": {"turn_id": turn}}),
    )
    .await;
    let refused = b.take_reply("x").await;
    assert_eq!(refused["hd"]["code"], "forbidden_cancel", "{refused}");
    a.send_json(
        &json!({"hd": {"event": "llm.cancel", "role": "A", "cid": "x"}, "bd": {"turn_id": turn}}),
    )
    .await;
    let cancelled_at = Instant::now();
    let end = next_event(&mut b, "llm.response").await;
    let took = cancelled_at.elapsed();
    assert_eq!(end["bd"]["reason"], "cancelled");
    let partial = end["bd"]["text"].as_str().unwrap();
    assert!(
        partial.starts_with("t0 t1 t2"),
        "partial text kept: {partial}"
    );
    assert!(!partial.contains("t199"), "generation stopped early");
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    assert_eq!(
        stored_events(&redis, &sid, "llm.cancel").await.len(),
        1,
        "the cancel is in the history"
    );
    assert_eq!(stored_events(&redis, &sid, "llm.response").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_end_the_turn_with_llm_error() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(Mode::Status(500)).await;
    let relay = relay_with(
        &redis,
        &fake,
        &["--llm-idle-timeout-secs", "1", "--llm-attempts", "2"],
    )
    .await;
    let sid = unique_sid("fail");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "@llm hi").await;
    a.expect_ack(&cid).await;
    let t = watch_turn(&mut a).await;
    assert_eq!(t.end["hd"]["event"], "llm.error");
    assert_eq!(t.end["hd"]["code"], "llm_unavailable");
    assert_eq!(
        t.end["bd"]["message"],
        "the AI service is temporarily unavailable"
    );
    assert_eq!(fake.requests().len(), 2, "retried before the first token");

    // A stall after two tokens: timeout, partial text kept.
    fake.set_mode(Mode::Stall {
        tokens: vec!["a".into(), "b".into()],
    });
    let cid = a.chat("A", "@llm again").await;
    a.expect_ack(&cid).await;
    let t = watch_turn(&mut a).await;
    assert_eq!(t.end["hd"]["event"], "llm.error");
    assert_eq!(t.end["hd"]["code"], "llm_timeout");
    assert_eq!(t.end["bd"]["partial"], "ab");
    let body = t.end.to_string();
    assert!(
        !body.contains("fake failure"),
        "no provider internals reach the room"
    );

    // Nothing listening at all.
    relay.shutdown().await;
    let relay = Relay::start(
        &redis.url(),
        &[
            "--llm-base-url",
            "http://127.0.0.1:9/v1",
            "--llm-attempts",
            "1",
        ],
    )
    .await;
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "@llm anyone?").await;
    a.expect_ack(&cid).await;
    let t = watch_turn(&mut a).await;
    assert_eq!(t.end["hd"]["code"], "llm_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_per_room() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::ZERO)).await;
    let relay = relay_with(&redis, &fake, &["--llm-turns-per-minute", "2"]).await;
    let sid = unique_sid("rate");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut codes = Vec::new();
    for i in 0..3 {
        let cid = a.chat("A", &format!("@llm {i}")).await;
        a.expect_ack(&cid).await;
        let t = watch_turn(&mut a).await;
        codes.push(t.end["hd"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert_eq!(codes, ["ok", "ok", "rate_limited"]);
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_callback_is_retried_until_accepted() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["one", "two"], Duration::ZERO)).await;
    let callback = Callback::start(2).await;
    let url = callback.url();
    let relay = relay_with(&redis, &fake, &["--usage-callback-url", url.as_str()]).await;
    let sid = unique_sid("usage");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "@llm count").await;
    let turn = a.expect_ack(&cid).await;
    watch_turn(&mut a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while callback.received().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = callback.received();
    assert_eq!(got.len(), 3, "two failures, then accepted");
    let r = &got[2];
    assert_eq!(r["session_id"], sid.as_str());
    assert_eq!(r["turn_id"], turn.as_str());
    assert_eq!(r["model"], "smollm2");
    assert_eq!(r["completion_tokens"], 2);
    assert_eq!(r["total_tokens"], r["prompt_tokens"].as_u64().unwrap() + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_answer_each_turn_once() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["a", "b", "c"], Duration::from_millis(5))).await;
    let base = fake.base_url();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("workers");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let _w1 = WorkerProcess::start(
        &redis.url(),
        &["--llm-base-url", &base, "--llm-consumer", "w1"],
    );
    let _w2 = WorkerProcess::start(
        &redis.url(),
        &["--llm-base-url", &base, "--llm-consumer", "w2"],
    );
    const N: usize = 6;
    let mut turns = Vec::new();
    for i in 0..N {
        a.send_json(&json!({"hd": {"event": "llm.request", "role": "A", "cid": format!("q{i}")}, "bd": {"text": format!("q{i}")}})).await;
        turns.push(a.expect_ack(&format!("q{i}")).await);
    }
    // Turns run concurrently on two workers: follow each turn's deltas separately.
    let mut deltas: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut answered = Vec::new();
    while answered.len() < N {
        let v = a.next_json().await;
        let turn = v["hd"]["turn_id"].as_str().unwrap_or_default().to_owned();
        match v["hd"]["event"].as_str() {
            Some("llm.delta") => {
                let d = deltas.entry(turn).or_default();
                assert_eq!(
                    v["bd"]["seq"],
                    d.len(),
                    "each turn's deltas arrive in order"
                );
                d.push(v["bd"]["delta"].as_str().unwrap().to_owned());
            }
            Some("llm.response") => {
                assert_eq!(v["bd"]["text"], "abc");
                assert_eq!(
                    deltas.get(&turn).map(|d| d.concat()).as_deref(),
                    Some("abc")
                );
                answered.push(turn);
            }
            Some("llm.error") => panic!("unexpected error: {v}"),
            _ => {}
        }
    }
    answered.sort();
    turns.sort();
    assert_eq!(answered, turns);
    // Give a duplicate the time to show up if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored_events(&redis, &sid, "llm.response").await.len(),
        N,
        "one reply per turn"
    );
    assert_eq!(fake.requests().len(), N, "no turn generated twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_turn_is_replaced_and_the_turn_answered_once() {
    let redis = RedisServer::start();
    let tokens: Vec<String> = (0..40).map(|i| format!("w{i} ")).collect();
    let fake = FakeLlm::start(Mode::Tokens {
        tokens,
        delay: Duration::from_millis(50),
    })
    .await;
    let base = fake.base_url();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("crash");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let worker_args = [
        "--llm-base-url",
        base.as_str(),
        "--llm-claim-idle-secs",
        "2",
    ];
    let mut w1 = WorkerProcess::start(
        &redis.url(),
        &[&worker_args[..], &["--llm-consumer", "first"]].concat(),
    );
    a.send_json(&json!({"hd": {"event": "llm.request", "role": "A", "cid": "q"}, "bd": {"text": "long answer"}})).await;
    let turn = a.expect_ack("q").await;
    // Mid-turn: some deltas arrived, then the worker dies.
    let mut deltas = 0;
    while deltas < 5 {
        if a.next_json().await["hd"]["event"] == "llm.delta" {
            deltas += 1;
        }
    }
    w1.kill();
    let _w2 = WorkerProcess::start(
        &redis.url(),
        &[&worker_args[..], &["--llm-consumer", "second"]].concat(),
    );
    let end = next_event(&mut a, "llm.response").await;
    assert_eq!(end["hd"]["turn_id"], turn.as_str());
    assert_eq!(end["bd"]["reason"], "stop");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored_events(&redis, &sid, "llm.response").await.len(),
        1,
        "answered exactly once"
    );
    assert_eq!(
        fake.requests().len(),
        2,
        "the second worker generated it again"
    );
}

/// A worker died after it claimed a request and took the turn's lease, before it renewed its
/// claim: the lease outlives the claim. The next worker to claim the request finds the lease
/// busy and waits it out, and answers with the delivery it has, instead of leaving the request
/// for one more claim (with `--llm-max-deliveries 2` that would be the dead-letter stream: a
/// request that never failed, lost to two deaths in a row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_lease_is_waited_out_not_charged_a_delivery() {
    use fred::prelude::*;
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(
        &["fine ", "thanks"],
        Duration::from_millis(10),
    ))
    .await;
    let client = redis.client().await;
    let sid = unique_sid("lease");
    let key = format!("chat:session:{sid}");
    // The dead worker's state: the request delivered to it once, its lease still live.
    let body = json!({"hd": {"event": "llm.request", "role": "A"}, "bd": {"text": "how are you?"}});
    let fields = vec![
        ("participant", "A".to_owned()),
        ("event", "llm.request".to_owned()),
        ("body", body.to_string()),
    ];
    let turn: String = client.xadd(&key, false, None, "*", fields).await.unwrap();
    let _: () = client.xgroup_create(&key, "llm", "0", false).await.unwrap();
    let _: Value = client
        .custom(
            fred::types::CustomCommand::new_static(
                "XREADGROUP",
                fred::types::ClusterHash::FirstKey,
                false,
            ),
            vec![
                "GROUP",
                "llm",
                "ghost",
                "COUNT",
                "1",
                "STREAMS",
                key.as_str(),
                ">",
            ],
        )
        .await
        .unwrap();
    let lease = Duration::from_millis(3500);
    let lease_key = format!("chat:llm:turn:{{{key}}}:{turn}");
    let _: () = client
        .set(
            &lease_key,
            format!("ghost/{turn}"),
            Some(Expiration::PX(lease.as_millis() as i64)),
            None,
            false,
        )
        .await
        .unwrap();
    let leased_at = Instant::now();

    // Claims a request idle for 2 s, on a tick of 1 s: while the ghost's lease is live.
    let base = fake.base_url();
    let _worker = WorkerProcess::start(
        &redis.url(),
        &[
            "--llm-base-url",
            base.as_str(),
            "--llm-claim-idle-secs",
            "2",
            "--llm-max-deliveries",
            "2",
            "--llm-consumer",
            "alive",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    // Seen once: the request claimed by the live worker while the ghost's lease still stood.
    let mut waited = false;
    let reply = loop {
        if let Some(reply) = stored_events(&redis, &sid, "llm.response").await.pop() {
            break reply;
        }
        let pending: Vec<(String, String, u64, u64)> =
            client.xpending(&key, "llm", ("-", "+", 10)).await.unwrap();
        let holder: Option<String> = client.get(&lease_key).await.unwrap();
        waited |= pending.iter().any(|p| p.1 == "alive")
            && holder.is_some_and(|h| h.starts_with("ghost/"));
        let dead: Vec<(String, Vec<(String, String)>)> = xrange(&client, "chat:llm:dead").await;
        assert!(dead.is_empty(), "dead-lettered: {dead:?}");
        assert!(Instant::now() < deadline, "no reply within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        waited,
        "the worker claimed the request before the lease lapsed (else this tests nothing)"
    );
    assert!(
        leased_at.elapsed() >= lease,
        "answered only once the lease lapsed"
    );
    assert_eq!(reply["hd"]["turn_id"], turn.as_str());
    assert_eq!(reply["bd"]["text"], "fine thanks");
    assert_eq!(fake.requests().len(), 1);
}

/// The provider refuses the first requests (503), and the worker's retries take three times
/// its lease before the first token. The lease and the claim are renewed meanwhile, so the
/// other worker never takes the turn over: the reply is generated once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_before_the_first_token_keep_the_lease() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["at ", "last"], Duration::from_millis(10))).await;
    // Backoff from 200 ms, doubling: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s ≈ 6 s of retries.
    fake.fail_next(5, 503);
    let base = fake.base_url();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("retries");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let worker_args = [
        "--llm-base-url",
        base.as_str(),
        "--llm-claim-idle-secs",
        "2",
        "--llm-attempts",
        "6",
    ];
    let _w1 = WorkerProcess::start(
        &redis.url(),
        &[&worker_args[..], &["--llm-consumer", "one"]].concat(),
    );
    let _w2 = WorkerProcess::start(
        &redis.url(),
        &[&worker_args[..], &["--llm-consumer", "two"]].concat(),
    );
    a.send_json(
        &json!({"hd": {"event": "llm.request", "role": "A", "cid": "q"}, "bd": {"text": "hello"}}),
    )
    .await;
    let turn = a.expect_ack("q").await;
    let end = next_event(&mut a, "llm.response").await;
    assert_eq!(end["hd"]["turn_id"], turn.as_str());
    assert_eq!(end["bd"]["text"], "at last");
    // Past two more claim periods: a worker that took the turn over would have asked again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        fake.requests().len(),
        6,
        "five refused, one streamed: the turn was generated once"
    );
    assert_eq!(stored_events(&redis, &sid, "llm.response").await.len(), 1);
}

/// Deleting a session makes the worker's next group read fail (`NOGROUP`: the stream it names
/// is gone). The worker learns which room from the deletion log and stops reading it, without
/// a group check per room it reads, and goes on answering the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_costs_the_worker_no_call_per_room() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::ZERO)).await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sids: Vec<String> = (0..12).map(|i| unique_sid(&format!("many{i}"))).collect();
    let mut clients = Vec::new();
    for sid in &sids {
        let mut c = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
        let cid = c.chat("A", "hello").await;
        c.expect_ack(&cid).await;
        clients.push(c);
    }
    // The worker reads every room: each one answers.
    let ask = |i: usize| json!({"hd": {"event": "llm.request", "role": "A", "cid": format!("q{i}")}, "bd": {"text": "hi"}});
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_json(&ask(i)).await;
        c.expect_event("llm.response").await;
    }
    let client = redis.client().await;
    // Calls of a command, its subcommands included (`cmdstat_xgroup|create:calls=3,...`).
    let stat = |info: &str, name: &str| -> u64 {
        info.lines()
            .filter(|l| {
                l.strip_prefix(&format!("cmdstat_{name}"))
                    .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('|'))
            })
            .filter_map(|l| {
                l.split_once(":calls=")?
                    .1
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    crate::sessions::redis_cmd(&client, &["CONFIG", "RESETSTAT"]).await;

    crate::sessions::delete_session(&relay, &sids[0]).await;
    // The next room's request is answered: the worker read past the failure.
    clients[1].send_json(&ask(100)).await;
    clients[1].expect_event("llm.response").await;
    let info = crate::sessions::redis_cmd(&client, &["INFO", "commandstats"]).await;
    let info = info.as_str().unwrap_or_default();
    assert!(
        stat(info, "xreadgroup") > 0,
        "the worker read the rooms meanwhile: {info}"
    );
    assert_eq!(
        stat(info, "xgroup"),
        0,
        "no group check per room after a delete: {info}"
    );
}
