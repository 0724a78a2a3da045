//! Operating etl-serve: configuration names and precedence, the limits that
//! protect the process, logs, metrics, the check mode and the Unix socket.

use crate::support;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;
use serde_json::Value;
use support::{fixture, invoke_request, plugin, read_response, Server};

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs etl-serve with `args` and `env` (no --host/--port added), waits
/// until `addr` answers /healthz, and returns the server.
fn start_at(
    addr: SocketAddr,
    args: &[&str],
    env: &[(&str, &str)],
) -> (support::Spawned, SocketAddr) {
    let mut cmd = support::etl_serve();
    cmd.args(args).envs(env.iter().copied());
    let spawned = support::Spawned::new(cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr}: {}",
            spawned.logs()
        );
        assert!(spawned.running(), "etl-serve exited: {}", spawned.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    (spawned, addr)
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name_and_labels} in:\n{text}"))
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[test]
fn uvicorn_host_and_port_are_read_and_the_flag_wins() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let wc = plugin("wordcount");
    let (s, addr) = start_at(
        addr,
        &["--plugin", wc.to_str().unwrap()],
        &[
            ("UVICORN_HOST", "127.0.0.1"),
            ("UVICORN_PORT", &port.to_string()),
        ],
    );
    assert_eq!(
        support::request(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .status,
        200
    );
    drop(s);

    // The flag wins: the variable names a port that is in use.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_s, _) = start_at(
        addr,
        &[
            "--plugin",
            wc.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
        &[("UVICORN_PORT", &taken_port)],
    );
}

#[test]
fn a_host_name_and_empty_variables_work_as_with_uvicorn() {
    // Pod specs written for etl-uvicorn: `localhost` resolves, and empty
    // variables are ignored rather than refused.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let wc = plugin("wordcount");
    let (s, addr) = start_at(
        addr,
        &[
            "--plugin",
            wc.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
        &[
            ("UVICORN_HOST", "localhost"),
            ("UVICORN_LIMIT_CONCURRENCY", ""),
            ("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", ""),
            ("UVICORN_TIMEOUT_KEEP_ALIVE", ""),
        ],
    );
    let r = support::request(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    // The defaults hold: 30 s of graceful timeout.
    assert!(
        s.wait_for_log("graceful_timeout=30s", Duration::from_secs(10)),
        "{}",
        s.logs()
    );
}

#[test]
fn variables_etl_serve_does_not_read_are_named_and_tls_is_refused() {
    // A pod spec written for etl-uvicorn may set any of uvicorn's
    // variables. Each one nothing here reads is named in a warning; the
    // Python bridge's (UVICORN_METHOD_NAME) and empty ones are not.
    let s = Server::start_with(
        &plugin("wordcount"),
        &[],
        &[
            ("UVICORN_WORKERS", "4"),
            ("UVICORN_ROOT_PATH", "/api"),
            ("FORWARDED_ALLOW_IPS", "10.0.0.0/8"),
            ("UVICORN_METHOD_NAME", "run"),
            ("UVICORN_PROXY_HEADERS", ""),
            ("UVICORN_BACKLOG", "64"),
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ],
    )
    .unwrap();
    assert_eq!(s.get("/healthz").status, 200);
    let unread = |name: &str| format!("{name} is set, and etl-serve does not read it");
    for name in ["UVICORN_ROOT_PATH", "UVICORN_WORKERS"] {
        assert!(
            s.wait_for_log(&unread(name), Duration::from_secs(10)),
            "{}",
            s.logs()
        );
    }
    // etl-uvicorn would export traces over OTLP; etl-serve says it will not.
    assert!(
        s.wait_for_log(
            "OTEL_TRACES_EXPORTER=otlp is set, and etl-serve exports nothing over OpenTelemetry",
            Duration::from_secs(10)
        ),
        "{}",
        s.logs()
    );
    let logs = s.logs();
    assert!(!logs.contains("OTEL_METRICS_EXPORTER="), "{logs}");
    for name in [
        "FORWARDED_ALLOW_IPS",
        "UVICORN_METHOD_NAME",
        "UVICORN_PROXY_HEADERS",
        "UVICORN_BACKLOG",
    ] {
        assert!(!logs.contains(&unread(name)), "{name}: {logs}");
    }

    // Serving plain HTTP where TLS was configured would send in the clear
    // what was meant to be encrypted: refused, in one line.
    for var in ["UVICORN_SSL_CERTFILE", "UVICORN_SSL_KEYFILE"] {
        let out = support::etl_serve()
            .args(["--plugin", plugin("wordcount").to_str().unwrap()])
            .env(var, "/etc/tls/server.pem")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            format!("etl-serve: error: {var} is set, but etl-serve serves plain HTTP only: terminate TLS in front of it (an ingress or a sidecar) and unset the variable"),
            "{err}"
        );
        assert!(!err.contains("listening"), "{err}");
    }
}

#[test]
fn every_bad_value_is_one_line_naming_the_flag_or_variable() {
    // (flags, environment, what the error line must name)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--port", "http"], &[], "'--port <PORT>'"),
        (
            &[],
            &[("UVICORN_PORT", "http")],
            "UVICORN_PORT (the variable for --port)",
        ),
        (
            &[],
            &[("UVICORN_HOST", "localhost:80")],
            "UVICORN_HOST (the variable for --host)",
        ),
        (
            &[],
            &[("UVICORN_LOG_LEVEL", "loud")],
            "UVICORN_LOG_LEVEL (the variable for --log-level)",
        ),
        (
            &[],
            &[("UVICORN_TIMEOUT_KEEP_ALIVE", "ever")],
            "UVICORN_TIMEOUT_KEEP_ALIVE (the variable for --timeout-keep-alive)",
        ),
        (
            &[],
            &[("UVICORN_LIMIT_CONCURRENCY", "0")],
            "UVICORN_LIMIT_CONCURRENCY (the variable for --limit-concurrency)",
        ),
        (
            &[],
            &[("UVICORN_ACCESS_LOG", "maybe")],
            "UVICORN_ACCESS_LOG (the variable for --access-log)",
        ),
        (
            &[],
            &[("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", "x")],
            "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN (the variable for --graceful-timeout)",
        ),
        (
            &[],
            &[("ETL_SERVE_LOG_FORMAT", "xml")],
            "ETL_SERVE_LOG_FORMAT (the variable for --log-format)",
        ),
        (
            &[],
            &[("ETL_SERVE_MAX_HEADER_SIZE", "big")],
            "ETL_SERVE_MAX_HEADER_SIZE (the variable for --max-header-size)",
        ),
        (
            &[],
            &[("ETL_SERVE_HEADER_READ_TIMEOUT", "?")],
            "ETL_SERVE_HEADER_READ_TIMEOUT (the variable for --header-read-timeout)",
        ),
        (&["--limit-concurrency=-1"], &[], "--limit-concurrency"),
        (
            &["--log-format", "yaml"],
            &[],
            "'--log-format <LOG_FORMAT>'",
        ),
    ];
    for (args, env, names) in cases {
        let out = support::etl_serve()
            .args(["--plugin", "x.so"])
            .args(*args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.lines().count(),
            1,
            "one line for {args:?} {env:?}: {err}"
        );
        assert!(err.starts_with("etl-serve: error: invalid value"), "{err}");
        assert!(
            err.contains(names),
            "{args:?} {env:?} should name {names}: {err}"
        );
    }
}

#[test]
fn help_groups_the_flags_and_shows_each_variable_and_default() {
    let out = support::etl_serve().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // Collapsed whitespace: clap wraps long lines.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for heading in ["Plugin:", "Network:", "Limits:", "Shutdown:", "Logging:"] {
        assert!(help.contains(heading), "missing {heading}: {help}");
    }
    for var in [
        "ETL_SERVE_PLUGIN=",
        "UVICORN_HOST=",
        "UVICORN_PORT=",
        "UVICORN_UDS=",
        "UVICORN_LOG_LEVEL=",
        "UVICORN_TIMEOUT_KEEP_ALIVE=",
        "UVICORN_LIMIT_CONCURRENCY=",
        "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=",
        "UVICORN_ACCESS_LOG=",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "missing {var}: {help}"
        );
    }
    assert!(
        help.contains("[default: 127.0.0.1]") && help.contains("[default: 8000]"),
        "{help}"
    );

    let out = support::etl_serve().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("etl-serve {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_log_level_comes_from_the_flag_or_uvicorn_log_level() {
    let wc = plugin("wordcount");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut s, _) = start_at(
        addr,
        &[
            "--plugin",
            wc.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
        &[("UVICORN_LOG_LEVEL", "warning")],
    );
    support::request(addr, invoke_request(r#"{"text":"a"}"#).as_bytes());
    // Every line it would log is in once its stderr has ended.
    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    assert!(
        !s.logs().contains("INFO"),
        "warning hides info lines: {}",
        s.logs()
    );

    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (s, _) = start_at(
        addr,
        &[
            "--plugin",
            wc.to_str().unwrap(),
            "--port",
            &port.to_string(),
            "--log-level",
            "info",
        ],
        &[("UVICORN_LOG_LEVEL", "critical")],
    );
    assert!(
        s.wait_for_log("listening on", Duration::from_secs(5)),
        "the flag wins: {}",
        s.logs()
    );
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

#[test]
fn past_the_concurrency_limit_invocations_get_503_at_once() {
    let s =
        Server::start_with(&plugin("slow"), &[], &[("UVICORN_LIMIT_CONCURRENCY", "1")]).unwrap();
    // Long enough to hold the one place through every check below (it is
    // checked to be still in flight after them).
    let long = s.send_in_background(invoke_request(r#"{"units":30,"unit_ms":100}"#));
    s.wait_in_flight(1);
    let t = Instant::now();
    let r = s.post_json("/invoke", r#"{"units":1}"#);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refused at once, not queued"
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.json()["detail"],
        "too many invocations in flight (--limit-concurrency 1); retry later"
    );
    assert!(
        r.json().get("plugin_error").is_none(),
        "not a shutdown-abort"
    );
    // A client that waits for `100 Continue` gets the same 503 in its
    // place, before it sends the body.
    assert_eq!(
        support::refused_before_continue(s.addr),
        "too many invocations in flight (--limit-concurrency 1); retry later"
    );
    // Unlike uvicorn's limit (docs/operations.md), open connections and
    // the other routes do not count: at the limit, with one more
    // connection open and idle, a controller still reads /schema.
    let mut idle = s.connect();
    assert_eq!(idle.send("GET", "/id", None).unwrap().status, 200);
    assert_eq!(s.get("/schema").status, 200);
    let m = s.get("/metrics").text();
    assert_eq!(
        metric(&m, "etl_serve_invocations_in_flight"),
        1.0,
        "the limit was reached all along"
    );
    assert_eq!(long.join().unwrap().0.status, 200);
    // Once the first is done there is room again.
    assert_eq!(s.post_json("/invoke", r#"{"units":1}"#).status, 200);
    let m = s.get("/metrics").text();
    // The two refused above.
    assert_eq!(metric(&m, "etl_serve_concurrency_rejections_total"), 2.0);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let s = Server::start(&plugin("wordcount"), &["--timeout-keep-alive", "1"]);
    let mut conn = s.connect();
    assert_eq!(conn.send("GET", "/healthz", None).unwrap().status, 200);
    let idle = Instant::now();
    assert!(conn.closed_by_server());
    let waited = idle.elapsed();
    // Counted from the answer: not from the next time the server happens
    // to look (which once made it up to twice the timeout).
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(1800),
        "{waited:?}"
    );

    // A connection that keeps sending requests stays open.
    let mut busy = s.connect();
    for _ in 0..4 {
        assert_eq!(busy.send("GET", "/healthz", None).unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(400));
    }
}

#[test]
fn a_request_that_outlasts_the_keep_alive_timeout_is_served_whole() {
    // The timeouts bound the wait for a request head, never the serving of
    // a request: a 2.5 s call, and a 2.5 s stream, on 1 s timeouts.
    let args = ["--timeout-keep-alive", "1", "--header-read-timeout", "1s"];
    let s = Server::start(&plugin("slow"), &args);
    let mut conn = s.connect();
    let r = conn
        .send("POST", "/invoke", Some(r#"{"units":25,"unit_ms":100}"#))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status_code"], 200);
    // The same connection serves the next request.
    assert_eq!(conn.send("GET", "/healthz", None).unwrap().status, 200);

    let t = Server::start(&plugin("ticker"), &args);
    let mut conn = t.connect();
    let r = conn
        .send("POST", "/invoke", Some(r#"{"count":25,"interval_ms":100}"#))
        .unwrap();
    assert_eq!(r.status, 200);
    let lines = r.lines();
    assert_eq!(lines.len(), 25, "{}", r.text());
    assert!(lines.iter().all(|l| l["status_code"] == 200));
    assert_eq!(conn.send("GET", "/healthz", None).unwrap().status, 200);
}

#[test]
fn a_response_that_a_client_reads_slowly_is_not_cut_off() {
    // 100 MB, more than the socket buffers hold: the server is still
    // writing the response when the 1 s timeouts pass, which must not
    // count as waiting for a request head.
    let args = ["--timeout-keep-alive", "1", "--header-read-timeout", "1s"];
    let s = Server::start(&fixture(None), &args);
    let mut conn = s.connect();
    let raw = invoke_request(r#"{"mode":"huge"}"#);
    conn.stream_mut().write_all(raw.as_bytes()).unwrap();
    // Read a little, so that the server goes on writing, then stall for
    // more than twice the timeout.
    let mut reader = BufReader::with_capacity(64 * 1024, conn.stream_mut().try_clone().unwrap());
    let mut first = [0u8; 64 * 1024];
    reader.read_exact(&mut first).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let r =
        read_response(&mut std::io::Read::chain(&first[..], reader)).expect("the whole response");
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 100 * 1024 * 1024, "{} bytes", r.body.len());
}

#[test]
fn a_slow_loris_client_is_cut_off_by_the_header_read_timeout() {
    let s = Server::start(
        &plugin("wordcount"),
        &["--header-read-timeout", "1s", "--timeout-keep-alive", "30"],
    );
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    stream
        .write_all(b"POST /invoke HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let started = Instant::now();
    let mut closed_after = None;
    for i in 0..100 {
        // One more header line every 100 ms: the head never completes.
        let wrote = stream.write_all(format!("X-Slow-{i}: x\r\n").as_bytes());
        let mut buf = [0u8; 256];
        let closed = match stream.read(&mut buf) {
            Ok(_) => true, // EOF, or an answer: either way the server is done
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        if closed || wrote.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the server never closed the slow connection");
    assert!(closed_after < Duration::from_secs(5), "{closed_after:?}");
    // Everyone else is still served.
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn a_request_head_over_the_limit_gets_431() {
    let s = Server::start(&plugin("wordcount"), &["--max-header-size", "8KiB"]);
    let big = "x".repeat(10 * 1024);
    let raw =
        format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    assert_eq!(support::request(s.addr, raw.as_bytes()).status, 431);
    let ok = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Small: {}\r\nConnection: close\r\n\r\n",
        &big[..4096]
    );
    assert_eq!(support::request(s.addr, ok.as_bytes()).status, 200);
}

/// A client that writes a whole request before it reads, as most do, gets
/// hyper's 400 or 431, or the server's 414, whole, however much of the
/// request the server never read: it reads and throws away the rest
/// instead of resetting the connection under the answer. (The Unix
/// socket: in `it_serves_on_a_unix_socket`.)
#[test]
fn a_refused_request_is_answered_however_much_of_it_follows() {
    let s = Server::start(&plugin("wordcount"), &["--max-header-size", "8KiB"]);
    for (head, status) in refused_heads() {
        let stream = TcpStream::connect(s.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        assert_answered_whole(stream, writer, head, status);
    }
    assert_eq!(s.get("/healthz").status, 200);
}

/// Request heads refused, with the status of their answer: one too large
/// (its last header goes on in the bytes that follow it, past any
/// `--max-header-size`), one malformed (both hyper's answers), and one
/// whose request line goes on in the bytes that follow (the server's 414).
fn refused_heads() -> [(String, u16); 3] {
    let too_large = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}",
        "x".repeat(9000)
    );
    let malformed = "GET /healthz HTTP/1.1\r\nHost t\r\n\r\n".to_owned();
    let endless_line = "GET /healthz?q=".to_owned();
    [(too_large, 431), (malformed, 400), (endless_line, 414)]
}

/// Writes `head` and 4 MiB more on `writer` (from a thread), and reads on
/// `reader`, the same connection, an answer of `status`, then the end of
/// the connection without a reset; the server must take every byte.
fn assert_answered_whole(
    reader: impl Read,
    mut writer: impl Write + Send + 'static,
    head: String,
    status: u16,
) {
    let wrote = std::thread::spawn(move || {
        writer.write_all(head.as_bytes())?;
        writer.write_all(&vec![b'x'; 4 << 20])
    });
    let mut reader = BufReader::new(reader);
    let r = read_response(&mut reader).expect("a whole answer");
    assert_eq!(r.status, status);
    support::assert_clean_close(&mut reader);
    wrote
        .join()
        .unwrap()
        .expect("the server took the whole request");
}

#[test]
fn a_request_line_over_the_head_limit_gets_414() {
    let s = Server::start(&plugin("wordcount"), &["--max-header-size", "8KiB"]);
    // A URI of 70 KB, as a client building a query string might send.
    let uri = format!("/schema?q={}", "x".repeat(70_000));
    let raw = format!("GET {uri} HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = support::request(s.addr, raw.as_bytes());
    assert_eq!(r.status, 414, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(
        r.json()["detail"],
        "URI Too Long: the request line is longer than the server's --max-header-size"
    );

    // The same line trickling in, a few bytes per write, on one connection.
    let mut c = s.connect();
    let head = format!("GET {} HTTP/1.1\r\nHost: t\r\n\r\n", &uri[..9_000]);
    for piece in head.as_bytes().chunks(1_500) {
        c.stream_mut().write_all(piece).unwrap();
    }
    let r = support::read_response(&mut BufReader::new(c.stream_mut())).unwrap();
    assert_eq!(r.status, 414);

    // A short line with too many header bytes is still the head's 431, and
    // a line just under the limit is served.
    let big = "x".repeat(9 * 1024);
    let raw = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
    assert_eq!(support::request(s.addr, raw.as_bytes()).status, 431);
    let raw = format!(
        "GET /healthz?q={} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "x".repeat(7 * 1024)
    );
    assert_eq!(support::request(s.addr, raw.as_bytes()).status, 200);
    assert!(s
        .get("/metrics")
        .text()
        .contains("etl_serve_requests_total{route=\"other\",status=\"414\"} 2"));
}

/// The request line is followed across the reads it arrives in: a long
/// one trickling in is refused once its pieces together reach the limit,
/// and a short one split between two reads is served. Over a Unix socket
/// the client's send queue holds what the server has not read yet, so
/// each piece is known to be read on its own before the next is sent.
#[test]
fn a_request_line_is_followed_across_the_reads_it_arrives_in() {
    let (_s, sock) =
        support::serve_wordcount_on_unix_socket("line", &["--max-header-size", "8KiB"]);
    // 9 KB in pieces of 1,500 bytes: the sixth piece reaches the limit.
    let long = format!(
        "GET /schema?q={} HTTP/1.1\r\nHost: t\r\n\r\n",
        "x".repeat(9_000)
    );
    // A line of about 1.5 KB, its end in the second piece.
    let short = format!(
        "GET /healthz?q={} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "x".repeat(1_500)
    );
    for (head, piece, status) in [(long, 1_500, 414), (short, 1_000, 200)] {
        let mut stream = UnixStream::connect(&sock).unwrap();
        for piece in head.as_bytes().chunks(piece) {
            stream.write_all(piece).unwrap();
            wait_until_read_by_peer(&stream);
        }
        let r = read_response(&mut BufReader::new(stream)).unwrap();
        assert_eq!(r.status, status, "{}", r.text());
    }
    let _ = std::fs::remove_file(&sock);
}

/// Waits until the peer of the Unix socket `stream` has read everything
/// sent on it: the bytes the kernel still queues for it (`TIOCOUTQ`).
fn wait_until_read_by_peer(stream: &UnixStream) {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut unread: nix::libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int; the stream holds the descriptor.
        let rc = unsafe { nix::libc::ioctl(stream.as_raw_fd(), nix::libc::TIOCOUTQ, &mut unread) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        if unread == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server left {unread} bytes unread"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------
// Metrics and logs
// ---------------------------------------------------------------------------

#[test]
fn metrics_count_a_known_sequence_of_requests() {
    let s = Server::start(&fixture(None), &[]);
    assert_eq!(s.post_json("/invoke", "{}").json()["status_code"], 200);
    assert_eq!(
        s.post_json("/invoke", r#"{"mode":"fail_status"}"#).json()["status_code"],
        418
    );
    assert_eq!(
        s.post_json("/invoke", r#"{"mode":"invalid_json"}"#).json()["status_code"],
        500
    );
    assert_eq!(s.post_json("/invoke", r#"{"mode":"shutdown"}"#).status, 503);
    assert_eq!(s.post_json("/invoke", "[1]").status, 422);
    assert_eq!(s.get("/schema").status, 200);
    assert_eq!(s.get("/nope").status, 404);

    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = r.text();
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_requests_total{route="invoke",status="200"}"#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_requests_total{route="invoke",status="503"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_requests_total{route="invoke",status="422"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_requests_total{route="schema",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_requests_total{route="other",status="404"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_invocation_duration_seconds_count{outcome="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_invocation_duration_seconds_count{outcome="failed"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_invocation_duration_seconds_count{outcome="shutdown"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&m, r#"etl_serve_plugin_failures_total{kind="error"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"etl_serve_plugin_failures_total{kind="contract_violation"}"#
        ),
        1.0
    );
    assert_eq!(metric(&m, "etl_serve_shutdown_aborts_total"), 1.0);
    assert_eq!(metric(&m, "etl_serve_client_disconnect_cancels_total"), 0.0);
    assert_eq!(metric(&m, "etl_serve_invocations_in_flight"), 0.0);
    let start = metric(&m, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(start <= now && start > now - 600.0, "{start} vs {now}");
    assert!(m.trim_end().ends_with("# EOF"));
}

#[test]
fn json_logs_are_one_object_per_line_with_an_access_line_per_request() {
    let s = Server::start(&plugin("wordcount"), &["--log-format", "json"]);
    let body = r#"{"text":"a"}"#;
    let raw = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Request-Id: req-42\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = support::request(s.addr, raw.as_bytes());
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("req-42"));
    assert!(s.wait_for_log("req-42", Duration::from_secs(5)));
    let lines: Vec<Value> = s
        .logs()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(
            l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(),
            "{l}"
        );
    }
    // Structured fields are JSON values, not Rust debug output.
    let loaded = lines
        .iter()
        .find(|l| l["message"] == "plugin loaded")
        .unwrap();
    assert_eq!(loaded["capabilities"], "usage");
    let access = lines.iter().find(|l| l["request_id"] == "req-42").unwrap();
    assert_eq!(access["method"], "POST");
    assert_eq!(access["path"], "/invoke");
    assert_eq!(access["status"], 200);
    assert_eq!(access["bytes"], r.body.len());
    assert!(access["duration_ms"].as_f64().unwrap() >= 0.0);
    let client = access["client"].as_str().unwrap();
    assert!(client.starts_with("127.0.0.1:"), "{access}");
    // Request bodies never appear in the logs.
    assert!(!s.logs().contains(r#"\"text\""#) && !s.logs().contains(r#"{"text":"a"}"#));
}

#[test]
fn the_access_log_can_be_turned_off() {
    let on = Server::start(&plugin("ticker"), &[]);
    let r = on.post_json("/invoke", r#"{"count":3,"interval_ms":0}"#);
    let generated = r.header("x-request-id").unwrap().to_owned();
    assert!(
        on.wait_for_log("POST /invoke 200", Duration::from_secs(5)),
        "{}",
        on.logs()
    );
    // The message says method, path and status; the fields do not repeat
    // them. A stream's line is written when it ends, with every byte it
    // sent.
    assert!(
        on.logs().contains("POST /invoke 200 duration_ms="),
        "{}",
        on.logs()
    );
    assert!(
        on.logs().contains(&format!("bytes={}", r.body.len())),
        "{}",
        on.logs()
    );
    assert!(
        on.logs().contains(&format!("request_id=\"{generated}\""))
            || on.logs().contains(&generated)
    );

    for (args, env) in [
        (vec!["--no-access-log"], vec![]),
        (vec![], vec![("UVICORN_ACCESS_LOG", "false")]),
        (
            vec!["--access-log=false"],
            vec![("UVICORN_ACCESS_LOG", "true")],
        ),
    ] {
        let mut off = Server::start_with(&plugin("wordcount"), &args, &env).unwrap();
        assert_eq!(off.post_json("/invoke", r#"{"text":"a"}"#).status, 200);
        // Every line it would log is in once its stderr has ended.
        off.signal(SIGTERM);
        assert!(off.wait_exit(Duration::from_secs(10)).is_some());
        assert!(
            !off.logs().contains("POST /invoke"),
            "{args:?} {env:?}: {}",
            off.logs()
        );
    }
    // The flag wins over the variable.
    let flag = Server::start_with(
        &plugin("wordcount"),
        &["--access-log"],
        &[("UVICORN_ACCESS_LOG", "0")],
    )
    .unwrap();
    assert_eq!(flag.post_json("/invoke", r#"{"text":"a"}"#).status, 200);
    assert!(flag.wait_for_log("POST /invoke 200", Duration::from_secs(5)));
}

// ---------------------------------------------------------------------------
// Check mode and the Unix socket
// ---------------------------------------------------------------------------

#[test]
fn check_mode_reports_a_plugin_without_serving_it() {
    let wc = plugin("wordcount");
    let out = support::etl_serve()
        .args(["--check", "--plugin"])
        .arg(&wc)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.starts_with("plugin:       wordcount 0.1.0\n"),
        "{report}"
    );
    for want in [
        "abi:          1.1 (this etl-serve speaks 1.1)",
        "streaming:    no",
        "capabilities: usage",
        // The SDK wordcount implements no Precheck.
        "precheck:     no",
        "id:           995355281551620c1e2a7cab3da49c91",
        "\"required\": [\n      \"text\"",
    ] {
        assert!(report.contains(want), "missing {want:?} in:\n{report}");
    }
    assert!(!String::from_utf8_lossy(&out.stderr).contains("listening"));

    let out = support::etl_serve()
        .args(["--check", "--plugin"])
        .arg(fixture(Some("WRONG_ABI")))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("built for plugin ABI 99.0"));
}

#[test]
fn it_serves_on_a_unix_socket() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let sock = dir.join(format!("etl-serve-{}.sock", std::process::id()));
    // A stale socket from an earlier run is replaced, and its mode kept,
    // as uvicorn keeps it.
    let _ = std::fs::remove_file(&sock);
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o640)).unwrap();

    let mut cmd = support::etl_serve();
    cmd.arg("--plugin")
        .arg(plugin("wordcount"))
        .env("UVICORN_UDS", &sock);
    let mut s = support::Spawned::new(cmd);
    assert!(
        s.wait_for_log("listening on unix:", Duration::from_secs(30)),
        "{}",
        s.logs()
    );
    assert_eq!(socket_mode(&sock), 0o640);
    // Without a Host header, a redirect's location is the path alone: a
    // Unix socket has no address to name. (etl-uvicorn names its path and
    // a port of None, `http:///path.sock:None/id?x=1`, which no client can
    // follow; docs/operations.md lists the difference.)
    let mut stream = UnixStream::connect(&sock).unwrap();
    stream.write_all(b"GET /id/?x=1 HTTP/1.0\r\n\r\n").unwrap();
    let r = read_response(&mut BufReader::new(stream)).unwrap();
    assert_eq!((r.status, r.header("location")), (307, Some("/id?x=1")));
    let mut stream = UnixStream::connect(&sock).unwrap();
    stream
        .write_all(invoke_request(r#"{"text":"over a unix socket"}"#).as_bytes())
        .unwrap();
    let r = read_response(&mut BufReader::new(stream)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["output"]["words"], 4);
    // A Unix socket's peer has no address: the access line names none.
    assert!(
        s.wait_for_log("POST /invoke 200", Duration::from_secs(10)),
        "{}",
        s.logs()
    );
    let logs = s.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("POST /invoke 200"))
        .unwrap();
    assert!(!line.contains("client="), "{line}");
    for (head, status) in refused_heads() {
        let stream = UnixStream::connect(&sock).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        assert_answered_whole(stream, writer, head, status);
    }

    // A second instance on the same path refuses to take the live socket.
    let out = support::etl_serve()
        .arg("--plugin")
        .arg(plugin("wordcount"))
        .arg("--uds")
        .arg(&sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "--uds {}: another process is listening on this socket; refusing to replace it",
            sock.display()
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(UnixStream::connect(&sock).is_ok(), "the first still serves");

    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10))
            .and_then(|st| st.code()),
        Some(0)
    );
    assert!(!sock.exists(), "the socket file is removed at exit");

    // A new socket may be reached by any user, as uvicorn's (0o666), so
    // that a sidecar running as another user can connect.
    let mut cmd = support::etl_serve();
    cmd.arg("--plugin")
        .arg(plugin("wordcount"))
        .arg("--uds")
        .arg(&sock);
    let mut s = support::Spawned::new(cmd);
    assert!(
        s.wait_for_log("listening on unix:", Duration::from_secs(30)),
        "{}",
        s.logs()
    );
    assert_eq!(socket_mode(&sock), 0o666);
    s.signal(SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());

    // A path that is not a socket is never replaced.
    let file = dir.join(format!("etl-serve-{}.notasocket", std::process::id()));
    std::fs::write(&file, "precious").unwrap();
    let out = support::etl_serve()
        .arg("--plugin")
        .arg(plugin("wordcount"))
        .arg("--uds")
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a socket; refusing to replace it")
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

/// The permission bits of the socket file at `path`.
fn socket_mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_header_size_too_small_for_any_request_is_refused() {
    let out = support::etl_serve()
        .arg("--plugin")
        .arg(plugin("wordcount"))
        .args(["--max-header-size", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "etl-serve: error: --max-header-size 1 is too small to carry a request head; use at least 1024 bytes (the default is 64KiB)"
    );
}

/// The CPU time process `pid` has used, in clock ticks (`utime` plus
/// `stime` of /proc/PID/stat: fields 14 and 15 of proc(5), counted from
/// the state, field 3, which follows the name in parentheses).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, from_state) = stat.rsplit_once(") ").unwrap();
    let fields: Vec<&str> = from_state.split(' ').collect();
    fields[14 - 3].parse::<u64>().unwrap() + fields[15 - 3].parse::<u64>().unwrap()
}

#[test]
fn an_idle_server_uses_no_cpu_after_inline_calls() {
    // Inline calls wake the watchdog thread, which looks at them every
    // 10 ms while they run and must sleep again once none does: an idle
    // pod should cost nothing. The window is what is measured here, not a
    // wait for an event.
    let s = Server::start(&plugin("slow"), &[]);
    support::warm_up_inline(&s);
    let before = cpu_ticks(s.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(s.pid()) - before;
    // Clock ticks are 10 ms: a thread that spins would take most of 200.
    assert!(used < 20, "{used} ticks of CPU in 2 s without a request");
}

/// How many of `n` connects complete within moments while etl-serve is
/// stopped (SIGSTOP), so that only the kernel's accept queue takes them.
fn connects_taken_while_stopped(s: &Server, n: usize) -> usize {
    s.signal(nix::sys::signal::Signal::SIGSTOP);
    // Stopping reaches each thread on its way back to user space: wait
    // until every one of them is stopped.
    let tasks = format!("/proc/{}/task", s.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(&tasks).unwrap().all(|t| {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
        // The state follows the command name in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    }) {
        assert!(Instant::now() < deadline, "etl-serve did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut taken = Vec::new();
    for _ in 0..n {
        // Loopback: a handshake the queue has room for completes at once;
        // a SYN the full queue drops would only be retried after a second.
        if let Ok(c) = TcpStream::connect_timeout(&s.addr, Duration::from_millis(200)) {
            taken.push(c);
        }
    }
    s.signal(nix::sys::signal::Signal::SIGCONT);
    taken.len()
}

#[test]
fn the_listen_backlog_is_uvicorns_and_can_be_set() {
    // uvicorn's default is 2048: 300 connects are all queued.
    let s = Server::start(&plugin("wordcount"), &[]);
    assert_eq!(connects_taken_while_stopped(&s, 300), 300);
    assert_eq!(s.get("/healthz").status, 200);
    // --backlog 8 (UVICORN_BACKLOG): the kernel queues about 8.
    let s = Server::start_with(&plugin("wordcount"), &[], &[("UVICORN_BACKLOG", "8")]).unwrap();
    let taken = connects_taken_while_stopped(&s, 20);
    assert!((8..=10).contains(&taken), "{taken} queued");
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn an_address_in_use_after_the_plugin_loaded_shuts_the_plugin_down() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let marker = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bind-failed-hook-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let out = support::etl_serve()
        .arg("--plugin")
        .arg(fixture(None))
        .arg("--plugin-config")
        .arg(format!("marker:{}", marker.display()))
        .args(["--host", "127.0.0.1", "--port", &port])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing was served; the plugin's shutdown hook ran"),
        "{err}"
    );
    assert!(
        err.trim_end().ends_with(&format!(
            "etl-serve: error: cannot listen on 127.0.0.1:{port}: Address already in use (os error 98)"
        )),
        "{err}"
    );
    assert!(marker.exists(), "the hook ran");
}

/// Runs `etl-serve --probe` with `args` and `env`: its exit code and stderr.
fn probe(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = support::etl_serve()
        .arg("--probe")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn probe_mode_reports_readiness_for_a_healthcheck() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "30s"]);
    let port = s.addr.port().to_string();
    // Ready: the same settings the server runs with, flag or variable.
    assert_eq!(probe(&["--port", &port], &[]), (Some(0), String::new()));
    assert_eq!(
        probe(&[], &[("UVICORN_HOST", "0.0.0.0"), ("UVICORN_PORT", &port)]),
        (Some(0), String::new())
    );
    // Draining: not ready.
    let _call = s.send_in_background(invoke_request(r#"{"units":100000,"cooperative":false}"#));
    s.wait_in_flight(1);
    s.signal(SIGTERM);
    assert!(s.wait_for_log("draining", Duration::from_secs(10)));
    assert_eq!(
        probe(&["--port", &port], &[]),
        (
            Some(1),
            format!("etl-serve --probe: 127.0.0.1:{port} is not ready: /readyz answered 503\n")
        )
    );
    s.signal(SIGTERM);
    s.wait_exit(Duration::from_secs(10)).expect("exits");
    // Nothing listening.
    let (code, err) = probe(&["--port", &port], &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with(&format!("etl-serve --probe: cannot ask 127.0.0.1:{port}: ")),
        "{err}"
    );
}
