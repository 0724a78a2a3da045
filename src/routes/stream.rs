//! `POST /invoke` of a streaming plugin: its items as NDJSON lines, as the
//! plugin emits them, and the envelope of how it ended as the last line.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::access::AccessLine;
use super::invoke::{outcome_of, record, rejection, ClientWatch};
use super::reply::{internal_error, shutdown_abort, with_type, with_type_body, Body};
use crate::app::App;
use crate::conn::AnswerPending;
use crate::envelope::{self, Outcome};
use crate::inline;
use crate::invocation::{Chunk, Collected, Invocation, Kind, RequestInfo};
use crate::metrics::METRICS;
use crate::shutdown::InFlightGuard;

pub async fn invoke_streaming(
    app: &'static App,
    input: Vec<u8>,
    request: RequestInfo,
    in_flight: InFlightGuard,
    pending: AnswerPending,
) -> Response<Body> {
    let plugin = app.plugin;
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    let registered = Invocation::start(Kind::Stream, Some(tx.clone()), request);
    let started = registered.started();
    let watch = ClientWatch::new(registered.shared());
    // Not awaited: the stream's channel carries the result.
    drop(inline::on_blocking_pool(move || {
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
                _pending: pending,
                access: None,
            }));
            with_type_body(StatusCode::OK, "application/x-ndjson", body)
        }
        Some(Chunk::Done(c)) => {
            watch.finished(());
            if let Some(refused) = rejection(&c) {
                return refused;
            }
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
    _pending: AnswerPending,
    /// The access log line to write when the stream ends, and the bytes
    /// sent so far.
    pub access: Option<(AccessLine, u64)>,
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if let Some((line, bytes)) = self.access.take() {
            line.log(bytes);
        }
    }
}

impl StreamBody {
    /// Whether every chunk has been handed out.
    pub fn is_done(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }

    /// The next chunk of the stream, or `None` at its end.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
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
