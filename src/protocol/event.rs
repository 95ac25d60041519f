//! Event names (`hd.event`) and which side may emit each.

/// An event a client may send. Parsing a frame yields one of these or a refusal, so the
/// dispatcher's `match` is exhaustive and adding an event is one variant plus one arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A chat line: validated, stored, delivered to the room in stream order.
    ChatMessage,
    /// "Someone is typing": delivered live to the room, never stored.
    ChatTyping,
    /// A question addressed to the LLM participant (`bd.text` or the prior `bd.prompt`).
    LlmRequest,
    /// Stop the LLM turn `bd.turn_id`; stored so the history shows who stopped it.
    LlmCancel,
}

impl EventKind {
    /// Every event a client may send, for "unknown event" errors and the docs.
    pub const CLIENT_EVENTS: &'static [EventKind] = &[
        EventKind::ChatMessage,
        EventKind::ChatTyping,
        EventKind::LlmRequest,
        EventKind::LlmCancel,
    ];

    /// Events only the relay or its LLM participant emit. A client sending one is refused
    /// with `reserved_event` rather than `unknown_event`, which says why.
    pub const SERVER_EVENTS: &'static [&'static str] = &[
        "chat.ack",
        "error",
        "session.created",
        "session.join",
        "session.leave",
        "resume_gap",
        "llm.start",
        "llm.delta",
        "llm.response",
        "llm.error",
        "llm.usage",
        "presence",
    ];

    /// Stored events that are part of the conversation (what people and the LLM said), as the
    /// sessions API lists and counts them; joins, leaves, cancels and notices are not.
    pub const CONVERSATION: &'static [&'static str] =
        &["chat.message", "llm.request", "llm.response", "llm.error"];

    /// The first entry of a room created through `POST /api/sessions`.
    pub const SESSION_CREATED: &'static str = "session.created";

    pub fn name(self) -> &'static str {
        match self {
            EventKind::ChatMessage => "chat.message",
            EventKind::ChatTyping => "chat.typing",
            EventKind::LlmRequest => "llm.request",
            EventKind::LlmCancel => "llm.cancel",
        }
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        Self::CLIENT_EVENTS
            .iter()
            .copied()
            .find(|e| e.name() == name)
    }

    pub fn is_server_event(name: &str) -> bool {
        Self::SERVER_EVENTS.contains(&name)
    }

    /// `"chat.message, chat.typing, ..."` for error messages.
    pub fn client_event_list() -> String {
        Self::CLIENT_EVENTS
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}
