//! The watchdog: a thread of its own that looks after the inline calls
//! while they hold their worker threads (see the module above).

use std::sync::atomic::Ordering;

use super::{now_ns, overran, InlineCalls, Rescue, QUICK, WATCH_EVERY};
use crate::sync::lock;

impl<R: Rescue> InlineCalls<R> {
    /// Starts the watchdog thread, which runs for the process's life.
    /// `expired` says whether the drain timeout has expired; `wake_runtime`
    /// must wake a parked runtime worker from outside the runtime (any
    /// spawn from a foreign thread does).
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start_watchdog(
        &'static self,
        expired: impl Fn() -> bool + Send + 'static,
        wake_runtime: impl Fn() + Send + 'static,
    ) -> std::io::Result<()> {
        let thread = std::thread::Builder::new()
            .name("etl-serve-watch".into())
            .spawn(move || self.watch(&expired, &wake_runtime))?;
        let _ = self.watchdog.set(thread.thread().clone());
        Ok(())
    }

    fn watch(&self, expired: &dyn Fn() -> bool, wake_runtime: &dyn Fn()) {
        loop {
            // Asleep only after a tick in which no inline call started, so
            // that under load no call pays for waking it.
            let started = self.started_since_look.swap(false, Ordering::Relaxed);
            if !started && !self.any_running() {
                // See wake_watchdog for the other side of this handshake.
                self.watchdog_asleep.store(true, Ordering::SeqCst);
                if !self.any_running() {
                    // Woken by the next inline call (or spuriously).
                    std::thread::park();
                }
                self.watchdog_asleep.store(false, Ordering::SeqCst);
                continue;
            }
            std::thread::sleep(WATCH_EVERY);
            if expired() {
                self.answer_all();
                return;
            }
            if self.look() {
                wake_runtime();
            }
        }
    }

    fn any_running(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.started.load(Ordering::SeqCst) != 0)
    }

    /// Cancels the long calls whose client went away, and ends inlining
    /// when a call overruns (as the next claim would). Says whether a call
    /// is running longer than [`QUICK`].
    fn look(&self) -> bool {
        let mut long = false;
        let now = now_ns();
        let quick = QUICK.as_nanos() as u64;
        for slot in &self.slots[..] {
            let started = slot.started.load(Ordering::Relaxed);
            if started == 0 || now.saturating_sub(started) <= quick {
                continue;
            }
            long = true;
            if overran(now, started) {
                self.streak.store(0, Ordering::Relaxed);
            }
            if let Some(rescue) = &*lock(&slot.rescue) {
                if rescue.client_gone() {
                    rescue.cancel_for_client();
                }
            }
        }
        long
    }

    /// Answers every inline call still inside the plugin, and lets no
    /// later call leave a rescue.
    pub(super) fn answer_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in &self.slots[..] {
            let rescue = lock(&slot.rescue).take();
            if let Some(rescue) = rescue {
                rescue.answer();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::super::tests::{leak, probe, warm, Probe, Record};
    use super::super::*;

    /// Claims a slot and runs, on a thread of its own, a call that waits
    /// until `release` is set. Returns once the call is running.
    fn hold_inline(
        d: &'static InlineCalls<Record>,
        p: &'static Probe,
        release: &'static AtomicBool,
    ) -> std::thread::JoinHandle<&'static str> {
        let Claim::Inline(slot) = d.claim(now_ns()) else {
            panic!("no slot")
        };
        let running: &'static AtomicBool = Box::leak(Box::default());
        let call = std::thread::spawn(move || {
            let ended = slot.call(Record(p), || {
                running.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            match ended {
                Ended::Returned(..) => "returned",
                Ended::Answered => "answered",
                Ended::Panicked(..) => "panicked",
                Ended::TooLate(_) => "too late",
            }
        });
        while !running.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        call
    }

    #[test]
    fn at_the_timeout_a_running_call_is_answered_once_and_told_so() {
        let d = leak(2);
        warm(d);
        let p = probe();
        let release: &'static AtomicBool = Box::leak(Box::default());
        let call = hold_inline(d, p, release);
        d.answer_all();
        assert_eq!(p.answers.load(Ordering::SeqCst), 1);
        release.store(true, Ordering::SeqCst);
        assert_eq!(call.join().unwrap(), "answered", "its task must not answer");
        assert_eq!(p.answers.load(Ordering::SeqCst), 1);

        warm(d);
        let Claim::Inline(slot) = d.claim(now_ns()) else {
            panic!("no slot")
        };
        assert!(
            matches!(slot.call(Record(p), || ()), Ended::TooLate(_)),
            "no call runs inline once the calls were answered"
        );
    }

    #[test]
    fn the_watchdog_cancels_a_long_call_whose_client_left_and_answers_it_at_expiry() {
        let d = leak(2);
        warm(d);
        let expired: &'static AtomicBool = Box::leak(Box::default());
        let wakes: &'static AtomicUsize = Box::leak(Box::default());
        d.start_watchdog(
            || expired.load(Ordering::SeqCst),
            || {
                wakes.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        wait_until(
            || d.watchdog_asleep.load(Ordering::SeqCst),
            "fall asleep with nothing running",
        );
        let p = probe();
        let release: &'static AtomicBool = Box::leak(Box::default());
        let call = hold_inline(d, p, release);
        d.wake_watchdog();
        wait_until(
            || wakes.load(Ordering::SeqCst) > 0,
            "wake the runtime for a long call",
        );
        wait_until(
            || d.streak.load(Ordering::Relaxed) == 0,
            "end inlining for a call running past the overrun limit",
        );
        assert_eq!(
            p.cancels.load(Ordering::SeqCst),
            0,
            "a call whose client is there is left alone"
        );
        p.gone.store(true, Ordering::SeqCst);
        wait_until(|| p.cancels.load(Ordering::SeqCst) > 0, "the cancel");
        expired.store(true, Ordering::SeqCst);
        wait_until(|| p.answers.load(Ordering::SeqCst) == 1, "the answer");
        release.store(true, Ordering::SeqCst);
        assert_eq!(call.join().unwrap(), "answered");
        assert_eq!(p.answers.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_look_at_free_slots_changes_nothing() {
        // Times count from the module's epoch, set at its first use: let
        // more than QUICK pass, as in a server that has run a while.
        let first = now_ns();
        while now_ns() - first <= QUICK.as_nanos() as u64 {
            std::thread::sleep(QUICK);
        }
        let d = leak(2);
        warm(d);
        assert!(!d.look(), "no call runs, so none runs long");
        assert_eq!(
            d.streak.load(Ordering::Relaxed),
            WARMUP,
            "free slots must not end inlining"
        );
    }

    fn wait_until(done: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "the watchdog never did {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
