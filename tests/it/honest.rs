//! Honest answers: a client's bad input is a client error (or a well-defined empty answer),
//! never a retryable `store_unavailable`; protocol violations close with the code that names
//! them.

use serde_json::{json, Value};

use crate::support::redis::xlen;
use crate::support::{unique_sid, RedisServer, Relay, SseReader, WsClient};

const MAX_ID: &str = "18446744073709551615-18446744073709551615";

/// Ids at the ends of the id space used to reach Redis as ranges it refuses (`(0-0` before,
/// `(max` after): 503 `store_unavailable` over HTTP, a 1013 loop over the WebSocket, silence over
/// SSE. Nothing is before `0-0` and nothing after the greatest id: empty pages; a resume from an
/// id the stream never reached gets `resume_gap` (`ahead`) and then what is stored next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_at_the_ends_of_the_id_space_are_answered_not_retried() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("ends");
    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "first"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    for query in ["before=0", "before=0-0", &format!("after={MAX_ID}")] {
        let r = reqwest::get(relay.http(&format!("/v1/sessions/{sid}/messages?{query}")))
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (status, &body["count"]),
            (200, &json!(0)),
            "{query}: {body}"
        );
    }

    let mut ws =
        WsClient::connect(&relay.ws_url(&format!("sid={sid}&role=B&last_id={MAX_ID}"))).await;
    let gap = ws.expect_event("resume_gap").await;
    assert_eq!(gap["bd"]["reason"], "ahead", "{gap}");
    let mut sse = SseReader::open(
        &relay.http(&format!("/v1/sessions/{sid}/events")),
        Some(MAX_ID),
    )
    .await;
    let (event, _, gap) = sse.next().await;
    assert_eq!(
        (event.as_str(), &gap["bd"]["reason"]),
        ("resume_gap", &json!("ahead"))
    );

    let r = relay
        .post(
            &sid,
            &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "next"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let m = ws.collect_messages(1).await.remove(0);
    assert_eq!(m["bd"]["text"], "next");
    loop {
        let (event, _, data) = sse.next().await;
        if event == "chat.message" {
            assert_eq!(data["bd"]["text"], "next");
            break;
        }
        assert_ne!(event, "error", "{data}");
    }
}

/// Zero-width and other invisible characters alone are an empty message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_only_messages_are_empty() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("zw");
    let mut a = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let client = redis.client().await;
    let key = format!("chat:session:{sid}");
    let before = xlen(&client, &key).await;
    for text in [
        "\u{200B}",
        "\u{200C}\u{200D}",
        "\u{2060}",
        "\u{FEFF}",
        " \u{200B}\u{200B} ",
    ] {
        a.send_json(&json!({"hd": {"event": "chat.message", "role": "A", "cid": "zw"}, "bd": {"text": text}}))
            .await;
        assert_eq!(
            a.expect_error().await["hd"]["code"],
            "empty_text",
            "{text:?}"
        );
        let r = relay
            .post(
                &sid,
                &json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": text}}),
            )
            .await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "empty_text");
    }
    assert_eq!(xlen(&client, &key).await, before, "nothing stored");
    // Visible text with joiners and variation selectors is kept as sent.
    let family = "👨\u{200D}👩\u{200D}👧 ❤\u{FE0F}";
    let cid = a.chat("A", family).await;
    a.expect_ack(&cid).await;
    assert_eq!(a.collect_messages(1).await[0]["bd"]["text"], family);
}
