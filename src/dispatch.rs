//! Where a plugin call runs: on a blocking thread, or inline.
//!
//! A call normally runs on a thread of the runtime's blocking pool, so that a
//! plugin that takes long, or never returns, cannot stall the HTTP side.
//! That hand-off costs two thread wake-ups per request, which for a plugin
//! that answers in microseconds is most of the request's cost. So a call
//! runs *inline*, on the runtime worker that read the request, when all of
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
//!   plugin has again been quick [`WARMUP`] times.
//!
//! An inline call still runs in a task of its own, which the request's task
//! awaits. So a call that turns out long blocks one worker for its length,
//! but its request can still be answered at the drain timeout and its
//! client's disconnect still cancels it; the worker's other tasks are taken
//! over by the free workers. `etl_serve_plugin_calls` counts the calls
//! by where they ran. Streaming plugins and prechecks always use the
//! blocking pool: a stream's `emit` waits for the client, and a precheck
//! typically waits on the network.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinError;

use crate::metrics::{CallThread, METRICS};

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

/// The moment inline-call start times count from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since [`EPOCH`], never 0 (0 marks a free slot).
fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64 | 1
}

/// Decides, call by call, where the plugin runs.
pub struct Dispatch {
    /// One per inline call that may run at once: its start time, or 0.
    slots: Box<[AtomicU64]>,
    /// Quick calls in a row, saturating at [`WARMUP`].
    streak: AtomicU32,
    /// Calls waiting for a slot to free up, and how they are woken.
    waiting: AtomicUsize,
    freed: Notify,
}

impl Dispatch {
    /// For a runtime with `workers` worker threads.
    pub fn new(workers: usize) -> Dispatch {
        LazyLock::force(&EPOCH);
        Dispatch {
            slots: (1..workers).map(|_| AtomicU64::new(0)).collect(),
            streak: AtomicU32::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Runs `call` inline when the rules above allow it, else on the
    /// blocking pool, and learns from how long it took.
    pub async fn run<T: Send + 'static>(
        &'static self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, JoinError> {
        let timed = move || {
            let started = Instant::now();
            let result = call();
            self.observe(started.elapsed());
            result
        };
        match self.claim_soon().await {
            Some(slot) => {
                METRICS.plugin_call(CallThread::inline);
                tokio::spawn(async move {
                    let _slot = slot;
                    timed()
                })
                .await
            }
            None => Dispatch::blocking(timed).await,
        }
    }

    /// Runs `call` on the blocking pool, counted as such: for the calls
    /// that never run inline (streams, prechecks).
    pub fn blocking<T: Send + 'static>(
        call: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        METRICS.plugin_call(CallThread::blocking);
        tokio::task::spawn_blocking(call)
    }

    /// A free inline slot, waiting up to [`BUSY_WAIT`] for one when the
    /// plugin is quick but every slot is taken: a quick call frees its slot
    /// within microseconds, sooner than a hand-off to the blocking pool
    /// would take. The call that frees a slot wakes one waiter.
    async fn claim_soon(&'static self) -> Option<Slot> {
        match self.claim() {
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
            match self.claim() {
                Claim::Inline(slot) => return Some(slot),
                Claim::Blocking => return None,
                Claim::Busy => {}
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Whether the next call may run inline now.
    fn claim(&'static self) -> Claim {
        if self.streak.load(Ordering::Relaxed) < WARMUP {
            return Claim::Blocking;
        }
        let now = now_ns();
        let overrun = OVERRUN.as_nanos() as u64;
        let mut free = None;
        for (i, slot) in self.slots.iter().enumerate() {
            match slot.load(Ordering::Relaxed) {
                0 => free = free.or(Some(i)),
                started if now.saturating_sub(started) > overrun => {
                    // An inline call is overrunning: stop inlining.
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
        match self.slots[i].compare_exchange(0, now, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => Claim::Inline(Slot {
                cell: &self.slots[i],
                dispatch: self,
            }),
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

    /// Whether the next call may run inline (for tests).
    #[cfg(test)]
    fn inline_allowed(&'static self) -> bool {
        matches!(self.claim(), Claim::Inline(_))
    }
}

/// What [`Dispatch::claim`] found.
enum Claim {
    /// Run inline, holding this slot.
    Inline(Slot),
    /// The plugin is quick, but every inline slot is taken.
    Busy,
    /// Use the blocking pool.
    Blocking,
}

/// An inline call's slot, freed when the call ends (or panics).
struct Slot {
    cell: &'static AtomicU64,
    dispatch: &'static Dispatch,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SeqCst on both sides (here, and the waiter's count and check):
        // either the waiter sees the slot free, or this sees the waiter.
        self.cell.store(0, Ordering::SeqCst);
        if self.dispatch.waiting.load(Ordering::SeqCst) > 0 {
            self.dispatch.freed.notify_one();
        }
    }
}

/// Counts a call waiting in [`Dispatch::claim_soon`], until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak(workers: usize) -> &'static Dispatch {
        Box::leak(Box::new(Dispatch::new(workers)))
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
        for _ in 0..WARMUP {
            d.observe(Duration::from_micros(1));
        }
        d.observe(QUICK + Duration::from_micros(1));
        assert!(!d.inline_allowed());
    }

    #[test]
    fn at_most_workers_minus_one_inline_calls() {
        let d = leak(3);
        for _ in 0..WARMUP {
            d.observe(Duration::from_micros(1));
        }
        let Claim::Inline(a) = d.claim() else {
            panic!("no first slot")
        };
        let Claim::Inline(b) = d.claim() else {
            panic!("no second slot")
        };
        assert!(
            matches!(d.claim(), Claim::Busy),
            "a third inline call would leave no free worker"
        );
        drop(a);
        assert!(d.inline_allowed());
        drop(b);
    }

    #[tokio::test]
    async fn a_quick_call_waits_briefly_for_a_busy_slot() {
        let d = leak(2);
        for _ in 0..WARMUP {
            d.observe(Duration::from_micros(1));
        }
        let Claim::Inline(held) = d.claim() else {
            panic!("no slot")
        };
        let mut waiting = std::pin::pin!(d.claim_soon());
        assert!(
            futures_util::poll!(waiting.as_mut()).is_pending(),
            "it waits while the slot is busy"
        );
        drop(held);
        assert!(waiting.await.is_some(), "and takes the slot once free");

        let _held = d.claim_soon().await.expect("a free slot");
        assert!(
            d.claim_soon().await.is_none(),
            "a slot that stays busy sends the call to the blocking pool"
        );
    }

    #[test]
    fn one_worker_never_inlines() {
        let d = leak(1);
        for _ in 0..WARMUP {
            d.observe(Duration::from_micros(1));
        }
        assert!(!d.inline_allowed());
    }

    #[test]
    fn an_overrunning_inline_call_ends_inlining() {
        let d = leak(3);
        for _ in 0..WARMUP {
            d.observe(Duration::from_micros(1));
        }
        let Claim::Inline(_running) = d.claim() else {
            panic!("no slot")
        };
        std::thread::sleep(OVERRUN + Duration::from_millis(5));
        assert!(matches!(d.claim(), Claim::Blocking));
        assert!(
            d.streak.load(Ordering::Relaxed) < WARMUP,
            "the overrun reset the streak"
        );
    }
}
