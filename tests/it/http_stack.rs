//! The HTTP middleware: request ids, the body limit, the timeout, CORS. Every error is JSON.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{unique_sid, RedisServer, Relay, RelayProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_the_body_limit() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--max-frame-bytes", "1024"]).await;
    let http = reqwest::Client::new();
    let r = http.get(relay.http("/healthz")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!id.is_empty());
    let r = http
        .get(relay.http("/healthz"))
        .header("x-request-id", "mine-1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-request-id"],
        "mine-1",
        "a caller's id is kept"
    );

    let sid = unique_sid("limit");
    let url = relay.http(&format!("/v1/sessions/{sid}/messages"));
    let fits =
        json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "x".repeat(900)}});
    assert_eq!(
        http.post(&url).json(&fits).send().await.unwrap().status(),
        201
    );
    let big =
        json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "x".repeat(1500)}})
            .to_string();
    // With a Content-Length, and streamed without one: the same JSON refusal.
    let sized = http
        .post(&url)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let chunks = futures_util::stream::iter(
        big.as_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let streamed = http
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    for r in [sized, streamed] {
        assert_eq!(r.status(), 413);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "frame_too_large", "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_only_for_configured_origins() {
    let redis = RedisServer::start();
    let plain = Relay::start(&redis.url(), &[]).await;
    let open = Relay::start(
        &redis.url(),
        &["--allowed-origins", "https://chat.example.com"],
    )
    .await;
    let http = reqwest::Client::new();
    let sid = unique_sid("cors");
    let preflight = |relay: &Relay| {
        http.request(
            reqwest::Method::OPTIONS,
            relay.http(&format!("/v1/sessions/{sid}/messages")),
        )
        .header("origin", "https://chat.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
    };
    let r = preflight(&open).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let r = preflight(&plain).await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = http
        .get(open.http(&format!("/v1/sessions/{sid}/messages")))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

/// A request that outlives `--http-timeout-secs` (here: Redis is gone and the command timeout
/// is longer) gets `408 request_timeout` as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_with_json() {
    let mut redis = RedisServer::start();
    let relay = RelayProcess::start(
        &redis.url(),
        &["--redis-timeout-ms", "10000", "--http-timeout-secs", "1"],
    );
    redis.stop();
    let url = format!(
        "http://127.0.0.1:{}/v1/sessions/{}/messages",
        relay.port,
        unique_sid("slow")
    );
    let r = tokio::time::timeout(Duration::from_secs(8), reqwest::get(url))
        .await
        .expect("answered before the Redis timeout")
        .unwrap();
    assert_eq!(r.status(), 408);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "request_timeout");
}
