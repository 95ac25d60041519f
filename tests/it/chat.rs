//! The REST + SSE chat API (`/api/chat`, `/api/chat/stream`) with real Redis, a real relay and
//! its LLM participant, and the fake OpenAI server: the exact fields, a mixed room with a
//! WebSocket member, errors, a client that goes away, a session deleted mid-reply, and tokens.

use std::time::Duration;

use serde_json::{json, Value};

use crate::sessions::{call, create_session, delete_session};
use crate::support::redis::xrange;
use crate::support::{unique_sid, FakeLlm, Mode, RedisServer, Relay, SseReader, WsClient};

pub async fn relay_with(redis: &RedisServer, fake: &FakeLlm, extra: &[&str]) -> Relay {
    let base = fake.base_url();
    let mut args = vec!["--llm-base-url", base.as_str()];
    args.extend_from_slice(extra);
    Relay::start(&redis.url(), &args).await
}

async fn post_chat(relay: &Relay, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(relay.http(path))
        .json(&body)
        .send()
        .await
        .expect("POST")
}

/// The stored entries of a room with this event, as (id, participant, envelope).
pub async fn stored(redis: &RedisServer, sid: &str, event: &str) -> Vec<(String, String, Value)> {
    let client = redis.client().await;
    xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == event))
        .map(|(id, f)| {
            let field = |name: &str| f.iter().find(|(k, _)| k == name).unwrap().1.clone();
            (
                id,
                field("participant"),
                serde_json::from_str(&field("body")).unwrap(),
            )
        })
        .collect()
}

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reply_is_stored_and_seen_live_by_websocket_members() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(
        &["Hel", "lo", " there"],
        Duration::from_millis(20),
    ))
    .await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("mixed");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = ws.chat("A", "hello from the socket").await;
    let ws_message = ws.expect_ack(&cid).await;

    let resp = post_chat(
        &relay,
        "/api/chat",
        json!({"session_id": sid, "message": "hi from REST"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    for field in ["message_id", "role", "content", "created_at", "usage"] {
        assert!(reply.get(field).is_some(), "{field} missing: {reply}");
    }
    assert_eq!(reply["role"], "assistant");
    assert_eq!(reply["content"], "Hello there");
    assert!(reply["created_at"].as_str().unwrap().ends_with('Z'));
    let usage = &reply["usage"];
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert!(usage[field].is_u64(), "{field}: {usage}");
    }
    assert_eq!(usage["completion_tokens"], 3, "the fake counts its tokens");

    // The WebSocket member saw the REST user's message and the reply, live and in order.
    let request = ws.expect_event("llm.request").await;
    assert_eq!(request["hd"]["role"], "user");
    assert_eq!(request["bd"]["text"], "hi from REST");
    let turn = request["hd"]["id"].as_str().unwrap().to_owned();
    let start = ws.expect_event("llm.start").await;
    assert_eq!(start["hd"]["turn_id"], turn);
    let mut text = start["bd"]["text"].as_str().unwrap().to_owned();
    let end = loop {
        let v = ws.next_json().await;
        match v["hd"]["event"].as_str() {
            Some("llm.delta") => text.push_str(v["bd"]["delta"].as_str().unwrap()),
            Some("llm.response") => break v,
            _ => {}
        }
    };
    assert_eq!(end["hd"]["turn_id"], turn);
    assert_eq!(end["hd"]["id"], reply["message_id"]);
    assert_eq!(text, "Hello there");
    assert_eq!(end["bd"]["text"], reply["content"]);

    // The history holds both kinds of client, in one order.
    let (status, history, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/api/sessions/{sid}/messages")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let msgs = history["messages"].as_array().unwrap();
    let seen: Vec<(&str, &str, &str)> = msgs
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap(),
                m["role"].as_str().unwrap(),
                m["participant"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (ws_message.as_str(), "user", "A"),
            (turn.as_str(), "user", "user"),
            (reply["message_id"].as_str().unwrap(), "assistant", "llm"),
        ]
    );
    assert_eq!(msgs[2]["content"], "Hello there");
    assert_eq!(
        msgs[2]["token_usage"]["total_tokens"],
        usage["total_tokens"]
    );
    let (_, session, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/api/sessions/{sid}")),
        None,
    )
    .await;
    assert_eq!(session["message_count"], 3);
    ws.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_sends_start_deltas_and_done() {
    let redis = RedisServer::start();
    // "Story:" is no speaker, so the relay streams from the first token on (it holds back the
    // start of a reply until it knows the reply does not open with a speaker's name).
    let tokens = ["Story: ", "Once", " upon", " a", " time", "."];
    let fake = FakeLlm::start(FakeLlm::tokens(&tokens, Duration::from_millis(30))).await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("stream");
    create_session(&relay, json!({"session_id": sid})).await;

    let resp = post_chat(
        &relay,
        "/api/chat/stream",
        json!({"session_id": sid, "message": "tell me"}),
    )
    .await;
    let mut sse = SseReader::from_response(resp);
    let (name, _, start) = sse.next().await;
    assert_eq!(name, "start");
    assert_eq!(sorted_keys(&start)[..2], ["message_id", "session_id"]);
    assert_eq!(start["message_id"], start["turn_id"]);
    let mut content = String::new();
    let mut deltas = 0;
    let done = loop {
        let (name, _, data) = sse.next().await;
        match name.as_str() {
            "delta" => {
                assert_eq!(sorted_keys(&data), ["content"]);
                content.push_str(data["content"].as_str().unwrap());
                deltas += 1;
            }
            "done" => break data,
            other => panic!("unexpected event {other}: {data}"),
        }
    };
    assert!(deltas >= 3, "streamed, not all at the end: {deltas}");
    for field in ["message_id", "content", "usage", "reason"] {
        assert!(done.get(field).is_some(), "{field} missing: {done}");
    }
    assert_eq!(done["reason"], "stop");
    assert_eq!(content, done["content"].as_str().unwrap());
    assert_eq!(content, tokens.concat());
    assert!(
        sse.next_or_end().await.is_none(),
        "the stream ends after done"
    );

    let requests = stored(&redis, &sid, "llm.request").await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0, start["turn_id"].as_str().unwrap());
    let replies = stored(&redis, &sid, "llm.response").await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, done["message_id"].as_str().unwrap());
    assert_eq!(replies[0].2["bd"]["text"], done["content"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_refusals_and_llm_failures_are_json() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(Mode::Status(503)).await;
    let relay = relay_with(&redis, &fake, &["--llm-attempts", "1"]).await;
    let sid = unique_sid("errors");
    create_session(&relay, json!({"session_id": sid})).await;
    let ghost = unique_sid("ghost");

    for path in ["/api/chat", "/api/chat/stream"] {
        let cases = [
            (
                json!({"session_id": ghost, "message": "hi"}),
                404,
                json!({"code": "not_found", "message": format!("session {ghost} does not exist")}),
            ),
            (
                json!({"session_id": sid, "message": "   "}),
                400,
                json!("empty_text"),
            ),
            (json!({"session_id": sid}), 400, json!("empty_text")),
            (
                json!({"session_id": sid, "message": "x".repeat(2001)}),
                400,
                json!("text_too_long"),
            ),
            (
                json!({"session_id": sid, "message": 5}),
                400,
                json!("invalid_body"),
            ),
            (json!({"message": "hi"}), 400, json!("invalid_sid")),
            (
                json!({"session_id": "bad id", "message": "hi"}),
                400,
                json!("invalid_sid"),
            ),
        ];
        for (body, status, want) in cases {
            let resp = post_chat(&relay, path, body.clone()).await;
            assert_eq!(resp.status(), status, "{path} {body}");
            let got: Value = resp.json().await.unwrap();
            if want.is_object() {
                assert_eq!(got, want);
            } else {
                assert_eq!(got["code"], want, "{path} {body}: {got}");
                assert!(got["message"].as_str().unwrap().len() > 5);
            }
        }
        let resp = reqwest::Client::new()
            .post(relay.http(path))
            .header("content-type", "application/json")
            .body("{oops")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.json::<Value>().await.unwrap()["code"], "bad_json");
    }
    assert!(
        stored(&redis, &sid, "llm.request").await.is_empty(),
        "nothing refused was stored"
    );

    // The LLM is down: 503 llm_unavailable with a human message, and an `error` event.
    let resp = post_chat(
        &relay,
        "/api/chat",
        json!({"session_id": sid, "message": "anyone?"}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "llm_unavailable");
    assert_eq!(body["message"], "the AI service is temporarily unavailable");
    let resp = post_chat(
        &relay,
        "/api/chat/stream",
        json!({"session_id": sid, "message": "anyone?"}),
    )
    .await;
    let mut sse = SseReader::from_response(resp);
    assert_eq!(sse.next().await.0, "start");
    let (name, _, data) = sse.next().await;
    assert_eq!(name, "error");
    assert_eq!(data["code"], "llm_unavailable");
    assert!(data["message"].as_str().unwrap().contains("unavailable"));
    assert!(sse.next_or_end().await.is_none());
    assert_eq!(stored(&redis, &sid, "llm.error").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_still_gets_its_turn_stored() {
    let redis = RedisServer::start();
    let tokens: Vec<String> = (0..10).map(|i| format!("t{i} ")).collect();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let fake = FakeLlm::start(FakeLlm::tokens(&tokens, Duration::from_millis(60))).await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("gone");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut ws = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;

    let url = relay.http("/api/chat");
    let body = json!({"session_id": sid, "message": "long answer please"});
    let request =
        tokio::spawn(async move { reqwest::Client::new().post(url).json(&body).send().await });
    ws.expect_event("llm.delta").await;
    request.abort();
    let _ = request.await;
    let end = ws.expect_event("llm.response").await;
    assert_eq!(end["bd"]["text"], tokens.concat());
    assert_eq!(end["bd"]["reason"], "stop");
    assert_eq!(stored(&redis, &sid, "llm.response").await.len(), 1);
    ws.close().await;
}

/// A session deleted while its reply streams: the stream ends with `session_deleted`, and
/// nothing of the session is left or written afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_mid_reply_ends_the_stream_and_writes_nothing_more() {
    let redis = RedisServer::start();
    let tokens: Vec<String> = std::iter::once("Plan: ".to_owned())
        .chain((0..12).map(|i| format!("w{i} ")))
        .collect();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let fake = FakeLlm::start(FakeLlm::tokens(&tokens, Duration::from_millis(50))).await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("midway");
    create_session(&relay, json!({"session_id": sid})).await;
    let resp = post_chat(
        &relay,
        "/api/chat/stream",
        json!({"session_id": sid, "message": "go"}),
    )
    .await;
    let mut sse = SseReader::from_response(resp);
    assert_eq!(sse.next().await.0, "start");
    assert_eq!(sse.next().await.0, "delta");
    delete_session(&relay, &sid).await;
    let end = loop {
        let (name, _, data) = sse.next().await;
        if name != "delta" {
            break (name, data);
        }
    };
    assert_eq!(end.0, "error");
    assert_eq!(end.1["code"], "session_deleted");
    // Past the rest of the model's answer: the worker stored nothing into the deleted session.
    tokio::time::sleep(Duration::from_millis(50 * 13 + 500)).await;
    let client = redis.client().await;
    let left: Vec<String> = {
        use fred::prelude::*;
        let (_, keys): (String, Vec<String>) = client
            .custom(
                fred::types::CustomCommand::new_static(
                    "SCAN",
                    fred::types::ClusterHash::Random,
                    false,
                ),
                vec![
                    "0".to_owned(),
                    "MATCH".into(),
                    format!("*{sid}*"),
                    "COUNT".into(),
                    "100000".into(),
                ],
            )
            .await
            .unwrap();
        keys
    };
    assert_eq!(left, Vec::<String>::new());
    let resp = post_chat(
        &relay,
        "/api/chat",
        json!({"session_id": sid, "message": "still there?"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_jwt_the_api_needs_a_token_for_the_session() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["fine"], Duration::ZERO)).await;
    let relay = relay_with(&redis, &fake, &["--auth", "jwt", "--jwt-secret", "s3cret"]).await;
    let sid = unique_sid("jwt");
    let exp = chat_relay::protocol::now_ms() / 1000 + 600;
    let token = |room: &str, role: &str| {
        encode(
            &Header::default(),
            &json!({"sub": "u1", "sid": room, "role": role, "exp": exp}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    };
    let http = reqwest::Client::new();
    let create = json!({"session_id": sid});
    let r = http
        .post(relay.http("/api/sessions"))
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "unauthorized");
    let r = http
        .post(relay.http("/api/sessions"))
        .bearer_auth(token("elsewhere", "B"))
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let mine = token(&sid, "B");
    let r = http
        .post(relay.http("/api/sessions"))
        .bearer_auth(&mine)
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .get(relay.http(&format!("/api/sessions/{sid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ask = json!({"session_id": sid, "message": "who am I?"});
    let r = http
        .post(relay.http("/api/chat"))
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(relay.http("/api/chat"))
        .bearer_auth(&mine)
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let requests = stored(&redis, &sid, "llm.request").await;
    assert_eq!(requests[0].1, "B", "stored as the token's role");
    assert_eq!(requests[0].2["hd"]["role"], "B");
}
