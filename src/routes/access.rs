//! Request ids and the access log.

use std::sync::LazyLock;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request};

use crate::logging::Access;
use crate::proxy::Client;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id` when it is a sensible token, else a new one.
/// Either way a visible-ASCII header value.
pub fn request_id(req: &Request<Incoming>) -> HeaderValue {
    static PREFIX: LazyLock<String> = LazyLock::new(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "{:08x}",
            (nanos as u64 ^ u64::from(std::process::id()).rotate_left(32)) as u32
        )
    });
    if let Some(given) = req.headers().get(X_REQUEST_ID) {
        let token = given.as_bytes();
        if !token.is_empty() && token.len() <= 128 && token.iter().all(u8::is_ascii_graphic) {
            return given.clone();
        }
    }
    let mut buf = [0u8; 8 + 1 + 16];
    let len = write_id(&mut buf, PREFIX.as_bytes(), crate::unique::next());
    HeaderValue::from_bytes(&buf[..len]).expect("hex digits and a dash")
}

/// Writes "{prefix}-{n:x}" (an 8-byte prefix) into `buf` and returns its
/// length. By hand rather than with `format!`, which goes through the
/// formatting machinery and a `String`: with the `RequestId` copy below,
/// about 680 instructions of each request (3.5%, `bench/callgrind`).
fn write_id(buf: &mut [u8; 8 + 1 + 16], prefix: &[u8], n: u64) -> usize {
    buf[..8].copy_from_slice(&prefix[..8]);
    buf[8] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, b) in buf[9..9 + digits].iter_mut().rev().enumerate() {
        *b = b"0123456789abcdef"[((n >> (4 * i)) & 0xf) as usize];
    }
    9 + digits
}

#[cfg(test)]
#[test]
fn ids_are_the_prefix_a_dash_and_the_number_in_hex() {
    for n in [0, 1, 9, 10, 15, 16, 255, 4096, 0xdead_beef, u64::MAX] {
        let mut buf = [0u8; 25];
        let len = write_id(&mut buf, b"0badf00d", n);
        assert_eq!(&buf[..len], format!("0badf00d-{n:x}").as_bytes());
    }
}

/// What the access log says of one request.
pub struct AccessLine {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub request_id: HeaderValue,
    /// `None` on a Unix socket, unless a trusted proxy named the client.
    pub client: Option<Client>,
}

impl AccessLine {
    pub fn log(&self, bytes: u64) {
        Access {
            method: self.method.as_str(),
            path: &self.path,
            status: self.status,
            elapsed: self.started.elapsed(),
            bytes,
            request_id: self.request_id.to_str().unwrap_or_default(),
            client: self.client.as_ref(),
        }
        .log();
    }
}
