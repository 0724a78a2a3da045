//! A plain `/invoke` run inline: the entry point the routes call, what the
//! call leaves in its slot for the watchdog ([`InvokeRescue`]), and how the
//! watchdog answers it straight on the socket when the drain times out.

use std::io::{self, Write as _};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderValue};
use hyper::{Method, Response};
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};

use super::{Ended, InlineCalls, Rescue};
use crate::conn::{AnswerPending, Conn};
use crate::envelope::Outcome;
use crate::invocation::{Invocation, Registered};
use crate::metrics::{Route, METRICS};
use crate::plugin::Plugin;
use crate::proxy::Client;
use crate::routes::{self, AccessLine, Body, Requester, X_REQUEST_ID};
use crate::shutdown::InFlightGuard;

/// A plain `/invoke`, ready to call the plugin with.
pub struct InlineCall<'a> {
    pub plugin: &'static Plugin,
    pub registered: Registered,
    /// The plugin's input.
    pub input: Vec<u8>,
    pub in_flight: InFlightGuard,
    pub from: Requester<'a>,
}

impl InlineCalls<InvokeRescue> {
    /// Runs `call` inline and answers it, when the rules of this module
    /// allow; else gives it back, to run on the blocking pool.
    ///
    /// # Cancellation safety
    /// Only while it waits for a slot (at most [`super::BUSY_WAIT`]); the
    /// plugin call itself holds the thread until it returns.
    pub async fn invoke<'a>(
        &'static self,
        call: InlineCall<'a>,
    ) -> Result<Response<Body>, InlineCall<'a>> {
        let started = call.registered.started();
        let Some(slot) = self.slot(call.from.pending.conn().flushed(), started).await else {
            return Err(call);
        };
        let InlineCall {
            plugin,
            registered,
            input,
            in_flight,
            from,
        } = call;
        let inv = registered.shared();
        let rescue = InvokeRescue {
            pending: from.pending,
            inv: inv.clone(),
            request_id: RequestId::new(from.request_id),
            started,
            received: from.received,
            _in_flight: in_flight,
        };
        let ended = slot.call(rescue, move || {
            let rc = plugin.invoke(registered.invocation(), &input);
            registered.finish(rc)
        });
        Ok(match ended {
            Ended::Returned(c, _rescue, ended) => routes::answer(c, ended - started),
            Ended::Panicked(why, _rescue) => routes::internal_error(&why),
            Ended::TooLate(_rescue) => {
                routes::record(&Outcome::Shutdown, started.elapsed());
                routes::shutdown_abort(&inv.snapshot())
            }
            // The watchdog answered at the drain timeout, and the process
            // is exiting: this task must never answer.
            Ended::Answered => std::future::pending().await,
        })
    }
}

/// What an inline `/invoke` call leaves with the watchdog.
pub struct InvokeRescue {
    /// Its connection, which owes the request an answer until whichever
    /// side answers it does.
    pending: AnswerPending,
    inv: Arc<Invocation>,
    request_id: RequestId,
    started: Instant,
    received: Option<(Instant, Option<Client>)>,
    /// Released once the request is answered, by whichever side does.
    _in_flight: InFlightGuard,
}

impl Rescue for InvokeRescue {
    fn client_gone(&self) -> bool {
        peer_gone(self.pending.conn())
    }

    fn cancel_for_client(&self) {
        self.inv.cancel_for_client();
    }

    fn answer(self) {
        let c = self.inv.snapshot();
        routes::record(&Outcome::Shutdown, self.started.elapsed());
        let mut r = routes::shutdown_abort(&c);
        // Written on the raw socket, past the drain rule of routes::handle;
        // the connection is left unused from here.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let request_id = self.request_id.header();
        r.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        METRICS.request(Route::invoke, r.status().as_u16());
        let (bytes, body_len) = http1_response(&r);
        if let Err(e) = answer_raw(self.pending.conn(), &bytes) {
            tracing::warn!(error = %e, "could not send the shutdown-abort of an inline call");
        }
        if let Some((started, client)) = self.received {
            AccessLine {
                method: Method::POST,
                path: "/invoke".to_owned(),
                status: r.status().as_u16(),
                started,
                request_id,
                client,
            }
            .log(body_len as u64);
        }
    }
}

/// A request id kept without a heap allocation: cloning the `HeaderValue`
/// of a generated id allocates, for every inline call, an id that only the
/// rare answer at the drain timeout uses.
struct RequestId {
    bytes: [u8; 128],
    len: u8,
}

impl RequestId {
    /// `id` is at most 128 bytes (see `routes::access::request_id`).
    fn new(id: &HeaderValue) -> RequestId {
        let id = id.as_bytes();
        let len = id.len().min(128);
        let mut bytes = [0u8; 128];
        bytes[..len].copy_from_slice(&id[..len]);
        RequestId {
            bytes,
            len: len as u8,
        }
    }

    fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.bytes[..usize::from(self.len)])
            .expect("copied from a header value")
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

/// Whether the client has closed its side of the connection (or reset
/// it), as hyper would find on its next read.
fn peer_gone(conn: &Conn) -> bool {
    conn.peek_socket(|fd| {
        let revents = poll_once(fd, nix::libc::POLLRDHUP, Duration::ZERO);
        revents & (nix::libc::POLLRDHUP | nix::libc::POLLHUP | nix::libc::POLLERR) != 0
    })
    .unwrap_or(false)
}

/// Writes `response` (a whole HTTP/1.1 response, which must say
/// `Connection: close`) straight onto the socket and shuts down its sending
/// side. Only valid while the request's task is held inside the plugin,
/// which it only is after [`Conn::flushed`] said true: then nothing else
/// writes to the socket.
fn answer_raw(conn: &Conn, response: &[u8]) -> io::Result<()> {
    conn.answer_on_socket(|fd| {
        let sent = send_all(fd, response);
        let _ = socket::shutdown(fd, Shutdown::Write);
        sent
    })
    .unwrap_or_else(|| {
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the connection is already closed",
        ))
    })
}

/// How long [`answer_raw`] waits for room in the socket's send buffer
/// before it gives up on a client that does not read.
const RAW_SEND_WAIT: Duration = Duration::from_millis(100);

/// Sends all of `bytes` on the non-blocking socket `fd`, waiting at most
/// [`RAW_SEND_WAIT`] in all for room to send.
fn send_all(fd: RawFd, mut bytes: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + RAW_SEND_WAIT;
    while !bytes.is_empty() {
        match socket::send(fd, bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                poll_once(fd, nix::libc::POLLOUT, left);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One `poll(2)` of `fd` for `events`, waiting up to `wait`: the events
/// that happened (none on an error).
fn poll_once(fd: RawFd, events: nix::libc::c_short, wait: Duration) -> nix::libc::c_short {
    let mut pfd = nix::libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = nix::libc::c_int::try_from(wait.as_millis()).unwrap_or(nix::libc::c_int::MAX);
    // SAFETY: one valid pollfd, for the length of the call. POLLRDHUP is
    // not in nix's PollFlags, hence libc.
    let n = unsafe { nix::libc::poll(&mut pfd, 1, ms) };
    if n > 0 {
        pfd.revents
    } else {
        0
    }
}
