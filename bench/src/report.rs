//! The report: `docs/benchmarks.md` and the README's headline, written from
//! the measurements of one run and nothing else.

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::scenarios::{Load, CONNECTIONS, SWEEP};
use crate::server::Host;
use crate::stats::{self, median, median_duration};
use crate::wrk::{Wrk, BODY};
use crate::ShutdownCase;

/// How the run was configured.
pub struct RunArgs {
    pub invoked_as: String,
    pub rounds: usize,
    pub duration: Duration,
    pub sweep_duration: Duration,
}

/// Everything one run measured.
pub struct Results<'a> {
    pub args: RunArgs,
    pub wrk: &'a Wrk,
    pub load: Load,
    /// CPU profiles of etl-serve and the baseline, when perf is there.
    pub profiles: Vec<crate::profile::Cost>,
    pub startup: Vec<(Host, Vec<Duration>)>,
    pub shutdown: Vec<ShutdownCase>,
    /// Items per second, per run.
    pub streaming: Vec<(Host, Vec<f64>)>,
    /// (ns per `is_cancelled()`, ns per plain atomic load), per run.
    pub cancel: Vec<(f64, f64)>,
    pub venv: Option<PathBuf>,
    pub release: PathBuf,
}

const README_START: &str = "<!-- benchmark-headline:start -->";
const README_END: &str = "<!-- benchmark-headline:end -->";

/// The figures the targets and the headline are about.
struct Key {
    rps: Vec<f64>,
    p99: Vec<f64>,
    startup: Option<Duration>,
    startup_reference: Option<Duration>,
    startup_bridge: Option<Duration>,
    idle_rss: Option<u64>,
    idle_rss_reference: Option<u64>,
    idle_rss_bridge: Option<u64>,
    idle_stop: Option<Duration>,
    idle_stop_reference: Option<Duration>,
    coop_answer: Option<Duration>,
    coop_exit: Option<Duration>,
    stuck_exit: Option<Duration>,
}

impl Results<'_> {
    fn index(&self, host: Host) -> Option<usize> {
        self.load.hosts.iter().position(|&h| h == host)
    }

    /// For each host, the median over the rounds of one figure.
    fn round_medians(&self, figure: impl Fn(&crate::wrk::Run) -> f64) -> Vec<f64> {
        (0..self.load.hosts.len())
            .map(|h| {
                median(
                    &self
                        .load
                        .rounds
                        .iter()
                        .map(|r| figure(&r[h]))
                        .collect::<Vec<_>>(),
                )
            })
            .collect()
    }

    /// Host `a`'s figure over host `b`'s, round by round: the hosts of a
    /// round run back to back, so a change in the machine's speed between
    /// rounds moves both sides of a ratio.
    fn paired(&self, a: usize, b: usize, figure: impl Fn(&crate::wrk::Run) -> f64) -> Paired {
        paired(
            self.load
                .rounds
                .iter()
                .map(|r| (figure(&r[a]), figure(&r[b]))),
        )
    }

    fn key(&self) -> Key {
        let rps = self.round_medians(|r| r.rps);
        let p99 = self.round_medians(|r| r.p99_us);
        let startup = |host| {
            self.startup
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, d)| median_duration(d))
        };
        let stop = |host, scenario: &str, answer: bool| {
            self.shutdown
                .iter()
                .find(|c| c.host == host && c.scenario.starts_with(scenario))
                .and_then(|c| {
                    // A run whose request got no answer has no answer time:
                    // the figure is then missing, and the target not met.
                    let d: Option<Vec<Duration>> = c
                        .runs
                        .iter()
                        .map(|r| if answer { r.to_answer } else { Some(r.to_exit) })
                        .collect();
                    d.map(|d| median_duration(&d))
                })
        };
        let rss = |host| self.index(host).map(|i| self.load.memory[i].idle_kib);
        Key {
            rps,
            p99,
            startup: startup(Host::EtlServe),
            startup_reference: startup(Host::Reference),
            startup_bridge: startup(Host::PythonBridge),
            idle_rss: rss(Host::EtlServe),
            idle_rss_reference: rss(Host::Reference),
            idle_rss_bridge: rss(Host::PythonBridge),
            idle_stop: stop(Host::EtlServe, "idle", false),
            idle_stop_reference: stop(Host::Reference, "idle", false),
            coop_answer: stop(Host::EtlServe, "in-flight `slow`, cooperative", true),
            coop_exit: stop(Host::EtlServe, "in-flight `slow`, cooperative", false),
            stuck_exit: stop(
                Host::EtlServe,
                "in-flight `slow`, `cooperative=false`",
                false,
            ),
        }
    }
}

/// The median of the per-round ratios, and their range.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Paired {
    median: f64,
    min: f64,
    max: f64,
}

fn paired(rounds: impl Iterator<Item = (f64, f64)>) -> Paired {
    let ratios: Vec<f64> = rounds.map(|(a, b)| a / b).collect();
    Paired {
        median: median(&ratios),
        min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

impl Paired {
    /// "0.91× (rounds 0.83–0.98×)".
    fn with_range(&self) -> String {
        format!(
            "{} (rounds {}–{})",
            stats::ratio(self.median),
            stats::ratio(self.min).trim_end_matches('×'),
            stats::ratio(self.max)
        )
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine(results: &Results<'_>) -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |m| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_owned(), |k| k.trim().to_owned());
    let etl_serve = results.release.join("etl-serve");
    let version = command_output(&etl_serve.to_string_lossy(), &["--version"]).unwrap_or_default();
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]).map(|c| {
        let dirty = command_output("git", &["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.is_empty());
        if dirty {
            format!("{c} with uncommitted changes")
        } else {
            c
        }
    });
    let mut rows = vec![
        ("CPU", format!("{model}, {cores} cores available")),
        (
            "memory",
            format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0),
        ),
        ("kernel", format!("Linux {kernel}")),
        (
            "etl-serve",
            format!(
                "{version} (commit {}), release build",
                commit.unwrap_or_else(|| "unknown".to_owned())
            ),
        ),
        (
            "rustc",
            command_output("rustc", &["--version"]).unwrap_or_default(),
        ),
        ("wrk", results.wrk.version()),
    ];
    if let Some(venv) = &results.venv {
        let script = "import importlib.metadata as m, platform; print('Python ' + platform.python_version() + ', ' + ', '.join(p + ' ' + m.version(p) for p in ['unstructured-platform-plugins', 'uvicorn', 'fastapi', 'uvloop', 'httptools']))";
        let python = venv.join("bin/python");
        rows.push((
            "reference",
            command_output(&python.to_string_lossy(), &["-c", script]).unwrap_or_default(),
        ));
    }
    rows
}

fn exit_text(exit: Option<ExitStatus>) -> String {
    match exit {
        None => "killed after 60 s".to_owned(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => code.to_string(),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "?".to_owned(),
        },
    }
}

fn opt_duration(d: Option<Duration>) -> String {
    d.map_or("n/a".to_owned(), stats::duration)
}

/// `docs/benchmarks.md`.
pub fn markdown(results: &Results<'_>) -> String {
    let key = results.key();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let hosts = &results.load.hosts;
    let bare = results.index(Host::BareHyper);
    let reference = results.index(Host::Reference);
    let python = results.index(Host::PythonBridge);
    let etl = results
        .index(Host::EtlServe)
        .expect("etl-serve is always measured");
    let mut md = String::new();
    let w = &mut md;

    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `{}` on {date}, from that run's measurements. Do not edit by hand: run it again.\n",
        results.args.invoked_as
    );
    let _ = writeln!(
        w,
        "Every figure below was measured in the same run, on the same machine, over loopback. \
         Ratios compare etl-serve with the bare hyper baseline (the limit any hyper-based host can reach) \
         and with the reference host, etl-uvicorn.\n"
    );
    let _ = writeln!(w, "## Machine\n\n| | |\n|---|---|");
    for (name, value) in machine(results) {
        let _ = writeln!(w, "| {name} | {value} |");
    }

    let _ = writeln!(w, "\n## Targets\n");
    let _ = writeln!(w, "| goal | target | measured | met |\n|---|---|---|---|");
    let mut target = |goal: &str, want: &str, got: String, met: Option<bool>| {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(w, "| {goal} | {want} | {got} | {met} |");
    };
    if let Some(b) = bare {
        let r = results.paired(etl, b, |r| r.rps);
        target(
            "throughput vs bare hyper, 16 connections",
            "≥ 0.85×",
            r.with_range(),
            Some(r.median >= 0.85),
        );
        let p = results.paired(etl, b, |r| r.p99_us);
        target(
            "p99 latency vs bare hyper, 16 connections",
            "≤ 1.5×",
            format!(
                "{} ({} vs {})",
                p.with_range(),
                stats::micros(key.p99[etl]),
                stats::micros(key.p99[b])
            ),
            Some(p.median <= 1.5),
        );
    }
    if let Some(r) = reference {
        let ratio = results.paired(etl, r, |r| r.rps);
        target(
            "throughput vs etl-uvicorn, 16 connections",
            "≥ 25×",
            ratio.with_range(),
            Some(ratio.median >= 25.0),
        );
    }
    if let (Some(py), Some(r)) = (python, reference) {
        // The same Python plugin module under both hosts.
        let ratio = results.paired(py, r, |r| r.rps);
        target(
            "Python bridge: throughput vs etl-uvicorn, 16 connections",
            "≥ 10×",
            ratio.with_range(),
            Some(ratio.median >= 10.0),
        );
        let reference_p50 = results.round_medians(|r| r.p50_us)[r];
        target(
            "Python bridge: p99 vs etl-uvicorn's p50, 16 connections",
            "below",
            format!(
                "{} vs {}",
                stats::micros(key.p99[py]),
                stats::micros(reference_p50)
            ),
            Some(key.p99[py] < reference_p50),
        );
        target(
            "Python bridge: startup vs etl-uvicorn's",
            "no slower",
            format!(
                "{} vs {}",
                opt_duration(key.startup_bridge),
                opt_duration(key.startup_reference)
            ),
            key.startup_bridge
                .zip(key.startup_reference)
                .map(|(b, r)| b <= r),
        );
        target(
            "Python bridge: idle resident set vs etl-uvicorn's",
            "no larger",
            format!(
                "{} vs {}",
                key.idle_rss_bridge.map_or("n/a".to_owned(), stats::mib),
                key.idle_rss_reference.map_or("n/a".to_owned(), stats::mib)
            ),
            key.idle_rss_bridge
                .zip(key.idle_rss_reference)
                .map(|(b, r)| b <= r),
        );
    }
    target(
        "startup: exec to the first answered `GET /id`",
        "≤ 10 ms",
        opt_duration(key.startup),
        key.startup.map(|d| d <= Duration::from_millis(10)),
    );
    target(
        "idle resident set",
        "≤ 8 MiB",
        key.idle_rss.map_or("n/a".to_owned(), stats::mib),
        key.idle_rss.map(|k| k <= 8 * 1024),
    );
    target(
        "idle SIGTERM to exit",
        "≤ 20 ms",
        opt_duration(key.idle_stop),
        key.idle_stop.map(|d| d <= Duration::from_millis(20)),
    );
    target(
        "cooperative in-flight: SIGTERM to the 503",
        "≤ 50 ms",
        key.coop_answer
            .map_or("a request got no answer".to_owned(), stats::duration),
        Some(
            key.coop_answer
                .is_some_and(|d| d <= Duration::from_millis(50)),
        ),
    );
    target(
        "cooperative in-flight: SIGTERM to exit",
        "≤ 50 ms",
        opt_duration(key.coop_exit),
        key.coop_exit.map(|d| d <= Duration::from_millis(50)),
    );
    target(
        "`cooperative=false`, 1 s timeout: SIGTERM to exit",
        "≤ 1.1 s",
        opt_duration(key.stuck_exit),
        key.stuck_exit.map(|d| d <= Duration::from_millis(1100)),
    );

    let _ = writeln!(w, "\n## How it was run\n");
    let _ = writeln!(
        w,
        "`bench/run` builds the workspace in release mode, installs wrk (Debian) when it is missing, \
         creates the reference's virtualenv under `target/reference-venv` (`scripts/reference-venv`), then runs `etl-bench` \
         (`bench/src/main.rs`). The servers:\n"
    );
    let _ = writeln!(
        w,
        "- etl-serve: `target/release/etl-serve --plugin target/release/libwordcount.so --port PORT --no-access-log`"
    );
    let _ = writeln!(
        w,
        "- bare hyper: `target/release/bare-hyper PORT` (`bench/src/bin/bare_hyper.rs`: hyper 1 on a multi-threaded \
         tokio runtime, parses the body with serde and writes the same envelope bytes)"
    );
    let _ = writeln!(
        w,
        "- etl-uvicorn: `etl-uvicorn etl_bench_plugins:wordcount --port PORT --no-access-log --log-level warning \
         --loop uvloop --http httptools` (`bench/reference/etl_bench_plugins.py`)"
    );
    let _ = writeln!(
        w,
        "- etl-serve, Python bridge: `target/release/etl-serve --plugin target/release/libetl_python.so \
         --plugin-config etl_bench_plugins:wordcount --port PORT --no-access-log`, with `VIRTUAL_ENV` the \
         reference's virtualenv and `PYTHONPATH=bench/reference`: the same Python module etl-uvicorn serves\n"
    );
    let same: Vec<&str> = hosts
        .iter()
        .zip(&results.load.same_body)
        .filter(|(_, same)| **same)
        .map(|(h, _)| h.label())
        .collect();
    let _ = writeln!(
        w,
        "The load: `{}` with the body `{BODY}`. Byte-identical answers to it from: {}.\n",
        results.wrk.command_line(CONNECTIONS, results.args.duration),
        same.join(", ")
    );
    let _ = writeln!(
        w,
        "Requests per second on a 2-core machine swing by about 10% between runs of the same binary, too much \
         to tell a change of a few percent from noise. To compare two builds of the request path, count \
         instructions instead: `bench/callgrind [SERVER]` runs a server under callgrind, zeroes its counters \
         after a 3 s warm-up, sends `wrk -t1 -c4` for 8 s, and divides the instructions by the requests \
         completed (user space only; repeats agree within about 1%). Every change to the request path is \
         measured that way first, then in these paired rounds.\n"
    );

    let _ = writeln!(w, "## Throughput and latency, {CONNECTIONS} connections\n");
    let _ = writeln!(
        w,
        "{} rounds of {} s per host, the hosts alternating within each round (who goes first rotates). \
         Requests/s and latencies are medians over the rounds. A ratio is the median of the rounds' own \
         ratios: the hosts of a round run back to back, so a change in the machine's speed between rounds \
         moves both sides of it (the targets give the lowest and highest round too).\n",
        results.args.rounds,
        results.args.duration.as_secs()
    );
    let _ = write!(w, "| host | requests/s | p50 | p99 | errors |");
    if bare.is_some() {
        let _ = write!(w, " vs bare hyper |");
    }
    if reference.is_some() {
        let _ = write!(w, " vs etl-uvicorn |");
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "|---|---|---|---|---|{}",
        "---|".repeat(usize::from(bare.is_some()) + usize::from(reference.is_some()))
    );
    for (i, host) in hosts.iter().enumerate() {
        let p50 = results.round_medians(|r| r.p50_us)[i];
        let errors: u64 = results.load.rounds.iter().map(|r| r[i].errors).sum();
        let _ = write!(
            w,
            "| {} | {:.0} | {} | {} | {errors} |",
            host.label(),
            key.rps[i],
            stats::micros(p50),
            stats::micros(key.p99[i])
        );
        if let Some(b) = bare {
            let _ = write!(
                w,
                " {} |",
                stats::ratio(results.paired(i, b, |r| r.rps).median)
            );
        }
        if let Some(r) = reference {
            let _ = write!(
                w,
                " {} |",
                stats::ratio(results.paired(i, r, |r| r.rps).median)
            );
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "\nEach round, requests/s:\n");
    let _ = writeln!(
        w,
        "| round | {} |\n|---|{}",
        labels(hosts, " | "),
        "---|".repeat(hosts.len())
    );
    for (n, round) in results.load.rounds.iter().enumerate() {
        let cells: Vec<String> = round.iter().map(|r| format!("{:.0}", r.rps)).collect();
        let _ = writeln!(w, "| {} | {} |", n + 1, cells.join(" | "));
    }

    let _ = writeln!(w, "\n## Connection sweep\n");
    let _ = writeln!(
        w,
        "One run of {} s per host and connection count; requests/s, and p99 in brackets.\n",
        results.args.sweep_duration.as_secs()
    );
    let _ = write!(w, "| connections | {} |", labels(hosts, " | "));
    if bare.is_some() {
        let _ = write!(w, " etl-serve / bare hyper |");
    }
    if reference.is_some() {
        let _ = write!(w, " etl-serve / etl-uvicorn |");
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "|---|{}{}",
        "---|".repeat(hosts.len()),
        "---|".repeat(usize::from(bare.is_some()) + usize::from(reference.is_some()))
    );
    for (c, runs) in SWEEP.iter().zip(&results.load.sweep) {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| {
                let errors = if r.errors > 0 {
                    format!(", {} errors", r.errors)
                } else {
                    String::new()
                };
                format!("{:.0} ({}{errors})", r.rps, stats::micros(r.p99_us))
            })
            .collect();
        let _ = write!(w, "| {c} | {} |", cells.join(" | "));
        if let Some(b) = bare {
            let _ = write!(w, " {} |", stats::ratio(runs[etl].rps / runs[b].rps));
        }
        if let Some(r) = reference {
            let _ = write!(w, " {} |", stats::ratio(runs[etl].rps / runs[r].rps));
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "\n## Memory\n");
    let _ = writeln!(
        w,
        "Resident set (VmRSS) of each server: idle (500 ms after it first answered), after the {CONNECTIONS}-connection \
         rounds, and after the sweep (up to 256 connections).\n"
    );
    let _ = write!(w, "| host | idle | after the rounds | after the sweep |");
    if reference.is_some() {
        let _ = write!(w, " idle vs etl-uvicorn |");
    }
    let _ = writeln!(
        w,
        "\n|---|---|---|---|{}",
        if reference.is_some() { "---|" } else { "" }
    );
    for (i, host) in hosts.iter().enumerate() {
        let m = results.load.memory[i];
        let _ = write!(
            w,
            "| {} | {} | {} | {} |",
            host.label(),
            stats::mib(m.idle_kib),
            stats::mib(m.after_16_kib),
            stats::mib(m.after_sweep_kib)
        );
        if let Some(r) = reference {
            let base = results.load.memory[r].idle_kib as f64;
            let _ = write!(w, " {} |", stats::ratio(m.idle_kib as f64 / base));
        }
        let _ = writeln!(w);
    }

    if !results.load.idle_mappings.is_empty() {
        let _ = writeln!(
            w,
            "\netl-serve's idle resident set by mapping. File-backed pages of the binary are counted \
             once they are mapped, and the kernel maps code around each page fault (fault-around), so \
             the binary's share grows with the size of its code, not only with what runs.\n"
        );
        let _ = writeln!(w, "| mapping | resident |\n|---|---|");
        for (name, kib) in &results.load.idle_mappings {
            let _ = writeln!(w, "| {name} | {} KiB |", kib);
        }
    }

    if !results.profiles.is_empty() {
        let _ = writeln!(w, "\n## Where the time goes\n");
        let _ = writeln!(
            w,
            "A 3 s run at {CONNECTIONS} connections (after a 1 s warm-up), `wordcount`: the server's CPU time \
             (`/proc/PID/stat`) and context switches (all its threads) divided by the requests wrk completed; \
             then a second run under `perf record -F 2000` for where the samples fall.\n"
        );
        let _ = writeln!(w, "| host | requests | server CPU per request | context switches per request |\n|---|---|---|---|");
        for c in &results.profiles {
            let _ = writeln!(
                w,
                "| {} | {} | {:.1} µs | {:.2} |",
                c.host.label(),
                c.requests,
                c.cpu_us,
                c.switches
            );
        }
        cost_by_object(w, &results.profiles);
        for c in &results.profiles {
            let _ = writeln!(w, "\n{}, samples by object:\n", c.host.label());
            let _ = writeln!(w, "| object | share |\n|---|---|");
            for (name, pct) in &c.by_object {
                let _ = writeln!(w, "| `{name}` | {pct:.1}% |");
            }
            let _ = writeln!(w, "\n{}, hottest symbols:\n", c.host.label());
            let _ = writeln!(w, "| symbol | share |\n|---|---|");
            for (name, pct) in &c.top {
                let _ = writeln!(
                    w,
                    "| `{}` | {pct:.1}% |",
                    name.replace('|', "\\|").replace('`', "'")
                );
            }
        }
    }

    let _ = writeln!(w, "\n## Startup\n");
    let _ = writeln!(
        w,
        "From just before the exec to the first complete answer to `GET /id` (polled every 100 µs), serving `wordcount`. Hosts compared with each other take turns, run by run: etl-serve with bare hyper, etl-uvicorn with the bridge.\n"
    );
    let _ = writeln!(
        w,
        "| host | median | min | max | runs |\n|---|---|---|---|---|"
    );
    for (host, runs) in &results.startup {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            host.label(),
            stats::duration(median_duration(runs)),
            stats::duration(*runs.iter().min().unwrap_or(&Duration::ZERO)),
            stats::duration(*runs.iter().max().unwrap_or(&Duration::ZERO)),
            runs.len()
        );
    }
    if let (Some(s), Some(r)) = (key.startup, key.startup_reference) {
        let _ = writeln!(
            w,
            "\netl-serve starts {} faster than etl-uvicorn.",
            stats::ratio(r.as_secs_f64() / s.as_secs_f64())
        );
    }

    let _ = writeln!(w, "\n## Shutdown\n");
    let _ = writeln!(
        w,
        "SIGTERM to a server, idle or with one request inside the `slow` plugin (`unit_ms=10`, sent 300 ms before \
         the signal). *Answer* is when the in-flight request's complete answer arrived, *exit* when the process \
         was reaped; both from the signal. Medians over the runs. The reference has no cooperative mode, and by \
         default it waits for every request, and at exit for every worker thread, so its in-flight requests are \
         finite (3 s and 5 s) to keep the run bounded.\n"
    );
    let _ = writeln!(
        w,
        "| host | scenario | SIGTERM → answer | answer | SIGTERM → exit | exit code | runs |\n|---|---|---|---|---|---|---|"
    );
    for case in &results.shutdown {
        let answers: Vec<Duration> = case.runs.iter().filter_map(|r| r.to_answer).collect();
        let statuses = distinct(
            case.runs
                .iter()
                .map(|r| r.status.map_or("none".to_owned(), |s| s.to_string())),
        );
        let exits = distinct(case.runs.iter().map(|r| exit_text(r.exit)));
        let exit_times: Vec<Duration> = case.runs.iter().map(|r| r.to_exit).collect();
        let in_flight = case.scenario != "idle";
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            case.host.label(),
            case.scenario,
            if in_flight && !answers.is_empty() {
                stats::duration(median_duration(&answers))
            } else {
                "–".to_owned()
            },
            if in_flight {
                statuses.join(", ")
            } else {
                "–".to_owned()
            },
            stats::duration(median_duration(&exit_times)),
            exits.join(", "),
            case.runs.len()
        );
    }
    if let (Some(s), Some(r)) = (key.idle_stop, key.idle_stop_reference) {
        let _ = writeln!(
            w,
            "\nIdle, etl-serve exits {} sooner than etl-uvicorn.",
            stats::ratio(r.as_secs_f64() / s.as_secs_f64())
        );
    }

    let _ = writeln!(w, "\n## Streaming\n");
    let _ = writeln!(
        w,
        "Items per second through `ticker` with `interval_ms=0`, one client reading the whole NDJSON stream \
         (200 000 items from etl-serve, 20 000 from etl-uvicorn). Median of 3.\n"
    );
    let ref_stream = results
        .streaming
        .iter()
        .find(|(h, _)| *h == Host::Reference)
        .map(|(_, v)| median(v));
    let _ = writeln!(w, "| host | items/s | vs etl-uvicorn |\n|---|---|---|");
    for (host, runs) in &results.streaming {
        let m = median(runs);
        let _ = writeln!(
            w,
            "| {} | {m:.0} | {} |",
            host.label(),
            ref_stream.map_or("n/a".to_owned(), |r| stats::ratio(m / r))
        );
    }

    let _ = writeln!(w, "\n## Cost of a cancellation check\n");
    let token = median(&results.cancel.iter().map(|c| c.0).collect::<Vec<_>>());
    let atomic = median(&results.cancel.iter().map(|c| c.1).collect::<Vec<_>>());
    let _ = writeln!(
        w,
        "`bench/cancel_cost`, a plugin served by etl-serve, calls `Context::is_cancelled()` 200 million times in \
         a loop, then runs the same loop over an acquire load of a local atomic. Median of 3.\n"
    );
    let _ = writeln!(w, "| check | ns per call |\n|---|---|");
    let _ = writeln!(
        w,
        "| `ctx.is_cancelled()` (the host's flag, through the SDK) | {token:.2} |"
    );
    let _ = writeln!(w, "| a local `AtomicU32::load(Acquire)` | {atomic:.2} |");
    md
}

/// The distinct values, in the order first seen.
fn distinct(values: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for v in values {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    seen
}

fn labels(hosts: &[Host], sep: &str) -> String {
    hosts
        .iter()
        .map(|h| h.label())
        .collect::<Vec<_>>()
        .join(sep)
}

/// The README's headline: one bullet per figure.
pub fn headline(results: &Results<'_>) -> String {
    let key = results.key();
    let etl = results
        .index(Host::EtlServe)
        .expect("etl-serve is always measured");
    let mut lines = vec![format!(
        "Measured side by side on one machine by `bench/run` ([docs/benchmarks.md](docs/benchmarks.md)), \
         `wordcount` at {CONNECTIONS} connections:\n"
    )];
    let mut throughput = Vec::new();
    if let Some(r) = results.index(Host::Reference) {
        throughput.push(format!(
            "**{}** etl-uvicorn's",
            stats::ratio(results.paired(etl, r, |r| r.rps).median)
        ));
    }
    if let Some(b) = results.index(Host::BareHyper) {
        throughput.push(format!(
            "**{}** a bare hyper server's that does no plugin work",
            stats::ratio(results.paired(etl, b, |r| r.rps).median)
        ));
    }
    if !throughput.is_empty() {
        lines.push(format!(
            "- requests per second: {}",
            throughput.join(", and ")
        ));
    }
    if let (Some(s), Some(r)) = (key.startup, key.startup_reference) {
        lines.push(format!(
            "- startup: **{}** (etl-uvicorn: {})",
            stats::duration(s),
            stats::duration(r)
        ));
    }
    if let (Some(s), Some(r)) = (key.idle_stop, key.idle_stop_reference) {
        lines.push(format!(
            "- idle SIGTERM to exit: **{}** (etl-uvicorn: {})",
            stats::duration(s),
            stats::duration(r)
        ));
    }
    if let Some(a) = key.coop_answer {
        lines.push(format!(
            "- SIGTERM to the 503 shutdown-abort of a cooperative in-flight request: **{}** \
             (etl-uvicorn waits for the request to finish)",
            stats::duration(a)
        ));
    }
    if let (Some(s), Some(r)) = (key.idle_rss, key.idle_rss_reference) {
        lines.push(format!(
            "- idle resident set: **{}** (etl-uvicorn: {})",
            stats::mib(s),
            stats::mib(r)
        ));
    }
    if let (Some(py), Some(r)) = (
        results.index(Host::PythonBridge),
        results.index(Host::Reference),
    ) {
        lines.push(format!(
            "- the same Python plugin through the Python bridge: **{}** etl-uvicorn's requests per second",
            stats::ratio(results.paired(py, r, |r| r.rps).median)
        ));
    }
    lines.join("\n")
}

/// Replaces the text between the headline markers of `readme`.
pub fn update_readme(readme: &Path, headline: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        return Err(format!(
            "{} has no {README_START} ... {README_END} block to update",
            readme.display()
        ));
    };
    let updated = format!(
        "{}{README_START}\n{headline}\n{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(readme, updated).map_err(|e| format!("{}: {e}", readme.display()))
}

/// The server CPU per request split by object (each object's share of the
/// samples times the CPU per request), the hosts side by side, largest
/// difference first: where etl-serve spends time the baseline does not.
fn cost_by_object(w: &mut String, profiles: &[crate::profile::Cost]) {
    // Each host's own binary is "the server binary", so the rows line up.
    let binary = |host: Host| match host {
        Host::EtlServe | Host::PythonBridge => "etl-serve",
        Host::BareHyper => "bare-hyper",
        Host::Reference => "python3",
    };
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for (i, c) in profiles.iter().enumerate() {
        for (name, pct) in &c.by_object {
            let name = if name == binary(c.host) {
                "the server binary".to_owned()
            } else {
                format!("`{name}`")
            };
            let pos = rows
                .iter()
                .position(|(n, _)| *n == name)
                .unwrap_or_else(|| {
                    rows.push((name, vec![0.0; profiles.len()]));
                    rows.len() - 1
                });
            rows[pos].1[i] += pct / 100.0 * c.cpu_us;
        }
    }
    let gap = |costs: &[f64]| {
        costs.first().copied().unwrap_or(0.0) - costs.get(1).copied().unwrap_or(0.0)
    };
    rows.sort_by(|a, b| gap(&b.1).total_cmp(&gap(&a.1)));
    let _ = writeln!(
        w,
        "\nServer CPU per request by object, in µs (share of the perf samples × CPU per request):\n"
    );
    let heads: Vec<&str> = profiles.iter().map(|c| c.host.label()).collect();
    let two = profiles.len() == 2;
    let _ = writeln!(
        w,
        "| object | {} |{}\n|---|{}{}",
        heads.join(" | "),
        if two { " difference |" } else { "" },
        "---|".repeat(heads.len()),
        if two { "---|" } else { "" }
    );
    let mut totals = vec![0.0; profiles.len()];
    for (name, costs) in &rows {
        let cells: Vec<String> = costs.iter().map(|c| format!("{c:.2}")).collect();
        for (t, c) in totals.iter_mut().zip(costs) {
            *t += c;
        }
        let diff = if two {
            format!(" {:+.2} |", gap(costs))
        } else {
            String::new()
        };
        let _ = writeln!(w, "| {name} | {} |{diff}", cells.join(" | "));
    }
    let cells: Vec<String> = totals.iter().map(|c| format!("**{c:.2}**")).collect();
    let diff = if two {
        format!(" **{:+.2}** |", gap(&totals))
    } else {
        String::new()
    };
    let _ = writeln!(w, "| all of the above | {} |{diff}", cells.join(" | "));
    let _ = writeln!(
        w,
        "\nWhat etl-serve does for each `/invoke` that the baseline does not: it validates the input against the \
         plugin's schema (for wordcount's flat schema, straight from the body's bytes); registers the invocation, so \
         that callbacks from other threads and cancel flags can find it; leaves each inline call where the inline \
         watchdog can answer its request at the drain timeout, or cancel it when its client leaves, should the call \
         turn out long; keeps each connection's head deadline (the keep-alive and header-read timeouts); gives the \
         request an id; and counts metrics. The table gives their cost together, with the allocations they make; it \
         does not split it among them."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Cost;

    fn cost(host: Host, cpu_us: f64, by_object: &[(&str, f64)]) -> Cost {
        Cost {
            host,
            requests: 1000,
            cpu_us,
            switches: 0.0,
            by_object: by_object
                .iter()
                .map(|(n, p)| ((*n).to_owned(), *p))
                .collect(),
            top: Vec::new(),
        }
    }

    #[test]
    fn a_paired_ratio_is_the_median_of_the_rounds_ratios() {
        let p = paired([(90.0, 100.0), (98.0, 100.0), (83.0, 100.0)].into_iter());
        assert!((p.median - 0.90).abs() < 1e-9, "{p:?}");
        assert!((p.min - 0.83).abs() < 1e-9 && (p.max - 0.98).abs() < 1e-9);
        // Not the ratio of the medians: a slow round of both cancels out.
        let p = paired([(50.0, 60.0), (90.0, 100.0), (91.0, 100.0)].into_iter());
        assert!((p.median - 0.90).abs() < 1e-9, "{p:?}");
        assert_eq!(p.with_range(), "0.90× (rounds 0.83–0.91×)");
    }

    #[test]
    fn cost_by_object_lines_up_the_binaries_and_sorts_by_the_gap() {
        let profiles = [
            cost(
                Host::EtlServe,
                20.0,
                &[
                    ("[kernel.kallsyms]", 30.0),
                    ("etl-serve", 50.0),
                    ("libc.so.6", 20.0),
                ],
            ),
            cost(
                Host::BareHyper,
                10.0,
                &[
                    ("[kernel.kallsyms]", 60.0),
                    ("bare-hyper", 30.0),
                    ("libc.so.6", 10.0),
                ],
            ),
        ];
        let mut md = String::new();
        cost_by_object(&mut md, &profiles);
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| object"))
            .collect();
        assert_eq!(
            rows,
            [
                "| the server binary | 10.00 | 3.00 | +7.00 |",
                "| `libc.so.6` | 4.00 | 1.00 | +3.00 |",
                "| `[kernel.kallsyms]` | 6.00 | 6.00 | +0.00 |",
                "| all of the above | **20.00** | **10.00** | **+10.00** |",
            ]
        );
    }
}
