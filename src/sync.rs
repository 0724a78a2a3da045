//! Locking that outlives a panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning. Every mutex in etl-serve guards a
/// critical section that is a single push, insert, take or store, so a
/// panic while one is held leaves its data consistent, and refusing the
/// lock afterwards would only take the server down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
