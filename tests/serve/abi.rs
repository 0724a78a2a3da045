//! ABI 1.1 as plugins see it, through the `abi.c` fixture (raw C) and the
//! `slow` plugin (the Rust SDK), and a plugin built for ABI 1.0 still
//! loading and working.

use std::time::Duration;

use nix::sys::signal::Signal::SIGTERM;
use serde_json::{json, Value};

use crate::support::{self, c_fixture, plugin, request, Server};

/// A POST /invoke with `body` and extra header lines.
fn invoke_with(s: &Server, headers: &str, body: &str) -> support::Response {
    let raw = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    request(s.addr, raw.as_bytes())
}

fn marker(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn a_1_1_plugin_gets_its_state_the_request_id_and_its_log_lines() {
    let done = marker("abi_1_1_finish");
    let mut s = Server::start(
        &c_fixture("abi", None),
        &["--plugin-config", done.to_str().unwrap()],
    );
    assert!(s.logs().contains("abi fixture: init stored its state"));

    let r = invoke_with(&s, "x-request-id: req-abi-7\r\n", "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let out = &r.json()["output"];
    assert_eq!(out["abi"], "1.1");
    assert_eq!(out["request_id"], "req-abi-7");
    assert_eq!(out["input"], json!({"fail": false}));
    assert_eq!(out["remaining_ms"], Value::Null, "no deadline was given");
    // The plugin's line is in the host's log with the request's id.
    assert!(s.wait_for_log("abi fixture: invoked", Duration::from_secs(5)));
    let line = s
        .logs()
        .lines()
        .find(|l| l.contains("abi fixture: invoked"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("WARN") && line.contains("req-abi-7"),
        "{line}"
    );

    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    assert_eq!(
        std::fs::read_to_string(&done).unwrap(),
        "finish with the state"
    );
}

#[test]
fn the_reserved_fields_reach_the_plugin_beside_its_input() {
    let s = Server::start(&c_fixture("abi", None), &["--plugin-config", "/dev/null"]);
    let body = r#"{"fail":false,"invocation_settings":{"api_key":"k","n":1},
                   "invocation_context":{"tenant_id":"t1","attempt":"2","extra":[1]}}"#;
    let r = invoke_with(&s, "", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = &r.json()["output"];
    assert_eq!(out["input"], json!({"fail": false}), "never an input");
    assert_eq!(out["settings"], json!({"api_key": "k", "n": 1}));
    assert_eq!(
        out["context"],
        json!({"schema_version": "1", "tenant_id": "t1", "attempt": 2, "extra": [1]})
    );
    // The fixture declares ETL_CAP_SEALED_SETTINGS_V2.
    assert_eq!(
        s.get("/metadata").json()["capabilities"],
        json!([
            "invocation_settings",
            "invocation_context",
            "invoke_with_sealed_dag_node_settings_v2"
        ])
    );
}

#[test]
fn unusable_reserved_fields_get_the_reference_answers() {
    let s = Server::start(&c_fixture("abi", None), &["--plugin-config", "/dev/null"]);
    let cases = [
        (
            r#"{"invocation_settings":null}"#,
            422,
            json!({"detail": "Invalid field: invocation_settings", "reason": "malformed_envelope"}),
        ),
        (
            r#"{"invocation_context":{"tenant_id":5}}"#,
            422,
            json!({"detail": "Invalid field: invocation_context", "reason": "malformed_envelope"}),
        ),
        (
            r#"{"invocation_context":{"schema_version":"9"}}"#,
            500,
            json!({"detail": "Unusable invocation_context: UnsupportedContextVersionError",
                   "reason": "unsupported_context_version"}),
        ),
        (
            r#"{"invocation_settings":{"format":"u10d.invocation-settings.v1"}}"#,
            500,
            json!({"detail": "Unusable invocation settings: MalformedDagNodeSettingsError",
                   "reason": "malformed_dag_node_settings"}),
        ),
        // Before the inputs are validated, as the reference does.
        (
            r#"{"fail":"maybe","invocation_settings":null}"#,
            422,
            json!({"detail": "Invalid field: invocation_settings", "reason": "malformed_envelope"}),
        ),
    ];
    for (body, status, answer) in cases {
        let r = invoke_with(&s, "", body);
        assert_eq!((r.status, r.json()), (status, answer), "{body}");
    }
    // A sealed document is passed on unopened, for the plugin to resolve.
    let sealed = r#"{"invocation_settings":{"dag_node_settings":{"format":"u10d.invocation-settings.v2","settings":{}}}}"#;
    let r = invoke_with(&s, "", sealed);
    assert_eq!(
        r.json()["output"]["settings"]["dag_node_settings"]["format"],
        "u10d.invocation-settings.v2"
    );
}

#[test]
fn a_pod_requiring_sealed_settings_refuses_plaintext_and_absence() {
    let s = Server::start_with(
        &c_fixture("abi", None),
        &["--plugin-config", "/dev/null"],
        &[("FF_INVOCATION_SETTINGS", "true")],
    )
    .unwrap();
    let required = json!({
        "detail": "Unusable invocation settings: SealedDagNodeSettingsRequiredError",
        "reason": "sealed_dag_node_settings_required"
    });
    for body in ["{}", r#"{"invocation_settings":{"a":1}}"#, ""] {
        let r = invoke_with(&s, "", body);
        assert_eq!((r.status, r.json()), (500, required.clone()), "{body:?}");
    }
}

#[test]
fn a_structured_failure_reaches_the_envelope_field_for_field() {
    let s = Server::start(&c_fixture("abi", None), &["--plugin-config", "/dev/null"]);
    let r = invoke_with(&s, "", r#"{"fail":true}"#);
    let v = r.json();
    assert_eq!(v["status_code"], 400);
    assert_eq!(v["status_code_text"], "the fixture was told to fail");
    assert_eq!(v["failure_category"], "invalid_input");
    // In the reference's key order.
    let plugin_error = serde_json::to_string(&v["plugin_error"]).unwrap();
    assert_eq!(
        plugin_error,
        r#"{"error_type":"configuration","error_reason":"invalid_input","dependency":null,"audience":"user","retryable":false}"#
    );
}

#[test]
fn file_data_set_by_the_plugin_is_the_envelopes_as_given() {
    let s = Server::start(&c_fixture("abi", None), &["--plugin-config", "/dev/null"]);
    // The fixture first tries an array, which is refused, and a violation.
    let r = invoke_with(&s, "x-request-id: file-data\r\n", "{}");
    let text = r.text();
    assert!(
        text.contains(r#""file_data":{"identifier":"doc-1","n":1e400},"#),
        "{text}"
    );
    assert!(
        r.json()["status_code_text"]
            .as_str()
            .unwrap()
            .contains("the plugin set an invalid file_data: neither a JSON object nor null"),
        "{text}"
    );
    // Unset, it is null.
    assert_eq!(invoke_with(&s, "", "{}").json()["file_data"], json!(null));
}

#[test]
fn a_plugin_can_refuse_its_input_as_the_host_does() {
    let s = Server::start(&c_fixture("abi", None), &["--plugin-config", "/dev/null"]);
    let r = invoke_with(&s, "x-request-id: reject\r\n", "{}");
    assert_eq!(
        (r.status, r.header("content-type"), r.text().as_str()),
        (
            422,
            Some("application/json"),
            r#"{"detail":[{"type":"fixture"}]}"#
        )
    );
    // A refusal with a 2xx is a contract violation, reported as one.
    let r = invoke_with(&s, "x-request-id: reject-200\r\n", "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["status_code_text"]
        .as_str()
        .unwrap()
        .contains("rejected a request with the status 200, not a 4xx"));
}

#[test]
fn the_callers_deadline_reaches_the_plugin_and_a_bad_one_is_refused() {
    let s = Server::start(&c_fixture("abi", None), &["--plugin-config", "/dev/null"]);
    let r = invoke_with(&s, "x-etl-timeout-ms: 60000\r\n", "{}");
    let left = r.json()["output"]["remaining_ms"].as_i64().unwrap();
    assert!((50_000..=60_000).contains(&left), "{left} ms left");
    let r = invoke_with(&s, "x-etl-timeout-ms: 0\r\n", "{}");
    assert_eq!(r.json()["output"]["remaining_ms"], 0);
    // On one keep-alive connection: each refusal is whole, and the body
    // behind it is read, so the connection serves the next request.
    let mut conn = s.connect();
    // (A body large enough that the server would not drain it unread.)
    let body = format!(r#"{{"fail":false,"pad":"{}"}}"#, "x".repeat(1 << 20));
    for bad in ["soon", "-5", "1.5", ""] {
        let raw = format!(
            "POST /invoke HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nx-etl-timeout-ms: {bad}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = conn.send_raw(raw.as_bytes()).unwrap();
        assert_eq!(r.status, 400, "{bad:?}");
        assert_eq!(
            r.json(),
            json!({"detail": "Invalid x-etl-timeout-ms header: expected a whole number of milliseconds"})
        );
    }
    let r = conn.send("POST", "/invoke", Some("{}")).unwrap();
    assert_eq!(r.json()["output"]["abi"], "1.1");
}

#[test]
fn the_sdk_exposes_the_request_its_deadline_and_classified_errors() {
    let s = Server::start(&plugin("slow"), &[]);
    let body = r#"{"units":1,"unit_ms":1,"invocation_settings":{"k":"v"},"invocation_context":{"job_id":"j"}}"#;
    let r = invoke_with(
        &s,
        "x-request-id: sdk-req\r\nx-etl-timeout-ms: 90000\r\n",
        body,
    );
    let out = &r.json()["output"];
    assert_eq!(out["request_id"], "sdk-req");
    let left = out["remaining_ms"].as_u64().unwrap();
    assert!((80_000..=90_000).contains(&left), "{left}");
    assert_eq!(out["invocation_settings"], r#"{"k":"v"}"#);
    assert_eq!(
        out["invocation_context"],
        r#"{"schema_version":"1","job_id":"j"}"#
    );

    let r = invoke_with(&s, "", r#"{"units":1,"user_error":true}"#);
    let v = r.json();
    assert_eq!(v["status_code"], 400);
    assert_eq!(
        v["status_code_text"],
        "[UserError] units must be counted in whole numbers"
    );
    assert_eq!(v["failure_category"], "invalid_input");
    assert_eq!(v["plugin_error"]["audience"], "user");
    assert_eq!(v["plugin_error"]["retryable"], false);
}

#[test]
fn a_plugin_built_for_abi_1_0_loads_works_and_shuts_down() {
    let lib = c_fixture("abi", Some("ABI_1_0"));
    let check = support::etl_serve()
        .arg("--plugin")
        .arg(&lib)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(0));
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("abi:          1.0 (this etl-serve speaks 1.1)"),
        "{report}"
    );

    let done = marker("abi_1_0_shutdown");
    let mut s = Server::start(&lib, &["--plugin-config", done.to_str().unwrap()]);
    let r = invoke_with(&s, "x-request-id: old\r\n", r#"{"invocation_context":{}}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["output"],
        json!({"abi": "1.0", "input": {"fail": false}})
    );
    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    // `shutdown`, not the poisoned `finish` past the 1.0 table.
    assert_eq!(std::fs::read_to_string(&done).unwrap(), "shutdown");
}

#[test]
fn a_description_from_init_that_cannot_be_used_stops_the_load() {
    let lib = c_fixture("abi", Some("DESCRIBES_BADLY"));
    let out = support::etl_serve()
        .arg("--plugin")
        .arg(&lib)
        .args(["--port", "0", "--plugin-config", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "etl-serve: error: cannot load plugin {}: invalid plugin table: init described it wrongly: the `name` string is not valid UTF-8",
            lib.display()
        )),
        "{stderr}"
    );
}

#[test]
fn failures_the_header_forbids_are_refused_and_break_the_contract() {
    // A failure whose struct_size is below the 1.0 struct, or whose
    // plugin_error lacks one of its two required strings, is refused with
    // ETL_CB_INVALID (the fixture reports its own error otherwise), and the
    // plugin has broken the contract.
    let s = Server::start(&c_fixture("abi", None), &[]);
    for (id, why) in [
        ("bad-failure-size", "struct_size is 47 bytes"),
        (
            "bad-failure-reason",
            "plugin_error needs an error_type and an error_reason",
        ),
    ] {
        let r = invoke_with(&s, &format!("x-request-id: {id}\r\n"), "{}");
        let e = r.json();
        assert_eq!(e["status_code"], 500, "{e}");
        assert_eq!(
            e["status_code_text"],
            format!("[PluginContractError] the plugin reported an invalid failure: {why}"),
        );
    }
}
