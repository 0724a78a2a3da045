//! The forced stop: a sync Python call still running Python code when the
//! graceful deadline is near gets `PluginShutdown` raised inside its thread
//! (CPython's asynchronous exception, `PyThreadState_SetAsyncExc`). The
//! thread unwinds, its caller gets the 503 shutdown-abort, and the drain
//! ends as drained instead of abandoning the thread.
//!
//! What it cannot stop: a thread blocked in C code (a long `time.sleep`, a
//! socket read without a timeout, a C extension's loop) sees the exception
//! only when it comes back to Python. The host then answers at the deadline
//! and abandons the thread, as for any plugin.
//!
//! The exception is raised [`BEFORE_DEADLINE`] ahead of the deadline
//! `remaining_ms` reports once the call's cancel flag is set, so that the
//! thread has unwound and its answer is on its way when the host would give
//! up on it. A call whose flag is set with no deadline (its client went
//! away, and it sent no `x-etl-timeout-ms`) is not interrupted.
//!
//! Locking: the calls are listed under [`RUNNING`], which a worker only
//! takes holding the GIL, and the watcher either without waiting for the
//! GIL or after taking it, so the two locks are always taken in the order
//! GIL, then list. A call is listed and unlisted with the GIL held, and
//! the watcher raises with the GIL held after checking that the call is
//! still listed: no exception can reach a thread after its call ended.

use std::collections::HashMap;
use std::ffi::c_long;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use etl_abi as abi;
use pyo3::prelude::*;

/// How long before the graceful deadline the exception is raised.
pub const BEFORE_DEADLINE: Duration = Duration::from_millis(300);

/// How often the watcher looks at the running calls.
const TICK: Duration = Duration::from_millis(20);

/// One sync call running on a worker thread.
struct Running {
    /// The worker's thread, as CPython names it.
    thread: c_long,
    host: &'static abi::EtlHostApi,
    invocation: *mut abi::EtlInvocation,
    flag: Option<&'static AtomicU32>,
    /// When the exception is due: learned once the flag is set.
    due: Option<Instant>,
    raised: bool,
}

// SAFETY: `invocation` is only used for host callbacks, which may be made
// from any thread while the call runs (etl_plugin.h), and only while the
// call is listed, that is, while it runs.
unsafe impl Send for Running {}

static RUNNING: Mutex<Option<HashMap<u64, Running>>> = Mutex::new(None);
static NEXT: AtomicU64 = AtomicU64::new(0);
/// The watcher thread, started by the first call.
static WATCHER: OnceLock<std::thread::Thread> = OnceLock::new();

fn running() -> MutexGuard<'static, Option<HashMap<u64, Running>>> {
    RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A listed call; [`Listed::unlist`] it, with the GIL held, when it ends.
pub struct Listed(u64);

/// Lists the call about to run on this thread; the GIL must be held
/// (`_py`).
pub fn list(
    _py: Python<'_>,
    host: &'static abi::EtlHostApi,
    invocation: *mut abi::EtlInvocation,
    flag: Option<&'static AtomicU32>,
) -> Listed {
    let watcher = WATCHER.get_or_init(|| {
        std::thread::Builder::new()
            .name("etl-python-stop".into())
            .spawn(watch)
            .expect("a thread for the forced stop")
            .thread()
            .clone()
    });
    let key = NEXT.fetch_add(1, Ordering::Relaxed);
    // SAFETY: pthread_self has no preconditions. CPython's thread ident on
    // POSIX is this value.
    let thread = unsafe { libc::pthread_self() } as c_long;
    running().get_or_insert_with(HashMap::new).insert(
        key,
        Running {
            thread,
            host,
            invocation,
            flag,
            due: None,
            raised: false,
        },
    );
    // It sleeps while no call runs.
    watcher.unpark();
    Listed(key)
}

impl Listed {
    /// Unlists the call, and drops an exception raised too late to reach
    /// it, so that it cannot reach the thread's next call.
    pub fn unlist(self, _py: Python<'_>) {
        let entry = running().as_mut().and_then(|m| m.remove(&self.0));
        if let Some(call) = entry.filter(|c| c.raised) {
            // SAFETY: the GIL is held; a null exception clears the
            // thread's pending one.
            unsafe { pyo3::ffi::PyThreadState_SetAsyncExc(call.thread, std::ptr::null_mut()) };
        }
    }
}

/// The watcher's loop: every [`TICK`] while calls run, learns the deadline
/// of each call whose flag is newly set, and raises in the ones whose time
/// has come; asleep while none runs.
fn watch() {
    loop {
        if running().as_ref().is_none_or(HashMap::is_empty) {
            // Woken by the next call listed (or spuriously: look again).
            std::thread::park();
            continue;
        }
        std::thread::sleep(TICK);
        if any_due() {
            Python::attach(raise_due);
        }
    }
}

/// Whether a call is due for the exception, learning deadlines on the way.
/// Does not wait for the GIL.
fn any_due() -> bool {
    let now = Instant::now();
    let mut guard = running();
    let Some(calls) = guard.as_mut() else {
        return false;
    };
    let mut any = false;
    for call in calls.values_mut() {
        if call.raised || call.flag.is_none_or(|f| f.load(Ordering::Acquire) == 0) {
            continue;
        }
        let due = *call.due.get_or_insert_with(|| {
            // SAFETY: the call is listed, so it runs and its handle is valid.
            let left = unsafe { (call.host.remaining_ms)(call.invocation) };
            match u64::try_from(left) {
                Ok(ms) if left != i64::MAX => {
                    let deadline = now + Duration::from_millis(ms);
                    deadline.checked_sub(BEFORE_DEADLINE).unwrap_or(now)
                }
                // No deadline: never due.
                _ => now + Duration::from_secs(86_400 * 365),
            }
        });
        any |= now >= due;
    }
    any
}

/// Raises `PluginShutdown` in every call that is due; the GIL is held.
fn raise_due(py: Python<'_>) {
    let Some(bridge) = crate::BRIDGE.get() else {
        return;
    };
    let Ok(shutdown) = bridge.bind(py).getattr("PluginShutdown") else {
        return;
    };
    let now = Instant::now();
    let mut guard = running();
    for call in guard.iter_mut().flat_map(|m| m.values_mut()) {
        if call.raised || call.due.is_none_or(|due| now < due) {
            continue;
        }
        call.raised = true;
        // SAFETY: the GIL is held and the call is listed, so its thread
        // is in the plugin; the exception type is a live class object.
        unsafe { pyo3::ffi::PyThreadState_SetAsyncExc(call.thread, shutdown.as_ptr()) };
        let message = "graceful deadline near: raising PluginShutdown in the plugin's thread";
        // SAFETY: as above, the handle is valid while the call is listed.
        unsafe {
            (call.host.log)(
                call.invocation,
                abi::LOG_WARN,
                abi::EtlStr::from_str(message),
            )
        };
    }
}
