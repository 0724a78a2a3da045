//! Numbers unique within the process, handed out on every worker thread at
//! once without a contended counter: a shared counter would move its cache
//! line between the cores on every request. Each thread takes a block of
//! [`BLOCK`] numbers from the shared counter at a time and hands them out
//! from there, so numbers are unique but, across threads, not in order.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

/// How many numbers a thread takes from the shared counter at a time.
pub const BLOCK: u64 = 1024;

/// A source of unique numbers: `shared` holds the first number not yet
/// given to any thread, `local` the calling thread's current block (the
/// next number and the end), initially empty.
pub struct Unique {
    pub shared: &'static AtomicU64,
    pub local: &'static LocalKey<Cell<(u64, u64)>>,
}

impl Unique {
    /// A number no other call of this source returned or will return.
    pub fn next(&self) -> u64 {
        self.local.with(|block| {
            let (mut next, mut end) = block.get();
            if next == end {
                next = self.shared.fetch_add(BLOCK, Ordering::Relaxed);
                end = next + BLOCK;
            }
            block.set((next + 1, end));
            next
        })
    }
}

/// Declares a `static` [`Unique`] whose numbers start at `first`.
macro_rules! unique {
    ($name:ident, first = $first:expr) => {
        static $name: $crate::unique::Unique = {
            static SHARED: ::std::sync::atomic::AtomicU64 =
                ::std::sync::atomic::AtomicU64::new($first);
            ::std::thread_local! {
                static LOCAL: ::std::cell::Cell<(u64, u64)> =
                    const { ::std::cell::Cell::new((0, 0)) };
            }
            $crate::unique::Unique {
                shared: &SHARED,
                local: &LOCAL,
            }
        };
    };
}
pub(crate) use unique;

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    unique!(NUMBERS, first = 1);

    #[test]
    fn numbers_are_unique_across_threads_and_start_at_first() {
        let per_thread = 3 * super::BLOCK as usize + 7;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread).map(|_| NUMBERS.next()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for t in threads {
            for n in t.join().unwrap() {
                assert!(n >= 1, "{n} is below the first number");
                assert!(seen.insert(n), "{n} was handed out twice");
            }
        }
        assert_eq!(seen.len(), 4 * per_thread);
    }
}
