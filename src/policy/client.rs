//! Who the client is: the TCP peer, or — only when the peer is a trusted
//! proxy (`server.trusted_proxies`) — the right-most hop of `X-Forwarded-For`
//! (or, without it, `Forwarded: for=`) that is not itself trusted.
//!
//! Walking from the right means a client cannot choose its own address by
//! sending a forged header: everything left of the first untrusted hop is
//! whatever that client wrote and is ignored.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The client address for rate limits and logs.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let hops: Vec<&str> = if xff.is_empty() {
        headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v)
                })
            })
            .collect()
    } else {
        xff
    };
    let mut client = peer;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) if is_trusted(&ip) => client = ip,
            Some(ip) => return ip,
            // "unknown", an obfuscated name or garbage: nothing to the left
            // of it can be believed.
            None => return client,
        }
    }
    client
}

/// An address from one hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `"[2001:db8::1]:4711"`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim().trim_matches('"');
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = h.parse() {
        return Some(ip);
    }
    let (host, port) = h.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn table() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let lb = ip("10.0.0.2");
        type Case<'a> = (IpAddr, &'a [(&'static str, &'a str)], &'a str);
        let cases: &[Case] = &[
            // Untrusted peer: headers are ignored.
            (
                ip("203.0.113.9"),
                &[("x-forwarded-for", "1.1.1.1")],
                "203.0.113.9",
            ),
            // Trusted peer: right-most untrusted hop.
            (lb, &[("x-forwarded-for", "198.51.100.7")], "198.51.100.7"),
            (
                lb,
                &[("x-forwarded-for", "6.6.6.6, 198.51.100.7")],
                "198.51.100.7",
            ),
            (
                lb,
                &[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.2.3")],
                "198.51.100.7",
            ),
            (
                lb,
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-for", "198.51.100.7"),
                ],
                "198.51.100.7",
            ),
            (
                lb,
                &[("x-forwarded-for", "198.51.100.7:5555")],
                "198.51.100.7",
            ),
            (lb, &[("x-forwarded-for", "2001:db8::1")], "2001:db8::1"),
            // All hops trusted: the left-most.
            (lb, &[("x-forwarded-for", "10.9.9.9, 10.1.1.1")], "10.9.9.9"),
            // Garbage stops the walk at the last trusted hop.
            (
                lb,
                &[("x-forwarded-for", "6.6.6.6, garbage, 10.1.1.1")],
                "10.1.1.1",
            ),
            (lb, &[("x-forwarded-for", "unknown")], "10.0.0.2"),
            // No header: the peer.
            (lb, &[], "10.0.0.2"),
            // Forwarded, used only without X-Forwarded-For.
            (
                lb,
                &[("forwarded", "for=6.6.6.6, for=198.51.100.7;proto=https")],
                "198.51.100.7",
            ),
            (
                lb,
                &[("forwarded", "for=\"[2001:db8::7]:4711\"")],
                "2001:db8::7",
            ),
            (
                lb,
                &[("forwarded", "For=192.0.2.60;proto=http;by=203.0.113.43")],
                "192.0.2.60",
            ),
            (lb, &[("forwarded", "for=_hidden")], "10.0.0.2"),
            (
                lb,
                &[
                    ("forwarded", "for=6.6.6.6"),
                    ("x-forwarded-for", "198.51.100.7"),
                ],
                "198.51.100.7",
            ),
        ];
        for (peer, h, expected) in cases {
            assert_eq!(
                client_ip(*peer, &headers(h), &trusted),
                ip(expected),
                "{peer} {h:?}"
            );
        }
    }
}
