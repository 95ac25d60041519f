//! What each client rebuilds of LLM replies in progress, by the rule the relay promises clients:
//! `llm.start` sets a turn's text to `bd.text` (up to delta `bd.seq`), each next-seq `llm.delta`
//! appends. Checked on every connection, across node kills, Redis restarts and workers killed
//! mid-turn (whose turns another worker answers as a new attempt): no delta out of sequence, no
//! start that moves the text back, and at the stored end the rebuilt text is the stored text —
//! or a prefix of it when the node's subscription was down as the turn ended (live deltas are
//! not durable; a turn still running then is re-based with a fresh start, a finished one is
//! completed by its stored end, which sets the text).

use std::collections::HashMap;

use serde_json::Value;

/// One turn as a client has it.
#[derive(Debug, Default)]
struct View {
    text: String,
    /// Attempt and seq of the last frame applied on the current connection; `None` until a start
    /// arrives on it (a new connection is caught up with a fresh start).
    pos: Option<(u64, i64)>,
}

/// A client's turns, and what broke the rule.
#[derive(Debug, Default)]
pub struct TurnViews {
    views: HashMap<String, View>,
    /// Finals checked against a text rebuilt on the same connection.
    pub rebuilt: u64,
    /// Of those, finals that completed a text cut short by a lost subscription.
    pub completed_by_final: u64,
    pub violations: Vec<String>,
}

impl TurnViews {
    /// A new connection: positions start over; each turn in progress begins with a start.
    pub fn on_connect(&mut self) {
        for v in self.views.values_mut() {
            v.pos = None;
        }
    }

    /// An `llm.start`, `llm.delta`, or a stored `llm.response` / `llm.error`.
    pub fn on_frame(&mut self, event: &str, frame: &Value) {
        let Some(turn) = frame["hd"]["turn_id"].as_str() else {
            return;
        };
        let bd = &frame["bd"];
        match event {
            "llm.start" => {
                let attempt = bd["attempt"].as_u64().unwrap_or(1);
                let seq = bd["seq"].as_i64().unwrap_or(-1);
                let view = self.views.entry(turn.to_owned()).or_default();
                if let Some((a, s)) = view.pos {
                    if attempt < a || (attempt == a && seq <= s) {
                        self.violations
                            .push(format!("{turn}: start ({attempt}, {seq}) after ({a}, {s})"));
                    }
                }
                view.pos = Some((attempt, seq));
                view.text = bd["text"].as_str().unwrap_or_default().to_owned();
            }
            "llm.delta" => {
                let seq = bd["seq"].as_i64().unwrap_or(-2);
                let view = self.views.entry(turn.to_owned()).or_default();
                match view.pos {
                    None => self.violations.push(format!(
                        "{turn}: delta {seq} before any start on this connection"
                    )),
                    Some((_, s)) if seq != s + 1 => self.violations.push(format!(
                        "{turn}: delta {seq} after {s} (a gap or a duplicate)"
                    )),
                    Some((a, _)) => {
                        view.pos = Some((a, seq));
                        view.text.push_str(bd["delta"].as_str().unwrap_or_default());
                    }
                }
            }
            "llm.response" | "llm.error" => {
                let Some(view) = self.views.remove(turn) else {
                    return;
                };
                if view.pos.is_none() {
                    return; // followed on an earlier connection; this one only replays the end
                }
                self.rebuilt += 1;
                let stored = bd["text"].as_str().unwrap_or_default();
                if view.text != stored && stored.starts_with(&view.text) {
                    self.completed_by_final += 1;
                } else if view.text != stored {
                    self.violations.push(format!(
                        "{turn}: rebuilt {:?} but stored {:?}",
                        view.text, stored
                    ));
                }
            }
            _ => {}
        }
    }
}
