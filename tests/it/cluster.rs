//! The relay and the LLM participant on a real 3-master Redis Cluster (scripts/cluster.sh).

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::{unique_sid, FakeLlm, Relay, WsClient};

/// A cluster started by `scripts/cluster.sh` in its own directory, stopped on drop.
struct Cluster {
    dir: String,
    seeds: String,
}

impl Cluster {
    fn start() -> Cluster {
        // One directory per cluster: tests in this binary may run clusters side by side.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir()
            .join(format!("chat-relay-it-cluster-{}-{n}", std::process::id()))
            .to_string_lossy()
            .into_owned();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let out = Command::new("bash")
            .args([script, "start", &dir])
            .output()
            .expect("run cluster.sh");
        assert!(
            out.status.success(),
            "cluster.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seeds = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Cluster { dir, seeds }
    }

    /// Every key on every master whose name holds `needle` (a real `SCAN` on each node).
    fn keys_naming(&self, needle: &str) -> Vec<String> {
        self.seeds
            .split(',')
            .flat_map(|node| {
                let port = node.rsplit(':').next().unwrap();
                let out = Command::new("redis-cli")
                    .args(["-p", port, "--scan", "--pattern", &format!("*{needle}*")])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `redis-cli -c` against the first node, as an operator would.
    fn cli(&self, args: &[&str]) -> String {
        let first = self.seeds.split(',').next().unwrap();
        let port = first.rsplit(':').next().unwrap();
        let out = Command::new("redis-cli")
            .args(["-c", "-p", port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let _ = Command::new("bash")
            .args([script, "stop", &self.dir])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_a_cluster_deliver_in_order_and_the_llm_answers() {
    let cluster = Cluster::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["clu", "ster"], Duration::from_millis(10))).await;
    let base = fake.base_url();
    let args = [
        "--redis-cluster",
        cluster.seeds.as_str(),
        "--llm-base-url",
        base.as_str(),
    ];
    let n1 = Relay::start("redis://unused:1", &args).await;
    let n2 = Relay::start("redis://unused:1", &[&args[..], &["--llm", "off"]].concat()).await;

    // Enough rooms to land on every master.
    let rooms: Vec<String> = (0..6).map(|i| unique_sid(&format!("clu{i}"))).collect();
    for sid in &rooms {
        let mut a = WsClient::join(&n1.ws_url(&format!("sid={sid}&role=A"))).await;
        let mut b = WsClient::join(&n2.ws_url(&format!("sid={sid}&role=B"))).await;
        for i in 0..3 {
            a.chat("A", &format!("a{i}")).await;
            b.chat("B", &format!("b{i}")).await;
        }
        let ids = |v: Vec<serde_json::Value>| {
            v.iter()
                .map(|m| m["hd"]["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let seen_a = ids(a.collect_messages(6).await);
        let seen_b = ids(b.collect_messages(6).await);
        assert_eq!(seen_a, seen_b, "one order across nodes in {sid}");
        // The documented key is readable with redis-cli -c.
        assert!(
            cluster
                .cli(&["XLEN", &format!("chat:session:{sid}")])
                .trim()
                .parse::<u64>()
                .unwrap()
                >= 8
        );
    }

    // The LLM participant works across slots: ask in two rooms.
    for sid in &rooms[..2] {
        let mut a = WsClient::join(&n1.ws_url(&format!("sid={sid}&role=A"))).await;
        a.send_json(&json!({"hd": {"event": "llm.request", "role": "A", "cid": format!("q-{sid}")}, "bd": {"text": "hi"}})).await;
        let turn = a.expect_ack(&format!("q-{sid}")).await;
        let end = loop {
            let v = a.next_json().await;
            if v["hd"]["event"] == "llm.response" || v["hd"]["event"] == "llm.error" {
                break v;
            }
        };
        assert_eq!(end["hd"]["event"], "llm.response", "{end}");
        assert_eq!(end["hd"]["turn_id"], turn.as_str());
        assert_eq!(end["bd"]["text"], "cluster");
    }
}

/// Sessions spread over the masters: created with their record and stream in one script (one
/// slot), chatted in through `/api/chat`, and deleted with nothing left on any master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_a_cluster_are_created_chatted_in_and_deleted_without_a_trace() {
    let cluster = Cluster::start();
    let fake = FakeLlm::start(FakeLlm::tokens(&["clu", "ster"], Duration::from_millis(10))).await;
    let base = fake.base_url();
    let n1 = Relay::start(
        "redis://unused:1",
        &[
            "--redis-cluster",
            cluster.seeds.as_str(),
            "--llm-base-url",
            base.as_str(),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    // The relay connects in the background: wait until it reads the cluster's slots.
    for _ in 0..100 {
        let r = http.get(n1.http("/readyz")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..4 {
        let sid = unique_sid(&format!("clusess{i}"));
        let r = http
            .post(n1.http("/api/sessions"))
            .json(&json!({"session_id": sid, "metadata": {"i": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let mut a = WsClient::join(&n1.ws_url(&format!("sid={sid}&role=A"))).await;
        let cid = a.chat("A", "with a dedup key").await;
        a.expect_ack(&cid).await;
        let r = http
            .post(n1.http("/api/chat"))
            .json(&json!({"session_id": sid, "message": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let reply: serde_json::Value = r.json().await.unwrap();
        assert_eq!(reply["content"], "cluster");
        let r = http
            .patch(n1.http(&format!("/api/sessions/{sid}")))
            .json(&json!({"metadata": {"j": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap()["metadata"],
            json!({"i": i, "j": 1})
        );
        assert!(!cluster.keys_naming(&sid).is_empty());
        let r = http
            .delete(n1.http(&format!("/api/sessions/{sid}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        a.expect_catalogued_close(chat_relay::protocol::Close::SessionDeleted)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cluster.keys_naming(&sid), Vec::<String>::new(), "{sid}");
    }
}
