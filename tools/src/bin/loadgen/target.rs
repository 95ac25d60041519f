//! The server under test: where it listens, how a connection opens and becomes ready, and how
//! failed connects are counted and explained.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::observe::Frame;
use crate::Server;

pub type Ws = WebSocketStream<TcpStream>;

/// How long a connection may take to open and become ready.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens. Only loopback addresses, and no DNS: `localhost` means 127.0.0.1.
#[derive(Debug, Clone)]
pub struct Target {
    authority: String,
    addr: SocketAddr,
    pub server: Server,
}

impl Target {
    pub fn parse(url: &str, server: Server) -> Result<Self> {
        let u = relay_tools::loopback::parse(url)
            .context("--url must be ws://HOST:PORT on this machine")?;
        if u.scheme != "ws" {
            bail!("--url must be ws://HOST:PORT (loopback only, no TLS)");
        }
        if !u.rest.is_empty() && u.rest != "/" {
            bail!("--url must be ws://HOST:PORT without a path");
        }
        Ok(Self {
            authority: u.authority,
            addr: u.addr,
            server,
        })
    }

    fn room_url(&self, sid: &str) -> String {
        format!("ws://{}/v1/session/chat?sid={sid}&role=A", self.authority)
    }
}

/// The relay nodes under test (one per `--url`) with their PIDs at the same positions, and the
/// Redis processes behind them.
#[derive(Debug, Clone)]
pub struct Nodes {
    pub targets: Vec<Arc<Target>>,
    pub relay_pids: Vec<u32>,
    pub redis_pids: Vec<u32>,
}

impl Nodes {
    pub fn parse(
        urls: &[String],
        server: Server,
        relay_pids: &[u32],
        redis_pids: &[u32],
    ) -> Result<Self> {
        if urls.is_empty() {
            bail!("--url must name at least one node");
        }
        let targets = urls
            .iter()
            .map(|u| Target::parse(u.trim(), server).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        // Per-node figures pair the i-th PID with the i-th URL; a different count would charge
        // one node's CPU to another.
        if !relay_pids.is_empty() && relay_pids.len() != targets.len() {
            bail!(
                "--relay-pid lists {} PIDs for {} --url nodes: give one per node, in --url order",
                relay_pids.len(),
                targets.len()
            );
        }
        Ok(Self {
            targets,
            relay_pids: relay_pids.to_vec(),
            redis_pids: redis_pids.to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn url(&self, node: usize) -> String {
        format!("ws://{}", self.targets[node].authority)
    }

    pub fn relay_pid(&self, node: usize) -> Option<u32> {
        self.relay_pids.get(node).copied()
    }
}

/// The node that client `index` of room `room` connects to: round-robin within each room, so a
/// room with at least as many clients as nodes has members on every node (its messages cross
/// nodes), and shifted by the room so the nodes also share the load evenly overall.
pub fn node_of(room: usize, index: usize, nodes: usize) -> usize {
    (room + index) % nodes.max(1)
}

/// When a fresh connection counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// chat-relay: its own `session.join` arrived, so every later entry of the room reaches it.
    Join,
    /// reference-relay: a probe frame it sent came back, so it is subscribed to the room.
    Probe,
    /// reference-relay, idle: the handshake is done (a probe would fan out to the whole room).
    Handshake,
}

impl Ready {
    /// For connections that will exchange messages.
    pub fn for_traffic(server: Server) -> Self {
        match server {
            Server::Relay => Ready::Join,
            Server::Reference => Ready::Probe,
        }
    }

    /// For connections that only listen.
    pub fn for_idle(server: Server) -> Self {
        match server {
            Server::Relay => Ready::Join,
            Server::Reference => Ready::Handshake,
        }
    }
}

/// TCP connect (optionally from a given local address), then the WebSocket handshake.
async fn open(
    target: &Target,
    source: Option<IpAddr>,
    sid: &str,
    config: Option<WebSocketConfig>,
) -> Result<Ws> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("socket")?;
    if let Some(src) = source {
        socket
            .bind(SocketAddr::new(src, 0))
            .with_context(|| format!("bind {src}"))?;
    }
    let stream = socket.connect(target.addr).await.context("connect")?;
    // Small frames: without this, Nagle would add delayed-ACK latency to every measurement.
    stream.set_nodelay(true).context("nodelay")?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(target.room_url(sid), stream, config)
        .await
        .context("handshake")?;
    Ok(ws)
}

/// Reads until this connection's own `session.join`, the first stored entry a fresh one gets.
async fn await_join(ws: &mut Ws) -> Result<()> {
    while let Some(msg) = ws.next().await {
        match msg.context("read")? {
            Message::Text(text) => {
                if let Ok(frame) = serde_json::from_str::<Frame>(&text) {
                    if frame.hd.event == "session.join" {
                        return Ok(());
                    }
                }
            }
            Message::Close(close) => bail!("closed before session.join: {}", close_reason(close)),
            _ => {}
        }
    }
    bail!("connection ended before session.join")
}

/// Sends a probe frame and reads until it comes back (the reference relay echoes every frame
/// to the whole room, the sender included, once the socket is subscribed).
async fn await_probe(ws: &mut Ws, token: &str) -> Result<()> {
    let probe = json!({"hd": {"event": "loadgen.probe", "role": "A"}, "bd": {"probe": token}});
    ws.send(Message::text(probe.to_string()))
        .await
        .context("send probe")?;
    while let Some(msg) = ws.next().await {
        match msg.context("read")? {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if v["bd"]["probe"] == token {
                    return Ok(());
                }
            }
            Message::Close(close) => {
                bail!("closed before the probe came back: {}", close_reason(close))
            }
            _ => {}
        }
    }
    bail!("connection ended before the probe came back")
}

/// Opens a connection and waits until it is ready (`probe`: a token unique to it).
pub async fn open_ready(
    target: &Target,
    source: Option<IpAddr>,
    sid: &str,
    config: Option<WebSocketConfig>,
    ready: Ready,
    probe: &str,
) -> Result<Ws> {
    let attempt = async {
        let mut ws = open(target, source, sid, config).await?;
        match ready {
            Ready::Join => await_join(&mut ws).await?,
            Ready::Probe => await_probe(&mut ws, probe).await?,
            Ready::Handshake => {}
        }
        Ok(ws)
    };
    tokio::time::timeout(JOIN_TIMEOUT, attempt)
        .await
        .context("timed out opening the connection and waiting until it was ready")?
}

/// A short stable name for a connect failure, to count failures by cause.
pub fn failure_kind(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        let io_err = cause.downcast_ref::<io::Error>().or_else(|| {
            match cause.downcast_ref::<tungstenite::Error>() {
                Some(tungstenite::Error::Io(e)) => Some(e),
                _ => None,
            }
        });
        if let Some(e) = io_err {
            return match e.raw_os_error() {
                Some(24) => "emfile".into(),
                Some(99) => "eaddrnotavail".into(),
                Some(111) => "econnrefused".into(),
                Some(104) => "econnreset".into(),
                _ => format!("io_{:?}", e.kind()).to_lowercase(),
            };
        }
        if let Some(tungstenite::Error::Http(resp)) = cause.downcast_ref::<tungstenite::Error>() {
            return format!("http_{}", resp.status().as_u16());
        }
        if cause.is::<tokio::time::error::Elapsed>() {
            return "timeout".into();
        }
    }
    "other".into()
}

/// Counts failures by kind, keeps one example message each, and explains the common fixes.
#[derive(Debug, Default)]
pub struct Failures {
    by_kind: BTreeMap<String, (u64, String)>,
}

impl Failures {
    pub fn add(&mut self, kind: String, example: String) {
        self.by_kind.entry(kind).or_insert((0, example)).0 += 1;
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().map(|(n, _)| n).sum()
    }

    pub fn print(&self) {
        for (kind, (n, example)) in &self.by_kind {
            eprintln!("loadgen: {n} connection(s) failed: {kind}: {example}");
            match kind.as_str() {
                "emfile" => eprintln!(
                    "loadgen: too many open files (EMFILE): raise the limit with `ulimit -n` \
                     in the shell that starts loadgen and the relay (scripts/bench.sh does)"
                ),
                "eaddrnotavail" => eprintln!(
                    "loadgen: out of local ports: spread connections over more source \
                     addresses with --sources 127.0.0.1,127.0.0.2,..."
                ),
                _ => {}
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .by_kind
            .iter()
            .map(|(k, (n, _))| (k.clone(), json!(n)))
            .collect();
        Value::Object(map)
    }
}

pub fn close_reason(close: Option<tungstenite::protocol::CloseFrame>) -> String {
    match close {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason),
        None => "close (no code)".into(),
    }
}

/// Warns early when the open-file limit cannot hold the connections asked for.
pub fn check_open_files(connections: usize) {
    let Some(limit) = open_file_limit() else {
        return;
    };
    if (connections as u64) + 64 > limit {
        eprintln!(
            "loadgen: warning: {connections} connections but the open-file limit is {limit}; \
             raise it with `ulimit -n` first"
        );
    }
}

fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        let ok = |u: &str| Target::parse(u, Server::Relay).is_ok();
        assert!(ok("ws://127.0.0.1:3000"));
        assert!(ok("ws://localhost:3000/"));
        assert!(ok("ws://[::1]:3000"));
        assert!(!ok("ws://10.0.0.1:3000"));
        assert!(!ok("ws://example.com:3000"));
        assert!(!ok("wss://127.0.0.1:3000"));
        assert!(!ok("http://127.0.0.1:3000"));
        assert!(!ok("ws://127.0.0.1:3000/v1"));
    }

    #[test]
    fn nodes_pair_pids_with_urls() {
        let urls = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let two = urls(&["ws://127.0.0.1:3001", " ws://127.0.0.1:3002"]);
        let nodes = Nodes::parse(&two, Server::Relay, &[11, 12], &[21, 22, 23]).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes.url(1), "ws://127.0.0.1:3002");
        assert_eq!(nodes.relay_pid(1), Some(12));
        assert!(Nodes::parse(&two, Server::Relay, &[], &[]).is_ok());
        assert!(Nodes::parse(&two, Server::Relay, &[11], &[]).is_err());
        assert!(Nodes::parse(&[], Server::Relay, &[], &[]).is_err());
    }

    #[test]
    fn every_room_spans_every_node_and_nodes_share_evenly() {
        let (rooms, clients, nodes) = (50, 4, 3);
        let mut per_node = vec![0; nodes];
        for room in 0..rooms {
            let mut seen = vec![false; nodes];
            for index in 0..clients {
                let node = node_of(room, index, nodes);
                seen[node] = true;
                per_node[node] += 1;
            }
            assert!(seen.iter().all(|s| *s), "room {room} misses a node");
        }
        let (min, max) = (
            per_node.iter().min().unwrap(),
            per_node.iter().max().unwrap(),
        );
        assert!(max - min <= 1, "{per_node:?}");
        assert_eq!(node_of(7, 3, 1), 0);
    }
}
