//! `chat-relay chat`: a terminal client.
//!
//! On a terminal: lines you type are sent as `chat.message`; room entries print as
//! `HH:MM:SS role: text`; LLM deltas grow in place; `/llm text`, `/cancel`, `/history N`,
//! `/quit`. In a pipe (stdin not a terminal): each input line is sent, every frame received is
//! printed as one JSON line, and the client exits once every sent line was acked (or refused).

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Relay WebSocket base URL.
    #[arg(long, env = "RELAY_URL", default_value = "ws://127.0.0.1:3000")]
    pub url: String,
    /// Room id.
    #[arg(long, default_value = "room001")]
    pub sid: String,
    /// Role to speak as (with --auth jwt the token decides).
    #[arg(long, default_value = "user")]
    pub role: String,
    /// Token for `--auth jwt` relays (sent as Authorization: Bearer).
    #[arg(long, env = "RELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Resume after this stream id (`0` = the whole history).
    #[arg(long)]
    pub last_id: Option<String>,
    /// In a pipe: how long to wait for outstanding acks after stdin ends, seconds.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
}

/// Runs the client until `/quit`, end of input (pipe), or the relay closes.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let mut url = format!("{base}/v1/session/chat?sid={}&role={}", args.sid, args.role);
    if let Some(last) = &args.last_id {
        url.push_str(&format!("&last_id={last}"));
    }
    let mut req = url.as_str().into_client_request().context("bad --url")?;
    if let Some(token) = &args.token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("token is not a valid header value")?,
        );
    }
    let (ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            bail!(
                "the relay refused the connection: HTTP {} {body}",
                resp.status()
            );
        }
        Err(err) => return Err(err).context("cannot connect"),
    };
    let (mut sink, mut stream) = ws.split();
    let interactive = std::io::stdin().is_terminal();
    let mut view = View::new(interactive);
    if interactive {
        view.note(&format!(
            "connected to {} as {} — /llm, /cancel, /history N, /quit",
            args.sid, args.role
        ));
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut pending: HashSet<String> = HashSet::new();
    // Acked ids not yet received from the room, and ids received before their ack.
    let mut unseen: HashSet<String> = HashSet::new();
    let mut delivered: HashSet<String> = HashSet::new();
    let mut next_cid = 0u64;
    let drain = tokio::time::sleep(Duration::from_secs(u64::MAX / 4));
    tokio::pin!(drain);
    loop {
        if !stdin_open && pending.is_empty() && unseen.is_empty() {
            break;
        }
        tokio::select! {
            line = lines.next_line(), if stdin_open => {
                let Some(line) = line? else {
                    stdin_open = false;
                    drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(args.drain_secs));
                    continue;
                };
                let line = line.trim().to_owned();
                if line.is_empty() {
                    continue;
                }
                next_cid += 1;
                let cid = format!("cli-{}-{next_cid}", std::process::id());
                let envelope = match command(&line, &args.role, &cid, view.current_turn.as_deref()) {
                    Command::Quit => break,
                    Command::History(n) => {
                        history(&args, n, &mut view).await;
                        continue;
                    }
                    Command::Note(msg) => {
                        view.note(&msg);
                        continue;
                    }
                    Command::Send(envelope) => envelope,
                };
                sink.send(Message::Text(envelope.to_string().into())).await.context("send failed")?;
                pending.insert(cid);
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    // A line is done once it is refused, or acked and seen back from the room.
                    let event = frame["hd"]["event"].as_str().unwrap_or_default();
                    if let Some(cid) = frame["hd"]["cid"].as_str() {
                        match event {
                            "error" => {
                                pending.remove(cid);
                            }
                            "chat.ack" if pending.remove(cid) => {
                                if let Some(id) = frame["hd"]["id"].as_str() {
                                    if !delivered.remove(id) {
                                        unseen.insert(id.to_owned());
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if let Some(id) = frame["hd"]["id"].as_str().filter(|_| event != "chat.ack") {
                        if !unseen.remove(id) {
                            delivered.insert(id.to_owned());
                        }
                    }
                    view.show(&frame, text.as_str());
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                    view.note(&format!("the relay closed the connection {why}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => bail!("connection lost: {err}"),
                None => break,
            },
            _ = &mut drain, if !stdin_open => {
                bail!("{} message(s) never acknowledged, {} never seen back", pending.len(), unseen.len());
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    Ok(())
}

enum Command {
    Send(Value),
    History(u64),
    Note(String),
    Quit,
}

fn command(line: &str, role: &str, cid: &str, current_turn: Option<&str>) -> Command {
    let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "/quit" | "/exit" => Command::Quit,
        "/llm" if !rest.trim().is_empty() => Command::Send(json!({
            "hd": {"event": "llm.request", "role": role, "cid": cid}, "bd": {"text": rest.trim()},
        })),
        "/llm" => Command::Note("usage: /llm your question".into()),
        "/cancel" => match current_turn {
            Some(turn) => Command::Send(json!({
                "hd": {"event": "llm.cancel", "role": role, "cid": cid}, "bd": {"turn_id": turn},
            })),
            None => Command::Note("no LLM turn to cancel".into()),
        },
        "/history" => Command::History(rest.trim().parse().unwrap_or(20).clamp(1, 1000)),
        _ if cmd.starts_with('/') => Command::Note(format!("unknown command {cmd}")),
        _ => Command::Send(json!({
            "hd": {"event": "chat.message", "role": role, "cid": cid}, "bd": {"text": line},
        })),
    }
}

/// `/history N` over the HTTP API of the same relay.
async fn history(args: &ChatArgs, n: u64, view: &mut View) {
    let http_base = args
        .url
        .trim_end_matches('/')
        .replacen("ws://", "http://", 1)
        .replacen("wss://", "https://", 1);
    let url = format!("{http_base}/v1/sessions/{}/messages?limit={n}", args.sid);
    let mut req = reqwest::Client::new().get(url);
    if let Some(token) = &args.token {
        req = req.bearer_auth(token);
    }
    match req.send().await {
        Ok(resp) => match resp.json::<Value>().await {
            Ok(body) => {
                for m in body["messages"].as_array().into_iter().flatten() {
                    view.show(m, &m.to_string());
                }
                if let Some(code) = body["code"].as_str() {
                    view.note(&format!("history refused: {code}"));
                }
            }
            Err(err) => view.note(&format!("history: bad response: {err}")),
        },
        Err(err) => view.note(&format!("history failed: {err}")),
    }
}

/// Prints frames for a person (terminal) or a script (JSON lines).
struct View {
    interactive: bool,
    /// The LLM turn being streamed, if any (its deltas are printed in place).
    current_turn: Option<String>,
    /// Where the printed text of that turn is: attempt and the seq of its last delta.
    turn_pos: (u64, i64),
    streaming: bool,
}

impl View {
    fn new(interactive: bool) -> Self {
        Self {
            interactive,
            current_turn: None,
            turn_pos: (0, -1),
            streaming: false,
        }
    }

    fn out(&self, s: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }

    fn note(&mut self, msg: &str) {
        if self.interactive {
            self.end_stream();
            self.out(&format!("-- {msg}\n"));
        } else {
            let _ = writeln!(std::io::stderr(), "{msg}");
        }
    }

    fn end_stream(&mut self) {
        if self.streaming {
            self.out("\n");
            self.streaming = false;
        }
    }

    fn show(&mut self, frame: &Value, raw: &str) {
        let hd = &frame["hd"];
        let event = hd["event"].as_str().unwrap_or_default();
        if let Some(turn) = hd["turn_id"].as_str() {
            if (event == "llm.start" || event == "llm.delta")
                && self.current_turn.as_deref() != Some(turn)
            {
                self.current_turn = Some(turn.to_owned());
                self.turn_pos = (0, -1);
                self.streaming = false;
            }
        }
        if !self.interactive {
            self.out(&format!("{raw}\n"));
            return;
        }
        let role = hd["role"].as_str().unwrap_or("?");
        let time = hd["ts"].as_u64().map(clock).unwrap_or_default();
        let text = frame["bd"]["text"].as_str().unwrap_or_default();
        match event {
            // llm.start sets the turn's text (the reply so far, up to delta bd.seq; a new attempt
            // starts over); each next-seq llm.delta appends.
            "llm.start" => {
                let bd = &frame["bd"];
                let attempt = bd["attempt"].as_u64().unwrap_or(1);
                let seq = bd["seq"].as_i64().unwrap_or(-1);
                let (had_attempt, had_seq) = self.turn_pos;
                if attempt < had_attempt || (attempt == had_attempt && seq <= had_seq) {
                    return;
                }
                self.end_stream();
                let again = if attempt > 1 { " (again)" } else { "" };
                self.out(&format!("{time} llm{again}: {text}"));
                self.turn_pos = (attempt, seq);
                self.streaming = true;
            }
            "llm.delta" => {
                let seq = frame["bd"]["seq"].as_i64().unwrap_or(-1);
                if seq != self.turn_pos.1 + 1 {
                    return;
                }
                self.turn_pos.1 = seq;
                if !self.streaming {
                    self.out(&format!("{time} llm: "));
                    self.streaming = true;
                }
                self.out(frame["bd"]["delta"].as_str().unwrap_or_default());
            }
            "llm.response" => {
                let reason = frame["bd"]["reason"].as_str().unwrap_or("stop");
                if self.streaming {
                    self.end_stream();
                } else {
                    self.out(&format!("{time} llm: {text}\n"));
                }
                if reason == "cancelled" {
                    self.out("   (cancelled)\n");
                }
                self.current_turn = None;
            }
            "llm.error" => {
                self.end_stream();
                self.out(&format!(
                    "{time} llm error: {}\n",
                    frame["bd"]["message"].as_str().unwrap_or_default()
                ));
                self.current_turn = None;
            }
            "chat.message" | "llm.request" => {
                self.end_stream();
                self.out(&format!("{time} {role}: {text}\n"));
            }
            "session.join" | "session.leave" => {
                self.end_stream();
                let verb = if event == "session.join" {
                    "joined"
                } else {
                    "left"
                };
                self.out(&format!("{time} * {role} {verb}\n"));
            }
            "error" => {
                self.end_stream();
                self.out(&format!(
                    "!! {} ({})\n",
                    frame["bd"]["message"].as_str().unwrap_or_default(),
                    hd["code"].as_str().unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
}

/// `HH:MM:SS` (UTC) of a ms timestamp.
fn clock(ms: u64) -> String {
    let s = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
