//! Every Redis name the relay uses, in one place.
//!
//! | name | type | what |
//! |---|---|---|
//! | `<prefix><sid>` (default `chat:session:<sid>`) | stream | the room's history, one entry per stored envelope, fields `participant`, `event`, `body` |
//! | `<prefix><sid>` | sharded pub/sub channel | live fan-out of the same entries (`<id>\n<body>`) and of transient frames (`-\n<frame>`, LLM frames `-s`/`-d <turn> <attempt> <seq>\n<frame>`) |
//! | group `llm` on each room stream | consumer group | the LLM participant's read position, created at `0` with the room |
//!
//! | `chat:record:{<room key>}` | hash | the session record (`POST /api/sessions`): `created`, `updated` (ms), `metadata` (JSON object), `version` (bumped by every patch) |
//! | `chat:cids:{<room key>}:0`, `…:1` | hash | ids stored for clients' cids (idempotent resend), two generations of the dedup window: field `<sender length>:<sender>:<cid>` → id, `_g` → the generation |
//! | `chat:stats:{<room key>}` | hash | entries ever stored in the room: `p:<participant>` and `e:<event>` → count (`append.lua`, `finish.lua`) |
//! | `chat:rooms` | stream | registry of rooms for LLM workers (`sid` field) |
//! | `chat:llm:turn:{<room key>}:<turn>` | string | lease of a turn being answered, then `done:<reply id>` |
//! | `chat:llm:cancel:{<room key>}:<turn>` | string | a cancelled turn |
//! | `chat:llm:live:{<room key>}:<turn>` | hash | a turn in progress: attempt, text so far and the seq of its last delta, requester; expires shortly after the turn ends |
//! | `chat:llm:active:{<room key>}` | sorted set | turns in progress in the room, by start time |
//! | `chat:llm:attempts:{<room key>}` | hash | attempts started per unfinished turn |
//! | `chat:awake:{<room key>}` | string | the room had an entry within `--room-wake-after` |
//! | `chat:presence:{<room key>}` | hash | per node, its members in the room now (`[{"r","s","c"}]` JSON: role, subject, connections) |
//! | `chat:presence:exp:{<room key>}` | sorted set | per node, when its entry expires unless its heartbeat refreshes it |
//! | `chat:presence:v:{<room key>}` | string | version of the room's presence, bumped on every change |
//! | `chat:llm:turns:{<room key>}` | string | turns finished in the room (each turn's ordinal) |
//! | `chat:usage:outbox:{<room key>}` | sorted set | usage callbacks to deliver, by due time |
//! | `chat:usage:record:{<room key>}` | hash | their bodies and attempt counts |
//! | `chat:usage:outbox:{chat:session::deleted}`, `chat:usage:record:{…}` | sorted set, hash | the outbox of deleted sessions: callbacks they still owed, members `<turn id> <sid>` (`:` is in no session id, so no session's keys are named so) |
//! | `chat:usage:rooms` | sorted set | rooms with callbacks to deliver (by time of the last one added), and `:deleted` |
//! | `chat:usage:dead` | stream | usage callbacks that could not be delivered in time |
//! | `chat:llm:rate:{<room key>}:<window>` | string | LLM turns counted per room per window |
//! | `chat:voice:rate:{<room key>}` | sorted set | the voice dialect's requests of the last minute (`--voice-requests-per-minute`, a sliding window), scored by Redis time; expires with the window |
//! | `chat:llm:cancel` | pub/sub channel | cancel notices to workers (`<sid> <turn>`) |
//! | `chat:llm:wake` | pub/sub channel | on Redis Cluster: a room stored an entry that asks the LLM (`<sid>`) |
//! | `chat:llm:dead` | stream | LLM requests that failed too often |
//! | `chat:deleted` | stream | sessions deleted lately (`sid`), capped at ~10,000: a node whose subscriber missed a room-deleted notice reads it when it subscribes again |
//!
//! Every key a room owns carries the room key as its hash tag (`{chat:session:<sid>}`), so
//! deleting a session (`DELETE /api/sessions/{id}`) removes the fixed names in one script and
//! finds the rest (per-turn keys, rate windows) with `SCAN MATCH
//! *{chat:session:<sid>}*` ([`Keys::room_pattern`]); the global keys (`chat:rooms`,
//! `chat:usage:rooms`, the dead-letter streams, the outbox of deleted sessions) only name the
//! room inside their entries.
//! A room-deleted notice (`-x`) on the room's channel tells every node to close its members.
//!
//! The channel deliberately has the key's name: in Redis Cluster a sharded channel hashes like a
//! key, so publishing from the append script stays on the room's own shard.

use crate::protocol::StreamId;

/// Names derived from the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// The prefix up to its first `:` (`chat:`), for the relay's auxiliary keys.
    root: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        let root = match prefix.find(':') {
            Some(i) => prefix[..=i].to_owned(),
            None => prefix.clone(),
        };
        Self { prefix, root }
    }

    /// `chat:rooms`: a capped stream with one entry per new room (and periodic re-announcements
    /// of active rooms), tailed by LLM workers to discover rooms without scanning keys.
    pub fn rooms_registry(&self) -> String {
        format!("{}rooms", self.root)
    }

    /// `chat:deleted`: recently deleted sessions, for a node whose subscriber was away when the
    /// room-deleted notice went out.
    pub fn deletions(&self) -> String {
        format!("{}deleted", self.root)
    }

    /// `chat:llm:dead`: LLM requests that failed too many deliveries.
    pub fn dead_letters(&self) -> String {
        format!("{}llm:dead", self.root)
    }

    /// `chat:llm:turn:{chat:session:<sid>}:<turn>`: the lease, then the done-marker, of a turn.
    /// The room key is the hash tag, so scripts can use both keys on Redis Cluster.
    pub fn turn(&self, sid: &str, turn: StreamId) -> String {
        format!("{}llm:turn:{{{}}}:{turn}", self.root, self.room(sid))
    }

    /// `SCAN MATCH` pattern for every turn key of a room: what the fault run watches to find a
    /// worker in the middle of a turn (read-only use, by the tools).
    pub fn turns_pattern(&self, sid: &str) -> String {
        format!("{}llm:turn:{{{}}}:*", self.root, self.room(sid))
    }

    /// `chat:llm:cancel:{chat:session:<sid>}:<turn>`: set when someone cancels a turn.
    pub fn cancel_flag(&self, sid: &str, turn: StreamId) -> String {
        format!("{}llm:cancel:{{{}}}:{turn}", self.root, self.room(sid))
    }

    /// `chat:llm:live:{chat:session:<sid>}:<turn>`: the state of a turn in progress.
    pub fn turn_state(&self, sid: &str, turn: StreamId) -> String {
        format!("{}llm:live:{{{}}}:{turn}", self.root, self.room(sid))
    }

    /// `chat:llm:attempts:{chat:session:<sid>}`: attempts started per unfinished turn. Outlives
    /// a turn's live state, so a new attempt always numbers above every earlier one.
    pub fn turn_attempts(&self, sid: &str) -> String {
        format!("{}llm:attempts:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:presence:{chat:session:<sid>}`: per node, its members in the room now.
    pub fn presence(&self, sid: &str) -> String {
        format!("{}presence:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:presence:exp:{chat:session:<sid>}`: when each node's presence entry expires.
    pub fn presence_expiry(&self, sid: &str) -> String {
        format!("{}presence:exp:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:presence:v:{chat:session:<sid>}`: the version of the room's presence.
    pub fn presence_version(&self, sid: &str) -> String {
        format!("{}presence:v:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:awake:{chat:session:<sid>}`: set for the wake window by every append; an append
    /// that finds it gone announces the room to the LLM workers again.
    pub fn awake(&self, sid: &str) -> String {
        format!("{}awake:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:llm:active:{chat:session:<sid>}`: the room's turns in progress.
    pub fn active_turns(&self, sid: &str) -> String {
        format!("{}llm:active:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:llm:turns:{chat:session:<sid>}`: how many turns the room has finished.
    pub fn turn_counter(&self, sid: &str) -> String {
        format!("{}llm:turns:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:usage:outbox:{chat:session:<sid>}`: the room's usage callbacks, by due time.
    pub fn usage_outbox(&self, sid: &str) -> String {
        format!("{}usage:outbox:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:usage:record:{chat:session:<sid>}`: bodies and attempt counts of those callbacks.
    pub fn usage_records(&self, sid: &str) -> String {
        format!("{}usage:record:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:usage:rooms`: rooms with usage callbacks to deliver.
    pub fn usage_rooms(&self) -> String {
        format!("{}usage:rooms", self.root)
    }

    /// `chat:usage:dead`: usage callbacks given up on.
    pub fn usage_dead(&self) -> String {
        format!("{}usage:dead", self.root)
    }

    /// `chat:cids:{chat:session:<sid>}:<0|1>`: the room's recent cids, in two hashes that take
    /// turns by dedup window (see `append.lua`). One hash per window instead of one key per
    /// message: a batch checks and records all its cids with two `HMGET`s and one `HSET`, and
    /// the keyspace does not grow with the traffic. Same hash tag as the room.
    pub fn cid_generations(&self, sid: &str) -> [String; 2] {
        let room = self.room(sid);
        [0, 1].map(|g| format!("{}cids:{{{room}}}:{g}", self.root))
    }

    /// The field naming (sender, cid) in [`Keys::cid_generations`]: `<n>:<sender>:<cid>`.
    ///
    /// `<n>` is the sender's length in bytes, which makes the name injective: a sender may
    /// contain `:` (a JWT `sub` can), and without the length `bob` + `x:c1` and `bob:x` + `c1`
    /// would share a field, so the second message would be taken for a resend of the first.
    pub fn cid_field(sender: &str, cid: &str) -> String {
        format!("{}:{sender}:{cid}", sender.len())
    }

    /// `chat:stats:{chat:session:<sid>}`: the room's counters (entries per participant and per
    /// event), kept by the scripts that append, so room info needs no scan. Same hash tag.
    pub fn stats(&self, sid: &str) -> String {
        format!("{}stats:{{{}}}", self.root, self.room(sid))
    }

    /// `chat:record:{chat:session:<sid>}`: the session record (created, updated, metadata,
    /// version). Same hash tag as the room, so the create and delete scripts touch both.
    pub fn session_record(&self, sid: &str) -> String {
        format!("{}record:{{{}}}", self.root, self.room(sid))
    }

    /// `*{chat:session:<sid>}*`: a `SCAN MATCH` pattern for every key the room owns. Room ids
    /// hold no glob characters (`valid_sid`), so the pattern matches this room only.
    pub fn room_pattern(&self, sid: &str) -> String {
        format!("*{{{}}}*", self.room(sid))
    }

    /// `chat:llm:wake`: channel that wakes LLM workers on Redis Cluster when an entry asks for
    /// an answer.
    pub fn llm_wake_channel(&self) -> String {
        format!("{}llm:wake", self.root)
    }

    /// `chat:llm:cancel`: channel on which cancels reach the worker generating the turn.
    pub fn cancel_channel(&self) -> String {
        format!("{}llm:cancel", self.root)
    }

    /// `chat:llm:rate:{chat:session:<sid>}:<window>`: LLM turns started in one window.
    pub fn turn_rate(&self, sid: &str, window: u64) -> String {
        format!("{}llm:rate:{{{}}}:{window}", self.root, self.room(sid))
    }

    /// `chat:voice:rate:{chat:session:<sid>}`: the voice dialect's recent requests in the room,
    /// for its sliding-window rate limit. Same hash tag as the room.
    pub fn voice_rate(&self, sid: &str) -> String {
        format!("{}voice:rate:{{{}}}", self.root, self.room(sid))
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
pub(crate) mod field {
    pub(crate) const PARTICIPANT: &str = "participant";
    pub(crate) const EVENT: &str = "event";
    pub(crate) const BODY: &str = "body";
}

/// First line of a pub/sub payload for a frame that is not stored (typing, LLM deltas).
pub(crate) const TRANSIENT_MARK: &str = "-";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let k = Keys::new("chat:session:");
        assert_eq!(k.room("room001"), "chat:session:room001");
        assert_eq!(k.sid_of("chat:session:room001"), Some("room001"));
        assert_eq!(k.sid_of("other:room001"), None);
        assert_eq!(k.stats("room001"), "chat:stats:{chat:session:room001}");
        assert_eq!(
            k.turns_pattern("room001"),
            "chat:llm:turn:{chat:session:room001}:*"
        );
        assert_eq!(
            k.session_record("room001"),
            "chat:record:{chat:session:room001}"
        );
        assert_eq!(k.room_pattern("room001"), "*{chat:session:room001}*");
        assert_eq!(
            k.voice_rate("room001"),
            "chat:voice:rate:{chat:session:room001}"
        );
    }

    #[test]
    fn cid_fields_are_injective() {
        let k = Keys::new("chat:session:");
        assert_eq!(Keys::cid_field("bob", "x:c1"), "3:bob:x:c1");
        assert_ne!(
            Keys::cid_field("bob", "x:c1"),
            Keys::cid_field("bob:x", "c1")
        );
        assert_eq!(
            k.cid_generations("r"),
            [
                "chat:cids:{chat:session:r}:0",
                "chat:cids:{chat:session:r}:1"
            ]
        );
    }
}
