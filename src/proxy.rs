//! Proxy headers, read as uvicorn reads them by default: a peer that
//! `--forwarded-allow-ips` trusts (by default this host, `127.0.0.1` and
//! `::1`) may say which scheme the client used (`X-Forwarded-Proto`, for the
//! trailing-slash redirect) and who the client is (`X-Forwarded-For`, for the
//! access log). With `--no-proxy-headers` no peer is trusted.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hyper::header::HeaderName;
use hyper::HeaderMap;
use ipnet::IpNet;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The peers trusted to speak for the client.
#[derive(Debug, Default)]
pub struct Proxies {
    /// `*`: every peer, a Unix socket's too.
    everyone: bool,
    addresses: Vec<IpAddr>,
    networks: Vec<IpNet>,
    /// Entries that are neither an address nor a network, and IPv6
    /// addresses with a scope (`fe80::1%eth0`). uvicorn keeps the first
    /// kind as text, compared with the hosts in `X-Forwarded-For`, and the
    /// second as addresses that only a host with the same scope equals. A
    /// peer's address has no scope here, so neither makes a peer trusted.
    texts: Vec<String>,
}

impl Proxies {
    /// Trusts no peer (`--no-proxy-headers`).
    pub fn none() -> Proxies {
        Proxies::default()
    }

    /// Reads uvicorn's comma-separated list: `*` alone, or addresses,
    /// networks (`10.0.0.0/8`, `10.0.0.0/255.0.0.0`, host bits clear) and
    /// other text. The second value lists the other text that is not empty
    /// nor a scoped IPv6 address, for a warning: an operator who wrote
    /// `10.0.0.1/8` meant a network, and it is not one. An empty list, as
    /// in uvicorn, trusts no peer.
    pub fn parse(list: &str) -> (Proxies, Vec<String>) {
        let mut proxies = Proxies::none();
        // Exactly `*`, as uvicorn compares it: ` *` is text, and trusts
        // nobody.
        if list == "*" {
            proxies.everyone = true;
            return (proxies, Vec::new());
        }
        for entry in list.split(',').map(str::trim) {
            if let Ok(ip) = entry.parse() {
                proxies.addresses.push(ip);
            } else if let Some(net) = entry
                .parse::<IpNet>()
                .ok()
                .or_else(|| ipv4_with_mask(entry))
                .filter(|net| net.trunc() == *net)
            {
                proxies.networks.push(net);
            } else {
                proxies.texts.push(entry.to_owned());
            }
        }
        let texts = proxies
            .texts
            .iter()
            .filter(|t| !t.is_empty() && scoped_ipv6(t).is_none())
            .cloned()
            .collect();
        (proxies, texts)
    }

    /// Whether a connection from `peer` (`None`: a Unix socket) may speak
    /// for its client.
    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        self.everyone
            || peer.is_some_and(|ip| {
                self.addresses.contains(&ip) || self.networks.iter().any(|net| net.contains(&ip))
            })
    }

    /// [`Proxies::trusts`] for a host named in `X-Forwarded-For`. To
    /// Python an IPv6 address with a scope (`fe80::1%eth0`) is an address
    /// too: it equals only an entry with the same address and scope, and a
    /// trusted network holds it whatever its scope.
    fn trusts_named(&self, host: &str) -> bool {
        if let Ok(ip) = host.parse() {
            return self.trusts(Some(ip));
        }
        match scoped_ipv6(host) {
            Some((ip, scope)) => {
                self.everyone
                    || self.networks.iter().any(|n| n.contains(&IpAddr::V6(ip)))
                    || self
                        .texts
                        .iter()
                        .any(|t| scoped_ipv6(t) == Some((ip, scope)))
            }
            None => self.everyone || self.texts.iter().any(|t| t == host),
        }
    }

    /// The scheme the client used: the one named in the last
    /// `X-Forwarded-Proto` when the peer is trusted and the name is exactly
    /// `https`, `ws` or `wss` (trimmed); `http` otherwise.
    pub fn scheme(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> &'static str {
        let named = headers.get_all(X_FORWARDED_PROTO).iter().next_back();
        let named = match named.map(|v| v.as_bytes().trim_ascii()) {
            Some(b"https") => "https",
            Some(b"ws") => "ws",
            Some(b"wss") => "wss",
            _ => return "http",
        };
        if self.trusts(peer) {
            named
        } else {
            "http"
        }
    }

    /// Who sent the request: the peer, unless it is trusted and names a
    /// client in `X-Forwarded-For`. As in uvicorn, every such header counts,
    /// in order, and each proxy adds the address it saw at the end: the
    /// client is the last address no trusted proxy holds, or the first
    /// address when they are all trusted (with `*`, the first).
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<Client> {
        let peer_client = peer.map(Client::Peer);
        let mut forwarded = headers.get_all(X_FORWARDED_FOR).iter().peekable();
        if forwarded.peek().is_none() || !self.trusts(peer.map(|p| p.ip())) {
            return peer_client;
        }
        // A value with bytes past ASCII, which Python would read as
        // latin-1, reads as empty here: no address is written with them.
        let entries: Vec<&str> = forwarded
            .flat_map(|v| v.to_str().unwrap_or_default().split(','))
            .map(str::trim)
            .collect();
        let chosen = if self.everyone {
            entries[0]
        } else {
            entries
                .iter()
                .rev()
                .find(|entry| !self.trusts_named(host_and_port(entry).0))
                .unwrap_or(&entries[0])
        };
        let (host, port) = host_and_port(chosen);
        if host.is_empty() {
            return peer_client;
        }
        Some(Client::Forwarded {
            host: host.to_owned(),
            port,
        })
    }
}

/// One `X-Forwarded-For` entry's host and port, split as uvicorn splits
/// them: `[v6]:port`, `v4:port` or a bare host. Anything else is a host
/// without a port, so that no trust check sees a host the text did not
/// name.
fn host_and_port(entry: &str) -> (&str, Option<i64>) {
    if let Some(bracketed) = entry.strip_prefix('[') {
        let Some((host, rest)) = bracketed.split_once(']') else {
            return (entry, None);
        };
        return match rest.strip_prefix(':') {
            _ if rest.is_empty() => (host, None),
            Some(port) => (host, python_int(port)),
            None => (entry, None),
        };
    }
    match entry.split_once(':') {
        Some((host, port)) if !port.contains(':') => match python_int(port) {
            Some(port) => (host, Some(port)),
            None => (entry, None),
        },
        _ => (entry, None),
    }
}

/// A port as Python's `int()` reads it, as uvicorn reads it: spaces around,
/// a sign, and `_` between digits allowed (`" 80"`, `"+80"`, `"8_0"`).
fn python_int(text: &str) -> Option<i64> {
    // Of Python's whitespace, a header value holds spaces and tabs only.
    let text = text.trim_matches([' ', '\t']);
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    let well_formed = digits
        .split('_')
        .all(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed {
        return None;
    }
    text.replace('_', "").parse().ok()
}

/// An IPv6 address with a scope, `fe80::1%eth0`, as Python's
/// `ip_address` reads one: any scope that is not empty and holds no `%`.
fn scoped_ipv6(text: &str) -> Option<(Ipv6Addr, &str)> {
    let (ip, scope) = text.split_once('%')?;
    if scope.is_empty() || scope.contains('%') {
        return None;
    }
    Some((ip.parse().ok()?, scope))
}

/// An IPv4 network written with a mask rather than a prefix length, as
/// Python's `ip_network`, and so uvicorn, also reads one: a netmask
/// (`10.0.0.0/255.0.0.0`) or, failing that, a host mask
/// (`10.0.0.0/0.255.255.255`); all ones and all zeros read as netmasks.
/// IPv6 networks take a prefix length only, there as here.
fn ipv4_with_mask(entry: &str) -> Option<IpNet> {
    let (address, mask) = entry.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let mask = u32::from(mask.parse::<Ipv4Addr>().ok()?);
    let ones_then_zeros = |m: u32| m.leading_ones() + m.trailing_zeros() == 32;
    let netmask = [mask, !mask].into_iter().find(|&m| ones_then_zeros(m))?;
    IpNet::new(IpAddr::V4(address), netmask.leading_ones() as u8).ok()
}

/// The client of a request, as the access log names it. A forwarded host
/// that is not an IP address is any text a proxy passed on: it is written
/// quoted and escaped (its port after the quotes), so that it cannot pass
/// for other fields of the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Client {
    /// The connection's peer.
    Peer(SocketAddr),
    /// A host (and perhaps port) a trusted proxy named.
    Forwarded { host: String, port: Option<i64> },
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (host, port) = match self {
            Client::Peer(addr) => return addr.fmt(f),
            Client::Forwarded { host, port } => (host, port),
        };
        match (host.parse::<IpAddr>(), port) {
            (Err(_), None) => write!(f, "{host:?}"),
            (Err(_), Some(port)) => write!(f, "{host:?}:{port}"),
            (Ok(_), None) => f.write_str(host),
            (Ok(IpAddr::V6(_)), Some(port)) => write!(f, "[{host}]:{port}"),
            (Ok(IpAddr::V4(_)), Some(port)) => write!(f, "{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Client, Proxies};
    use hyper::HeaderMap;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    /// The client each list gives, for the peer 127.0.0.1:5000: the one
    /// uvicorn's access log named in each case, written as etl-serve writes
    /// it (no `:0` for a missing port, an IPv6 host in brackets, and what
    /// is no address quoted).
    #[test]
    fn the_client_is_the_last_address_no_trusted_proxy_holds() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("127.0.0.1,::1", &[], "127.0.0.1:5000"),
            ("127.0.0.1,::1", &["203.0.113.7"], "203.0.113.7"),
            (
                "127.0.0.1,::1",
                &["203.0.113.7:4711, 127.0.0.1"],
                "203.0.113.7:4711",
            ),
            ("127.0.0.1,::1", &["[2001:db8::1]:80"], "[2001:db8::1]:80"),
            ("127.0.0.1,::1", &[""], "127.0.0.1:5000"),
            ("127.0.0.1,::1", &["garbage text"], "\"garbage text\""),
            ("127.0.0.1,::1", &["x\"y:80"], "\"x\\\"y\":80"),
            // Two headers are one list; the last untrusted entry wins.
            (
                "127.0.0.1,10.0.0.0/8",
                &["198.51.100.1, 192.0.2.9", "10.1.2.3"],
                "192.0.2.9",
            ),
            // All trusted: the first.
            ("127.0.0.1,10.0.0.0/8", &["10.0.0.5, 10.0.0.6"], "10.0.0.5"),
            // `*`: the first, whatever follows.
            ("*", &["198.51.100.1, 192.0.2.9"], "198.51.100.1"),
            // The peer is not trusted: its headers are not read.
            ("10.0.0.0/8", &["203.0.113.7"], "127.0.0.1:5000"),
        ];
        let peer = Some("127.0.0.1:5000".parse().unwrap());
        for (list, forwarded, want) in cases {
            let (proxies, _) = Proxies::parse(list);
            let pairs: Vec<_> = forwarded.iter().map(|v| ("x-forwarded-for", *v)).collect();
            let client = proxies.client(peer, &headers(&pairs)).unwrap();
            assert_eq!(client.to_string(), *want, "{list} {forwarded:?}");
        }
        assert_eq!(
            Proxies::none().client(peer, &headers(&[("x-forwarded-for", "203.0.113.7")])),
            peer.map(Client::Peer)
        );
    }

    #[test]
    fn the_list_takes_addresses_networks_and_keeps_other_text_apart() {
        let (proxies, texts) = Proxies::parse(" 10.0.0.0/8, ::1 ,10.0.0.1/8,,unix:/run/x");
        assert_eq!(texts, ["10.0.0.1/8", "unix:/run/x"]);
        assert!(proxies.trusts(Some("10.200.0.1".parse().unwrap())));
        assert!(proxies.trusts(Some("::1".parse().unwrap())));
        assert!(!proxies.trusts(Some("127.0.0.1".parse().unwrap())));
        assert!(!proxies.trusts(None), "a Unix socket only with *");
        assert!(Proxies::parse("*").0.trusts(None));
        assert!(!Proxies::parse(" * ")
            .0
            .trusts(Some("127.0.0.1".parse().unwrap())));
        assert!(!Proxies::parse("")
            .0
            .trusts(Some("127.0.0.1".parse().unwrap())));
        assert!(!Proxies::none().trusts(Some("127.0.0.1".parse().unwrap())));
    }

    #[test]
    fn ipv4_networks_may_be_written_with_a_mask_as_python_reads_them() {
        let trusted =
            |list: &str, ip: &str| Proxies::parse(list).0.trusts(Some(ip.parse().unwrap()));
        assert!(trusted("10.0.0.0/255.0.0.0", "10.9.9.9"));
        assert!(!trusted("10.0.0.0/255.0.0.0", "11.0.0.1"));
        assert!(trusted("10.0.0.0/0.255.255.255", "10.9.9.9"), "a host mask");
        assert!(trusted("10.0.0.7/255.255.255.255", "10.0.0.7"));
        assert!(!trusted("10.0.0.7/255.255.255.255", "10.0.0.8"));
        assert!(
            trusted("0.0.0.0/0.0.0.0", "192.0.2.1"),
            "all zeros: a netmask, /0"
        );
        assert!(!trusted("0.0.0.0/0.0.0.0", "::1"));
        for text in [
            "10.0.0.0/255.0.255.0",
            "10.0.0.0/255.000.0.0",
            "10.0.0.1/255.0.0.0",
            "10.0.0.0/255.0.0.0/8",
            "2001:db8::/ffff:ffff::",
        ] {
            let (proxies, texts) = Proxies::parse(text);
            assert_eq!(texts, [text], "{text} is no network");
            assert!(!proxies.trusts(Some("10.0.0.1".parse().unwrap())), "{text}");
        }
    }

    #[test]
    fn a_scoped_ipv6_address_is_an_address_in_x_forwarded_for() {
        let (proxies, _) = Proxies::parse("fe80::/10, 2001:db8::1%eth1");
        assert!(proxies.trusts_named("fe80::1%eth0"), "a network holds it");
        assert!(
            proxies.trusts_named("2001:db8::0001%eth1"),
            "the same address and scope"
        );
        assert!(!proxies.trusts_named("2001:db8::1%eth2"), "another scope");
        assert!(!proxies.trusts_named("2001:db8::1"), "no scope");
        assert!(!proxies.trusts_named("fe80::1%"), "an empty scope is text");
        assert!(!proxies.trusts_named("fe80::1%a%b"), "so is one with a %");
        assert!(
            Proxies::parse("fe80::1%eth0").1.is_empty(),
            "an address, not text to warn of"
        );
    }

    #[test]
    fn only_a_trusted_peer_names_the_scheme() {
        let (proxies, _) = Proxies::parse("127.0.0.1");
        let local = Some("127.0.0.1".parse().unwrap());
        let other = Some("127.0.0.2".parse().unwrap());
        let said = |v: &str| headers(&[("x-forwarded-proto", "https"), ("x-forwarded-proto", v)]);
        assert_eq!(proxies.scheme(local, &said(" wss ")), "wss");
        assert_eq!(proxies.scheme(local, &said("HTTPS")), "http");
        assert_eq!(proxies.scheme(other, &said("https")), "http");
        assert_eq!(proxies.scheme(local, &HeaderMap::new()), "http");
    }
}
