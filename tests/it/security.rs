//! Authentication, origins and abuse limits: every refusal has a code, nothing refused is stored.

use std::time::Duration;

use chat_relay::protocol::Close;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::redis::xlen;
use crate::support::{unique_sid, RedisServer, Relay, WsClient};

pub const SECRET: &str = "test-secret";

pub fn jwt_flags() -> Vec<&'static str> {
    vec!["--auth", "jwt", "--jwt-secret", SECRET]
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token_with(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn token(sid: &str, role: &str, ttl: u64) -> String {
    token_with(
        json!({"sub": format!("user-{role}"), "sid": sid, "role": role, "exp": now() + ttl, "iat": now()}),
        SECRET,
    )
}

/// The handshake's HTTP status and JSON body (the relay refuses before upgrading).
pub async fn handshake(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => (101, Value::Null),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            (status, body)
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_handshakes_are_checked() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &jwt_flags()).await;
    let sid = unique_sid("jwt");
    let url = |q: &str| relay.ws_url(&format!("sid={sid}{q}"));

    let cases: Vec<(String, u16, &str)> = vec![
        (url(""), 401, "unauthorized"),
        (
            url(&format!("&token={}", token(&sid, "A", 0).replace('.', "x"))),
            401,
            "token_invalid",
        ),
        (
            url(&format!(
                "&token={}",
                token_with(
                    json!({"sub": "a", "sid": sid, "role": "A", "exp": now() - 120}),
                    SECRET
                )
            )),
            401,
            "token_expired",
        ),
        (
            url(&format!(
                "&token={}",
                token_with(
                    json!({"sub": "a", "sid": sid, "role": "A", "exp": now() + 600, "nbf": now() + 300}),
                    SECRET
                )
            )),
            401,
            "token_invalid",
        ),
        (
            url(&format!(
                "&token={}",
                token_with(
                    json!({"sub": "a", "sid": sid, "role": "A", "exp": now() + 600}),
                    "wrong-secret"
                )
            )),
            401,
            "token_invalid",
        ),
        (
            url(&format!("&token={}", token("other-room", "A", 600))),
            403,
            "forbidden_room",
        ),
        (
            url(&format!(
                "&token={}",
                token_with(
                    json!({"sub": "a", "sid": sid, "role": "llm", "exp": now() + 600}),
                    SECRET
                )
            )),
            403,
            "reserved_role",
        ),
        (
            url(&format!("&token={}&role=B", token(&sid, "A", 600))),
            403,
            "role_mismatch",
        ),
    ];
    for (u, status, code) in cases {
        let (got, body) = handshake(&u, &[]).await;
        assert_eq!(
            (got, body["code"].as_str().unwrap_or("")),
            (status, code),
            "{u}: {body}"
        );
        assert!(body["message"].is_string());
    }
    // An HS256 token signed with "none" or another algorithm is refused: the algorithm is pinned.
    let none_alg = format!(
        "{}.{}.",
        base64_url(r#"{"alg":"none","typ":"JWT"}"#),
        base64_url(&json!({"sub":"a","sid":sid,"role":"A","exp":now()+600}).to_string())
    );
    let (got, body) = handshake(&url(&format!("&token={none_alg}")), &[]).await;
    assert_eq!(
        (got, body["code"].as_str().unwrap()),
        (401, "token_invalid")
    );

    // Accepted three ways: query, Authorization header, WebSocket protocol list.
    let t = token(&sid, "A", 600);
    let mut a = WsClient::join(&url(&format!("&token={t}"))).await;
    let (status, _) = handshake(&url(""), &[("authorization", &format!("Bearer {t}"))]).await;
    assert_eq!(status, 101);
    let mut req = url("").into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("bearer, {t}").parse().unwrap(),
    );
    let (_, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("protocol token accepted");
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "bearer",
        "the bearer protocol is answered"
    );

    // The token's role is the connection's: claiming another is refused, absent is fine.
    a.send_json(&json!({"hd": {"event": "chat.message", "role": "B", "cid": "m1"}, "bd": {"text": "as B?"}})).await;
    assert_eq!(a.expect_error().await["hd"]["code"], "role_mismatch");
    a.send_json(&json!({"hd": {"event": "chat.message", "role": "llm", "cid": "m2"}, "bd": {"text": "as llm?"}})).await;
    assert_eq!(a.expect_error().await["hd"]["code"], "reserved_role");
    a.send_json(&json!({"hd": {"event": "chat.message", "cid": "m3"}, "bd": {"text": "as me"}}))
        .await;
    a.expect_ack("m3").await;
    let m = a.collect_messages(1).await.remove(0);
    assert_eq!(m["hd"]["role"], "A");
    let client = redis.client().await;
    let messages: usize = crate::support::redis::xrange(&client, &format!("chat:session:{sid}"))
        .await
        .iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "event" && v == "chat.message"))
        .count();
    assert_eq!(messages, 1, "refused envelopes stored nothing");
}

fn base64_url(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..(chunk.len() + 1) {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_while_connected_closes_the_socket() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &jwt_flags()).await;
    let sid = unique_sid("exp");
    let t = token(&sid, "A", 2);
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&token={t}"))).await;
    let err = a.expect_error().await;
    assert_eq!(err["hd"]["code"], "token_expired");
    a.expect_catalogued_close(Close::TokenExpired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_needs_a_token_for_the_room() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &jwt_flags()).await;
    let sid = unique_sid("api");
    let t = token(&sid, "A", 600);
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&token={t}"))).await;
    let cid = a.chat("A", "hello").await;
    a.expect_ack(&cid).await;
    let http = reqwest::Client::new();
    for path in [
        format!("/v1/sessions/{sid}"),
        format!("/v1/sessions/{sid}/messages"),
    ] {
        let r = http.get(relay.http(&path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "unauthorized");
        let other = token("elsewhere", "A", 600);
        let r = http
            .get(relay.http(&path))
            .bearer_auth(other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let r = http
            .get(relay.http(&path))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .get(relay.http(&format!("{path}?token={t}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Health stays open.
    assert_eq!(
        http.get(relay.http("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_are_refused() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &["--allowed-origins", "https://chat.example.com"],
    )
    .await;
    let sid = unique_sid("origin");
    let url = relay.ws_url(&format!("sid={sid}"));
    let (status, body) = handshake(&url, &[("origin", "https://evil.example")]).await;
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (403, "forbidden_origin")
    );
    for ok in [
        "https://chat.example.com",
        "http://localhost:8080",
        "http://127.0.0.1:3000",
    ] {
        assert_eq!(handshake(&url, &[("origin", ok)]).await.0, 101, "{ok}");
    }
    assert_eq!(
        handshake(&url, &[]).await.0,
        101,
        "no Origin (Postman, servers)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_limits_refuse_then_disconnect_and_spare_others() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--msgs-per-sec",
            "2",
            "--msgs-burst",
            "5",
            "--abuse-strikes",
            "30",
        ],
    )
    .await;
    let sid = unique_sid("flood");
    let key = format!("chat:session:{sid}");
    let client = redis.client().await;
    let mut flooder = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut calm = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let before = xlen(&client, &key).await;
    for i in 0..10 {
        flooder.chat("A", &format!("flood {i}")).await;
    }
    let mut acks = 0;
    let mut limited = 0;
    while acks + limited < 10 {
        let v = flooder.next_json().await;
        match (v["hd"]["event"].as_str(), v["hd"]["code"].as_str()) {
            (Some("chat.ack"), _) => acks += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => {}
        }
    }
    assert_eq!(acks, 5, "the burst passes");
    assert_eq!(limited, 5);
    assert_eq!(
        xlen(&client, &key).await,
        before + 5,
        "refused messages are not stored"
    );
    // The other member still talks and hears.
    let cid = calm.chat("B", "still fine").await;
    calm.expect_ack(&cid).await;
    // Sustained abuse ends in a disconnect.
    for i in 0..40 {
        flooder
            .send_json(&json!({"hd": {"event": "chat.typing"}, "bd": {"n": i}}))
            .await;
    }
    flooder
        .expect_catalogued_close(Close::RateLimitsIgnored)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_rate_limit_and_connection_limits() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--room-msgs-per-sec",
            "1",
            "--room-msgs-burst",
            "3",
            "--max-conns-per-room",
            "2",
            "--max-conns-per-ip",
            "3",
        ],
    )
    .await;
    let sid = unique_sid("roomrate");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let mut codes = Vec::new();
    for i in 0..4 {
        let (c, role) = if i % 2 == 0 {
            (&mut a, "A")
        } else {
            (&mut b, "B")
        };
        let cid = c.chat(role, "hi").await;
        let reply = c.take_reply(&cid).await;
        codes.push(reply["hd"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert_eq!(codes, ["ok", "ok", "ok", "room_rate_limited"]);

    let (status, body) = handshake(&relay.ws_url(&format!("sid={sid}&role=user")), &[]).await;
    assert_eq!((status, body["code"].as_str().unwrap()), (429, "room_full"));
    let other = unique_sid("roomrate2");
    let _c = WsClient::join(&relay.ws_url(&format!("sid={other}&role=A"))).await;
    let (status, body) = handshake(&relay.ws_url(&format!("sid={other}&role=B")), &[]).await;
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (429, "too_many_connections")
    );
    let _ = Duration::ZERO;
}
