//! The connection layer: slowloris and idle connections are cut, open TCP connections are capped
//! per address, and behind a trusted proxy every per-address limit uses the forwarded client.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{unique_sid, RedisServer, Relay, WsClient};

/// Waits until the relay closes `tcp` (reads to EOF or an error); returns what it sent.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| got)
}

async fn healthz(relay: &Relay) -> u16 {
    reqwest::get(relay.http("/healthz"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Partial request heads (slowloris) and connections that never send a byte are closed after
/// `--header-read-timeout-secs`; the relay keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_and_silent_connections_are_cut() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--header-read-timeout-secs", "1"]).await;
    let mut conns = Vec::new();
    for i in 0..40 {
        let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
        if i % 2 == 0 {
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
                .await
                .unwrap();
        }
        conns.push(tcp);
    }
    assert_eq!(healthz(&relay).await, 200);
    for (i, tcp) in conns.iter_mut().enumerate() {
        assert!(
            closed_within(tcp, Duration::from_secs(10)).await.is_some(),
            "connection {i} still open"
        );
    }
    // A keep-alive connection is cut the same way once it stops sending requests.
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut tcp, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "answered first");
}

/// A connection that has not upgraded and moves no byte for `--idle-timeout-secs` is closed,
/// even when the header timeout is longer; a WebSocket idle as long stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_websockets_stay() {
    let redis = RedisServer::start();
    let relay = Relay::start(
        &redis.url(),
        &[
            "--header-read-timeout-secs",
            "60",
            "--idle-timeout-secs",
            "1",
        ],
    )
    .await;
    let sid = unique_sid("idle");
    let mut ws = WsClient::join(&relay.ws_url(&format!("sid={sid}&role=A"))).await;
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(10))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cid = ws.chat("A", "still here").await;
    ws.expect_ack(&cid).await;
}

/// Over `--max-tcp-conns-per-ip`, a connection is answered `429` with a JSON body before its
/// request is read; a freed slot is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_capped_per_address() {
    let redis = RedisServer::start();
    let relay = Relay::start(&redis.url(), &["--max-tcp-conns-per-ip", "3"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    // Give the relay a moment to accept them (accepting is asynchronous).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(relay.addr).await.unwrap();
    over.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut over, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["code"], "too_many_connections");
    assert!(body["message"].is_string());
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(healthz(&relay).await, 200);
}

async fn ws_status(url: &str, forwarded_for: Option<&str>) -> u16 {
    let mut req = url.into_client_request().unwrap();
    if let Some(ip) = forwarded_for {
        req.headers_mut()
            .insert("x-forwarded-for", ip.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => {
            // Keep it open: the test counts open connections.
            std::mem::forget(ws);
            101
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

/// Behind a trusted proxy each forwarded client has its own per-address limit (and the proxy is
/// not held to the TCP cap); from anyone else the forwarding header is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limits_use_the_forwarded_client_only_behind_trusted_proxies() {
    let redis = RedisServer::start();
    let sid = unique_sid("proxy");
    let flags = ["--max-conns-per-ip", "1", "--max-tcp-conns-per-ip", "2"];
    let proxied = Relay::start(
        &redis.url(),
        &[&flags[..], &["--trusted-proxies", "10.0.0.0/8,127.0.0.1"]].concat(),
    )
    .await;
    let url = proxied.ws_url(&format!("sid={sid}&role=A"));
    assert_eq!(ws_status(&url, Some("203.0.113.1")).await, 101);
    assert_eq!(
        ws_status(&url, Some("203.0.113.1")).await,
        429,
        "same client"
    );
    assert_eq!(ws_status(&url, Some("198.51.100.7, 10.1.1.1")).await, 101);
    assert_eq!(
        ws_status(&url, Some("203.0.113.2")).await,
        101,
        "more TCP than the cap: a proxy"
    );

    let direct = Relay::start(&redis.url(), &flags).await;
    let url = direct.ws_url(&format!("sid={sid}&role=A"));
    assert_eq!(ws_status(&url, Some("203.0.113.1")).await, 101);
    assert_eq!(
        ws_status(&url, Some("203.0.113.2")).await,
        429,
        "an untrusted peer cannot choose its address"
    );
}
