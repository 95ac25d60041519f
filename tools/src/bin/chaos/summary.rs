//! The run's summary as a reader sees it: figures, per-room deliveries, each check with its
//! verdict, samples of what went wrong, the result, then the whole report as one JSON line.

use serde_json::{json, Value};

use crate::client::Shared;
use crate::drive::Ctx;
use crate::lock;
use crate::mirror::Mirror;
use crate::report::Report;

impl Report {
    pub fn render(&self, ctx: &Ctx, clients: &[Shared], mirrors: &[Mirror]) -> String {
        let j = &self.json;
        let g = |k: &str| j.get(k).cloned().unwrap_or(Value::Null);
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("==== chaos run {} ====", ctx.run));
        line(format!(
            "clients {} in {} rooms over {} nodes",
            g("clients"),
            g("rooms"),
            g("nodes")
        ));
        line(format!(
            "messages: sent {}  acked {}  found in streams {} (entries {})  stored-but-unacked {}",
            g("sent"),
            g("acked"),
            g("stored"),
            g("stored_entries"),
            g("stored_unacked")
        ));
        line(format!(
            "          transmissions {}  resent {}  duplicate acks {}  errors {}",
            g("transmissions"),
            g("resent"),
            g("duplicate_acks"),
            g("errors")
        ));
        line(format!(
            "          store_unavailable answered for a transmission that was stored after all: {} (information)",
            g("store_unavailable_but_stored")
        ));
        line(format!(
            "delivered: total {}  per client min {} max {}",
            g("delivered_total"),
            g("delivered_min"),
            g("delivered_max")
        ));
        for (room, m) in mirrors.iter().enumerate() {
            let per: Vec<String> = clients
                .iter()
                .map(|c| lock(c))
                .filter(|s| s.room == room)
                .map(|s| format!("c{}:{}", s.idx, s.delivered))
                .collect();
            line(format!(
                "  {} stream {} entries; delivered {}",
                ctx.sid(room),
                m.entries.len(),
                per.join(" ")
            ));
        }
        line(format!(
            "connections: {} ({} reconnects), failed connects {} {}",
            g("connects"),
            g("reconnects"),
            g("connect_failures"),
            g("connect_refusals")
        ));
        line(format!(
            "LLM: turns asked {} (acked {})  answered exactly once {}  unanswered {}  answered twice {}  errors {}  reasons {}",
            g("llm_asked"),
            g("llm_asked_acked"),
            g("llm_answered_once"),
            g("llm_unanswered"),
            g("llm_answered_twice"),
            g("llm_error_codes"),
            g("llm_response_reasons")
        ));
        if let Some(p) = j.get("llm_group_pending") {
            line(format!("LLM group pending at the end: {p}"));
        }
        line("checks (each must be 0):".into());
        for k in [
            "acked_but_missing",
            "stored_twice",
            "cid_conflicts",
            "duplicates_in_connection",
            "duplicates_across_resume",
            "order_violations",
            "gaps",
            "phantom_deliveries",
            "resume_gap_frames",
            "llm_unanswered",
            "llm_answered_twice",
            "rejected",
            "never_acked",
            "clients_behind_tail",
        ] {
            let v = g(k);
            let bad = v.as_u64().unwrap_or(0) > 0;
            line(format!(
                "  {k:<26} {v}{}",
                if bad { "   <-- VIOLATION" } else { "" }
            ));
        }
        for d in &self.details {
            line(format!("  detail: {d}"));
        }
        line(if self.violations.is_empty() {
            "RESULT: PASS".to_owned()
        } else {
            format!("RESULT: FAIL ({})", self.violations.join(", "))
        });
        line(json!({"chaos": Value::Object(j.clone())}).to_string());
        out
    }
}
