//! The client's address: the TCP peer, or — only when the peer is a trusted proxy
//! (`--trusted-proxies`) — the rightmost hop of `Forwarded` (RFC 7239) or `X-Forwarded-For`
//! that is not itself a trusted proxy. Every per-address limit, log line and span uses this one
//! value, so behind a proxy one abuser is limited alone instead of locking everyone out.
//!
//! Rightmost, because each proxy appends the address it received from: the hops left of the
//! nearest untrusted one were written by the client and prove nothing.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::header::FORWARDED;
use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The address a request is attributed to (a request extension set for every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientAddr(pub(crate) IpAddr);

impl ClientAddr {
    /// The key of per-address limits: the address, or for IPv6 its /64 (one subscriber's
    /// network: a host there can pick any of 2^64 addresses).
    pub(crate) fn limit_key(self) -> IpAddr {
        match self.0 {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        }
    }
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `--trusted-proxies`: networks whose connections may name the client in forwarding headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustedProxies {
    nets: Vec<IpNet>,
}

/// A `--trusted-proxies` entry that is neither an address nor a CIDR network.
#[derive(Debug, thiserror::Error)]
#[error("--trusted-proxies: '{0}' is not an IP address or CIDR network (e.g. 10.0.0.0/8)")]
pub struct BadProxy(pub String);

impl TrustedProxies {
    /// Parses `10.0.0.0/8`, `192.0.2.7` (one address) or `fd00::/8` entries.
    pub(crate) fn parse(entries: &[String]) -> Result<Self, BadProxy> {
        let nets = entries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| BadProxy(e.to_owned()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { nets })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request that came from `peer` with `headers`.
    pub(crate) fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> ClientAddr {
        let peer = peer.ip().to_canonical();
        if !self.contains(peer) {
            return ClientAddr(peer);
        }
        let hops = forwarded_for(headers).or_else(|| x_forwarded_for(headers));
        let Some(hops) = hops else {
            return ClientAddr(peer);
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                // Unparseable (`unknown`, an obfuscated name): the hop that wrote it is the
                // last one we can name.
                None => break,
                Some(ip) if self.contains(*ip) => client = *ip,
                Some(ip) => return ClientAddr(*ip),
            }
        }
        ClientAddr(client)
    }
}

/// The `for=` of every `Forwarded` element, in order (all headers), or `None` without any.
fn forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all(FORWARDED) {
        let Ok(value) = value.to_str() else {
            hops.push(None);
            continue;
        };
        for element in value.split(',') {
            let node = element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
            });
            if let Some(node) = node {
                hops.push(parse_node(node.trim_matches('"')));
            }
        }
    }
    (!hops.is_empty()).then_some(hops)
}

/// Every address of `X-Forwarded-For`, in order (all headers), or `None` without any.
fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        match value.to_str() {
            Ok(v) => hops.extend(v.split(',').map(|h| parse_node(h.trim()))),
            Err(_) => hops.push(None),
        }
    }
    (!hops.is_empty()).then_some(hops)
}

/// `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711` or a bare IPv6.
fn parse_node(node: &str) -> Option<IpAddr> {
    let ip = if let Some(rest) = node.strip_prefix('[') {
        rest.split_once(']')?.0.parse().ok()?
    } else if let Ok(ip) = node.parse::<IpAddr>() {
        ip
    } else {
        node.parse::<SocketAddr>().ok()?.ip()
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn client(trusted: &[&str], peer: &str, pairs: &[(&str, &str)]) -> String {
        let t = TrustedProxies::parse(&trusted.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        t.client(peer.parse().unwrap(), &headers(pairs)).to_string()
    }

    #[test]
    fn headers_count_only_from_trusted_peers() {
        let xff = [("x-forwarded-for", "203.0.113.9")];
        assert_eq!(client(&[], "198.51.100.1:5000", &xff), "198.51.100.1");
        assert_eq!(
            client(&["10.0.0.0/8"], "198.51.100.1:5000", &xff),
            "198.51.100.1",
            "an untrusted peer cannot pick its address"
        );
        assert_eq!(
            client(&["10.0.0.0/8"], "10.1.2.3:5000", &xff),
            "203.0.113.9"
        );
        assert_eq!(
            client(&["10.0.0.0/8"], "10.1.2.3:5000", &[]),
            "10.1.2.3",
            "no header: the proxy itself"
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_wins() {
        let trusted = ["10.0.0.0/8", "192.0.2.7"];
        // The client wrote a fake first hop; the proxies appended the real one.
        let xff = [("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.2")];
        assert_eq!(client(&trusted, "192.0.2.7:1", &xff), "203.0.113.9");
        let split = [
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ];
        assert_eq!(client(&trusted, "10.0.0.1:1", &split), "203.0.113.9");
        let all_trusted = [("x-forwarded-for", "10.9.9.9, 10.0.0.2")];
        assert_eq!(client(&trusted, "10.0.0.1:1", &all_trusted), "10.9.9.9");
        let garbage = [("x-forwarded-for", "203.0.113.9, nonsense, 10.0.0.2")];
        assert_eq!(client(&trusted, "10.0.0.1:1", &garbage), "10.0.0.2");
    }

    #[test]
    fn forwarded_takes_precedence_and_is_parsed() {
        let trusted = ["10.0.0.0/8"];
        let h = [
            (
                "forwarded",
                r#"for=1.1.1.1;proto=http, for="[2001:db8:cafe::17]:4711";by=10.0.0.1"#,
            ),
            ("forwarded", "for=10.0.0.5"),
            ("x-forwarded-for", "198.51.100.3"),
        ];
        assert_eq!(client(&trusted, "10.0.0.1:1", &h), "2001:db8:cafe::17");
        let port = [("forwarded", r#"For="192.0.2.43:47011""#)];
        assert_eq!(client(&trusted, "10.0.0.1:1", &port), "192.0.2.43");
        let unknown = [("forwarded", "for=unknown")];
        assert_eq!(client(&trusted, "10.0.0.1:1", &unknown), "10.0.0.1");
    }

    #[test]
    fn mapped_addresses_and_v6_keys() {
        assert_eq!(
            client(
                &["127.0.0.1"],
                "[::ffff:127.0.0.1]:1",
                &[("x-forwarded-for", "::ffff:203.0.113.9")]
            ),
            "203.0.113.9"
        );
        let a = ClientAddr("2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(a.limit_key().to_string(), "2001:db8:1:2::");
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["proxy.local".into()]).is_err());
    }
}
