//! Cross-site: a web page elsewhere cannot post into a room (JSON bodies only, the WebSocket's
//! origin rule for every browser request), the origin rule does not trust `Host`, and the page
//! is served with a content security policy it satisfies.

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::redis::xlen;
use crate::support::{unique_sid, RedisServer, Relay};

fn envelope() -> String {
    json!({"hd": {"event": "chat.message", "role": "A"}, "bd": {"text": "from a page"}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_elsewhere_cannot_post_into_a_room() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &["--allowed-origins", "https://chat.example.com"],
    )
    .await;
    let sid = unique_sid("csrf");
    let url = relay.http(&format!("/v1/sessions/{sid}/messages"));
    let http = reqwest::Client::new();
    let send = |content_type: Option<&'static str>, origin: Option<&'static str>| {
        let mut req = http.post(&url).body(envelope());
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body["code"].as_str().unwrap_or("").to_owned())
        }
    };
    // What a form or a no-preflight fetch from any page can send.
    for (ct, origin) in [
        (Some("text/plain"), Some("https://evil.example")),
        (Some("text/plain"), None),
        (Some("application/x-www-form-urlencoded"), None),
        (None, None),
    ] {
        let (status, code) = send(ct, origin).await;
        assert!(
            (status, code.as_str()) == (415, "unsupported_media_type")
                || (status, code.as_str()) == (403, "forbidden_origin"),
            "{ct:?} from {origin:?}: {status} {code}"
        );
    }
    assert_eq!(
        send(Some("application/json"), Some("https://evil.example")).await,
        (403, "forbidden_origin".to_owned())
    );
    let client = redis.client().await;
    assert_eq!(
        xlen(&client, &format!("chat:session:{sid}")).await,
        0,
        "nothing stored"
    );
    for origin in [
        None,
        Some("https://chat.example.com"),
        Some("http://localhost:5173"),
    ] {
        assert_eq!(
            send(Some("application/json; charset=utf-8"), origin)
                .await
                .0,
            201,
            "{origin:?}"
        );
    }
    // Reading from a foreign page is refused the same way.
    let r = http
        .get(relay.http(&format!("/v1/sessions/{sid}/messages")))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// DNS rebinding: a page at evil.example resolving to the relay sends `Host: evil.example` and
/// `Origin: http://evil.example`; the origin rule must not take Host as the relay's own origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_rule_does_not_trust_host() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let sid = unique_sid("rebind");
    let mut req = relay
        .ws_url(&format!("sid={sid}&role=A"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", "evil.example".parse().unwrap());
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403);
            let body: Value = serde_json::from_slice(resp.body().as_ref().unwrap()).unwrap();
            assert_eq!(body["code"], "forbidden_origin");
        }
        other => panic!("upgraded or failed otherwise: {:?}", other.map(|_| ())),
    }
}

/// The page comes with a policy that allows only its own scripts, styles and connections and
/// forbids framing; and the page satisfies it (no inline script, style or handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_a_policy_it_satisfies() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &[]).await;
    let r = reqwest::get(relay.http("/")).await.unwrap();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let html = r.text().await.unwrap();
    let lower = html.to_ascii_lowercase();
    for (i, _) in lower.match_indices("<script") {
        let tag = &lower[i..i + lower[i..].find('>').unwrap()];
        assert!(tag.contains(" src="), "inline script: {tag}");
    }
    assert!(!lower.contains(" style="), "inline style attribute");
    assert!(!lower.contains("<style"), "inline style element");
    let handler = regex_like_handler(&lower);
    assert!(handler.is_none(), "inline event handler: {handler:?}");
    for path in ["/app.js", "/style.css", "/healthz"] {
        let r = reqwest::get(relay.http(path)).await.unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
    }
}

/// The first ` on<letters>=` attribute in `html`, if any.
fn regex_like_handler(html: &str) -> Option<String> {
    html.match_indices(" on").find_map(|(i, _)| {
        let rest = &html[i + 3..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase())
            .collect();
        (!name.is_empty() && rest[name.len()..].starts_with('=')).then(|| format!("on{name}"))
    })
}
