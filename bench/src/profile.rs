//! Where the time and the memory go: CPU time and context switches per
//! request from /proc, the hottest code from `perf record`, and the
//! resident set by mapping. This
//! is what the report shows next to a target that is not met.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::server::{Host, Paths, Server, Spec};
use crate::wrk::Wrk;

/// CPU cost of one host under the main load.
pub struct Cost {
    pub host: Host,
    pub requests: u64,
    /// Server CPU time per request, µs.
    pub cpu_us: f64,
    /// Context switches per request.
    pub switches: f64,
    /// Share of samples by object (binary, libc, kernel...), percent.
    pub by_object: Vec<(String, f64)>,
    /// The hottest symbols, percent.
    pub top: Vec<(String, f64)>,
}

/// Whether perf can be used here.
pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Measures `host` serving `wordcount` under `connections` for `duration`.
pub fn cost(
    host: Host,
    paths: &Paths,
    wrk: &Wrk,
    connections: u32,
    duration: Duration,
) -> Result<Cost, String> {
    let server = Server::start(&Spec::new(host, "wordcount"), paths)?;
    wrk.run(server.addr, connections, Duration::from_secs(1))?;
    let pid = server.pid().to_string();
    let secs = duration.as_secs().to_string();

    // CPU time and context switches from /proc, before and after a run.
    let pid_num = server.pid().as_raw();
    let before = (cpu_seconds(pid_num), switches(pid_num));
    let run = wrk.run(server.addr, connections, duration)?;
    let after = (cpu_seconds(pid_num), switches(pid_num));
    let requests = run.requests.max(1);
    let cpu_us = (after.0 - before.0) * 1e6 / requests as f64;
    let switches = after.1.saturating_sub(before.1) as f64 / requests as f64;

    // perf record over a second run, for the hottest code.
    let data = paths
        .logs
        .join(format!("perf-{}.data", host.label().replace(' ', "-")));
    let record = Command::new("perf")
        .args(["record", "-q", "-F", "2000", "-o"])
        .arg(&data)
        .args(["-p", &pid, "--", "sleep", &secs])
        .spawn()
        .map_err(|e| format!("perf record: {e}"))?;
    let waiter = std::thread::spawn(move || record.wait_with_output());
    wrk.run(server.addr, connections, duration)?;
    waiter
        .join()
        .expect("perf record thread")
        .map_err(|e| format!("perf record: {e}"))?;
    server.stop();
    Ok(Cost {
        host,
        requests,
        cpu_us,
        switches,
        by_object: report(&data, "dso", 8),
        top: report(&data, "symbol", 15),
    })
}

/// User plus system CPU time of the process so far, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64)
}

/// Context switches of every thread of the process so far.
fn switches(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// `perf report --sort KEY`, the first `n` rows as (name, percent).
fn report(data: &Path, key: &str, n: usize) -> Vec<(String, f64)> {
    let Ok(out) = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", key, "-i"])
        .arg(data)
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            let pct: f64 = pct.trim().parse().ok()?;
            // Symbols read "[.] name" (user) or "[k] name" (kernel).
            // Drop the IPC columns perf appends ("-  -").
            let name = rest.trim().trim_end_matches(['-', ' ']);
            // User symbols lose their "[.] "; kernel ones keep "[k] ".
            let name = name.strip_prefix("[.] ").unwrap_or(name);
            Some((shorten(name.trim()), pct))
        })
        .take(n)
        .collect()
}

/// Long generic Rust names cut to something a table can hold.
fn shorten(name: &str) -> String {
    let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
    if name.chars().count() > 110 {
        name.chars().take(107).collect::<String>() + "..."
    } else {
        name
    }
}

/// Resident set of `pid` by mapping, largest first, in KiB.
pub fn rss_by_mapping(pid: i32) -> Vec<(String, u64)> {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut totals: Vec<(String, u64)> = Vec::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let path = line.split_whitespace().nth(5).unwrap_or("");
            current = match path {
                "" => "anonymous (heap arenas, stacks)".to_owned(),
                p => Path::new(p)
                    .file_name()
                    .map_or(p.to_owned(), |f| f.to_string_lossy().into_owned()),
            };
        } else if let Some(kb) = line.strip_prefix("Rss:") {
            let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            match totals.iter_mut().find(|(name, _)| *name == current) {
                Some((_, total)) => *total += kb,
                None => totals.push((current.clone(), kb)),
            }
        }
    }
    totals.sort_by_key(|t| std::cmp::Reverse(t.1));
    totals.retain(|(_, kb)| *kb > 0);
    totals
}
