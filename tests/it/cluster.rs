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
        let dir = std::env::temp_dir()
            .join(format!("chat-relay-it-cluster-{}", std::process::id()))
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
