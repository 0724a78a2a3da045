//! One connection's plumbing, under hyper:
//!
//! - [`ConnIo`], the stream hyper reads and writes, which keeps track of
//!   whether hyper has handed the socket every byte it wrote;
//! - [`Conn`], what the routes and the inline-call watchdog know of the
//!   connection, and its socket for the watchdog to answer on (see
//!   `inline`);
//! - [`Connections`] (in `list.rs`), every connection accepted, for the
//!   shutdown to see which are still open and which of those are busy;
//! - the head deadline: how long a connection may wait for a request head
//!   (the keep-alive and header-read timeouts), kept by [`ConnIo`] with one
//!   runtime timer per connection, and the [`AnswerPending`] guard that
//!   suspends it while a request is being served;
//! - the 414 for a request line longer than `--max-header-size`, which
//!   hyper would answer with its 431 for the whole head;
//! - the lingering close that ends every connection, so that bytes the
//!   server never read do not reset its last answer away.

use std::io;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{Route, METRICS};
use crate::server::ConnLimits;
use crate::sync::lock;

mod list;
mod timer;
pub use list::Connections;
use timer::LazyTimer;

/// What the routes, and the inline-call watchdog, know of one connection:
/// whether hyper has handed the socket every byte it wrote, and the socket
/// itself, so that a request whose task is held by an inline plugin call
/// can be answered from another thread (see `inline`).
pub struct Conn {
    fd: RawFd,
    /// The peer's address; `None` on a Unix socket.
    peer: Option<SocketAddr>,
    /// False from each write, and from each response handed to hyper,
    /// until the flush after it: while true, hyper holds no bytes that it
    /// has not written to the socket.
    flushed: AtomicBool,
    /// Also the lock under which the socket is closed, so that the
    /// watchdog never touches a descriptor number that was reused.
    state: Mutex<ConnState>,
    /// Requests being served: from the call of the route until their
    /// response is done (see [`AnswerPending`]). Only the connection's task,
    /// and the inline-call watchdog when it answers, change it.
    answers_pending: AtomicU32,
    /// True from a read that brought bytes while no request was being
    /// served until a request is handed to its route: while true, hyper
    /// may hold a request it has not dispatched yet, so the connection is
    /// not idle.
    unparsed: AtomicBool,
    /// When the connection last became idle ([`since_epoch`]), where its
    /// head deadline counts from; 0 while it is not idle or not yet seen
    /// idle (see [`ConnIo::past_head_deadline`]).
    idle_since: AtomicU64,
    /// Set while the requests hyper had read behind the one the drain
    /// closed the connection after are answered ([`Replay`]).
    replaying: AtomicBool,
    /// Set once the connection is ending, its writing side shut
    /// ([`ConnIo::poll_linger`]).
    lingering: AtomicBool,
}

/// The moment connection times count from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `at`, as nanoseconds since [`EPOCH`].
fn since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(*EPOCH).as_nanos() as u64
}

/// Marks a request as being served on its connection, from the call of the
/// route until its response is handed to hyper (a stream's body holds it
/// until the stream ends). While any is held, the connection waits for no
/// request head, so the head deadline is off; so it is while hyper still
/// holds bytes of a response it could not yet write.
pub struct AnswerPending(Arc<Conn>);

impl AnswerPending {
    pub fn begin(conn: Arc<Conn>) -> AnswerPending {
        conn.answers_pending.fetch_add(1, Ordering::Relaxed);
        conn.unparsed.store(false, Ordering::Relaxed);
        conn.idle_since.store(0, Ordering::Relaxed);
        AnswerPending(conn)
    }

    pub fn conn(&self) -> &Conn {
        &self.0
    }
}

impl Drop for AnswerPending {
    fn drop(&mut self) {
        // The response is now hyper's to write: until it has, hyper holds
        // bytes it has not written, and the connection is not idle.
        self.0.flushed.store(false, Ordering::Relaxed);
        self.0.answers_pending.fetch_sub(1, Ordering::Release);
    }
}

enum ConnState {
    Open,
    /// Answered by [`Conn::answer_on_socket`]; the socket stays open,
    /// unused.
    Answered,
    Closed,
}

impl Conn {
    /// Whether the connection is serving a request (read but not yet
    /// dispatched, its body still arriving, or its answer being written).
    fn busy(&self) -> bool {
        self.answers_pending.load(Ordering::Acquire) != 0
            || !self.flushed()
            || self.unparsed.load(Ordering::Relaxed)
    }

    /// Whether the connection is answering the requests it had read
    /// behind the one the drain closed it after ([`Replay`]): their answers
    /// need no `Connection: close`, the connection ends after the last.
    pub fn replaying(&self) -> bool {
        self.replaying.load(Ordering::Relaxed)
    }

    /// The peer's address; `None` on a Unix socket.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Whether hyper has written everything it was given to the socket.
    pub fn flushed(&self) -> bool {
        self.flushed.load(Ordering::Relaxed)
    }

    /// Runs `f` on the socket while the connection is open, under the lock
    /// the socket is closed under, so that `f` never touches a descriptor
    /// number that was reused. `None` once closed or answered.
    pub fn peek_socket<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        let state = lock(&self.state);
        matches!(*state, ConnState::Open).then(|| f(self.fd))
    }

    /// As [`Conn::peek_socket`], for `f` answering the request on the raw
    /// socket (see `inline`): the connection then no longer counts as open,
    /// and its socket is left unused until it closes.
    pub fn answer_on_socket<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        let mut state = lock(&self.state);
        if !matches!(*state, ConnState::Open) {
            return None;
        }
        let answered = f(self.fd);
        *state = ConnState::Answered;
        Some(answered)
    }
}

/// A connection's stream as hyper sees it: every call passes through; the
/// writes and flushes keep [`Conn::flushed`] up to date, and the reads keep
/// the head deadline.
///
/// The head deadline: a connection that is idle (serving no request, no
/// [`AnswerPending`] held, and every byte of its last response handed to the
/// socket) must deliver a whole request head within `head_timeout` of
/// becoming idle, or a read fails with `TimedOut` and hyper closes it.
/// That is both the keep-alive timeout (no byte comes) and the
/// header-read timeout (a head trickles in). It is kept here rather than
/// by hyper's header-read timer (`http1::Builder::header_read_timeout`),
/// which behaves the same but boxes a new sleep and registers it for every
/// request: about 920 instructions of each request (4.5%, `bench/callgrind`).
///
/// The write deadline: a write the socket cannot take (the client reads
/// nothing) waits at most `write_timeout`, then fails with `TimedOut` and
/// hyper closes the connection, letting go of the response (and, for a
/// stream, cancelling its plugin call). Any progress starts the wait anew;
/// a write that goes through at once, as nearly all do, costs nothing.
///
/// Writes are not vectored: hyper, built with `writev(false)` (see
/// `server`), hands over one flat buffer at a time, and tokio's default
/// `poll_write_vectored` would pass each slice to `poll_write` anyway.
pub struct ConnIo<S> {
    io: ManuallyDrop<S>,
    conn: Arc<Conn>,
    head_timeout: Duration,
    head_timer: LazyTimer,
    write_timeout: Duration,
    /// Since when writes have been refused, while they are.
    write_stalled_since: Option<Instant>,
    write_timer: LazyTimer,
    max_header_size: usize,
    /// The bytes of the request line read so far, while a request head is
    /// arriving and its first line has not ended.
    request_line: Option<usize>,
    /// Set once the request line is too long: how much of the 414 is
    /// written.
    refused: Option<usize>,
    /// Set once the connection is ending: until when it reads and discards
    /// what the client still sends (see [`ConnIo::poll_shutdown`]).
    lingering_until: Option<Instant>,
}

/// The answer to a request line longer than `--max-header-size`.
const URI_TOO_LONG: &[u8] = b"HTTP/1.1 414 URI Too Long\r\n\
content-type: application/json\r\n\
content-length: 89\r\n\
connection: close\r\n\r\n\
{\"detail\":\"URI Too Long: the request line is longer than the server's --max-header-size\"}";

impl<S: AsRawFd> ConnIo<S> {
    /// Wraps `io`, which is listed in `all` until it closes, must deliver
    /// each request head within `limits.head_timeout` of becoming idle, and
    /// must take some of each write within `limits.write_timeout`.
    pub fn new(
        io: S,
        peer: Option<SocketAddr>,
        all: &Connections,
        limits: &ConnLimits,
    ) -> (ConnIo<S>, Arc<Conn>) {
        let conn = Arc::new(Conn {
            fd: io.as_raw_fd(),
            peer,
            flushed: AtomicBool::new(true),
            state: Mutex::new(ConnState::Open),
            answers_pending: AtomicU32::new(0),
            unparsed: AtomicBool::new(false),
            idle_since: AtomicU64::new(since_epoch(Instant::now()).max(1)),
            replaying: AtomicBool::new(false),
            lingering: AtomicBool::new(false),
        });
        let io = ConnIo {
            io: ManuallyDrop::new(io),
            conn: conn.clone(),
            head_timeout: limits.head_timeout,
            head_timer: LazyTimer::default(),
            write_timeout: limits.write_timeout,
            write_stalled_since: None,
            write_timer: LazyTimer::default(),
            max_header_size: limits.max_header_size,
            request_line: None,
            refused: None,
            lingering_until: None,
        };
        all.add(&conn);
        (io, conn)
    }
}

impl<S> ConnIo<S> {
    /// Whether the connection is idle and past its head deadline. When it
    /// is idle but not past it, the task is woken at the deadline to look
    /// again.
    ///
    /// The moment the connection became idle is taken here, once per idle
    /// spell: at the flush that hands the socket the last bytes of a
    /// response when no other answer is pending (see `poll_flush`), or at
    /// the first read that finds the connection idle.
    fn past_head_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        let conn = &*self.conn;
        if conn.answers_pending.load(Ordering::Acquire) != 0
            || !conn.flushed.load(Ordering::Relaxed)
        {
            return false;
        }
        let mut idle_since = conn.idle_since.load(Ordering::Relaxed);
        if idle_since == 0 {
            idle_since = since_epoch(Instant::now()).max(1);
            conn.idle_since.store(idle_since, Ordering::Relaxed);
        }
        let deadline = *EPOCH + Duration::from_nanos(idle_since) + self.head_timeout;
        self.head_timer.poll_until(deadline, cx).is_ready()
    }
}

impl<S> ConnIo<S> {
    /// Passes `written` on, unless it is a write refused for longer than
    /// the write timeout: then a `TimedOut` error.
    fn within_write_deadline<T>(
        &mut self,
        written: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.write_stalled_since = None;
            return written;
        }
        let since = *self.write_stalled_since.get_or_insert_with(Instant::now);
        if self
            .write_timer
            .poll_until(since + self.write_timeout, cx)
            .is_ready()
        {
            METRICS.write_timeout();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took none of the response within the write timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S> Drop for ConnIo<S> {
    fn drop(&mut self) {
        let mut state = lock(&self.conn.state);
        // SAFETY: dropped once, here, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.io) };
        *state = ConnState::Closed;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.refused.is_some() {
            return self.refuse(cx);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut *self.io).poll_read(cx, buf);
        // Bytes read while no request is being served start the next one.
        // (Read while one is served, they are its body, or a request hyper
        // dispatches once the answer is out.)
        if buf.filled().len() > before && self.conn.answers_pending.load(Ordering::Relaxed) == 0 {
            let starts_a_head = !self.conn.unparsed.swap(true, Ordering::Relaxed);
            if self.request_line_too_long(starts_a_head, &buf.filled()[before..]) {
                // Hyper never sees these bytes: it would answer 431.
                buf.set_filled(before);
                METRICS.request(Route::other, 414);
                self.refused = Some(0);
                return self.refuse(cx);
            }
        }
        if read.is_pending() && self.past_head_deadline(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request head within the keep-alive or header-read timeout",
            )));
        }
        read
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ConnIo<S> {
    /// Follows the request line through `read`, the next bytes of a request
    /// head (the first ones when `starts_a_head`): whether the line has
    /// reached `--max-header-size` without ending, or ended past it. Only
    /// heads that start on an idle connection are followed; a pipelined one
    /// read with an earlier request is left to hyper (431).
    fn request_line_too_long(&mut self, starts_a_head: bool, read: &[u8]) -> bool {
        if starts_a_head {
            self.request_line = Some(0);
        }
        let Some(seen) = self.request_line else {
            return false;
        };
        match read.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.request_line = None;
                seen + end >= self.max_header_size
            }
            None => {
                self.request_line = Some(seen + read.len());
                seen + read.len() >= self.max_header_size
            }
        }
    }

    /// Answers a request whose line is too long with [`URI_TOO_LONG`], then
    /// ends the connection as [`ConnIo::poll_shutdown`] does, and fails the
    /// read: hyper then closes the connection without a word of its own.
    fn refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = self.refused.unwrap_or(0);
        while written < URI_TOO_LONG.len() {
            let sent = Pin::new(&mut *self.io).poll_write(cx, &URI_TOO_LONG[written..]);
            match self.within_write_deadline(sent, cx) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                Poll::Ready(Ok(_)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.refused = Some(written);
                    return Poll::Pending;
                }
            }
        }
        self.refused = Some(written);
        if let Err(e) = ready!(self.poll_linger(cx)) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request line longer than --max-header-size: answered 414",
        )))
    }

    /// Ends the writing side, then reads and discards what the client still
    /// sends until it closes its side, for at most the head timeout. A
    /// socket closed with bytes unread sends a reset, and a reset throws
    /// away what the kernel has not yet sent of the last answer, and may
    /// make the client drop what it received but has not read (RFC 9112,
    /// section 9.6): a request the server never read, or the rest of a body
    /// it refused, would cost the client the answer it was owed.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let until = match self.lingering_until {
            Some(until) => until,
            None => {
                ready!(Pin::new(&mut *self.io).poll_shutdown(cx))?;
                self.conn.lingering.store(true, Ordering::Relaxed);
                *self
                    .lingering_until
                    .insert(Instant::now() + self.head_timeout)
            }
        };
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let mut discard = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *self.io).poll_read(cx, &mut discard) {
                Poll::Ready(Ok(())) if discard.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {}
                // A reset or any other error: nothing left to keep.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return self.head_timer.poll_until(until, cx).map(Ok);
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.conn.flushed.store(false, Ordering::Relaxed);
        self.conn.idle_since.store(0, Ordering::Relaxed);
        let written = Pin::new(&mut *self.io).poll_write(cx, buf);
        self.within_write_deadline(written, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut *self.io).poll_flush(cx);
        let flushed = self.within_write_deadline(flushed, cx);
        if matches!(flushed, Poll::Ready(Ok(()))) && !self.conn.flushed.load(Ordering::Relaxed) {
            self.conn.flushed.store(true, Ordering::Relaxed);
            // Bytes written since the last flush are out: if that was the
            // end of the last pending answer, the connection is idle from
            // now. Arm the deadline here: hyper looked for the next head
            // before it flushed, and does not look again until woken.
            let _ = self.past_head_deadline(cx);
        }
        flushed
    }

    /// The end of the connection, wherever hyper or the server ends it: a
    /// lingering close ([`ConnIo::poll_linger`]).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_linger(cx)
    }
}

/// The requests hyper had read, but not served, when the drain closed their
/// connection after the answer it was writing: read from `buffered`, and
/// answered on the connection, so that every request the server read gets
/// an answer (a shutdown-abort, for an `/invoke`). Nothing more is read
/// from the socket; once the buffer is served, the connection ends.
pub struct Replay<S> {
    buffered: bytes::Bytes,
    io: ConnIo<S>,
}

impl<S> Replay<S> {
    pub fn new(buffered: bytes::Bytes, io: ConnIo<S>) -> Replay<S> {
        io.conn.replaying.store(true, Ordering::Relaxed);
        Replay { buffered, io }
    }
}

impl<S: Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.buffered.len().min(buf.remaining());
        let taken = self.buffered.split_to(n);
        buf.put_slice(&taken);
        // Empty once served: the end of the connection.
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
