//! Idempotent resends: the dedup key names (sender, cid) injectively, and keys written before it
//! did still answer resends within the window.

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

/// A message stored just before the upgrade left a key in the old format; its resend after the
/// upgrade is still answered with the original id, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_of_messages_stored_before_the_upgrade_are_duplicates() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--auth", "jwt", "--jwt-secret", SECRET]).await;
    let sid = unique_sid("legacy");
    let (_, stored) = post_as(&relay, &sid, "carol", "before", "stored by the old version").await;
    let id = stored["id"].as_str().unwrap().to_owned();
    // What the old version wrote for (carol, old1), and nothing in the new format.
    let client = redis.client().await;
    let legacy = format!("chat:dedup:{{chat:session:{sid}}}:carol:old1");
    let _: () = client
        .set(&legacy, id.as_str(), Some(Expiration::EX(600)), None, false)
        .await
        .unwrap();
    let len = crate::support::redis::xlen(&client, &format!("chat:session:{sid}")).await;
    let (status, body) = post_as(&relay, &sid, "carol", "old1", "stored by the old version").await;
    assert_eq!(
        (status, body["id"].as_str(), &body["duplicate"]),
        (200, Some(id.as_str()), &json!(true))
    );
    assert_eq!(
        crate::support::redis::xlen(&client, &format!("chat:session:{sid}")).await,
        len
    );
    // New messages write the new key only.
    let (status, _) = post_as(&relay, &sid, "carol", "new1", "after the upgrade").await;
    assert_eq!(status, 201);
    let new_key = format!("chat:cid:{{chat:session:{sid}}}:5:carol:new1");
    let old_key = format!("chat:dedup:{{chat:session:{sid}}}:carol:new1");
    let (new, old): (Option<String>, Option<String>) = (
        client.get(&new_key).await.unwrap(),
        client.get(&old_key).await.unwrap(),
    );
    assert!(new.is_some() && old.is_none(), "{new:?} {old:?}");
}
