//! Every bad input gets an error frame with a code, stores nothing, and leaves the socket usable.

use serde_json::json;

use crate::support::{redis::xlen, unique_sid, RedisServer, Relay, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--max-frame-bytes", "4096"]).await;
    let sid = unique_sid("bad");
    let key = format!("chat:session:{sid}");
    let mut c = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let client = redis.client().await;
    let before = xlen(&client, &key).await;

    let cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "bad_json"),
        ("[1,2,3]".into(), "not_object"),
        ("\"text\"".into(), "not_object"),
        (json!({"bd": {"text": "x"}}).to_string(), "invalid_header"),
        (json!({"hd": "chat.message"}).to_string(), "invalid_header"),
        (json!({"hd": {"role": "A"}, "bd": {"text": "x"}}).to_string(), "invalid_event"),
        (json!({"hd": {"event": 42}, "bd": {"text": "x"}}).to_string(), "invalid_event"),
        (json!({"hd": {"event": "chat.shout", "cid": "u1"}, "bd": {"text": "x"}}).to_string(), "unknown_event"),
        (json!({"hd": {"event": "chat.ack"}, "bd": {}}).to_string(), "reserved_event"),
        (json!({"hd": {"event": "chat.message", "role": "Z"}, "bd": {"text": "x"}}).to_string(), "invalid_role"),
        (json!({"hd": {"event": "chat.message", "role": "llm", "cid": "spoof"}, "bd": {"text": "x"}}).to_string(), "reserved_role"),
        (json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": ""}}).to_string(), "empty_text"),
        (json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "x".repeat(2001)}}).to_string(), "text_too_long"),
        (json!({"hd": {"event": "chat.message", "role": "A"}, "bd": "text"}).to_string(), "invalid_body"),
        (json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "y".repeat(5000)}}).to_string(), "frame_too_large"),
        (format!("{}{}", "[".repeat(100), "]".repeat(100)), "too_deep"),
    ];
    for (frame, code) in &cases {
        c.send_text(frame.clone()).await;
        let err = c.expect_error().await;
        assert_eq!(err["hd"]["code"], *code, "frame {frame:.80} → {err}");
        assert!(err["bd"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // cid is echoed on refusals.
    c.send_text(json!({"hd": {"event": "nope", "cid": "mine"}}).to_string())
        .await;
    let err = c.expect_error().await;
    assert_eq!(err["hd"]["cid"], "mine");
    assert!(
        err["bd"]["message"]
            .as_str()
            .unwrap()
            .contains("chat.message"),
        "names the known events"
    );
    // llm is named in the refusal message.
    c.send_text(
        json!({"hd": {"event": "chat.message", "role": "llm"}, "bd": {"text": "x"}}).to_string(),
    )
    .await;
    let err = c.expect_error().await;
    assert_eq!(
        err["bd"]["message"],
        "role 'llm' is reserved for the LLM participant"
    );

    c.send_binary(vec![1, 2, 3]).await;
    assert_eq!(c.expect_error().await["hd"]["code"], "binary_unsupported");

    assert_eq!(
        xlen(&client, &key).await,
        before,
        "nothing refused was stored"
    );
    // Still usable.
    let cid = c.chat("A", "still here").await;
    c.expect_ack(&cid).await;
    assert_eq!(xlen(&client, &key).await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_frame_closes_with_1009() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--max-frame-bytes", "4096"]).await;
    let sid = unique_sid("huge");
    let mut c = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    c.send_text("x".repeat(1024 * 1024)).await;
    // 1009 when the close frame is read before the reset of the unread upload arrives.
    let code = c.expect_close().await;
    assert!(matches!(code, Some(1009) | None), "closed with {code:?}");
    // The relay itself is unaffected.
    let mut other = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let cid = other.chat("B", "fine").await;
    other.expect_ack(&cid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_get_json_400() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let http = reqwest::Client::new();
    for (query, code) in [
        ("", "invalid_sid"),
        ("sid=", "invalid_sid"),
        ("sid=bad%20room", "invalid_sid"),
        ("sid=room%7B1%7D", "invalid_sid"),
        ("sid=ok&last_id=yesterday", "invalid_last_id"),
        ("sid=ok&role=llm", "reserved_role"),
        ("sid=ok&role=Z", "invalid_role"),
    ] {
        let resp = http
            .get(relay.http(&format!("/v1/session/chat?{query}")))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "query {query}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["code"], code, "query {query}");
        assert!(body["message"].is_string());
    }
    let long = "x".repeat(129);
    let resp = http
        .get(relay.http(&format!("/v1/session/chat?sid={long}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}
