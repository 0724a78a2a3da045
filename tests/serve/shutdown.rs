//! The shutdown sequence, driven with real signals against the real binary.
//! Time bounds are generous (a noisy 2-core machine); the tight figures are
//! the benchmark's business.

use crate::support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::{SIGINT, SIGTERM};
use serde_json::json;
use support::{fixture, invoke_request, plugin, Server};

/// Sends `raw` from another thread, and returns once the plugin has been
/// handed the call (`etl_serve_plugin_calls_total` counts it): its
/// invocation is registered by then, so a SIGTERM from then on sets its
/// cancel flag.
fn send_into_plugin(s: &Server, raw: String) -> Call {
    let before = calls_handed(s);
    let call = s.send_in_background(raw);
    wait_handed(s, before);
    call
}

/// Waits until the plugin was handed more than `before` calls in all.
fn wait_handed(s: &Server, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls_handed(s) == before {
        assert!(
            Instant::now() < deadline,
            "the request never reached the plugin"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A request sent from another thread: its response, and when it came.
type Call = std::thread::JoinHandle<(support::Response, Instant)>;

/// Calls handed to the plugin so far, inline and on the blocking pool.
fn calls_handed(s: &Server) -> u64 {
    support::plugin_calls(s, "inline") + support::plugin_calls(s, "blocking")
}

/// Sends `body` to /invoke, sends SIGTERM once it reached the plugin, and
/// returns the response and how long after the signal it arrived.
fn invoke_then_sigterm(s: &Server, body: &str) -> (support::Response, Duration) {
    let call = send_into_plugin(s, invoke_request(body));
    let sent = Instant::now();
    s.signal(SIGTERM);
    let (r, answered) = call.join().unwrap();
    (r, answered - sent)
}

fn assert_shutdown_abort(r: &support::Response) {
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), Some("close"));
    let e = r.json();
    assert_eq!(e["status_code"], 503);
    assert_eq!(
        e["status_code_text"],
        "[PluginShutdown] the server is shutting down; retry the request on another instance"
    );
    assert_eq!(
        e["plugin_error"],
        json!({"error_type": "shutdown", "error_reason": "server_shutting_down", "dependency": null,
               "audience": "platform", "retryable": true})
    );
}

#[test]
fn a_cooperative_plugin_stops_at_once_and_its_caller_gets_the_shutdown_abort() {
    let mut s = Server::start(&plugin("slow"), &[]);
    let sent = Instant::now();
    let (r, waited) = invoke_then_sigterm(&s, r#"{"units":100000}"#);
    assert_shutdown_abort(&r);
    // What the plugin recorded before bailing out is kept.
    let e = r.json();
    assert_eq!(e["usage"][0]["name"], "units_done");
    assert!(e["message_channels"]["infos"][0]
        .as_str()
        .unwrap()
        .starts_with("cancelled after"));
    assert!(
        waited < Duration::from_secs(5),
        "answered after {:?}",
        waited
    );

    let status = s
        .wait_exit(Duration::from_secs(10))
        .expect("exits long before the 30 s timeout");
    assert_eq!(status.code(), Some(0));
    assert!(sent.elapsed() < Duration::from_secs(10));
    let logs = s.logs();
    assert!(
        logs.contains("SIGTERM received: cancel flags set, draining"),
        "{logs}"
    );
    assert!(logs.contains("in_flight=1 inside_plugin=1"), "{logs}");
    assert!(logs.contains("drained"), "{logs}");
    assert!(logs.contains("exiting with code 0"), "{logs}");
}

#[test]
fn the_process_wide_flag_reaches_init_and_every_invocation_and_is_set_at_sigterm() {
    // The flag for a plugin's own threads (include/etl_plugin.h): handed to
    // init and to each invocation, unset while the server serves, set
    // before any invocation's own flag when the shutdown starts.
    let mut s = Server::start(&fixture(None), &[]);
    let call = s.send_in_background(invoke_request(r#"{"mode":"wait_process_flag"}"#));
    assert!(
        s.wait_for_log("read the process-wide flag", Duration::from_secs(10)),
        "{}",
        s.logs()
    );
    s.signal(SIGTERM);
    let (r, _) = call.join().unwrap();
    assert_shutdown_abort(&r);
    assert_eq!(
        r.json()["usage"],
        json!([
            {"name": "init_flag_before", "value": 0},
            {"name": "invoke_flag_before", "value": 0},
            {"name": "init_flag_after", "value": 1},
            {"name": "invoke_flag_after", "value": 1},
        ])
    );
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_client_that_keeps_its_connection_after_the_503_does_not_hold_the_exit() {
    // The answer says `Connection: close` and the server ends its side, but
    // a pooled client may leave its end open until it next looks. Once the
    // client has acknowledged the whole answer the connection owes nothing,
    // and the exit does not wait the second it gives idle connections.
    let mut s = Server::start(&plugin("slow"), &[]);
    let before = calls_handed(&s);
    let mut conn = s.connect();
    conn.stream_mut()
        .write_all(
            invoke_request(r#"{"units":100000}"#)
                .replace("Connection: close\r\n", "")
                .as_bytes(),
        )
        .unwrap();
    wait_handed(&s, before);
    s.signal(SIGTERM);
    let r = support::read_response(&mut std::io::BufReader::new(conn.stream_mut())).unwrap();
    assert_shutdown_abort(&r);
    // The client's end stays open while the server exits.
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    let logs = s.logs();
    assert!(
        !logs.contains("closing idle connections"),
        "the exit waited for the answered connection: {logs}"
    );
    drop(conn);
}

#[test]
fn an_ended_connection_holds_the_exit_until_its_client_has_the_whole_answer() {
    // A connection the server ended (its answer said `Connection: close`)
    // holds the exit while its client lacks bytes of the answer, for at
    // most the second idle connections get (docs/shutdown.md). Over TCP
    // the kernel counts bytes not yet acknowledged, which on loopback is
    // none within microseconds; over a Unix socket it counts bytes the
    // client has not read, so there a client that reads nothing shows the
    // wait, and one that read everything shows there is none.
    for reads in [true, false] {
        let (mut s, sock) = support::serve_wordcount_on_unix_socket(&format!("ended-{reads}"), &[]);
        let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        client
            .write_all(b"GET /id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        if reads {
            // To the server's end of the connection; the client keeps its
            // own end open.
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"));
        } else {
            assert!(
                s.wait_for_log("GET /id 200", Duration::from_secs(10)),
                "{}",
                s.logs()
            );
        }
        s.signal(SIGTERM);
        assert_eq!(
            s.wait_exit(Duration::from_secs(10)).unwrap().code(),
            Some(0)
        );
        let logs = s.logs();
        if reads {
            assert!(
                !logs.contains("closing idle connections"),
                "the exit waited for a client that had the whole answer: {logs}"
            );
        } else {
            assert!(
                logs.contains("closing idle connections idle_connections=1"),
                "the exit did not wait for a client that had not read its answer: {logs}"
            );
        }
        drop(client);
        let _ = std::fs::remove_file(&sock);
    }
}

#[test]
fn a_plugin_ignoring_the_flag_is_answered_for_when_the_timeout_expires() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "1s"]);
    let (r, waited) = invoke_then_sigterm(&s, r#"{"units":100000,"cooperative":false}"#);
    assert_shutdown_abort(&r);
    assert!(
        waited >= Duration::from_millis(900),
        "answered before the timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(6),
        "answered long after the timeout: {waited:?}"
    );

    let status = s
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the timeout");
    assert_eq!(status.code(), Some(75), "the timeout code");
    let logs = s.logs();
    assert!(
        logs.contains("timed out after 1s: 1 invocation abandoned"),
        "{logs}"
    );
    assert!(
        logs.contains("not running the plugin's shutdown hook"),
        "{logs}"
    );
    assert!(logs.contains("exiting with code 75"), "{logs}");
}

#[test]
fn a_call_the_timeout_cuts_is_answered_with_what_the_plugin_reported() {
    // docs/shutdown.md: usage and messages recorded before the cut are in
    // the envelope, though the plugin never returned.
    let mut s = Server::start(&fixture(None), &["--graceful-timeout", "1s"]);
    let call = s.send_in_background(invoke_request(r#"{"mode":"report_then_ignore"}"#));
    assert!(
        s.wait_for_log("reported, now ignoring the flags", Duration::from_secs(10)),
        "{}",
        s.logs()
    );
    s.signal(SIGTERM);
    let (r, _) = call.join().unwrap();
    assert_shutdown_abort(&r);
    let e = r.json();
    assert_eq!(e["usage"], json!([{"name": "reported", "value": 1}]));
    assert_eq!(
        e["message_channels"]["infos"],
        json!(["recorded before the cut"])
    );
    let status = s.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(75), "the timeout code");
}

#[test]
fn the_environment_variable_sets_the_timeout() {
    let mut s = Server::start_with(
        &plugin("slow"),
        &[],
        &[("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", "1.5")],
    )
    .unwrap();
    let (r, waited) = invoke_then_sigterm(&s, r#"{"units":100000,"cooperative":false}"#);
    assert_shutdown_abort(&r);
    assert!(waited >= Duration::from_millis(1400), "{:?}", waited);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(75)
    );
}

#[test]
fn a_request_that_finishes_during_the_drain_gets_its_normal_answer() {
    let mut s = Server::start(&plugin("slow"), &[]);
    let call = send_into_plugin(
        &s,
        invoke_request(r#"{"units":8,"unit_ms":100,"cooperative":false}"#),
    );
    s.signal(SIGTERM);
    let (r, _) = call.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["output"]["done"], 8);
    // Once shutdown started, the plugin's deadline is the graceful one
    // (30 s by default), less the time it has run since.
    let left = r.json()["output"]["remaining_ms"].as_u64().unwrap();
    assert!((20_000..=30_000).contains(&left), "{left} ms left");
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn requests_during_the_drain_are_answered_at_once() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "20s"]);
    // A keep-alive connection opened and used before the signal.
    let mut kept = s.connect();
    assert_eq!(kept.send("GET", "/readyz", None).unwrap().status, 200);
    let mut kept_for_probe = s.connect();
    assert_eq!(
        kept_for_probe
            .send("GET", "/schema", None)
            .unwrap()
            .header("connection"),
        None
    );
    // Something to keep the drain going: 2 s that ignore the flag.
    let long = send_into_plugin(
        &s,
        invoke_request(r#"{"units":20,"unit_ms":100,"cooperative":false}"#),
    );
    s.signal(SIGTERM);
    assert!(s.wait_for_log("draining", Duration::from_secs(5)));

    let t = Instant::now();
    let r = kept
        .send("POST", "/invoke", Some(r#"{"units":1}"#))
        .unwrap();
    assert_shutdown_abort(&r);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "not at once: {:?}",
        t.elapsed()
    );
    assert!(
        kept.closed_by_server(),
        "the keep-alive connection closes after its response"
    );

    // Any route on a keep-alive connection: answered, then the connection closes.
    let r = kept_for_probe.send("GET", "/healthz", None).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(kept_for_probe.closed_by_server());

    let r = s.post_json("/invoke", r#"{"units":1}"#);
    assert_shutdown_abort(&r);
    // A client that waits for `100 Continue` gets the shutdown-abort in
    // its place, before it sends the body.
    assert_shutdown_abort(&support::request(s.addr, support::WAITS_FOR_CONTINUE));
    let r = s.get("/precheck");
    assert_shutdown_abort(&r);
    let r = s.get("/readyz");
    assert_eq!((r.status, r.header("connection")), (503, Some("close")));
    let r = s.get("/healthz");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert_eq!(s.get("/schema").status, 200);

    // The long request still completes normally, then the process exits.
    let (r, _) = long.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["output"]["done"], 20);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn an_idle_server_exits_at_once() {
    for signal in [SIGTERM, SIGINT] {
        let mut s = Server::start(&plugin("wordcount"), &[]);
        let sent = Instant::now();
        s.signal(signal);
        let status = s
            .wait_exit(Duration::from_secs(5))
            .expect("an idle server exits at once");
        assert_eq!(status.code(), Some(0));
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{:?}",
            sent.elapsed()
        );
        assert!(
            s.logs().contains(&format!("{signal:?} received")),
            "{}",
            s.logs()
        );
    }
}

/// As a container runs it: not root, no capabilities. Recent kernels let
/// only a process with CAP_NET_ADMIN put a filter on a TCP socket, so the
/// listener has its backlog cut instead (docs/reliability.md, "The closing
/// race"): said once, as information, and the drain is as usual.
#[test]
fn an_unprivileged_server_drains_and_exits_whether_or_not_it_may_filter() {
    let mut s = Server::start_unprivileged(&plugin("wordcount"), &[]);
    assert_eq!(s.get("/id").status, 200);
    s.signal(SIGTERM);
    let status = s.wait_exit(Duration::from_secs(10)).expect("it exits");
    let logs = s.logs();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("drained"), "{logs}");
    assert!(
        !logs.contains(" WARN "),
        "a kernel that refuses the filter is no warning: {logs}"
    );
    // Where the kernel refuses the filter (recent kernels), one line says
    // so, as information; where it allows it, nothing is said.
    let said: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("no socket filter on the listener"))
        .collect();
    let refused = !support::may_filter_tcp(true);
    assert_eq!(
        said.len(),
        usize::from(refused),
        "refused={refused}: {logs}"
    );
    assert!(
        said.iter()
            .all(|l| l.contains(" INFO ") && l.ends_with("its backlog is cut to 0 instead")),
        "{logs}"
    );
}

#[test]
fn a_stream_cut_by_shutdown_ends_with_the_shutdown_abort_line() {
    let mut s = Server::start(&plugin("ticker"), &[]);
    let raw = invoke_request(r#"{"count":100000,"interval_ms":20}"#);
    let lines = support::stream_cut_after_first_item(s.addr, &raw, || s.signal(SIGTERM));
    assert!(
        lines.len() >= 2,
        "some items, then the last line: {lines:?}"
    );
    let (last, items) = lines.split_last().unwrap();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["output"], json!({"i": i}));
    }
    assert_eq!(last["status_code"], 503);
    assert_eq!(last["plugin_error"]["error_type"], "shutdown");
    assert_eq!(last["output"], serde_json::Value::Null);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_stream_that_sent_nothing_answers_the_plain_503() {
    let mut s = Server::start(&fixture(Some("STREAMING")), &[]);
    let call = send_into_plugin(&s, invoke_request(r#"{"mode":"wait_cancel"}"#));
    s.signal(SIGTERM);
    let (r, _) = call.join().unwrap();
    assert_shutdown_abort(&r);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["usage"], json!([{"value": 1, "name": "waited"}]));
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_stream_whose_plugin_ignores_the_flag_is_cut_at_the_timeout() {
    let mut s = Server::start(
        &fixture(Some("STREAMING")),
        &["--graceful-timeout", "500ms"],
    );
    let (r, waited) = invoke_then_sigterm(&s, r#"{"mode":"stream_ignore"}"#);
    assert_eq!(r.status, 200);
    let lines = r.lines();
    let (last, items) = lines.split_last().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|l| l["status_code"] == 200));
    assert_eq!(last["status_code"], 503);
    assert_eq!(last["plugin_error"]["error_type"], "shutdown");
    assert!(waited >= Duration::from_millis(400), "{:?}", waited);
    // The plugin stops at its next emit (the stream is closed), so nothing is
    // left inside it and the drain counts as finished by the timeout.
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(75)
    );
}

#[test]
fn a_second_signal_forces_the_exit() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "60s"]);
    let _call = send_into_plugin(
        &s,
        invoke_request(r#"{"units":100000,"cooperative":false}"#),
    );
    s.signal(SIGTERM);
    assert!(s.wait_for_log("draining", Duration::from_secs(5)));
    let sent = Instant::now();
    s.signal(SIGINT);
    let status = s
        .wait_exit(Duration::from_secs(5))
        .expect("a second signal exits at once");
    assert_eq!(status.code(), Some(130));
    assert!(sent.elapsed() < Duration::from_secs(3));
    assert!(
        s.logs()
            .contains("second SIGINT during the drain: forced exit"),
        "{}",
        s.logs()
    );
}

#[test]
fn a_zero_timeout_cancels_and_exits_without_waiting() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "0"]);
    let (r, waited) = invoke_then_sigterm(&s, r#"{"units":100000,"cooperative":false}"#);
    assert_shutdown_abort(&r);
    assert!(waited < Duration::from_secs(2));
    assert_eq!(
        s.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(75)
    );

    let mut idle = Server::start(&plugin("slow"), &["--graceful-timeout", "0"]);
    idle.signal(SIGTERM);
    assert_eq!(
        idle.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn the_flag_wins_over_the_environment_variable() {
    let cases: [(&[&str], Option<&str>, &str); 5] = [
        (&[], None, "graceful_timeout=30s"),
        (&[], Some("2.5"), "graceful_timeout=2s 500ms"),
        (&[], Some("1m30s"), "graceful_timeout=1m 30s"),
        (
            &["--graceful-timeout", "45s"],
            Some("2"),
            "graceful_timeout=45s",
        ),
        (
            &["--graceful-timeout", "500ms"],
            None,
            "graceful_timeout=500ms",
        ),
    ];
    for (args, env, want) in cases {
        let env: Vec<(&str, &str)> = env
            .map(|v| ("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", v))
            .into_iter()
            .collect();
        let s = Server::start_with(&plugin("wordcount"), args, &env).unwrap();
        assert!(s.logs().contains(want), "{args:?} {env:?}: {}", s.logs());
    }
}

#[test]
fn bad_timeouts_are_one_line_naming_the_flag_or_variable() {
    let out = support::etl_serve()
        .args(["--plugin", "x.so", "--graceful-timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().next().unwrap().contains(
            "invalid value 'soon' for '--graceful-timeout <DURATION>': `soon` is not a duration: expected seconds (30, 2.5) or a duration (30s, 1m30s, 500ms)"
        ),
        "{err}"
    );

    let out = support::etl_serve()
        .args(["--plugin", "x.so"])
        .env("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", "-3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "etl-serve: error: invalid value '-3' for UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN (the variable for --graceful-timeout): `-3` is not a duration: expected seconds (30, 2.5) or a duration (30s, 1m30s, 500ms)\n"
    );
}

#[test]
fn a_client_that_goes_away_cancels_its_invocation() {
    let mut s = Server::start(&plugin("slow"), &[]);
    let mut conn = s.connect();
    // 20 s of work; the client gives up once it is inside the plugin, by
    // closing the socket.
    let raw = invoke_request(r#"{"units":2000,"unit_ms":10}"#);
    let before = calls_handed(&s);
    conn.stream_mut().write_all(raw.as_bytes()).unwrap();
    wait_handed(&s, before);
    drop(conn);
    assert_cancelled_for_its_client(&s);
    assert!(
        s.logs().contains("client_disconnect_cancels=1"),
        "{}",
        s.logs()
    );
    // The exit line counts it too.
    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    let logs = s.logs();
    let exit = logs.lines().find(|l| l.contains("exiting with code 0"));
    assert!(
        exit.is_some_and(|l| l.contains("client_disconnect_cancels=1")),
        "{logs}"
    );
}

/// After the client of a 20 s `slow` call closed its connection: the
/// invocation was cancelled, and the plugin, which checks its flag between
/// 10 ms units, returned early as a shutdown (result 2), not after 20 s.
fn assert_cancelled_for_its_client(s: &Server) {
    let closed = Instant::now();
    for line in [
        "client went away: invocation cancelled",
        "plugin returned after its client went away",
    ] {
        assert!(
            s.wait_for_log(line, Duration::from_secs(5)),
            "no {line:?} in {}",
            s.logs()
        );
    }
    assert!(closed.elapsed() < Duration::from_secs(5));
    assert!(s.logs().contains("result=2"), "{}", s.logs());
}

/// The host pids of `pid`'s children.
fn children_of(pid: i32) -> Vec<i32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Zombie processes whose parent is `parent`.
fn zombies_of(parent: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z")
            && fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent)
        {
            found.push(pid);
        }
    }
    found
}

/// Waits until `parent` has `n` zombie children, then until it has none;
/// returns how long the second wait took.
fn zombies_come_and_go(parent: i32, n: usize) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(10);
    while zombies_of(parent).len() < n {
        assert!(Instant::now() < deadline, "the {n} zombies never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let appeared = Instant::now();
    let deadline = appeared + Duration::from_secs(30);
    loop {
        let zombies = zombies_of(parent);
        if zombies.is_empty() {
            return appeared.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "zombies never reaped: {zombies:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn as_pid_1_it_reaps_orphans_keeps_its_plugins_children_and_shuts_down() {
    let mut cmd = support::as_pid_1();
    cmd.arg("--plugin")
        .arg(fixture(None))
        .args(["--host", "127.0.0.1", "--port", "0"]);
    let mut s = Server::spawn(cmd).expect("etl-serve starts as PID 1");
    assert!(s.logs().contains("running as PID 1"), "{}", s.logs());
    let inner = children_of(s.pid());
    assert_eq!(inner.len(), 1, "unshare has one child, etl-serve");
    let etl_serve = inner[0];

    // The plugin waits 300 ms for its own child: the reaper leaves it alone.
    let r = s.post_json("/invoke", r#"{"mode":"wait_own"}"#);
    assert_eq!(r.json()["output"], json!({"status": 7}), "{}", r.text());

    // The plugin's child exits and its grandchild becomes an orphan of PID 1.
    let r = s.post_json("/invoke", r#"{"mode":"orphan"}"#);
    assert_eq!(
        r.json()["output"],
        json!({"child_status": 3}),
        "{}",
        r.text()
    );
    let reaped = zombies_come_and_go(etl_serve, 1);
    assert!(reaped < Duration::from_secs(5), "{reaped:?}");

    // Twenty orphans that exit together are reaped together: one grace
    // period, not one each.
    let r = s.post_json("/invoke", r#"{"mode":"orphans"}"#);
    assert_eq!(r.json()["output"], json!({"orphans": 20}), "{}", r.text());
    let reaped = zombies_come_and_go(etl_serve, 20);
    assert!(reaped < Duration::from_secs(4), "{reaped:?}");

    // The shutdown sequence holds as PID 1.
    let call = send_into_plugin(&s, invoke_request(r#"{"mode":"wait_cancel"}"#));
    support::signal_pid(etl_serve, SIGTERM);
    assert_shutdown_abort(&call.join().unwrap().0);
    let status = s
        .wait_exit(Duration::from_secs(10))
        .expect("etl-serve exits, and unshare with it");
    assert_eq!(status.code(), Some(0));
    assert!(s.logs().contains("drained"), "{}", s.logs());
}

#[test]
fn the_shutdown_hook_and_destructors_run_only_when_nothing_is_inside_the_plugin() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let drained = dir.join(format!("shutdown-hook-drained-{}", std::process::id()));
    let cut = dir.join(format!("shutdown-hook-cut-{}", std::process::id()));
    let _ = std::fs::remove_file(&drained);
    let _ = std::fs::remove_file(&cut);

    let config = format!("marker:{}", drained.display());
    let mut s = Server::start(&fixture(None), &["--plugin-config", &config]);
    s.signal(SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(5)).unwrap().code(), Some(0));
    // The hook, then the library's destructor at the exit.
    assert_eq!(
        std::fs::read_to_string(&drained).unwrap(),
        "shutdown ran\ndestructor ran\n"
    );

    let config = format!("marker:{}", cut.display());
    let mut s = Server::start(
        &fixture(None),
        &["--plugin-config", &config, "--graceful-timeout", "300ms"],
    );
    let call = send_into_plugin(&s, invoke_request(r#"{"mode":"hang"}"#));
    s.signal(SIGTERM);
    assert_shutdown_abort(&call.join().unwrap().0);
    assert_eq!(
        s.wait_exit(Duration::from_secs(5)).unwrap().code(),
        Some(75)
    );
    // Neither the hook nor the library's destructors: the exit skips
    // them, since a thread is still running the plugin's code.
    assert!(
        !cut.exists(),
        "the hook or a destructor ran while a thread is inside the plugin: {:?}",
        std::fs::read_to_string(&cut)
    );
}

/// A server running a long `/invoke` inline: `send` sends it and returns
/// what holds its connection. Whether a call runs inline depends on how long
/// the calls before it took, and on a loaded machine the kernel may preempt
/// the last quick call past the 1 ms limit, which rightly sends the next
/// call to the blocking pool: then this tries again with a new server.
fn long_call_inline<T>(args: &[&str], send: impl Fn(&Server) -> T) -> (Server, T) {
    for _ in 0..10 {
        let s = Server::start(&plugin("slow"), args);
        let inline_before = support::warm_up_inline(&s);
        let handed_before = calls_handed(&s);
        let sent = send(&s);
        wait_handed(&s, handed_before);
        if support::plugin_calls(&s, "inline") == inline_before + 1 {
            return (s, sent);
        }
        // It went to the blocking pool: the server is killed on drop.
    }
    panic!("the long call never ran inline in 10 tries");
}

#[test]
fn a_quick_plugin_whose_inline_call_hangs_is_still_answered_at_the_timeout() {
    // This call looks like the quick ones until it never returns; it runs
    // inline and holds one worker.
    let body = r#"{"units":100000,"cooperative":false}"#;
    let raw = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nX-Request-Id: stuck-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut s, call) = long_call_inline(&["--graceful-timeout", "1s"], |s| {
        s.send_in_background(raw.clone())
    });
    let inline_now = support::plugin_calls(&s, "inline");
    // The other worker still serves, and stops further inline calls.
    let probe = Instant::now();
    assert_eq!(s.get("/healthz").status, 200);
    assert!(probe.elapsed() < Duration::from_secs(2));
    assert_eq!(s.post_json("/invoke", r#"{"units":0}"#).status, 200);
    assert_eq!(
        support::plugin_calls(&s, "inline"),
        inline_now,
        "an overrunning inline call sends later calls to the blocking pool"
    );

    let sent = Instant::now();
    s.signal(SIGTERM);
    let (r, answered) = call.join().unwrap();
    // The worker is still inside the plugin: the watchdog answered.
    assert_shutdown_abort(&r);
    assert_eq!(r.header("x-request-id"), Some("stuck-1"));
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{:?}",
        r.headers
    );
    let waited = answered - sent;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "answered {waited:?} after the signal, not at the 1 s timeout"
    );
    let status = s.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "exited {:?} after the signal, with a 1 s timeout",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(75), "the timeout code");
    assert!(
        s.logs().contains(r#"POST /invoke 503"#),
        "the answer is in the access log: {}",
        s.logs()
    );
}

#[test]
fn a_client_that_leaves_a_long_inline_call_cancels_it() {
    // 20 s of cooperative work, run inline; its client then leaves.
    let (s, conn) = long_call_inline(&[], |s| {
        let mut conn = s.connect();
        let raw = invoke_request(r#"{"units":2000,"unit_ms":10}"#);
        conn.stream_mut().write_all(raw.as_bytes()).unwrap();
        conn
    });
    drop(conn);
    assert_cancelled_for_its_client(&s);
    // The worker is free again, and serves.
    assert_eq!(s.post_json("/invoke", r#"{"units":0}"#).status, 200);
}

#[test]
fn a_long_inline_call_whose_client_waits_runs_to_its_end() {
    // 300 ms of cooperative work, run inline: the watchdog looks at it
    // every 10 ms, and must leave it alone while its client is there.
    let (s, call) = long_call_inline(&[], |s| {
        s.send_in_background(invoke_request(r#"{"units":30,"unit_ms":10}"#))
    });
    let (r, _) = call.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["output"]["done"], 30, "{}", r.text());
    assert!(
        !s.logs().contains("client went away"),
        "cancelled with its client there: {}",
        s.logs()
    );
}

#[test]
fn a_cooperative_inline_call_stops_at_sigterm_and_its_caller_gets_the_503() {
    // 1000 s of cooperative work, run inline on an HTTP worker.
    let (mut s, call) = long_call_inline(&[], |s| {
        s.send_in_background(invoke_request(r#"{"units":100000}"#))
    });
    let sent = Instant::now();
    s.signal(SIGTERM);
    let (r, answered) = call.join().unwrap();
    // The plugin saw its flag and returned: its own task answered, with
    // what the plugin had recorded, and the drain ended without a timeout.
    assert_shutdown_abort(&r);
    assert!(
        r.json()["usage"][0]["value"].as_u64().is_some(),
        "{}",
        r.text()
    );
    assert!(answered - sent < Duration::from_secs(5));
    let status = s.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", s.logs());
}
