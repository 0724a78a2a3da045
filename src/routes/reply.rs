//! Response bodies, and the answers every route shares.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::stream::StreamBody;
use crate::envelope::{self, Outcome};
use crate::invocation::Collected;
use crate::metrics::METRICS;

/// The 503 shutdown-abort: retryable elsewhere. It is answered during the
/// drain, whose rule (`routes::handle`) closes the connection after it.
pub fn shutdown_abort(c: &Collected) -> Response<Body> {
    METRICS.shutdown_abort();
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        envelope::write(c, &Outcome::Shutdown).into(),
    );
    add_retry_headers(&mut r);
    r
}

pub fn add_retry_headers(r: &mut Response<Body>) {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
}

/// The 503 of `--limit-concurrency`: not a shutdown, so no envelope.
pub fn overloaded(limit: usize) -> Response<Body> {
    refused(&format!(
        "too many invocations in flight (--limit-concurrency {limit}); retry later"
    ))
}

/// The 503 when every plugin thread is taken (`--plugin-threads`).
pub fn threads_busy(limit: usize) -> Response<Body> {
    refused(&format!(
        "all {limit} plugin threads are busy (--plugin-threads); retry later"
    ))
}

/// A request refused for want of capacity: 503, retry in a second.
fn refused(why: &str) -> Response<Body> {
    METRICS.rejection();
    let mut r = detail(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

pub fn internal_error(why: &str) -> Response<Body> {
    let c = Collected::default();
    let outcome = Outcome::Failed {
        class: None,
        status: 500,
        text: format!("[HostError] {why}"),
    };
    json(StatusCode::OK, envelope::write(&c, &outcome).into())
}

/// A 307 to `to`. Its `content-length: 0` is written out because hyper
/// leaves an empty body's length out of a HEAD answer, and the reference
/// sends it.
pub fn redirect(to: HeaderValue) -> Response<Body> {
    let mut r = Response::new(Body::Full(None));
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let headers = r.headers_mut();
    headers.insert(header::LOCATION, to);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

/// A FastAPI-shaped error: `{"detail": text}`.
pub fn detail(status: StatusCode, text: &str) -> Response<Body> {
    let body = serde_json::to_vec(&serde_json::json!({ "detail": text }));
    json(status, body.expect("a Value always serialises").into())
}

/// A JSON answer that never changes.
pub fn fixed(status: StatusCode, body: &'static [u8]) -> Response<Body> {
    json(status, Bytes::from_static(body))
}

pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    with_type(status, "application/json", body)
}

pub fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    with_type_body(status, content_type, Body::Full(Some(body)))
}

pub fn with_type_body(
    status: StatusCode,
    content_type: &'static str,
    body: Body,
) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A response body: one buffer, or the lines of a stream as the plugin
/// emits them.
pub enum Body {
    Full(Option<Bytes>),
    /// Boxed: a response is moved several times on its way to hyper, and
    /// the stream's state is large.
    Stream(Box<StreamBody>),
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Body::Stream(s) => s.poll_next(cx).map(|chunk| {
                chunk.map(|b| {
                    if let Some((_, sent)) = &mut s.access {
                        *sent += b.len() as u64;
                    }
                    Ok(Frame::data(b))
                })
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Body::Stream(s) => s.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}
