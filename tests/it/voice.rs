//! The voice-chat dialect (`/ws/session/{session_id}`) with real Redis, real relays and the fake
//! OpenAI server: the three-stage reply with the exact frames, what is stored, every refusal
//! (English and Korean), the rate limit shared by two nodes as a sliding window, an LLM that is
//! down, and a session deleted (and created again) during a reply.

use std::time::Duration;

use serde_json::{json, Value};

use chat_relay::protocol::Close;
use chat_relay::{Keys, RedisSettings, Store, VoiceRate};

use crate::chat::{relay_with, stored};
use crate::dialects::{voice_ask, voice_reply, voice_request, voice_url};
use crate::sessions::{create_session, delete_session, keys_naming};
use crate::support::redis::xrange;
use crate::support::{unique_sid, FakeLlm, Mode, RedisServer, Relay, WsClient};

/// The exact error frame of a refusal that belongs to no turn.
fn refusal(error: &str, code: &str) -> Value {
    json!({"type": "ai_stream_error", "data": {"error": error, "code": code}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_stored_and_answered_in_three_stages() {
    let redis = RedisServer::start();
    let tokens = ["Take ", "a slow", " breath", " with me."];
    let fake = FakeLlm::start(FakeLlm::tokens(&tokens, Duration::from_millis(20))).await;
    let relay = relay_with(&redis, &fake, &["--llm-max-tokens", "500"]).await;
    let sid = unique_sid("voice");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "?role=A")).await;

    ws.send_json(&json!({
        "type": "request_ai_response",
        "data": {"message": "  I feel nervous about tomorrow  ", "emotion": "anxious", "timestamp": 1704902400000u64},
    }))
    .await;
    let begin = ws.next_json().await;
    let turn = begin["data"]["turn_id"].as_str().unwrap().to_owned();
    assert_eq!(
        begin,
        json!({"type": "ai_stream_begin", "data": {"turn_id": turn}})
    );
    let mut chunks = Vec::new();
    let complete = loop {
        let v = ws.next_json().await;
        if v["type"] != "ai_stream_chunk" {
            break v;
        }
        assert_eq!(
            v,
            json!({"type": "ai_stream_chunk", "data": {"chunk": v["data"]["chunk"], "turn_id": turn}})
        );
        chunks.push(v["data"]["chunk"].as_str().unwrap().to_owned());
    };
    assert!(chunks.len() >= 2, "streamed, not all at once: {chunks:?}");
    assert_eq!(complete["type"], "ai_stream_complete");
    assert_eq!(complete["data"]["turn_id"], turn);
    assert_eq!(complete["data"]["reason"], "stop");
    assert_eq!(complete["data"]["usage"]["completion_tokens"], 4);

    let responses = stored(&redis, &sid, "llm.response").await;
    assert_eq!(responses.len(), 1);
    assert_eq!(
        chunks.concat(),
        responses[0].2["bd"]["text"].as_str().unwrap()
    );
    assert_eq!(chunks.concat(), tokens.concat());
    assert_eq!(complete["data"]["message_id"], responses[0].0);

    let requests = stored(&redis, &sid, "llm.request").await;
    assert_eq!(requests.len(), 1);
    let (id, participant, request) = &requests[0];
    assert_eq!((id.as_str(), participant.as_str()), (turn.as_str(), "A"));
    assert_eq!(
        request["bd"],
        json!({"text": "I feel nervous about tomorrow", "emotion": "anxious", "timestamp": 1704902400000u64})
    );
    assert_eq!(request["hd"]["role"], "A");
    assert_eq!(request["hd"]["dialect"], "voice");
    assert_eq!(request["hd"]["max_tokens"], 200);

    // The provider was asked for a short reply, with the emotion's guidance.
    let asked = &fake.requests()[0];
    assert_eq!(asked["max_tokens"], 200, "{asked}");
    let system = asked["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains("anxious"), "{system}");

    // No emotion, no timestamp: both stored as null, and the role defaults to user.
    let mut plain = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    let (turn2, text, end) = voice_ask(&mut plain, "and now?").await;
    assert_eq!(end["type"], "ai_stream_complete");
    assert_eq!(text, tokens.concat());
    let requests = stored(&redis, &sid, "llm.request").await;
    assert_eq!(requests[1].0, turn2);
    assert_eq!(requests[1].1, "user");
    assert_eq!(
        requests[1].2["bd"],
        json!({"text": "and now?", "emotion": null, "timestamp": null})
    );
    ws.close().await;
    plain.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_short_sentences_store_nothing_and_keep_the_socket() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["Okay."], Duration::from_millis(1))).await;
    let relay = relay_with(&redis, &fake, &[]).await;

    // A session that was never created.
    let missing = unique_sid("voice-none");
    let mut ws = WsClient::connect(&voice_url(&relay, &missing, "")).await;
    ws.send_json(&voice_request("hello")).await;
    assert_eq!(
        ws.next_json().await,
        refusal("the session has expired", "not_found")
    );
    ws.close().await;

    let sid = unique_sid("voice-bad");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    let deep = format!(
        r#"{{"type":"request_ai_response","data":{{"message":"x","extra":{}1{}}}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let cases: Vec<(String, Value)> = vec![
        (
            voice_request("   ").to_string(),
            refusal("the message is empty", "empty_text"),
        ),
        (
            json!({"type": "request_ai_response", "data": {}}).to_string(),
            refusal("the message is empty", "empty_text"),
        ),
        (
            voice_request(&"가".repeat(2001)).to_string(),
            refusal("message too long (max 2000 characters)", "text_too_long"),
        ),
        (
            json!({"type": "request_ai_response", "data": {"message": "hi", "emotion": "bored"}})
                .to_string(),
            refusal("invalid emotion", "invalid_emotion"),
        ),
        (
            json!({"type": "request_ai_response", "data": {"message": "hi", "timestamp": "yesterday"}})
                .to_string(),
            refusal("invalid timestamp", "invalid_body"),
        ),
        ("not json".to_owned(), refusal("invalid request", "bad_json")),
        (
            json!({"type": "request_ai_response", "data": {"message": 5}}).to_string(),
            refusal("invalid request", "invalid_body"),
        ),
        (
            json!({"type": "request_ai_response"}).to_string(),
            refusal("invalid request", "invalid_body"),
        ),
        (
            json!({"data": {"message": "hi"}}).to_string(),
            refusal("invalid request", "invalid_header"),
        ),
        (
            json!({"type": "ping", "data": {}}).to_string(),
            refusal("unknown message type", "unknown_event"),
        ),
        (deep, refusal("invalid request", "too_deep")),
        (
            voice_request(&"x".repeat(70 * 1024)).to_string(),
            refusal("message too long (max 2000 characters)", "frame_too_large"),
        ),
    ];
    for (frame, expected) in &cases {
        ws.send_text(frame.clone()).await;
        assert_eq!(&ws.next_json().await, expected, "for {frame:.80}");
    }
    ws.send_binary(vec![1, 2, 3]).await;
    assert_eq!(
        ws.next_json().await,
        refusal("invalid request", "binary_unsupported")
    );
    // Nothing was stored, and the socket still answers.
    assert!(stored(&redis, &sid, "llm.request").await.is_empty());
    let (_, text, end) = voice_ask(&mut ws, "still there?").await;
    assert_eq!(
        (text.as_str(), end["type"].as_str()),
        ("Okay.", Some("ai_stream_complete"))
    );

    // A frame above the hard cap (4 x --max-frame-bytes) closes the socket, after the sentence.
    ws.send_json(&voice_request(&"x".repeat(300 * 1024))).await;
    assert_eq!(
        ws.next_json().await,
        refusal("message too long (max 2000 characters)", "frame_too_large")
    );
    ws.expect_catalogued_close(Close::FrameTooBig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn korean_sentences_with_locale_ko() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(Mode::Status(500)).await;
    let relay = relay_with(
        &redis,
        &fake,
        &[
            "--locale",
            "ko",
            "--voice-requests-per-minute",
            "1",
            "--llm-attempts",
            "1",
        ],
    )
    .await;
    let mut ws = WsClient::connect(&voice_url(&relay, &unique_sid("ko-none"), "")).await;
    ws.send_json(&voice_request("안녕하세요")).await;
    assert_eq!(
        ws.next_json().await,
        refusal("세션이 만료되었습니다", "not_found")
    );

    let sid = unique_sid("ko");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    ws.send_json(&voice_request(&"가".repeat(2001))).await;
    assert_eq!(
        ws.next_json().await,
        refusal("메시지가 너무 깁니다 (최대 2000자)", "text_too_long")
    );
    // The LLM is down: the reply ends with the seed's sentence.
    let (turn, text, end) = voice_ask(&mut ws, "안녕하세요").await;
    assert_eq!(text, "");
    assert_eq!(
        end,
        json!({"type": "ai_stream_error", "data": {
            "error": "AI 서비스가 일시적으로 사용할 수 없습니다", "code": "llm_unavailable", "turn_id": turn,
        }})
    );
    // One request per minute: the second is refused.
    ws.send_json(&voice_request("다시")).await;
    let limited = ws.next_json().await;
    assert_eq!(limited["data"]["error"], "요청 횟수가 초과되었습니다");
    assert_eq!(limited["data"]["code"], "rate_limited");
    ws.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_counts_valid_requests_of_every_node() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["Yes."], Duration::from_millis(1))).await;
    let flags = ["--voice-requests-per-minute", "3", "--llm-consumer"];
    let one = relay_with(&redis, &fake, &[&flags[..], &["node-1"]].concat()).await;
    let two = relay_with(&redis, &fake, &[&flags[..], &["node-2"]].concat()).await;
    let sid = unique_sid("voice-rate");
    create_session(&one, json!({"session_id": sid})).await;
    let mut a = WsClient::connect(&voice_url(&one, &sid, "")).await;
    let mut b = WsClient::connect(&voice_url(&two, &sid, "")).await;

    // Refused requests do not count.
    for ws in [&mut a, &mut b] {
        ws.send_json(&voice_request("")).await;
        assert_eq!(ws.next_json().await["data"]["code"], "empty_text");
    }
    for on_a in [true, false, true] {
        let ws = if on_a { &mut a } else { &mut b };
        let (_, _, end) = voice_ask(ws, "one more").await;
        assert_eq!(end["type"], "ai_stream_complete", "{end}");
    }
    b.send_json(&voice_request("a fourth")).await;
    let limited = b.next_json().await;
    assert_eq!(limited["type"], "ai_stream_error");
    assert_eq!(limited["data"]["error"], "too many requests");
    assert_eq!(limited["data"]["code"], "rate_limited");
    let wait = limited["data"]["retry_after_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 60_000, "{wait}");
    a.send_json(&voice_request("a fifth")).await;
    assert_eq!(a.next_json().await["data"]["code"], "rate_limited");
    assert_eq!(stored(&redis, &sid, "llm.request").await.len(), 3);
    // Still open: the next refusal arrives on the same socket.
    b.send_json(&voice_request("")).await;
    assert_eq!(b.next_json().await["data"]["code"], "empty_text");
    a.close().await;
    b.close().await;
}

/// The window slides: a request leaves it a window after it was counted, not at a minute's
/// boundary. (Through the store, with a one-second window, so the test need not wait a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_slides() {
    let redis = RedisServer::start();
    let store = Store::connect(
        &RedisSettings {
            url: redis.url(),
            command_timeout: Duration::from_secs(2),
        },
        Keys::new("chat:session:"),
        0,
        "llm",
    )
    .unwrap();
    let sid = unique_sid("slide");
    let window = Duration::from_millis(1000);
    let ask = || store.voice_request(&sid, 2, window);
    assert_eq!(ask().await.unwrap(), VoiceRate::NoSession);
    store
        .append(
            &sid,
            "A",
            "chat.message",
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"x"}}"#,
            None,
        )
        .await
        .unwrap();
    let first = tokio::time::Instant::now();
    assert_eq!(ask().await.unwrap(), VoiceRate::Counted);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ask().await.unwrap(), VoiceRate::Counted);
    assert!(
        matches!(ask().await.unwrap(), VoiceRate::Limited { retry_after } if retry_after <= window)
    );
    // The first request leaves the window one second after it came; the second is still in.
    tokio::time::sleep_until(first + Duration::from_millis(1100)).await;
    assert_eq!(ask().await.unwrap(), VoiceRate::Counted);
    assert!(matches!(ask().await.unwrap(), VoiceRate::Limited { .. }));
    // The log is the room's: it goes with the session.
    let client = redis.client().await;
    use fred::prelude::*;
    let n: i64 = client
        .exists(format!("chat:voice:rate:{{chat:session:{sid}}}"))
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_frames_are_budgeted() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["x"], Duration::from_millis(1))).await;
    let relay = relay_with(
        &redis,
        &fake,
        &[
            "--msgs-per-sec",
            "1",
            "--msgs-burst",
            "2",
            "--abuse-strikes",
            "5",
        ],
    )
    .await;
    let sid = unique_sid("voice-budget");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    for _ in 0..2 {
        ws.send_text("garbage").await;
        assert_eq!(ws.next_json().await["data"]["code"], "bad_json");
    }
    ws.send_text("garbage").await;
    assert_eq!(
        ws.next_json().await,
        refusal("too many requests", "rate_limited")
    );
    for _ in 0..5 {
        ws.send_text("garbage").await;
    }
    let mut last = Value::Null;
    loop {
        match ws.next().await {
            crate::support::ws::Next::Json(v) => last = v,
            crate::support::ws::Next::Closed(code) => {
                assert_eq!(code, Some(Close::RateLimitsIgnored.code()));
                break;
            }
        }
    }
    assert_eq!(last, refusal("too many requests", "rate_limited"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_that_is_down_ends_the_reply_with_a_sentence() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(Mode::Status(503)).await;
    let relay = relay_with(&redis, &fake, &["--llm-attempts", "1"]).await;
    let sid = unique_sid("voice-down");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    let (turn, text, end) = voice_ask(&mut ws, "hello?").await;
    assert_eq!(text, "");
    assert_eq!(
        end,
        json!({"type": "ai_stream_error", "data": {
            "error": "the AI service is temporarily unavailable", "code": "llm_unavailable", "turn_id": turn,
        }})
    );
    let errors = stored(&redis, &sid, "llm.error").await;
    assert_eq!(errors.len(), 1);
    // Only what people read: the entry's id and timestamp are numbers that may hold "503".
    let text = errors[0].2["bd"].to_string();
    assert!(!text.contains("503") && !text.contains("reqwest"), "{text}");
    ws.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deleted_during_a_reply_gets_nothing_more() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::numbered(16, Duration::from_millis(50))).await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("voice-del");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    ws.send_json(&voice_request("tell me a long story")).await;
    let begin = ws.next_json().await;
    let turn = begin["data"]["turn_id"].as_str().unwrap().to_owned();
    assert_eq!(ws.next_json().await["type"], "ai_stream_chunk");
    delete_session(&relay, &sid).await;
    let (_, end) = voice_reply(&mut ws).await;
    assert_eq!(
        end,
        json!({"type": "ai_stream_error", "data": {
            "error": "the session has expired", "code": "session_deleted", "turn_id": turn,
        }})
    );
    // Past the rest of the model's answer: nothing was written to the deleted session.
    tokio::time::sleep(Duration::from_millis(16 * 50 + 500)).await;
    let client = redis.client().await;
    assert_eq!(keys_naming(&client, &sid).await, Vec::<String>::new());
    // The socket stays; the session is gone.
    ws.send_json(&voice_request("hello?")).await;
    assert_eq!(
        ws.next_json().await,
        refusal("the session has expired", "not_found")
    );
    ws.close().await;
}

/// The narrow case the worker's own checks cannot see: a turn that ends (here: the provider
/// times out) after its session was deleted and created again under the same id. The new
/// session never held the request, so the end is not stored in it (`finish.lua` checks that
/// the request is still pending in the stream's group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_created_again_mid_turn_gets_no_reply_from_the_old_one() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(Mode::Stall { tokens: Vec::new() }).await;
    let relay = relay_with(
        &redis,
        &fake,
        &["--llm-idle-timeout-secs", "1", "--llm-attempts", "1"],
    )
    .await;
    let sid = unique_sid("voice-again");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    ws.send_json(&voice_request("hello?")).await;
    assert_eq!(ws.next_json().await["type"], "ai_stream_begin");
    assert!(fake.wait_for_requests(1, Duration::from_secs(5)).await);
    delete_session(&relay, &sid).await;
    create_session(&relay, json!({"session_id": sid})).await;
    let (_, end) = voice_reply(&mut ws).await;
    assert_eq!(end["data"]["error"], "the session has expired");
    // The worker gives up on the silent provider and tries to store its llm.error.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.hung_up() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the turn never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = redis.client().await;
    let events: Vec<String> = xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .map(|(_, fields)| {
            fields
                .into_iter()
                .find(|(k, _)| k == "event")
                .map(|(_, v)| v)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(events, ["session.created"]);
    ws.close().await;
}

/// `GET .../presence` on `relay` until it shows `connections` connections.
async fn presence_becomes(relay: &Relay, sid: &str, connections: u64) -> Value {
    let url = relay.http(&format!("/v1/sessions/{sid}/presence"));
    for _ in 0..50 {
        let p: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        if p["connections"] == connections {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("presence of {sid} never reached {connections}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voice_client_is_present_while_connected() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::ZERO)).await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("voicepresence");
    create_session(&relay, json!({"session_id": sid})).await;

    let ws = WsClient::connect(&voice_url(&relay, &sid, "?role=B")).await;
    let p = presence_becomes(&relay, &sid, 1).await;
    assert_eq!(p["members"][0]["role"], "B", "{p}");
    assert_eq!(p["members"][0]["connections"], 1, "{p}");

    drop(ws);
    presence_becomes(&relay, &sid, 0).await;
}
