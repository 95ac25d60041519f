//! Every Redis name the relay uses, in one place.
//!
//! | name | type | what |
//! |---|---|---|
//! | `<prefix><sid>` (default `chat:session:<sid>`) | stream | the room's history, one entry per stored envelope, fields `participant`, `event`, `body` |
//! | `<prefix><sid>` | pub/sub channel | live fan-out of the same entries (`<id>\n<body>`) and of transient frames (`-\n<frame>`) |
//! | group `llm` on each room stream | consumer group | the LLM participant's read position, created at `0` with the room |
//!
//! The channel deliberately has the key's name: in Redis Cluster a sharded channel hashes like a
//! key, so publishing from the append script stays on the room's own shard.

/// Names derived from the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The room's stream key, e.g. `chat:session:room001`.
    pub fn room(&self, sid: &str) -> String {
        format!("{}{sid}", self.prefix)
    }

    /// The room's live channel; same name as the stream (see module docs).
    pub fn channel(&self, sid: &str) -> String {
        self.room(sid)
    }

    /// The room id of a channel or key name, if it is one of ours.
    pub fn sid_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(self.prefix.as_str())
    }
}

/// Stream entry field names, as the prior design wrote them (redis-cli shows these).
pub mod field {
    pub const PARTICIPANT: &str = "participant";
    pub const EVENT: &str = "event";
    pub const BODY: &str = "body";
}

/// First line of a pub/sub payload for a frame that is not stored (typing, LLM deltas).
pub const TRANSIENT_MARK: &str = "-";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let k = Keys::new("chat:session:");
        assert_eq!(k.room("room001"), "chat:session:room001");
        assert_eq!(k.sid_of("chat:session:room001"), Some("room001"));
        assert_eq!(k.sid_of("other:room001"), None);
    }
}
