//! Request ids and the access log.

use std::sync::LazyLock;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request};

use crate::logging::Access;

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
    let id = format!("{}-{:x}", *PREFIX, crate::unique::next());
    HeaderValue::try_from(id).expect("hex digits and a dash")
}

/// What the access log says of one request.
pub struct AccessLine {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub request_id: HeaderValue,
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
        }
        .log();
    }
}
