//! Fuzz target: one client text frame through `parse_client_frame`, and on success through
//! `dispatch` and `delivery_frame`, asserting the same invariants as `tests/it/props.rs`.
//!
//! The input bytes are read as lossy UTF-8: a valid UTF-8 input is used as-is (borrowed, not
//! copied), an invalid one has its bad sequences replaced by U+FFFD, as a WebSocket text frame
//! can only carry UTF-8. Each input runs under the default limits and under tiny ones (so the
//! fuzzer reaches every limit's edge with short inputs), on an unbound and a token-bound
//! connection.
#![no_main]

use std::fmt;

use chat_relay::dispatch::{dispatch, Action, ConnCtx, RolePolicy, StoreEnvelope};
use chat_relay::protocol::{
    delivery_frame, now_ms, parse_client_frame, ClientError, ErrorCode, EventKind, Inbound, Limits,
    StreamId, LLM_ROLE, SERVER_HEADER_FIELDS,
};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let tiny = Limits {
        max_frame_bytes: 512,
        max_text_chars: 8,
        max_depth: 4,
    };
    let roles = RolePolicy::new(&["A".into(), "B".into(), "user".into()]);
    let open = ConnCtx::new("room-1", Some("B".into()));
    let mut bound = ConnCtx::new("room.2_x", None);
    bound.bound_role = Some("A".into());
    for limits in [&Limits::default(), &tiny] {
        for ctx in [&open, &bound] {
            check(&text, limits, ctx, &roles);
        }
    }
});

fn check(text: &str, limits: &Limits, ctx: &ConnCtx, roles: &RolePolicy) {
    let parsed = parse_client_frame(text, limits);
    let depth = text_depth(text);
    let inb = match parsed {
        Err(refusal) => {
            check_error(&refusal.error);
            if let Some(cid) = &refusal.cid {
                assert!(!cid.is_empty() && cid.len() <= 128, "echoed cid {cid:?}");
            }
            let code = refusal.error.code;
            match depth {
                None => assert!(
                    matches!(
                        code,
                        ErrorCode::FrameTooLarge | ErrorCode::TooDeep | ErrorCode::BadJson
                    ),
                    "serde rejects the frame but the relay said {code:?}"
                ),
                Some(d) => {
                    let too_large = text.len() > limits.max_frame_bytes;
                    assert_eq!(code == ErrorCode::FrameTooLarge, too_large);
                    if !too_large {
                        assert_eq!(code == ErrorCode::TooDeep, d > limits.max_depth);
                        assert_ne!(code, ErrorCode::BadJson, "serde accepts the frame");
                    }
                }
            }
            return;
        }
        Ok(inb) => inb,
    };

    // Parse accepted: the text is valid JSON within every limit, and what was kept is what a
    // last-duplicate-wins reading says.
    assert!(text.len() <= limits.max_frame_bytes);
    let d = depth.expect("accepted a frame serde_json rejects");
    assert!(d <= limits.max_depth, "accepted depth {d}");
    let raw: Value = serde_json::from_str(text).expect("valid JSON");
    assert_eq!(raw["hd"]["event"], inb.event.name());
    assert_eq!(
        raw["hd"].get("role").and_then(Value::as_str),
        inb.role.as_deref()
    );
    assert_eq!(
        raw["hd"].get("cid").and_then(Value::as_str),
        inb.cid.as_deref()
    );
    if matches!(inb.event, EventKind::ChatMessage | EventKind::LlmRequest) {
        let t = inb.body["text"].as_str().expect("bd.text is a string");
        assert!(!t.is_empty() && t == t.trim());
        assert!(t.chars().count() <= limits.max_text_chars);
    }
    assert!(inb
        .cid
        .as_deref()
        .is_none_or(|c| !c.is_empty() && c.len() <= 128));
    for field in SERVER_HEADER_FIELDS.iter().chain(&["event", "role", "cid"]) {
        assert!(!inb.extra.contains_key(*field), "hd.{field} kept in extra");
    }

    let t0 = now_ms();
    let role = inb
        .role
        .clone()
        .or_else(|| ctx.bound_role.clone())
        .unwrap_or_else(|| ctx.default_role.clone());
    match dispatch(inb.clone(), ctx, roles) {
        Err(e) => {
            check_error(&e);
            if inb.role.as_deref() == Some(LLM_ROLE) {
                assert_eq!(e.code, ErrorCode::ReservedRole);
            }
        }
        Ok(Action::Store(StoreEnvelope {
            event,
            role: stored_role,
            cid,
            body,
            cancels,
        })) => {
            assert_ne!(inb.event, EventKind::ChatTyping, "typing is never stored");
            assert_eq!(event, inb.event.name());
            assert_eq!(stored_role, role);
            assert_eq!(cid, inb.cid);
            let v = check_envelope(&body, &inb, ctx, &role, t0);
            assert_eq!(v["hd"].get("cid").and_then(Value::as_str), cid.as_deref());
            if inb.event == EventKind::LlmCancel {
                let turn: StreamId = inb.body["turn_id"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .expect("llm.cancel has a turn id");
                assert_eq!(cancels, Some(turn));
            } else {
                assert_eq!(cancels, None);
            }
            let id = StreamId::new(t0, text.len() as u64);
            let delivered: Value = serde_json::from_str(&delivery_frame(id, &role, event, &body))
                .expect("delivery frame is JSON");
            assert_eq!(delivered["hd"]["id"], id.to_string());
            let mut without_id = delivered;
            if let Some(hd) = without_id["hd"].as_object_mut() {
                hd.remove("id");
            }
            assert_eq!(without_id, v, "delivery changes nothing but hd.id");
        }
        Ok(Action::Publish { frame }) => {
            assert_eq!(inb.event, EventKind::ChatTyping, "only typing is transient");
            let v = check_envelope(&frame, &inb, ctx, &role, t0);
            assert!(v["hd"].get("cid").is_none());
        }
    }
}

fn check_error(err: &ClientError) {
    assert!(
        !err.message.trim().is_empty(),
        "empty message for {:?}",
        err.code
    );
    let code = err.code.as_str();
    assert!(
        code.starts_with(|c: char| c.is_ascii_lowercase())
            && !code.ends_with('_')
            && !code.contains("__")
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "code {code:?} is not snake_case"
    );
}

fn check_envelope(frame: &str, inb: &Inbound, ctx: &ConnCtx, role: &str, t0: u64) -> Value {
    assert!(
        frame.starts_with(r#"{"hd":{"event":"#),
        "delivery fast path needs the prefix"
    );
    let v: Value = serde_json::from_str(frame).expect("stored body is JSON");
    assert_no_duplicate_keys(frame);
    let hd = v["hd"].as_object().expect("hd is an object");
    assert_eq!(hd["event"], inb.event.name());
    assert_eq!(hd["role"], role);
    assert_ne!(hd["role"], LLM_ROLE);
    assert_eq!(hd["sid"], ctx.sid.as_str());
    let ts = hd["ts"].as_u64().expect("hd.ts is a number");
    assert!(ts >= t0 && ts <= now_ms(), "hd.ts is not the relay's clock");
    for field in SERVER_HEADER_FIELDS {
        match *field {
            "sid" | "ts" => {}
            "sub" => assert_eq!(
                hd.get("sub"),
                ctx.sender.as_deref().map(Value::from).as_ref()
            ),
            other => assert!(!hd.contains_key(other), "client's hd.{other} survived"),
        }
    }
    for (k, val) in &inb.extra {
        assert_eq!(hd.get(k), Some(&normalised(val)), "extra hd.{k}");
    }
    for k in hd.keys() {
        assert!(
            ["event", "role", "cid"].contains(&k.as_str())
                || SERVER_HEADER_FIELDS.contains(&k.as_str())
                || inb.extra.contains_key(k),
            "hd.{k} came from nowhere"
        );
    }
    assert_eq!(v["bd"], normalised(&inb.body));
    v
}

/// One trip through the wire (floats may move one ULP on their first parse).
fn normalised(v: &Value) -> Value {
    serde_json::from_str(&v.to_string()).expect("re-parse")
}

/// Nesting depth of a JSON text (scalar 0, `[]`/`{}` 1), counting discarded duplicates too.
fn text_depth(text: &str) -> Option<usize> {
    serde_json::from_str::<Depth>(text).ok().map(|d| d.0)
}

struct Depth(usize);

impl<'de> Deserialize<'de> for Depth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DepthVisitor;
        impl<'de> Visitor<'de> for DepthVisitor {
            type Value = Depth;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Depth, E> {
                Ok(Depth(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Depth, E> {
                Ok(Depth(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Depth, E> {
                Ok(Depth(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Depth, E> {
                Ok(Depth(0))
            }
            fn visit_str<E>(self, _: &str) -> Result<Depth, E> {
                Ok(Depth(0))
            }
            fn visit_unit<E>(self) -> Result<Depth, E> {
                Ok(Depth(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Depth, A::Error> {
                let mut max = 0;
                while let Some(Depth(d)) = seq.next_element()? {
                    max = max.max(d);
                }
                Ok(Depth(max + 1))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Depth, A::Error> {
                let mut max = 0;
                while let Some((IgnoredAny, Depth(d))) = map.next_entry()? {
                    max = max.max(d);
                }
                Ok(Depth(max + 1))
            }
        }
        d.deserialize_any(DepthVisitor)
    }
}

/// The keys of one JSON object, duplicates included.
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(KeysVisitor)
    }
}

/// No duplicate key at the top of a relay-written envelope or in its `hd`.
fn assert_no_duplicate_keys(frame: &str) {
    #[derive(Deserialize)]
    struct Env {
        hd: Keys,
    }
    let top: Keys = serde_json::from_str(frame).expect("object");
    let env: Env = serde_json::from_str(frame).expect("envelope");
    for keys in [top.0, env.hd.0] {
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len(), "duplicate keys {keys:?}");
    }
}
