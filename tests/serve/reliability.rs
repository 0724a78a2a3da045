//! The promise that a shutdown loses nothing and that nothing a client or a
//! plugin does takes the server down silently. See docs/reliability.md.

use crate::support;

use std::time::Duration;

use support::load::{round, Outcomes, Round};

/// Rounds and clients of the short run in `cargo test`; the soak script
/// raises them through these variables.
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How the server runs in a load test.
struct Load {
    /// Whether `slow` checks its flag.
    cooperative: bool,
    graceful_timeout: &'static str,
    expected_exit: i32,
    /// As a container runs it: see `Server::start_unprivileged`. The soak
    /// sets every round so with `ETL_SERVE_SOAK_UNPRIVILEGED`.
    unprivileged: bool,
    /// Through the Python bridge: see `load::Round::python`.
    python: Option<&'static str>,
    /// Whether the plugin streams: then some streams must have been cut by
    /// the shutdown after sending items; otherwise none can be.
    streams: bool,
}

fn run(load: &Load) {
    let rounds = setting("ETL_SERVE_SOAK_ROUNDS", 3);
    let unprivileged = load.unprivileged
        || (load.python.is_none() && std::env::var_os("ETL_SERVE_SOAK_UNPRIVILEGED").is_some());
    // The closing race (and a write refused because its reset came first)
    // needs a handshake that was half done when the listener stopped
    // completing new ones. With the socket filter, one in a round at most
    // (before it stopped them, up to clients/8 per round were seen). A
    // server without CAP_NET_ADMIN gets no filter on recent kernels, and
    // cuts its backlog to 0 instead, which the soak saw leave two in a
    // round (docs/reliability.md, "The closing race"). Either way the
    // client knows its request was not delivered.
    let races = if unprivileged { 2 } else { 1 };
    // Whether the server will be refused the filter: as the container's
    // user on recent kernels, and as the tests' own user unless it has
    // CAP_NET_ADMIN.
    let cut = !support::may_filter_tcp(unprivileged);
    let mut total = Outcomes::default();
    for n in 0..rounds {
        for clients in [32, setting("ETL_SERVE_SOAK_CLIENTS", 64)] {
            let r = Round {
                clients,
                cooperative: load.cooperative,
                graceful_timeout: load.graceful_timeout,
                warmup: Duration::from_millis(400),
                unprivileged,
                python: load.python,
            };
            let o = round(&r);
            eprintln!(
                "round {n}, {clients} clients, cooperative={}{}{}: {o:?}",
                load.cooperative,
                if unprivileged { ", unprivileged" } else { "" },
                python_label(load)
            );
            assert_eq!(
                o.lost(),
                0,
                "requests lost in round {n} with {clients} clients: {o:?}"
            );
            assert!(o.closing_race + o.write_failed <= races, "round {n}: {o:?}");
            assert_eq!(o.exit_code, Some(load.expected_exit), "{o:?}");
            assert_eq!(
                o.backlog_cut, cut,
                "the listener closed as the kernel allows: {o:?}"
            );
            assert!(o.ok > 0, "some requests were answered normally: {o:?}");
            assert!(
                o.shutdown_abort > 0,
                "some requests were cut by the shutdown: {o:?}"
            );
            assert_eq!(
                o.stream_cut > 0,
                load.streams,
                "streams cut after their first items: {o:?}"
            );
            total.ok += o.ok;
            total.shutdown_abort += o.shutdown_abort;
            total.stream_cut += o.stream_cut;
            total.connect_refused += o.connect_refused;
            total.write_failed += o.write_failed;
            total.closing_race += o.closing_race;
        }
    }
    total.backlog_cut = cut;
    eprintln!(
        "total, cooperative={}{}: {total:?}",
        load.cooperative,
        python_label(load)
    );
}

/// How a round's log line names the Python plugin, if any: `, python APP`.
fn python_label(load: &Load) -> String {
    load.python
        .map(|app| format!(", python {app}"))
        .unwrap_or_default()
}

#[test]
fn sigterm_under_load_loses_nothing_with_a_cooperative_plugin() {
    run(&Load {
        cooperative: true,
        graceful_timeout: "10s",
        expected_exit: 0,
        unprivileged: false,
        python: None,
        streams: false,
    });
}

#[test]
fn sigterm_under_load_loses_nothing_when_the_plugin_ignores_the_flag() {
    run(&Load {
        cooperative: false,
        graceful_timeout: "1s",
        expected_exit: 75,
        unprivileged: false,
        python: None,
        streams: false,
    });
}

/// The same load with the server as a container runs it (user 65532, no
/// capabilities, when the tests run as root): the way it runs in
/// production, and where the listener closes behind a backlog cut rather
/// than a socket filter.
#[test]
fn sigterm_under_load_loses_nothing_as_a_container_runs_the_server() {
    run(&Load {
        cooperative: false,
        graceful_timeout: "1s",
        expected_exit: 75,
        unprivileged: true,
        python: None,
        streams: false,
    });
}

/// The same load through the Python bridge, with a plugin that checks its
/// token: every plugin in use today is a Python function.
#[test]
fn sigterm_under_load_loses_nothing_with_a_cooperative_python_plugin() {
    run(&Load {
        cooperative: true,
        graceful_timeout: "10s",
        expected_exit: 0,
        unprivileged: false,
        python: Some("etl_cancel:slow"),
        streams: false,
    });
}

/// A sync Python plugin that never looks at its token, under load: the
/// bridge raises `PluginShutdown` in every thread still busy 300 ms before
/// the deadline (its sleeps are short, so each comes back to Python in
/// time), every caller gets its answer, and the shutdown ends drained.
#[test]
fn sigterm_under_load_loses_nothing_when_a_python_plugin_ignores_its_token() {
    run(&Load {
        cooperative: false,
        graceful_timeout: "1s",
        expected_exit: 0,
        unprivileged: false,
        python: Some("etl_cancel:slow"),
        streams: false,
    });
}

/// An async Python plugin under load: the bridge cancels every call's task
/// at SIGTERM, whatever its inputs say, so every caller still waiting gets
/// the shutdown-abort and the shutdown ends drained.
#[test]
fn sigterm_under_load_loses_nothing_with_an_async_python_plugin() {
    run(&Load {
        cooperative: false,
        graceful_timeout: "1s",
        expected_exit: 0,
        unprivileged: false,
        python: Some("etl_cancel:slow_async"),
        streams: false,
    });
}

/// A Python generator under load, checking its token: a stream the
/// shutdown stops ends with the shutdown-abort's line after the items it
/// sent (or is the plain 503 when it had sent none), and every other stream
/// ends whole.
#[test]
fn sigterm_under_load_loses_nothing_with_a_streaming_python_plugin() {
    run(&Load {
        cooperative: true,
        graceful_timeout: "10s",
        expected_exit: 0,
        unprivileged: false,
        python: Some("etl_cancel:slow_stream"),
        streams: true,
    });
}

/// A Python generator that never looks at its token, under load: the
/// bridge raises `PluginShutdown` in it before the deadline, as in a plain
/// call, and its stream ends with the shutdown-abort's line.
#[test]
fn sigterm_under_load_loses_nothing_when_a_streaming_python_plugin_ignores_its_token() {
    run(&Load {
        cooperative: false,
        graceful_timeout: "1s",
        expected_exit: 0,
        unprivileged: false,
        python: Some("etl_cancel:slow_stream"),
        streams: true,
    });
}

/// An async Python generator under load: the bridge cancels its task at
/// SIGTERM, and its stream ends with the shutdown-abort's line.
#[test]
fn sigterm_under_load_loses_nothing_with_an_async_streaming_python_plugin() {
    run(&Load {
        cooperative: false,
        graceful_timeout: "1s",
        expected_exit: 0,
        unprivileged: false,
        python: Some("etl_cancel:slow_stream_async"),
        streams: true,
    });
}

// ---------------------------------------------------------------------------
// Plugin faults
// ---------------------------------------------------------------------------

mod faults {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Duration;

    use serde_json::json;

    use super::support::{fixture, Server};

    #[test]
    fn a_crashing_plugin_ends_the_process_visibly() {
        for (mode, signal, name) in [("segfault", 11, "SIGSEGV"), ("abort", 6, "SIGABRT")] {
            let mut s = Server::start(&fixture(None), &[]);
            let raw = super::support::invoke_request(&format!(r#"{{"mode":"{mode}"}}"#));
            let answer =
                std::panic::catch_unwind(|| super::support::request(s.addr, raw.as_bytes()));
            assert!(
                answer.is_err(),
                "{mode}: no answer can be sent from a crashed process"
            );
            let status = s
                .wait_exit(Duration::from_secs(10))
                .expect("the process is gone");
            assert_eq!(
                status.signal(),
                Some(signal),
                "{mode}: dies of its own signal"
            );
            assert!(
                s.wait_for_log(
                    &format!("etl-serve: fatal signal {name}"),
                    Duration::from_secs(2)
                ),
                "{mode}: {}",
                s.logs()
            );
        }
    }

    #[test]
    fn a_huge_output_is_delivered_whole() {
        let s = Server::start(&fixture(None), &[]);
        let r = s.post_json("/invoke", r#"{"mode":"huge"}"#);
        assert_eq!(r.status, 200);
        let e = r.json();
        assert_eq!(e["status_code"], 200);
        assert_eq!(
            e["output"]["blob"].as_str().unwrap().len(),
            100 * 1024 * 1024
        );
        assert_eq!(s.get("/healthz").status, 200);
    }

    #[test]
    fn output_that_breaks_the_outputs_schema_is_passed_through() {
        // Documented choice: the host checks that output is JSON, not that
        // it matches the plugin's own schema (that would cost every request;
        // a plugin's own tests are the place for it).
        let s = Server::start(&fixture(None), &[]);
        let e = s.post_json("/invoke", r#"{"mode":"off_schema"}"#).json();
        assert_eq!(
            (e["status_code"].clone(), e["output"].clone()),
            (json!(200), json!([1, 2, 3]))
        );
    }
}

// ---------------------------------------------------------------------------
// Bad input over HTTP
// ---------------------------------------------------------------------------

mod bad_input {
    use std::io::{BufReader, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use serde_json::json;

    use super::support::{invoke_request, plugin, read_head, read_response, request, Server};

    #[test]
    fn garbage_request_lines_get_400_and_the_server_keeps_serving() {
        // hyper's 400, with no body (docs/operations.md, "Where etl-serve
        // answers differently": a head that does not parse).
        let s = Server::start(&plugin("wordcount"), &[]);
        for garbage in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"POST /invoke HTTP/9.9\r\n\r\n",
            b"GET /id HTTP/2.0\r\nHost: a\r\n\r\n",
            b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
            b"GET /schema HTTP/1.1\r\nBad Header Without Colon\r\n\r\n",
            b"GET /id HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
            b"GET /id HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
            b"POST /invoke HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n{",
            b"POST /invoke HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
        ] {
            let r = request(s.addr, garbage);
            let what = String::from_utf8_lossy(garbage);
            assert_eq!((r.status, r.body.len()), (400, 0), "{what}");
            assert_eq!(r.header("content-length"), Some("0"), "{what}");
        }
        assert_eq!(s.get("/healthz").status, 200);
    }

    #[test]
    fn framing_http_1_1_forbids_is_refused() {
        let s = Server::start(&plugin("wordcount"), &[]);
        let host = "an HTTP/1.1 request must carry exactly one Host header";
        let coding = "only the chunked transfer coding is supported";
        for (raw, status, detail) in [
            (&b"GET /id HTTP/1.1\r\nConnection: close\r\n\r\n"[..], 400, host),
            (
                b"GET /id HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
                400,
                host,
            ),
            (
                b"POST /invoke HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                501,
                coding,
            ),
        ] {
            let r = request(s.addr, raw);
            assert_eq!(r.status, status, "{}", String::from_utf8_lossy(raw));
            assert_eq!(r.json()["detail"], detail);
            assert_eq!(r.header("connection"), Some("close"));
        }
        // HTTP/1.0 needs no Host; a plain chunked body is fine.
        assert_eq!(request(s.addr, b"GET /id HTTP/1.0\r\n\r\n").status, 200);
        let chunked = b"POST /invoke HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\nc\r\n{\"text\":\"a\"}\r\n0\r\n\r\n";
        assert_eq!(request(s.addr, chunked).status, 200);
    }

    /// Everything the server sends on a new connection for `raw`, until it
    /// closes.
    fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        c.write_all(raw).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).expect("a close, not a reset");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn framing_http_allows_and_the_reference_refuses_is_served() {
        // The differences from etl-uvicorn in docs/operations.md.
        let s = Server::start(&plugin("wordcount"), &[]);
        let id = r#""995355281551620c1e2a7cab3da49c91""#;
        // Content-Length beside Transfer-Encoding: the body is read by the
        // chunks, and the connection closes after the answer (RFC 9112,
        // section 6.3), so the request behind it is not read.
        let both = "POST /invoke HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"text\":\"a\"}\r\n0\r\n\r\nGET /id HTTP/1.1\r\nHost: a\r\n\r\n";
        let answer = exchange(s.addr, both.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
        // An HTTP/1.0 request is answered in HTTP/1.0, and may keep its
        // connection when it asks to.
        let answer = exchange(
            s.addr,
            b"GET /id HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /id HTTP/1.0\r\n\r\n",
        );
        assert_eq!(answer.matches("HTTP/1.0 200 OK\r\n").count(), 2, "{answer}");
        assert!(answer.ends_with(id), "{answer}");
        // Bare LF line ends (RFC 9112, section 2.2).
        let answer = exchange(s.addr, b"GET /id HTTP/1.1\nHost: a\nConnection: close\n\n");
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with(id),
            "{answer}"
        );
        // HTTP/2 with prior knowledge: closed without an answer.
        let answer = exchange(s.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(answer, "");
        // A request line without a version (HTTP/0.9): 400.
        let answer = exchange(s.addr, b"GET /id\r\n\r\n");
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert_eq!(s.get("/healthz").status, 200);
    }

    #[test]
    fn heads_the_reference_parses_otherwise_get_what_the_docs_say() {
        // The rows on request heads in docs/operations.md, "Where etl-serve
        // answers differently".
        let s = Server::start(&plugin("wordcount"), &[]);
        let with_fields = |n: usize| {
            let extra: String = (2..n).map(|i| format!("X-{i}: v\r\n")).collect();
            format!("GET /id HTTP/1.1\r\nHost: a\r\n{extra}Connection: close\r\n\r\n")
        };
        assert_eq!(request(s.addr, with_fields(100).as_bytes()).status, 200);
        assert_eq!(request(s.addr, with_fields(101).as_bytes()).status, 431);
        // The default --max-header-size, 64 KiB: a head just under it is
        // served, one over it is 431, a request line that long alone 414.
        let with_header = |n: usize| {
            let big = "x".repeat(n);
            format!("GET /id HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
        };
        assert_eq!(
            request(s.addr, with_header(63 * 1024).as_bytes()).status,
            200
        );
        assert_eq!(
            request(s.addr, with_header(65 * 1024).as_bytes()).status,
            431
        );
        let line = format!(
            "GET /id?{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "x".repeat(64 * 1024)
        );
        assert_eq!(request(s.addr, line.as_bytes()).status, 414);
        // A method is a case-sensitive token: one the route does not take.
        for method in ["FOO", "get"] {
            let raw = format!("{method} /id HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let r = request(s.addr, raw.as_bytes());
            assert_eq!(
                (r.status, r.header("allow")),
                (405, Some("GET")),
                "{method}"
            );
        }
        // A tunnel request names no route.
        let connect = request(s.addr, b"CONNECT a:80 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            (connect.status, connect.json()),
            (404, json!({"detail": "Not Found"}))
        );
        // The same Content-Length twice is one.
        let body = r#"{"text":"a"}"#;
        let twice = format!("POST /invoke HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 12\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{body}");
        assert_eq!(request(s.addr, twice.as_bytes()).status, 200);
        // A chunked body whose framing breaks (a size that is not hex, or
        // one too large): a 400 that says so, and that the connection ends.
        for size in ["zz", "fffffffffffffffffff"] {
            let broken = format!("POST /invoke HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\n");
            let r = request(s.addr, broken.as_bytes());
            assert_eq!(
                (r.status, r.header("connection")),
                (400, Some("close")),
                "{size}"
            );
            assert_eq!(
                r.json(),
                json!({"detail": "cannot read the request body: error reading a body from connection"}),
                "{size}"
            );
        }
        assert_eq!(s.get("/healthz").status, 200);
    }

    #[test]
    fn a_body_of_exactly_max_body_size_is_served_and_one_byte_more_is_not() {
        let s = Server::start(&plugin("wordcount"), &["--max-body-size", "1KiB"]);
        // {"text":"aaa…"} of `len` bytes.
        let body = |len: usize| format!(r#"{{"text":"{}"}}"#, "a".repeat(len - 11));
        let sized = |len: usize| {
            let body = body(len);
            format!(
                "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let chunked = |len: usize| {
            let body = body(len);
            format!(
                "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
        };
        for (framing, raw) in [
            ("Content-Length", &sized as &dyn Fn(usize) -> String),
            ("chunked", &chunked),
        ] {
            let r = request(s.addr, raw(1024).as_bytes());
            assert_eq!(r.status, 200, "{framing}: {}", r.text());
            assert_eq!(r.json()["output"]["chars"], 1024 - 11, "{framing}");
            let r = request(s.addr, raw(1025).as_bytes());
            assert_eq!(r.status, 413, "{framing}: {}", r.text());
        }
    }

    #[test]
    fn expect_100_continue_is_answered_as_the_docs_say() {
        // The `Expect: 100-continue` rows of docs/operations.md. curl asks
        // for it before a large body, and ETL documents are large.
        let s = Server::start(&plugin("wordcount"), &["--max-body-size", "1KiB"]);
        let body = r#"{"text":"hello big world"}"#;
        let head = |version: &str, length: usize| {
            format!("POST /invoke {version}\r\nHost: a\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {length}\r\n\r\n")
        };
        let connect = || {
            let c = TcpStream::connect(s.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let r = BufReader::new(c.try_clone().unwrap());
            (c, r)
        };
        // HTTP/1.1: `100 Continue` to the head alone (the body is not sent
        // until it comes), then the answer.
        let (mut c, mut r) = connect();
        c.write_all(head("HTTP/1.1", body.len()).as_bytes())
            .unwrap();
        assert_eq!(read_head(&mut r).unwrap().0, 100);
        c.write_all(body.as_bytes()).unwrap();
        let answer = read_response(&mut r).unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["output"], json!({"words": 3, "chars": 15}));
        // Over --max-body-size: the 413 in place of `100 Continue`, so the
        // client need not send the body at all.
        let (mut c, mut r) = connect();
        c.write_all(head("HTTP/1.1", 2048).as_bytes()).unwrap();
        let refused = read_response(&mut r).unwrap();
        assert_eq!(
            (refused.status, refused.header("connection")),
            (413, Some("close"))
        );
        // A timeout header that is not whole milliseconds: the 400 in place
        // of `100 Continue` too.
        let (mut c, mut r) = connect();
        let bad_timeout =
            head("HTTP/1.1", body.len()).replace("\r\n\r\n", "\r\nX-ETL-Timeout-Ms: 1.5\r\n\r\n");
        c.write_all(bad_timeout.as_bytes()).unwrap();
        let refused = read_response(&mut r).unwrap();
        assert_eq!(
            (refused.status, refused.header("connection")),
            (400, Some("close"))
        );
        assert_eq!(
            refused.json()["detail"],
            "Invalid x-etl-timeout-ms header: expected a whole number of milliseconds"
        );
        // HTTP/1.0: the expectation is ignored (RFC 9110, section 10.1.1),
        // so the first answer to head and body is the final one.
        let (mut c, mut r) = connect();
        c.write_all(format!("{}{body}", head("HTTP/1.0", body.len())).as_bytes())
            .unwrap();
        assert_eq!(read_head(&mut r).unwrap().0, 200);
    }

    #[test]
    fn huge_numbers_and_deep_nesting_are_clean_rejections() {
        let s = Server::start(&plugin("wordcount"), &[]);
        // Beyond f64: not a number JSON can carry here.
        let r = s.post_json("/invoke", r#"{"text":"a","repeat":1e400}"#);
        assert_eq!(
            (r.status, r.json()["reason"].clone()),
            (422, json!("malformed_envelope"))
        );
        // Beyond 64 bits: handed to the plugin exactly, which cannot hold
        // it in an i64: its own clean failure inside the envelope.
        let r = s.post_json(
            "/invoke",
            r#"{"text":"a","repeat":99999999999999999999999}"#,
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status_code"], 422);
        // The C wordcount refuses it too, rather than wrap around.
        let c = Server::start(&plugin("wordcount_c"), &[]);
        let r = c.post_json(
            "/invoke",
            r#"{"text":"a","repeat":1000000000000000000000000000000}"#,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["status_code_text"],
            "[InputError] a number in the request does not fit in 64 bits"
        );
        // 100 000 levels of nesting: past the 1000 the parser takes, the
        // reference's 400, and no stack overflow.
        let deep = format!(r#"{{"text":{}}}"#, "[".repeat(100_000));
        let r = s.post_json("/invoke", &deep);
        assert_eq!(
            (r.status, r.json()),
            (
                400,
                json!({"detail": "There was an error parsing the body"})
            )
        );
        assert_eq!(s.get("/healthz").status, 200);
    }

    #[test]
    fn a_flood_beyond_the_concurrency_limit_gets_200s_and_503s_only() {
        let s = Server::start(&plugin("slow"), &["--limit-concurrency", "4"]);
        let body = r#"{"units":20,"unit_ms":10}"#;
        let calls: Vec<_> = (0..32)
            .map(|_| s.send_in_background(invoke_request(body)))
            .collect();
        let (mut ok, mut refused) = (0, 0);
        for call in calls {
            let (r, _) = call.join().unwrap();
            match r.status {
                200 => ok += 1,
                503 => {
                    assert!(r.json()["detail"]
                        .as_str()
                        .unwrap()
                        .starts_with("too many invocations in flight"));
                    refused += 1;
                }
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
        assert!(ok >= 4 && refused > 0, "ok={ok} refused={refused}");
        assert_eq!(s.get("/healthz").status, 200);
        // Room again once every call has let go of its place.
        s.wait_in_flight(0);
        assert_eq!(s.post_json("/invoke", r#"{"units":1}"#).status, 200);
    }
}
