//! Numbers unique within the process (invocation handles, request ids),
//! handed out on every worker thread at once without a contended counter:
//! one shared counter would move its cache line between the cores on every
//! request. Each thread takes a block of [`BLOCK`] numbers from the shared
//! counter at a time and hands them out from there, so numbers are unique
//! but, across threads, neither in order nor without gaps.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many numbers a thread takes from the shared counter at a time.
const BLOCK: u64 = 1024;

/// The first number not yet given to any thread. Never 0, so that a
/// number can serve as a non-null handle.
static SHARED: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's block: the next number and the end, initially empty.
    static LOCAL: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// A number no other call returned or will return.
pub fn next() -> u64 {
    LOCAL.with(|block| {
        let (mut next, mut end) = block.get();
        if next == end {
            next = SHARED.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        block.set((next + 1, end));
        next
    })
}

/// Which block `n` came from. Numbers from one block were handed out by one
/// thread, so this keys per-thread state without asking for the thread.
pub fn block_of(n: u64) -> u64 {
    n / BLOCK
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn numbers_are_unique_across_threads_and_never_zero() {
        let per_thread = 3 * super::BLOCK as usize + 7;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread).map(|_| super::next()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for t in threads {
            for n in t.join().unwrap() {
                assert_ne!(n, 0, "0 is never handed out");
                assert!(seen.insert(n), "{n} was handed out twice");
            }
        }
        assert_eq!(seen.len(), 4 * per_thread);
    }
}
