//! The shutdown sequence, from the first signal to the exit code. The
//! timeline (also in docs/shutdown.md):
//!
//! 1. SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C) arrives. The
//!    very first thing done is to set the cancel flags, the process-wide one
//!    and every in-flight invocation's, so cooperative plugins stop at once.
//! 2. The drain: `/readyz` answers 503, every response carries
//!    `Connection: close`, and a new `/invoke` or `/precheck` is answered at
//!    once with the 503 shutdown-abort without calling the plugin. The
//!    listener keeps accepting, so nothing that reaches the server goes
//!    unanswered.
//! 3. The moment no invocation is left, the drain is over. If the graceful
//!    timeout expires first, every request still waiting on the plugin is
//!    answered with the 503 shutdown-abort and its plugin thread is
//!    abandoned.
//! 4. The connections already queued in the kernel are accepted, then the
//!    listener closes (later connects are refused: nothing was sent). Open
//!    connections end themselves after their `Connection: close` answer;
//!    idle ones get one second. The plugin's shutdown hook runs if no
//!    invocation is still inside the plugin, and
//!    the process exits: 0 when drained, 75 when the timeout cut the drain.
//!    A second signal at any point exits at once with 130.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::invocation;

/// Exit codes of a shutdown (also in docs/shutdown.md).
pub mod exit {
    /// Every invocation finished (or bailed out) within the graceful timeout.
    pub const DRAINED: u8 = 0;
    /// The graceful timeout expired with invocations still inside the plugin
    /// (EX_TEMPFAIL).
    pub const DRAIN_TIMED_OUT: u8 = 75;
    /// A second SIGTERM or SIGINT forced the exit during the drain.
    pub const FORCED: u8 = 130;
}

/// Where the server is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving,
    /// A shutdown signal arrived: answer new work with the shutdown-abort.
    Draining,
    /// The graceful timeout expired: stop waiting for the plugin.
    Expired,
}

/// Counts live things (requests waiting on the plugin, open connections)
/// and wakes whoever waits for the count to reach zero. Cheap to copy.
///
/// The count is one atomic, so zero means zero: no live guard anywhere.
/// A tracker lives for the process (there are two), so that a guard holds
/// a plain reference rather than a reference count of its own.
#[derive(Clone, Copy)]
pub struct Tracker {
    inner: &'static TrackerInner,
}

impl Default for Tracker {
    /// A new tracker, kept for the life of the process.
    fn default() -> Tracker {
        Tracker {
            inner: Box::leak(Box::default()),
        }
    }
}

#[derive(Default)]
struct TrackerInner {
    count: AtomicUsize,
    /// How many [`Tracker::zero`] calls are waiting. A guard wakes them
    /// only when there are any: shutdown is the only time anyone waits, and
    /// waking takes the `Notify`'s lock.
    waiters: AtomicUsize,
    zero: Notify,
}

/// Counts one live thing until dropped.
#[must_use = "the thing stops counting when the guard drops"]
pub struct TrackGuard {
    inner: &'static TrackerInner,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        // SeqCst here and in `zero` (waiter counted, then the count read):
        // either this sees the waiter, or the waiter sees this decrement.
        let before = self.inner.count.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.inner.waiters.load(Ordering::SeqCst) > 0 {
            self.inner.zero.notify_waiters();
        }
    }
}

impl Tracker {
    /// Counts one more, until the guard drops.
    ///
    /// SeqCst, so that a caller that tracks and then reads the drain's
    /// phase is either seen by a drain that starts meanwhile (which sets
    /// the phase, then reads the count), or sees that drain.
    pub fn track(&self) -> TrackGuard {
        self.inner.count.fetch_add(1, Ordering::SeqCst);
        TrackGuard { inner: self.inner }
    }

    pub fn count(&self) -> usize {
        self.inner.count.load(Ordering::SeqCst)
    }

    /// Resolves once the count is zero. Cancellation safe.
    pub async fn zero(&self) {
        /// Counts this call among the waiters until it returns.
        struct Waiting(&'static AtomicUsize);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.inner.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.inner.waiters);
        loop {
            let notified = self.inner.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A request counted as waiting on the plugin.
pub type InFlightGuard = TrackGuard;

/// The drain primitive: a phase every request can check and wait on, and a
/// count of the requests that still wait on the plugin. Cheap to clone.
///
/// Every request reads the phase, from every worker thread at once, so it
/// is one atomic that only changes at shutdown. The requests that wait on
/// the plugin on the blocking pool wait on [`Drain::expired`] too.
#[derive(Clone, Default)]
pub struct Drain {
    state: Arc<DrainState>,
    in_flight: Tracker,
}

#[derive(Default)]
struct DrainState {
    /// A [`Phase`], only ever moving forward.
    phase: AtomicU8,
    expired: Notify,
}

impl Drain {
    /// Where the server is in its life.
    fn phase(&self) -> Phase {
        match self.state.phase.load(Ordering::SeqCst) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Expired,
        }
    }

    /// Whether shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Whether the graceful timeout has expired.
    pub fn has_expired(&self) -> bool {
        self.phase() == Phase::Expired
    }

    /// Counts a request that is about to wait on the plugin, until its
    /// response has been handed to the connection.
    pub fn track(&self) -> InFlightGuard {
        self.in_flight.track()
    }

    /// How many requests wait on the plugin.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count()
    }

    /// Resolves once the graceful timeout expired. Cancellation safe.
    pub async fn expired(&self) {
        // A `Notified` sees every later `notify_waiters`, polled or not, so
        // an expiry after the check below still wakes this.
        let expired = self.state.expired.notified();
        if self.phase() == Phase::Expired {
            return;
        }
        expired.await;
    }

    /// Resolves once no request waits on the plugin. Cancellation safe.
    pub async fn idle(&self) {
        self.in_flight.zero().await;
    }

    /// Starts the drain: cancel flags first, then the phase. Returns how
    /// many invocations were inside the plugin.
    fn begin(&self) -> usize {
        let cancelled = invocation::cancel_all();
        self.advance(Phase::Draining);
        cancelled
    }

    fn expire(&self) {
        self.advance(Phase::Expired);
        self.state.expired.notify_waiters();
    }

    fn advance(&self, to: Phase) {
        self.state.phase.fetch_max(to as u8, Ordering::SeqCst);
    }
}

/// The signals that start a shutdown, installed before the port is bound so
/// that none is missed.
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

    /// Waits for the next SIGTERM (Kubernetes stopping the pod) or SIGINT
    /// (an operator's Ctrl-C) and returns its name.
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

/// How long, once no invocation is left, open connections get to finish:
/// one that receives a request in that time is answered (503, then closed);
/// one still idle at the end is closed by the exit.
const LINGER: Duration = Duration::from_secs(1);

/// Bound on waiting for request handlers once the graceful timeout expired.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs steps 1 to 3 of the timeline after `signal` arrived and returns the
/// exit code; the caller then closes the listener and calls [`finish`].
pub async fn drain(
    drain: &Drain,
    signals: &mut ShutdownSignals,
    signal: &str,
    timeout: Duration,
) -> u8 {
    let started = Instant::now();
    let inside = drain.begin();
    info!(
        signal,
        in_flight = drain.in_flight(),
        inside_plugin = inside,
        graceful_timeout = %humantime::format_duration(timeout),
        "{signal} received: cancel flags set, draining"
    );
    let deadline = tokio::time::sleep(timeout);
    tokio::select! {
        biased;
        () = drain.idle() => {
            info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
            exit::DRAINED
        }
        second = signals.next() => forced(second),
        () = deadline => {
            drain.expire();
            // Every waiting request now answers the shutdown-abort at once.
            tokio::select! {
                () = drain.idle() => {}
                () = tokio::time::sleep(FLUSH_TIMEOUT) => warn!(
                    in_flight = drain.in_flight(),
                    "requests still in flight {FLUSH_TIMEOUT:?} after the timeout; exiting anyway"
                ),
                second = signals.next() => forced(second),
            }
            let abandoned = invocation::live_count();
            warn!(
                abandoned,
                "timed out after {}, {abandoned} invocations abandoned",
                humantime::format_duration(timeout)
            );
            exit::DRAIN_TIMED_OUT
        }
    }
}

/// Step 4, once the listener is closed: waits (at most [`LINGER`]) for the
/// open connections to close themselves, runs the plugin's shutdown hook
/// when no invocation is inside the plugin, logs the exit code and returns
/// it.
pub async fn finish(
    connections: &Tracker,
    signals: &mut ShutdownSignals,
    plugin_shutdown: impl FnOnce(),
    code: u8,
) -> ExitCode {
    tokio::select! {
        () = connections.zero() => {}
        () = tokio::time::sleep(LINGER) => {
            info!(idle_connections = connections.count(), "closing idle connections");
        }
        second = signals.next() => forced(second),
    }
    let inside = invocation::live_count();
    if inside == 0 {
        plugin_shutdown();
    } else {
        info!(
            inside,
            "not running the plugin's shutdown hook: invocations are still inside the plugin"
        );
    }
    info!(
        exit_code = code,
        client_disconnect_cancels = invocation::client_gone_count(),
        "exiting with code {code}"
    );
    if inside > 0 {
        // Threads are still running plugin code: do not run the library's
        // destructors under them.
        exit_now(code)
    }
    ExitCode::from(code)
}

fn forced(signal: &str) -> ! {
    warn!(
        signal,
        exit_code = exit::FORCED,
        "second {signal} during the drain: forced exit"
    );
    exit_now(exit::FORCED)
}

/// Exits at once, without atexit handlers or destructors, which could run
/// under threads that are still inside the plugin.
fn exit_now(code: u8) -> ! {
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process.
    unsafe { nix::libc::_exit(i32::from(code)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_every_guard() {
        let drain = Drain::default();
        let a = drain.track();
        let b = drain.track();
        let idle = drain.idle();
        tokio::pin!(idle);
        assert!(futures_util::poll!(idle.as_mut()).is_pending());
        drop(a);
        assert!(futures_util::poll!(idle.as_mut()).is_pending());
        drop(b);
        assert!(futures_util::poll!(idle.as_mut()).is_ready());
    }

    #[test]
    fn the_count_never_reads_zero_while_a_guard_lives() {
        // Guards taken on some threads and dropped on others, while one
        // guard stays alive throughout: no read may ever see zero.
        let tracker = Tracker::default();
        let held = tracker.track();
        let (tx, rx) = std::sync::mpsc::sync_channel::<TrackGuard>(64);
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        tx.send(tracker.track()).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let dropper = std::thread::spawn(move || rx.into_iter().for_each(drop));
        let mut reads = 0u64;
        while !dropper.is_finished() {
            assert!(tracker.count() >= 1, "read zero with a guard alive");
            reads += 1;
        }
        for t in takers {
            t.join().unwrap();
        }
        dropper.join().unwrap();
        assert!(reads > 0);
        assert_eq!(tracker.count(), 1);
        drop(held);
        assert_eq!(tracker.count(), 0);
    }

    #[tokio::test]
    async fn expired_resolves_only_after_expire() {
        let drain = Drain::default();
        let expired = drain.expired();
        tokio::pin!(expired);
        assert!(futures_util::poll!(expired.as_mut()).is_pending());
        drain.begin();
        assert!(drain.is_draining());
        assert!(futures_util::poll!(expired.as_mut()).is_pending());
        drain.expire();
        assert!(futures_util::poll!(expired.as_mut()).is_ready());
    }

    #[test]
    fn expiry_wakes_waiters_on_every_thread() {
        const WAITERS: usize = 8;
        // Waiters on several threads, each with a runtime of its own.
        let drain = Drain::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                let (drain, ready) = (drain.clone(), ready_tx.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let expired = drain.expired();
                        tokio::pin!(expired);
                        assert!(futures_util::poll!(expired.as_mut()).is_pending());
                        ready.send(()).unwrap();
                        tokio::time::timeout(Duration::from_secs(10), expired)
                            .await
                            .is_ok()
                    })
                })
            })
            .collect();
        for _ in 0..WAITERS {
            ready_rx.recv().unwrap();
        }
        drain.begin();
        drain.expire();
        for w in waiters {
            assert!(w.join().unwrap(), "a waiter was not woken by the expiry");
        }
        // And a wait that starts after the expiry ends at once.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let expired = drain.expired();
            tokio::pin!(expired);
            assert!(futures_util::poll!(expired.as_mut()).is_ready());
        });
    }
}
