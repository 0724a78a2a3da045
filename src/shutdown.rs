//! The shutdown sequence, from the first signal to the exit code. The
//! timeline (also in docs/shutdown.md):
//!
//! 1. SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C) arrives. The
//!    very first thing done is to start the drain below and set the cancel
//!    flags, the process-wide one and every in-flight invocation's, so
//!    cooperative plugins stop at once.
//! 2. The drain: `/readyz` answers 503, every response carries
//!    `Connection: close`, and a new `/invoke` or `/precheck` is answered at
//!    once with the 503 shutdown-abort without calling the plugin. The
//!    listener keeps accepting, so nothing that reaches the server goes
//!    unanswered.
//! 3. The moment no invocation is left, the drain is over. If the graceful
//!    timeout expires first, every request still waiting on the plugin is
//!    answered with the 503 shutdown-abort and its plugin thread is
//!    abandoned.
//! 4. The kernel is stopped from completing new connections, the ones it
//!    queued are accepted, and the listener closes (later connects are
//!    refused: nothing was sent). Busy connections (a body still arriving,
//!    a response still being written) get until the graceful deadline, or
//!    3 s past it when the timeout cut the drain; idle ones get one second.
//!    The plugin's shutdown hook runs if no invocation is still inside the
//!    plugin, and the process exits: 0 when drained, 75 when the timeout
//!    cut the drain or a busy connection. A second signal at any point
//!    exits at once with 130.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::conn::Connections;
use crate::invocation;
use crate::signals::ShutdownSignals;

/// Exit codes of a shutdown (also in docs/shutdown.md).
pub mod exit {
    /// Every invocation finished (or bailed out) within the graceful timeout.
    pub const DRAINED: u8 = 0;
    /// The graceful timeout expired with invocations still inside the plugin
    /// (EX_TEMPFAIL).
    pub const DRAIN_TIMED_OUT: u8 = 75;
    /// A second SIGTERM or SIGINT forced the exit during the drain.
    pub const FORCED: u8 = 130;

    /// 128 plus the signal's number, as a shell reports death by it: for a
    /// signal that stopped etl-serve before it served.
    pub fn by_signal(name: &str) -> u8 {
        match name {
            "SIGINT" => 130,
            "SIGQUIT" => 131,
            _ => 143,
        }
    }
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

/// Counts live things (the requests waiting on the plugin) and wakes
/// whoever waits for the count to reach zero. Cheap to copy.
///
/// The count is one atomic, so zero means zero: no live guard anywhere.
/// A tracker lives for the process, so that a guard holds a plain
/// reference rather than a reference count of its own.
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

    /// Starts the drain that ends at `deadline`: the phase first, then the
    /// cancel flags, so that a call a flag stopped is answered as part of
    /// the drain (with `Connection: close`). Returns how many invocations
    /// were inside the plugin.
    fn begin(&self, deadline: Instant) -> usize {
        self.advance(Phase::Draining);
        invocation::cancel_all(deadline)
    }

    fn expire(&self) {
        self.advance(Phase::Expired);
        self.state.expired.notify_waiters();
    }

    fn advance(&self, to: Phase) {
        self.state.phase.fetch_max(to as u8, Ordering::SeqCst);
    }
}

/// How long, once no connection is busy, idle connections are kept open:
/// one that receives a request in that time is answered (503, then closed);
/// one still idle at the end is closed by the exit.
const LINGER: Duration = Duration::from_secs(1);

/// How long past the graceful timeout the shutdown may take: the requests
/// still waiting on the plugin are answered with the shutdown-abort, and
/// those answers written, within it. With the exit itself it keeps the
/// whole shutdown inside the documented `timeout + 5 s`.
const AFTER_TIMEOUT: Duration = Duration::from_secs(3);

/// How often [`finish`] looks at the open connections.
const CENSUS_EVERY: Duration = Duration::from_millis(10);

/// How the drain ended.
pub struct Drained {
    /// The exit code so far.
    pub code: u8,
    /// Until when busy connections (a body still arriving, a response still
    /// being written) may finish: the graceful deadline, or
    /// [`AFTER_TIMEOUT`] past it when the timeout cut the drain.
    pub busy_until: Instant,
}

/// Runs steps 1 to 3 of the timeline after `signal` arrived; the caller
/// then closes the listener and calls [`finish`].
pub async fn drain(
    drain: &Drain,
    signals: &mut ShutdownSignals,
    signal: &str,
    timeout: Duration,
) -> Drained {
    let started = Instant::now();
    let deadline = started + timeout;
    let inside = drain.begin(deadline);
    info!(
        signal,
        in_flight = drain.in_flight(),
        inside_plugin = inside,
        graceful_timeout = %humantime::format_duration(timeout),
        "{signal} received: cancel flags set, draining"
    );
    tokio::select! {
        biased;
        () = drain.idle() => {
            info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
            Drained { code: exit::DRAINED, busy_until: deadline }
        }
        second = signals.next() => forced(second),
        () = tokio::time::sleep_until(deadline.into()) => {
            drain.expire();
            let busy_until = deadline + AFTER_TIMEOUT;
            // Every waiting request now answers the shutdown-abort at once.
            tokio::select! {
                () = drain.idle() => {}
                () = tokio::time::sleep_until(busy_until.into()) => warn!(
                    in_flight = drain.in_flight(),
                    "requests still in flight {AFTER_TIMEOUT:?} after the timeout; exiting anyway"
                ),
                second = signals.next() => forced(second),
            }
            let abandoned = invocation::live_count();
            warn!(
                abandoned,
                "timed out after {}: {}",
                humantime::format_duration(timeout),
                count(abandoned, "invocation abandoned", "invocations abandoned"),
            );
            Drained { code: exit::DRAIN_TIMED_OUT, busy_until }
        }
    }
}

/// `n` and the noun, singular or plural.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Step 4, once the listener stopped taking new connections (`accepting`
/// takes the ones already queued): waits for the busy connections until
/// `ended.busy_until` and gives the idle ones [`LINGER`], then runs the
/// plugin's shutdown hook when no invocation is inside the plugin, logs the
/// exit code and returns it. A busy connection cut at the deadline makes
/// the exit code [`exit::DRAIN_TIMED_OUT`].
pub async fn finish(
    connections: &Connections,
    accepting: tokio::task::JoinHandle<()>,
    signals: &mut ShutdownSignals,
    plugin_shutdown: impl FnOnce(),
    ended: Drained,
) -> ExitCode {
    let mut code = ended.code;
    let mut idle_since: Option<Instant> = None;
    loop {
        let census = connections.census();
        let queue_empty = accepting.is_finished();
        if census.open == 0 && queue_empty {
            break;
        }
        if !queue_empty && census.open > census.busy {
            // If the queue waits for descriptors, the idle connections
            // give theirs back.
            let closed = connections.close_idle_if_short();
            if closed > 0 {
                info!(
                    closed,
                    "closed idle connections to accept the ones still queued"
                );
            }
        }
        let now = Instant::now();
        if census.busy == 0 && queue_empty {
            let since = *idle_since.get_or_insert(now);
            if now >= since + LINGER {
                info!(idle_connections = census.open, "closing idle connections");
                break;
            }
        } else {
            idle_since = None;
        }
        if now >= ended.busy_until {
            if census.busy > 0 {
                warn!(
                    cut = census.busy,
                    "graceful timeout: {} still reading a request or writing a response cut",
                    count(census.busy, "connection", "connections"),
                );
                code = code.max(exit::DRAIN_TIMED_OUT);
            }
            if !queue_empty {
                warn!("connections still queued in the kernel are reset: no file descriptor came free to accept them");
                accepting.abort();
            }
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(CENSUS_EVERY) => {}
            second = signals.next() => forced(second),
        }
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

/// A shutdown signal arrived while the plugin was still loading: nothing
/// was served, so there is nothing to drain. Exits at once, without waiting
/// for the plugin's `init`, with the shell's code for death by that signal
/// (143 for SIGTERM).
pub fn stopped_while_loading(signal: &'static str) -> ! {
    let code = exit::by_signal(signal);
    warn!(
        signal,
        exit_code = code,
        "{signal} while the plugin was loading: exiting without serving"
    );
    exit_now(code)
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
    crate::logging::flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process.
    unsafe { nix::libc::_exit(i32::from(code)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_its_flag_stopped_sees_the_drain_begun() {
        // The answer to a call the drain's flag stopped carries
        // `Connection: close` only if the route sees the drain: the phase
        // must be visible by the time any flag is. The process-wide flag
        // never clears, so this runs in a process of its own.
        const NAME: &str = "shutdown::tests::a_call_its_flag_stopped_sees_the_drain_begun";
        if std::env::var_os("ETL_SERVE_ALONE").is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads", "1"])
                .env("ETL_SERVE_ALONE", "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}"
            );
            return;
        }
        for _ in 0..100 {
            assert!(!invocation::shutting_down());
            let drain = Drain::default();
            let spinning = Arc::new(std::sync::Barrier::new(2));
            let watcher = {
                let (drain, spinning) = (drain.clone(), spinning.clone());
                std::thread::spawn(move || {
                    spinning.wait();
                    while !invocation::shutting_down() {
                        std::hint::spin_loop();
                    }
                    drain.is_draining()
                })
            };
            spinning.wait();
            drain.begin(Instant::now());
            assert!(watcher.join().unwrap(), "a flag was set before the phase");
            invocation::reset_for_test();
        }
    }

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
        drain.begin(Instant::now());
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
        drain.begin(Instant::now());
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
