//! Turning one client text frame into a validated [`Inbound`], or a refusal naming the problem.
//!
//! Order of checks is cheapest-first so hostile input costs little: size, nesting depth (a
//! linear byte scan, before serde recurses), JSON, envelope shape, event, then the event's body.
//! Roles are checked later by the dispatcher, which knows what the connection was granted.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::scan::{scan, Scan};
use super::{ClientError, ErrorCode, EventKind, StreamId, EMOTIONS, SERVER_HEADER_FIELDS};

/// Limits applied to every client frame; all configurable.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_text_chars: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_text_chars: 2000,
            max_depth: 32,
        }
    }
}

/// A client envelope that passed validation. The stored envelope is rebuilt from these typed
/// fields, never from the client's bytes, so a duplicate `"role"` key cannot smuggle a second
/// role into history.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub event: EventKind,
    /// `hd.role` as sent; `None` when absent. Resolved against the connection's grant later.
    pub role: Option<String>,
    pub cid: Option<String>,
    /// Header fields the relay does not interpret, kept as the spec asks (minus server-owned ones).
    pub extra: Map<String, Value>,
    /// The body, normalised for the event (e.g. `bd.text` trimmed).
    pub body: Body,
}

/// An envelope's body: parsed, or the client's own JSON when validation had nothing to change
/// (a `chat.message` whose text needs no trimming) — the common message is then never built
/// into a `Value` and serialised again, only copied.
#[derive(Debug, Clone)]
pub enum Body {
    Value(Value),
    Raw(Box<RawValue>),
}

impl Body {
    /// The parsed body, if it was parsed (the events the relay reads fields of always are).
    pub fn as_value(&self) -> Option<&Value> {
        match self {
            Body::Value(v) => Some(v),
            Body::Raw(_) => None,
        }
    }

    /// The body as a `Value`, parsing a raw one.
    pub fn to_value(&self) -> Value {
        match self {
            Body::Value(v) => v.clone(),
            Body::Raw(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
        }
    }
}

impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Body::Raw(a), Body::Raw(b)) => a.get() == b.get(),
            _ => self.to_value() == other.to_value(),
        }
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Body::Value(v) => v.serialize(serializer),
            Body::Raw(raw) => raw.serialize(serializer),
        }
    }
}

/// A refusal: the error plus the frame's `cid`, when one could be read, so the client can match
/// the error to what it sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub error: ClientError,
    pub cid: Option<String>,
}

impl From<ClientError> for Refusal {
    fn from(error: ClientError) -> Self {
        Refusal { error, cid: None }
    }
}

const MAX_CID_BYTES: usize = 128;

/// The checks every text frame passes before it is parsed, whatever its dialect: its size, then
/// its nesting depth (a byte scan, so serde never recurses into hostile input).
pub fn check_frame(text: &str, limits: &Limits) -> Result<(), ClientError> {
    checked_scan(text, limits).map(|_| ())
}

/// [`check_frame`], answering the scan: whether the frame is plain JSON as well.
fn checked_scan(text: &str, limits: &Limits) -> Result<Scan, ClientError> {
    if text.len() > limits.max_frame_bytes {
        return Err(ClientError::new(
            ErrorCode::FrameTooLarge,
            format!("frame too large (max {} bytes)", limits.max_frame_bytes),
        ));
    }
    let scan = scan(text.as_bytes(), limits.max_depth);
    if scan.too_deep {
        return Err(ClientError::new(
            ErrorCode::TooDeep,
            format!("JSON nested too deeply (max depth {})", limits.max_depth),
        ));
    }
    Ok(scan)
}

/// The envelope's two parts, located but not parsed.
#[derive(Deserialize)]
struct Parts<'a> {
    #[serde(borrow)]
    hd: Option<&'a RawValue>,
    /// `None` only when absent: a `null` body is a body (one most events refuse).
    #[serde(borrow, default, deserialize_with = "present")]
    bd: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// What the fast path needs of a `chat.message` body: its text, borrowed when it has no escapes.
#[derive(Deserialize)]
struct Text<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

/// The usual header — `event`, and `role` and `cid` or not, plain strings without escapes —
/// read without building a map: anything else (another field, an escape, a duplicate, a value
/// [`header`] would refuse) fails here and takes [`header`]'s path, which decides.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainHeader<'a> {
    event: &'a str,
    #[serde(default)]
    role: Option<&'a str>,
    #[serde(default)]
    cid: Option<&'a str>,
}

impl PlainHeader<'_> {
    fn header(raw: &str) -> Option<Header> {
        let hd: PlainHeader = serde_json::from_str(raw).ok()?;
        let event = EventKind::from_name(hd.event)?;
        if hd
            .cid
            .is_some_and(|c| c.is_empty() || c.len() > MAX_CID_BYTES)
        {
            return None;
        }
        Some(Header {
            event,
            role: hd.role.map(str::to_owned),
            cid: hd.cid.map(str::to_owned),
            extra: Map::new(),
        })
    }
}

/// Parse and validate one text frame.
///
/// The envelope is first split into its raw `hd` and `bd`; `hd` is parsed (it is small, and the
/// stored header is rebuilt from its typed fields), and a `chat.message` body whose text is
/// valid as sent is kept raw. Anything unusual (a repeated key, a body that is not an object, a
/// text to trim) takes the general path, which parses everything into `Value`s and decides, so
/// both paths accept and refuse the same frames.
pub fn parse_client_frame(text: &str, limits: &Limits) -> Result<Inbound, Refusal> {
    let scan = checked_scan(text, limits)?;
    // (serde would also read a struct from an array: `[{"event":…}]` is not an envelope.)
    if !scan.plain || !text.trim_start().starts_with('{') {
        return parse_values(text, limits);
    }
    let (hd, bd) = match serde_json::from_str::<Parts>(text) {
        Ok(Parts { hd: Some(hd), bd }) if hd.get().starts_with('{') => (hd, bd),
        _ => return parse_values(text, limits),
    };
    let header = match PlainHeader::header(hd.get()) {
        Some(header) => header,
        None => match serde_json::from_str::<Map<String, Value>>(hd.get()) {
            Ok(hd) => header(hd)?,
            Err(_) => return parse_values(text, limits),
        },
    };
    if header.event == EventKind::ChatMessage {
        if let Some(raw) = bd.filter(|raw| raw.get().starts_with('{')) {
            if let Ok(Text { text: t }) = serde_json::from_str::<Text>(raw.get()) {
                if checked_text_str(&t, limits).is_ok_and(|checked| checked.len() == t.len()) {
                    return Ok(header.with_body(Body::Raw(raw.to_owned())));
                }
            }
        }
    }
    let body = match bd {
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(body) => body,
            Err(_) => return parse_values(text, limits),
        },
        None => Value::Object(Map::new()),
    };
    header.validated(body, limits)
}

/// The general path: the whole frame parsed into `Value`s.
fn parse_values(text: &str, limits: &Limits) -> Result<Inbound, Refusal> {
    let value: Value = serde_json::from_str(text)
        .map_err(|_| ClientError::new(ErrorCode::BadJson, "frame is not valid JSON"))?;
    let Value::Object(mut envelope) = value else {
        return Err(ClientError::new(
            ErrorCode::NotObject,
            "frame must be a JSON object {\"hd\": {...}, \"bd\": ...}",
        )
        .into());
    };
    let Some(Value::Object(hd)) = envelope.remove("hd") else {
        return Err(ClientError::new(
            ErrorCode::InvalidHeader,
            "envelope needs an object \"hd\" with at least \"event\"",
        )
        .into());
    };
    let header = header(hd)?;
    let body = envelope.remove("bd").unwrap_or(Value::Object(Map::new()));
    header.validated(body, limits)
}

/// A validated header, waiting for its body.
struct Header {
    event: EventKind,
    role: Option<String>,
    cid: Option<String>,
    extra: Map<String, Value>,
}

impl Header {
    fn validated(self, body: Value, limits: &Limits) -> Result<Inbound, Refusal> {
        match validate_body(self.event, body, limits) {
            Ok(body) => Ok(self.with_body(Body::Value(body))),
            Err(error) => Err(Refusal {
                error,
                cid: self.cid,
            }),
        }
    }

    fn with_body(self, body: Body) -> Inbound {
        Inbound {
            event: self.event,
            role: self.role,
            cid: self.cid,
            extra: self.extra,
            body,
        }
    }
}

/// Checks `hd`: its cid, event and role, minus the fields only the relay may set.
fn header(mut hd: Map<String, Value>) -> Result<Header, Refusal> {
    // Read cid first so every later refusal can echo it.
    let cid = match hd.remove("cid") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if !c.is_empty() && c.len() <= MAX_CID_BYTES => Some(c),
        Some(_) => {
            return Err(ClientError::new(
                ErrorCode::InvalidCid,
                "hd.cid must be a non-empty string of at most 128 bytes",
            )
            .into())
        }
    };
    let refuse = |code, message: String| Refusal {
        error: ClientError::new(code, message),
        cid: cid.clone(),
    };

    let event = match hd.remove("event") {
        Some(Value::String(name)) => match EventKind::from_name(&name) {
            Some(kind) => kind,
            None if EventKind::is_server_event(&name) => {
                return Err(refuse(
                    ErrorCode::ReservedEvent,
                    format!("event '{name}' is sent by the relay only, not by clients"),
                ))
            }
            None => {
                return Err(refuse(
                    ErrorCode::UnknownEvent,
                    format!(
                        "unknown event '{}'; known events: {}",
                        truncate(&name, 64),
                        EventKind::client_event_list()
                    ),
                ))
            }
        },
        _ => {
            return Err(refuse(
                ErrorCode::InvalidEvent,
                "hd.event must be a string such as \"chat.message\"".into(),
            ))
        }
    };
    let role = match hd.remove("role") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(r),
        Some(_) => {
            return Err(refuse(
                ErrorCode::InvalidRole,
                "hd.role must be a string".into(),
            ))
        }
    };
    for field in SERVER_HEADER_FIELDS {
        // shift_remove keeps the client's field order (remove would move the last one here).
        hd.shift_remove(*field);
    }
    Ok(Header {
        event,
        role,
        cid,
        extra: hd,
    })
}

fn validate_body(event: EventKind, body: Value, limits: &Limits) -> Result<Value, ClientError> {
    match event {
        EventKind::ChatMessage => {
            let Value::Object(mut bd) = body else {
                return Err(ClientError::new(
                    ErrorCode::InvalidBody,
                    "chat.message needs bd.text (a string)",
                ));
            };
            let text = checked_text(bd.get("text"), limits, "chat.message needs bd.text")?;
            bd.insert("text".into(), Value::String(text));
            Ok(Value::Object(bd))
        }
        EventKind::LlmRequest => {
            let Value::Object(mut bd) = body else {
                return Err(ClientError::new(
                    ErrorCode::InvalidBody,
                    "llm.request needs bd.text (or bd.prompt)",
                ));
            };
            let raw = bd.get("text").or_else(|| bd.get("prompt"));
            let text = checked_text(raw, limits, "llm.request needs bd.text (or bd.prompt)")?;
            bd.remove("prompt");
            bd.insert("text".into(), Value::String(text));
            checked_emotion(bd.get("emotion"))?;
            Ok(Value::Object(bd))
        }
        EventKind::LlmCancel => {
            let turn_ok = body
                .get("turn_id")
                .and_then(Value::as_str)
                .is_some_and(|t| t.parse::<StreamId>().is_ok());
            if turn_ok {
                Ok(body)
            } else {
                Err(ClientError::new(
                    ErrorCode::InvalidBody,
                    "llm.cancel needs bd.turn_id, the stream id of the turn to stop",
                ))
            }
        }
        EventKind::ChatTyping => match body {
            Value::Object(_) => Ok(body),
            _ => Err(ClientError::new(
                ErrorCode::InvalidBody,
                "chat.typing takes an object body (may be empty)",
            )),
        },
    }
}

/// `bd.emotion` of an `llm.request`: absent, null, or one of [`EMOTIONS`].
fn checked_emotion(emotion: Option<&Value>) -> Result<(), ClientError> {
    match emotion {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(e)) if EMOTIONS.contains(&e.as_str()) => Ok(()),
        Some(_) => Err(ClientError::new(
            ErrorCode::InvalidEmotion,
            format!(
                "bd.emotion must be one of {} (or null)",
                EMOTIONS.join(", ")
            ),
        )),
    }
}

/// Trim and bound a text field: 1..=max characters after trimming, as the voice-chat backend did.
fn checked_text(
    raw: Option<&Value>,
    limits: &Limits,
    missing: &'static str,
) -> Result<String, ClientError> {
    let Some(Value::String(text)) = raw else {
        return Err(ClientError::new(ErrorCode::InvalidBody, missing));
    };
    checked_text_str(text, limits).map(str::to_owned)
}

/// [`checked_text`] of a string: the trimmed text, or why it is refused.
fn checked_text_str<'t>(text: &'t str, limits: &Limits) -> Result<&'t str, ClientError> {
    let trimmed = text.trim();
    if trimmed.chars().all(invisible) {
        return Err(ClientError::new(
            ErrorCode::EmptyText,
            "message is empty: nothing but whitespace or invisible characters",
        ));
    }
    if trimmed.chars().count() > limits.max_text_chars {
        return Err(ClientError::new(
            ErrorCode::TextTooLong,
            format!(
                "message too long (max {} characters)",
                limits.max_text_chars
            ),
        ));
    }
    Ok(trimmed)
}

/// Characters that show nothing: whitespace, and Unicode's Default_Ignorable_Code_Point (zero
/// width spaces and joiners, format controls, variation selectors, fillers, tags), plus the
/// braille blank often used as a "blank" character. A message made only of these is empty.
/// They are not trimmed from a message with visible text: a trailing U+FE0F picks the emoji
/// form of the character before it.
fn invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFF8}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<Inbound, Refusal> {
        parse_client_frame(text, &Limits::default())
    }

    fn code(text: &str) -> &'static str {
        parse(text).unwrap_err().error.code.as_str()
    }

    #[test]
    fn accepts_the_prior_wire_format() {
        let inb = parse(r#"{"hd":{"event":"chat.message","role":"A","timestamp":"2024-01-01T00:00:00Z"},"bd":{"text":" 안녕하세요! 🎉 "}}"#).unwrap();
        assert_eq!(inb.event, EventKind::ChatMessage);
        assert_eq!(inb.role.as_deref(), Some("A"));
        assert_eq!(inb.body.to_value()["text"], "안녕하세요! 🎉");
        assert_eq!(inb.extra["timestamp"], "2024-01-01T00:00:00Z");
    }

    #[test]
    fn refusals_have_codes() {
        assert_eq!(code("not json"), "bad_json");
        assert_eq!(code("[1,2]"), "not_object");
        assert_eq!(code(r#"{"bd":{}}"#), "invalid_header");
        assert_eq!(code(r#"{"hd":"x"}"#), "invalid_header");
        assert_eq!(code(r#"{"hd":{}}"#), "invalid_event");
        assert_eq!(code(r#"{"hd":{"event":5}}"#), "invalid_event");
        assert_eq!(code(r#"{"hd":{"event":"nope"}}"#), "unknown_event");
        assert_eq!(code(r#"{"hd":{"event":"llm.response"}}"#), "reserved_event");
        assert_eq!(
            code(r#"{"hd":{"event":"chat.message","role":1},"bd":{"text":"x"}}"#),
            "invalid_role"
        );
        assert_eq!(
            code(r#"{"hd":{"event":"chat.message"},"bd":{}}"#),
            "invalid_body"
        );
        assert_eq!(
            code(r#"{"hd":{"event":"chat.message"},"bd":{"text":"   "}}"#),
            "empty_text"
        );
        for invisible in [
            "\u{200B}",
            "\u{200C}\u{200D}",
            "\u{2060}",
            "\u{FEFF} \u{200B}",
        ] {
            let frame = json!({"hd": {"event": "chat.message"}, "bd": {"text": invisible}});
            assert_eq!(code(&frame.to_string()), "empty_text", "{invisible:?}");
        }
        assert_eq!(
            code(r#"{"hd":{"event":"chat.message","cid":7},"bd":{"text":"x"}}"#),
            "invalid_cid"
        );
        assert_eq!(
            code(r#"{"hd":{"event":"llm.cancel"},"bd":{}}"#),
            "invalid_body"
        );
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(code(&deep), "too_deep");
    }

    #[test]
    fn text_limit_is_in_characters_after_trim() {
        let ok = format!(
            r#"{{"hd":{{"event":"chat.message"}},"bd":{{"text":"  {}  "}}}}"#,
            "가".repeat(2000)
        );
        assert!(parse(&ok).is_ok());
        let long = format!(
            r#"{{"hd":{{"event":"chat.message"}},"bd":{{"text":"{}"}}}}"#,
            "가".repeat(2001)
        );
        assert_eq!(code(&long), "text_too_long");
    }

    #[test]
    fn refusal_echoes_cid() {
        let r = parse(r#"{"hd":{"event":"nope","cid":"c-1"}}"#).unwrap_err();
        assert_eq!(r.cid.as_deref(), Some("c-1"));
    }

    #[test]
    fn server_fields_are_dropped() {
        let inb =
            parse(r#"{"hd":{"event":"chat.typing","id":"9-9","sid":"other","ts":1}}"#).unwrap();
        assert!(inb.extra.is_empty());
    }

    #[test]
    fn emotion_is_one_of_the_list_or_null() {
        for ok in [r#""anxious""#, "null"] {
            let frame = format!(
                r#"{{"hd":{{"event":"llm.request"}},"bd":{{"text":"hi","emotion":{ok}}}}}"#
            );
            assert!(parse(&frame).is_ok(), "{frame}");
        }
        for bad in [r#""bored""#, "3", r#""Happy""#] {
            let frame = format!(
                r#"{{"hd":{{"event":"llm.request"}},"bd":{{"text":"hi","emotion":{bad}}}}}"#
            );
            assert_eq!(code(&frame), "invalid_emotion", "{frame}");
        }
        // The text is checked first.
        assert_eq!(
            code(r#"{"hd":{"event":"llm.request"},"bd":{"text":" ","emotion":"bored"}}"#),
            "empty_text"
        );
    }

    #[test]
    fn dialect_fields_are_the_relays() {
        let inb = parse(
            r#"{"hd":{"event":"llm.request","dialect":"voice","max_tokens":9999},"bd":{"text":"x"}}"#,
        )
        .unwrap();
        assert!(inb.extra.is_empty());
    }

    #[test]
    fn prompt_is_accepted_as_text() {
        let inb = parse(r#"{"hd":{"event":"llm.request"},"bd":{"prompt":"hi"}}"#).unwrap();
        assert_eq!(inb.body.to_value(), serde_json::json!({"text": "hi"}));
    }

    #[test]
    fn a_plain_message_keeps_its_body_as_sent() {
        let frame =
            r#"{"hd":{"event":"chat.message","cid":"c1"},"bd":{"text":"caf\u00e9","seq":1}}"#;
        let inb = parse(frame).unwrap();
        assert!(
            matches!(&inb.body, Body::Raw(raw) if raw.get() == r#"{"text":"caf\u00e9","seq":1}"#),
            "{:?}",
            inb.body
        );
        assert_eq!(inb.body.to_value(), json!({"text": "café", "seq": 1}));
    }

    /// The fast path and the general one accept and refuse the same frames, alike.
    #[test]
    fn both_paths_agree() {
        let limits = Limits {
            max_text_chars: 5,
            ..Limits::default()
        };
        let frames = [
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":" hi "}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"a","text":"b"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"a","text":"   "}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":["hi"]}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":5}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"\u200b"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"toolong"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{}}"#,
            r#"{"hd":{"event":"chat.message"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":null}"#,
            r#"{"hd":{"event":"chat.message","cid":7},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"nope"},"hd":{"event":"chat.message"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","event":"chat.typing"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","sid":"x","id":"1-1","x":[1]},"bd":{"text":"hi","n":1.5}}"#,
            r#"{"hd":{"event":"chat.typing"},"bd":{}}"#,
            r#"{"hd":{"event":"chat.typing"},"bd":null}"#,
            r#"{"hd":{"event":"chat.typing"}}"#,
            r#"{"hd":{"event":"llm.request"},"bd":{"prompt":"hi"}}"#,
            r#"{"hd":"x","bd":{"text":"hi"}}"#,
            r#"{"bd":{"text":"hi"}}"#,
            r#"[{"hd":{"event":"chat.message"}}]"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","n":1e400}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","n":1e4,"m":-0.5E-3}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","s":"\ud800"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","s":"\ud83c\udf89"}}"#,
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"x","t":true,"f":false,"z":null}}"#,
            // Headers: the plain ones are read without a map, the rest by `header`.
            r#"{"hd":{"event":"chat.message","role":"A","cid":"k1"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"cid":"k1","role":"B","event":"chat.message"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","role":null,"cid":null},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","role":"A","cid":"k"1"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","role":5},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","cid":""},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","cid":"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","cid":"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","cid":"k1","role":"A","role":"B"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"llm.delta","cid":"k1"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"no.such","cid":"k1"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":5,"cid":"k1"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"role":"A"},"bd":{"text":"hi"}}"#,
            r#"{"hd":{"event":"chat.message","cid":"k1","ts":1,"lang":"ko"},"bd":{"text":"hi"}}"#,
        ];
        for frame in frames {
            let fast = parse_client_frame(frame, &limits);
            let general = parse_values(frame, &limits);
            match (&fast, &general) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(
                        (a.event, &a.role, &a.cid, &a.extra, a.body.to_value()),
                        (b.event, &b.role, &b.cid, &b.extra, b.body.to_value()),
                        "{frame}"
                    );
                    assert_eq!(
                        serde_json::to_string(&a.body)
                            .unwrap()
                            .parse::<Value>()
                            .unwrap(),
                        b.body.to_value(),
                        "{frame}: the serialised body"
                    );
                }
                (Err(a), Err(b)) => assert_eq!(
                    (a.error.code.as_str(), &a.cid),
                    (b.error.code.as_str(), &b.cid),
                    "{frame}"
                ),
                _ => panic!("{frame}: {fast:?} vs {general:?}"),
            }
        }
    }
}
