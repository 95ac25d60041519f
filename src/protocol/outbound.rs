//! Frames the relay sends, and the stored envelope format.
//!
//! A stored entry's `body` field always starts with `{"hd":{"event":` because the relay writes
//! it from [`StoredBody`]. Delivery then splices `"id":"<stream id>",` in after `{"hd":{` without
//! re-parsing, so one serialisation is shared by every socket of the room.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{ClientError, StreamId};

/// The envelope as stored in the stream's `body` field (and sent for transient events).
#[derive(Debug, Serialize)]
pub struct StoredBody<'a, B: Serialize + ?Sized = Value> {
    pub hd: StoredHeader<'a>,
    pub bd: &'a B,
}

#[derive(Debug, Serialize)]
pub struct StoredHeader<'a> {
    pub event: &'a str,
    pub role: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<&'a str>,
    pub sid: &'a str,
    pub ts: u64,
    #[serde(flatten)]
    pub extra: &'a Map<String, Value>,
}

/// Serialise an envelope for storage: `hd` first, server fields (`sid`, `ts`) added.
pub fn new_body<B: Serialize + ?Sized>(
    event: &str,
    role: &str,
    cid: Option<&str>,
    sid: &str,
    extra: &Map<String, Value>,
    bd: &B,
) -> String {
    let body = StoredBody {
        hd: StoredHeader {
            event,
            role,
            cid,
            sid,
            ts: now_ms(),
            extra,
        },
        bd,
    };
    // Serialising a struct of strings, numbers and `Value`s cannot fail.
    serde_json::to_string(&body).unwrap_or_else(|_| String::from("{}"))
}

/// A transient (not stored) frame: same shape as a stored envelope, without `hd.id`.
pub fn transient_frame<B: Serialize + ?Sized>(
    event: &str,
    role: &str,
    sid: &str,
    extra: &Map<String, Value>,
    bd: &B,
) -> String {
    new_body(event, role, None, sid, extra, bd)
}

const BODY_PREFIX: &str = r#"{"hd":{"#;

/// The frame delivered for a stored entry: its envelope with `hd.id` set to the stream id.
///
/// Entries the relay wrote take the fast path (a splice). Entries written by hand with
/// redis-cli are parsed and rebuilt; a body that is not an envelope is wrapped as `bd.raw`.
pub fn delivery_frame(id: StreamId, participant: &str, event: &str, body: &str) -> String {
    if let Some(rest) = body.strip_prefix(BODY_PREFIX) {
        if rest.starts_with('"') {
            let mut out = String::with_capacity(body.len() + 32);
            out.push_str(BODY_PREFIX);
            out.push_str("\"id\":\"");
            // Writing to a String cannot fail.
            let _ = write!(out, "{id}");
            out.push_str("\",");
            out.push_str(rest);
            return out;
        }
    }
    let rebuilt = match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(mut env)) if env.get("hd").is_some_and(Value::is_object) => {
            if let Some(Value::Object(hd)) = env.get_mut("hd") {
                hd.insert("id".into(), Value::String(id.to_string()));
            }
            Value::Object(env)
        }
        _ => serde_json::json!({
            "hd": {"id": id.to_string(), "event": event, "role": participant},
            "bd": {"raw": body},
        }),
    };
    rebuilt.to_string()
}

/// The turn a delivered `llm.response` or `llm.error` ends (its `hd.turn_id`), read without
/// parsing: in every frame [`delivery_frame`] splices, `hd.event` follows `hd.id`. `None` for
/// any other frame, and for an entry written by hand (rebuilt, so laid out otherwise).
pub fn ended_turn(frame: &str) -> Option<StreamId> {
    let rest = frame.strip_prefix(r#"{"hd":{"id":""#)?;
    let rest = rest[rest.find('"')?..].strip_prefix(r#"","event":"llm."#)?;
    if !(rest.starts_with("response\"") || rest.starts_with("error\"")) {
        return None;
    }
    // `hd` comes before `bd`, and a `"` inside any string is escaped: the first match is
    // `hd.turn_id`.
    let (_, rest) = rest.split_once(r#""turn_id":""#)?;
    rest[..rest.find('"')?].parse().ok()
}

/// `{"hd":{"event":"chat.ack","cid":..,"id":..},"bd":{}}` — sent to the sender only, after XADD.
/// Written directly rather than through a `Value`: one is built for every message.
pub fn ack_frame(cid: Option<&str>, id: StreamId) -> String {
    let cid = cid
        .and_then(|c| serde_json::to_string(c).ok())
        .unwrap_or_else(|| "null".to_owned());
    format!(r#"{{"hd":{{"event":"chat.ack","cid":{cid},"id":"{id}"}},"bd":{{}}}}"#)
}

/// `{"hd":{"event":"error","code":..,"cid":..},"bd":{"message":..,"retryable":..}}`.
pub fn error_frame(err: &ClientError, cid: Option<&str>) -> String {
    serde_json::json!({
        "hd": {"event": "error", "code": err.code.as_str(), "cid": cid},
        "bd": {"message": err.message, "retryable": err.code.retryable()},
    })
    .to_string()
}

/// `{"hd":{"event":"resume_gap","sid":..,"ts":..},"bd":{"reason":..,"last_id":..,"oldest_id":..,
/// "message":..}}`: the first frame of a resume that cannot be complete. `reason` is `trimmed`
/// (retention), `lost` or `ahead` (the store lost data the client had seen).
pub fn resume_gap_frame(
    sid: &str,
    last: StreamId,
    reason: &str,
    message: &str,
    oldest: Option<StreamId>,
) -> String {
    serde_json::json!({
        "hd": {"event": "resume_gap", "sid": sid, "ts": now_ms()},
        "bd": {
            "reason": reason,
            "last_id": last.to_string(),
            "oldest_id": oldest.map(|i| i.to_string()),
            "message": message,
        },
    })
    .to_string()
}

/// `llm.start` for an attempt at an LLM turn: the reply so far (`bd.text`, up to delta
/// `bd.seq`, -1 before the first) and which attempt it is. Clients set the turn's text to it.
pub fn llm_start_frame(
    sid: &str,
    turn: StreamId,
    model: &str,
    attempt: u32,
    seq: i64,
    text: &str,
) -> String {
    let mut header = Map::new();
    header.insert("turn_id".into(), Value::String(turn.to_string()));
    header.insert("model".into(), Value::String(model.to_owned()));
    let bd = serde_json::json!({"text": text, "seq": seq, "attempt": attempt});
    transient_frame("llm.start", super::LLM_ROLE, sid, &header, &bd)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_turns_are_read_from_the_header_only() {
        let id = StreamId::new(20, 0);
        let frame = |event: &str, hd: Value, bd: Value| {
            let hd = hd.as_object().cloned().unwrap_or_default();
            delivery_frame(
                id,
                "llm",
                event,
                &new_body(event, "llm", None, "r", &hd, &bd),
            )
        };
        let turn = serde_json::json!({"turn_id": "7-1"});
        let empty = serde_json::json!({});
        let response = frame(
            "llm.response",
            turn.clone(),
            serde_json::json!({"text": "x"}),
        );
        assert_eq!(ended_turn(&response), Some(StreamId::new(7, 1)));
        let error = frame(
            "llm.error",
            turn.clone(),
            serde_json::json!({"message": "m"}),
        );
        assert_eq!(ended_turn(&error), Some(StreamId::new(7, 1)));
        assert_eq!(ended_turn(&frame("llm.request", turn, empty.clone())), None);
        // A member's message cannot pass for one: its fields are in `bd`, its quotes escaped.
        let sneaky = serde_json::json!({"event": "llm.response", "turn_id": "7-1",
            "text": r#""event":"llm.response","turn_id":"7-1""#});
        assert_eq!(ended_turn(&frame("chat.message", empty, sneaky)), None);
        assert_eq!(ended_turn("not json"), None);
    }

    #[test]
    fn splice_matches_a_rebuild() {
        let bd = serde_json::json!({"text": "안녕 🎉 \"q\""});
        let body = new_body("chat.message", "A", Some("c1"), "room1", &Map::new(), &bd);
        assert!(body.starts_with(
            r#"{"hd":{"event":"chat.message","role":"A","cid":"c1","sid":"room1","ts":"#
        ));
        assert!(body.contains("안녕 🎉"), "UTF-8 stays unescaped: {body}");
        let id = StreamId::new(17, 2);
        let fast: Value =
            serde_json::from_str(&delivery_frame(id, "A", "chat.message", &body)).unwrap();
        assert_eq!(fast["hd"]["id"], "17-2");
        assert_eq!(fast["hd"]["role"], "A");
        assert_eq!(fast["bd"], bd);
    }

    #[test]
    fn ack_is_valid_json_with_escaped_cid() {
        let v: Value =
            serde_json::from_str(&ack_frame(Some("a\"b\\c"), StreamId::new(5, 1))).unwrap();
        assert_eq!(v["hd"]["event"], "chat.ack");
        assert_eq!(v["hd"]["cid"], "a\"b\\c");
        assert_eq!(v["hd"]["id"], "5-1");
        let v: Value = serde_json::from_str(&ack_frame(None, StreamId::new(5, 1))).unwrap();
        assert!(v["hd"]["cid"].is_null());
    }

    #[test]
    fn foreign_bodies_are_wrapped() {
        let id = StreamId::new(1, 0);
        let v: Value =
            serde_json::from_str(&delivery_frame(id, "B", "chat.message", "hello")).unwrap();
        assert_eq!(v["bd"]["raw"], "hello");
        assert_eq!(v["hd"]["role"], "B");
        let v: Value = serde_json::from_str(&delivery_frame(
            id,
            "B",
            "x",
            r#"{"bd":1,"hd":{"event":"e"}}"#,
        ))
        .unwrap();
        assert_eq!(v["hd"]["id"], "1-0");
        assert_eq!(v["hd"]["event"], "e");
    }
}
