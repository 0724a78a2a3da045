//! Making a crash visible. A plugin runs in-process, so a plugin that
//! segfaults or aborts takes etl-serve down with it; nothing can answer its
//! callers then. What etl-serve can do is say so: on a fatal signal it
//! writes one line to stderr, then dies of that same signal, so the exit
//! status (and a core dump, where enabled) is what it would have been. As
//! PID 1, which the kernel does not let die of its own signal, it exits
//! with 128 plus the signal's number instead.

use nix::libc;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

const FATAL: [(Signal, &[u8]); 5] = [
    (Signal::SIGSEGV, b"etl-serve: fatal signal SIGSEGV (invalid memory access, most likely in the plugin); the process dies and in-flight requests are lost\n"),
    (Signal::SIGBUS, b"etl-serve: fatal signal SIGBUS (bad memory access, most likely in the plugin); the process dies and in-flight requests are lost\n"),
    (Signal::SIGILL, b"etl-serve: fatal signal SIGILL (illegal instruction, most likely in the plugin); the process dies and in-flight requests are lost\n"),
    (Signal::SIGFPE, b"etl-serve: fatal signal SIGFPE (arithmetic fault, most likely in the plugin); the process dies and in-flight requests are lost\n"),
    (Signal::SIGABRT, b"etl-serve: fatal signal SIGABRT (abort() was called, most likely by the plugin); the process dies and in-flight requests are lost\n"),
];

extern "C" fn on_fatal(signo: libc::c_int) {
    for (signal, message) in FATAL {
        if signal as libc::c_int == signo {
            // SAFETY: write(2) is async-signal-safe; the buffer is static.
            unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
        }
    }
    // SA_RESETHAND restored the default action: die of the same signal.
    // SAFETY: raise(3) is async-signal-safe.
    unsafe { libc::raise(signo) };
    // Still here: as PID 1 the kernel drops a signal whose action is the
    // default. Exit with the status a shell gives death by it (134 for
    // SIGABRT), rather than let abort() go on to a second fault.
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(128 + signo) }
}

/// Installs the handler for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGABRT.
pub fn install() {
    let action = SigAction::new(
        SigHandler::Handler(on_fatal),
        // Once only, and on the alternate stack Rust sets up for each of its
        // threads, so a stack overflow can still be reported.
        SaFlags::SA_RESETHAND | SaFlags::SA_ONSTACK | SaFlags::SA_NODEFER,
        SigSet::empty(),
    );
    for (signal, _) in FATAL {
        // SAFETY: the handler only calls async-signal-safe functions.
        let _ = unsafe { sigaction(signal, &action) };
    }
}
