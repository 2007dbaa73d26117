//! Who the client is, behind a reverse proxy. Only a peer inside `TRUSTED_PROXIES` is
//! believed about the client's address (`Forwarded: for=`, `X-Forwarded-For`) and about the
//! public host and scheme (`Forwarded: host=/proto=`, `X-Forwarded-Host`, `X-Forwarded-Proto`);
//! from anyone else those headers are ignored, so a client cannot pick its own address to
//! escape the sign-in throttle. Pure: no I/O.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address range, `10.0.0.0/8`, `::1/128`, or one address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address range like 10.0.0.0/8, 127.0.0.1 or ::1/128")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_string());
        let t = s.trim();
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parses a comma-separated `TRUSTED_PROXIES` list (empty entries ignored).
pub fn parse_list(s: &str) -> Result<Vec<Cidr>, CidrError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

fn trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

/// The request's client as this server believes it: put into every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The address the sign-in throttle keys on.
    pub addr: IpAddr,
    /// The public `host[:port]` the client used, as a trusted proxy said.
    pub forwarded_host: Option<String>,
    /// `http` or `https`, as a trusted proxy said.
    pub forwarded_proto: Option<String>,
}

impl Client {
    /// Reads the client from `peer` (the socket's other end) and, only when `peer` is a
    /// trusted proxy, from the forwarding headers.
    pub fn from_parts(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[Cidr]) -> Self {
        let peer = peer.to_canonical();
        if !trusted(trusted_proxies, peer) {
            return Client {
                addr: peer,
                forwarded_host: None,
                forwarded_proto: None,
            };
        }
        let fwd = forwarded_elements(headers);
        // The hops as each proxy appended them, the nearest last; the peer is the last hop.
        let hops: Vec<Option<IpAddr>> = if fwd.is_empty() {
            header_values(headers, "x-forwarded-for")
                .map(parse_node)
                .collect()
        } else {
            fwd.iter()
                .map(|e| e.get("for").and_then(|v| parse_node(v)))
                .collect()
        };
        // Walk back from the nearest hop past every trusted proxy: the first address that is
        // not one is the client. An unreadable hop ends the walk at the last good one.
        let mut addr = peer;
        for hop in hops.iter().rev() {
            if !trusted(trusted_proxies, addr) {
                break;
            }
            match hop {
                Some(ip) => addr = ip.to_canonical(),
                None => break,
            }
        }
        let (host, proto) = match fwd.first() {
            Some(first) => (first.get("host").cloned(), first.get("proto").cloned()),
            None => (
                header_values(headers, "x-forwarded-host")
                    .next()
                    .map(str::to_string),
                header_values(headers, "x-forwarded-proto")
                    .next()
                    .map(str::to_string),
            ),
        };
        Client {
            addr,
            forwarded_host: host.filter(|h| valid_host(h)),
            forwarded_proto: proto
                .map(|p| p.to_ascii_lowercase())
                .filter(|p| p == "http" || p == "https"),
        }
    }
}

/// Every comma-separated value of every `name` header line, in order, trimmed.
fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// RFC 7239 `Forwarded` elements: `for=1.2.3.4;proto=https;host=x, for="[::1]:80"`.
fn forwarded_elements(headers: &HeaderMap) -> Vec<std::collections::HashMap<String, String>> {
    header_values(headers, "forwarded")
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| {
                    (
                        k.trim().to_ascii_lowercase(),
                        v.trim().trim_matches('"').to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:80`, `2001:db8::1`; `unknown` or an
/// obfuscated name is `None`.
fn parse_node(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    v.rsplit_once(':')?
        .0
        .parse::<std::net::Ipv4Addr>()
        .ok()
        .map(IpAddr::V4)
}

/// A host as it may appear in a URL authority: letters, digits, `.-:[]` only.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

/// The authority of an `Origin` (`https://host:port`), with the scheme's default port
/// dropped, lower case; `None` for `null` or anything that is not an origin.
fn origin_parts(origin: &str) -> Option<(String, String)> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if authority.is_empty() || authority.contains('/') {
        return None;
    }
    Some((scheme.clone(), normalize_authority(&scheme, authority)))
}

fn normalize_authority(scheme: &str, authority: &str) -> String {
    let a = authority.to_ascii_lowercase();
    let default = match scheme {
        "https" => ":443",
        "http" => ":80",
        _ => "",
    };
    match a.strip_suffix(default) {
        Some(stripped) if !default.is_empty() => stripped.to_string(),
        _ => a,
    }
}

/// Whether a request with this `Origin` comes from this server's own pages: the origin must
/// name the host the request was sent to (`Host`), the public `DOMAIN`, or the host a
/// trusted proxy forwarded (with its scheme, when the proxy said which).
pub fn origin_allowed(
    origin: &str,
    host_header: Option<&str>,
    domain: Option<&str>,
    client: &Client,
) -> bool {
    let Some((scheme, authority)) = origin_parts(origin) else {
        return false;
    };
    if host_header.is_some_and(|h| normalize_authority(&scheme, h) == authority) {
        return true;
    }
    if let Some(d) = domain {
        let d = d.trim().trim_end_matches('/');
        // DOMAIN may be written as a bare host or as an origin.
        let matches = match origin_parts(d) {
            Some((s, a)) => s == scheme && a == authority,
            None => normalize_authority(&scheme, d) == authority,
        };
        if matches {
            return true;
        }
    }
    if let Some(h) = &client.forwarded_host {
        let proto_ok = client
            .forwarded_proto
            .as_deref()
            .is_none_or(|p| p == scheme);
        if proto_ok && normalize_authority(&scheme, h) == authority {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let lo: Cidr = "127.0.0.1".parse().unwrap();
        assert!(lo.contains(ip("127.0.0.1")));
        assert!(!lo.contains(ip("127.0.0.2")));
        assert!(lo.contains(ip("::ffff:127.0.0.1")), "v4-mapped peers");
        let ten: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(ten.contains(ip("10.200.3.4")) && !ten.contains(ip("11.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("::1")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert_eq!(ten.to_string(), "10.0.0.0/8");
        for bad in [
            "",
            "10.0.0.0/33",
            "::1/129",
            "example.com",
            "10.0.0/8",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(parse_list(" 127.0.0.1, ::1 ,").unwrap().len(), 2);
        assert!(parse_list("127.0.0.1,nope").is_err());
    }

    #[test]
    fn forwarding_headers_only_count_from_a_trusted_peer() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-host", "workshop.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let untrusted = Client::from_parts(ip("198.51.100.7"), &h, &[]);
        assert_eq!(untrusted.addr, ip("198.51.100.7"));
        assert_eq!(untrusted.forwarded_host, None);
        let proxies = parse_list("10.0.0.0/8").unwrap();
        let c = Client::from_parts(ip("198.51.100.7"), &h, &proxies);
        assert_eq!(c.addr, ip("198.51.100.7"), "not a trusted peer");
        let c = Client::from_parts(ip("10.0.0.5"), &h, &proxies);
        assert_eq!(c.addr, ip("203.0.113.9"));
        assert_eq!(c.forwarded_host.as_deref(), Some("workshop.example"));
        assert_eq!(c.forwarded_proto.as_deref(), Some("https"));
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let proxies = parse_list("10.0.0.0/8").unwrap();
        // A client-sent (forged) first entry, then what the trusted proxies appended.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.7")]);
        assert_eq!(
            Client::from_parts(ip("10.0.0.5"), &h, &proxies).addr,
            ip("203.0.113.9")
        );
        // Two header lines count as one list.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            Client::from_parts(ip("10.0.0.5"), &h, &proxies).addr,
            ip("203.0.113.9")
        );
        // Garbage stops the walk at the proxy itself.
        let h = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(
            Client::from_parts(ip("10.0.0.5"), &h, &proxies).addr,
            ip("10.0.0.5")
        );
        // No header: the peer.
        assert_eq!(
            Client::from_parts(ip("10.0.0.5"), &HeaderMap::new(), &proxies).addr,
            ip("10.0.0.5")
        );
    }

    #[test]
    fn rfc7239_forwarded_wins_over_x_forwarded() {
        let proxies = parse_list("127.0.0.1").unwrap();
        let h = headers(&[
            (
                "forwarded",
                r#"for="[2001:db8::1]:4711";proto=https;host=ws.example, for=192.0.2.60:1234"#,
            ),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        let c = Client::from_parts(ip("127.0.0.1"), &h, &proxies);
        assert_eq!(c.addr, ip("192.0.2.60"));
        assert_eq!(c.forwarded_host.as_deref(), Some("ws.example"));
        assert_eq!(c.forwarded_proto.as_deref(), Some("https"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(
            Client::from_parts(ip("127.0.0.1"), &h, &proxies).addr,
            ip("127.0.0.1")
        );
    }

    #[test]
    fn odd_forwarded_hosts_and_protos_are_ignored() {
        let proxies = parse_list("127.0.0.1").unwrap();
        let h = headers(&[
            ("x-forwarded-host", "evil.example/path"),
            ("x-forwarded-proto", "gopher"),
        ]);
        let c = Client::from_parts(ip("127.0.0.1"), &h, &proxies);
        assert_eq!((c.forwarded_host, c.forwarded_proto), (None, None));
    }

    fn direct() -> Client {
        Client {
            addr: ip("127.0.0.1"),
            forwarded_host: None,
            forwarded_proto: None,
        }
    }

    #[test]
    fn the_origin_must_be_this_server() {
        let c = direct();
        assert!(origin_allowed(
            "http://127.0.0.1:8188",
            Some("127.0.0.1:8188"),
            None,
            &c
        ));
        assert!(origin_allowed(
            "HTTP://Example.org",
            Some("example.org"),
            None,
            &c
        ));
        assert!(origin_allowed(
            "https://example.org:443",
            Some("example.org"),
            None,
            &c
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("127.0.0.1:8188"),
            None,
            &c
        ));
        assert!(!origin_allowed("null", Some("127.0.0.1:8188"), None, &c));
        assert!(!origin_allowed(
            "http://127.0.0.1:8188/x",
            Some("127.0.0.1:8188"),
            None,
            &c
        ));
        assert!(!origin_allowed("http://127.0.0.1:8188", None, None, &c));
    }

    #[test]
    fn behind_a_proxy_the_public_origin_is_accepted() {
        // nginx's default `Host $proxy_host`: the Host is the upstream's.
        let upstream = Some("127.0.0.1:8188");
        let c = direct();
        assert!(origin_allowed(
            "https://workshop.example",
            upstream,
            Some("workshop.example"),
            &c
        ));
        assert!(origin_allowed(
            "https://workshop.example",
            upstream,
            Some("https://workshop.example/"),
            &c
        ));
        assert!(!origin_allowed(
            "http://workshop.example",
            upstream,
            Some("https://workshop.example"),
            &c
        ));
        assert!(!origin_allowed(
            "https://evil.example",
            upstream,
            Some("workshop.example"),
            &c
        ));
        let fwd = Client {
            addr: ip("203.0.113.9"),
            forwarded_host: Some("127.0.0.1:9000".into()),
            forwarded_proto: Some("http".into()),
        };
        assert!(origin_allowed(
            "http://127.0.0.1:9000",
            upstream,
            None,
            &fwd
        ));
        assert!(!origin_allowed(
            "https://127.0.0.1:9000",
            upstream,
            None,
            &fwd
        ));
        assert!(!origin_allowed("http://evil.example", upstream, None, &fwd));
    }
}
