//! The HTTP routes: the etl plugin contract, answered as the reference host
//! answers it, plus the probes.
//!
//! | route            | answer                                               |
//! |------------------|------------------------------------------------------|
//! | `POST /invoke`   | the plugin's envelope (or NDJSON stream), 413, 422, 503 |
//! | `GET /schema`    | `{"inputs": ..., "outputs": ...}`                    |
//! | `GET /id`        | the plugin id as a JSON string                       |
//! | `GET /precheck`  | the precheck envelope                                |
//! | `GET /metadata`  | `{"api_version": "3", "identifier": ..., "capabilities": []}` |
//! | `GET /openapi.json`, `GET /docs` | the OpenAPI document and a page about it |
//! | `GET /`          | 307 to `/docs`                                       |
//! | `GET /healthz`   | 200 while the process runs                           |
//! | `GET /readyz`    | 200 while serving, 503 once shutdown started          |
//! | anything else    | 404 `{"detail":"Not Found"}`, or 405 for a known path |
//!
//! Where each plugin call runs (a blocking thread, or inline for a quick
//! plugin) is decided in `dispatch`.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::conn::{Busy, Conn};
use crate::dispatch::{self, Dispatch, Inline, Rescue};
use crate::envelope::{self, Outcome};
use crate::invocation::{Chunk, Collected, Invocation, Kind};
use crate::logging::Access;
use crate::metrics::{self, FailureKind, Route, METRICS};
use crate::openapi;
use crate::plugin::Plugin;
use crate::shutdown::{Drain, InFlightGuard};
use crate::validate::InputModel;

/// What the routes are configured with.
pub struct Options {
    /// Largest request body, in bytes.
    pub max_body: u64,
    /// Most requests waiting on the plugin at once; more get 503.
    pub limit_concurrency: Option<usize>,
    /// Whether to log one line per request.
    pub access_log: bool,
    /// The async runtime's worker threads (see [`Dispatch`]).
    pub workers: usize,
}

/// Everything the routes need, built once at startup.
pub struct App {
    /// Never unloaded: a thread abandoned at the drain timeout may still be
    /// running its code when the process exits.
    plugin: &'static Plugin,
    /// Where each plugin call runs.
    dispatch: &'static Dispatch<InlineInvoke>,
    drain: Drain,
    inputs: InputModel,
    max_body: u64,
    limit_concurrency: Option<usize>,
    access_log: bool,
    schema_body: Bytes,
    id_body: Bytes,
    metadata_body: Bytes,
    openapi_body: Bytes,
    docs_body: Bytes,
}

impl App {
    /// Prepares the routes for `plugin`, refusing bodies over `max_body`
    /// bytes.
    ///
    /// # Errors
    /// The inputs schema cannot be compiled into a validator.
    pub fn new(plugin: Plugin, options: Options, drain: Drain) -> Result<App, String> {
        let m = plugin.manifest();
        let inputs = InputModel::new(m.inputs())?;
        let json = |v: &serde_json::Value| {
            Bytes::from(serde_json::to_vec(v).expect("a Value always serialises"))
        };
        let openapi = openapi::document(m);
        Ok(App {
            inputs,
            max_body: options.max_body,
            limit_concurrency: options.limit_concurrency,
            access_log: options.access_log,
            schema_body: json(&m.schema),
            id_body: json(&serde_json::Value::from(m.id.as_str())),
            // Written in the reference's key order. No capabilities: etl-serve
            // does not implement the reserved invocation_settings and
            // invocation_context fields, so it must not advertise them.
            metadata_body: Bytes::from(format!(
                r#"{{"api_version":"3","identifier":{},"capabilities":[]}}"#,
                serde_json::Value::from(m.id.as_str())
            )),
            docs_body: Bytes::from(openapi::docs_page(m)),
            openapi_body: json(&openapi),
            plugin: Box::leak(Box::new(plugin)),
            dispatch: Box::leak(Box::new(Dispatch::new(options.workers))),
            drain,
        })
    }

    pub fn plugin(&self) -> &'static Plugin {
        self.plugin
    }

    /// Starts the thread that watches the plugin calls running inline, and
    /// answers those still inside the plugin at the drain timeout (see
    /// `dispatch`). Called once, from inside the runtime.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start_inline_watchdog(&'static self) -> std::io::Result<()> {
        let drain = self.drain.clone();
        let runtime = tokio::runtime::Handle::current();
        self.dispatch.start_watchdog(
            move || drain.has_expired(),
            // A task spawned from outside the runtime wakes a parked worker.
            move || drop(runtime.spawn(async {})),
        )
    }
}

/// Answers one request. Never fails: every problem is an HTTP answer.
pub async fn handle(
    app: &'static App,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Until the response is handed to hyper (a stream: until it ends), the
    // connection waits for no request head.
    let busy = Busy::begin(conn);
    let request_id = request_id(&req);
    let method = req.method().clone();
    let route = route_of(req.uri().path());
    // Kept only for the access log line.
    let access = app
        .access_log
        .then(|| (Instant::now(), req.uri().path().to_owned()));
    let mut response = match (route, &method) {
        (Route::invoke, &Method::POST) => {
            let from = Requester {
                busy,
                request_id: &request_id,
                received: access.as_ref().map(|(at, _)| *at),
            };
            invoke(app, req, from).await
        }
        (Route::schema, &Method::GET) => json(StatusCode::OK, app.schema_body.clone()),
        (Route::id, &Method::GET) => json(StatusCode::OK, app.id_body.clone()),
        (Route::metadata, &Method::GET) => json(StatusCode::OK, app.metadata_body.clone()),
        (Route::precheck, &Method::GET) => precheck(app).await,
        (Route::openapi, &Method::GET) => json(StatusCode::OK, app.openapi_body.clone()),
        (Route::docs, &Method::GET) => with_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            app.docs_body.clone(),
        ),
        (Route::root, &Method::GET) => redirect("/docs"),
        (Route::healthz, &Method::GET) => {
            json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
        }
        (Route::readyz, &Method::GET) => readyz(&app.drain),
        (Route::metrics, &Method::GET) => with_type(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            METRICS.encode(app.drain.in_flight()).into(),
        ),
        (Route::other, _) => json(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"detail":"Not Found"}"#),
        ),
        (route, _) => {
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from_static(br#"{"detail":"Method Not Allowed"}"#),
            );
            let allow = if route == Route::invoke {
                "POST"
            } else {
                "GET"
            };
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            r
        }
    };
    if app.drain.is_draining() {
        // Each connection closes after the response it is writing.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status().as_u16();
    METRICS.request(route, status);
    // Cloned only for the access log: a clone of a generated id allocates.
    let Some((started, path)) = access else {
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
    };
    match response.body_mut() {
        // A stream is logged when it ends, with the bytes it sent.
        Body::Stream(stream) => stream.access = Some((line, 0)),
        Body::Full(bytes) => line.log(bytes.as_ref().map_or(0, |b| b.len() as u64)),
    }
    Ok(response)
}

/// The route a path names, as a metrics label.
fn route_of(path: &str) -> Route {
    match path {
        "/invoke" => Route::invoke,
        "/schema" => Route::schema,
        "/id" => Route::id,
        "/precheck" => Route::precheck,
        "/metadata" => Route::metadata,
        "/openapi.json" => Route::openapi,
        "/docs" => Route::docs,
        "/" => Route::root,
        "/healthz" => Route::healthz,
        "/readyz" => Route::readyz,
        "/metrics" => Route::metrics,
        _ => Route::other,
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id` when it is a sensible token, else a new one.
/// Either way a visible-ASCII header value.
fn request_id(req: &Request<Incoming>) -> HeaderValue {
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
struct AccessLine {
    method: Method,
    path: String,
    status: u16,
    started: Instant,
    request_id: HeaderValue,
}

impl AccessLine {
    fn log(&self, bytes: u64) {
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

fn readyz(drain: &Drain) -> Response<Body> {
    if drain.is_draining() {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(br#"{"status":"shutting down"}"#),
        )
    } else {
        json(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
    }
}

/// Who sent an `/invoke`, for answering it from the inline-call watchdog.
struct Requester<'a> {
    /// The request's connection, marked busy while the request is served.
    busy: Busy,
    request_id: &'a HeaderValue,
    /// When the request arrived, if the access log is on.
    received: Option<Instant>,
}

async fn invoke(app: &'static App, req: Request<Incoming>, from: Requester<'_>) -> Response<Body> {
    let (head, body) = req.into_parts();
    let content_type = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let body = match read_body(body, app.max_body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    // Counted before the drain check: a drain that starts after the check
    // then waits for this request.
    let in_flight = app.drain.track();
    if app.drain.is_draining() {
        return shutdown_abort(&Collected::default());
    }
    if let Some(limit) = app.limit_concurrency {
        if app.drain.in_flight() > limit {
            return overloaded(limit);
        }
    }
    let input = match app.inputs.prepare(content_type, &body) {
        Ok(input) => input,
        Err(rejection) => {
            let body = serde_json::to_vec(&rejection.body).expect("a Value always serialises");
            return json(StatusCode::UNPROCESSABLE_ENTITY, body.into());
        }
    };
    if app.plugin.manifest().streaming {
        invoke_streaming(app, input, in_flight, from.busy).await
    } else {
        invoke_plain(app, input, in_flight, from).await
    }
}

/// Reads the whole body, refusing one over `max` bytes with 413: at once
/// when its Content-Length says so, else as soon as it grows past `max`.
///
/// A small body arrives in one frame, which is returned as it is: no copy,
/// and no list of buffers to gather it in.
async fn read_body(mut body: Incoming, max: u64) -> Result<Bytes, Response<Body>> {
    let too_large = |len: Option<u64>| {
        let text = match len {
            Some(n) => format!(
                "request body is {n} bytes, over the limit of {max} bytes (--max-body-size)"
            ),
            None => format!("request body is over the limit of {max} bytes (--max-body-size)"),
        };
        let mut r = json(
            StatusCode::PAYLOAD_TOO_LARGE,
            Bytes::from(serde_json::to_vec(&serde_json::json!({"detail": text})).unwrap()),
        );
        // The rest of the body is not read, so the connection cannot be reused.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let declared = body.size_hint().exact();
    if let Some(len) = declared.filter(|len| *len > max) {
        return Err(too_large(Some(len)));
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            json(
                StatusCode::BAD_REQUEST,
                Bytes::from(
                    serde_json::to_vec(
                        &serde_json::json!({"detail": format!("cannot read the request body: {e}")}),
                    )
                    .unwrap(),
                ),
            )
        })?;
        // Trailers carry nothing the plugin reads.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len() as u64;
        if len > max {
            return Err(too_large(None));
        }
        match (&mut joined, first.take()) {
            (Some(all), _) => all.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut all = Vec::with_capacity(declared.unwrap_or(0).max(len) as usize);
                all.extend_from_slice(&earlier);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(joined.map(Bytes::from).or(first).unwrap_or_default())
}

async fn invoke_plain(
    app: &'static App,
    input: Vec<u8>,
    in_flight: InFlightGuard,
    from: Requester<'_>,
) -> Response<Body> {
    let plugin = app.plugin;
    let registered = Invocation::start(Kind::Invoke, None);
    let started = registered.started();
    let watch = ClientWatch::new(registered.shared());
    // Inline only when hyper holds no unsent bytes of this connection: the
    // watchdog may then write the request's answer straight to the socket.
    if let Some(slot) = app.dispatch.inline_slot(from.busy.flushed(), started).await {
        let rescue = InlineInvoke {
            conn: from.busy,
            inv: registered.shared(),
            request_id: from.request_id.clone(),
            started,
            received: from.received,
            _in_flight: in_flight,
        };
        let ended = slot.call(rescue, move || {
            let rc = plugin.invoke(registered.invocation(), &input);
            registered.finish(rc)
        });
        return match ended {
            Inline::Returned(c, _rescue, ended) => answer(watch.finished(c), ended - started),
            Inline::Panicked(why, _rescue) => internal_error(&watch.finished(why)),
            Inline::TooLate(_rescue) => {
                let c = watch.abandon();
                record(&Outcome::Shutdown, started.elapsed());
                shutdown_abort(&c)
            }
            Inline::Answered => {
                // The watchdog answered at the drain timeout, and the
                // process is exiting: this task must never answer.
                watch.finished(());
                std::future::pending().await
            }
        };
    }
    let _in_flight = in_flight;
    let call = app.dispatch.on_blocking_pool(move || {
        let rc = plugin.invoke(registered.invocation(), &input);
        registered.finish(rc)
    });
    tokio::select! {
        biased;
        collected = call => match watch.finished(collected) {
            Ok(c) => answer(c, started.elapsed()),
            Err(e) => internal_error(&e.to_string()),
        },
        // The plugin ignored its flag past the graceful timeout: answer for
        // it with what it reported so far, and abandon its thread.
        () = app.drain.expired() => {
            let c = watch.abandon();
            record(&Outcome::Shutdown, started.elapsed());
            shutdown_abort(&c)
        }
    }
}

/// The answer to a plain `/invoke` whose plugin call returned `c`.
fn answer(c: Collected, took: Duration) -> Response<Body> {
    let outcome = outcome_of(&c, Kind::Invoke);
    record(&outcome, took);
    match outcome {
        Outcome::Shutdown => shutdown_abort(&c),
        outcome => json(StatusCode::OK, envelope::write(&c, &outcome).into()),
    }
}

/// What an inline `/invoke` call leaves with the watchdog (see `dispatch`).
struct InlineInvoke {
    /// Its connection, busy until the call's request is answered.
    conn: Busy,
    inv: Arc<Invocation>,
    request_id: HeaderValue,
    started: Instant,
    received: Option<Instant>,
    /// Released once the request is answered, by whichever side does.
    _in_flight: InFlightGuard,
}

impl Rescue for InlineInvoke {
    fn client_gone(&self) -> bool {
        self.conn.peer_gone()
    }

    fn cancel_for_client(&self) {
        self.inv.cancel_for_client();
    }

    fn answer(self) {
        let c = self.inv.snapshot();
        record(&Outcome::Shutdown, self.started.elapsed());
        let mut r = shutdown_abort(&c);
        let request_id = self.request_id;
        r.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        METRICS.request(Route::invoke, r.status().as_u16());
        let (bytes, body_len) = http1_response(&r);
        if let Err(e) = self.conn.answer_raw(&bytes) {
            tracing::warn!(error = %e, "could not send the shutdown-abort of an inline call");
        }
        if let Some(started) = self.received {
            AccessLine {
                method: Method::POST,
                path: "/invoke".to_owned(),
                status: r.status().as_u16(),
                started,
                request_id,
            }
            .log(body_len as u64);
        }
    }
}

/// `r` (a whole-body response) as HTTP/1.1 bytes, as hyper would write it
/// but without a `Date` header (optional on a 5xx), and its body's length.
fn http1_response(r: &Response<Body>) -> (Vec<u8>, usize) {
    let body: &[u8] = match r.body() {
        Body::Full(Some(bytes)) => bytes,
        _ => &[],
    };
    let mut out = Vec::with_capacity(256 + body.len());
    let status = r.status();
    let reason = status.canonical_reason().unwrap_or("");
    write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_u16()).expect("writes to a Vec");
    for (name, value) in r.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    write!(out, "content-length: {}\r\n\r\n", body.len()).expect("writes to a Vec");
    out.extend_from_slice(body);
    (out, body.len())
}

/// Records an invocation's duration and, for a failure, its kind.
fn record(outcome: &Outcome<'_>, took: Duration) {
    let label = match outcome {
        Outcome::Ok(_) => metrics::Outcome::ok,
        Outcome::Failed { text, .. } => {
            let violation = text.starts_with(envelope::VIOLATION_PREFIX);
            METRICS.failure(if violation {
                FailureKind::contract_violation
            } else {
                FailureKind::error
            });
            metrics::Outcome::failed
        }
        Outcome::Shutdown => metrics::Outcome::shutdown,
    };
    METRICS.invocation(label, took);
}

async fn invoke_streaming(
    app: &'static App,
    input: Vec<u8>,
    in_flight: InFlightGuard,
    busy: Busy,
) -> Response<Body> {
    let plugin = app.plugin;
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    let registered = Invocation::start(Kind::Stream, Some(tx.clone()));
    let started = registered.started();
    let watch = ClientWatch::new(registered.shared());
    // Not awaited: the stream's channel carries the result.
    drop(dispatch::blocking(move || {
        let rc = plugin.invoke(registered.invocation(), &input);
        let collected = registered.finish(rc);
        // The receiver is gone only when the client is; nothing to tell then.
        let _ = tx.blocking_send(Chunk::Done(collected));
    }));
    let first = tokio::select! {
        biased;
        first = rx.recv() => first,
        () = app.drain.expired() => {
            let c = watch.abandon();
            record(&Outcome::Shutdown, started.elapsed());
            return shutdown_abort(&c);
        }
    };
    match first {
        Some(Chunk::Line(first)) => {
            let drain = app.drain.clone();
            let body = Body::Stream(Box::new(StreamBody {
                first: Some(first),
                rx: Some(rx),
                expired: Box::pin(async move { drain.expired().await }),
                watch: Some(watch),
                started,
                _in_flight: in_flight,
                _busy: busy,
                access: None,
            }));
            with_type_body(StatusCode::OK, "application/x-ndjson", body)
        }
        Some(Chunk::Done(c)) => {
            watch.finished(());
            let outcome = outcome_of(&c, Kind::Stream);
            record(&outcome, started.elapsed());
            match outcome {
                // Nothing sent yet: the shutdown-abort is a plain 503.
                Outcome::Shutdown => shutdown_abort(&c),
                Outcome::Ok(_) => with_type(StatusCode::OK, "application/x-ndjson", Bytes::new()),
                failed => with_type(
                    StatusCode::OK,
                    "application/x-ndjson",
                    last_line(&c, &failed),
                ),
            }
        }
        None => internal_error("the plugin thread ended without a result"),
    }
}

/// Cancels an invocation whose client went away: hyper drops the request's
/// future (or the response body) when the connection closes, and with it
/// this watch, unless the invocation finished or was abandoned first. (An
/// inline call holds its request's future; the dispatch watchdog watches
/// its client instead.)
struct ClientWatch {
    inv: Option<Arc<Invocation>>,
}

impl ClientWatch {
    fn new(inv: Arc<Invocation>) -> ClientWatch {
        ClientWatch { inv: Some(inv) }
    }

    /// The plugin returned: nothing to cancel any more.
    fn finished<T>(mut self, result: T) -> T {
        self.inv = None;
        result
    }

    /// The drain timed out: what the plugin reported so far.
    fn abandon(mut self) -> Collected {
        self.inv
            .take()
            .map(|inv| inv.snapshot())
            .unwrap_or_default()
    }
}

impl Drop for ClientWatch {
    fn drop(&mut self) {
        if let Some(inv) = self.inv.take() {
            inv.cancel_for_client();
        }
    }
}

async fn precheck(app: &'static App) -> Response<Body> {
    let _in_flight = app.drain.track();
    if app.drain.is_draining() {
        return shutdown_abort(&Collected::default());
    }
    if !app.plugin.manifest().has_precheck {
        let c = Collected::default();
        return json(
            StatusCode::OK,
            envelope::precheck(&c, &Outcome::Ok(None)).into(),
        );
    }
    let plugin = app.plugin;
    let registered = Invocation::start(Kind::Precheck, None);
    let watch = ClientWatch::new(registered.shared());
    let call = dispatch::blocking(move || {
        let rc = plugin.precheck(registered.invocation());
        registered.finish(rc)
    });
    let collected = tokio::select! {
        biased;
        collected = call => watch.finished(collected),
        () = app.drain.expired() => return shutdown_abort(&watch.abandon()),
    };
    match collected {
        Ok(c) => {
            let outcome = outcome_of(&c, Kind::Precheck);
            let status = if matches!(outcome, Outcome::Shutdown) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let mut r = json(status, envelope::precheck(&c, &outcome).into());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                add_retry_headers(&mut r);
            }
            r
        }
        Err(e) => internal_error(&e.to_string()),
    }
}

/// How an invocation ended, from what the plugin reported.
fn outcome_of(c: &Collected, kind: Kind) -> Outcome<'_> {
    if let Some(why) = &c.more().violation {
        return Outcome::Failed {
            status: 500,
            text: envelope::violation_text(why),
        };
    }
    match c.result {
        etl_abi::RESULT_OK => match (kind, &c.output) {
            (Kind::Invoke, Some(output)) => Outcome::Ok(Some(output)),
            (Kind::Invoke, None) => Outcome::Failed {
                status: 500,
                text: envelope::violation_text("the plugin returned ok without emitting an output"),
            },
            _ => Outcome::Ok(None),
        },
        etl_abi::RESULT_FAILED => match &c.more().failure {
            Some(f) => Outcome::Failed {
                status: f.status,
                text: envelope::failure_text(f),
            },
            None => Outcome::Failed {
                status: 500,
                text: "[PluginError] the plugin reported a failure without describing it".into(),
            },
        },
        etl_abi::RESULT_SHUTDOWN => Outcome::Shutdown,
        other => Outcome::Failed {
            status: 500,
            text: envelope::violation_text(&format!(
                "the plugin returned the unknown result code {other}"
            )),
        },
    }
}

/// The 503 shutdown-abort: retryable elsewhere, and this connection closes.
fn shutdown_abort(c: &Collected) -> Response<Body> {
    METRICS.shutdown_abort();
    let mut r = json(
        StatusCode::SERVICE_UNAVAILABLE,
        envelope::write(c, &Outcome::Shutdown).into(),
    );
    add_retry_headers(&mut r);
    r
}

fn add_retry_headers(r: &mut Response<Body>) {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// The 503 of `--limit-concurrency`: not a shutdown, so no envelope.
fn overloaded(limit: usize) -> Response<Body> {
    METRICS.rejection();
    let detail =
        format!("too many invocations in flight (--limit-concurrency {limit}); retry later");
    let body = serde_json::to_vec(&serde_json::json!({ "detail": detail }))
        .expect("a Value always serialises");
    let mut r = json(StatusCode::SERVICE_UNAVAILABLE, body.into());
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn internal_error(why: &str) -> Response<Body> {
    let c = Collected::default();
    let outcome = Outcome::Failed {
        status: 500,
        text: format!("[HostError] {why}"),
    };
    json(StatusCode::OK, envelope::write(&c, &outcome).into())
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::Full(None));
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r
}

fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    with_type(status, "application/json", body)
}

fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    with_type_body(status, content_type, Body::Full(Some(body)))
}

fn with_type_body(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
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

/// The NDJSON lines of a streaming plugin. Dropping it (the client went
/// away) closes the channel, so the plugin's next `emit` answers
/// `ETL_CB_CLOSED` and its cancel flag is set.
pub struct StreamBody {
    first: Option<Bytes>,
    rx: Option<mpsc::Receiver<Chunk>>,
    /// Resolves when the graceful timeout expires.
    expired: Pin<Box<dyn Future<Output = ()> + Send>>,
    watch: Option<ClientWatch>,
    started: Instant,
    _in_flight: InFlightGuard,
    /// Keeps the connection's head deadline off while the stream runs.
    _busy: Busy,
    /// The access log line to write when the stream ends, and the bytes
    /// sent so far.
    access: Option<(AccessLine, u64)>,
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if let Some((line, bytes)) = self.access.take() {
            line.log(bytes);
        }
    }
}

impl StreamBody {
    /// The next chunk of the stream, or `None` at its end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Chunk::Line(line))) => Poll::Ready(Some(line)),
            Poll::Ready(Some(Chunk::Done(c))) => {
                self.rx = None;
                if let Some(w) = self.watch.take() {
                    w.finished(());
                }
                let outcome = outcome_of(&c, Kind::Stream);
                record(&outcome, self.started.elapsed());
                match outcome {
                    Outcome::Ok(_) => Poll::Ready(None),
                    last => Poll::Ready(Some(last_line(&c, &last))),
                }
            }
            Poll::Ready(None) => {
                self.rx = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.expired.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // The graceful timeout expired mid-stream: the last line is
                // the shutdown-abort.
                self.rx = None;
                let c = self
                    .watch
                    .take()
                    .map(ClientWatch::abandon)
                    .unwrap_or_default();
                record(&Outcome::Shutdown, self.started.elapsed());
                Poll::Ready(Some(last_line(&c, &Outcome::Shutdown)))
            }
        }
    }
}

/// The last NDJSON line of a stream that ended with `outcome`.
fn last_line(c: &Collected, outcome: &Outcome<'_>) -> Bytes {
    if matches!(outcome, Outcome::Shutdown) {
        METRICS.shutdown_abort();
    }
    let mut line = envelope::write(c, outcome);
    line.push(b'\n');
    line.into()
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
            Body::Stream(s) => s.first.is_none() && s.rx.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}
