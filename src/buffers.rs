//! Byte buffers kept by each thread for the next request: the plugin's
//! input and the envelope are written into one of these rather than into a
//! fresh allocation, and given back when done with.
//!
//! A thread keeps at most [`KEPT`] buffers of at most [`LARGEST`] bytes
//! each, so the memory held stays small whatever the traffic. Only the
//! runtime's worker threads give buffers back (see the callers): the
//! blocking pool may run hundreds of threads, which should keep nothing.

use std::cell::RefCell;

/// How many buffers a thread keeps.
const KEPT: usize = 4;

/// The largest buffer kept; a larger one is freed.
const LARGEST: usize = 64 * 1024;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `capacity` bytes: one this thread
/// kept, if it has one.
pub fn take(capacity: usize) -> Vec<u8> {
    let mut buf = FREE.with_borrow_mut(Vec::pop).unwrap_or_default();
    buf.reserve(capacity);
    buf
}

/// Keeps `buf` for a later [`take`] on this thread, or frees it.
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > LARGEST {
        return;
    }
    buf.clear();
    FREE.with_borrow_mut(|free| {
        if free.len() < KEPT {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_and_large_ones_are_not_kept() {
        std::thread::spawn(|| {
            let mut a = take(100);
            a.extend_from_slice(b"left over");
            let at = a.as_ptr();
            give(a);
            let b = take(10);
            assert!(b.is_empty());
            assert_eq!(b.as_ptr(), at, "the same allocation, reused");
            give(b);

            give(Vec::with_capacity(LARGEST + 1));
            for _ in 0..KEPT + 2 {
                give(Vec::with_capacity(16));
            }
            FREE.with_borrow(|free| {
                assert_eq!(free.len(), KEPT);
                assert!(free.iter().all(|f| f.capacity() <= LARGEST));
            });
        })
        .join()
        .unwrap();
    }
}
