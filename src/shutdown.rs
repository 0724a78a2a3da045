//! The shutdown sequence, from the first signal to the exit code.
//!
//! Kubernetes sends SIGTERM to start a graceful shutdown; an operator's
//! Ctrl-C sends SIGINT, which is treated the same way. The first thing done
//! on either is to set the cancel flags, the process-wide one and every
//! in-flight invocation's, so cooperative plugins stop at once. Then the
//! listener stops accepting and open connections are drained.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

/// The signals that start a shutdown, installed at startup so that none is
/// missed between binding and serving.
pub struct ShutdownSignals {
    signals: Signals,
}

impl ShutdownSignals {
    /// Installs the handlers for SIGTERM and SIGINT.
    ///
    /// # Errors
    /// The handlers cannot be installed.
    pub fn install() -> std::io::Result<ShutdownSignals> {
        Ok(ShutdownSignals {
            signals: Signals::new([SIGTERM, SIGINT])?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and returns its name.
    pub async fn next(&mut self) -> &'static str {
        match self.signals.next().await {
            Some(SIGTERM) => "SIGTERM",
            Some(SIGINT) => "SIGINT",
            Some(_) => "signal",
            // The stream never ends while the handle lives.
            None => std::future::pending().await,
        }
    }
}
