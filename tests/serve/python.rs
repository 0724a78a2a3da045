//! The Python bridge beyond the wire (which `differential` compares with
//! etl-uvicorn): the shutdown of a Python plugin, cooperative, async,
//! forced, and where the forced stop cannot reach; and async calls sharing
//! one event loop.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;
use serde_json::json;

use crate::support::{
    invoke_request, serve_python, serve_python_with, stream_cut_after_first_item, Response, Server,
};

const DIR: &str = "tests/fixtures/python";

/// Asserts that `r` is the 503 shutdown-abort.
fn assert_shutdown_abort(r: &Response) {
    assert_eq!(r.status, 503, "{}", r.text());
    let e = r.json();
    assert_eq!(e["status_code"], 503);
    assert_eq!(e["plugin_error"]["error_type"], "shutdown");
    assert_eq!(e["plugin_error"]["retryable"], true);
}

/// Sends `body` to `s`, waits until it is inside the plugin, sends SIGTERM,
/// and returns the answer and how long after the signal it came.
fn invoke_then_sigterm(s: &Server, body: &str) -> (Response, Duration) {
    let call = s.send_in_background(invoke_request(body));
    s.wait_in_flight(1);
    let signalled = Instant::now();
    s.signal(SIGTERM);
    let (r, answered) = call.join().unwrap();
    (r, answered - signalled)
}

#[test]
fn a_python_plugin_that_checks_its_token_stops_at_sigterm_with_the_shutdown_abort() {
    let mut s = serve_python("etl_cancel:count", "tests/fixtures/python");
    // The token is injected, never an input.
    let inputs = &s.get("/schema").json()["inputs"]["properties"];
    assert_eq!(
        inputs.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["units", "unit_ms"]
    );
    assert_eq!(
        s.post_json("/invoke", r#"{"units":2,"unit_ms":1}"#).json()["output"],
        json!({"done": 2})
    );

    // 500 units of 20 ms: 10 s of work, stopped at the first check after
    // the signal.
    let call = s.send_in_background(invoke_request(r#"{"units":500}"#));
    s.wait_in_flight(1);
    let signalled = Instant::now();
    s.signal(SIGTERM);
    let (r, answered) = call.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let e = r.json();
    assert_eq!(e["status_code"], 503);
    assert_eq!(e["plugin_error"]["error_type"], "shutdown");
    assert_eq!(e["plugin_error"]["retryable"], true);
    assert!(
        answered - signalled < Duration::from_secs(5),
        "answered {:?} after the signal",
        answered - signalled
    );
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

/// Serves `app`, gives it a 10 s call of 500 units, and sends SIGTERM:
/// its caller has the shutdown-abort within 3 s, and etl-serve exits
/// drained.
fn assert_stops_promptly(app: &str) {
    let mut s = serve_python(app, DIR);
    let (r, after) = invoke_then_sigterm(&s, r#"{"units":500}"#);
    assert_shutdown_abort(&r);
    assert!(
        after < Duration::from_secs(3),
        "{app}: answered {after:?} after"
    );
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0),
        "{app}"
    );
}

#[test]
fn an_async_python_plugin_is_cancelled_at_sigterm_the_asyncio_way() {
    // No token to look at: its task gets CancelledError, which it notes.
    let marker = std::env::temp_dir().join(format!("etl-serve-cancelled-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut s = serve_python("etl_cancel:wait", DIR);
    let body = json!({"units": 500, "marker": marker}).to_string();
    let (r, after) = invoke_then_sigterm(&s, &body);
    assert_shutdown_abort(&r);
    assert!(after < Duration::from_secs(3), "answered {after:?} after");
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    let noted = std::fs::read_to_string(&marker);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(noted.ok().as_deref(), Some("cancelled"));
}

#[test]
fn a_busy_sync_python_plugin_is_stopped_before_the_graceful_deadline() {
    let mut s = serve_python_with("etl_cancel:spin", DIR, &["--graceful-timeout", "2s"]);
    // 30 s in a Python loop that never looks at a token.
    let (r, after) = invoke_then_sigterm(&s, r#"{"seconds":30}"#);
    assert_shutdown_abort(&r);
    // Raised 300 ms before the deadline, and unwound by it.
    assert!(
        after > Duration::from_millis(1500) && after < Duration::from_secs(4),
        "answered {after:?} after the signal"
    );
    // The thread came back: drained, not abandoned.
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0),
        "{}",
        s.logs()
    );
    assert!(s
        .logs()
        .contains("raising PluginShutdown in the plugin's thread"));
}

#[test]
fn a_python_plugin_blocked_in_c_is_abandoned_at_the_deadline() {
    let mut s = serve_python_with("etl_cancel:nap", DIR, &["--graceful-timeout", "1s"]);
    let (r, after) = invoke_then_sigterm(&s, r#"{"seconds":30}"#);
    // The exception waits for time.sleep to return: the host answers at
    // the deadline and abandons the thread, as for any plugin.
    assert_shutdown_abort(&r);
    assert!(after < Duration::from_secs(4), "answered {after:?} after");
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(75),
        "{}",
        s.logs()
    );
}

#[test]
fn async_python_calls_run_concurrently() {
    let s = serve_python("etl_cancel:wait", DIR);
    // Eight calls of 50 units of 20 ms (1 s each): one after the other
    // they would take 8 s.
    let started = Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|_| s.send_in_background(invoke_request(r#"{"units":50}"#)))
        .collect();
    for call in calls {
        let (r, _) = call.join().unwrap();
        assert_eq!(r.json()["output"], json!({"done": 50}), "{}", r.text());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_plugin_written_for_etl_uvicorns_cooperative_shutdown_runs_unchanged() {
    // It imports PluginShutdown from where that change puts it; 0.1.0 has
    // no such module, so the bridge provides it.
    assert_stops_promptly("etl_cancel:seed_style");
}

#[test]
fn a_python_plugin_raising_plugin_shutdown_itself_gets_the_shutdown_abort() {
    let s = serve_python("etl_cancel:give_up", DIR);
    let mut conn = s.connect();
    let r = conn.send("POST", "/invoke", Some("{}")).unwrap();
    assert_shutdown_abort(&r);
    assert_eq!(r.header("connection"), None, "the server is not draining");
    assert_eq!(conn.send("GET", "/id", None).unwrap().status, 200);
}

#[test]
fn a_python_plugin_takes_values_as_deep_as_the_host_accepts() {
    // Bodies of 1000 levels, the host's limit: the value in an input, and
    // in each reserved field. Python's default recursion limit would stop
    // the bridge's JSON parser near 990.
    let s = serve_python("etl_types:depth", DIR);
    let value = format!("{}{{}}{}", r#"{"a":"#.repeat(998), "}".repeat(998));
    for field in ["value", "invocation_settings", "invocation_context"] {
        let levels = if field == "value" { 999 } else { 1 };
        let body = if field == "value" {
            format!(r#"{{"value":{value}}}"#)
        } else {
            format!(r#"{{"value":{{}},"{field}":{value}}}"#)
        };
        let e = s.post_json("/invoke", &body).json();
        assert_eq!(e["status_code"], 200, "{field}: {e}");
        assert_eq!(e["output"], json!({ "levels": levels }), "{field}");
    }
}

#[test]
fn a_python_stream_stopped_by_sigterm_ends_with_the_shutdown_abort_line() {
    let mut s = serve_python("etl_cancel:stream_units", DIR);
    let raw = invoke_request(r#"{"units":500}"#);
    let mut signalled = None;
    let lines = stream_cut_after_first_item(s.addr, &raw, || {
        signalled = Some(Instant::now());
        s.signal(SIGTERM);
    });
    let signalled = signalled.expect("signalled after the first item");
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "{:?}",
        signalled.elapsed()
    );
    let (last, items) = lines.split_last().unwrap();
    assert!(!items.is_empty());
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["output"], json!({"done": i + 1}));
    }
    assert_eq!(last["status_code"], 503);
    assert_eq!(last["plugin_error"]["error_type"], "shutdown");
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_python_plugin_holding_the_gil_never_delays_the_probes() {
    let mut s = serve_python_with("etl_cancel:spin", DIR, &["--graceful-timeout", "1s"]);
    // Two calls busy in Python code for 10 s: the GIL is never free for
    // long.
    let calls: Vec<_> = (0..2)
        .map(|_| s.send_in_background(invoke_request(r#"{"seconds":10}"#)))
        .collect();
    s.wait_in_flight(2);
    for path in ["/healthz", "/readyz", "/metrics", "/healthz", "/readyz"] {
        let asked = Instant::now();
        assert_eq!(s.get(path).status, 200, "{path}");
        // Generous for a loaded machine; waiting for the GIL would take
        // the calls' 10 s.
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{path} took {:?}",
            asked.elapsed()
        );
    }
    // Both calls are answered before the server exits, rather than left
    // to fail when it is killed.
    s.signal(SIGTERM);
    for call in calls {
        assert_shutdown_abort(&call.join().unwrap().0);
    }
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

/// Runs the bridge with the environment variable `name` set to `value`,
/// expecting it to refuse to start: returns its one error line, once the
/// exit code is checked to be 65.
fn refused_with(name: &str, value: &std::path::Path) -> String {
    let out = crate::support::etl_serve()
        .arg("--plugin")
        .arg(crate::support::plugin("etl_python"))
        .args(["--port", "0", "--plugin-config", "etl_cancel:count"])
        .env(name, value)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("etl-serve: error:"))
        .unwrap_or_else(|| panic!("{stderr}"))
        .to_owned()
}

#[test]
fn a_bridge_whose_libpython_cannot_be_loaded_is_refused_in_one_line() {
    let bridge = crate::support::plugin("etl_python");
    // The libpython the bridge links, by the name the loader looks for.
    let ldd = std::process::Command::new("ldd")
        .arg(&bridge)
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let soname = ldd
        .split_whitespace()
        .find(|w| w.starts_with("libpython"))
        .unwrap_or_else(|| panic!("the bridge links no libpython: {ldd}"));
    // A directory searched before the system's, where that name is not a
    // library.
    let dir = std::env::temp_dir().join(format!("etl-serve-broken-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(soname), b"not a library").unwrap();
    let line = refused_with("LD_LIBRARY_PATH", &dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        line.contains("a library it links cannot be loaded")
            && line.contains(soname)
            && line.contains("file too short"),
        "{line}"
    );
}

#[test]
fn a_virtualenv_of_another_python_is_refused_naming_both_versions() {
    let venv = std::env::temp_dir().join(format!("etl-serve-other-venv-{}", std::process::id()));
    std::fs::create_dir_all(venv.join("lib/python3.99/site-packages")).unwrap();
    // 65, not a crash: the bridge stays mapped after a failed load.
    let line = refused_with("VIRTUAL_ENV", &venv);
    let _ = std::fs::remove_dir_all(&venv);
    assert!(
        line.contains("so the plugin's virtualenv must be made with Python 3.")
            && line.ends_with("(it holds packages for python3.99)"),
        "{line}"
    );
}
