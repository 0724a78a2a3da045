//! etl-bench: measures etl-serve side by side with a bare hyper baseline
//! and the reference host, and writes `docs/benchmarks.md` from the run.
//!
//! Run it through `bench/run`, which builds everything, installs wrk and
//! the reference's virtualenv, then calls this binary. Everything it
//! starts listens on 127.0.0.1 and is stopped before it exits.

mod http;
mod profile;
mod report;
mod scenarios;
mod server;
mod stats;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::report::Results;
use crate::scenarios::Stop;
use crate::server::{Host, Paths, Spec};

#[derive(Parser)]
#[command(about = "Benchmark etl-serve against a bare hyper server and the reference host")]
struct Args {
    /// The reference's virtualenv (etl-uvicorn with uvloop and httptools);
    /// without it, the reference is left out.
    #[arg(long)]
    venv: Option<PathBuf>,
    /// The build directory holding etl-serve, bare-hyper and the plugins.
    #[arg(long, default_value = "target/release")]
    release: PathBuf,
    /// The wrk program.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Rounds of the main comparison, each host once per round.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Length of each main-comparison run.
    #[arg(long, default_value = "5s", value_parser = whole_seconds)]
    duration: Duration,
    /// Length of each run of the connection sweep.
    #[arg(long, default_value = "3s", value_parser = whole_seconds)]
    sweep_duration: Duration,
    /// Where the report goes.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// A README whose headline block (between the benchmark-headline
    /// markers) is replaced by the run's headline ratios.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// The command line that started this run, for the report.
    #[arg(long, default_value = "bench/run")]
    invoked_as: String,
}

/// A duration wrk can run for: whole seconds, at least one.
fn whole_seconds(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.as_secs() == 0 || d.subsec_nanos() != 0 {
        return Err(format!(
            "`{text}` is not a whole number of seconds (wrk runs for whole seconds)"
        ));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etl-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let work = PathBuf::from("target/bench");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let paths = Paths {
        release: args.release.clone(),
        venv: args.venv.clone(),
        python_plugins: PathBuf::from("bench/reference"),
        logs: work.clone(),
    };
    for program in ["etl-serve", "bare-hyper"] {
        server::require(
            &paths.release.join(program),
            "build with `cargo build --release --workspace`",
        )?;
    }
    for plugin in ["wordcount", "slow", "ticker", "cancel_cost"] {
        server::require(
            &paths.release.join(format!("lib{plugin}.so")),
            "build with `cargo build --release --workspace`",
        )?;
    }
    if let Some(venv) = &paths.venv {
        server::require(
            &venv.join("bin/etl-uvicorn"),
            "bench/run creates the virtualenv",
        )?;
        server::require(
            &paths.release.join("libetl_python.so"),
            "build with `cargo build --release --workspace`",
        )?;
    }
    let wrk = wrk::Wrk::new(args.wrk.clone(), &work)?;

    let mut hosts = vec![Host::EtlServe, Host::BareHyper];
    if paths.venv.is_some() {
        hosts.push(Host::Reference);
        hosts.push(Host::PythonBridge);
    }
    let reference = paths.venv.is_some();

    eprintln!("bench: throughput, latency and memory");
    let load = scenarios::load(
        &hosts,
        &paths,
        &wrk,
        usize::from(args.rounds),
        args.duration,
        args.sweep_duration,
    )?;

    let profiles = if profile::available() {
        eprintln!("bench: profiles");
        vec![
            profile::cost(
                Host::EtlServe,
                &paths,
                &wrk,
                scenarios::CONNECTIONS,
                Duration::from_secs(3),
            )?,
            profile::cost(
                Host::BareHyper,
                &paths,
                &wrk,
                scenarios::CONNECTIONS,
                Duration::from_secs(3),
            )?,
        ]
    } else {
        eprintln!("bench: perf is not installed: no profiles");
        Vec::new()
    };

    eprintln!("bench: startup");
    let mut startup = scenarios::startup(&[Host::EtlServe, Host::BareHyper], &paths, 20)?;
    if reference {
        startup.extend(scenarios::startup(
            &[Host::Reference, Host::PythonBridge],
            &paths,
            5,
        )?);
    }

    eprintln!("bench: shutdown");
    let shutdown = shutdowns(&paths, reference)?;

    eprintln!("bench: streaming");
    let mut streaming = vec![(
        Host::EtlServe,
        repeat(3, || scenarios::stream(Host::EtlServe, &paths, 200_000))?,
    )];
    if reference {
        streaming.push((
            Host::Reference,
            repeat(3, || scenarios::stream(Host::Reference, &paths, 20_000))?,
        ));
    }

    eprintln!("bench: cancellation checks");
    let cancel = repeat(3, || scenarios::cancel_cost(&paths, 200_000_000))?;

    let results = Results {
        args: report::RunArgs {
            invoked_as: args.invoked_as.clone(),
            rounds: usize::from(args.rounds),
            duration: args.duration,
            sweep_duration: args.sweep_duration,
        },
        wrk: &wrk,
        load,
        profiles,
        startup,
        shutdown,
        streaming,
        cancel,
        venv: paths.venv.clone(),
        release: paths.release.clone(),
    };
    let text = report::markdown(&results);
    std::fs::write(&args.out, &text).map_err(|e| format!("{}: {e}", args.out.display()))?;
    eprintln!("bench: wrote {}", args.out.display());
    if let Some(readme) = &args.readme {
        report::update_readme(readme, &report::headline(&results))?;
        eprintln!("bench: updated the headline in {}", readme.display());
    }
    Ok(())
}

fn repeat<T>(times: usize, mut f: impl FnMut() -> Result<T, String>) -> Result<Vec<T>, String> {
    (0..times).map(|_| f()).collect()
}

/// A shutdown scenario and its measurements.
pub struct ShutdownCase {
    pub host: Host,
    pub scenario: &'static str,
    pub runs: Vec<Stop>,
}

fn shutdowns(paths: &Paths, reference: bool) -> Result<Vec<ShutdownCase>, String> {
    let long_coop = r#"{"units":100000,"unit_ms":10}"#;
    let long_stuck = r#"{"units":100000,"unit_ms":10,"cooperative":false}"#;
    // The reference waits for every request (it has no timeout by default)
    // and, at exit, for every worker thread: finite requests keep it bounded.
    let three_seconds = r#"{"units":300,"unit_ms":10}"#;
    let five_seconds = r#"{"units":500,"unit_ms":10}"#;
    let mut cases = vec![
        ShutdownCase {
            host: Host::EtlServe,
            scenario: "idle",
            runs: repeat(10, || scenarios::idle_stop(Host::EtlServe, paths))?,
        },
        ShutdownCase {
            host: Host::EtlServe,
            scenario: "in-flight `slow`, cooperative (default 30 s timeout)",
            runs: repeat(5, || {
                scenarios::inflight_stop(&Spec::new(Host::EtlServe, "slow"), paths, long_coop)
            })?,
        },
        ShutdownCase {
            host: Host::EtlServe,
            scenario: "in-flight `slow`, `cooperative=false`, 1 s timeout",
            runs: repeat(3, || {
                let spec = Spec::new(Host::EtlServe, "slow")
                    .arg("--graceful-timeout")
                    .arg("1s");
                scenarios::inflight_stop(&spec, paths, long_stuck)
            })?,
        },
    ];
    if reference {
        cases.push(ShutdownCase {
            host: Host::Reference,
            scenario: "idle",
            runs: repeat(3, || scenarios::idle_stop(Host::Reference, paths))?,
        });
        cases.push(ShutdownCase {
            host: Host::Reference,
            scenario: "in-flight `slow` of 3 s (no timeout: the default)",
            runs: repeat(2, || {
                scenarios::inflight_stop(&Spec::new(Host::Reference, "slow"), paths, three_seconds)
            })?,
        });
        cases.push(ShutdownCase {
            host: Host::Reference,
            scenario: "in-flight `slow` of 5 s, `UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=1`",
            runs: repeat(2, || {
                let spec = Spec::new(Host::Reference, "slow")
                    .env("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", "1");
                scenarios::inflight_stop(&spec, paths, five_seconds)
            })?,
        });
    }
    Ok(cases)
}
