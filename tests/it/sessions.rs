//! Sessions as a resource (`/api/sessions`), with real Redis, real relays and WebSocket members:
//! the exact fields, durability before the 201, merge patches, delete (members closed on every
//! node, nothing left in Redis), `--require-session`, and JSON for 404 and 405.

use fred::prelude::*;
use serde_json::{json, Value};

use chat_relay::protocol::Close;

use crate::support::redis::xrange;
use crate::support::{unique_sid, RedisServer, Relay, RelayProcess, WsClient};

/// A JSON API call's status and body (`Null` when there is none).
pub async fn call(
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
    };
    (status, body, headers)
}

/// `POST /api/sessions` with `body`; returns the 201's body.
pub async fn create_session(relay: &Relay, body: Value) -> Value {
    let (status, created, _) = call(
        reqwest::Method::POST,
        relay.http("/api/sessions"),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    created
}

/// `DELETE /api/sessions/{sid}`, which must answer 204.
pub async fn delete_session(relay: &Relay, sid: &str) {
    let (status, _, _) = call(
        reqwest::Method::DELETE,
        relay.http(&format!("/api/sessions/{sid}")),
        None,
    )
    .await;
    assert_eq!(status, 204);
}

fn is_rfc3339(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() >= 20 && s.as_bytes()[10] == b'T' && s.ends_with('Z')
}

/// Every key whose name holds the room id, by a real `SCAN`.
pub async fn keys_naming(client: &Client, sid: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let (next, page): (String, Vec<String>) = client
            .custom(
                fred::types::CustomCommand::new_static(
                    "SCAN",
                    fred::types::ClusterHash::Random,
                    false,
                ),
                vec![
                    cursor.clone(),
                    "MATCH".into(),
                    format!("*{sid}*"),
                    "COUNT".into(),
                    "1000".into(),
                ],
            )
            .await
            .expect("SCAN");
        keys.extend(page);
        if next == "0" {
            return keys;
        }
        cursor = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_read_patch_delete_with_the_exact_fields() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("crud");
    let url = |s: &str| relay.http(&format!("/api/sessions/{s}"));

    let created = create_session(
        &relay,
        json!({"session_id": sid, "metadata": {"scenario": "intro", "level": 2}}),
    )
    .await;
    assert_eq!(created["session_id"], sid);
    assert_eq!(created["id"], sid, "the scenario client reads `id`");
    assert!(is_rfc3339(&created["created_at"]), "{created}");
    assert_eq!(
        created["metadata"],
        json!({"scenario": "intro", "level": 2})
    );

    // Durable before the 201: the record and the stream are in Redis already.
    let client = redis.client().await;
    let entries = xrange(&client, &format!("chat:session:{sid}")).await;
    assert_eq!(entries.len(), 1);
    assert!(entries[0]
        .1
        .contains(&("event".to_owned(), "session.created".to_owned())));
    let record: std::collections::HashMap<String, String> = client
        .hgetall(format!("chat:record:{{chat:session:{sid}}}"))
        .await
        .unwrap();
    assert_eq!(record["version"], "1");
    assert_eq!(
        serde_json::from_str::<Value>(&record["metadata"]).unwrap(),
        created["metadata"]
    );

    let (status, again, _) = call(
        reqwest::Method::POST,
        relay.http("/api/sessions"),
        Some(json!({"session_id": sid})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(again["code"], "session_exists");
    assert!(again["message"].as_str().unwrap().contains(&sid));
    for bad in [json!({"session_id": "no spaces"}), json!({"session_id": 7})] {
        let (status, body, _) = call(
            reqwest::Method::POST,
            relay.http("/api/sessions"),
            Some(bad),
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_sid")));
    }
    let (status, body, _) = call(
        reqwest::Method::POST,
        relay.http("/api/sessions"),
        Some(json!({"metadata": [1]})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("metadata"));

    // No body at all: a fresh id.
    let resp = reqwest::Client::new()
        .post(relay.http("/api/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let fresh: Value = resp.json().await.unwrap();
    let fresh_id = fresh["session_id"].as_str().unwrap();
    assert_eq!(fresh["id"], fresh_id);
    assert!(fresh_id.len() >= 16, "{fresh}");
    assert_eq!(fresh["metadata"], json!({}));

    // A WebSocket member talks in it; GET shows the count and the activity.
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    for text in ["one", "two"] {
        let cid = a.chat("A", text).await;
        a.expect_ack(&cid).await;
    }
    let (status, got, _) = call(reqwest::Method::GET, url(&sid), None).await;
    assert_eq!(status, 200, "{got}");
    let mut fields: Vec<&str> = got
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "created_at",
            "id",
            "last_accessed",
            "message_count",
            "metadata",
            "session_id"
        ]
    );
    assert_eq!(got["message_count"], 2, "joins are not messages: {got}");
    assert_eq!(got["created_at"], created["created_at"]);
    assert!(is_rfc3339(&got["last_accessed"]));
    let at = |v: &Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    // As times: RFC 3339 strings with trimmed fractions do not sort as text.
    assert!(at(&got["last_accessed"]) >= at(&got["created_at"]));

    // The room API shows the same session.
    let info = relay.room_info(&sid).await;
    assert_eq!(info["metadata"], created["metadata"]);
    assert_eq!(info["message_count"], 2);
    assert_eq!(info["events"]["session.created"], 1);

    // PATCH merges (RFC 7396): null removes, objects merge, the rest replaces.
    let (status, patched, _) = call(
        reqwest::Method::PATCH,
        url(&sid),
        Some(json!({"metadata": {"level": null, "tags": ["a"], "nested": {"x": 1}}})),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["metadata"],
        json!({"scenario": "intro", "tags": ["a"], "nested": {"x": 1}})
    );
    let (_, patched, _) = call(
        reqwest::Method::PATCH,
        url(&sid),
        Some(json!({"metadata": {"nested": {"y": 2}}})),
    )
    .await;
    assert_eq!(patched["metadata"]["nested"], json!({"x": 1, "y": 2}));
    for (bad, field) in [
        (json!({"metadata": "x"}), "metadata"),
        (json!({"other": 1}), "metadata"),
    ] {
        let (status, body, _) = call(reqwest::Method::PATCH, url(&sid), Some(bad)).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["message"].as_str().unwrap().contains(field), "{body}");
    }
    let resp = reqwest::Client::new()
        .patch(url(&sid))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "bad_json");

    // Unknown sessions: 404 with the catalogue's body, never 500.
    let ghost = unique_sid("ghost");
    let missing =
        json!({"code": "not_found", "message": format!("session {ghost} does not exist")});
    for (method, body) in [
        (reqwest::Method::GET, None),
        (reqwest::Method::PATCH, Some(json!({"metadata": {"a": 1}}))),
        (reqwest::Method::DELETE, None),
    ] {
        let (status, got, _) = call(method.clone(), url(&ghost), body).await;
        assert_eq!((status, &got), (404, &missing), "{method}");
    }
    for path in [
        format!("/api/sessions/{ghost}/messages"),
        format!("/v1/sessions/{ghost}/messages"),
        format!("/v1/sessions/{ghost}"),
    ] {
        let (status, got, _) = call(reqwest::Method::GET, relay.http(&path), None).await;
        assert_eq!((status, &got), (404, &missing), "{path}");
    }
    assert!(
        !client
            .exists::<bool, _>(format!("chat:session:{ghost}"))
            .await
            .unwrap(),
        "reading or patching a missing session creates nothing"
    );

    // DELETE: 204, then 404 for GET and for a second DELETE.
    let (status, body, _) = call(reqwest::Method::DELETE, url(fresh_id), None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, _, _) = call(reqwest::Method::GET, url(fresh_id), None).await;
    assert_eq!(status, 404);
    let (status, body, _) = call(reqwest::Method::DELETE, url(fresh_id), None).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_created_by_its_first_message_is_a_session_too() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("implicit");
    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "B"}, "bd": {"text": "hi"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let (status, got, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/api/sessions/{sid}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["metadata"], json!({}));
    assert_eq!(got["message_count"], 1);
    let (status, _, _) = call(
        reqwest::Method::POST,
        relay.http("/api/sessions"),
        Some(json!({"session_id": sid})),
    )
    .await;
    assert_eq!(status, 409, "the room exists already");
    let (status, patched, _) = call(
        reqwest::Method::PATCH,
        relay.http(&format!("/api/sessions/{sid}")),
        Some(json!({"metadata": {"k": "v"}})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(patched["metadata"], json!({"k": "v"}));
    assert_eq!(patched["created_at"], got["created_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_list_the_conversation_of_every_client() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("msgs");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let cid = a.chat("A", &format!("ws {i}")).await;
        ids.push(a.expect_ack(&cid).await);
    }
    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "B"}, "bd": {"text": "from http"}}),
        )
        .await;
    ids.push(
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    let typing = json!({"hd": {"event": "chat.typing", "role": "A"}, "bd": {}});
    a.send_json(&typing).await;

    let list = |q: &str| {
        let url = relay.http(&format!("/api/sessions/{sid}/messages{q}"));
        async move {
            let (status, body, _) = call(reqwest::Method::GET, url, None).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let all = list("").await;
    assert_eq!(all["session_id"], sid);
    let msgs = all["messages"].as_array().unwrap();
    let got: Vec<&str> = msgs
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids, "only the conversation, oldest first");
    let first = &msgs[0];
    let mut fields: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    for f in [
        "content",
        "created_at",
        "message_id",
        "participant",
        "role",
        "token_usage",
    ] {
        assert!(fields.contains(&f), "{f} missing: {first}");
    }
    assert_eq!(first["role"], "user");
    assert_eq!(first["participant"], "A");
    assert_eq!(first["content"], "ws 0");
    assert!(first["token_usage"].is_null());
    assert!(is_rfc3339(&first["created_at"]));
    assert_eq!(msgs[5]["participant"], "B");

    let newest = list("?limit=2").await;
    let got: Vec<&str> = newest["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(got, &ids[4..]);
    let page = list(&format!("?after={}&limit=3", ids[0])).await;
    let got: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(got, &ids[1..4]);
    assert_eq!(page["next_after"], ids[3]);
    let (status, body, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/api/sessions/{sid}/messages?after=yesterday")),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_last_id"))
    );
    a.close().await;
}

/// Deleting closes the members on every node with `session_deleted` and 4404, and leaves
/// nothing of the session in Redis: no stream, record, counters, dedup keys or leave entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_closes_members_on_every_node_and_leaves_nothing() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let other = RelayProcess::start(&redis.url(), &["--llm", "off"]);
    let sid = unique_sid("delete");
    create_session(&relay, json!({"session_id": sid, "metadata": {"a": 1}})).await;
    let mut here = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut there = WsClient::join(&other.ws_url(&format!("sid={sid}&role=B"))).await;
    for (c, role) in [(&mut here, "A"), (&mut there, "B")] {
        let cid = c.chat(role, "with a cid, so a dedup key exists").await;
        c.expect_ack(&cid).await;
    }
    let client = redis.client().await;
    let before = keys_naming(&client, &sid).await;
    assert!(
        before.iter().any(|k| k.starts_with("chat:cids:")),
        "dedup keys exist before: {before:?}"
    );

    delete_session(&relay, &sid).await;
    for c in [&mut here, &mut there] {
        let err = c.expect_error().await;
        assert_eq!(err["hd"]["code"], "session_deleted", "{err}");
        c.expect_catalogued_close(Close::SessionDeleted).await;
    }
    // The sessions' ends (leave entries) must not bring the room back.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(keys_naming(&client, &sid).await, Vec::<String>::new());
    let (status, _, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/api/sessions/{sid}")),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, _) = call(
        reqwest::Method::GET,
        relay.http(&format!("/v1/sessions/{sid}")),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The same id can be created again, and is a new, empty session.
    let again = create_session(&relay, json!({"session_id": sid})).await;
    assert_eq!(again["metadata"], json!({}));
    let mut back = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = back.chat("A", "new life").await;
    back.expect_ack(&cid).await;
    back.collect_messages(1).await;
    back.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_session_refuses_rooms_never_created() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off", "--require-session"]).await;
    let sid = unique_sid("strict");
    let client = redis.client().await;

    // WebSocket join: refused before the upgrade.
    let refused =
        tokio_tungstenite::connect_async(relay.ws_url(&format!("sid={sid}&role=A"))).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["code"], "not_found");
        }
        other => panic!("the join must be refused with 404, got {other:?}"),
    }
    // HTTP publish, plain and as an LLM turn.
    for event in ["chat.message", "llm.request"] {
        let r = relay
            .post(
                &sid,
                &json!({"hd": {"event": event, "role": "A"}, "bd": {"text": "hi"}}),
            )
            .await;
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    }
    assert_eq!(
        keys_naming(&client, &sid).await,
        Vec::<String>::new(),
        "nothing stored"
    );

    create_session(&relay, json!({"session_id": sid})).await;
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = a.chat("A", "now it exists").await;
    a.expect_ack(&cid).await;
    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "B"}, "bd": {"text": "me too"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_unknown_paths_answer_json() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/api/sessions", "POST"),
        (reqwest::Method::GET, "/api/sessions", "POST"),
        (
            reqwest::Method::POST,
            "/api/sessions/x",
            "GET,HEAD,PATCH,DELETE",
        ),
        (
            reqwest::Method::DELETE,
            "/api/sessions/x/messages",
            "GET,HEAD",
        ),
        (
            reqwest::Method::PUT,
            "/v1/sessions/x/messages",
            "GET,HEAD,POST",
        ),
        (reqwest::Method::POST, "/v1/session/chat", "GET,HEAD"),
        (reqwest::Method::DELETE, "/healthz", "GET,HEAD"),
    ] {
        let (status, body, headers) = call(method.clone(), relay.http(path), None).await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert_eq!(body["code"], "method_not_allowed", "{method} {path}");
        assert!(body["message"].as_str().unwrap().len() > 10);
        let got = headers["allow"].to_str().unwrap().replace(' ', "");
        let mut got: Vec<&str> = got.split(',').collect();
        let mut want: Vec<&str> = allow.split(',').collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "{method} {path}");
    }
    for path in ["/api/nope", "/api/sessions/x/y/z", "/nope"] {
        let (status, body, _) = call(reqwest::Method::GET, relay.http(path), None).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["code"], "not_found");
        assert!(body["message"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_redis_and_the_llm() {
    let mut redis = RedisServer::start();
    let fake = crate::support::FakeLlm::start(crate::support::FakeLlm::tokens(
        &["ok"],
        std::time::Duration::ZERO,
    ))
    .await;
    let up = Relay::start(
        &redis.url(),
        &["--llm", "off", "--llm-base-url", &fake.base_url()],
    )
    .await;
    let dead_llm = format!("http://127.0.0.1:{}/v1", crate::support::redis::free_port());
    let down = Relay::start(&redis.url(), &["--llm", "off", "--llm-base-url", &dead_llm]).await;
    let (status, body, _) = call(reqwest::Method::GET, up.http("/api/health"), None).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status": "ok", "redis": "ok", "llm": "ok"}));
    let (status, body, _) = call(reqwest::Method::GET, down.http("/api/health"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"status": "ok", "redis": "ok", "llm": "unavailable"})
    );
    redis.stop();
    let (status, body, _) = call(reqwest::Method::GET, up.http("/api/health"), None).await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["redis"], "unavailable");
}

/// A raw command on the test's own connection; a string reply as a JSON string.
pub async fn redis_cmd(client: &Client, args: &[&str]) -> Value {
    let reply: fred::types::Value = client
        .custom(
            fred::types::CustomCommand::new(args[0], fred::types::ClusterHash::FirstKey, false),
            args[1..].iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        )
        .await
        .expect("redis command");
    json!(reply.as_str().map(|s| s.into_owned()))
}

/// A node whose subscriber was away when the room-deleted notice went out still closes its
/// members, once it subscribes again: the deletion log tells it. Redis here refuses every new
/// connection while the session is deleted, so the node's subscriber cannot come back in time
/// for the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_notice_missed_by_a_node_still_closes_its_members() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("missed");
    create_session(&relay, json!({"session_id": sid})).await;
    let mut member = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let cid = member.chat("A", "before").await;
    member.expect_ack(&cid).await;
    member.collect_messages(1).await;

    let client = redis.client().await;
    let info = redis_cmd(&client, &["INFO", "clients"]).await;
    let connected: usize = info
        .as_str()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("connected_clients:")))
        .and_then(|n| n.trim().parse().ok())
        .expect("connected_clients");
    let pubsub = redis_cmd(&client, &["CLIENT", "LIST", "TYPE", "pubsub"]).await;
    let subscribers = pubsub.as_str().map_or(0, |s| s.lines().count());
    assert!(subscribers >= 1, "the node follows the room: {pubsub}");
    let limit = (connected - subscribers).to_string();
    redis_cmd(&client, &["CONFIG", "SET", "maxclients", &limit]).await;
    redis_cmd(&client, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;

    delete_session(&relay, &sid).await;
    // The notice went to nobody; the member is still there.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let pubsub = redis_cmd(&client, &["CLIENT", "LIST", "TYPE", "pubsub"]).await;
    assert_eq!(
        pubsub.as_str().map_or(0, |s| s.lines().count()),
        0,
        "no subscriber came back: {pubsub}"
    );

    redis_cmd(&client, &["CONFIG", "SET", "maxclients", "10000"]).await;
    let err = member.expect_error().await;
    assert_eq!(err["hd"]["code"], "session_deleted", "{err}");
    member.expect_catalogued_close(Close::SessionDeleted).await;
}

/// The deletion log only speaks of deletions a room's node could have missed: an SSE follower
/// that came to a deleted session's id afterwards (waiting for it to come back) is not closed
/// by the next resync, and sees the session's next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_after_a_delete_is_not_closed_by_the_log() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--llm", "off"]).await;
    let sid = unique_sid("after");
    create_session(&relay, json!({"session_id": sid})).await;
    delete_session(&relay, &sid).await;
    let mut sse =
        crate::support::SseReader::open(&relay.http(&format!("/v1/sessions/{sid}/events")), None)
            .await;
    let client = redis.client().await;
    redis_cmd(&client, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    // The feed resubscribes (a resync) and reads the log, which names this session.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "back"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let (event, _, data) = sse.next().await;
    assert_eq!(event, "chat.message", "{data}");
    assert_eq!(data["bd"]["text"], "back");
}
