//! Every connection accepted and not yet closed ([`Connections`]), for the
//! shutdown to see which are still open, which of those are busy, and
//! which have ended and owe their client nothing more.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::Conn;
use crate::sync::lock;

/// One of a socket's queue lengths: `FIONREAD`, the bytes received and not
/// yet read, or `TIOCOUTQ` (`SIOCOUTQ`), the bytes sent and not yet
/// acknowledged by the peer. `None` on an error.
fn queued(fd: RawFd, which: nix::libc::Ioctl) -> Option<usize> {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: both requests write one int; the callers hold the descriptor
    // open (peek_socket holds the lock it is closed under).
    let rc = unsafe { nix::libc::ioctl(fd, which, &mut n) };
    (rc == 0).then(|| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Every connection accepted and not yet closed, so that the shutdown can
/// tell the busy ones, which it waits for, from the idle ones, which it
/// closes. Only accepts and the shutdown use it; requests never do.
#[derive(Default)]
pub struct Connections {
    list: Mutex<Vec<Weak<Conn>>>,
    /// Set when the last accepts of the shutdown fail for want of a file
    /// descriptor: the idle connections should then give theirs back.
    want_descriptors: AtomicBool,
}

/// What a look at every open connection found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub open: usize,
    /// Open connections serving a request (read but not yet dispatched,
    /// or its body still arriving) or still writing a response.
    pub busy: usize,
}

impl Connections {
    pub(super) fn add(&self, conn: &Arc<Conn>) {
        let mut list = lock(&self.list);
        // Forget the closed ones whenever the list would grow: it stays
        // within twice the number open, at a cost spread over the accepts.
        if list.len() == list.capacity() {
            list.retain(|c| c.strong_count() > 0);
        }
        list.push(Arc::downgrade(conn));
    }

    /// Says that the connections still queued in the kernel cannot be
    /// accepted for want of a file descriptor.
    pub fn want_descriptors(&self) {
        self.want_descriptors.store(true, Ordering::Relaxed);
    }

    /// When [`Connections::want_descriptors`] was said since the last call:
    /// ends every open connection that is idle and has nothing unread in
    /// its socket, so that its descriptor comes back, and returns how many.
    /// Its client sees the connection end between requests.
    ///
    /// Only the reading side is shut: reads then end, and hyper closes the
    /// connection itself. The writing side stays open because "idle" can be
    /// a moment late: a task that has just read a request marks it as
    /// started only once the read returns, and that request is answered.
    pub fn close_idle_if_short(&self) -> usize {
        if !self.want_descriptors.swap(false, Ordering::Relaxed) {
            return 0;
        }
        let list = lock(&self.list);
        let mut closed = 0;
        for conn in list.iter().filter_map(Weak::upgrade) {
            if conn.busy() {
                continue;
            }
            let shut = conn.peek_socket(|fd| {
                // SAFETY: the descriptor is open (peek_socket holds the
                // lock it is closed under).
                queued(fd, nix::libc::FIONREAD) == Some(0)
                    && unsafe { nix::libc::shutdown(fd, nix::libc::SHUT_RD) } == 0
            });
            closed += usize::from(shut == Some(true));
        }
        closed
    }

    /// Looks at every connection still open. One that is ending and whose
    /// client has acknowledged every byte sent to it no longer counts: it
    /// owes nothing, and the exit may close it.
    pub fn census(&self) -> Census {
        let list = lock(&self.list);
        let mut census = Census::default();
        for conn in list.iter().filter_map(Weak::upgrade) {
            let owes = conn.peek_socket(|fd| {
                !conn.lingering.load(Ordering::Relaxed)
                    || queued(fd, nix::libc::TIOCOUTQ) != Some(0)
            });
            if owes != Some(true) {
                continue;
            }
            census.open += 1;
            census.busy += usize::from(conn.busy());
        }
        census
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Connections;
    use crate::conn::ConnIo;
    use crate::server::ConnLimits;
    use crate::sync::lock;

    const LIMITS: ConnLimits = ConnLimits {
        head_timeout: Duration::from_secs(60),
        max_header_size: 64 * 1024,
        write_timeout: Duration::from_secs(60),
    };

    /// Closed connections are forgotten as the list would grow, so that it
    /// stays within about twice the open ones however many came and went;
    /// the open ones stay.
    #[test]
    fn the_list_forgets_closed_connections() {
        let all = Connections::default();
        let connection = || {
            let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            ConnIo::new(ours, None, &all, &LIMITS)
        };
        let open: Vec<_> = (0..3).map(|_| connection()).collect();
        for _ in 0..1000 {
            drop(connection());
        }
        assert_eq!(all.census().open, open.len(), "the open ones stay listed");
        let listed = lock(&all.list).len();
        assert!(
            listed <= 2 * open.len() + 1,
            "{listed} listed, {} open",
            open.len()
        );
    }

    /// The task of a connection that looks idle may have read a request an
    /// instant before: ending the connection for its descriptor must leave
    /// that request's answer a way out.
    #[tokio::test]
    async fn an_idle_connection_ended_for_its_descriptor_can_still_answer() {
        // TCP, as etl-serve serves it: shutdown(2) of one side means
        // something else on other sockets.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let all = Connections::default();
        let (mut io, _conn) = ConnIo::new(server, None, &all, &LIMITS);
        assert_eq!(
            all.close_idle_if_short(),
            0,
            "only when descriptors are short"
        );

        all.want_descriptors();
        assert_eq!(all.close_idle_if_short(), 1);
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "reads end");
        io.write_all(b"an answer").await.unwrap();
        io.flush().await.unwrap();
        let mut got = [0u8; 9];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"an answer");
    }
}
