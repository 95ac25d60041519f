//! End to end with a real model: llama.cpp's server + SmolLM2-135M, built and cached by
//! `scripts/setup.sh --test`. Asserts the format of what comes back, never its content.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::redis::free_port;
use crate::support::{unique_sid, RedisServer, Relay, WsClient};

struct LocalModel {
    port: u16,
    url: String,
}

impl LocalModel {
    fn start() -> Option<LocalModel> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/llm-local.sh");
        let ready = Command::new("bash")
            .args([script, "ready"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ready {
            if std::env::var_os("CHAT_RELAY_SKIP_REAL_LLM").is_some() {
                eprintln!(
                    "SKIPPED: the local model is not prepared and CHAT_RELAY_SKIP_REAL_LLM is set"
                );
                return None;
            }
            panic!("the local model is not prepared: run scripts/setup.sh --test (or set CHAT_RELAY_SKIP_REAL_LLM=1)");
        }
        let port = free_port();
        let out = Command::new("bash")
            .args([script, "start", &port.to_string()])
            .output()
            .expect("run llm-local.sh start");
        assert!(
            out.status.success(),
            "llm-local.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Some(LocalModel { port, url })
    }
}

impl Drop for LocalModel {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/llm-local.sh");
        let _ = Command::new("bash")
            .args([script, "stop", &self.port.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_streams_to_both_members_and_can_be_cancelled() {
    let Some(model) = LocalModel::start() else {
        return;
    };
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--llm-base-url",
            &model.url,
            "--llm-idle-timeout-secs",
            "60",
            "--llm-system-prompt",
            "You are a storyteller in a group chat. Always answer with a long, detailed story.",
        ],
    )
    .await;
    let sid = unique_sid("real");
    // The model shares two cores with the rest of the suite: give it time.
    let patience = Duration::from_secs(90);
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A")))
        .await
        .with_patience(patience);
    let mut b = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B")))
        .await
        .with_patience(patience);

    let cid = a
        .chat("A", "@llm tell us a story about a lighthouse keeper")
        .await;
    let turn = a.expect_ack(&cid).await;
    let mut finals = Vec::new();
    for c in [&mut a, &mut b] {
        let mut streamed = String::new();
        let end = loop {
            let v = c.next_json().await;
            match v["hd"]["event"].as_str() {
                Some("llm.delta") => streamed.push_str(v["bd"]["delta"].as_str().unwrap()),
                Some("llm.response") | Some("llm.error") => break v,
                _ => {}
            }
        };
        assert_eq!(
            end["hd"]["event"], "llm.response",
            "the model answered: {end}"
        );
        assert_eq!(end["hd"]["turn_id"], turn.as_str());
        let text = end["bd"]["text"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "non-empty reply");
        assert_eq!(text, streamed, "the stored reply is what was streamed");
        let usage = &end["bd"]["usage"];
        assert!(
            usage["completion_tokens"].as_u64().unwrap() > 0,
            "usage recorded: {end}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        finals.push(text.to_owned());
    }
    assert_eq!(
        finals[0], finals[1],
        "both members have the same final text"
    );

    // A second turn, cancelled by B after a few tokens.
    a.send_json(&json!({"hd": {"event": "llm.request", "role": "A", "cid": "long"}, "bd": {"text": "Tell the longest story you can about the sea."}})).await;
    let turn = a.expect_ack("long").await;
    let mut deltas = 0;
    while deltas < 3 {
        let v = b.next_json().await;
        if v["hd"]["event"] == "llm.delta" && v["hd"]["turn_id"] == turn.as_str() {
            deltas += 1;
        }
    }
    a.send_json(&json!({"hd": {"event": "llm.cancel", "role": "A", "cid": "stop"}, "bd": {"turn_id": turn}})).await;
    let end = loop {
        let v = b.next_json().await;
        if v["hd"]["event"] == "llm.response" && v["hd"]["turn_id"] == turn.as_str() {
            break v;
        }
    };
    assert_eq!(end["bd"]["reason"], "cancelled", "{end}");
    assert!(
        !end["bd"]["text"].as_str().unwrap().is_empty(),
        "the partial text is kept"
    );
}
