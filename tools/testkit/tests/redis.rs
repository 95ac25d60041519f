//! The redis-server harness: crash, shutdown and restart on the same port and data directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fred::prelude::*;
use testkit::redis::ping;
use testkit::{RedisServer, Signal};

#[tokio::test]
async fn restart_after_a_crash_keeps_the_aof() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    assert!(ping(redis.port));
    let client = redis.client().await;
    let () = client.set("k", "v", None, None, false).await.unwrap();
    let _ = client.quit().await;

    redis.stop();
    assert!(!redis.is_running());
    assert!(!ping(redis.port));
    redis.start_again().unwrap();
    assert!(redis.is_running());
    let client = redis.client().await;
    let v: Option<String> = client.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v"), "the AOF was replayed");
    let _ = client.quit().await;

    redis.stop_with(Signal::Term);
    assert!(!ping(redis.port));
    redis.restart();
    assert!(ping(redis.port));
}
