//! From a validated envelope to what the relay does with it.
//!
//! The dispatcher is pure: it resolves the speaker's role and turns each [`EventKind`] into an
//! [`Action`]; `ingress` performs the action. Handlers never deliver to the room themselves —
//! stored events reach every member (sender included) through the room's live feed, in stream
//! order, exactly like replayed ones.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::protocol::{
    new_body, transient_frame, ClientError, ErrorCode, EventKind, Inbound, StreamId, DEFAULT_ROLE,
    LLM_ROLE,
};

/// Who may speak as whom.
#[derive(Debug, Clone)]
pub struct RolePolicy {
    allowed: BTreeSet<String>,
}

impl RolePolicy {
    pub fn new(roles: &[String]) -> Self {
        Self {
            allowed: roles
                .iter()
                .filter(|r| r.as_str() != LLM_ROLE)
                .cloned()
                .collect(),
        }
    }

    /// Checks a role a client asked for. `llm` is refused whatever the configuration says.
    pub fn check(&self, role: &str) -> Result<(), ClientError> {
        if role == LLM_ROLE {
            return Err(ClientError::new(
                ErrorCode::ReservedRole,
                "role 'llm' is reserved for the LLM participant",
            ));
        }
        if !self.allowed.contains(role) {
            let allowed: Vec<&str> = self.allowed.iter().map(String::as_str).collect();
            return Err(ClientError::new(
                ErrorCode::InvalidRole,
                format!(
                    "role '{}' is not allowed here; allowed roles: {}",
                    role.chars().take(32).collect::<String>(),
                    allowed.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// What the dispatcher knows about the connection a frame came from.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub sid: String,
    /// The role used when `hd.role` is absent (from `?role=` or `user`).
    pub default_role: String,
    /// A role the connection is bound to (by a token): `hd.role` must match it.
    pub bound_role: Option<String>,
    /// Who is speaking (the token's subject), when authenticated.
    pub sender: Option<String>,
}

impl ConnCtx {
    pub fn new(sid: impl Into<String>, default_role: Option<String>) -> Self {
        Self {
            sid: sid.into(),
            default_role: default_role.unwrap_or_else(|| DEFAULT_ROLE.to_owned()),
            bound_role: None,
            sender: None,
        }
    }
}

/// What to do with an accepted envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Append to the room's stream (which delivers it) and ack the sender with the id.
    Store(StoreEnvelope),
    /// Deliver to the room now; not stored, not acked.
    Publish { frame: String },
}

/// An envelope to store, as the dispatcher built it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEnvelope {
    pub event: &'static str,
    pub role: String,
    pub cid: Option<String>,
    pub body: String,
    /// For `llm.cancel`: the turn to stop once the cancel is stored.
    pub cancels: Option<StreamId>,
}

/// Decide what an envelope means for this connection.
pub fn dispatch(
    inbound: Inbound,
    ctx: &ConnCtx,
    roles: &RolePolicy,
) -> Result<Action, ClientError> {
    let role = resolve_role(inbound.role.as_deref(), ctx, roles)?;
    let Inbound {
        event,
        cid,
        mut extra,
        body,
        ..
    } = inbound;
    if let Some(sub) = &ctx.sender {
        // Who said it, for rules that need more than the role (only the requester may cancel
        // an LLM turn). Clients cannot set it: `sub` is a server header field.
        extra.insert("sub".into(), Value::String(sub.clone()));
    }
    Ok(match event {
        EventKind::ChatMessage | EventKind::LlmRequest | EventKind::LlmCancel => {
            Action::Store(StoreEnvelope {
                event: event.name(),
                cancels: (event == EventKind::LlmCancel)
                    .then(|| {
                        body.as_value()
                            .and_then(|b| b.get("turn_id"))
                            .and_then(Value::as_str)
                            .and_then(|t| t.parse().ok())
                    })
                    .flatten(),
                body: new_body(event.name(), &role, cid.as_deref(), &ctx.sid, &extra, &body),
                role,
                cid,
            })
        }
        EventKind::ChatTyping => Action::Publish {
            frame: transient_frame(event.name(), &role, &ctx.sid, &extra, &body),
        },
    })
}

fn resolve_role(
    requested: Option<&str>,
    ctx: &ConnCtx,
    roles: &RolePolicy,
) -> Result<String, ClientError> {
    if requested == Some(LLM_ROLE) {
        return Err(ClientError::new(
            ErrorCode::ReservedRole,
            "role 'llm' is reserved for the LLM participant",
        ));
    }
    if let (Some(bound), Some(asked)) = (ctx.bound_role.as_deref(), requested) {
        if bound != asked {
            return Err(ClientError::new(
                ErrorCode::RoleMismatch,
                format!("this connection speaks as '{bound}'; hd.role must be '{bound}' or absent"),
            ));
        }
    }
    let role = requested
        .or(ctx.bound_role.as_deref())
        .unwrap_or(&ctx.default_role)
        .to_owned();
    if ctx.bound_role.is_none() {
        roles.check(&role)?;
    }
    Ok(role)
}

/// The body of a server-generated `session.join` / `session.leave` entry.
pub fn presence_body(event: &str, role: &str, sid: &str, conn: &str) -> String {
    let mut extra = Map::new();
    extra.insert("conn".into(), Value::String(conn.to_owned()));
    new_body(event, role, None, sid, &extra, &Value::Object(Map::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_client_frame, Limits};

    fn run(text: &str, ctx: &ConnCtx) -> Result<Action, ClientError> {
        let roles = RolePolicy::new(&["A".into(), "B".into(), "user".into()]);
        let inb = parse_client_frame(text, &Limits::default()).map_err(|r| r.error)?;
        dispatch(inb, ctx, &roles)
    }

    #[test]
    fn roles() {
        let ctx = ConnCtx::new("r1", None);
        let ok = run(
            r#"{"hd":{"event":"chat.message","role":"A"},"bd":{"text":"hi"}}"#,
            &ctx,
        )
        .unwrap();
        assert!(matches!(ok, Action::Store(StoreEnvelope { ref role, .. }) if role == "A"));
        let dflt = run(
            r#"{"hd":{"event":"chat.message"},"bd":{"text":"hi"}}"#,
            &ctx,
        )
        .unwrap();
        assert!(matches!(dflt, Action::Store(StoreEnvelope { ref role, .. }) if role == "user"));
        let llm = run(
            r#"{"hd":{"event":"chat.message","role":"llm"},"bd":{"text":"hi"}}"#,
            &ctx,
        )
        .unwrap_err();
        assert_eq!(llm.code, ErrorCode::ReservedRole);
        let bad = run(
            r#"{"hd":{"event":"chat.message","role":"Z"},"bd":{"text":"hi"}}"#,
            &ctx,
        )
        .unwrap_err();
        assert_eq!(bad.code, ErrorCode::InvalidRole);
        let mut bound = ConnCtx::new("r1", None);
        bound.bound_role = Some("A".into());
        let mism = run(
            r#"{"hd":{"event":"chat.message","role":"B"},"bd":{"text":"hi"}}"#,
            &bound,
        )
        .unwrap_err();
        assert_eq!(mism.code, ErrorCode::RoleMismatch);
    }

    #[test]
    fn typing_is_published_not_stored() {
        let ctx = ConnCtx::new("r1", Some("B".into()));
        let a = run(r#"{"hd":{"event":"chat.typing"}}"#, &ctx).unwrap();
        let Action::Publish { frame } = a else {
            panic!("typing must not be stored")
        };
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["hd"]["role"], "B");
        assert_eq!(v["hd"]["sid"], "r1");
    }
}
