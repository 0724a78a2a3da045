//! The HTTP routes: the etl plugin contract, answered as the reference host
//! answers it, plus the probes.
//!
//! | route            | answer                                               |
//! |------------------|------------------------------------------------------|
//! | `POST /invoke`   | the plugin's envelope (or NDJSON stream), 413, 422, 503 |
//! | `GET /schema`    | `{"inputs": ..., "outputs": ...}`                    |
//! | `GET /id`        | the plugin id as a JSON string                       |
//! | `GET /precheck`  | the precheck envelope                                |
//! | `GET /metadata`  | `{"api_version": "3", "identifier": ..., "capabilities": [...]}` (`app::metadata`) |
//! | `GET /openapi.json`, `GET /docs`, `GET /redoc` (and `HEAD`) | the OpenAPI document and a page about it |
//! | `GET /`          | 307 to `/docs`                                       |
//! | one of the above with a trailing slash | 307 to it, as the reference (`location: http://HOST/id`; see `slash`) |
//! | `GET /healthz`   | 200 while the process runs                           |
//! | `GET /readyz`    | 200 while serving, 503 once shutdown started          |
//! | anything else    | 404 `{"detail":"Not Found"}`, or 405 for a known path |
//!
//! Paths are matched with their percent-escapes decoded (`/%69d` is `/id`).
//!
//! One file per concern: `body` (reading a request body within its
//! limits), `invoke` (checking and calling a plain `/invoke`), `stream` (a streaming plugin's NDJSON), `precheck`, `slash` (the trailing-slash 307), `reply`
//! (response bodies and the fixed answers) and `access` (request ids and
//! the access log). Whether a plugin call runs inline or on the blocking
//! pool is `inline`'s business. The server runs every route under
//! [`guarded`], which answers a panic with a 500.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};

use crate::app::App;
use crate::conn::{AnswerPending, Conn};
use crate::metrics::{Route, METRICS};
use crate::shutdown::Drain;
use reply::{fixed, json, redirect, with_type};

mod access;
pub mod body;
mod invoke;
mod precheck;
mod reply;
mod slash;
mod stream;

pub use access::{AccessLine, X_REQUEST_ID};
pub use invoke::{answer, record, Requester};
pub use reply::{internal_error, shutdown_abort, Body};

/// Refuses what HTTP/1.1 does not allow and hyper lets through: a request
/// without exactly one `Host` (400, RFC 9112 section 3.2), and a transfer
/// coding other than `chunked`, whose body would reach the plugin still
/// encoded (501, RFC 9112 section 6.1). The connection then closes.
fn refuse_framing(req: &Request<Incoming>) -> Option<Response<Body>> {
    let headers = req.headers();
    if req.version() == Version::HTTP_11 {
        let mut hosts = headers.get_all(header::HOST).iter();
        if hosts.next().is_none() || hosts.next().is_some() {
            return Some(closing(reply::detail(
                StatusCode::BAD_REQUEST,
                "an HTTP/1.1 request must carry exactly one Host header",
            )));
        }
    }
    // Only a chunked body has no exact length; the check costs nothing
    // to the others.
    if req.body().size_hint().exact().is_none() {
        let other_coding = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|coding| !coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if other_coding {
            return Some(closing(reply::detail(
                StatusCode::NOT_IMPLEMENTED,
                "only the chunked transfer coding is supported",
            )));
        }
    }
    None
}

fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Answers one request. Never fails: every problem is an HTTP answer.
pub async fn handle(
    app: &'static App,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Until the response is handed to hyper (a stream: until it ends), the
    // connection waits for no request head.
    let conn_replaying = conn.replaying();
    let pending = AnswerPending::begin(conn);
    let request_id = access::request_id(&req);
    let method = req.method().clone();
    let route = route_of(&decoded_path(req.uri().path()));
    // Kept only for the access log line.
    let access = app.access_log.then(|| {
        let client = app.proxies.client(pending.conn().peer(), req.headers());
        (Instant::now(), req.uri().path().to_owned(), client)
    });
    let mut response = match refuse_framing(&req) {
        Some(refused) => refused,
        None => match (route, &method) {
            (Route::invoke, &Method::POST) => {
                let from = Requester {
                    pending,
                    request_id: &request_id,
                    received: access.as_ref().map(|(at, _, client)| (*at, client.clone())),
                };
                invoke::invoke(app, req, from).await
            }
            (Route::schema, &Method::GET) => json(StatusCode::OK, app.schema_body.clone()),
            (Route::id, &Method::GET) => json(StatusCode::OK, app.id_body.clone()),
            (Route::metadata, &Method::GET) => json(StatusCode::OK, app.metadata_body.clone()),
            (Route::precheck, &Method::GET) => precheck::precheck(app, &request_id).await,
            // These two take HEAD as well, as the reference's do (hyper
            // sends a HEAD answer's head only).
            (Route::openapi, &Method::GET | &Method::HEAD) => {
                json(StatusCode::OK, app.openapi_body.clone())
            }
            (Route::docs, &Method::GET | &Method::HEAD) => with_type(
                StatusCode::OK,
                "text/html; charset=utf-8",
                app.docs_body.clone(),
            ),
            (Route::root, &Method::GET) => redirect(HeaderValue::from_static("/docs")),
            (Route::healthz, &Method::GET) => fixed(StatusCode::OK, br#"{"status":"ok"}"#),
            (Route::readyz, &Method::GET) => readyz(&app.drain),
            (Route::metrics, &Method::GET) => with_type(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                METRICS.encode(app.drain.in_flight()).into(),
            ),
            (Route::other, _) => {
                match slash::without_trailing_slash(&req, pending.conn(), &app.proxies) {
                    Some(location) => redirect(location),
                    None => fixed(StatusCode::NOT_FOUND, br#"{"detail":"Not Found"}"#),
                }
            }
            (route, _) => {
                let mut r = fixed(
                    StatusCode::METHOD_NOT_ALLOWED,
                    br#"{"detail":"Method Not Allowed"}"#,
                );
                let allow = match route {
                    Route::invoke => "POST",
                    // The reference names the two in either order (a
                    // Python set's, which changes from run to run).
                    Route::openapi | Route::docs => "GET, HEAD",
                    _ => "GET",
                };
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
        },
    };
    if app.drain.is_draining() && !conn_replaying {
        // Each connection closes after the response it is writing. The
        // requests read behind it are answered afterwards, without it: the
        // connection ends after the last of them (conn::Replay).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status().as_u16();
    METRICS.request(route, status);
    // Cloned only for the access log: a clone of a generated id allocates.
    let Some((started, path, client)) = access else {
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        return Ok(response);
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID, request_id.clone());
    let line = AccessLine {
        method,
        path,
        status,
        started,
        request_id,
        client,
    };
    match response.body_mut() {
        // A stream is logged when it ends, with the bytes it sent.
        Body::Stream(stream) => stream.access = Some((line, 0)),
        Body::Full(bytes) => line.log(bytes.as_ref().map_or(0, |b| b.len() as u64)),
    }
    Ok(response)
}

/// The path with its percent-escapes decoded, as the reference routes it
/// (`/%69d` is `/id`). Nearly every path has none and is borrowed.
pub(super) fn decoded_path(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The route a path names, as a metrics label.
pub(super) fn route_of(path: &str) -> Route {
    match path {
        "/invoke" => Route::invoke,
        "/schema" => Route::schema,
        "/id" => Route::id,
        "/precheck" => Route::precheck,
        "/metadata" => Route::metadata,
        "/openapi.json" => Route::openapi,
        // Both pages: etl-serve's one page says what either would.
        "/docs" | "/redoc" => Route::docs,
        "/" => Route::root,
        "/healthz" => Route::healthz,
        "/readyz" => Route::readyz,
        "/metrics" => Route::metrics,
        _ => Route::other,
    }
}

fn readyz(drain: &Drain) -> Response<Body> {
    if drain.is_draining() {
        fixed(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"status":"shutting down"}"#,
        )
    } else {
        fixed(StatusCode::OK, br#"{"status":"ready"}"#)
    }
}

/// `route`, or when it panics the answer to a bug in etl-serve: a 500 in
/// the words of the reference's own answer to an unexpected error, with
/// the connection closed, and an error line. A client whose request was
/// read gets a whole answer even then. The counters the route holds are
/// given back as the panic unwinds, and no lock the routes take refuses
/// its next user after one (`sync::lock`). Costs nothing measurable
/// (`bench/callgrind`: +0.2%, within the noise).
pub fn guarded(
    route: impl Future<Output = Result<Response<Body>, Infallible>>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> {
    AssertUnwindSafe(route).catch_unwind().map(or_panicked)
}

fn or_panicked(
    answered: std::thread::Result<Result<Response<Body>, Infallible>>,
) -> Result<Response<Body>, Infallible> {
    answered.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic");
        tracing::error!(panic = why, "a request's route panicked: answered 500");
        let mut r = with_type(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"Internal Server Error"),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Ok(r)
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A route that panics still answers its client, whole, over a real
    /// connection served by hyper as the server serves it; and the
    /// connection then closes.
    #[tokio::test]
    async fn a_route_that_panics_answers_a_whole_500() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            c.write_all(b"GET /id HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            answer
        });
        let (stream, _) = listener.accept().await.unwrap();
        let service = service_fn(|_req| {
            guarded(async {
                if std::hint::black_box(true) {
                    panic!("a bug in a route");
                }
                Ok(fixed(StatusCode::OK, b"{}"))
            })
        });
        let served = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
        assert!(served.is_ok(), "{served:?}");
        let answer = client.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(
            answer.contains("\r\ncontent-type: text/plain; charset=utf-8\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\nInternal Server Error"),
            "{answer}"
        );
    }
}
