//! Counters that every request updates, spread over [`SHARDS`] cells, each
//! alone on its cache lines, one cell per thread.
//!
//! A single counter written by both worker threads moves its cache line
//! from one core to the other on nearly every request. With a cell per
//! thread, a worker writes only lines its own core already holds; reading
//! the total (a metrics scrape, the drain) adds the cells up.
//!
//! Threads past the first [`SHARDS`] share cells, so cells are atomic, and
//! a thing counted up on one thread and down on another leaves one cell
//! positive and the other negative: only the total means anything.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

/// How many cells a counter is spread over.
pub const SHARDS: usize = 8;

/// This thread's cell index.
pub fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// One cell, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell(AtomicI64);

/// A signed count spread over cells.
#[derive(Debug, Default)]
pub struct Count([Cell; SHARDS]);

impl Count {
    /// Adds `n` (which may be negative) in this thread's cell, with
    /// `order`; returns the cell's previous value.
    pub fn add(&self, n: i64, order: Ordering) -> i64 {
        self.0[shard()].0.fetch_add(n, order)
    }

    /// The total, each cell read with `order`.
    pub fn total(&self, order: Ordering) -> i64 {
        self.0.iter().map(|c| c.0.load(order)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_counts_every_thread_even_across_threads() {
        let count: &'static Count = Box::leak(Box::default());
        let threads: Vec<_> = (0..2 * SHARDS)
            .map(|_| std::thread::spawn(move || count.add(3, Ordering::Relaxed)))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(count.total(Ordering::Relaxed), 6 * SHARDS as i64);
        // Up on one thread, down on another.
        count.add(1, Ordering::Relaxed);
        std::thread::spawn(move || count.add(-1, Ordering::Relaxed))
            .join()
            .unwrap();
        assert_eq!(count.total(Ordering::Relaxed), 6 * SHARDS as i64);
    }
}
