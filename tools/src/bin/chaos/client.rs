//! One client's state: the messages it created and their acks, and every stored entry it
//! received (per connection and overall), from which the checks are computed.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_relay::protocol::StreamId;
use serde_json::{json, Value};

use crate::drive::Ctx;
use crate::SAMPLES;

/// A retryable refusal is retried after this long.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A message the client created, waiting for its ack.
#[derive(Debug)]
pub struct Pending {
    pub cid: String,
    pub frame: String,
    /// Transmissions so far.
    pub sends: u32,
    /// When and on which connection it was last sent.
    pub sent_at: Option<Instant>,
    pub sent_conn: u64,
    /// A retryable refusal: send again at this time (on the current connection).
    pub retry_at: Option<Instant>,
    /// Epoch ms when the first transmission, alone in flight, was answered `store_unavailable`.
    pub unavailable_at: Option<u64>,
}

/// One connection's life, for the report.
#[derive(Debug, Clone, Default)]
pub struct ConnRecord {
    pub no: u64,
    pub node: usize,
    pub resume_from: Option<StreamId>,
    pub t_start: f64,
    pub t_end: Option<f64>,
    pub first: Option<StreamId>,
    pub last: Option<StreamId>,
    pub delivered: u64,
    pub end: String,
}

#[derive(Debug, Default)]
pub struct ClientState {
    pub idx: usize,
    pub room: usize,
    pub sid: String,
    pub role: &'static str,
    pub home: usize,
    pub llm_sender: bool,

    // Sending.
    pub next_seq: u64,
    pub unacked: BTreeMap<u64, Pending>,
    pub acked: BTreeMap<u64, StreamId>,
    pub llm_seqs: HashSet<u64>,
    pub rejected: Vec<(u64, String)>,
    pub transmissions: u64,
    pub resent: u64,
    pub dup_acks: u64,
    pub cid_conflicts: Vec<String>,
    /// Refused with `store_unavailable` ("nothing was stored") yet stored by that transmission.
    pub unavailable_but_stored: Vec<String>,

    // Receiving.
    pub seen: HashSet<StreamId>,
    pub first: Option<StreamId>,
    pub last: Option<StreamId>,
    pub delivered: u64,
    pub events: BTreeMap<String, u64>,
    pub dup_in_conn: Vec<(u64, StreamId)>,
    pub dup_across: Vec<(u64, StreamId)>,
    pub order: Vec<(u64, StreamId, StreamId)>,
    pub resume_gaps: Vec<Value>,
    pub errors: BTreeMap<String, u64>,
    pub llm_starts: u64,
    pub llm_deltas: u64,
    pub turns: crate::turns::TurnViews,
    pub bad_frames: u64,

    // Connections.
    pub connected: bool,
    pub connects: u64,
    pub connect_failures: u64,
    pub refusals: BTreeMap<String, u64>,
    pub conns: Vec<ConnRecord>,
    pub cur: Option<ConnRecord>,
}

impl ClientState {
    pub fn cid(run: &str, idx: usize, seq: u64) -> String {
        format!("{run}-c{idx}-s{seq}")
    }

    /// A new message: its frame, kept for resends.
    pub fn create(&mut self, ctx: &Ctx) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        let cid = Self::cid(&ctx.run, self.idx, seq);
        let llm = self.llm_sender && ctx.args.llm_every > 0 && seq % ctx.args.llm_every == 0;
        let text = if llm {
            format!(
                "@llm chaos {} client {} seq {seq}: please answer",
                ctx.run, self.idx
            )
        } else {
            format!("chaos {} client {} seq {seq}", ctx.run, self.idx)
        };
        if llm {
            self.llm_seqs.insert(seq);
        }
        let frame = json!({
            "hd": {"event": "chat.message", "role": self.role, "cid": cid},
            "bd": {"text": text, "client": self.idx, "seq": seq},
        })
        .to_string();
        self.unacked.insert(
            seq,
            Pending {
                cid,
                frame,
                sends: 0,
                sent_at: None,
                sent_conn: 0,
                retry_at: None,
                unavailable_at: None,
            },
        );
        seq
    }

    /// Marks a message as sent now on connection `conn`; returns its frame.
    pub fn mark_sent(&mut self, seq: u64, conn: u64) -> Option<String> {
        let p = self.unacked.get_mut(&seq)?;
        if p.sends > 0 {
            self.resent += 1;
        }
        p.sends += 1;
        p.sent_at = Some(Instant::now());
        p.sent_conn = conn;
        p.retry_at = None;
        self.transmissions += 1;
        Some(p.frame.clone())
    }

    fn seq_of(&self, run: &str, cid: &str) -> Option<u64> {
        let prefix = format!("{run}-c{}-s", self.idx);
        cid.strip_prefix(&prefix)?.parse().ok()
    }

    /// One text frame from the relay.
    pub fn on_frame(
        &mut self,
        ctx: &Ctx,
        conn: u64,
        conn_seen: &mut HashSet<StreamId>,
        text: &str,
    ) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            self.bad_frames += 1;
            return;
        };
        let hd = &v["hd"];
        let event = hd["event"].as_str().unwrap_or("").to_owned();
        if event == "chat.ack" {
            let cid = hd["cid"].as_str().unwrap_or("");
            let id = hd["id"].as_str().and_then(|s| s.parse::<StreamId>().ok());
            self.on_ack(ctx, cid, id);
            return;
        }
        if let Some(raw) = hd["id"].as_str() {
            let Ok(id) = raw.parse::<StreamId>() else {
                self.bad_frames += 1;
                return;
            };
            if !conn_seen.insert(id) {
                if self.dup_in_conn.len() < SAMPLES * 10 {
                    self.dup_in_conn.push((conn, id));
                }
                return;
            }
            if self.seen.contains(&id) {
                if self.dup_across.len() < SAMPLES * 10 {
                    self.dup_across.push((conn, id));
                }
                return;
            }
            if let Some(last) = self.last {
                if id < last && self.order.len() < SAMPLES * 10 {
                    self.order.push((conn, last, id));
                }
            }
            self.turns.on_frame(&event, &v);
            self.seen.insert(id);
            self.first.get_or_insert(id);
            self.last = Some(self.last.map_or(id, |l| l.max(id)));
            self.delivered += 1;
            *self.events.entry(event).or_default() += 1;
            if let Some(cur) = self.cur.as_mut() {
                cur.first.get_or_insert(id);
                cur.last = Some(id);
                cur.delivered += 1;
            }
            return;
        }
        match event.as_str() {
            "error" => {
                let code = hd["code"].as_str().unwrap_or("?").to_owned();
                *self.errors.entry(code.clone()).or_default() += 1;
                let retryable = v["bd"]["retryable"].as_bool().unwrap_or(false);
                let seq = hd["cid"].as_str().and_then(|c| self.seq_of(&ctx.run, c));
                if let Some(seq) = seq {
                    if retryable || code == "store_unavailable" {
                        if let Some(p) = self.unacked.get_mut(&seq) {
                            p.retry_at = Some(Instant::now() + RETRY_AFTER);
                            if code == "store_unavailable" && p.sends == 1 {
                                p.unavailable_at
                                    .get_or_insert(relay_tools::clock::epoch_ms());
                            }
                        }
                    } else if self.unacked.remove(&seq).is_some() {
                        self.rejected.push((seq, code));
                    }
                }
            }
            "resume_gap" => self.resume_gaps.push(v.clone()),
            "llm.start" => {
                self.llm_starts += 1;
                self.turns.on_frame(&event, &v);
            }
            "llm.delta" => {
                self.llm_deltas += 1;
                self.turns.on_frame(&event, &v);
            }
            _ => {}
        }
    }

    fn on_ack(&mut self, ctx: &Ctx, cid: &str, id: Option<StreamId>) {
        let (Some(seq), Some(id)) = (self.seq_of(&ctx.run, cid), id) else {
            *self.errors.entry("bad_ack".into()).or_default() += 1;
            return;
        };
        if let Some(p) = self.unacked.remove(&seq) {
            // The entry's id is Redis's clock at the XADD (same host): older than the refusal
            // means the refused transmission itself was stored.
            if let Some(at) = p.unavailable_at {
                if id.ms < at {
                    self.unavailable_but_stored.push(format!(
                        "{cid}: store_unavailable at {at} ms, stored as {id}"
                    ));
                }
            }
            self.acked.insert(seq, id);
        } else if let Some(prev) = self.acked.get(&seq) {
            if *prev == id {
                self.dup_acks += 1;
            } else {
                self.cid_conflicts
                    .push(format!("{cid}: acked as {prev} and as {id}"));
            }
        } else {
            // An ack for a message refused for good earlier: it was stored after all.
            *self.errors.entry("ack_after_refusal".into()).or_default() += 1;
            self.acked.insert(seq, id);
        }
    }
}

pub type Shared = Arc<Mutex<ClientState>>;
