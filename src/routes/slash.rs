//! The reference's answer to one of its routes with a trailing slash
//! (`/id/`): a 307 to the route, at a location built as Starlette builds
//! it: scheme (as a trusted proxy names it, see `proxy`), authority, the
//! path without its slashes, and the query.

use std::net::{IpAddr, Ipv6Addr};

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::Request;
use nix::sys::socket::{getsockname, SockaddrStorage};

use super::{decoded_path, route_of};
use crate::conn::Conn;
use crate::metrics::Route;
use crate::proxy::Proxies;

/// The location to redirect a path with trailing slashes to, when the path
/// without them is one of the reference's routes.
pub fn without_trailing_slash(
    req: &Request<Incoming>,
    conn: &Conn,
    proxies: &Proxies,
) -> Option<HeaderValue> {
    let path = decoded_path(req.uri().path());
    let bare = path.trim_end_matches('/');
    if bare.len() == path.len() || bare.is_empty() {
        return None;
    }
    let reference_route = matches!(
        route_of(bare),
        Route::invoke
            | Route::schema
            | Route::id
            | Route::precheck
            | Route::metadata
            | Route::openapi
            | Route::docs
    );
    if !reference_route {
        return None;
    }
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let scheme = proxies.scheme(conn.peer().map(|p| p.ip()), req.headers());
    let location = match authority(req, conn, scheme) {
        Some(authority) => format!("{scheme}://{authority}{bare}{query}"),
        None => format!("{bare}{query}"),
    };
    HeaderValue::from_str(&location).ok()
}

/// The `Host` header when Starlette takes it as valid; otherwise the
/// address the connection came in on (its port left out when it is the
/// scheme's own); `None` on a Unix socket, where the location is then the
/// path alone.
fn authority(req: &Request<Incoming>, conn: &Conn, scheme: &str) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if let Some(host) = host.filter(|h| valid_host(h)) {
        return Some(host.to_owned());
    }
    let (ip, port) = conn.peek_socket(|fd| address(getsockname(fd))).flatten()?;
    let host = match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let default_port = if matches!(scheme, "https" | "wss") {
        443
    } else {
        80
    };
    Some(if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    })
}

/// An IP socket's address, from `getsockname`.
fn address(named: nix::Result<SockaddrStorage>) -> Option<(IpAddr, u16)> {
    let named = named.ok()?;
    if let Some(v4) = named.as_sockaddr_in() {
        return Some((IpAddr::V4(v4.ip()), v4.port()));
    }
    named
        .as_sockaddr_in6()
        .map(|v6| (IpAddr::V6(v6.ip()), v6.port()))
}

/// Whether Starlette takes `host` as a `Host` header: a name, a bracketed
/// IPv6 address or IPvFuture literal, then perhaps a port no larger than
/// 65535 (leading zeros aside).
fn valid_host(host: &str) -> bool {
    let (name_ok, rest) = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((literal, rest)) => (ip_literal(literal), rest),
            None => return false,
        },
        None => {
            let end = host.find(':').unwrap_or(host.len());
            let name = &host[..end];
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~%!$&'()*+,;=-".contains(&b));
            (name_ok, &host[end..])
        }
    };
    let port_ok = match rest.strip_prefix(':') {
        None => rest.is_empty(),
        Some(port) => {
            let significant = port.trim_start_matches('0');
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && significant.len() <= 5
                && significant.parse::<u32>().unwrap_or(0) <= 65535
        }
    };
    name_ok && port_ok
}

/// What may stand between the brackets: an IPv6 address, or an IPvFuture
/// literal (`v1.anything`).
fn ip_literal(literal: &str) -> bool {
    if let Some(future) = literal.strip_prefix('v') {
        let Some((version, rest)) = future.split_once('.') else {
            return false;
        };
        return !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_hexdigit())
            && !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~!$&'()*+,;=:-".contains(&b));
    }
    literal.contains(':') && literal.parse::<Ipv6Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn hosts_are_taken_as_starlette_takes_them() {
        for host in [
            "t",
            "x:99",
            "x:0080",
            "example.com:65535",
            "a-b_c~d",
            "[::1]",
            "[::1]:8080",
            "[::ffff:1.2.3.4]",
            "[v1.x:y]",
        ] {
            assert!(valid_host(host), "{host}");
        }
        for host in [
            "",
            "a b",
            "x:",
            "x:65536",
            "x:0123456",
            "x:8a",
            "[:1",
            "[::1]]",
            "[zz]",
            "[::1",
            "[::1]x",
            "[V1.x]",
            "[v.x]",
            "[1.2.3.4]",
            "a/b",
            "é",
        ] {
            assert!(!valid_host(host), "{host}");
        }
    }
}
