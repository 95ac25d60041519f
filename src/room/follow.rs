//! Following one LLM turn through a [`Cursor`](super::Cursor): what an adapter that shows a
//! single reply (the REST chat API, the dialect WebSockets) sends its client, as plain text.
//!
//! Room members rebuild a reply by the rule "`llm.start` sets the turn's text to `bd.text`,
//! each next-seq `llm.delta` appends `bd.delta`". A client that can only append (a chat SSE
//! stream, a voice client's chunks) gets the same text as [`TurnStep::Text`] pieces whose
//! concatenation is exactly the reply: a start whose text extends what was sent yields the
//! missing part, the stored final entry yields whatever the deltas had not brought yet, and
//! only when a new attempt (a worker took a dead one's turn over) changes what was already
//! sent does the follower say [`TurnStep::Restart`] before sending the text again.

use serde_json::Value;

use super::Outbound;
use crate::protocol::{ErrorCode, StreamId};

/// What to tell the client next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TurnStep {
    /// Append this to the reply.
    Text(String),
    /// Forget the reply so far: a new attempt replaced it (the `Text` that follows starts over).
    Restart { attempt: u32 },
    /// The turn ended with its stored reply (`llm.response`).
    Done(Reply),
    /// The turn ended with its stored error (`llm.error`).
    Failed(Failure),
}

/// A stored `llm.response`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    /// The entry's id.
    pub(crate) id: StreamId,
    pub(crate) text: String,
    /// `stop`, `length`, `cancelled`, ...
    pub(crate) reason: String,
    /// `bd.usage` as stored (`prompt_tokens`, `completion_tokens`, `total_tokens`, `estimated`).
    pub(crate) usage: Value,
}

/// A stored `llm.error`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    pub(crate) id: StreamId,
    /// `hd.code`: `llm_unavailable`, `llm_timeout`, `rate_limited`, ...
    pub(crate) code: String,
    /// `bd.message`, short and human.
    pub(crate) message: String,
    /// `bd.usage` when the turn spent tokens.
    pub(crate) usage: Option<Value>,
}

impl Failure {
    /// The stored `hd.code` in the error catalogue (`llm_unavailable` for a code it lacks).
    pub(crate) fn error_code(&self) -> ErrorCode {
        match self.code.as_str() {
            "llm_timeout" => ErrorCode::LlmTimeout,
            "llm_rate_limited" => ErrorCode::LlmRateLimited,
            "llm_rejected" => ErrorCode::LlmRejected,
            "llm_bad_response" => ErrorCode::LlmBadResponse,
            "rate_limited" => ErrorCode::RateLimited,
            _ => ErrorCode::LlmUnavailable,
        }
    }
}

/// A stored `bd.usage` as the chat APIs show it: `prompt_tokens`, `completion_tokens` and
/// `total_tokens` always present (0 when the turn stored none), and `estimated` when stored.
pub(crate) fn usage_counts(usage: &Value) -> Value {
    let mut out = serde_json::json!({
        "prompt_tokens": usage["prompt_tokens"].as_u64().unwrap_or(0),
        "completion_tokens": usage["completion_tokens"].as_u64().unwrap_or(0),
        "total_tokens": usage["total_tokens"].as_u64().unwrap_or(0),
    });
    if let Some(estimated) = usage.get("estimated") {
        out["estimated"] = estimated.clone();
    }
    out
}

/// The state of one turn as followed so far.
#[derive(Debug, Clone)]
pub(crate) struct TurnFollow {
    turn: StreamId,
    /// The attempt whose frames are being followed (0: none seen yet).
    attempt: u32,
    /// The seq of the next delta of that attempt.
    next_seq: i64,
    /// The text sent to the client since the last restart.
    sent: String,
}

impl TurnFollow {
    /// Follows the turn answering the request stored as `turn`.
    pub(crate) fn new(turn: StreamId) -> Self {
        Self {
            turn,
            attempt: 0,
            next_seq: 0,
            sent: String::new(),
        }
    }

    /// What a frame from the cursor means for this turn (nothing, for other frames).
    pub(crate) fn on(&mut self, out: &Outbound) -> Vec<TurnStep> {
        if let Some(mark) = out.turn {
            if mark.turn != self.turn {
                return Vec::new();
            }
            let Ok(frame) = serde_json::from_str::<Value>(out.frame.as_str()) else {
                return Vec::new();
            };
            let bd = &frame["bd"];
            return if mark.start {
                let text = bd["text"].as_str().unwrap_or("");
                self.on_start(mark.attempt, mark.seq, text)
            } else {
                let delta = bd["delta"].as_str().unwrap_or("");
                self.on_delta(mark.attempt, mark.seq, delta)
            };
        }
        let Some(id) = out.id else {
            return Vec::new();
        };
        let frame = out.frame.as_str();
        // Cheap test first: most entries of a busy room are not this turn's end.
        if !frame.contains("\"llm.") {
            return Vec::new();
        }
        let Ok(frame) = serde_json::from_str::<Value>(frame) else {
            return Vec::new();
        };
        let (hd, bd) = (&frame["hd"], &frame["bd"]);
        if hd["turn_id"].as_str() != Some(self.turn.to_string().as_str()) {
            return Vec::new();
        }
        match hd["event"].as_str() {
            Some("llm.response") => {
                let text = bd["text"].as_str().unwrap_or("").to_owned();
                let mut steps = self.set_text(&text);
                steps.push(TurnStep::Done(Reply {
                    id,
                    text,
                    reason: bd["reason"].as_str().unwrap_or("stop").to_owned(),
                    usage: bd["usage"].clone(),
                }));
                steps
            }
            Some("llm.error") => vec![TurnStep::Failed(Failure {
                id,
                code: hd["code"].as_str().unwrap_or("llm_unavailable").to_owned(),
                message: bd["message"]
                    .as_str()
                    .unwrap_or("the AI could not answer")
                    .to_owned(),
                usage: bd.get("usage").filter(|u| !u.is_null()).cloned(),
            })],
            _ => Vec::new(),
        }
    }

    fn on_start(&mut self, attempt: u32, seq: i64, text: &str) -> Vec<TurnStep> {
        if attempt < self.attempt || (attempt == self.attempt && seq < self.next_seq) {
            return Vec::new(); // an older attempt, or a catch-up behind what was sent
        }
        self.attempt = attempt;
        self.next_seq = seq + 1;
        self.set_text(text)
    }

    fn on_delta(&mut self, attempt: u32, seq: i64, delta: &str) -> Vec<TurnStep> {
        // The first attempt's first delta also counts when its `llm.start` was missed.
        if self.attempt == 0 && attempt == 1 && seq == 0 {
            self.attempt = 1;
        }
        if attempt != self.attempt || seq != self.next_seq {
            return Vec::new();
        }
        self.next_seq += 1;
        self.sent.push_str(delta);
        if delta.is_empty() {
            return Vec::new();
        }
        vec![TurnStep::Text(delta.to_owned())]
    }

    /// Brings the client's text to `text`: the missing part, or a restart and all of it.
    fn set_text(&mut self, text: &str) -> Vec<TurnStep> {
        let mut steps = Vec::new();
        match text.strip_prefix(self.sent.as_str()) {
            Some(rest) => {
                if !rest.is_empty() {
                    steps.push(TurnStep::Text(rest.to_owned()));
                }
            }
            None => {
                steps.push(TurnStep::Restart {
                    attempt: self.attempt,
                });
                if !text.is_empty() {
                    steps.push(TurnStep::Text(text.to_owned()));
                }
            }
        }
        self.sent = text.to_owned();
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TurnMark;
    use serde_json::json;

    const TURN: StreamId = StreamId { ms: 100, seq: 0 };

    fn live(attempt: u32, seq: i64, start: bool, bd: Value) -> Outbound {
        Outbound {
            id: None,
            turn: Some(TurnMark {
                turn: TURN,
                attempt,
                seq,
                start,
            }),
            frame: json!({"hd": {"turn_id": TURN.to_string()}, "bd": bd})
                .to_string()
                .into(),
        }
    }

    fn start(attempt: u32, seq: i64, text: &str) -> Outbound {
        live(
            attempt,
            seq,
            true,
            json!({"text": text, "seq": seq, "attempt": attempt}),
        )
    }

    fn delta(attempt: u32, seq: i64, text: &str) -> Outbound {
        live(attempt, seq, false, json!({"delta": text, "seq": seq}))
    }

    fn stored(event: &str, hd: Value, bd: Value) -> Outbound {
        let mut hd = hd;
        hd["event"] = json!(event);
        hd["turn_id"] = json!(TURN.to_string());
        Outbound {
            id: Some(StreamId::new(200, 0)),
            turn: None,
            frame: json!({"hd": hd, "bd": bd}).to_string().into(),
        }
    }

    /// The client's view: the text after the last restart, and how the turn ended.
    fn run(frames: &[Outbound]) -> (String, Vec<TurnStep>) {
        let mut f = TurnFollow::new(TURN);
        let mut text = String::new();
        let mut all = Vec::new();
        for out in frames {
            for step in f.on(out) {
                match &step {
                    TurnStep::Text(t) => text.push_str(t),
                    TurnStep::Restart { .. } => text.clear(),
                    _ => {}
                }
                all.push(step);
            }
        }
        (text, all)
    }

    fn response(text: &str) -> Outbound {
        stored(
            "llm.response",
            json!({}),
            json!({"text": text, "reason": "stop", "usage": {"total_tokens": 3}}),
        )
    }

    #[test]
    fn deltas_in_order_make_the_reply() {
        let (text, steps) = run(&[
            start(1, -1, ""),
            delta(1, 0, "Hel"),
            delta(1, 1, "lo"),
            delta(1, 1, "lo"), // a duplicate
            response("Hello"),
        ]);
        assert_eq!(text, "Hello");
        assert!(
            matches!(steps.last(), Some(TurnStep::Done(r)) if r.text == "Hello" && r.usage["total_tokens"] == 3)
        );
        assert!(!steps.iter().any(|s| matches!(s, TurnStep::Restart { .. })));
    }

    #[test]
    fn missing_deltas_come_with_the_final_entry() {
        let (text, _) = run(&[
            start(1, -1, ""),
            delta(1, 0, "Hel"),
            delta(1, 2, "!"),
            response("Hello!"),
        ]);
        assert_eq!(text, "Hello!");
    }

    #[test]
    fn a_catch_up_start_adds_what_was_missed() {
        let (text, steps) = run(&[
            start(1, 1, "Hello"),
            delta(1, 2, " you"),
            response("Hello you"),
        ]);
        assert_eq!(text, "Hello you");
        assert_eq!(steps[0], TurnStep::Text("Hello".into()));
    }

    #[test]
    fn a_takeover_that_changes_the_text_restarts_it() {
        let (text, steps) = run(&[
            start(1, -1, ""),
            delta(1, 0, "Hel"),
            start(2, -1, ""),
            delta(1, 1, "lo"), // the dead attempt's late delta
            delta(2, 0, "Hi"),
            response("Hi"),
        ]);
        assert_eq!(text, "Hi");
        assert!(steps.contains(&TurnStep::Restart { attempt: 2 }));
    }

    #[test]
    fn errors_and_other_turns() {
        let other = Outbound {
            id: Some(StreamId::new(150, 0)),
            turn: None,
            frame: json!({"hd": {"event": "llm.response", "turn_id": "1-0"}, "bd": {"text": "x"}})
                .to_string()
                .into(),
        };
        let (_, steps) = run(&[
            other,
            stored(
                "llm.error",
                json!({"code": "llm_unavailable"}),
                json!({"message": "the AI service is temporarily unavailable"}),
            ),
        ]);
        assert_eq!(steps.len(), 1);
        let TurnStep::Failed(f) = &steps[0] else {
            panic!("{steps:?}")
        };
        assert_eq!(f.code, "llm_unavailable");
        assert_eq!(f.usage, None);
    }
}
