//! The accept loop: one task per connection, each served by hyper's HTTP/1
//! connection and counted, so that shutdown can wait for them. TCP and Unix
//! domain sockets are served the same way.
//!
//! Connections are never cut by the server: during the drain every answer
//! carries `Connection: close`, so each connection ends itself once it has
//! answered what it received. Closing a socket whose request is still
//! unread would reset it, losing a request the client has already sent.

use std::future::Future;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use crate::routes::{self, App};
use crate::shutdown::{TrackGuard, Tracker};

/// Per-connection limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// How long a connection may wait for a complete request head: the
    /// keep-alive timeout for an idle connection, the header read timeout
    /// for a slow one (the smaller of the two applies to both).
    pub head_timeout: Duration,
    /// Largest request head, in bytes (431 above it).
    pub max_header_size: usize,
}

/// Something that accepts connections: a TCP or a Unix listener.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
    /// Accepts every connection the kernel has queued, asking the kernel
    /// itself (the runtime's readiness state may lag), and closes the
    /// listener.
    fn close(self) -> Vec<Self::Io>;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Small responses go out at once rather than waiting for an ACK.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
    fn close(self) -> Vec<Self::Io> {
        let Ok(std) = self.into_std() else {
            return Vec::new();
        };
        let mut queued = Vec::new();
        while let Ok((s, _)) = std.accept() {
            let _ = s.set_nodelay(true);
            if s.set_nonblocking(true).is_ok() {
                queued.extend(tokio::net::TcpStream::from_std(s));
            }
        }
        queued
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(UnixListener::accept(self).await?.0)
    }
    fn close(self) -> Vec<Self::Io> {
        let Ok(std) = self.into_std() else {
            return Vec::new();
        };
        let mut queued = Vec::new();
        while let Ok((s, _)) = std.accept() {
            if s.set_nonblocking(true).is_ok() {
                queued.extend(tokio::net::UnixStream::from_std(s));
            }
        }
        queued
    }
}

/// Accepts connections on `listener` until `stop` resolves; then accepts
/// what the kernel has already queued, closes the listener, and returns the
/// count of connections still open.
pub async fn accept_until<L: Listener>(
    listener: L,
    app: &'static App,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) -> Tracker {
    let connections = Tracker::default();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_header_size(limits.max_header_size);
    let serve = |stream: L::Io| {
        let (io, conn) = ConnIo::new(stream, connections.track());
        let service = service_fn(move |req| routes::handle(app, conn.clone(), req));
        let served = builder.serve_connection(TokioIo::new(io), service);
        tokio::spawn(async move {
            if let Err(e) = served.await {
                debug!(error = %e, "connection ended with an error");
            }
        });
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => serve(stream),
                Err(e) => {
                    // Out of file descriptors and the like: keep serving
                    // the connections we have, try again shortly.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Connections the kernel completed but we did not accept yet would be
    // reset when the listener closes, after their client may have sent a
    // request: take them first.
    for stream in listener.close() {
        serve(stream);
    }
    connections
}

/// What the routes, and the inline-call watchdog, know of one connection:
/// whether hyper has handed the socket every byte it wrote, and the socket
/// itself, so that a request whose task is held by an inline plugin call
/// can be answered from another thread (see `dispatch`).
pub struct Conn {
    fd: RawFd,
    /// False from each write until the flush after it: while true, hyper
    /// holds no bytes that it has not written to the socket. Only the
    /// connection's own task writes and reads it.
    flushed: AtomicBool,
    /// Also the lock under which the socket is closed, so that the
    /// watchdog never touches a descriptor number that was reused.
    state: Mutex<ConnState>,
}

enum ConnState {
    /// Counted as open until the connection closes or is answered here.
    Open {
        _counted: TrackGuard,
    },
    /// Answered by [`Conn::answer_raw`]; the socket stays open, unused.
    Answered,
    Closed,
}

/// How long [`Conn::answer_raw`] waits for room in the socket's send
/// buffer before it gives up on a client that does not read.
const RAW_SEND_WAIT: Duration = Duration::from_millis(100);

impl Conn {
    /// Whether hyper has written everything it was given to the socket.
    pub fn flushed(&self) -> bool {
        self.flushed.load(Ordering::Relaxed)
    }

    /// Whether the client has closed its side of the connection (or reset
    /// it), as hyper would find on its next read.
    pub fn peer_gone(&self) -> bool {
        let state = lock(&self.state);
        if !matches!(*state, ConnState::Open { .. }) {
            return false;
        }
        let revents = poll_once(self.fd, nix::libc::POLLRDHUP, Duration::ZERO);
        revents & (nix::libc::POLLRDHUP | nix::libc::POLLHUP | nix::libc::POLLERR) != 0
    }

    /// Writes `response` (a whole HTTP/1.1 response, which must say
    /// `Connection: close`) straight onto the socket and shuts down its
    /// sending side, for a request whose task cannot answer it. Only valid
    /// while that task is held inside the plugin after [`Conn::flushed`]
    /// said true: then nothing else writes to the socket. The connection
    /// stops counting as open.
    pub fn answer_raw(&self, response: &[u8]) -> io::Result<()> {
        let mut state = lock(&self.state);
        if !matches!(*state, ConnState::Open { .. }) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is already closed",
            ));
        }
        let sent = send_all(self.fd, response);
        let _ = socket::shutdown(self.fd, Shutdown::Write);
        *state = ConnState::Answered;
        sent
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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

/// A connection's stream as hyper sees it: every call passes through, and
/// the writes and flushes keep [`Conn::flushed`] up to date.
pub struct ConnIo<S> {
    io: ManuallyDrop<S>,
    conn: Arc<Conn>,
}

impl<S: AsRawFd> ConnIo<S> {
    /// Wraps `io`, which counts as open (`open`) until it closes.
    pub fn new(io: S, open: TrackGuard) -> (ConnIo<S>, Arc<Conn>) {
        let conn = Arc::new(Conn {
            fd: io.as_raw_fd(),
            flushed: AtomicBool::new(true),
            state: Mutex::new(ConnState::Open { _counted: open }),
        });
        let io = ConnIo {
            io: ManuallyDrop::new(io),
            conn: conn.clone(),
        };
        (io, conn)
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

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.conn.flushed.store(false, Ordering::Relaxed);
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.conn.flushed.store(false, Ordering::Relaxed);
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut *self.io).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.conn.flushed.store(true, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}
