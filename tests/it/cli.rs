//! `chat-relay chat` in a pipe and `chat-relay token`.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{unique_sid, RedisServer, Relay, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_client_in_a_pipe_sends_lines_and_prints_json() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("cli");
    let mut watcher = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=B"))).await;
    let url = format!("ws://{}", relay.addr);
    let sid2 = sid.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chat-relay"))
            .args(["chat", "--url", &url, "--sid", &sid2, "--role", "A"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all("first line\n두 번째 🎉\n\n/llm what now?\n".as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is one JSON frame"))
        .collect();
    let acks = frames
        .iter()
        .filter(|f| f["hd"]["event"] == "chat.ack")
        .count();
    assert_eq!(
        acks, 3,
        "three lines sent (the empty one skipped), three acks: {frames:?}"
    );
    assert!(frames.iter().any(|f| f["hd"]["event"] == "session.join"));

    let seen: Vec<Value> = {
        let mut v = Vec::new();
        while v.len() < 3 {
            let f = watcher.next_json().await;
            if matches!(
                f["hd"]["event"].as_str(),
                Some("chat.message" | "llm.request")
            ) {
                v.push(f);
            }
        }
        v
    };
    assert_eq!(seen[0]["bd"]["text"], "first line");
    assert_eq!(seen[1]["bd"]["text"], "두 번째 🎉");
    assert_eq!(seen[2]["hd"]["event"], "llm.request");
    assert_eq!(seen[2]["bd"]["text"], "what now?");
    assert!(seen.iter().all(|f| f["hd"]["role"] == "A"));
}

#[test]
fn token_command_mints_a_usable_token_and_refuses_llm() {
    let out = Command::new(env!("CARGO_BIN_EXE_chat-relay"))
        .args([
            "token",
            "--jwt-secret",
            "s",
            "--sid",
            "room001",
            "--role",
            "A",
            "--ttl",
            "10m",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
    let refused = Command::new(env!("CARGO_BIN_EXE_chat-relay"))
        .args([
            "token",
            "--jwt-secret",
            "s",
            "--sid",
            "room001",
            "--role",
            "llm",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
