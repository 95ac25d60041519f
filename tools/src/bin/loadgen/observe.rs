//! The receiving side of a run: what each connection observed (deliveries per sender, their
//! order and latency, answers to its own messages), from the frames it reads.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;

use chat_relay::protocol::StreamId;
use serde::Deserialize;

use crate::histogram::Histogram;
use crate::session::{Progress, SenderLink};

/// The parts of a frame loadgen looks at; everything else (the text too) is skipped.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(borrow)]
    pub hd: Header<'a>,
    #[serde(default)]
    pub bd: Option<Body>,
}

#[derive(Debug, Deserialize)]
pub struct Header<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub cid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Body {
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub sender: Option<u32>,
    #[serde(default)]
    pub t: Option<u64>,
}

/// Per (receiver, sender): which seqs arrived (a bitset), the highest one, how many distinct.
#[derive(Debug, Default, Clone)]
pub struct SeqTrack {
    seen: Vec<u64>,
    highest: Option<u64>,
    pub unique: u64,
}

/// What arrived for one sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    First,
    Late,
    Duplicate,
}

impl SeqTrack {
    pub fn arrive(&mut self, seq: u64) -> Arrival {
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        self.unique += 1;
        let late = self.highest.is_some_and(|h| seq < h);
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        if late {
            Arrival::Late
        } else {
            Arrival::First
        }
    }

    /// The seqs below `upto` that never arrived, as ranges: `0-3,17`.
    pub fn missing(&self, upto: u64) -> String {
        let has = |seq: u64| {
            self.seen
                .get((seq / 64) as usize)
                .is_some_and(|w| w & (1 << (seq % 64)) != 0)
        };
        let mut ranges: Vec<String> = Vec::new();
        let mut seq = 0;
        while seq < upto {
            if has(seq) {
                seq += 1;
                continue;
            }
            let first = seq;
            while seq < upto && !has(seq) {
                seq += 1;
            }
            ranges.push(if seq - 1 == first {
                first.to_string()
            } else {
                format!("{first}-{}", seq - 1)
            });
        }
        ranges.join(",")
    }
}

/// Everything one connection observed.
#[derive(Debug, Default)]
pub struct Observed {
    pub latency: Histogram,
    pub deliveries: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub id_regressions: u64,
    pub foreign: u64,
    pub per_sender: HashMap<u32, SeqTrack>,
    last_id: StreamId,
    pub errors: BTreeMap<String, u64>,
    pub dropped: Option<String>,
}

impl Observed {
    pub fn on_text(&mut self, text: &str, link: Option<&SenderLink>, progress: &Progress) {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            self.foreign += 1;
            return;
        };
        match frame.hd.event.as_ref() {
            "chat.message" => {
                let arrived = self.on_delivery(&frame, progress);
                // The reference relay has no ack: a sender's own copy answers its message.
                if let (Some(link), Some((sender, arrival))) = (link, arrived) {
                    if link.echo_acks && sender == link.id && arrival != Arrival::Duplicate {
                        link.answered(true, progress);
                    }
                }
            }
            "chat.ack" => {
                if let Some(link) = link {
                    link.answered(true, progress);
                } else {
                    progress.answered.fetch_add(1, Relaxed);
                }
            }
            "error" => {
                let code = frame.hd.code.as_deref().unwrap_or("unknown");
                *self.errors.entry(code.to_owned()).or_default() += 1;
                // Only answers to our messages (they carry our cid) free a window slot.
                if let (Some(link), Some(_)) = (link, &frame.hd.cid) {
                    link.answered(false, progress);
                }
            }
            _ => {} // joins, leaves, typing, probes: not part of the measurement
        }
    }

    /// Records one delivery; the sender and how its seq arrived, if the body is loadgen's.
    fn on_delivery(&mut self, frame: &Frame, progress: &Progress) -> Option<(u32, Arrival)> {
        let body = frame.bd.as_ref();
        let (Some(seq), Some(sender), Some(t)) = (
            body.and_then(|b| b.seq),
            body.and_then(|b| b.sender),
            body.and_then(|b| b.t),
        ) else {
            self.foreign += 1;
            return None;
        };
        self.deliveries += 1;
        self.latency
            .record(relay_tools::clock::epoch_us().saturating_sub(t));
        if let Some(id) = frame
            .hd
            .id
            .as_deref()
            .and_then(|s| s.parse::<StreamId>().ok())
        {
            if id <= self.last_id {
                self.id_regressions += 1;
            }
            self.last_id = self.last_id.max(id);
        }
        let arrival = self.per_sender.entry(sender).or_default().arrive(seq);
        match arrival {
            Arrival::First => {
                progress.unique_deliveries.fetch_add(1, Relaxed);
            }
            Arrival::Late => {
                self.reorders += 1;
                progress.unique_deliveries.fetch_add(1, Relaxed);
            }
            Arrival::Duplicate => self.duplicates += 1,
        }
        Some((sender, arrival))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        assert_eq!(t.arrive(0), Arrival::First);
        assert_eq!(t.arrive(2), Arrival::First);
        assert_eq!(t.arrive(1), Arrival::Late);
        assert_eq!(t.arrive(2), Arrival::Duplicate);
        assert_eq!(t.unique, 3);
        assert_eq!(t.arrive(5), Arrival::First);
        assert_eq!(t.missing(9), "3-4,6-8");
    }
}
