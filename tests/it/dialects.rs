//! What the voice and evaluation dialects share, tested with real Redis, real relays and the
//! fake OpenAI server: one room with a `{hd,bd}` member, a voice client and an evaluation
//! client (one history, one order, both history APIs agree), and the room socket's door (token,
//! origin) on both endpoints.

use std::time::Duration;

use serde_json::{json, Value};

use crate::chat::relay_with;
use crate::security::{handshake, jwt_flags, token};
use crate::sessions::{call, create_session};
use crate::support::{unique_sid, FakeLlm, RedisServer, Relay, WsClient};

pub fn voice_url(relay: &Relay, sid: &str, query: &str) -> String {
    format!("ws://{}/ws/session/{sid}{query}", relay.addr)
}

pub fn eval_url(relay: &Relay, query: &str) -> String {
    format!("ws://{}/chat{query}", relay.addr)
}

/// A voice request frame.
pub fn voice_request(message: &str) -> Value {
    json!({"type": "request_ai_response", "data": {"message": message}})
}

/// Reads one voice reply after its `ai_stream_begin`: the chunks' concatenation and the last
/// frame (`ai_stream_complete` or `ai_stream_error`). Every chunk is checked for its shape.
pub async fn voice_reply(ws: &mut WsClient) -> (String, Value) {
    let mut text = String::new();
    loop {
        let v = ws.next_json().await;
        match v["type"].as_str() {
            Some("ai_stream_chunk") => {
                let data = v["data"].as_object().unwrap();
                assert!(data.get("text").is_none(), "the field is chunk: {v}");
                text.push_str(data["chunk"].as_str().unwrap());
            }
            Some("ai_stream_complete" | "ai_stream_error") => return (text, v),
            _ => panic!("unexpected frame in a reply: {v}"),
        }
    }
}

/// Asks by voice and reads the whole reply: (turn id, text, last frame).
pub async fn voice_ask(ws: &mut WsClient, message: &str) -> (String, String, Value) {
    ws.send_json(&voice_request(message)).await;
    let begin = ws.next_json().await;
    assert_eq!(begin["type"], "ai_stream_begin", "{begin}");
    let turn = begin["data"]["turn_id"].as_str().unwrap().to_owned();
    let (text, end) = voice_reply(ws).await;
    (turn, text, end)
}

/// Reads an evaluation turn's frames up to its `done` or `error`: (delta text, last frame).
pub async fn eval_reply(ws: &mut WsClient, turn_id: &Value) -> (String, Value) {
    let mut text = String::new();
    loop {
        let v = ws.next_json().await;
        assert_eq!(&v["turn_id"], turn_id, "{v}");
        match v["type"].as_str() {
            Some("delta") => {
                let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
                keys.sort();
                assert_eq!(keys, ["content", "turn_id", "type"], "{v}");
                text.push_str(v["content"].as_str().unwrap());
            }
            Some("done" | "error") => return (text, v),
            _ => panic!("unexpected frame: {v}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_room_three_kinds_of_client_one_history() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(
        &["Sure", ", ", "here."],
        Duration::from_millis(5),
    ))
    .await;
    let relay = relay_with(&redis, &fake, &[]).await;
    let sid = unique_sid("mixed3");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut tab = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut voice = WsClient::connect(&voice_url(&relay, &sid, "?role=B")).await;
    let mut eval = WsClient::connect(&eval_url(&relay, "")).await;

    let (voice_turn, voice_text, end) = voice_ask(&mut voice, "hello from voice").await;
    assert_eq!(end["type"], "ai_stream_complete");
    assert_eq!(voice_text, "Sure, here.");
    eval.send_json(&json!({"session_id": sid, "message": "hello from eval", "turn_id": "e1"}))
        .await;
    let (eval_text, done) = eval_reply(&mut eval, &json!("e1")).await;
    assert_eq!(done["type"], "done");
    assert_eq!(eval_text, "Sure, here.");
    let cid = tab.chat("A", "hello from the tab").await;
    let tab_id = tab.expect_ack(&cid).await;

    // The tab saw both requests and both replies live, in the stream's order.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let v = tab.next_json().await;
        let event = v["hd"]["event"].as_str().unwrap_or("").to_owned();
        if ["llm.request", "llm.response", "chat.message"].contains(&event.as_str()) {
            seen.push(v);
        }
    }
    let summary: Vec<(&str, &str, &str)> = seen
        .iter()
        .map(|v| {
            (
                v["hd"]["event"].as_str().unwrap(),
                v["hd"]["role"].as_str().unwrap(),
                v["bd"]["text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("llm.request", "B", "hello from voice"),
            ("llm.response", "llm", "Sure, here."),
            ("llm.request", "user", "hello from eval"),
            ("llm.response", "llm", "Sure, here."),
            ("chat.message", "A", "hello from the tab"),
        ]
    );
    assert_eq!(seen[0]["hd"]["id"], voice_turn);
    assert_eq!(seen[0]["hd"]["dialect"], "voice");
    assert_eq!(seen[2]["hd"]["dialect"], "eval");
    assert_eq!(seen[3]["hd"]["id"], done["message_id"]);
    assert_eq!(seen[4]["hd"]["id"], tab_id);
    let ids: Vec<&str> = seen
        .iter()
        .map(|v| v["hd"]["id"].as_str().unwrap())
        .collect();

    // Both history APIs list the same conversation in the same order.
    let (status, v1, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/v1/sessions/{sid}/messages")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let v1_ids: Vec<&str> = v1["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            ["llm.request", "llm.response", "chat.message"]
                .contains(&m["hd"]["event"].as_str().unwrap())
        })
        .map(|m| m["hd"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(v1_ids, ids);
    let (status, api, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/api/sessions/{sid}/messages")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let api_msgs: Vec<(&str, &str, &str)> = api["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap(),
                m["participant"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(&str, &str, &str)> = ids
        .iter()
        .zip(&summary)
        .map(|(id, (_, role, text))| (*id, *role, *text))
        .collect();
    assert_eq!(api_msgs, expected);
    tab.close().await;
    voice.close().await;
    eval.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_dialects_pass_the_room_sockets_door() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::from_millis(1))).await;
    let mut flags = jwt_flags();
    flags.push("--allowed-origins");
    flags.push("https://app.example");
    let relay = relay_with(&redis, &fake, &flags).await;
    let sid = unique_sid("door");
    let other = unique_sid("door-other");
    let good = token(&sid, "A", 300);

    // Voice: the token must grant this session.
    let (status, body) = handshake(&voice_url(&relay, &sid, ""), &[]).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) =
        handshake(&voice_url(&relay, &other, &format!("?token={good}")), &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden_room"))
    );
    let (status, body) = handshake(
        &voice_url(&relay, &sid, &format!("?token={good}")),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden_origin"))
    );
    let (status, body) = handshake(
        &voice_url(&relay, &sid, &format!("?token={good}&role=B")),
        &[],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("role_mismatch"))
    );
    let (status, _) = handshake(
        &voice_url(&relay, &sid, &format!("?token={good}")),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(status, 101);

    // Evaluation: a valid token at the door, then each request's session checked against it.
    let (status, body) = handshake(&eval_url(&relay, ""), &[]).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = handshake(&eval_url(&relay, "?token=garbage"), &[]).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_invalid"))
    );
    let (status, body) = handshake(
        &eval_url(&relay, &format!("?token={good}")),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden_origin"))
    );

    let (status, _, _) = call(
        reqwest::Method::POST,
        relay.http(&format!("/api/sessions?token={good}")),
        Some(json!({"session_id": sid})),
    )
    .await;
    assert_eq!(status, 201);
    let mut eval = WsClient::connect(&eval_url(&relay, &format!("?token={good}"))).await;
    eval.send_json(&json!({"session_id": other, "message": "hi", "turn_id": "x"}))
        .await;
    assert_eq!(
        eval.next_json().await,
        json!({"type": "error", "turn_id": "x", "code": "forbidden_room", "message": "the token does not grant this room"})
    );
    eval.send_json(&json!({"session_id": sid, "message": "hi", "turn_id": "y"}))
        .await;
    let (text, done) = eval_reply(&mut eval, &json!("y")).await;
    assert_eq!((text.as_str(), done["type"].as_str()), ("ok", Some("done")));
    let stored = crate::chat::stored(&redis, &sid, "llm.request").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1, "A", "the token's role");
    assert_eq!(stored[0].2["hd"]["sub"], "user-A", "the token's subject");
    eval.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_closes_both_dialects_with_their_own_error() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::from_millis(1))).await;
    let relay = relay_with(&redis, &fake, &jwt_flags()).await;
    let sid = unique_sid("expiry");
    let short = token(&sid, "A", 2);
    let mut voice = WsClient::connect(&voice_url(&relay, &sid, &format!("?token={short}"))).await;
    let mut eval = WsClient::connect(&eval_url(&relay, &format!("?token={short}"))).await;
    assert_eq!(
        voice.next_json().await,
        json!({"type": "ai_stream_error", "data": {"error": "your sign-in has expired", "code": "token_expired"}})
    );
    voice
        .expect_catalogued_close(chat_relay::protocol::Close::TokenExpired)
        .await;
    assert_eq!(
        eval.next_json().await,
        json!({"type": "error", "turn_id": null, "code": "token_expired", "message": "your token has expired; reconnect with a new one"})
    );
    eval.expect_catalogued_close(chat_relay::protocol::Close::TokenExpired)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emotion_prompts_file_replaces_the_guidance() {
    let redis = RedisServer::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::from_millis(1))).await;
    let file = redis.dir().join("emotions.json");
    std::fs::write(
        &file,
        r#"{"sad": "Someone is sad: listen first, then comfort them in one sentence."}"#,
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let relay = relay_with(&redis, &fake, &["--llm-emotion-prompts", path]).await;
    let sid = unique_sid("emotions");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut voice = WsClient::connect(&voice_url(&relay, &sid, "")).await;
    for emotion in ["sad", "happy"] {
        voice
            .send_json(&json!({"type": "request_ai_response", "data": {"message": "hi", "emotion": emotion}}))
            .await;
        assert_eq!(voice.next_json().await["type"], "ai_stream_begin");
        let (_, end) = voice_reply(&mut voice).await;
        assert_eq!(end["type"], "ai_stream_complete");
    }
    let systems: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r["messages"][0]["content"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        systems[0].ends_with("Someone is sad: listen first, then comfort them in one sentence."),
        "{}",
        systems[0]
    );
    assert!(
        systems[1].contains("happy") && !systems[1].contains("Someone is sad"),
        "the built-in line of an emotion the file does not name: {}",
        systems[1]
    );
    voice.close().await;
}
