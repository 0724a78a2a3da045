//! Reaping orphans when etl-serve is PID 1 (a container's ENTRYPOINT).
//!
//! A process whose parent exits is re-parented to PID 1, which must reap it
//! when it exits or it stays a zombie forever. As PID 1, etl-serve is also
//! the parent of every process its plugin starts, and a plugin that waits for
//! its own child must get that child's exit status. The rule that serves
//! both: **a child that has been a zombie for a full grace period (1 s) is
//! reaped by etl-serve**. A plugin that waits for its child within a second
//! of its exit (as `waitpid` on a running child, or `Command::wait`, always
//! does) keeps the status; an orphan is gone within about two seconds.
//!
//! Zombies are found with `waitid(WNOWAIT)`, which looks without reaping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, info};

/// How long a zombie is left for its parent to collect.
const GRACE: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(250);

/// Starts the reaper task. Call only when this process is PID 1.
pub fn spawn() {
    info!("running as PID 1: orphaned processes will be reaped");
    tokio::spawn(async {
        let mut seen: HashMap<Pid, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            reap_round(&mut seen);
        }
    });
}

/// Reaps every zombie seen for at least [`GRACE`], oldest first, and
/// remembers when the others were first seen.
fn reap_round(seen: &mut HashMap<Pid, Instant>) {
    let now = Instant::now();
    loop {
        let peek = waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        let pid = match peek {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => pid,
            // No zombie (StillAlive), no children (ECHILD), or anything else.
            _ => break,
        };
        let first = *seen.entry(pid).or_insert(now);
        if now.duration_since(first) < GRACE {
            // waitid reports one zombie at a time; the ones behind this one
            // are looked at once it is collected.
            break;
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => debug!(?status, "reaped an orphaned process"),
            Err(e) => debug!(%pid, error = %e, "the zombie was collected by someone else"),
        }
        seen.remove(&pid);
    }
    // Forget pids that are no longer zombies (collected by their waiter).
    seen.retain(|_, first| now.duration_since(*first) < GRACE * 10);
}
