//! The tools talk to this machine only: every URL they are given must name a loopback address,
//! so a typo cannot turn a load test or a fault run against someone else's server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A URL the tools accept, split into what they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopbackUrl {
    /// `ws`, `http` or `redis`.
    pub scheme: String,
    /// `HOST:PORT` as written (for the `Host` header and for URLs built from it).
    pub authority: String,
    pub addr: SocketAddr,
    /// Path and query after the authority (empty, or starting with `/` or `?`).
    pub rest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0}: expected ws://, http:// or redis://HOST:PORT")]
    Scheme(String),
    #[error("{0}: the host must be an IP address or localhost")]
    Host(String),
    #[error("{0}: bad port")]
    Port(String),
    #[error("{0}: not a loopback address (the tools only talk to this machine)")]
    NotLoopback(String),
}

/// Parses `ws://`, `http://` or `redis://` `HOST[:PORT][/path][?query]` with a loopback host:
/// `127.0.0.0/8`, `[::1]` or `localhost` (which means 127.0.0.1; no DNS). User info
/// (`redis://:pw@host`) is skipped. The port defaults to the scheme's (80, 6379).
pub fn parse(url: &str) -> Result<LoopbackUrl, UrlError> {
    let (scheme, after) = url
        .split_once("://")
        .filter(|(s, _)| matches!(*s, "ws" | "http" | "redis"))
        .ok_or_else(|| UrlError::Scheme(url.to_owned()))?;
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let (hostport, rest) = after.split_at(end);
    let authority = hostport.rsplit('@').next().unwrap_or(hostport);
    let default_port = if scheme == "redis" { 6379 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| UrlError::Port(url.to_owned()))?,
        ),
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse().map_err(|_| UrlError::Host(url.to_owned()))?
    };
    if !ip.is_loopback() {
        return Err(UrlError::NotLoopback(url.to_owned()));
    }
    Ok(LoopbackUrl {
        scheme: scheme.to_owned(),
        authority: authority.to_owned(),
        addr: SocketAddr::new(ip, port),
        rest: rest.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        let u = parse("ws://127.0.0.1:3000").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.addr, SocketAddr::from(([127, 0, 0, 1], 3000)));
        assert_eq!(u.rest, "");
        assert!(parse("ws://localhost:3000/").is_ok());
        assert!(parse("ws://[::1]:3000").is_ok());
        assert!(parse("http://127.0.0.2:80/healthz").is_ok_and(|u| u.rest == "/healthz"));
        assert!(parse("redis://:secret@127.0.0.1:6390").is_ok_and(|u| u.addr.port() == 6390));
        assert!(parse("ws://10.0.0.1:3000").is_err());
        assert!(parse("ws://example.com:3000").is_err());
        assert!(parse("wss://127.0.0.1:3000").is_err());
        assert!(parse("ws://127.0.0.1:x").is_err());
    }
}
