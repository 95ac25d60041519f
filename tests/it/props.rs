//! Property tests and a seeded corpus for the envelope parser and the dispatcher. Pure
//! functions only: no Redis, no sockets, so this module runs in a few seconds.
//!
//! # Why parsing is linear in the frame size
//!
//! `parse_client_frame` does, in order:
//! 1. a length check (`O(1)`);
//! 2. a depth pre-scan: one pass over the bytes with a counter, skipping string contents, that
//!    stops as soon as the nesting exceeds `max_depth` (`O(n)`, no recursion, no backtracking);
//! 3. `serde_json::from_str`, a single-pass recursive-descent parser. Thanks to step 2 its
//!    recursion is bounded by `max_depth`, so it is `O(n)` time and `O(max_depth)` stack; map
//!    inserts hash with SipHash (`RandomState`), so colliding keys cannot be forced;
//! 4. a handful of `Map::remove`s on `hd` (`O(1)` each) and one `trim` + `chars().count()`
//!    over `bd.text` (`O(n)`).
//!
//! `dispatch` then serialises the already-parsed values once (`O(n)`), and `delivery_frame`
//! splices the id into that string (`O(n)`). Nothing is quadratic. The project forbids timed
//! assertions, so the tests below only check that worst-case shapes at the maximum frame size
//! (32 000 and 64 Ki `[`, a 60 KB string, a 60 KB string of escapes, a 30 000-element array)
//! get the right answer; a super-linear regression would show up as a slow test run, not as a
//! flaky assertion.

use chat_relay::dispatch::{dispatch, Action, ConnCtx, RolePolicy, StoreEnvelope};
use chat_relay::protocol::{
    delivery_frame, now_ms, parse_client_frame, ClientError, ErrorCode, EventKind, Inbound, Limits,
    StreamId, LLM_ROLE, SERVER_HEADER_FIELDS,
};
use proptest::prelude::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------------

fn policy() -> RolePolicy {
    RolePolicy::new(&["A".into(), "B".into(), "user".into()])
}

fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('_')
        && !s.contains("__")
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_error(err: &ClientError, input: &str) {
    assert!(
        !err.message.trim().is_empty(),
        "empty message for {:?} on {input:.200?}",
        err.code
    );
    assert!(
        is_snake_case(err.code.as_str()),
        "code {:?} is not snake_case",
        err.code.as_str()
    );
}

/// Nesting depth of a JSON text as the relay counts it: a scalar is 0, `[]` and `{}` are 1.
/// Measured while parsing, so a duplicate key's discarded value counts too (a `Value` would
/// only show the kept one). `None` when serde_json rejects the text.
fn text_depth(text: &str) -> Option<usize> {
    serde_json::from_str::<Depth>(text).ok().map(|d| d.0)
}

struct Depth(usize);

impl<'de> Deserialize<'de> for Depth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DepthVisitor;
        impl<'de> Visitor<'de> for DepthVisitor {
            type Value = Depth;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
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

/// Serialise then parse again: what any JSON value looks like after one trip through the wire.
/// (Without serde_json's `float_roundtrip` feature a float may move by one ULP on its first
/// parse; after that the trip is stable, so compare normalised values.)
fn normalised(v: &Value) -> Value {
    serde_json::from_str(&v.to_string()).unwrap()
}

/// Parse, and cross-check the answer against serde_json's own view of the text:
/// - text serde rejects → `frame_too_large`, `too_deep` or `bad_json`;
/// - text serde accepts → `frame_too_large` iff too long, else `too_deep` iff nested deeper than
///   the limit, else never `bad_json`.
fn parse_checked(text: &str, limits: &Limits) -> Result<Inbound, ClientError> {
    let got = parse_client_frame(text, limits);
    let oracle = text_depth(text);
    match &got {
        Err(refusal) => {
            check_error(&refusal.error, text);
            let code = refusal.error.code;
            if let Some(cid) = &refusal.cid {
                assert!(!cid.is_empty() && cid.len() <= 128, "echoed cid {cid:?}");
            }
            match oracle {
                None => assert!(
                    matches!(
                        code,
                        ErrorCode::FrameTooLarge | ErrorCode::TooDeep | ErrorCode::BadJson
                    ),
                    "serde rejects {text:.200?} but the relay said {code:?}"
                ),
                Some(depth) => {
                    let too_large = text.len() > limits.max_frame_bytes;
                    assert_eq!(
                        code == ErrorCode::FrameTooLarge,
                        too_large,
                        "{text:.200?} {limits:?}"
                    );
                    if !too_large {
                        let too_deep = depth > limits.max_depth;
                        assert_eq!(
                            code == ErrorCode::TooDeep,
                            too_deep,
                            "{text:.200?} {limits:?}"
                        );
                        assert_ne!(code, ErrorCode::BadJson, "serde accepts {text:.200?}");
                    }
                }
            }
        }
        Ok(inb) => {
            assert!(text.len() <= limits.max_frame_bytes);
            let depth = oracle.unwrap_or_else(|| panic!("accepted invalid JSON {text:.200?}"));
            assert!(
                depth <= limits.max_depth,
                "accepted too deep {text:.200?} {limits:?}"
            );
            // what was kept is what serde_json's last-duplicate-wins reading says
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(v["hd"]["event"], inb.event.name());
            assert_eq!(
                v["hd"].get("role").and_then(Value::as_str),
                inb.role.as_deref()
            );
            assert_eq!(
                v["hd"].get("cid").and_then(Value::as_str),
                inb.cid.as_deref()
            );
        }
    }
    got.map_err(|r| r.error)
}

/// The keys of a JSON object, in order, duplicates included (serde_json's `Value` would keep
/// only the last of a duplicate, hiding it).
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
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

/// `{"hd":{...},...}` as written by the relay has no duplicate key at the top or in `hd`, so a
/// consumer that keeps the first duplicate (unlike serde_json) reads the same envelope.
fn assert_no_duplicate_keys(frame: &str) {
    #[derive(Deserialize)]
    struct Env {
        hd: Keys,
    }
    let top: Keys = serde_json::from_str(frame).unwrap();
    let env: Env = serde_json::from_str(frame).unwrap();
    for keys in [top.0, env.hd.0] {
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            keys.len(),
            "duplicate keys {keys:?} in {frame:.200}"
        );
    }
}

/// The role dispatch must settle on for `inb` on `ctx`, if it accepts it.
fn expected_role(inb: &Inbound, ctx: &ConnCtx) -> String {
    inb.role
        .clone()
        .or_else(|| ctx.bound_role.clone())
        .unwrap_or_else(|| ctx.default_role.clone())
}

/// Checks a stored body or a transient frame against what was validated.
fn check_envelope(frame: &str, inb: &Inbound, ctx: &ConnCtx, role: &str, t0: u64) -> Value {
    assert!(
        frame.starts_with(r#"{"hd":{"event":"#),
        "delivery fast path needs the prefix: {frame:.200}"
    );
    let v: Value = serde_json::from_str(frame).unwrap();
    assert_no_duplicate_keys(frame);
    let hd = v["hd"].as_object().unwrap();
    assert_eq!(hd["event"], inb.event.name());
    assert_eq!(hd["role"], role);
    assert_ne!(hd["role"], LLM_ROLE);
    assert_eq!(
        hd["sid"],
        ctx.sid.as_str(),
        "hd.sid must be the connection's"
    );
    let ts = hd["ts"].as_u64().unwrap();
    assert!(
        ts >= t0 && ts <= now_ms(),
        "hd.ts {ts} is not the relay's clock"
    );
    assert!(
        !hd.contains_key("id"),
        "no hd.id before delivery: {frame:.200}"
    );
    for field in SERVER_HEADER_FIELDS {
        match *field {
            "sid" | "ts" => {}
            "sub" => assert_eq!(
                hd.get("sub"),
                ctx.sender.as_deref().map(Value::from).as_ref(),
                "hd.sub is the token's subject or absent"
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
    assert_eq!(v["bd"], normalised(&inb.body.to_value()));
    v
}

/// Runs `text` through parse → dispatch → delivery_frame and checks every invariant.
/// Returns the parse result for callers that assert a specific outcome.
fn pipeline(text: &str, limits: &Limits, ctx: &ConnCtx) -> Result<Inbound, ClientError> {
    let parsed = parse_checked(text, limits);
    let Ok(inb) = &parsed else { return parsed };
    if inb.event == EventKind::ChatMessage || inb.event == EventKind::LlmRequest {
        let body = inb.body.to_value();
        let t = body["text"].as_str().unwrap();
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
    match dispatch(inb.clone(), ctx, &policy()) {
        Err(e) => {
            check_error(&e, text);
            if inb.role.as_deref() == Some(LLM_ROLE) {
                assert_eq!(e.code, ErrorCode::ReservedRole, "llm must be refused");
            }
        }
        Ok(Action::Store(StoreEnvelope {
            event,
            role,
            cid,
            body,
            cancels,
        })) => {
            assert_ne!(inb.event, EventKind::ChatTyping, "typing is never stored");
            assert_eq!(event, inb.event.name());
            assert_eq!(role, expected_role(inb, ctx));
            assert_ne!(role, LLM_ROLE);
            assert_eq!(cid, inb.cid);
            let v = check_envelope(&body, inb, ctx, &role, t0);
            assert_eq!(v["hd"].get("cid").and_then(Value::as_str), cid.as_deref());
            if inb.event == EventKind::LlmCancel {
                let turn: StreamId = inb.body.to_value()["turn_id"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(cancels, Some(turn));
            } else {
                assert_eq!(cancels, None);
            }
            let id = StreamId::new(t0, text.len() as u64);
            let delivered: Value =
                serde_json::from_str(&delivery_frame(id, &role, event, &body)).unwrap();
            assert_eq!(delivered["hd"]["id"], id.to_string());
            let mut without_id = delivered.clone();
            without_id["hd"].as_object_mut().unwrap().remove("id");
            assert_eq!(without_id, v, "delivery changes nothing but hd.id");
        }
        Ok(Action::Publish { frame }) => {
            assert_eq!(inb.event, EventKind::ChatTyping, "only typing is transient");
            let v = check_envelope(&frame, inb, ctx, &expected_role(inb, ctx), t0);
            assert!(v["hd"].get("cid").is_none());
        }
    }
    parsed
}

fn code_of(r: Result<Inbound, ClientError>) -> &'static str {
    match r {
        Ok(inb) => panic!("expected a refusal, got {inb:?}"),
        Err(e) => e.code.as_str(),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn arb_limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        3 => Just(Limits::default()),
        1 => (0usize..300, 0usize..20, 0usize..8).prop_map(|(f, t, d)| Limits {
            max_frame_bytes: f,
            max_text_chars: t,
            max_depth: d,
        }),
    ]
}

fn arb_ctx() -> impl Strategy<Value = ConnCtx> {
    (
        "[A-Za-z0-9._-]{1,16}",
        prop_oneof![
            3 => Just(None),
            2 => Just(Some("B".to_owned())),
            1 => Just(Some("Z".to_owned())),
        ],
        prop_oneof![3 => Just(None), 1 => Just(Some("A".to_owned()))],
    )
        .prop_map(|(sid, default_role, bound_role)| {
            let mut ctx = ConnCtx::new(sid, default_role);
            ctx.bound_role = bound_role;
            ctx
        })
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[ a-z\\\\\"\\[\\]{}]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{0,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_event() -> impl Strategy<Value = Value> {
    prop_oneof![
        12 => prop::sample::select(vec!["chat.message", "chat.typing", "llm.request", "llm.cancel"])
            .prop_map(Value::from),
        1 => prop::sample::select(vec!["chat.ack", "error", "llm.response", "session.join"])
            .prop_map(Value::from),
        1 => "[a-z.]{0,14}".prop_map(Value::from),
        1 => arb_json(),
    ]
}

fn arb_role() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::sample::select(vec!["A", "B", "user", "llm", "Z", "LLM", ""]).prop_map(Value::from),
        1 => any::<String>().prop_map(Value::from),
        1 => arb_json(),
    ]
}

fn arb_cid() -> impl Strategy<Value = Value> {
    prop_oneof![
        10 => "[a-z0-9-]{1,12}".prop_map(Value::from),
        1 => "x{126,130}".prop_map(Value::from),
        1 => "가{40,45}".prop_map(Value::from),
        1 => arb_json(),
    ]
}

/// A field of `hd` beyond event/role/cid: often one the relay owns, sometimes a duplicate of
/// event/role/cid (the text is built by hand, so duplicate keys reach the parser).
fn arb_extra() -> impl Strategy<Value = (String, Value)> {
    let key = prop_oneof![
        4 => prop::sample::select(SERVER_HEADER_FIELDS.to_vec()).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["event", "role", "cid"]).prop_map(str::to_owned),
        5 => "[a-z_]{1,8}",
    ];
    let value = prop_oneof![
        3 => prop::sample::select(vec![
            "9-9", "other-room", "llm", "A", "B", "0", "chat.message", "chat.typing",
        ])
        .prop_map(Value::from),
        1 => Just(Value::Null),
        2 => arb_json(),
    ];
    (key, value)
}

fn text_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => "[ \t\na-z가🎉\"\\\\]{0,12}".prop_map(Value::from),
        1 => any::<String>().prop_map(Value::from),
        1 => arb_json(),
    ]
}

fn arb_body() -> impl Strategy<Value = Option<Value>> {
    let turn = prop_oneof![
        4 => "[0-9]{1,13}-[0-9]{1,3}",
        1 => "[0-9]{1,22}",
        1 => "[0-9-+]{0,8}",
    ]
    .prop_map(Value::from);
    let obj = (
        prop::option::weighted(0.85, text_value()),
        prop::option::of(text_value()),
        prop::option::weighted(0.85, turn),
        prop::collection::vec(("[a-z_]{1,6}", arb_json()), 0..3),
    )
        .prop_map(|(text, prompt, turn, rest)| {
            let mut m: Map<String, Value> = rest.into_iter().collect();
            for (k, v) in [("text", text), ("prompt", prompt), ("turn_id", turn)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        });
    prop_oneof![
        1 => Just(None),
        14 => obj.prop_map(Some),
        1 => arb_json().prop_map(Some),
    ]
}

fn object_text(entries: &[(String, Value)]) -> String {
    let fields: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// `{"hd":{...},"bd":...}` with the header's entries in a random order, duplicates possible.
fn arb_envelope() -> impl Strategy<Value = String> {
    (
        prop::option::weighted(0.95, arb_event()),
        prop::option::of(arb_role()),
        prop::option::of(arb_cid()),
        prop::collection::vec(arb_extra(), 0..4),
        arb_body(),
        any::<bool>(),
    )
        .prop_flat_map(|(event, role, cid, extra, body, bd_first)| {
            let mut hd: Vec<(String, Value)> = extra;
            for (k, v) in [("event", event), ("role", role), ("cid", cid)] {
                if let Some(v) = v {
                    hd.push((k.into(), v));
                }
            }
            (Just(hd).prop_shuffle(), Just(body), Just(bd_first))
        })
        .prop_map(|(hd, body, bd_first)| {
            let hd_part = format!(r#""hd":{}"#, object_text(&hd));
            let parts = match (body, bd_first) {
                (None, _) => vec![hd_part],
                (Some(b), true) => vec![format!(r#""bd":{b}"#), hd_part],
                (Some(b), false) => vec![hd_part, format!(r#""bd":{b}"#)],
            };
            format!("{{{}}}", parts.join(","))
        })
}

/// Token soup: strings that are JSON-shaped but often broken, to exercise the depth scan
/// (brackets inside strings, escaped quotes) against serde's verdict.
fn arb_json_soup() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        "\\\"",
        ":",
        ",",
        " ",
        "\"hd\"",
        "\"bd\"",
        "\"event\"",
        "\"chat.message\"",
        "\"text\"",
        "\"role\"",
        "\"llm\"",
        "\"a\"",
        "1",
        "null",
        "\"[\"",
        "\"{\"",
        "\"\\\\\"",
        "\"\\u0041\"",
        "\"\\ud800\"",
        "\u{feff}",
    ]);
    prop::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// `cases` random cases, and no `proptest-regressions/` file written next to the tests: a
/// failure prints its minimal input, which belongs in `seeded_corpus` once understood.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn any_string_is_answered(text in any::<String>(), limits in arb_limits()) {
        let _ = pipeline(&text, &limits, &ConnCtx::new("r", None));
    }

    #[test]
    fn any_bytes_are_answered(bytes in any::<Vec<u8>>(), limits in arb_limits()) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = pipeline(&text, &limits, &ConnCtx::new("r", None));
    }

    #[test]
    fn json_soup_agrees_with_serde(text in arb_json_soup(), limits in arb_limits()) {
        let _ = pipeline(&text, &limits, &ConnCtx::new("r", None));
    }
}

proptest! {
    // Building an envelope costs more than a string: fewer cases keep this under ~10 s.
    #![proptest_config(config(2500))]

    /// Envelopes close to valid: every one that parses is dispatched, and whatever is stored
    /// is rebuilt from the validated fields (see `pipeline` for the full list of checks).
    #[test]
    fn valid_ish_envelopes_store_what_was_validated(
        text in arb_envelope(),
        ctx in arb_ctx(),
        limits in arb_limits(),
    ) {
        let _ = pipeline(&text, &limits, &ctx);
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// The same envelopes, after a random single-byte edit: still answered, still consistent.
    /// (Few cases: the fuzz target in fuzz/ does this at scale.)
    #[test]
    fn mutated_envelopes_are_answered(
        text in arb_envelope(),
        at in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"{}[]\",:\\ a0".to_vec()),
        delete in any::<bool>(),
    ) {
        let mut bytes = text.into_bytes();
        let i = at.index(bytes.len() + 1);
        if delete && i < bytes.len() {
            bytes.remove(i);
        } else {
            bytes.insert(i, byte);
        }
        let text = String::from_utf8_lossy(&bytes);
        let _ = pipeline(&text, &Limits::default(), &ConnCtx::new("r", None));
    }
}

// ---------------------------------------------------------------------------------------------
// Duplicate keys
// ---------------------------------------------------------------------------------------------

/// Whatever a duplicate key resolves to, `llm` is never stored and always refused.
fn assert_no_llm(text: &str) -> Result<Inbound, ClientError> {
    let mut bound = ConnCtx::new("room-1", None);
    bound.bound_role = Some("A".into());
    let contexts = [
        ConnCtx::new("room-1", None),
        ConnCtx::new("room-1", Some("B".into())),
        bound,
    ];
    let mut first = None;
    for ctx in &contexts {
        let parsed = pipeline(text, &Limits::default(), ctx);
        if let Ok(inb) = &parsed {
            let outcome = dispatch(inb.clone(), ctx, &policy());
            if inb.role.as_deref() == Some(LLM_ROLE) {
                let code = outcome.as_ref().err().map(|e| e.code);
                assert_eq!(code, Some(ErrorCode::ReservedRole), "{text}");
            }
            if let Ok(Action::Store(StoreEnvelope { role, body, .. })) = outcome {
                assert_ne!(role, LLM_ROLE, "{text}");
                let v: Value = serde_json::from_str(&body).unwrap();
                assert_ne!(v["hd"]["role"], LLM_ROLE, "{text}");
            }
        }
        first.get_or_insert(parsed);
    }
    first.unwrap()
}

#[test]
fn duplicate_keys_cannot_smuggle_llm() {
    // serde_json keeps the last duplicate. Both orders are checked; neither stores `llm`.
    let last_llm = r#"{"hd":{"event":"chat.message","role":"A","role":"llm"},"bd":{"text":"x"}}"#;
    assert_eq!(
        assert_no_llm(last_llm).unwrap().role.as_deref(),
        Some("llm")
    );
    let last_a = r#"{"hd":{"event":"chat.message","role":"llm","role":"A"},"bd":{"text":"x"}}"#;
    assert_eq!(assert_no_llm(last_a).unwrap().role.as_deref(), Some("A"));

    for text in [
        // escaped key or value spelling `role` / `llm`
        r#"{"hd":{"event":"chat.message","role":"A","r\u006fle":"llm"},"bd":{"text":"x"}}"#,
        r#"{"hd":{"event":"chat.message","role":"ll\u006d"},"bd":{"text":"x"}}"#,
        // a second hd, either order
        r#"{"hd":{"event":"chat.message","role":"A"},"hd":{"event":"chat.message","role":"llm"},"bd":{"text":"x"}}"#,
        r#"{"hd":{"event":"chat.message","role":"llm"},"hd":{"event":"chat.message","role":"A"},"bd":{"text":"x"}}"#,
        // role set to null after llm: falls back to the connection's role
        r#"{"hd":{"event":"chat.message","role":"llm","role":null},"bd":{"text":"x"}}"#,
        // three copies, typing (transient) and llm.request
        r#"{"hd":{"event":"chat.typing","role":"A","role":"llm","role":"B"}}"#,
        r#"{"hd":{"event":"llm.request","role":"B","role":"llm"},"bd":{"text":"q"}}"#,
        // a role inside bd or extra fields is data, never the speaker
        r#"{"hd":{"event":"chat.message","role":"A","hd":{"role":"llm"}},"bd":{"text":"x","role":"llm"}}"#,
    ] {
        let _ = assert_no_llm(text);
    }

    // duplicate event / cid / sid / id: the parser keeps the last, the server fields go
    let dup = r#"{"hd":{"event":"chat.typing","event":"chat.message","cid":"a","cid":"b","sid":"x","sid":"y","id":"1-1","id":"2-2"},"bd":{"text":"x"}}"#;
    let inb = assert_no_llm(dup).unwrap();
    assert_eq!(inb.event, EventKind::ChatMessage);
    assert_eq!(inb.cid.as_deref(), Some("b"));
}

// ---------------------------------------------------------------------------------------------
// Seeded corpus
// ---------------------------------------------------------------------------------------------

/// A chat.message whose `bd.n` is nested so the whole frame has depth `total` (>= 3).
fn nested_frame(total: usize) -> String {
    let inner = total - 2; // envelope object + bd object
    format!(
        r#"{{"hd":{{"event":"chat.message"}},"bd":{{"text":"x","n":{}{}}}}}"#,
        "[".repeat(inner),
        "]".repeat(inner)
    )
}

/// A valid chat.message of exactly `len` bytes (padding in `bd.pad`).
fn frame_of_len(len: usize) -> String {
    let head = r#"{"hd":{"event":"chat.message"},"bd":{"text":"hi","pad":""#;
    let tail = r#""}}"#;
    let frame = format!("{head}{}{tail}", "p".repeat(len - head.len() - tail.len()));
    assert_eq!(frame.len(), len);
    frame
}

fn chat(text_json: &str) -> String {
    format!(r#"{{"hd":{{"event":"chat.message","role":"A"}},"bd":{{"text":{text_json}}}}}"#)
}

#[test]
fn seeded_corpus() {
    let limits = Limits::default();
    let max_depth = limits.max_depth;
    let max_chars = limits.max_text_chars;
    let max_bytes = limits.max_frame_bytes;
    let ok = "ok";
    let cases: Vec<(String, &str)> = vec![
        // depth: limit - 1, limit, limit + 1 (in an envelope, and bare)
        (nested_frame(max_depth - 1), ok),
        (nested_frame(max_depth), ok),
        (nested_frame(max_depth + 1), "too_deep"),
        (format!("{}{}", "[".repeat(max_depth), "]".repeat(max_depth)), "not_object"),
        (format!("{}{}", "[".repeat(max_depth + 1), "]".repeat(max_depth + 1)), "too_deep"),
        (format!("{}1{}", r#"{"a":"#.repeat(max_depth + 1), "}".repeat(max_depth + 1)), "too_deep"),
        // unbalanced: too deep wins over broken JSON
        ("[".repeat(max_depth + 1), "too_deep"),
        ("[".repeat(max_depth), "bad_json"),
        // brackets inside strings do not count
        (chat(&format!("\"{}\"", "[".repeat(100))), ok),
        (chat(&format!("\"\\\"{}\"", "{".repeat(100))), ok),
        // duplicate keys: last wins
        (r#"{"hd":{"event":"chat.typing","event":"chat.message"},"bd":{"text":"x"}}"#.into(), ok),
        (r#"{"hd":{"event":"chat.message"},"bd":{"text":"x"},"bd":{"text":" "}}"#.into(), "empty_text"),
        (r#"{"hd":{"event":"chat.message","role":"A","role":"llm"},"bd":{"text":"x"}}"#.into(), ok),
        // numbers beyond f64 / beyond u64
        (r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","n":1e400}}"#.into(), "bad_json"),
        (r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","n":123456789012345678901234567890}}"#.into(), ok),
        (r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","n":-1e-400}}"#.into(), ok),
        ("1e400".into(), "bad_json"),
        // invalid escapes, lone backslash
        (chat(r#""\x41""#), "bad_json"),
        (chat(r#""\""#), "bad_json"),
        (chat("\"a\\"), "bad_json"),
        (chat(r#""\u12""#), "bad_json"),
        // UTF-8 BOM prefix: JSON text must not start with one
        (format!("\u{feff}{}", chat(r#""x""#)), "bad_json"),
        // surrogate halves
        (chat(r#""\ud800""#), "bad_json"),
        (chat(r#""\udc00\ud800""#), "bad_json"),
        (chat(r#""\ud83c\udf89""#), ok),
        // raw control character inside a string
        (chat("\"a\u{1}b\""), "bad_json"),
        // text length in characters (after trim), multi-byte
        (chat(&format!("\"{}\"", "가".repeat(max_chars))), ok),
        (chat(&format!("\"{}\"", "가".repeat(max_chars + 1))), "text_too_long"),
        (chat(&format!("\"{}\"", "🎉".repeat(max_chars))), ok),
        (chat(&format!("\"{}\"", "🎉".repeat(max_chars + 1))), "text_too_long"),
        (chat(&format!("\"  {}\\n\"", "é".repeat(max_chars))), ok),
        (chat("\" \\t\\n \""), "empty_text"),
        // frame size in bytes
        (frame_of_len(max_bytes), ok),
        (frame_of_len(max_bytes + 1), "frame_too_large"),
        // not envelopes
        (String::new(), "bad_json"),
        (" \t\r\n".into(), "bad_json"),
        ("null".into(), "not_object"),
        ("0".into(), "not_object"),
        ("-1.5e3".into(), "not_object"),
        ("[]".into(), "not_object"),
        ("[{\"hd\":{}}]".into(), "not_object"),
        ("\"hd\"".into(), "not_object"),
        ("true".into(), "not_object"),
        ("{}".into(), "invalid_header"),
        (r#"{"hd":null}"#.into(), "invalid_header"),
        (r#"{"hd":[]}"#.into(), "invalid_header"),
        (r#"{"hd":{"event":null}}"#.into(), "invalid_event"),
        (r#"{"hd":{"event":"chat.message"}} x"#.into(), "bad_json"),
        (r#"{"hd":{"event":"chat.message"},}"#.into(), "bad_json"),
        // cid bounds
        (r#"{"hd":{"event":"chat.typing","cid":""}}"#.into(), "invalid_cid"),
        (format!(r#"{{"hd":{{"event":"chat.typing","cid":"{}"}}}}"#, "c".repeat(128)), ok),
        (format!(r#"{{"hd":{{"event":"chat.typing","cid":"{}"}}}}"#, "c".repeat(129)), "invalid_cid"),
        // llm.cancel turn ids
        (r#"{"hd":{"event":"llm.cancel"},"bd":{"turn_id":"1700000000000-0"}}"#.into(), ok),
        (r#"{"hd":{"event":"llm.cancel"},"bd":{"turn_id":"1-2-3"}}"#.into(), "invalid_body"),
        (r#"{"hd":{"event":"llm.cancel"},"bd":{"turn_id":"99999999999999999999999"}}"#.into(), "invalid_body"),
        (r#"{"hd":{"event":"llm.cancel"}}"#.into(), "invalid_body"),
        (r#"{"hd":{"event":"llm.request"},"bd":{"prompt":" q "}}"#.into(), ok),
        (r#"{"hd":{"event":"chat.typing"},"bd":null}"#.into(), "invalid_body"),
        (r#"{"hd":{"event":"chat.typing"}}"#.into(), ok),
    ];
    let ctx = ConnCtx::new("room-1", None);
    for (text, want) in &cases {
        let got = pipeline(text, &limits, &ctx);
        let got_code = match &got {
            Ok(_) => ok,
            Err(e) => e.code.as_str(),
        };
        assert_eq!(got_code, *want, "frame {text:.120?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Worst-case shapes at the maximum frame size (correctness only; see the module comment)
// ---------------------------------------------------------------------------------------------

#[test]
fn worst_case_shapes_at_max_size() {
    let limits = Limits::default();
    let ctx = ConnCtx::new("room-1", None);
    let run = |text: &str| pipeline(text, &limits, &ctx);

    assert_eq!(code_of(run(&"[".repeat(32_000))), "too_deep");
    assert_eq!(
        code_of(run(&"[".repeat(limits.max_frame_bytes))),
        "too_deep"
    );
    assert_eq!(
        code_of(run(&"[".repeat(limits.max_frame_bytes + 1))),
        "frame_too_large"
    );
    assert_eq!(code_of(run(&"{\"a\":".repeat(12_000))), "too_deep");

    // a 60 KB string: as padding it is fine, as the text it is too long
    let s60k = "s".repeat(60_000);
    let padded =
        format!(r#"{{"hd":{{"event":"chat.message"}},"bd":{{"text":"hi","pad":"{s60k}"}}}}"#);
    let inb = run(&padded).unwrap();
    assert_eq!(
        inb.body.to_value()["pad"].as_str().map(str::len),
        Some(60_000)
    );
    assert_eq!(code_of(run(&chat(&format!("\"{s60k}\"")))), "text_too_long");

    // 60 KB of escapes the depth scan must step through: `\"` and `\\` pairs and brackets
    let escapes = "\\\"\\\\[{".repeat(10_000);
    let tricky = format!(r#"{{"hd":{{"event":"chat.typing","note":"{escapes}"}}}}"#);
    assert!(tricky.len() <= limits.max_frame_bytes);
    let inb = run(&tricky).unwrap();
    assert_eq!(inb.extra["note"].as_str().map(str::len), Some(40_000));

    // wide rather than deep: 30 000 elements
    let wide = format!(
        r#"{{"hd":{{"event":"chat.message"}},"bd":{{"text":"x","n":[{}0]}}}}"#,
        "0,".repeat(30_000)
    );
    assert!(run(&wide).is_ok());

    // many keys in hd (each a distinct extra field)
    let keys: Vec<String> = (0..5_000).map(|i| format!(r#""k{i}":{i}"#)).collect();
    let many = format!(r#"{{"hd":{{"event":"chat.typing",{}}}}}"#, keys.join(","));
    assert!(many.len() <= limits.max_frame_bytes);
    assert_eq!(run(&many).unwrap().extra.len(), 5_000);

    // many duplicate keys collapse to one
    let dups = format!(
        r#"{{"hd":{{"event":"chat.typing",{}"role":"A"}}}}"#,
        r#""role":"llm","#.repeat(4_000)
    );
    assert_eq!(assert_no_llm(&dups).unwrap().role.as_deref(), Some("A"));
}

#[test]
fn delivery_frame_sets_the_id() {
    let ctx = ConnCtx::new("room-1", None);
    let inb = parse_client_frame(
        r#"{"hd":{"event":"chat.message","id":"0-1","role":"A"},"bd":{"text":"hi"}}"#,
        &Limits::default(),
    )
    .unwrap();
    let Action::Store(StoreEnvelope { body, event, .. }) = dispatch(inb, &ctx, &policy()).unwrap()
    else {
        panic!("chat.message is stored")
    };
    for id in [
        StreamId::ZERO,
        StreamId::new(1, 2),
        StreamId::new(u64::MAX, u64::MAX),
    ] {
        let v: Value = serde_json::from_str(&delivery_frame(id, "A", event, &body)).unwrap();
        assert_eq!(v["hd"]["id"], id.to_string());
        assert_eq!(v["bd"], json!({"text": "hi"}));
    }
}
