//! One client's connections: connect (its own node first, then the other), resend what is
//! unacked, send and receive until the connection ends, reconnect with `last_id`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_relay::protocol::StreamId;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{ConnRecord, Shared};
use crate::drive::{Ctx, Phase};
use crate::lock;

/// Longest wait for one WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How one connection ended.
#[derive(Debug, PartialEq, Eq)]
enum ConnEnd {
    Stopped,
    Closed(String),
}

pub async fn client_task(ctx: Arc<Ctx>, st: Shared, mut phase: watch::Receiver<Phase>) {
    let nodes = ctx.args.nodes.len();
    let (home, sid, role) = {
        let s = lock(&st);
        (s.home, s.sid.clone(), s.role)
    };
    let mut attempt: usize = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *phase.borrow() == Phase::Stop {
            return;
        }
        let node = (home + attempt) % nodes;
        let last = lock(&st).last;
        let mut url = format!(
            "{}/v1/session/chat?sid={sid}&role={role}",
            ctx.args.nodes[node].trim_end_matches('/')
        );
        if let Some(last) = last {
            url.push_str(&format!("&last_id={last}"));
        }
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await;
        let ws = match connected {
            Ok(Ok((ws, _))) => ws,
            other => {
                let why = match other {
                    Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                        format!("http {}", resp.status().as_u16())
                    }
                    Ok(Err(e)) => short_error(&e.to_string()),
                    Err(_) => "connect timeout".to_owned(),
                    Ok(Ok(_)) => "?".to_owned(),
                };
                {
                    let mut s = lock(&st);
                    s.connect_failures += 1;
                    *s.refusals.entry(why).or_default() += 1;
                }
                attempt += 1;
                if wait_or_stop(&mut phase, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let started = Instant::now();
        let end = connection(&ctx, &st, ws, node, last, &mut phase).await;
        if end == ConnEnd::Stopped {
            return;
        }
        if started.elapsed() >= Duration::from_secs(1) {
            // It worked for a while: reconnect at once, to its own node first.
            attempt = 0;
            backoff = Duration::from_millis(100);
        } else {
            // Refused at once (e.g. store unavailable at join): back off, try the other node.
            attempt += 1;
            if wait_or_stop(&mut phase, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn short_error(s: &str) -> String {
    if s.contains("Connection refused") {
        "connection refused".into()
    } else if s.contains("reset") {
        "connection reset".into()
    } else {
        s.chars().take(60).collect()
    }
}

/// Sleeps `d`; `true` when the phase became `Stop` meanwhile.
async fn wait_or_stop(phase: &mut watch::Receiver<Phase>, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        if *phase.borrow() == Phase::Stop {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            changed = phase.changed() => if changed.is_err() { return true },
        }
    }
}

async fn connection<S>(
    ctx: &Ctx,
    st: &Shared,
    ws: tokio_tungstenite::WebSocketStream<S>,
    node: usize,
    resume_from: Option<StreamId>,
    phase: &mut watch::Receiver<Phase>,
) -> ConnEnd
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let conn = {
        let mut s = lock(st);
        s.connects += 1;
        s.connected = true;
        s.turns.on_connect();
        s.cur = Some(ConnRecord {
            no: s.connects,
            node,
            resume_from,
            t_start: ctx.t(),
            ..Default::default()
        });
        s.connects
    };
    let end = run_connection(ctx, st, &mut sink, &mut stream, conn, phase).await;
    {
        let mut s = lock(st);
        s.connected = false;
        if let Some(mut rec) = s.cur.take() {
            rec.t_end = Some(ctx.t());
            rec.end = match &end {
                ConnEnd::Stopped => "stopped".into(),
                ConnEnd::Closed(why) => why.clone(),
            };
            s.conns.push(rec);
        }
    }
    end
}

async fn run_connection<Si, St>(
    ctx: &Ctx,
    st: &Shared,
    sink: &mut Si,
    stream: &mut St,
    conn: u64,
    phase: &mut watch::Receiver<Phase>,
) -> ConnEnd
where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
    St: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut conn_seen: HashSet<StreamId> = HashSet::new();
    // Resend everything unacked, same cids: the relay answers the original id if it was stored.
    let frames: Vec<String> = {
        let mut s = lock(st);
        let seqs: Vec<u64> = s.unacked.keys().copied().collect();
        seqs.into_iter()
            .filter_map(|q| s.mark_sent(q, conn))
            .collect()
    };
    for f in frames {
        if let Err(e) = sink.send(Message::Text(f.into())).await {
            return ConnEnd::Closed(format!("send: {}", short_error(&e.to_string())));
        }
    }
    let interval = Duration::from_millis(ctx.args.interval_ms.max(1));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut retry = tokio::time::interval(Duration::from_millis(100));
    retry.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let ack_timeout = Duration::from_millis(ctx.args.ack_timeout_ms.max(100));
    loop {
        let current = *phase.borrow();
        if current == Phase::Stop {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
            return ConnEnd::Stopped;
        }
        let sending = current == Phase::Send;
        let out: Vec<String> = tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let mut s = lock(st);
                    s.on_frame(ctx, conn, &mut conn_seen, text.as_str());
                    continue;
                }
                Some(Ok(Message::Close(cf))) => {
                    let why = cf.map_or_else(|| "close".to_owned(), |c| format!("close {} {}", u16::from(c.code), c.reason));
                    return ConnEnd::Closed(why);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return ConnEnd::Closed(format!("read: {}", short_error(&e.to_string()))),
                None => return ConnEnd::Closed("eof".into()),
            },
            _ = tick.tick(), if sending => {
                let mut s = lock(st);
                let seq = s.create(ctx);
                s.mark_sent(seq, conn).into_iter().collect()
            }
            _ = retry.tick() => {
                let now = Instant::now();
                let mut s = lock(st);
                let due: Vec<u64> = s
                    .unacked
                    .iter()
                    .filter(|(_, p)| match p.retry_at {
                        Some(t) => t <= now,
                        None => {
                            p.sent_conn != conn
                                || p.sent_at.is_none_or(|t| now.duration_since(t) >= ack_timeout)
                        }
                    })
                    .map(|(q, _)| *q)
                    .collect();
                due.into_iter().filter_map(|q| s.mark_sent(q, conn)).collect()
            }
            _ = phase.changed() => continue,
        };
        for f in out {
            if let Err(e) = sink.send(Message::Text(f.into())).await {
                return ConnEnd::Closed(format!("send: {}", short_error(&e.to_string())));
            }
        }
    }
}
