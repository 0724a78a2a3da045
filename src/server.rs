//! The accept loop: one task per connection, each served by hyper's HTTP/1
//! connection and listed, so that the shutdown can wait for the busy ones.
//! TCP and Unix domain sockets are served the same way.
//!
//! During the drain every answer carries `Connection: close`, so each
//! connection ends itself once it has answered what it received. Requests
//! hyper had read behind that answer (pipelined) are then served from its
//! buffer (`conn::Replay`), so that every request read is answered. The
//! server closes a connection itself only at the very end (see
//! `shutdown::finish`): closing a socket whose request is still unread
//! would reset it, losing a request the client has already sent.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use crate::app::App;
use crate::conn::{Conn, ConnIo, Connections, Replay};
use crate::routes;

/// Per-connection limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// How long a connection may wait for a complete request head: the
    /// keep-alive timeout for an idle connection, the header read timeout
    /// for a slow one (the smaller of the two applies to both).
    pub head_timeout: Duration,
    /// Largest request head, in bytes (431 above it).
    pub max_header_size: usize,
    /// How long a write may wait for the client to take some of it.
    pub write_timeout: Duration,
}

/// A connection just accepted, and its peer's address (`None` on a Unix
/// socket).
pub type Accepted<Io> = (Io, Option<SocketAddr>);

/// Something that accepts connections: a TCP or a Unix listener.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static;
    /// The listener once it stops taking new connections.
    type Closing: Send;
    /// A new connection and its peer's address (`None` on a Unix socket).
    fn accept(&self) -> impl Future<Output = std::io::Result<Accepted<Self::Io>>> + Send;
    /// Makes the kernel complete no new connection, so that the queue of
    /// connections it completed can be emptied for good; `None` when the
    /// listener cannot be taken back from the runtime.
    fn stop_new_connections(self) -> Option<Self::Closing>;
    /// Takes one connection the kernel has already queued, asking the
    /// kernel itself (the runtime's readiness state may lag): `WouldBlock`
    /// when there are none.
    fn accept_queued(closing: &Self::Closing) -> std::io::Result<Accepted<Self::Io>>;
    /// A connection of this kind from `fd`, a duplicate of one's descriptor.
    fn from_fd(fd: OwnedFd) -> std::io::Result<Self::Io>;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    type Closing = std::net::TcpListener;
    async fn accept(&self) -> std::io::Result<Accepted<Self::Io>> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Small responses go out at once rather than waiting for an ACK.
        let _ = stream.set_nodelay(true);
        Ok((stream, Some(peer)))
    }
    fn stop_new_connections(self) -> Option<Self::Closing> {
        let std = self.into_std().ok()?;
        match drop_every_packet(&std) {
            Ok(()) => {}
            // Recent kernels allow a filter on a TCP socket only with
            // CAP_NET_ADMIN, which a container rarely has: expected, so not
            // a warning (docs/reliability.md, "The closing race").
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => match queue_at_most_one(&std) {
                Ok(()) => info!(
                    "no socket filter on the listener without CAP_NET_ADMIN: \
                     its backlog is cut to 0 instead"
                ),
                Err(e) => warn!(error = %e, "cannot cut the listening socket's backlog"),
            },
            Err(e) => warn!(error = %e, "cannot stop new handshakes on the listening socket"),
        }
        Some(std)
    }
    fn accept_queued(closing: &Self::Closing) -> std::io::Result<Accepted<Self::Io>> {
        let (s, peer) = closing.accept()?;
        // A connection is given a copy of its listener's filter when its
        // handshake completes. One that completed as `drop_every_packet`
        // was attached can carry the filter, and would then drop its
        // client's request and every retry of it: take it off.
        let _ = detach_filter(&s);
        let _ = s.set_nodelay(true);
        s.set_nonblocking(true)?;
        Ok((tokio::net::TcpStream::from_std(s)?, Some(peer)))
    }
    fn from_fd(fd: OwnedFd) -> std::io::Result<Self::Io> {
        tokio::net::TcpStream::from_std(fd.into())
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    type Closing = std::os::unix::net::UnixListener;
    async fn accept(&self) -> std::io::Result<Accepted<Self::Io>> {
        Ok((UnixListener::accept(self).await?.0, None))
    }
    fn stop_new_connections(self) -> Option<Self::Closing> {
        // A Unix socket is reached through its path: once the path is gone
        // nobody can connect, and a connect completes only into the queue,
        // which the caller then empties.
        if let Some(path) = self
            .local_addr()
            .ok()
            .as_ref()
            .and_then(|a| a.as_pathname())
        {
            let _ = std::fs::remove_file(path);
        }
        self.into_std().ok()
    }
    fn accept_queued(closing: &Self::Closing) -> std::io::Result<Accepted<Self::Io>> {
        let (s, _) = closing.accept()?;
        s.set_nonblocking(true)?;
        Ok((tokio::net::UnixStream::from_std(s)?, None))
    }
    fn from_fd(fd: OwnedFd) -> std::io::Result<Self::Io> {
        tokio::net::UnixStream::from_std(fd.into())
    }
}

/// Attaches a socket filter that drops every packet to a listening TCP
/// socket. The kernel runs a listener's filter on each SYN and on the ACK
/// that would complete a handshake, so no new connection joins the accept
/// queue: a client's SYN goes unanswered, its retry (a second later) finds
/// the socket closed and its connect is refused, so it knows it sent
/// nothing. Without it, a handshake completed between the last `accept(2)`
/// and the close would be reset after its client wrote a request. A
/// handshake the kernel completes just as the filter goes on leaves a
/// connection with a copy of it, which `accept_queued` takes off.
fn drop_every_packet(listener: &std::net::TcpListener) -> std::io::Result<()> {
    attach_filter(listener, 0)
}

/// Where [`drop_every_packet`] is refused: sets the listener's backlog to
/// 0, so that the kernel completes a new handshake only while its accept
/// queue is empty, and drops the SYN of any other (its client's retry, a
/// second later, is refused). The closing race then leaves at most the one
/// connection completed after the last accept, where without it every
/// handshake completed while the closing thread waits for a core would be
/// reset. A connection already queued stays queued.
fn queue_at_most_one(listener: &std::net::TcpListener) -> std::io::Result<()> {
    let none = nix::sys::socket::Backlog::new(0)?;
    Ok(nix::sys::socket::listen(listener, none)?)
}

/// Attaches to `socket` a one-instruction classic BPF filter that keeps
/// the first `keep` bytes of every packet: 0 drops them all.
fn attach_filter(socket: &impl AsRawFd, keep: u32) -> std::io::Result<()> {
    use nix::libc;
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: keep,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` and the instruction it points to outlive the call,
    // and the kernel copies the program before returning.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes the socket filter off `socket`, if it has one.
fn detach_filter(socket: &impl AsRawFd) -> std::io::Result<()> {
    let unused: nix::libc::c_int = 0;
    // SAFETY: the kernel ignores the option's value for SO_DETACH_FILTER,
    // and `unused` outlives the call.
    let rc = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_DETACH_FILTER,
            std::ptr::addr_of!(unused).cast(),
            std::mem::size_of_val(&unused) as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether an accept failed for want of a file descriptor: it succeeds
/// again once a connection closes.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

/// Accepts connections on `listener` until `stop` resolves; then stops
/// the kernel from completing new ones, accepts every one it has already
/// queued, and closes the listener. Each connection is served on a task of
/// its own and listed in `connections`.
pub async fn accept_until<L: Listener>(
    listener: L,
    app: &'static App,
    limits: ConnLimits,
    connections: &'static Connections,
    stop: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    // No header-read timeout in hyper: ConnIo keeps the head deadline.
    // Responses are small: one buffer and one write(2) each cost less than
    // queueing the body behind the head for a writev(2).
    builder
        .header_read_timeout(None)
        .writev(false)
        .max_header_size(limits.max_header_size);
    let serve = |(stream, peer): Accepted<L::Io>| {
        let (io, conn) = ConnIo::new(stream, peer, connections, &limits);
        let socket = conn.clone();
        let service =
            service_fn(move |req| routes::guarded(routes::handle(app, conn.clone(), req)));
        let mut builder = builder.clone();
        tokio::spawn(async move {
            let connection = builder
                .serve_connection(TokioIo::new(io), service)
                .without_shutdown();
            let parts = match served(connection, &socket).await {
                Ok(parts) => parts,
                Err((e, copy)) => {
                    debug!(error = %e, "connection ended with an error");
                    if let Some(Ok(stream)) = copy.map(L::from_fd) {
                        let (mut io, _) = ConnIo::new(stream, peer, connections, &limits);
                        close(&mut io).await;
                    }
                    return;
                }
            };
            let mut io = parts.io.into_inner();
            if parts.read_buf.is_empty() || !app.drain.is_draining() {
                return close(&mut io).await;
            }
            // The drain closed the connection after one answer, with more
            // requests read behind it: answer them too.
            let replay = Replay::new(parts.read_buf, io);
            // The end of the buffer is a read EOF: the answers to the
            // requests before it must still be written.
            let replayed = builder
                .half_close(true)
                .serve_connection(TokioIo::new(replay), parts.service);
            if let Err(e) = replayed.await {
                debug!(error = %e, "connection ended with an error after its pipelined requests");
            }
        });
    };
    let mut retry = Retry::default();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    retry.succeeded();
                    serve(stream);
                }
                Err(e) => retry.after(&e).await,
            },
        }
    }
    // Connections the kernel completed but we did not accept yet would be
    // reset when the listener closes, after their client may have sent a
    // request: take them all. Out of descriptors, wait for the open
    // connections to end (they all close after their answer now); the
    // shutdown gives up on this task only at its final deadline.
    let Some(closing) = listener.stop_new_connections() else {
        return;
    };
    loop {
        match L::accept_queued(&closing) {
            Ok(stream) => {
                retry.succeeded();
                serve(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => {
                if out_of_descriptors(&e) {
                    connections.want_descriptors();
                }
                retry.after(&e).await;
            }
        }
    }
}

/// Awaits hyper's `connection`, run `without_shutdown`. Over a request it
/// could not parse, hyper answers (400, 431), stops reading, and returns
/// the error without the shutdown, so the socket would close without the
/// lingering close: the error then comes with a copy of the socket's
/// descriptor, taken before hyper drops its own, for the caller to close
/// as after any answer, so that the rest of the request does not reset
/// that answer away. Other errors (a reset, a timeout) leave no answer to
/// keep. (The replay's connection needs none of this: run to its end,
/// hyper shuts the socket down before it returns a parse error.)
async fn served<T>(
    connection: impl Future<Output = hyper::Result<T>>,
    conn: &Conn,
) -> Result<T, (hyper::Error, Option<OwnedFd>)> {
    let mut connection = std::pin::pin!(connection);
    std::future::poll_fn(|cx| {
        connection.as_mut().poll(cx).map_err(|e| {
            let copy = e
                .is_parse()
                .then(|| {
                    // SAFETY: the descriptor is open while the connection
                    // is, and hyper's `connection` still holds it.
                    conn.peek_socket(|fd| {
                        unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
                    })
                })
                .flatten()
                .and_then(Result::ok);
            (e, copy)
        })
    })
    .await
}

/// Ends a connection as hyper would have: the end of the writing side,
/// which `ConnIo` makes a lingering close.
async fn close<S: AsyncWrite + Unpin>(io: &mut S) {
    let _ = std::future::poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await;
}

/// Accept failures in a row, and the wait before the next try: out of
/// file descriptors, an accept fails at once until a connection closes,
/// and trying again at once would only spin.
#[derive(Default)]
struct Retry {
    failures: u32,
}

impl Retry {
    /// Waits before the next accept after `e`: not at all for an error that
    /// concerns one connection only, else 10 ms, doubling to 1 s. Logs the
    /// first failure of a run.
    async fn after(&mut self, e: &std::io::Error) {
        if matches!(
            e.kind(),
            ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
        ) {
            return;
        }
        if self.failures == 0 {
            let why = if out_of_descriptors(e) {
                "out of file descriptors or memory; "
            } else {
                ""
            };
            warn!(error = %e, "accept failed: {why}open connections are still served, and accept is retried with back-off");
        }
        self.failures += 1;
        let wait = Duration::from_millis(10) * 2u32.pow((self.failures - 1).min(7));
        tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "accept works again");
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many instructions the filter on `socket` has: 0 without one.
    fn filter_len(socket: &impl AsRawFd) -> nix::libc::socklen_t {
        let mut len: nix::libc::socklen_t = 0;
        // SAFETY: with a length of 0 the kernel writes only `len`, the
        // filter's length (SO_GET_FILTER has SO_ATTACH_FILTER's number).
        let rc = unsafe {
            nix::libc::getsockopt(
                socket.as_raw_fd(),
                nix::libc::SOL_SOCKET,
                nix::libc::SO_ATTACH_FILTER,
                std::ptr::null_mut(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        len
    }

    /// The kernel copies a listener's filter into each connection it
    /// completes; a connection taken while closing the listener must not
    /// keep it, or a request sent on it is dropped unseen. (The filter
    /// here keeps every packet, so that the handshakes complete.)
    #[tokio::test]
    async fn a_connection_taken_while_closing_does_not_keep_the_listeners_filter() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        attach_filter(&listener, u32::MAX).expect(
            "a socket filter on a TCP socket needs CAP_NET_ADMIN on recent kernels: \
             run the tests as root, as .ci/run does",
        );
        let addr = listener.local_addr().unwrap();
        let _first = std::net::TcpStream::connect(addr).unwrap();
        let _second = std::net::TcpStream::connect(addr).unwrap();

        // The premise: a plain accept hands over the inherited filter.
        let (plain, _) = listener.accept().unwrap();
        assert_eq!(filter_len(&plain), 1, "the kernel copies the filter");

        let (queued, _) = <TcpListener as Listener>::accept_queued(&listener).unwrap();
        assert_eq!(filter_len(&queued), 0, "accept_queued takes it off");
    }

    /// Accept failures back off 10 ms, doubling to at most 1 s, as
    /// docs/shutdown.md says; a success starts over, and an error that
    /// concerns one connection only is retried at once.
    #[tokio::test(start_paused = true)]
    async fn accept_failures_back_off_from_10_ms_doubling_to_1_s() {
        let out_of_fds = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
        let mut retry = Retry::default();
        let mut waits = Vec::new();
        for _ in 0..9 {
            let before = tokio::time::Instant::now();
            retry.after(&out_of_fds).await;
            waits.push(before.elapsed().as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);

        let before = tokio::time::Instant::now();
        retry.after(&ErrorKind::ConnectionAborted.into()).await;
        assert_eq!(before.elapsed(), Duration::ZERO, "one connection's error");

        retry.succeeded();
        let before = tokio::time::Instant::now();
        retry.after(&out_of_fds).await;
        assert_eq!(
            before.elapsed(),
            Duration::from_millis(10),
            "after a success"
        );
    }

    /// Without the filter, a backlog of 0 lets the kernel queue one new
    /// connection, and drops the handshake of the next until it is
    /// accepted.
    #[test]
    fn with_no_backlog_the_kernel_queues_one_connection_at_a_time() {
        use std::net::TcpStream;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let soon = Duration::from_millis(300);
        // The premise: with the usual backlog, two handshakes complete
        // without an accept.
        let _first = TcpStream::connect_timeout(&addr, soon).unwrap();
        let _second = TcpStream::connect_timeout(&addr, soon).unwrap();

        queue_at_most_one(&listener).unwrap();
        // Both stay queued, to be accepted.
        listener.accept().unwrap();
        listener.accept().unwrap();
        let _third = TcpStream::connect_timeout(&addr, soon).unwrap();
        // The queue holds one: the next SYN is dropped, and a client's
        // first retry comes only after a second.
        let fourth = TcpStream::connect_timeout(&addr, soon);
        assert_eq!(
            fourth.map_err(|e| e.kind()).err(),
            Some(ErrorKind::TimedOut),
            "a second queued connection"
        );
    }
}
