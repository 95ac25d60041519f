//! The fake provider's knobs, exercised over real HTTP as the relay uses them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{json, Value};
use testkit::{FakeLlm, Mode};

fn request(usage: bool) -> Value {
    json!({
        "model": "m", "stream": true, "stop": ["\nA:"],
        "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": usage},
    })
}

/// POSTs a completion; (status, the `data:` payloads in order).
async fn complete(fake: &FakeLlm, body: &Value) -> (u16, Vec<String>) {
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", fake.base_url()))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect();
    (status, data)
}

fn content(data: &[String]) -> String {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn streams_tokens_then_usage_then_done_and_records_the_request() {
    let fake = FakeLlm::start(FakeLlm::tokens(&["Hel", "lo"], Duration::ZERO)).await;
    let (status, data) = complete(&fake, &request(true)).await;
    assert_eq!(status, 200);
    assert_eq!(content(&data), "Hello");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert_eq!(fake.requests()[0]["stop"], json!(["\nA:"]));
    assert_eq!((fake.request_count(), fake.finished()), (1, 1));
}

#[tokio::test]
async fn usage_only_when_asked_and_allowed() {
    let fake = FakeLlm::start(FakeLlm::numbered(3, Duration::ZERO)).await;
    let has_usage = |data: &[String]| data.iter().any(|d| d.contains("\"usage\""));
    assert!(!has_usage(&complete(&fake, &request(false)).await.1));
    fake.set_usage(false);
    let (_, data) = complete(&fake, &request(true)).await;
    assert!(!has_usage(&data));
    assert_eq!(content(&data), "tok0 tok1 tok2 ");
}

#[tokio::test]
async fn fails_the_next_requests_then_recovers() {
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::ZERO)).await;
    fake.fail_next(2, 503);
    assert_eq!(complete(&fake, &request(false)).await.0, 503);
    assert_eq!(complete(&fake, &request(false)).await.0, 503);
    let (status, data) = complete(&fake, &request(false)).await;
    assert_eq!((status, content(&data).as_str()), (200, "ok"));
    fake.set_mode(Mode::Status(429));
    assert_eq!(complete(&fake, &request(false)).await.0, 429);
}

#[tokio::test]
async fn refuses_a_request_that_does_not_stream() {
    let fake = FakeLlm::start(FakeLlm::tokens(&["ok"], Duration::ZERO)).await;
    let mut body = request(false);
    body["stream"] = json!(false);
    assert_eq!(complete(&fake, &body).await.0, 400);
}

#[tokio::test]
async fn disconnect_cuts_the_stream_before_done() {
    let fake = FakeLlm::start(Mode::Disconnect {
        tokens: vec!["par".into(), "tial".into()],
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", fake.base_url()))
        .json(&request(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // The body ends with an error: no finish chunk, no [DONE].
    assert!(resp.text().await.is_err());
}

#[tokio::test]
async fn a_client_that_hangs_up_on_a_stall_is_counted() {
    let fake = FakeLlm::start(Mode::Stall {
        tokens: vec!["wait".into()],
    })
    .await;
    let mut resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", fake.base_url()))
        .json(&request(false))
        .send()
        .await
        .unwrap();
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    for _ in 0..100 {
        if fake.hung_up() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((fake.hung_up(), fake.finished()), (1, 0));
    assert!(fake.wait_for_requests(1, Duration::from_millis(10)).await);
    assert!(!fake.wait_for_requests(2, Duration::from_millis(50)).await);
}
