//! Idempotent resends: the cid field names (sender, cid) injectively, and a resend is found in
//! the previous generation of the dedup window, never in an older one.

use fred::prelude::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::redis::xrange;
use crate::support::{unique_sid, RedisServer, Relay};

const SECRET: &str = "dedup-secret";

fn token(sid: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "sid": sid, "role": "A", "exp": now + 600, "iat": now}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn post_as(relay: &Relay, sid: &str, sub: &str, cid: &str, text: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(relay.http(&format!("/v1/sessions/{sid}/messages")))
        .bearer_auth(token(sid, sub))
        .json(&json!({"hd": {"event": "chat.message", "cid": cid}, "bd": {"text": text}}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `bob` + cid `x:c1` and `bob:x` + cid `c1` are two messages, not a message and its resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_with_colons_do_not_collide() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--auth", "jwt", "--jwt-secret", SECRET]).await;
    let sid = unique_sid("colon");
    let (s1, first) = post_as(&relay, &sid, "bob", "x:c1", "from bob").await;
    let (s2, second) = post_as(&relay, &sid, "bob:x", "c1", "from bob:x").await;
    assert_eq!((s1, s2), (201, 201), "{first} {second}");
    assert_eq!(second["duplicate"], false);
    assert_ne!(first["id"], second["id"]);
    let client = redis.client().await;
    let texts: Vec<String> = xrange(&client, &format!("chat:session:{sid}"))
        .await
        .into_iter()
        .filter_map(|(_, f)| f.into_iter().find(|(k, _)| k == "body").map(|(_, v)| v))
        .map(|b| {
            serde_json::from_str::<Value>(&b).unwrap()["bd"]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(texts, ["from bob", "from bob:x"], "both stored");
    // Each one's own resend is still a duplicate.
    let (s, again) = post_as(&relay, &sid, "bob:x", "c1", "from bob:x").await;
    assert_eq!(
        (s, &again["id"], &again["duplicate"]),
        (200, &second["id"], &json!(true))
    );
}

/// Redis's clock in ms (the cid generations follow it, not the test's clock).
async fn redis_ms(client: &Client) -> u64 {
    let (secs, micros): (u64, u64) = client
        .custom(
            fred::types::CustomCommand::new_static("TIME", fred::types::ClusterHash::Random, false),
            Vec::<String>::new(),
        )
        .await
        .unwrap();
    secs * 1000 + micros / 1000
}

/// Waits until Redis's clock is in generation `gen` of a `window_ms` window (or later).
async fn wait_for_generation(client: &Client, window_ms: u64, gen: u64) {
    loop {
        let now = redis_ms(client).await;
        if now / window_ms >= gen {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(gen * window_ms - now + 5)).await;
    }
}

/// With a 1 s window: a resend in the next generation is still a duplicate (found in the
/// previous hash), one two generations later is a new message (the stale hash is ignored and
/// replaced), and the room never holds more than the two generation hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_found_across_one_generation_and_not_beyond() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--auth",
            "jwt",
            "--jwt-secret",
            SECRET,
            "--dedup-window-secs",
            "1",
        ],
    )
    .await;
    // A post that straddles a generation's end leaves the test unsure which generation holds
    // what; such an attempt starts over in a new room.
    for _ in 0..5 {
        if across_generations(&redis, &relay).await {
            return;
        }
    }
    panic!("every attempt straddled a generation's end");
}

/// One attempt of the test above; false when a post straddled a generation's end.
async fn across_generations(redis: &RedisServer, relay: &Relay) -> bool {
    const WINDOW_MS: u64 = 1000;
    let client = redis.client().await;
    let sid = unique_sid("generations");
    let stream = format!("chat:session:{sid}");

    let stored_in = redis_ms(&client).await / WINDOW_MS;
    let (status, first) = post_as(relay, &sid, "carol", "c1", "once").await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = post_as(relay, &sid, "carol", "c1", "once").await;
    if redis_ms(&client).await / WINDOW_MS != stored_in {
        return false;
    }
    assert_eq!(
        (status, &again["id"]),
        (200, &first["id"]),
        "same generation"
    );

    wait_for_generation(&client, WINDOW_MS, stored_in + 1).await;
    let (status, again) = post_as(relay, &sid, "carol", "c1", "once").await;
    if redis_ms(&client).await / WINDOW_MS != stored_in + 1 {
        return false;
    }
    assert_eq!(
        (status, &again["id"], &again["duplicate"]),
        (200, &first["id"], &json!(true)),
        "a resend in the next generation is found in the previous hash"
    );
    assert_eq!(crate::support::redis::xlen(&client, &stream).await, 1);

    wait_for_generation(&client, WINDOW_MS, stored_in + 2).await;
    let (status, late) = post_as(relay, &sid, "carol", "c1", "once more").await;
    assert_eq!(
        status, 201,
        "two windows later the cid is new again: {late}"
    );
    assert_ne!(late["id"], first["id"]);
    assert_eq!(crate::support::redis::xlen(&client, &stream).await, 2);
    // And its own resend is a duplicate of it.
    let (status, again) = post_as(relay, &sid, "carol", "c1", "once more").await;
    assert_eq!((status, &again["id"]), (200, &late["id"]));

    let keys = crate::sessions::keys_naming(&client, &sid).await;
    let cids: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("chat:cids:"))
        .collect();
    assert!(
        (1..=2).contains(&cids.len()),
        "the cids live in at most two hashes: {keys:?}"
    );
    // Kept as hash tables (see append.lua), not listpacks searched linearly.
    for key in cids {
        let encoding: String = client
            .custom(
                fred::types::CustomCommand::new_static(
                    "OBJECT",
                    fred::types::ClusterHash::Random,
                    false,
                ),
                vec!["ENCODING".to_owned(), key.clone()],
            )
            .await
            .unwrap();
        assert_eq!(encoding, "hashtable", "{key}");
    }
    true
}
