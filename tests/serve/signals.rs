//! Every signal, the same whether etl-serve is PID 1 or not: the table in
//! docs/shutdown.md, "Signals".

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::{self, SIGALRM, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use support::{fixture, invoke_request, Server, Spawned};

/// The etl-serve process itself: under `unshare` it is the wrapper's only
/// child.
fn etl_serve_pid(wrapper: i32, as_pid_1: bool) -> i32 {
    if !as_pid_1 {
        return wrapper;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "unshare started no child");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn with_plugin(mut cmd: Command, args: &[&str]) -> Command {
    cmd.arg("--plugin")
        .arg(fixture(None))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args);
    cmd
}

#[test]
fn a_signal_while_the_plugin_initialises_stops_startup_at_once() {
    // SIGTERM as PID 1 and not; SIGINT and SIGQUIT, each with the shell's
    // code for death by it.
    let runs = [
        (support::etl_serve(), false, SIGTERM, 143),
        (support::as_pid_1(), true, SIGTERM, 143),
        (support::etl_serve(), false, SIGINT, 130),
        (support::etl_serve(), false, SIGQUIT, 131),
    ];
    for (cmd, as_pid_1, signal, code) in runs {
        // An init that takes 30 s.
        let mut p = Spawned::new(with_plugin(cmd, &["--plugin-config", "slow_init"]));
        assert!(
            p.wait_for_log("loading the plugin", Duration::from_secs(10)),
            "{}",
            p.logs()
        );
        let signalled = Instant::now();
        support::signal_pid(etl_serve_pid(p.pid(), as_pid_1), signal);
        let status = p.wait_exit(Duration::from_secs(20)).expect("exits");
        let run = format!("{signal}, as PID 1: {as_pid_1}");
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "{run}: {:?}",
            signalled.elapsed()
        );
        assert_eq!(status.code(), Some(code), "{run}: {}", p.logs());
        assert!(
            p.logs().contains(&format!(
                "{signal} while the plugin was loading: exiting without serving"
            )),
            "{run}: {}",
            p.logs()
        );
        assert!(!p.logs().contains("listening on"), "{run}");
    }
}

#[test]
fn other_signals_are_logged_and_ignored_and_sigquit_drains() {
    let commands = [(support::etl_serve(), false), (support::as_pid_1(), true)];
    for (cmd, as_pid_1) in commands {
        let mut s = Server::spawn(with_plugin(cmd, &[])).expect("starts");
        let pid = etl_serve_pid(s.pid(), as_pid_1);
        // A call inside the plugin while the signals come: it is answered
        // normally.
        let call = s.send_in_background(invoke_request(r#"{"mode":"nap"}"#));
        let ignored: [(Signal, &str); 4] = [
            (SIGHUP, "SIGHUP"),
            (SIGUSR1, "SIGUSR1"),
            (SIGUSR2, "SIGUSR2"),
            (SIGALRM, "SIGALRM"),
        ];
        for (signal, name) in ignored {
            support::signal_pid(pid, signal);
            assert!(
                s.wait_for_log(
                    &format!("{name} received and ignored"),
                    Duration::from_secs(10)
                ),
                "as PID 1: {as_pid_1}: {}",
                s.logs()
            );
        }
        assert_eq!(s.get("/healthz").status, 200);
        assert_eq!(call.join().unwrap().0.status, 200);
        // SIGQUIT asks for the same graceful shutdown as SIGTERM.
        support::signal_pid(pid, SIGQUIT);
        let status = s.wait_exit(Duration::from_secs(20)).expect("exits");
        assert_eq!(status.code(), Some(0), "as PID 1: {as_pid_1}: {}", s.logs());
        assert!(s.logs().contains("SIGQUIT received"), "{}", s.logs());
    }
}

#[test]
fn a_plugin_abort_as_pid_1_exits_134_with_one_line() {
    let cmd = support::as_pid_1();
    let mut s = Server::spawn(with_plugin(cmd, &[])).expect("starts");
    let raw = invoke_request(r#"{"mode":"abort"}"#);
    let addr = s.addr;
    let answer = std::panic::catch_unwind(|| support::request(addr, raw.as_bytes()));
    assert!(answer.is_err(), "no answer from a crashed process");
    let status = s.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(134), "{}", s.logs());
    assert_eq!(
        s.logs().matches("etl-serve: fatal signal").count(),
        1,
        "{}",
        s.logs()
    );
    assert!(s.logs().contains("etl-serve: fatal signal SIGABRT"));
}
