//! Resumable LLM turns: a reply in progress followed from any way in, at any moment, through
//! worker crashes; who may cancel; what a cut-short turn stores; the reply as the LLM's own line.
//!
//! Every client here rebuilds the reply by the rule the README gives clients — `llm.start` sets
//! the turn's text to `bd.text`, each next-seq `llm.delta` appends `bd.delta` — and fails on
//! anything else: a delta before any start, a delta out of sequence (a gap or a duplicate), or a
//! start that moves the text back.

use std::time::{Duration, Instant};

use fred::interfaces::SortedSetsInterface;
use serde_json::{json, Value};

use crate::support::sse::SseEvent;
use crate::support::{unique_sid, FakeLlm, RedisServer, Relay, SseReader, WorkerProcess, WsClient};

/// One client's view of one turn.
#[derive(Debug)]
struct Rebuilt {
    text: String,
    /// Every `llm.start` the client got for the turn, in order.
    starts: Vec<Value>,
    /// The stored `llm.response` / `llm.error`.
    end: Value,
}

/// Applies the client rule to one frame of `turn`; `Some(end)` at the stored end.
fn apply(r: &mut Rebuilt, pos: &mut Option<(u64, i64)>, v: Value) -> bool {
    let bd = &v["bd"];
    match v["hd"]["event"].as_str() {
        Some("llm.start") => {
            let (attempt, seq) = (bd["attempt"].as_u64().unwrap(), bd["seq"].as_i64().unwrap());
            if let Some((a, s)) = *pos {
                assert!(
                    attempt > a || (attempt == a && seq > s),
                    "a start never moves the text back: had ({a}, {s}), got {v}"
                );
            }
            *pos = Some((attempt, seq));
            r.text = bd["text"].as_str().unwrap().to_owned();
            r.starts.push(v);
        }
        Some("llm.delta") => {
            let (_, s) = pos.expect("a delta only ever follows a start");
            assert_eq!(
                bd["seq"].as_i64().unwrap(),
                s + 1,
                "deltas are contiguous: {v}"
            );
            *pos = pos.map(|(a, _)| (a, s + 1));
            r.text.push_str(bd["delta"].as_str().unwrap());
        }
        Some("llm.response") | Some("llm.error") => {
            r.end = v;
            return true;
        }
        _ => {}
    }
    false
}

fn of_turn(v: &Value, turn: &str) -> bool {
    v["hd"]["turn_id"] == turn
}

/// Reads a WebSocket until `turn` ends, rebuilding its text.
async fn rebuild_ws(c: &mut WsClient, turn: &str) -> Rebuilt {
    let mut r = Rebuilt {
        text: String::new(),
        starts: Vec::new(),
        end: Value::Null,
    };
    let mut pos = None;
    loop {
        let v = c.next_json().await;
        if of_turn(&v, turn) && apply(&mut r, &mut pos, v) {
            return r;
        }
    }
}

/// Reads Server-Sent Events until `turn` ends, rebuilding its text.
async fn rebuild_sse(s: &mut SseReader, turn: &str) -> Rebuilt {
    let mut r = Rebuilt {
        text: String::new(),
        starts: Vec::new(),
        end: Value::Null,
    };
    let mut pos = None;
    loop {
        let (event, _id, v): SseEvent = s.next().await;
        assert_eq!(v["hd"]["event"], event.as_str(), "event: is hd.event");
        if of_turn(&v, turn) && apply(&mut r, &mut pos, v) {
            return r;
        }
    }
}

/// Waits until the room's info lists `turn` in progress with at least `chars` characters.
async fn turn_has_text(relay: &Relay, sid: &str, turn: &str, chars: u64) -> Value {
    turn_has_text_as(relay, sid, turn, chars, None).await
}

async fn turn_has_text_as(
    relay: &Relay,
    sid: &str,
    turn: &str,
    chars: u64,
    token: Option<&str>,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = match token {
        Some(t) => relay.http(&format!("/v1/sessions/{sid}?token={t}")),
        None => relay.http(&format!("/v1/sessions/{sid}")),
    };
    loop {
        let info: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        let active = info["active_turns"].as_array().cloned().unwrap_or_default();
        if let Some(t) = active.iter().find(|t| t["turn_id"] == turn) {
            if t["chars"].as_u64().unwrap_or(0) >= chars {
                return t.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "turn {turn} never reached {chars} chars: {info}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn numbered(n: usize, delay: Duration) -> crate::support::Mode {
    crate::support::Mode::Tokens {
        tokens: (0..n).map(|i| format!("w{i} ")).collect(),
        delay,
    }
}

fn request(cid: &str, text: &str) -> Value {
    json!({"hd": {"event": "llm.request", "cid": cid}, "bd": {"text": text}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_resumers_and_sse_followers_rebuild_the_exact_reply() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(numbered(60, Duration::from_millis(40))).await;
    let base = fake.base_url();
    let relay = Relay::start(&redis.url(), &["--llm-base-url", &base]).await;
    let sid = unique_sid("catchup");
    let room = |q: &str| relay.ws_url(&format!("sid={sid}&role=A{q}"));

    let mut a = WsClient::join(&room("")).await;
    a.send_json(&request("q", "count for us")).await;
    let turn = a.expect_ack("q").await;
    let t = turn.clone();
    let present = tokio::spawn(async move { rebuild_ws(&mut a, &t).await });

    let listed = turn_has_text(&relay, &sid, &turn, 12).await;
    assert_eq!(listed["requester"], "A");
    assert_eq!(listed["attempt"], 1);

    // Mid-turn: a fresh join, a resume right after the request, SSE without and with
    // Last-Event-ID.
    let mut fresh = WsClient::join(&room("")).await;
    let mut resumed = WsClient::connect(&room(&format!("&last_id={turn}"))).await;
    let events = relay.http(&format!("/v1/sessions/{sid}/events"));
    let mut sse = SseReader::open(&events, None).await;
    let mut sse_resumed = SseReader::open(&events, Some(&turn)).await;

    let present = present.await.unwrap();
    let mut seen = vec![
        ("present", present),
        ("fresh", rebuild_ws(&mut fresh, &turn).await),
        ("resumed", rebuild_ws(&mut resumed, &turn).await),
        ("sse", rebuild_sse(&mut sse, &turn).await),
        ("sse resumed", rebuild_sse(&mut sse_resumed, &turn).await),
    ];
    let stored = seen[0].1.end["bd"]["text"].as_str().unwrap().to_owned();
    assert!(
        stored.starts_with("w0 w1 w2 ") && stored.ends_with("w59 "),
        "{stored}"
    );
    for (who, r) in &seen {
        assert_eq!(r.end["hd"]["event"], "llm.response", "{who}");
        assert_eq!(
            r.end["bd"]["text"],
            stored.as_str(),
            "{who}: one stored reply"
        );
        assert_eq!(r.text, stored, "{who} rebuilt the stored reply exactly");
    }
    // A member present from the start got the empty start; the others joined mid-reply.
    let first = &seen[0].1.starts[0]["bd"];
    assert_eq!(
        (first["seq"].as_i64(), first["text"].as_str()),
        (Some(-1), Some(""))
    );
    for (who, r) in seen.drain(1..) {
        let caught_up = &r.starts[0]["bd"];
        assert!(
            caught_up["seq"].as_i64().unwrap() >= 0,
            "{who} caught up mid-turn: {caught_up}"
        );
        assert!(!caught_up["text"].as_str().unwrap().is_empty(), "{who}");
    }
    let info = relay.room_info(&sid).await;
    assert_eq!(
        info["active_turns"],
        json!([]),
        "the turn is no longer listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_turn_hands_it_over_and_everyone_rebuilds_the_final_text() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(numbered(40, Duration::from_millis(50))).await;
    let base = fake.base_url();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let worker = |name: &str| {
        WorkerProcess::start(
            &redis.url(),
            &[
                "--llm-base-url",
                &base,
                "--llm-consumer",
                name,
                "--llm-claim-idle-secs",
                "2",
            ],
        )
    };
    let sid = unique_sid("takeover");
    let mut w1 = worker("w1");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.send_json(&request("q", "count")).await;
    let turn = a.expect_ack("q").await;
    let t = turn.clone();
    let present = tokio::spawn(async move { rebuild_ws(&mut a, &t).await });
    turn_has_text(&relay, &sid, &turn, 15).await;
    w1.kill();
    // Joined while nobody generates: catches up from the dead attempt's text.
    let mut late = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let _w2 = worker("w2");

    let present = present.await.unwrap();
    let late = rebuild_ws(&mut late, &turn).await;
    let end = &present.end;
    assert_eq!(end["hd"]["event"], "llm.response", "{end}");
    let stored = end["bd"]["text"].as_str().unwrap();
    assert_eq!(present.text, stored);
    assert_eq!(late.text, stored);
    assert!(
        stored.ends_with("w39 "),
        "the new attempt answered in full: {stored}"
    );
    let attempts: Vec<u64> = present
        .starts
        .iter()
        .map(|s| s["bd"]["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2], "the takeover is announced as attempt 2");
    assert!(
        late.starts[0]["bd"]["seq"].as_i64().unwrap() >= 0,
        "caught up from the dead attempt"
    );
    // What the dead attempt streamed counts: more completion tokens than the reply has.
    let usage = &end["bd"]["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 40, "{usage}");
    assert_eq!(
        usage["estimated"], true,
        "the dead attempt's tokens are counted, not reported"
    );
    let replies =
        crate::support::redis::xrange(&redis.client().await, &format!("chat:session:{sid}"))
            .await
            .into_iter()
            .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == "llm.response"))
            .count();
    assert_eq!(replies, 1, "answered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_requester_cancels_and_a_cut_turn_stores_what_the_room_saw() {
    const SECRET: &str = "turns-secret";
    let redis = RedisServer::start();
    let fake = FakeLlm::start(numbered(200, Duration::from_millis(30))).await;
    let base = fake.base_url();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--llm-base-url",
            &base,
            "--auth",
            "jwt",
            "--jwt-secret",
            SECRET,
        ],
    )
    .await;
    let sid = unique_sid("cancel");
    let token = |sub: &str| {
        chat_relay::mint(
            SECRET,
            std::slice::from_ref(&sid),
            "A",
            sub,
            Duration::from_secs(600),
        )
        .unwrap()
    };
    let url = |sub: &str| relay.ws_url(&format!("sid={sid}&token={}", token(sub)));
    let mut alice = WsClient::join(&url("alice")).await;
    let mut mallory = WsClient::join(&url("mallory")).await;
    let mut watcher = WsClient::join(&url("watcher")).await;
    alice.send_json(&request("q", "count")).await;
    let turn = alice.expect_ack("q").await;
    let t = turn.clone();
    let watching = tokio::spawn(async move { rebuild_ws(&mut watcher, &t).await });
    let alice_token = token("alice");
    let listed = |chars| turn_has_text_as(&relay, &sid, &turn, chars, Some(&alice_token));
    listed(10).await;

    // Same role, another subject: refused, and the turn goes on.
    let cancel =
        |cid: &str| json!({"hd": {"event": "llm.cancel", "cid": cid}, "bd": {"turn_id": turn}});
    mallory.send_json(&cancel("m")).await;
    let refused = mallory.take_reply("m").await;
    assert_eq!(refused["hd"]["code"], "forbidden_cancel", "{refused}");
    let before = listed(0).await["chars"].as_u64().unwrap();
    listed(before + 6).await;

    alice.send_json(&cancel("a")).await;
    assert_eq!(alice.take_reply("a").await["hd"]["event"], "chat.ack");
    let seen = watching.await.unwrap();
    let end = &seen.end;
    assert_eq!(end["bd"]["reason"], "cancelled", "{end}");
    assert_eq!(
        end["bd"]["text"],
        seen.text.as_str(),
        "stores exactly the text the room saw"
    );
    let usage = &end["bd"]["usage"];
    assert_eq!(
        usage["estimated"], true,
        "the provider sent no usage: counted and estimated"
    );
    let chunks = seen.text.split_whitespace().count() as u64;
    assert_eq!(
        usage["completion_tokens"], chunks,
        "one token per streamed chunk: {usage}"
    );
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + chunks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_cancel_any_lets_any_member_cancel() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(numbered(200, Duration::from_millis(30))).await;
    let base = fake.base_url();
    let relay = Relay::start(
        &redis.url(),
        &["--llm-base-url", &base, "--llm-cancel", "any"],
    )
    .await;
    let sid = unique_sid("cancel-any");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    a.send_json(&request("q", "count")).await;
    let turn = a.expect_ack("q").await;
    turn_has_text(&relay, &sid, &turn, 6).await;
    b.send_json(&json!({"hd": {"event": "llm.cancel", "cid": "b"}, "bd": {"turn_id": turn}}))
        .await;
    assert_eq!(b.take_reply("b").await["hd"]["event"], "chat.ack");
    let seen = rebuild_ws(&mut a, &turn).await;
    assert_eq!(seen.end["bd"]["reason"], "cancelled");
    // Under `any` nothing is checked: a cancel naming no turn is stored like before.
    b.send_json(&json!({"hd": {"event": "llm.cancel", "cid": "x"}, "bd": {"turn_id": "1-0"}}))
        .await;
    assert_eq!(b.take_reply("x").await["hd"]["event"], "chat.ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_unknown_turn_is_not_found() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("cancel-unknown");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.send_json(&json!({"hd": {"event": "llm.cancel", "cid": "x"}, "bd": {"turn_id": "1-0"}}))
        .await;
    let refused = a.take_reply("x").await;
    assert_eq!(refused["hd"]["code"], "not_found", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_is_the_llms_own_line() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(
        &["llm", ":", " Hello", " you", " two.", "\nB:", " me too"],
        Duration::ZERO,
    ))
    .await;
    let base = fake.base_url();
    let relay = Relay::start(&redis.url(), &["--llm-base-url", &base]).await;
    let sid = unique_sid("own-line");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.chat("B", "hi A").await;
    a.send_json(&request("q", "@llm say hello")).await;
    let turn = a.expect_ack("q").await;
    let seen = rebuild_ws(&mut a, &turn).await;
    // The fake ignores stop sequences (a real server stops at "\nB:"); the prefix is dropped.
    assert!(
        seen.end["bd"]["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello you two."),
        "{}",
        seen.end
    );
    assert_eq!(seen.text, seen.end["bd"]["text"].as_str().unwrap());
    let sent = &fake.requests()[0];
    let stops: Vec<&str> = sent["stop"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        stops,
        ["\nA:", "\nB:", "\nllm:"],
        "a stop per speaker the prompt names, newest first"
    );
}

/// Waits until `cond` holds, checking every 50 ms, for at most `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_callbacks_survive_a_down_endpoint_and_a_killed_worker() {
    use hmac::{Hmac, Mac};

    const SECRET: &str = "bill-me";
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["one ", "two"], Duration::ZERO)).await;
    let callback = crate::support::Callback::start(0).await;
    callback.set_down(true);
    let (base, url) = (fake.base_url(), callback.url());
    let worker = |name: &str| {
        WorkerProcess::start(
            &redis.url(),
            &[
                "--llm-base-url",
                &base,
                "--llm-consumer",
                name,
                "--llm-claim-idle-secs",
                "2",
                "--usage-callback-url",
                &url,
                "--usage-callback-secret",
                SECRET,
            ],
        )
    };
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("billing");
    let mut w1 = worker("w1");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut turns = Vec::new();
    for q in ["q1", "q2"] {
        a.send_json(&request(q, "count")).await;
        let turn = a.expect_ack(q).await;
        rebuild_ws(&mut a, &turn).await;
        turns.push(turn);
    }
    // Both turns' callbacks were tried and refused; the worker dies while it retries.
    eventually(
        Duration::from_secs(15),
        "refused attempts for both turns",
        || {
            let keys: std::collections::BTreeSet<_> = callback
                .posts()
                .into_iter()
                .filter_map(|p| p.idempotency_key)
                .collect();
            keys.len() == 2
        },
    )
    .await;
    w1.kill();
    callback.set_down(false);
    let _w2 = worker("w2");
    eventually(Duration::from_secs(20), "both callbacks accepted", || {
        callback.accepted().len() >= 2
    })
    .await;
    // Nothing more arrives: one accepted callback per turn.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut accepted = callback.accepted();
    assert_eq!(
        accepted.len(),
        2,
        "exactly one accepted callback per turn: {accepted:?}"
    );
    // Retries go out in any order; the ordinal says which turn each one is.
    accepted.sort_by_key(|p| p.body["turn"].as_u64());
    for (i, p) in accepted.iter().enumerate() {
        let b = &p.body;
        assert_eq!(b["type"], "usage");
        assert_eq!(b["session_id"], sid.as_str());
        assert_eq!(b["turn"], i + 1, "the turn's ordinal in the room: {b}");
        assert_eq!(b["turn_id"], turns[i].as_str());
        assert_eq!(p.idempotency_key.as_deref(), Some(turns[i].as_str()));
        assert_eq!(b["model"], "smollm2");
        assert_eq!(b["completion_tokens"], 2);
        assert_eq!(
            b["total_tokens"].as_u64().unwrap(),
            b["prompt_tokens"].as_u64().unwrap() + 2
        );
        assert_eq!(b["reason"], "stop");
        assert_eq!(b["estimated"], false, "the provider reported usage");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(p.raw.as_bytes());
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            p.signature.as_deref(),
            Some(format!("sha256={hex}").as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_never_accepted_lands_in_the_dead_letter_stream() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["x"], Duration::ZERO)).await;
    let callback = crate::support::Callback::start(0).await;
    callback.set_down(true);
    let (base, url) = (fake.base_url(), callback.url());
    let relay = Relay::start(
        &redis.url(),
        &[
            "--llm-base-url",
            &base,
            "--usage-callback-url",
            &url,
            "--usage-callback-max-secs",
            "2",
        ],
    )
    .await;
    let sid = unique_sid("dead-bill");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.send_json(&request("q", "count")).await;
    let turn = a.expect_ack("q").await;
    rebuild_ws(&mut a, &turn).await;
    let client = redis.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let dead = loop {
        let dead = crate::support::redis::xrange(&client, "chat:usage:dead").await;
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 1, "given up after --usage-callback-max-secs");
    let field = |k: &str| {
        dead[0]
            .1
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("turn_id").as_deref(), Some(turn.as_str()));
    assert!(callback.posts().len() >= 2, "retried before giving up");
    let metrics = reqwest::get(relay.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"chat_relay_usage_callbacks_total{outcome="dead"} 1"#),
        "{metrics}"
    );
}

/// `DELETE /api/sessions/{id}` removes every key that names the session, yet what the session
/// owes is still billed: its callback, refused so far, is delivered once from the outbox of
/// deleted sessions, with the fields it had (its ordinal included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sessions_pending_callback_is_still_delivered() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["one ", "two"], Duration::ZERO)).await;
    let callback = crate::support::Callback::start(0).await;
    callback.set_down(true);
    let (base, url) = (fake.base_url(), callback.url());
    let relay = Relay::start(
        &redis.url(),
        &["--llm-base-url", &base, "--usage-callback-url", &url],
    )
    .await;
    let sid = unique_sid("owed");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.send_json(&request("q", "count")).await;
    let turn = a.expect_ack("q").await;
    rebuild_ws(&mut a, &turn).await;
    eventually(Duration::from_secs(15), "a refused attempt", || {
        !callback.posts().is_empty()
    })
    .await;

    let deleted = reqwest::Client::new()
        .delete(relay.http(&format!("/api/sessions/{sid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let client = redis.client().await;
    assert_eq!(
        crate::sessions::keys_naming(&client, &sid).await,
        Vec::<String>::new(),
        "a SCAN for the id finds nothing"
    );

    callback.set_down(false);
    eventually(Duration::from_secs(20), "the callback accepted", || {
        !callback.accepted().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = callback.accepted();
    assert_eq!(accepted.len(), 1, "delivered once: {accepted:?}");
    let b = &accepted[0].body;
    assert_eq!(b["session_id"], sid.as_str());
    assert_eq!(b["turn_id"], turn.as_str());
    assert_eq!(b["turn"], 1, "the ordinal it was queued with: {b}");
    assert_eq!(b["completion_tokens"], 2);
    assert_eq!(accepted[0].idempotency_key.as_deref(), Some(turn.as_str()));
    let outbox: i64 = client
        .zcard("chat:usage:outbox:{chat:session::deleted}")
        .await
        .unwrap();
    assert_eq!(outbox, 0, "nothing left to deliver");
}

/// A room whose session was deleted while the LLM answered in it (tokens already spent).
struct MidTurn {
    redis: RedisServer,
    _fake: FakeLlm,
    callback: crate::support::Callback,
    relay: Relay,
    sid: String,
    turn: String,
}

async fn delete_mid_turn(name: &str) -> MidTurn {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(numbered(40, Duration::from_millis(50))).await;
    let callback = crate::support::Callback::start(0).await;
    let (base, url) = (fake.base_url(), callback.url());
    let relay = Relay::start(
        &redis.url(),
        &["--llm-base-url", &base, "--usage-callback-url", &url],
    )
    .await;
    let sid = unique_sid(name);
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    a.send_json(&request("q", "count")).await;
    let turn = a.expect_ack("q").await;
    // Tokens are being spent.
    a.take_where(|v| v["hd"]["event"] == "llm.delta" && v["bd"]["seq"] == 2)
        .await;
    crate::sessions::delete_session(&relay, &sid).await;
    MidTurn {
        redis,
        _fake: fake,
        callback,
        relay,
        sid,
        turn,
    }
}

/// A session deleted while the LLM answers it gets nothing stored, but the tokens spent are
/// billed: one callback, `turn` 0 (the room that would have counted the turn is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_cut_short_by_a_delete_is_billed_all_the_same() {
    // Every part is bound: the relay and the fake provider must outlive the turn.
    let MidTurn {
        redis,
        _fake,
        callback,
        relay: _relay,
        sid,
        turn,
    } = delete_mid_turn("cut").await;

    eventually(Duration::from_secs(20), "the callback accepted", || {
        !callback.accepted().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let accepted = callback.accepted();
    assert_eq!(accepted.len(), 1, "billed once: {accepted:?}");
    let b = &accepted[0].body;
    assert_eq!(b["session_id"], sid.as_str());
    assert_eq!(b["turn_id"], turn.as_str());
    assert_eq!(b["turn"], 0, "no room left to count it: {b}");
    assert!(b["completion_tokens"].as_u64().unwrap() >= 3, "{b}");
    let client = redis.client().await;
    assert_eq!(
        crate::sessions::keys_naming(&client, &sid).await,
        Vec::<String>::new(),
        "neither the reply nor the turn's lease brought a key of the session back"
    );
}

/// A session deleted and at once created again under the same id, while the LLM answers the
/// old one: the new session gets nothing of the old turn (no entry, no turn key, no frames
/// after the delete), and the old turn's tokens are billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_of_a_session_deleted_and_created_again_stays_out_of_the_new_one() {
    let MidTurn {
        redis,
        _fake,
        callback,
        relay,
        sid,
        turn,
    } = delete_mid_turn("again").await;
    let created = reqwest::Client::new()
        .post(relay.http("/api/sessions"))
        .json(&json!({"session_id": sid}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;

    eventually(Duration::from_secs(20), "the callback accepted", || {
        !callback.accepted().is_empty()
    })
    .await;
    let b_body = &callback.accepted()[0].body;
    assert_eq!(b_body["turn_id"], turn.as_str());
    assert_eq!(b_body["turn"], 0, "{b_body}");
    // The old turn's worker has stopped; nothing of it reached the new session.
    let cid = b.chat("B", "the new session's first word").await;
    b.expect_ack(&cid).await;
    let seen = b.collect_messages(1).await;
    assert_eq!(seen[0]["bd"]["text"], "the new session's first word");
    let client = redis.client().await;
    let keys = crate::sessions::keys_naming(&client, &sid).await;
    assert!(
        keys.iter().all(|k| !k.contains("llm:")),
        "no key of the old turn in the new session: {keys:?}"
    );
    let entries = crate::support::redis::xrange(&client, &format!("chat:session:{sid}")).await;
    assert!(
        entries
            .iter()
            .all(|(_, fields)| fields.iter().all(|(f, v)| f != "participant" || v != "llm")),
        "no LLM entry in the new session: {entries:?}"
    );
}
