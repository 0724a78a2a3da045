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
//! Plugin code never runs on the async runtime: every call into the plugin
//! goes to a blocking thread.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::envelope::{self, Outcome};
use crate::invocation::{Chunk, Collected, Invocation, Kind};
use crate::openapi;
use crate::plugin::Plugin;
use crate::shutdown::{Drain, InFlightGuard};
use crate::validate::InputModel;

/// Everything the routes need, built once at startup.
pub struct App {
    /// Never unloaded: a thread abandoned at the drain timeout may still be
    /// running its code when the process exits.
    plugin: &'static Plugin,
    drain: Drain,
    inputs: InputModel,
    max_body: u64,
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
    pub fn new(plugin: Plugin, max_body: u64, drain: Drain) -> Result<App, String> {
        let m = plugin.manifest();
        let inputs = InputModel::new(m.inputs())?;
        let json = |v: &serde_json::Value| {
            Bytes::from(serde_json::to_vec(v).expect("a Value always serialises"))
        };
        let openapi = openapi::document(m);
        Ok(App {
            inputs,
            max_body,
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
            drain,
        })
    }

    pub fn plugin(&self) -> &'static Plugin {
        self.plugin
    }
}

/// Answers one request. Never fails: every problem is an HTTP answer.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let response = match (req.uri().path(), &method) {
        ("/invoke", &Method::POST) => invoke(&app, req).await,
        ("/schema", &Method::GET) => json(StatusCode::OK, app.schema_body.clone()),
        ("/id", &Method::GET) => json(StatusCode::OK, app.id_body.clone()),
        ("/metadata", &Method::GET) => json(StatusCode::OK, app.metadata_body.clone()),
        ("/precheck", &Method::GET) => precheck(&app).await,
        ("/openapi.json", &Method::GET) => json(StatusCode::OK, app.openapi_body.clone()),
        ("/docs", &Method::GET) => with_type(
            StatusCode::OK,
            "text/html; charset=utf-8",
            app.docs_body.clone(),
        ),
        ("/", &Method::GET) => redirect("/docs"),
        ("/healthz", &Method::GET) => {
            json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
        }
        ("/readyz", &Method::GET) => readyz(&app.drain),
        (path, _) => match allowed_method(path) {
            Some(allow) => {
                let mut r = json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Bytes::from_static(br#"{"detail":"Method Not Allowed"}"#),
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            None => json(
                StatusCode::NOT_FOUND,
                Bytes::from_static(br#"{"detail":"Not Found"}"#),
            ),
        },
    };
    Ok(response)
}

fn allowed_method(path: &str) -> Option<&'static str> {
    match path {
        "/invoke" => Some("POST"),
        "/schema" | "/id" | "/metadata" | "/precheck" | "/openapi.json" | "/docs" | "/"
        | "/healthz" | "/readyz" => Some("GET"),
        _ => None,
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

async fn invoke(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match read_body(req, app.max_body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    // Counted before the drain check: a drain that starts after the check
    // then waits for this request.
    let in_flight = app.drain.track();
    if app.drain.is_draining() {
        return shutdown_abort(&Collected::default());
    }
    let input = match app.inputs.prepare(content_type.as_deref(), &body) {
        Ok(input) => input,
        Err(rejection) => {
            let body = serde_json::to_vec(&rejection.body).expect("a Value always serialises");
            return json(StatusCode::UNPROCESSABLE_ENTITY, body.into());
        }
    };
    if app.plugin.manifest().streaming {
        invoke_streaming(app, input, in_flight).await
    } else {
        invoke_plain(app, input, in_flight).await
    }
}

/// Reads the whole body, refusing one over `max` bytes with 413: at once
/// when its Content-Length says so, else as soon as it grows past `max`.
async fn read_body(req: Request<Incoming>, max: u64) -> Result<Bytes, Response<Body>> {
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
    let declared = req.body().size_hint().exact();
    if let Some(len) = declared.filter(|len| *len > max) {
        return Err(too_large(Some(len)));
    }
    match http_body_util::Limited::new(req.into_body(), max as usize)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(None)),
        Err(e) => Err(json(
            StatusCode::BAD_REQUEST,
            Bytes::from(
                serde_json::to_vec(
                    &serde_json::json!({"detail": format!("cannot read the request body: {e}")}),
                )
                .unwrap(),
            ),
        )),
    }
}

async fn invoke_plain(app: &Arc<App>, input: Vec<u8>, _in_flight: InFlightGuard) -> Response<Body> {
    let plugin = app.plugin;
    let registered = Invocation::start(Kind::Invoke, None);
    let watch = ClientWatch::new(registered.shared());
    let call = tokio::task::spawn_blocking(move || {
        let rc = plugin.invoke(registered.invocation(), &input);
        registered.finish(rc)
    });
    tokio::select! {
        biased;
        collected = call => {
            let collected = watch.finished(collected);
            match collected {
                Ok(c) => envelope_response(&c, Kind::Invoke),
                Err(e) => internal_error(&e.to_string()),
            }
        }
        // The plugin ignored its flag past the graceful timeout: answer for
        // it with what it reported so far, and abandon its thread.
        () = app.drain.expired() => shutdown_abort(&watch.abandon()),
    }
}

async fn invoke_streaming(
    app: &Arc<App>,
    input: Vec<u8>,
    in_flight: InFlightGuard,
) -> Response<Body> {
    let plugin = app.plugin;
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    let registered = Invocation::start(Kind::Stream, Some(tx.clone()));
    let watch = ClientWatch::new(registered.shared());
    tokio::task::spawn_blocking(move || {
        let rc = plugin.invoke(registered.invocation(), &input);
        let collected = registered.finish(rc);
        // The receiver is gone only when the client is; nothing to tell then.
        let _ = tx.blocking_send(Chunk::Done(collected));
    });
    let first = tokio::select! {
        biased;
        first = rx.recv() => first,
        () = app.drain.expired() => return shutdown_abort(&watch.abandon()),
    };
    match first {
        Some(Chunk::Line(first)) => {
            let drain = app.drain.clone();
            let body = Body::Stream(StreamBody {
                first: Some(first),
                rx: Some(rx),
                expired: Box::pin(async move { drain.expired().await }),
                watch: Some(watch),
                _in_flight: in_flight,
            });
            with_type_body(StatusCode::OK, "application/x-ndjson", body)
        }
        Some(Chunk::Done(c)) => {
            watch.finished(());
            match outcome_of(&c, Kind::Stream) {
                // Nothing sent yet: the shutdown-abort is a plain 503.
                Outcome::Shutdown => shutdown_abort(&c),
                Outcome::Ok(_) => with_type(StatusCode::OK, "application/x-ndjson", Bytes::new()),
                failed => {
                    let mut line = envelope::write(&c, &failed);
                    line.push(b'\n');
                    with_type(StatusCode::OK, "application/x-ndjson", line.into())
                }
            }
        }
        None => internal_error("the plugin thread ended without a result"),
    }
}

/// Cancels an invocation whose client went away: hyper drops the request's
/// future (or the response body) when the connection closes, and with it
/// this watch, unless the invocation finished or was abandoned first.
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

async fn precheck(app: &Arc<App>) -> Response<Body> {
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
    let call = tokio::task::spawn_blocking(move || {
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
    if let Some(why) = &c.violation {
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
        etl_abi::RESULT_FAILED => match &c.failure {
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

fn envelope_response(c: &Collected, kind: Kind) -> Response<Body> {
    match outcome_of(c, kind) {
        Outcome::Shutdown => shutdown_abort(c),
        outcome => json(StatusCode::OK, envelope::write(c, &outcome).into()),
    }
}

/// The 503 shutdown-abort: retryable elsewhere, and this connection closes.
fn shutdown_abort(c: &Collected) -> Response<Body> {
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
    Stream(StreamBody),
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
    _in_flight: InFlightGuard,
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
            Body::Stream(s) => {
                if let Some(first) = s.first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(first))));
                }
                let Some(rx) = s.rx.as_mut() else {
                    return Poll::Ready(None);
                };
                match rx.poll_recv(cx) {
                    Poll::Pending => {
                        if s.expired.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        // The graceful timeout expired mid-stream: the last
                        // line is the shutdown-abort.
                        s.rx = None;
                        let c = s.watch.take().map(ClientWatch::abandon).unwrap_or_default();
                        let mut line = envelope::write(&c, &Outcome::Shutdown);
                        line.push(b'\n');
                        Poll::Ready(Some(Ok(Frame::data(line.into()))))
                    }
                    Poll::Ready(Some(Chunk::Line(line))) => {
                        Poll::Ready(Some(Ok(Frame::data(line))))
                    }
                    Poll::Ready(Some(Chunk::Done(c))) => {
                        s.rx = None;
                        if let Some(w) = s.watch.take() {
                            w.finished(());
                        }
                        match outcome_of(&c, Kind::Stream) {
                            Outcome::Ok(_) => Poll::Ready(None),
                            last => {
                                let mut line = envelope::write(&c, &last);
                                line.push(b'\n');
                                Poll::Ready(Some(Ok(Frame::data(line.into()))))
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        s.rx = None;
                        Poll::Ready(None)
                    }
                }
            }
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
