//! Inline plugin calls: where a plugin call runs, on a blocking thread or
//! right in the request's task, and everything an inline call needs.
//!
//! The routes call [`InlineCalls::invoke`] for a plain `/invoke`: it runs
//! the call inline and answers it when the rules below allow, and hands the
//! call back for the blocking pool when they do not. This file holds the
//! rules and the slots; `watchdog` the thread that watches inline calls;
//! `invoke` what an inline `/invoke` leaves for the watchdog, and how the
//! watchdog answers it on the raw socket.
//!
//! A call normally runs on a thread of the runtime's blocking pool, so that a
//! plugin that takes long, or never returns, cannot stall the HTTP side.
//! That hand-off costs two thread wake-ups per request, which for a plugin
//! that answers in microseconds is most of the request's cost. So a call
//! runs *inline*, right in the task that read the request, when all of
//! these hold:
//!
//! - the plugin's last [`WARMUP`] calls each returned within [`QUICK`];
//! - fewer than `workers - 1` inline calls are running, so at least one
//!   worker is always free to serve HTTP, answer probes and run the drain
//!   (a call that finds every inline slot taken waits up to [`BUSY_WAIT`]
//!   for one, woken by the call that frees it: a quick call frees its slot
//!   sooner than a hand-off to the blocking pool would take);
//! - no running inline call has taken longer than [`OVERRUN`]. One that
//!   overruns, or any call that takes longer than [`QUICK`], resets the
//!   count above, so every later call goes to the blocking pool until the
//!   plugin has again been quick [`WARMUP`] times;
//! - the connection has sent all it was given (hyper holds no unsent bytes
//!   of it), so that the watchdog may write the request's answer straight
//!   to the socket (see [`Rescue::answer`]).
//!
//! An inline call holds its worker thread, and its request's task with it,
//! until the plugin returns. A call that turns out long must still get what
//! every call gets: its client's disconnect cancels it, and the drain
//! timeout answers its request. Nothing on its own thread can do that, so a
//! running inline call leaves a [`Rescue`] in its slot, and the *watchdog*
//! (a thread of its own, [`InlineCalls::start_watchdog`]) acts through it.
//! Every [`WATCH_EVERY`] while inline calls run, it:
//!
//! - wakes the runtime once a call has run longer than [`QUICK`]: a worker
//!   parked while the held worker was running would otherwise sleep on,
//!   and with it the network and the timers;
//! - cancels any such call whose client has gone away, and ends inlining
//!   when one overruns;
//! - once the drain timeout expired, answers every inline call still inside
//!   the plugin with the shutdown-abort ([`Rescue::answer`]). The call and
//!   the watchdog take the rescue out of the slot under its lock, so
//!   exactly one of them answers the request.
//!
//! The watchdog sleeps once a tick passes in which no inline call started.
//! `etl_serve_plugin_calls` counts the calls by where they ran. Streaming
//! plugins and prechecks always use the blocking pool: a stream's `emit`
//! waits for the client, and a precheck typically waits on the network.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::{CallThread, METRICS};
use crate::sync::lock;

mod invoke;
mod watchdog;

pub use invoke::{InlineCall, InvokeRescue};

/// How long a call may take and still count as quick.
pub const QUICK: Duration = Duration::from_millis(1);

/// How long an inline call may run before inlining stops. Longer than
/// [`QUICK`], so that a quick call whose thread the kernel preempted for a
/// time slice does not count as an overrun.
pub const OVERRUN: Duration = Duration::from_millis(20);

/// How many quick calls in a row make a plugin eligible for inline calls.
pub const WARMUP: u32 = 64;

/// How long a quick call waits for a free inline slot before it goes to
/// the blocking pool: as long as a call may take and still be quick.
pub const BUSY_WAIT: Duration = QUICK;

/// How often the watchdog looks at the running inline calls.
pub const WATCH_EVERY: Duration = Duration::from_millis(10);

/// What the watchdog may do for an inline call while the call holds its
/// thread. Each method runs on the watchdog's thread, under the call's
/// slot lock, so they must be quick and must not block on the runtime.
pub trait Rescue: Send + 'static {
    /// Whether the call's client has gone away.
    fn client_gone(&self) -> bool;
    /// Asks the call to stop because its client went away. Called once per
    /// look while the client stays gone, so it must be idempotent.
    fn cancel_for_client(&self);
    /// The drain timed out with the call still inside the plugin: answers
    /// its request in its place. The call's task never answers it then.
    fn answer(self);
}

/// The moment inline-call start times count from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `at` as nanoseconds since [`EPOCH`], never 0 (0 marks a free slot).
fn ns_at(at: Instant) -> u64 {
    at.saturating_duration_since(*EPOCH).as_nanos() as u64 | 1
}

/// Now, as [`ns_at`].
fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// Decides, call by call, where the plugin runs, and watches the calls
/// that run inline. Every call reads it from whichever worker runs it, so
/// it keeps to its own cache lines, which nothing written often shares.
#[repr(align(128))]
pub struct InlineCalls<R> {
    /// One per inline call that may run at once.
    slots: Box<[InlineSlot<R>]>,
    /// Quick calls in a row, saturating at [`WARMUP`].
    streak: AtomicU32,
    /// Calls waiting for a slot to free up, and how they are woken.
    waiting: AtomicUsize,
    freed: Notify,
    /// Whether the watchdog sleeps until an inline call starts, and its
    /// thread, to wake it.
    watchdog_asleep: AtomicBool,
    watchdog: OnceLock<Thread>,
    /// Whether an inline call started since the watchdog last looked.
    started_since_look: AtomicBool,
    /// Set once the watchdog answered the inline calls at the drain
    /// timeout: no call may leave a rescue after that.
    closed: AtomicBool,
}

/// Written by every inline call: alone on its cache lines.
#[repr(align(128))]
struct InlineSlot<R> {
    /// The running call's start time ([`now_ns`]), or 0.
    started: AtomicU64,
    /// The running call's rescue, until the call or the watchdog takes it.
    rescue: Mutex<Option<R>>,
}

/// How an inline call ended.
enum Ended<T, R> {
    /// The plugin returned (at the instant given); the rescue comes back
    /// unused.
    Returned(T, R, Instant),
    /// The call panicked (with this message).
    Panicked(String, R),
    /// The watchdog answered the request at the drain timeout: the call's
    /// task must not answer it again.
    Answered,
    /// The drain timeout had already expired: the call was not made.
    TooLate(R),
}

impl<R: Rescue> InlineCalls<R> {
    /// For a runtime with `workers` worker threads.
    pub fn new(workers: usize) -> InlineCalls<R> {
        LazyLock::force(&EPOCH);
        InlineCalls {
            slots: (1..workers)
                .map(|_| InlineSlot {
                    started: AtomicU64::new(0),
                    rescue: Mutex::new(None),
                })
                .collect(),
            streak: AtomicU32::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            watchdog_asleep: AtomicBool::new(false),
            watchdog: OnceLock::new(),
            started_since_look: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// A slot to run the next call inline in, when the rules above allow it
    /// and `allowed`, else `None` (the call goes to the blocking pool).
    /// `now` is the time of asking, which the caller has at hand.
    ///
    /// Waits up to [`BUSY_WAIT`] for a slot when the plugin is quick but
    /// every slot is taken: a quick call frees its slot within
    /// microseconds, sooner than a hand-off to the blocking pool would
    /// take. The call that frees a slot wakes one waiter.
    async fn slot(&'static self, allowed: bool, now: Instant) -> Option<Slot<R>> {
        if !allowed {
            return None;
        }
        match self.claim(ns_at(now)) {
            Claim::Inline(slot) => return Some(slot),
            Claim::Blocking => return None,
            Claim::Busy => {}
        }
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a slot freed after the check
            // wakes this call (Slot::drop reads `waiting` after freeing).
            freed.as_mut().enable();
            match self.claim(now_ns()) {
                Claim::Inline(slot) => return Some(slot),
                Claim::Blocking => return None,
                Claim::Busy => {}
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Wakes the watchdog if it sleeps. SeqCst here (slot claimed, then
    /// the flag read) and in the watchdog (flag set, then the slots read):
    /// either this sees the watchdog asleep, or the watchdog sees the slot.
    fn wake_watchdog(&self) {
        // Read first: a store on every call would move the line between the
        // cores.
        if !self.started_since_look.load(Ordering::Relaxed) {
            self.started_since_look.store(true, Ordering::Relaxed);
        }
        if self.watchdog_asleep.load(Ordering::SeqCst)
            && self.watchdog_asleep.swap(false, Ordering::SeqCst)
        {
            if let Some(thread) = self.watchdog.get() {
                thread.unpark();
            }
        }
    }

    /// Runs `call` on the blocking pool, and learns from how long it took.
    pub fn time_on_blocking_pool<T: Send + 'static>(
        &'static self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        on_blocking_pool(move || {
            let started = Instant::now();
            let result = call();
            self.observe(started.elapsed());
            result
        })
    }

    /// Whether the next call may run inline, at `now` ([`ns_at`]).
    fn claim(&'static self, now: u64) -> Claim<R> {
        if self.streak.load(Ordering::Relaxed) < WARMUP {
            return Claim::Blocking;
        }
        let mut free = None;
        for (i, slot) in self.slots.iter().enumerate() {
            match slot.started.load(Ordering::Relaxed) {
                0 => free = free.or(Some(i)),
                started if overran(now, started) => {
                    self.streak.store(0, Ordering::Relaxed);
                    return Claim::Blocking;
                }
                _ => {}
            }
        }
        let Some(i) = free else {
            return if self.slots.is_empty() {
                Claim::Blocking
            } else {
                Claim::Busy
            };
        };
        let slot = &self.slots[i];
        match slot
            .started
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::Relaxed)
        {
            Ok(_) => {
                self.wake_watchdog();
                Claim::Inline(Slot { slot, calls: self })
            }
            Err(_) => Claim::Busy,
        }
    }

    fn observe(&self, took: Duration) {
        if took <= QUICK {
            let streak = self.streak.load(Ordering::Relaxed);
            if streak < WARMUP {
                self.streak.store(streak + 1, Ordering::Relaxed);
            }
        } else {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the next call may run inline now (for tests).
    #[cfg(test)]
    fn inline_allowed(&'static self) -> bool {
        matches!(self.claim(now_ns()), Claim::Inline(_))
    }
}

/// Plugin calls given to the blocking pool and not yet returned, queued or
/// running (a call abandoned at the drain timeout, or whose client left,
/// still holds its thread until the plugin returns).
static ON_POOL: AtomicUsize = AtomicUsize::new(0);

/// How many plugin calls may hold blocking threads at once
/// (`--plugin-threads`); set once at startup.
static POOL_THREADS: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets the `--plugin-threads` bound, before any call.
pub fn set_plugin_threads(n: usize) {
    POOL_THREADS.store(n, Ordering::Relaxed);
}

/// Whether every plugin thread is taken: new work is then refused with 503
/// rather than queued behind calls that may never return. Checked before
/// a call is registered, so a burst may pass it by a few; the runtime's
/// own bound on blocking threads holds regardless.
pub fn pool_full() -> Option<usize> {
    let limit = POOL_THREADS.load(Ordering::Relaxed);
    (ON_POOL.load(Ordering::Relaxed) >= limit).then_some(limit)
}

/// Runs `call` on the blocking pool, counted as such: for the calls that
/// never run inline (streams, prechecks).
pub fn on_blocking_pool<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    /// Counts a call in [`ON_POOL`] until it returns, or is dropped unrun.
    struct OnPool;
    impl Drop for OnPool {
        fn drop(&mut self) {
            ON_POOL.fetch_sub(1, Ordering::Relaxed);
        }
    }
    METRICS.plugin_call(CallThread::blocking);
    ON_POOL.fetch_add(1, Ordering::Relaxed);
    let counted = OnPool;
    tokio::task::spawn_blocking(move || {
        let _counted = counted;
        call()
    })
}

/// Whether a call that started at `started` has run past [`OVERRUN`] by
/// `now`.
fn overran(now: u64, started: u64) -> bool {
    now.saturating_sub(started) > OVERRUN.as_nanos() as u64
}

/// What [`InlineCalls::claim`] found.
enum Claim<R: 'static> {
    /// Run inline, holding this slot.
    Inline(Slot<R>),
    /// The plugin is quick, but every inline slot is taken.
    Busy,
    /// Use the blocking pool.
    Blocking,
}

/// A claimed inline slot, freed when the call ends (or panics).
struct Slot<R: 'static> {
    slot: &'static InlineSlot<R>,
    calls: &'static InlineCalls<R>,
}

impl<R: Rescue> Slot<R> {
    /// Runs `call` here and now, leaving `rescue` in the slot for the
    /// watchdog while it runs.
    fn call<T>(self, rescue: R, call: impl FnOnce() -> T) -> Ended<T, R> {
        {
            let mut left = lock(&self.slot.rescue);
            // Checked under the lock that answer_all takes after setting
            // the flag: a rescue left here is always seen by it.
            if self.calls.closed.load(Ordering::SeqCst) {
                return Ended::TooLate(rescue);
            }
            *left = Some(rescue);
        }
        let calls = self.calls;
        METRICS.plugin_call(CallThread::inline);
        // Timed from the slot's claim: a clock read saved, and what lies
        // between (storing the rescue) takes nanoseconds.
        let started = self.slot.started.load(Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(call));
        let ended = Instant::now();
        calls.observe(Duration::from_nanos(ns_at(ended).saturating_sub(started)));
        let rescue = lock(&self.slot.rescue).take();
        match (rescue, result) {
            (None, _) => Ended::Answered,
            (Some(rescue), Ok(value)) => Ended::Returned(value, rescue, ended),
            (Some(rescue), Err(panic)) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                Ended::Panicked(why, rescue)
            }
        }
    }
}

impl<R> Drop for Slot<R> {
    fn drop(&mut self) {
        // SeqCst on both sides (here, and the waiter's count and check):
        // either the waiter sees the slot free, or this sees the waiter.
        self.slot.started.store(0, Ordering::SeqCst);
        if self.calls.waiting.load(Ordering::SeqCst) > 0 {
            self.calls.freed.notify_one();
        }
    }
}

/// Counts a call waiting in [`InlineCalls::slot`], until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A rescue that records what the watchdog did with it.
    #[derive(Default)]
    pub struct Probe {
        pub gone: AtomicBool,
        pub cancels: AtomicUsize,
        pub answers: AtomicUsize,
    }

    pub struct Record(pub &'static Probe);

    impl Rescue for Record {
        fn client_gone(&self) -> bool {
            self.0.gone.load(Ordering::SeqCst)
        }
        fn cancel_for_client(&self) {
            self.0.cancels.fetch_add(1, Ordering::SeqCst);
        }
        fn answer(self) {
            self.0.answers.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn probe() -> &'static Probe {
        Box::leak(Box::default())
    }

    pub fn leak(workers: usize) -> &'static InlineCalls<Record> {
        Box::leak(Box::new(InlineCalls::new(workers)))
    }

    pub fn warm(d: &InlineCalls<Record>) {
        for _ in 0..WARMUP {
            d.observe(Duration::from_micros(1));
        }
    }

    #[test]
    fn inline_only_after_a_quick_warmup() {
        let d = leak(2);
        for _ in 1..WARMUP {
            d.observe(Duration::from_micros(1));
        }
        assert!(!d.inline_allowed());
        d.observe(Duration::from_micros(1));
        assert!(d.inline_allowed());
    }

    #[test]
    fn one_slow_call_ends_inlining() {
        let d = leak(2);
        warm(d);
        d.observe(QUICK + Duration::from_micros(1));
        assert!(!d.inline_allowed());
    }

    #[test]
    fn at_most_workers_minus_one_inline_calls() {
        let d = leak(3);
        warm(d);
        let Claim::Inline(a) = d.claim(now_ns()) else {
            panic!("no first slot")
        };
        let Claim::Inline(b) = d.claim(now_ns()) else {
            panic!("no second slot")
        };
        assert!(
            matches!(d.claim(now_ns()), Claim::Busy),
            "a third inline call would leave no free worker"
        );
        drop(a);
        assert!(d.inline_allowed());
        drop(b);
    }

    // Paused: the wait for a slot is timed by the runtime's clock, which
    // then moves only when every task waits.
    #[tokio::test(start_paused = true)]
    async fn a_quick_call_waits_briefly_for_a_busy_slot() {
        let d = leak(2);
        warm(d);
        let Claim::Inline(held) = d.claim(now_ns()) else {
            panic!("no slot")
        };
        let mut waiting = std::pin::pin!(d.slot(true, Instant::now()));
        assert!(
            futures_util::poll!(waiting.as_mut()).is_pending(),
            "it waits while the slot is busy"
        );
        drop(held);
        assert!(waiting.await.is_some(), "and takes the slot once free");

        assert!(
            d.slot(false, Instant::now()).await.is_none(),
            "a caller that does not allow inline gets no slot"
        );
        let _held = d.slot(true, Instant::now()).await.expect("a free slot");
        assert!(
            d.slot(true, Instant::now()).await.is_none(),
            "a slot that stays busy sends the call to the blocking pool"
        );
    }

    #[test]
    fn one_worker_never_inlines() {
        let d = leak(1);
        warm(d);
        assert!(!d.inline_allowed());
    }

    #[test]
    fn an_overrunning_inline_call_ends_inlining() {
        let d = leak(3);
        warm(d);
        let Claim::Inline(_running) = d.claim(now_ns()) else {
            panic!("no slot")
        };
        let later = ns_at(Instant::now() + OVERRUN + Duration::from_millis(5));
        assert!(matches!(d.claim(later), Claim::Blocking));
        assert!(
            d.streak.load(Ordering::Relaxed) < WARMUP,
            "the overrun reset the streak"
        );
    }

    #[test]
    fn a_call_that_returns_gets_its_rescue_back() {
        let d = leak(2);
        warm(d);
        let p = probe();
        let Claim::Inline(slot) = d.claim(now_ns()) else {
            panic!("no slot")
        };
        match slot.call(Record(p), || 7) {
            Ended::Returned(7, _rescue, _) => {}
            _ => panic!("the call returned 7"),
        }
        // Looked at directly: the call may have taken longer than a quick
        // one (the metrics are built on first use), ending the streak.
        assert_eq!(
            d.slots[0].started.load(Ordering::SeqCst),
            0,
            "the slot is free again"
        );
        d.answer_all();
        assert_eq!(
            p.answers.load(Ordering::SeqCst),
            0,
            "nothing left to answer"
        );
    }

    #[test]
    fn a_panicking_call_frees_its_slot() {
        let d = leak(2);
        warm(d);
        let Claim::Inline(slot) = d.claim(now_ns()) else {
            panic!("no slot")
        };
        match slot.call(Record(probe()), || -> u8 { panic!("boom") }) {
            Ended::Panicked(why, _) => assert_eq!(why, "boom"),
            _ => panic!("the panic is reported"),
        }
        // Reporting the panic may take longer than a quick call.
        warm(d);
        assert!(d.inline_allowed(), "the slot is free again");
    }
}
