//! `POST /invoke` of a plain plugin: the body read and checked, the plugin
//! called (inline when `inline` allows it, else on the blocking pool), and
//! the envelope written. Streaming plugins continue in `stream`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etl_abi as abi;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Version};

use super::body::{read_body, unread_rest};
use super::reply::{internal_error, json, overloaded, shutdown_abort, threads_busy, Body};
use super::stream::invoke_streaming;
use crate::app::App;
use crate::conn::AnswerPending;
use crate::envelope::{self, Outcome};
use crate::inline::{self, InlineCall};
use crate::invocation::{Collected, Invocation, Kind, RequestInfo};
use crate::metrics::{self, FailureKind, METRICS};
use crate::proxy::Client;
use crate::shutdown::InFlightGuard;

/// Who sent an `/invoke`, for answering it from the inline-call watchdog.
pub struct Requester<'a> {
    /// The request's connection, which owes this request an answer.
    pub pending: AnswerPending,
    pub request_id: &'a HeaderValue,
    /// When the request arrived and who sent it, if the access log is on.
    pub received: Option<(Instant, Option<Client>)>,
}

pub async fn invoke(
    app: &'static App,
    req: Request<Incoming>,
    from: Requester<'_>,
) -> Response<Body> {
    let (head, body) = req.into_parts();
    // Counted from the head, but refused only once the body is read (unless
    // the client waits for `100 Continue`, below), so that the connection
    // stays usable and the client reads the 400 whole.
    let deadline = deadline(&head.headers);
    // A parameter may carry bytes past ASCII (`charset="\xff"`), which
    // `to_str` refuses; the media type before it still counts.
    let content_type = head.headers.get(header::CONTENT_TYPE).map(|v| {
        v.to_str()
            .map_or_else(|_| String::from_utf8_lossy(v.as_bytes()), Cow::Borrowed)
    });
    // A client that waits for `100 Continue` before it sends the body is
    // refused now for what does not depend on the body, rather than asked
    // for a body that would only be refused (hyper sends the 100 when the
    // body is first read). The header is looked up only when a refusal
    // applies: on every request it cost about 90 instructions.
    let refused = match deadline {
        Err(()) => Some(Refused::BadTimeout),
        Ok(_) => Refused::now(app, app.drain.in_flight()),
    };
    if let Some(refused) = refused {
        if waits_for_continue(&head) {
            return unread_rest(refused.answer());
        }
    }
    let (body, _held) = match read_body(body, &app.body).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let Ok(deadline) = deadline else {
        return Refused::BadTimeout.answer();
    };
    // Counted before the drain check: a drain that starts after the check
    // then waits for this request.
    let in_flight = app.drain.track();
    if let Some(refused) = Refused::now(app, app.drain.in_flight().saturating_sub(1)) {
        return refused.answer();
    }
    let prepared = match app.inputs.prepare(content_type.as_deref(), &body) {
        Ok(prepared) => prepared,
        Err(rejection) => {
            let body = serde_json::to_vec(&rejection.body).expect("a Value always serialises");
            let status =
                StatusCode::from_u16(rejection.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
            return json(status, body.into());
        }
    };
    let request = RequestInfo {
        request_id: Some(from.request_id.clone()),
        deadline,
        reserved: prepared.reserved,
    };
    if app.plugin.manifest().streaming {
        invoke_streaming(app, prepared.input, request, in_flight, from.pending).await
    } else {
        invoke_plain(app, prepared.input, request, in_flight, from).await
    }
}

/// Why an `/invoke` is refused whatever its body.
enum Refused {
    /// An `X-ETL-Timeout-Ms` that is not whole milliseconds.
    BadTimeout,
    /// The drain: the shutdown-abort.
    Draining,
    /// `--limit-concurrency`, reached.
    Overloaded(usize),
    /// Every plugin thread is busy (`--plugin-threads`).
    ThreadsBusy(usize),
}

impl Refused {
    /// Why `app` refuses an `/invoke` now, with `others` invocations in
    /// flight besides it, if it does.
    fn now(app: &App, others: usize) -> Option<Refused> {
        if app.drain.is_draining() {
            return Some(Refused::Draining);
        }
        if let Some(limit) = app.limit_concurrency.filter(|limit| others >= *limit) {
            return Some(Refused::Overloaded(limit));
        }
        inline::pool_full().map(Refused::ThreadsBusy)
    }

    fn answer(self) -> Response<Body> {
        match self {
            Refused::BadTimeout => super::reply::detail(
                StatusCode::BAD_REQUEST,
                &format!(
                    "Invalid {TIMEOUT_HEADER} header: expected a whole number of milliseconds"
                ),
            ),
            Refused::Draining => shutdown_abort(&Collected::default()),
            Refused::Overloaded(limit) => overloaded(limit),
            Refused::ThreadsBusy(limit) => threads_busy(limit),
        }
    }
}

/// Whether the client sent `Expect: 100-continue` and waits for it before
/// sending the body. From HTTP/1.0 the expectation is ignored (RFC 9110,
/// section 10.1.1): such a client sends its body anyway.
fn waits_for_continue(head: &Parts) -> bool {
    head.version == Version::HTTP_11
        && head
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The request header in which a caller says how long it waits for the
/// answer, in milliseconds from when it sent the request (ABI 1.1: the
/// plugin sees it through `remaining_ms`).
pub const TIMEOUT_HEADER: &str = "x-etl-timeout-ms";

/// The caller's deadline from [`TIMEOUT_HEADER`], counted from now (the
/// request head was just read), or `Err` for a value that is not a whole
/// number of milliseconds.
fn deadline(headers: &header::HeaderMap) -> Result<Option<Instant>, ()> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let ms = value
        .to_str()
        .ok()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or(())?;
    Ok(Instant::now().checked_add(Duration::from_millis(ms)))
}

async fn invoke_plain(
    app: &'static App,
    input: Vec<u8>,
    request: RequestInfo,
    in_flight: InFlightGuard,
    from: Requester<'_>,
) -> Response<Body> {
    let call = InlineCall {
        plugin: app.plugin,
        registered: Invocation::start(Kind::Invoke, None, request),
        input,
        in_flight,
        from,
    };
    // A quick plugin is called right here (see `inline`). `_from` keeps
    // the connection owing an answer until it is handed to hyper.
    let InlineCall {
        plugin,
        registered,
        input,
        in_flight: _in_flight,
        from: _from,
    } = match app.inline.invoke(call).await {
        Ok(answered) => return answered,
        Err(call) => call,
    };
    let started = registered.started();
    let watch = ClientWatch::new(registered.shared());
    let call = app.inline.time_on_blocking_pool(move || {
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
pub fn answer(c: Collected, took: Duration) -> Response<Body> {
    if let Some(refused) = rejection(&c) {
        return refused;
    }
    let outcome = outcome_of(&c, Kind::Invoke);
    record(&outcome, took);
    match outcome {
        Outcome::Shutdown => shutdown_abort(&c),
        outcome => json(StatusCode::OK, envelope::write(&c, &outcome).into()),
    }
}

/// The answer of a plugin that refused its input itself (ABI 1.1
/// `reject_request`), as the host refuses bad input: no envelope, and not
/// counted as an invocation.
pub fn rejection(c: &Collected) -> Option<Response<Body>> {
    let more = c.more();
    let (status, body) = more.rejection.as_ref()?;
    if c.result != abi::RESULT_FAILED || more.violation.is_some() {
        return None;
    }
    let status = StatusCode::from_u16(*status).expect("checked to be 4xx");
    Some(json(status, Bytes::copy_from_slice(body.get().as_bytes())))
}

/// Records an invocation's duration and, for a failure, its kind.
pub fn record(outcome: &Outcome<'_>, took: Duration) {
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

/// How an invocation ended, from what the plugin reported.
pub fn outcome_of(c: &Collected, kind: Kind) -> Outcome<'_> {
    if let Some(why) = &c.more().violation {
        return Outcome::Failed {
            class: None,
            status: 500,
            text: envelope::violation_text(why),
        };
    }
    match c.result {
        etl_abi::RESULT_OK => match (kind, &c.output) {
            (Kind::Invoke, Some(output)) => Outcome::Ok(Some(output)),
            (Kind::Invoke, None) => Outcome::Failed {
                class: None,
                status: 500,
                text: envelope::violation_text("the plugin returned ok without emitting an output"),
            },
            _ => Outcome::Ok(None),
        },
        etl_abi::RESULT_FAILED => match &c.more().failure {
            Some(f) => Outcome::Failed {
                status: f.status,
                text: f.text.clone(),
                class: Some(&f.class),
            },
            None => Outcome::Failed {
                class: None,
                status: 500,
                text: "[PluginError] the plugin reported a failure without describing it".into(),
            },
        },
        etl_abi::RESULT_SHUTDOWN => Outcome::Shutdown,
        other => Outcome::Failed {
            class: None,
            status: 500,
            text: envelope::violation_text(&format!(
                "the plugin returned the unknown result code {other}"
            )),
        },
    }
}

/// Cancels an invocation whose client went away: hyper drops the request's
/// future (or the response body) when the connection closes, and with it
/// this watch, unless the invocation finished or was abandoned first. (An
/// inline call holds its request's future; the inline watchdog watches
/// its client instead.)
pub struct ClientWatch {
    inv: Option<Arc<Invocation>>,
}

impl ClientWatch {
    pub fn new(inv: Arc<Invocation>) -> ClientWatch {
        ClientWatch { inv: Some(inv) }
    }

    /// The plugin returned: nothing to cancel any more.
    pub fn finished<T>(mut self, result: T) -> T {
        self.inv = None;
        result
    }

    /// The drain timed out: what the plugin reported so far.
    pub fn abandon(mut self) -> Collected {
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
