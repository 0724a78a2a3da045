//! One connection's plumbing, under hyper:
//!
//! - [`ConnIo`], the stream hyper reads and writes, which keeps track of
//!   whether hyper has handed the socket every byte it wrote;
//! - [`Conn`], what the routes and the inline-call watchdog know of the
//!   connection, and how the watchdog answers a request whose task is held
//!   by the plugin (see `dispatch`);
//! - [`HeadTimer`], hyper's header-read timer, with one runtime timer per
//!   connection instead of one per request.

use std::future::Future;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::shutdown::TrackGuard;
use crate::sync::lock;

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

/// hyper's timer for one connection, which hyper uses for the header-read
/// timeout only: it starts a sleep each time it waits for a request head
/// and drops it once the head is in, so once per request.
///
/// A runtime timer per sleep costs a registration and a removal in the
/// runtime's timer wheel per request. Here every sleep of the connection
/// shares one runtime timer, which moves only when it fires before the
/// deadline of the sleep that polls it (or is armed later than that
/// deadline): about once per timeout period on a busy connection. It may
/// then wake the connection's task early, once, which hyper takes as a
/// spurious wake-up.
///
/// Meant for one sleep at a time, polled from the connection's task: the
/// runtime timer keeps the waker of the last poll only.
#[derive(Clone)]
pub struct HeadTimer {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    /// Made on first use, from inside the runtime.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Where `timer` is armed, if it is.
    armed_at: Option<Instant>,
    /// The waker `timer` was last polled with.
    waker: Option<Waker>,
}

impl HeadTimer {
    pub fn new() -> HeadTimer {
        HeadTimer {
            shared: Arc::new(Mutex::new(Shared {
                timer: None,
                armed_at: None,
                waker: None,
            })),
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            shared: self.shared.clone(),
            deadline,
        })
    }
}

/// One of [`HeadTimer`]'s sleeps.
struct HeadSleep {
    shared: Arc<Mutex<Shared>>,
    deadline: Instant,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = lock(&self.shared);
        let Shared {
            timer,
            armed_at,
            waker,
        } = &mut *shared;
        let timer =
            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.deadline.into())));
        loop {
            match *armed_at {
                Some(at) if at <= self.deadline => {
                    // Polling the timer again would only register the same
                    // waker again.
                    let same_waker = waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
                    if same_waker && !timer.is_elapsed() {
                        return Poll::Pending;
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        if !same_waker {
                            *waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    if at == self.deadline {
                        return Poll::Ready(());
                    }
                    // It fired for an earlier sleep's deadline.
                }
                // Not armed, or armed past this deadline.
                _ => {}
            }
            timer.as_mut().reset(self.deadline.into());
            *armed_at = Some(self.deadline);
            // Poll it again whatever the waker: one that fired has let go
            // of the waker it had.
            *waker = None;
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    /// The runtime timer's resolution is 1 ms; allow for a loaded machine.
    const LATE: Duration = Duration::from_millis(150);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn a_sleep_ends_at_its_deadline_and_not_before() {
        let timer = HeadTimer::new();
        let start = Instant::now();
        timer.sleep(ms(100)).await;
        let slept = start.elapsed();
        assert!(slept >= ms(100) && slept < ms(100) + LATE, "{slept:?}");
    }

    #[tokio::test]
    async fn later_sleeps_share_the_timer_and_still_end_at_their_own_deadline() {
        let timer = HeadTimer::new();
        let start = Instant::now();
        // One sleep per request head, each dropped once the head is in.
        for _ in 0..3 {
            let mut head = timer.sleep(ms(200));
            assert!(futures_util::poll!(head.as_mut()).is_pending());
            drop(head);
            tokio::time::sleep(ms(50)).await;
        }
        // The shared timer is armed for the first sleep's deadline (200
        // ms); this one's is 150 ms later.
        timer.sleep(ms(200)).await;
        let slept = start.elapsed();
        assert!(slept >= ms(350) && slept < ms(350) + LATE, "{slept:?}");
    }

    #[tokio::test]
    async fn a_sleep_with_an_earlier_deadline_moves_the_timer_forward() {
        let timer = HeadTimer::new();
        let mut long = timer.sleep(Duration::from_secs(60));
        assert!(futures_util::poll!(long.as_mut()).is_pending());
        drop(long);
        let start = Instant::now();
        timer.sleep(ms(50)).await;
        let slept = start.elapsed();
        assert!(slept >= ms(50) && slept < ms(50) + LATE, "{slept:?}");
    }
}
