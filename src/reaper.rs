//! Reaping orphans when etl-serve is PID 1 (a container's ENTRYPOINT).
//!
//! A process whose parent exits is re-parented to PID 1, which must reap it
//! when it exits or it stays a zombie forever. As PID 1, etl-serve is also
//! the parent of every process its plugin starts, and a plugin that waits for
//! its own child must get that child's exit status. The rule that serves
//! both: **a child that has been a zombie for a full grace period (1 s) is
//! reaped by etl-serve**. A plugin that waits for its child within a second
//! of its exit (as `waitpid` on a running child, or `Command::wait`, always
//! does) keeps the status; an orphan is gone within about 1.25 seconds of
//! its exit, however many exit at once.
//!
//! Every 250 ms, `waitid(WNOWAIT)` looks, without reaping, whether any
//! child is a zombie; when one is, `/proc` says which ones are.

use std::collections::HashMap;
use std::path::Path;
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

/// Reaps every zombie child seen for at least [`GRACE`], and remembers
/// when the others were first seen.
fn reap_round(seen: &mut HashMap<Pid, Instant>) {
    let now = Instant::now();
    // `waitid` shows one zombie at a time, without reaping it: enough to
    // tell whether there is any, not which.
    let peek = waitid(
        Id::All,
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    );
    let first = match peek {
        Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => pid,
        // No zombie (StillAlive), no children (ECHILD), or anything else.
        _ => {
            seen.clear();
            return;
        }
    };
    let mut zombies = zombie_children().unwrap_or_default();
    // Whatever /proc says, the one waitid showed is a zombie child.
    if !zombies.contains(&first) {
        zombies.push(first);
    }
    for &pid in &zombies {
        let since = *seen.entry(pid).or_insert(now);
        if now.duration_since(since) < GRACE {
            continue;
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => debug!(?status, "reaped an orphaned process"),
            Err(e) => debug!(%pid, error = %e, "the zombie was collected by someone else"),
        }
        seen.remove(&pid);
    }
    // Forget the ones collected meanwhile by whoever waited for them.
    seen.retain(|pid, _| zombies.contains(pid));
}

/// This process's zombie children, from `/proc`, as pids of its own pid
/// namespace; `None` when `/proc` cannot be read. One whose status has no
/// `NSpid` line (kernels before 4.1) is left out.
///
/// `/proc` numbers processes in the namespace it was mounted in, which is
/// not this process's own when a container runtime (or `unshare`) gave it a
/// new pid namespace without mounting a new `/proc`: a child's own pid is
/// then the last `NSpid` field of its status.
fn zombie_children() -> Option<Vec<Pid>> {
    let me = std::fs::read_link("/proc/self").ok()?;
    let me = me.to_str()?;
    let entries = std::fs::read_dir("/proc").ok()?.flatten();
    Some(
        entries
            .filter_map(|e| zombie_child(&e.path(), me))
            .collect(),
    )
}

/// The process `/proc` describes at `dir`, as a pid of this process's
/// namespace, if it is a zombie child of `me` (this process's `/proc` pid).
fn zombie_child(dir: &Path, me: &str) -> Option<Pid> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold anything, so split after
    // its last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    if fields.next()? != "Z" || fields.next()? != me {
        return None;
    }
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    nspid
        .split_whitespace()
        .last()?
        .parse()
        .ok()
        .map(Pid::from_raw)
}
