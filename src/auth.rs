//! Who may join which room as which role: `--auth none` (development: roles from `hd.role`,
//! `llm` still reserved) or `--auth jwt` (the token names the room(s), the role and the subject).
//!
//! Tokens come as `?token=`, `Authorization: Bearer`, or — for browsers, which cannot set
//! headers on a WebSocket — the `Sec-WebSocket-Protocol` list `["bearer", "<token>"]`, answered
//! with the `bearer` protocol. The algorithm is pinned by configuration, never read from the
//! token. Tokens are never logged.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::{header, HeaderMap, StatusCode};
use clap::{Args, ValueEnum};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::{now_ms, valid_role_name, valid_sid, ClientError, ErrorCode, LLM_ROLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No authentication: clients choose their role (never `llm`).
    None,
    /// A signed JWT binds the connection to room(s), a role and a subject.
    Jwt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

/// Authentication and origin flags.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// `none` (development) or `jwt`.
    #[arg(long, env = "RELAY_AUTH", value_enum, default_value_t = AuthMode::None)]
    pub auth: AuthMode,
    /// Shared secret for HS256 tokens.
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256 / ES256 / EdDSA tokens.
    #[arg(long, env = "RELAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// The one algorithm accepted (default: HS256 with a secret; required with a public key).
    #[arg(long, env = "RELAY_JWT_ALGORITHM", value_enum)]
    pub jwt_algorithm: Option<JwtAlgorithm>,
    /// Page origins allowed to use the relay from a browser — WebSockets and HTTP calls
    /// (comma-separated, e.g. `https://chat.example.com`; `*` for any). Always allowed: loopback
    /// origins, and clients sending no Origin. A relay serving its page on a public name lists
    /// that origin here.
    #[arg(long, env = "RELAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

/// A configuration the authenticator cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("--auth jwt needs --jwt-secret or --jwt-public-key")]
    NoKey,
    #[error("--jwt-secret and --jwt-public-key exclude each other")]
    BothKeys,
    #[error("--jwt-public-key needs --jwt-algorithm RS256, ES256 or EdDSA")]
    NeedsAlgorithm,
    #[error("--jwt-algorithm HS256 needs --jwt-secret")]
    SecretForHs256,
    #[error("cannot read --jwt-public-key")]
    ReadKey(#[source] std::io::Error),
    #[error("--jwt-public-key is not a valid PEM key for the algorithm")]
    BadKey(#[source] jsonwebtoken::errors::Error),
}

/// `sid` claim: one room, or a list; an entry ending in `*` matches by prefix (`*` = any room).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum RoomClaim {
    One(String),
    Many(Vec<String>),
}

impl RoomClaim {
    pub(crate) fn allows(&self, sid: &str) -> bool {
        let matches = |p: &String| match p.strip_suffix('*') {
            Some(prefix) => sid.starts_with(prefix),
            None => p == sid,
        };
        match self {
            RoomClaim::One(p) => matches(p),
            RoomClaim::Many(ps) => ps.iter().any(matches),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub sub: String,
    pub sid: RoomClaim,
    pub role: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// What a connection may do, once authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The token's subject: the sender identity for idempotent resends.
    pub sub: Option<String>,
    /// The role the connection speaks as; `hd.role` must match it.
    pub role: Option<String>,
    /// When the token expires (ms since the epoch); the connection is closed then.
    pub expires_at_ms: Option<u64>,
}

impl Grant {
    /// When a connection (WebSocket or event stream) on this grant must end: the token's expiry
    /// as a tokio deadline. `None` for grants without a token.
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        let at_ms = self.expires_at_ms?;
        let left = at_ms.saturating_sub(now_ms());
        Some(tokio::time::Instant::now() + Duration::from_millis(left))
    }
}

/// A refusal at the door: HTTP status plus a client error.
#[derive(Debug, Clone)]
pub(crate) struct Denied {
    pub status: StatusCode,
    pub error: ClientError,
}

impl Denied {
    fn new(status: StatusCode, code: ErrorCode, message: &'static str) -> Self {
        Self {
            status,
            error: ClientError::new(code, message),
        }
    }
}

/// Leeway for clock skew on `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 30;

#[derive(Clone)]
pub(crate) struct Authenticator {
    mode: AuthMode,
    key: Option<DecodingKey>,
    validation: Validation,
    allowed_origins: Vec<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Authenticator {
    pub(crate) fn from_args(args: &AuthArgs) -> Result<Self, AuthConfigError> {
        let allowed_origins = args
            .allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        let (key, algorithm) = match args.auth {
            AuthMode::None => (None, Algorithm::HS256),
            AuthMode::Jwt => {
                let (key, alg) = match (&args.jwt_secret, &args.jwt_public_key, args.jwt_algorithm)
                {
                    (Some(_), Some(_), _) => return Err(AuthConfigError::BothKeys),
                    (None, None, _) => return Err(AuthConfigError::NoKey),
                    (Some(secret), None, None | Some(JwtAlgorithm::Hs256)) => (
                        DecodingKey::from_secret(secret.as_bytes()),
                        Algorithm::HS256,
                    ),
                    (Some(_), None, Some(_)) => return Err(AuthConfigError::NeedsAlgorithm),
                    (None, Some(_), None | Some(JwtAlgorithm::Hs256)) => {
                        return Err(if args.jwt_algorithm.is_some() {
                            AuthConfigError::SecretForHs256
                        } else {
                            AuthConfigError::NeedsAlgorithm
                        })
                    }
                    (None, Some(path), Some(alg)) => {
                        let pem = std::fs::read(path).map_err(AuthConfigError::ReadKey)?;
                        let (key, alg) = match alg {
                            JwtAlgorithm::Rs256 => {
                                (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256)
                            }
                            JwtAlgorithm::Es256 => {
                                (DecodingKey::from_ec_pem(&pem), Algorithm::ES256)
                            }
                            JwtAlgorithm::EdDsa => {
                                (DecodingKey::from_ed_pem(&pem), Algorithm::EdDSA)
                            }
                            JwtAlgorithm::Hs256 => return Err(AuthConfigError::SecretForHs256),
                        };
                        (key.map_err(AuthConfigError::BadKey)?, alg)
                    }
                };
                (Some(key), alg)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            mode: args.auth,
            key,
            validation,
            allowed_origins,
        })
    }

    /// Checks a token for a room. With `--auth none` every request gets an empty grant.
    pub(crate) fn authorize(&self, token: Option<&str>, sid: &str) -> Result<Grant, Denied> {
        let Some(claims) = self.verified(token)? else {
            return Ok(Grant::default());
        };
        if !claims.sid.allows(sid) {
            return Err(Denied::new(
                StatusCode::FORBIDDEN,
                ErrorCode::ForbiddenRoom,
                "the token does not grant this room",
            ));
        }
        Ok(grant(claims))
    }

    /// Checks a token before any room is named: a connection whose frames each name their
    /// session (the evaluation dialect's `/chat`) is let in here, and each frame's room is
    /// checked with [`Authenticator::authorize`].
    pub(crate) fn authenticate(&self, token: Option<&str>) -> Result<Grant, Denied> {
        Ok(self.verified(token)?.map(grant).unwrap_or_default())
    }

    /// The token's claims, checked (`None` with `--auth none`).
    fn verified(&self, token: Option<&str>) -> Result<Option<Claims>, Denied> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(Denied::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "a token is required: ?token=, Authorization: Bearer, or the WebSocket protocol list [\"bearer\", token]",
            ));
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            let (code, message) = match e.kind() {
                ErrorKind::ExpiredSignature => (ErrorCode::TokenExpired, "the token has expired"),
                ErrorKind::ImmatureSignature => {
                    (ErrorCode::TokenInvalid, "the token is not valid yet")
                }
                ErrorKind::InvalidSignature => (
                    ErrorCode::TokenInvalid,
                    "the token's signature is not valid",
                ),
                ErrorKind::InvalidAlgorithm => (
                    ErrorCode::TokenInvalid,
                    "the token uses an algorithm this relay does not accept",
                ),
                _ => (
                    ErrorCode::TokenInvalid,
                    "the token is malformed or lacks required claims (sub, sid, role, exp)",
                ),
            };
            Denied::new(StatusCode::UNAUTHORIZED, code, message)
        })?;
        let claims = data.claims;
        let now = now_ms() / 1000;
        if claims.iat.is_some_and(|iat| iat > now + LEEWAY_SECS) {
            return Err(Denied::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::TokenInvalid,
                "the token was issued in the future",
            ));
        }
        if claims.role == LLM_ROLE {
            return Err(Denied::new(
                StatusCode::FORBIDDEN,
                ErrorCode::ReservedRole,
                "role 'llm' is reserved for the LLM participant",
            ));
        }
        if !valid_role_name(&claims.role) {
            return Err(Denied::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::TokenInvalid,
                "the token's role is not a valid role name",
            ));
        }
        Ok(Some(claims))
    }

    /// The origin rule for browser requests (WebSocket handshakes and HTTP calls alike): a page
    /// may use the relay only from an origin in `--allowed-origins` (`*`: any) or a loopback
    /// origin (`localhost`, `127.0.0.0/8`, `[::1]`). Requests without `Origin` do not come from a
    /// page and are allowed. The `Host` header is never compared: a DNS-rebinding page at
    /// `evil.example` sends `Host: evil.example` too, so a relay that serves its page on a
    /// public name must list that origin.
    pub(crate) fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self
            .allowed_origins
            .iter()
            .any(|o| *o == origin || o == "*")
        {
            return true;
        }
        let Some(host_part) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        let host_name = match host_part.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => host_part,
        };
        host_name == "localhost"
            || host_name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

fn grant(claims: Claims) -> Grant {
    Grant {
        sub: Some(claims.sub),
        role: Some(claims.role),
        expires_at_ms: Some(claims.exp.saturating_mul(1000)),
    }
}

/// The token of a request, from `?token=`, `Authorization: Bearer`, or the WebSocket protocol
/// list. Returns it and whether it came as a protocol (then the `bearer` protocol is answered).
pub(crate) fn request_token(
    query_token: Option<&str>,
    headers: &HeaderMap,
) -> (Option<String>, bool) {
    if let Some(t) = query_token.filter(|t| !t.is_empty()) {
        return (Some(t.to_owned()), false);
    }
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
        {
            return (Some(t.trim().to_owned()), false);
        }
    }
    if let Some(protocols) = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
    {
        let list: Vec<&str> = protocols.split(',').map(str::trim).collect();
        if let Some(pos) = list.iter().position(|p| p.eq_ignore_ascii_case("bearer")) {
            if let Some(t) = list.get(pos + 1) {
                return (Some((*t).to_owned()), true);
            }
        }
    }
    (None, false)
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("--sid: not a room id or pattern")]
    BadSid,
    #[error("--role: not a valid role, or 'llm' (reserved)")]
    BadRole,
    #[error("signing failed")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// An HS256 token for humans (Postman, the browser page, tests).
pub fn mint(
    secret: &str,
    sids: &[String],
    role: &str,
    sub: &str,
    ttl: Duration,
) -> Result<String, MintError> {
    let pattern_ok = |s: &String| s == "*" || valid_sid(s.strip_suffix('*').unwrap_or(s));
    if sids.is_empty() || !sids.iter().all(pattern_ok) {
        return Err(MintError::BadSid);
    }
    if role == LLM_ROLE || !valid_role_name(role) {
        return Err(MintError::BadRole);
    }
    let now = now_ms() / 1000;
    let claims = Claims {
        sub: sub.to_owned(),
        sid: if sids.len() == 1 {
            RoomClaim::One(sids[0].clone())
        } else {
            RoomClaim::Many(sids.to_vec())
        },
        role: role.to_owned(),
        exp: now + ttl.as_secs(),
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(MintError::Sign)
}

/// Parses `90`, `90s`, `15m`, `1h`, `2d`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit in {s} (use s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(secret: &str) -> Authenticator {
        Authenticator::from_args(&AuthArgs {
            auth: AuthMode::Jwt,
            jwt_secret: Some(secret.into()),
            jwt_public_key: None,
            jwt_algorithm: None,
            allowed_origins: vec!["https://chat.example.com".into()],
        })
        .unwrap()
    }

    #[test]
    fn mint_then_authorize() {
        let a = jwt("s3cret");
        let t = mint(
            "s3cret",
            &["room001".into()],
            "A",
            "alice",
            Duration::from_secs(60),
        )
        .unwrap();
        let g = a.authorize(Some(&t), "room001").unwrap();
        assert_eq!(g.role.as_deref(), Some("A"));
        assert_eq!(g.sub.as_deref(), Some("alice"));
        assert_eq!(
            a.authorize(Some(&t), "room002").unwrap_err().error.code,
            ErrorCode::ForbiddenRoom
        );
        let other = mint(
            "other",
            &["room001".into()],
            "A",
            "alice",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            a.authorize(Some(&other), "room001").unwrap_err().error.code,
            ErrorCode::TokenInvalid
        );
        assert_eq!(
            a.authorize(None, "room001").unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert!(mint("s", &["room001".into()], "llm", "x", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn room_patterns() {
        assert!(RoomClaim::One("*".into()).allows("any"));
        assert!(RoomClaim::One("team-*".into()).allows("team-7"));
        assert!(!RoomClaim::One("team-*".into()).allows("other"));
        assert!(RoomClaim::Many(vec!["a".into(), "b".into()]).allows("b"));
    }

    #[test]
    fn origins() {
        let a = jwt("s");
        let h = |origin: &str, host: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ORIGIN, origin.parse().unwrap());
            m.insert(header::HOST, host.parse().unwrap());
            a.origin_allowed(&m)
        };
        assert!(h("http://localhost:5173", "relay:3000"));
        assert!(h("http://127.0.0.1:3000", "relay:3000"));
        assert!(h("http://127.0.0.2:3000", "relay:3000"));
        assert!(h("http://[::1]:3000", "relay:3000"));
        assert!(h("https://chat.example.com", "relay:3000"));
        assert!(
            !h("http://relay.internal:3000", "relay.internal:3000"),
            "Host is not trusted: list the page's origin"
        );
        assert!(!h("http://evil.example", "evil.example"), "DNS rebinding");
        assert!(!h("https://evil.example", "relay:3000"));
        assert!(!h("http://localhost.evil.example", "relay:3000"));
        assert!(!h("null", "relay:3000"));
        assert!(
            a.origin_allowed(&HeaderMap::new()),
            "no Origin: not a browser page"
        );
    }

    #[test]
    fn tokens_from_protocols_and_headers() {
        let mut m = HeaderMap::new();
        m.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "bearer, abc.def.ghi".parse().unwrap(),
        );
        assert_eq!(request_token(None, &m), (Some("abc.def.ghi".into()), true));
        let mut m = HeaderMap::new();
        m.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(request_token(None, &m), (Some("xyz".into()), false));
        assert_eq!(request_token(Some("q"), &m), (Some("q".into()), false));
    }

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert!(parse_ttl("1y").is_err());
    }
}
