//! Each measurement the report shows, run against real servers on loopback.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::http;
use crate::server::{Host, Paths, Server, Spec, STOP_LIMIT};
use crate::wrk::{Run, Wrk, BODY};

/// Connections of the main comparison.
pub const CONNECTIONS: u32 = 16;
/// Connections of the sweep.
pub const SWEEP: [u32; 5] = [1, 4, 16, 64, 256];

/// Resident set and threads of one server at three moments.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub idle_kib: u64,
    pub after_16_kib: u64,
    pub after_sweep_kib: u64,
}

/// Throughput, latency and memory of every host serving `wordcount`.
pub struct Load {
    pub hosts: Vec<Host>,
    /// `rounds[r][h]`: round r, host h, at [`CONNECTIONS`].
    pub rounds: Vec<Vec<Run>>,
    /// `sweep[c][h]`: [`SWEEP`]`[c]` connections, host h.
    pub sweep: Vec<Vec<Run>>,
    pub memory: Vec<Memory>,
    /// Whether each host answered the benchmark body with exactly
    /// etl-serve's bytes.
    pub same_body: Vec<bool>,
    /// etl-serve's idle resident set by mapping, KiB.
    pub idle_mappings: Vec<(String, u64)>,
}

pub fn load(
    hosts: &[Host],
    paths: &Paths,
    wrk: &Wrk,
    rounds: usize,
    duration: Duration,
    sweep_duration: Duration,
) -> Result<Load, String> {
    let servers = hosts
        .iter()
        .map(|&h| Server::start(&Spec::new(h, "wordcount"), paths))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let mut memory: Vec<Memory> = servers
        .iter()
        .map(|s| Memory {
            idle_kib: s.rss_kib(),
            ..Memory::default()
        })
        .collect();

    let idle_mappings = servers
        .iter()
        .find(|s| s.host == Host::EtlServe)
        .map(|s| crate::profile::rss_by_mapping(s.pid().as_raw()))
        .unwrap_or_default();

    let bodies = servers
        .iter()
        .map(|s| http::post(s.addr, "/invoke", BODY, Duration::from_secs(10)).map(|r| r.body))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a server did not answer the benchmark body: {e}"))?;
    let same_body = bodies.iter().map(|b| *b == bodies[0]).collect();

    eprintln!("bench: warming up");
    for s in &servers {
        wrk.run(s.addr, CONNECTIONS, Duration::from_secs(1))?;
    }
    let mut all_rounds = Vec::new();
    for round in 0..rounds {
        let mut runs = vec![Run::default(); servers.len()];
        // Rotate who goes first, so no host always runs on a cooler machine.
        for k in 0..servers.len() {
            let i = (round + k) % servers.len();
            runs[i] = wrk.run(servers[i].addr, CONNECTIONS, duration)?;
            eprintln!(
                "bench: round {} {}: {:.0} req/s",
                round + 1,
                servers[i].host.label(),
                runs[i].rps
            );
        }
        all_rounds.push(runs);
    }
    for (m, s) in memory.iter_mut().zip(&servers) {
        m.after_16_kib = s.rss_kib();
    }
    let mut sweep = Vec::new();
    for &c in &SWEEP {
        let mut runs = Vec::new();
        for s in &servers {
            let run = wrk.run(s.addr, c, sweep_duration)?;
            eprintln!("bench: sweep {c} {}: {:.0} req/s", s.host.label(), run.rps);
            runs.push(run);
        }
        sweep.push(runs);
    }
    for (m, s) in memory.iter_mut().zip(&servers) {
        m.after_sweep_kib = s.rss_kib();
    }
    Ok(Load {
        hosts: hosts.to_vec(),
        rounds: all_rounds,
        sweep,
        memory,
        same_body,
        idle_mappings,
    })
}

/// Exec to the first answered `GET /id`, `times` times for each host. The
/// hosts take turns, so that a slow spell of the machine (another tenant,
/// a cold page cache) falls on all of them alike rather than on whichever
/// ran then.
pub fn startup(
    hosts: &[Host],
    paths: &Paths,
    times: usize,
) -> Result<Vec<(Host, Vec<Duration>)>, String> {
    let mut all: Vec<(Host, Vec<Duration>)> = hosts.iter().map(|&h| (h, Vec::new())).collect();
    for _ in 0..times {
        for (host, times) in &mut all {
            let server = Server::start(&Spec::new(*host, "wordcount"), paths)?;
            times.push(server.startup);
            server.stop();
        }
    }
    Ok(all)
}

/// One shutdown measurement.
#[derive(Clone, Debug)]
pub struct Stop {
    /// From SIGTERM to the in-flight request's complete answer.
    pub to_answer: Option<Duration>,
    /// The in-flight request's status.
    pub status: Option<u16>,
    /// From SIGTERM to the process's exit.
    pub to_exit: Duration,
    /// `None`: killed after [`STOP_LIMIT`].
    pub exit: Option<ExitStatus>,
}

/// SIGTERM to an idle server.
pub fn idle_stop(host: Host, paths: &Paths) -> Result<Stop, String> {
    let server = Server::start(&Spec::new(host, "wordcount"), paths)?;
    std::thread::sleep(Duration::from_millis(200));
    let (to_exit, exit) = server.stop();
    Ok(Stop {
        to_answer: None,
        status: None,
        to_exit,
        exit,
    })
}

/// SIGTERM while one `slow` request with `body` is inside the plugin.
pub fn inflight_stop(spec: &Spec<'_>, paths: &Paths, body: &str) -> Result<Stop, String> {
    let server = Server::start(spec, paths)?;
    let addr = server.addr;
    let body = body.to_owned();
    let client = std::thread::spawn(move || {
        let reply = http::post(addr, "/invoke", &body, Duration::from_secs(120));
        (reply.map(|r| r.status), Instant::now())
    });
    // Long enough for the request to be inside the plugin on a busy machine.
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    server.sigterm();
    let exit = server.wait(STOP_LIMIT);
    let to_exit = signalled.elapsed();
    let (status, answered) = client.join().expect("the client thread does not panic");
    Ok(Stop {
        to_answer: status.is_ok().then(|| answered.duration_since(signalled)),
        status: status.ok(),
        to_exit,
        exit,
    })
}

/// Items per second of a `ticker` stream with `interval_ms` 0.
pub fn stream(host: Host, paths: &Paths, count: u64) -> Result<f64, String> {
    let server = Server::start(&Spec::new(host, "ticker"), paths)?;
    let body = format!(r#"{{"count":{count},"interval_ms":0}}"#);
    let started = Instant::now();
    let reply = http::post(server.addr, "/invoke", &body, Duration::from_secs(120))
        .map_err(|e| format!("ticker stream: {e}"))?;
    let elapsed = started.elapsed();
    server.stop();
    let lines = reply.body.iter().filter(|&&b| b == b'\n').count() as u64;
    if reply.status != 200 || lines != count {
        return Err(format!(
            "{} streamed {lines} of {count} items (status {})",
            host.label(),
            reply.status
        ));
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// Nanoseconds per `is_cancelled()` from inside a plugin served by
/// etl-serve, and per plain atomic load in the same loop.
pub fn cancel_cost(paths: &Paths, calls: u64) -> Result<(f64, f64), String> {
    let server = Server::start(&Spec::new(Host::EtlServe, "cancel_cost"), paths)?;
    let body = format!(r#"{{"calls":{calls}}}"#);
    let reply = http::post(server.addr, "/invoke", &body, Duration::from_secs(120))
        .map_err(|e| format!("cancel_cost: {e}"))?;
    server.stop();
    let envelope: serde_json::Value = serde_json::from_slice(&reply.body)
        .map_err(|e| format!("cancel_cost answered something that is not JSON: {e}"))?;
    let output = &envelope["output"];
    let per_call = |key: &str| {
        output[key]
            .as_f64()
            .map(|ns| ns / calls as f64)
            .ok_or_else(|| format!("cancel_cost answered no {key}: {envelope}"))
    };
    Ok((per_call("token_ns")?, per_call("atomic_ns")?))
}
