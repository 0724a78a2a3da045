//! The accept loop: one task per connection, each served by hyper's HTTP/1
//! connection and counted, so that shutdown can wait for them. TCP and Unix
//! domain sockets are served the same way.
//!
//! Connections are never cut by the server: during the drain every answer
//! carries `Connection: close`, so each connection ends itself once it has
//! answered what it received. Closing a socket whose request is still
//! unread would reset it, losing a request the client has already sent.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use crate::app::App;
use crate::conn::ConnIo;
use crate::routes;
use crate::shutdown::Tracker;

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
    // No header-read timeout in hyper: ConnIo keeps the head deadline.
    // Responses are small: one buffer and one write(2) each cost less than
    // queueing the body behind the head for a writev(2).
    builder
        .header_read_timeout(None)
        .writev(false)
        .max_header_size(limits.max_header_size);
    let serve = |stream: L::Io| {
        let (io, conn) = ConnIo::new(stream, connections.track(), limits.head_timeout);
        let service = service_fn(move |req| routes::handle(app, conn.clone(), req));
        let served = builder.clone().serve_connection(TokioIo::new(io), service);
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
