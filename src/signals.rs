//! The signals etl-serve handles, and what each means (also in
//! docs/shutdown.md). What a shutdown signal sets off is in `shutdown`.

use futures_util::StreamExt;
use signal_hook::consts::{SIGALRM, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tracing::info;

/// The signals etl-serve handles, installed before the plugin loads so
/// that none is missed. The same whether etl-serve is PID 1 or not (as PID
/// 1, a signal without a handler would be dropped; otherwise most would
/// kill the process without a word):
///
/// | signal | meaning |
/// |---|---|
/// | SIGTERM, SIGINT, SIGQUIT | shut down gracefully; a second one forces the exit |
/// | SIGHUP, SIGUSR1, SIGUSR2, SIGALRM | logged and ignored: etl-serve has nothing to reload or report |
pub struct ShutdownSignals {
    signals: Signals,
}

const IGNORED: [(i32, &str); 4] = [
    (SIGHUP, "SIGHUP"),
    (SIGUSR1, "SIGUSR1"),
    (SIGUSR2, "SIGUSR2"),
    (SIGALRM, "SIGALRM"),
];

impl ShutdownSignals {
    /// Installs the handlers.
    ///
    /// # Errors
    /// The handlers cannot be installed.
    pub fn install() -> std::io::Result<ShutdownSignals> {
        let shutdown = [SIGTERM, SIGINT, SIGQUIT];
        let ignored = IGNORED.map(|(n, _)| n);
        Ok(ShutdownSignals {
            signals: Signals::new(shutdown.iter().chain(&ignored))?,
        })
    }

    /// Waits for the next signal that asks for a shutdown: SIGTERM
    /// (Kubernetes stopping the pod), SIGINT (an operator's Ctrl-C) or
    /// SIGQUIT; returns its name. The others are logged on the way.
    pub async fn next(&mut self) -> &'static str {
        loop {
            match self.signals.next().await {
                Some(SIGTERM) => return "SIGTERM",
                Some(SIGINT) => return "SIGINT",
                Some(SIGQUIT) => return "SIGQUIT",
                Some(n) => {
                    let name = IGNORED
                        .iter()
                        .find_map(|(s, name)| (*s == n).then_some(*name))
                        .unwrap_or("a signal");
                    info!(signal = name, "{name} received and ignored: only SIGTERM, SIGINT and SIGQUIT stop etl-serve");
                }
                // The stream never ends while the handle lives.
                None => std::future::pending().await,
            }
        }
    }
}
