//! The Python bridge beyond the wire (which `differential` compares with
//! etl-uvicorn): cooperative shutdown of a Python plugin.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;
use serde_json::json;

use crate::differential::serve_python;
use crate::support::invoke_request;

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
