//! Nothing lost at the edges: a response still being written when SIGTERM
//! arrives, a body still arriving, a stream whose client stopped reading
//! (docs/shutdown.md, "Connections at shutdown"); a log pipe nobody reads.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;
use support::{fixture, invoke_request, plugin, Server};

/// Reads a response head; returns the status and the Content-Length.
fn read_head(r: &mut impl BufRead) -> (u16, Option<usize>) {
    let (status, headers) = support::read_head(r).unwrap();
    (
        status,
        headers.get("content-length").and_then(|l| l.parse().ok()),
    )
}

/// Reads until EOF, `chunk` bytes at a time with `pause` after each: a
/// slow client. Returns how many bytes came.
fn read_slowly(r: &mut impl Read, chunk: usize, pause: Duration) -> usize {
    let mut buf = vec![0u8; chunk];
    let mut total = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
        std::thread::sleep(pause);
    }
}

/// A 100 MB answer whose head has reached the client when SIGTERM comes.
pub(crate) fn huge_answer_started(s: &Server) -> (BufReader<TcpStream>, usize) {
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(invoke_request(r#"{"mode":"huge"}"#).as_bytes())
        .unwrap();
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let (status, length) = read_head(&mut reader);
    assert_eq!(status, 200);
    (reader, length.expect("a fixed-length answer"))
}

#[test]
fn a_response_being_written_at_sigterm_is_written_whole() {
    let mut s = Server::start(&fixture(None), &["--graceful-timeout", "30s"]);
    let (mut reader, length) = huge_answer_started(&s);
    let signalled = Instant::now();
    s.signal(SIGTERM);
    // At most 256 KiB every 5 ms, about 50 MB/s: two seconds or more for
    // the 100 MB, well past the one second idle connections get.
    let buffered = reader.buffer().len();
    reader.consume(buffered);
    let got = buffered + read_slowly(&mut reader, 256 << 10, Duration::from_millis(5));
    assert_eq!(got, length, "the whole answer arrived");
    assert!(
        signalled.elapsed() > Duration::from_secs(1),
        "the read was slow"
    );
    let status = s.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", s.logs());
}

#[test]
fn a_response_the_timeout_cuts_is_reported_in_the_exit_code_and_the_log() {
    let mut s = Server::start(&fixture(None), &["--graceful-timeout", "1s"]);
    let (mut reader, length) = huge_answer_started(&s);
    let signalled = Instant::now();
    s.signal(SIGTERM);
    // About 6 MB/s: the 100 MB would take 15 s.
    let buffered = reader.buffer().len();
    reader.consume(buffered);
    let got = buffered + read_slowly(&mut reader, 64 << 10, Duration::from_millis(10));
    assert!(got < length, "the answer was cut: {got} of {length}");
    let status = s.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(
        signalled.elapsed() < Duration::from_secs(1 + 5),
        "the cut came within the timeout plus 5 s: {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(75), "{}", s.logs());
    assert!(
        s.logs()
            .contains("1 connection still reading a request or writing a response cut"),
        "{}",
        s.logs()
    );
}

#[test]
fn a_body_still_arriving_at_sigterm_is_read_and_answered() {
    let mut s = Server::start(&plugin("wordcount"), &["--graceful-timeout", "30s"]);
    let text = "word ".repeat(100_000);
    let body = format!(r#"{{"text":"{text}"}}"#);
    let raw = invoke_request(&body).into_bytes();
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The head and a first part of the body, then SIGTERM, then the rest
    // at about 250 KB/s: two seconds, past the second idle connections get.
    let (first, rest) = raw.split_at(raw.len() - 500_000);
    stream.write_all(first).unwrap();
    let signalled = Instant::now();
    s.signal(SIGTERM);
    for part in rest.chunks(5_000) {
        stream
            .write_all(part)
            .expect("the server keeps reading the body");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(signalled.elapsed() > Duration::from_secs(1));
    let r = support::read_response(&mut BufReader::new(stream)).expect("an answer");
    // Arrived during the drain: the shutdown-abort, whole.
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["plugin_error"]["error_type"], "shutdown");
    let status = s.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", s.logs());
}

#[test]
fn a_stalled_stream_still_ends_the_shutdown_within_the_budget() {
    let mut s = Server::start(&fixture(Some("STREAMING")), &["--graceful-timeout", "1s"]);
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .write_all(invoke_request(r#"{"mode":"flood_ignore"}"#).as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    // The client reads no more, and the plugin, which ignores its flag,
    // fills the socket buffers and the stream's channel: the stream is
    // stalled with its plugin still inside.
    let signalled = Instant::now();
    s.signal(SIGTERM);
    let status = s.wait_exit(Duration::from_secs(30)).expect("exits");
    let took = signalled.elapsed();
    // docs/shutdown.md: terminationGracePeriodSeconds >= timeout + 5 s.
    assert!(took < Duration::from_secs(1 + 5), "took {took:?}");
    assert_eq!(status.code(), Some(75), "{}", s.logs());
    drop(reader);
}

#[test]
fn a_log_pipe_nobody_reads_stalls_neither_requests_nor_the_shutdown() {
    let mut s = Server::start(&plugin("wordcount"), &[]);
    s.pause_logs(true);
    // One access log line each: more than the pipe (64 KiB, about 300
    // lines) and the log thread's 10,000 waiting lines hold together.
    let mut conn = s.connect();
    conn.stream_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for i in 0..15_000 {
        let r = conn
            .send("GET", "/healthz", None)
            .unwrap_or_else(|e| panic!("request {i} got no answer: {e}"));
        assert_eq!(r.status, 200);
    }
    let metrics = conn.send("GET", "/metrics", None).unwrap().text();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("etl_serve_log_lines_dropped_total "))
        .expect("the dropped-lines counter")
        .parse()
        .unwrap();
    assert!(dropped > 0, "{metrics}");
    drop(conn);
    let signalled = Instant::now();
    s.signal(SIGTERM);
    let status = s.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    s.pause_logs(false);
}

// ---------------------------------------------------------------------------
// What a slow or greedy client can pin
// ---------------------------------------------------------------------------

/// Opens a connection and sends an /invoke head announcing `length` bytes
/// of body, and `part` of them.
fn upload_started(s: &Server, length: usize, part: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(part).unwrap();
    stream
}

/// `etl_serve_request_body_bytes_held`, from /metrics.
fn body_bytes_held(s: &Server) -> u64 {
    s.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("etl_serve_request_body_bytes_held "))
        .expect("the held-bytes gauge")
        .parse()
        .unwrap()
}

#[test]
fn a_body_that_stops_arriving_gets_408_naming_the_flag() {
    let s = Server::start(&plugin("wordcount"), &["--body-read-timeout", "1s"]);
    let stream = upload_started(&s, 1000, br#"{"text":"#);
    let sent = Instant::now();
    let r = support::read_response(&mut BufReader::new(stream)).expect("an answer");
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(
        r.json()["detail"],
        "the request body stopped arriving: nothing for 1s (--body-read-timeout)"
    );
    assert_eq!(r.header("connection"), Some("close"));
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // Nothing is held for it any more, and the server serves on.
    assert_eq!(body_bytes_held(&s), 0);
    assert_eq!(s.post_json("/invoke", r#"{"text":"a b"}"#).status, 200);
}

#[test]
fn bodies_past_the_memory_budget_get_503_and_the_others_are_served() {
    let s = Server::start(
        &plugin("wordcount"),
        &["--max-body-size", "1MiB", "--max-body-memory", "2MiB"],
    );
    let text = "w ".repeat(400_000);
    let body = format!(r#"{{"text":"{text}"}}"#).into_bytes();
    let (head, rest) = body.split_at(100);
    // Two uploads of 800 kB under way hold 1.6 MB of the 2 MiB.
    let mut uploads = vec![
        upload_started(&s, body.len(), head),
        upload_started(&s, body.len(), head),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while body_bytes_held(&s) < 2 * body.len() as u64 {
        assert!(Instant::now() < deadline, "the uploads were never held");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A third cannot be held: refused before its body is read.
    let third = upload_started(&s, body.len(), head);
    let r = support::read_response(&mut BufReader::new(third)).expect("an answer");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("(--max-body-memory)"),
        "{}",
        r.text()
    );
    // A chunked body announces no length: it is held as it arrives, and
    // refused once it would go past the budget.
    let mut chunked = TcpStream::connect(s.addr).unwrap();
    chunked
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let upload = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    );
    chunked.write_all(upload.as_bytes()).unwrap();
    chunked.write_all(&body).unwrap();
    chunked.write_all(b"\r\n0\r\n\r\n").unwrap();
    let r = support::read_response(&mut BufReader::new(chunked)).expect("an answer");
    assert_eq!(r.status, 503, "{}", r.text());
    // The two under way finish and are answered.
    for mut stream in uploads.drain(..) {
        stream.write_all(rest).unwrap();
        let r = support::read_response(&mut BufReader::new(stream)).expect("an answer");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["output"]["words"], 400_000);
    }
    assert_eq!(body_bytes_held(&s), 0);
}

#[test]
fn a_memory_budget_below_the_body_size_limit_is_refused_at_startup() {
    let failed = Server::start_with(
        &plugin("wordcount"),
        &["--max-body-size", "16MiB", "--max-body-memory", "1MiB"],
        &[],
    )
    .err()
    .expect("refused");
    assert_eq!(failed.status.code(), Some(64));
    assert!(
        failed.stderr.contains(
            "--max-body-memory (1048576 bytes) is smaller than --max-body-size (16777216 bytes)"
        ),
        "{}",
        failed.stderr
    );
}

/// A counter from /metrics.
fn counter(s: &Server, name: &str) -> u64 {
    s.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}"))
        .parse()
        .unwrap()
}

/// Waits until `name` reaches `at_least`.
fn wait_counter(s: &Server, name: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(s, name) < at_least {
        assert!(Instant::now() < deadline, "{name} never reached {at_least}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_stops_reading_is_cut_at_the_write_timeout() {
    let s = Server::start(&fixture(None), &["--write-timeout", "1s"]);
    let (mut reader, length) = huge_answer_started(&s);
    // The client reads nothing more; the 100 MB cannot all be written.
    let stalled = Instant::now();
    wait_counter(&s, "etl_serve_write_timeouts_total", 1);
    assert!(stalled.elapsed() >= Duration::from_millis(900));
    let buffered = reader.buffer().len();
    reader.consume(buffered);
    let got = buffered + read_slowly(&mut reader, 1 << 20, Duration::ZERO);
    assert!(got < length, "the answer was cut: {got} of {length}");
    assert_eq!(s.get("/healthz").status, 200);
}

/// A stream of the fixture's `flood_ignore` (64 KiB items as fast as emit
/// lets it, never looking at its flag) whose client has read the head and
/// reads nothing more.
fn flood_started(s: &Server) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .write_all(invoke_request(r#"{"mode":"flood_ignore"}"#).as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_head(&mut reader).0, 200);
    reader
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("a VmRSS line")
}

#[test]
fn a_stream_whose_client_stopped_reading_pins_a_bounded_amount_of_memory() {
    let s = Server::start(&fixture(Some("STREAMING")), &["--write-timeout", "60s"]);
    let before = rss_kib(s.pid());
    // At full speed the flood would be gigabytes a second, were emit not
    // held back by the unread socket.
    let reader = flood_started(&s);
    // Watch the resident set over two seconds of the stalled stream.
    let mut most = before;
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        most = most.max(rss_kib(s.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The stream's queue (16 items) and hyper's write buffer, not the flood.
    assert!(
        most - before < 32 * 1024,
        "the resident set grew from {before} KiB to {most} KiB"
    );
    assert_eq!(s.get("/healthz").status, 200);
    drop(reader);
}

#[test]
fn streams_whose_clients_stopped_reading_release_their_threads() {
    let s = Server::start(
        &fixture(Some("STREAMING")),
        &["--plugin-threads", "2", "--write-timeout", "1s"],
    );
    // Two streams whose clients read the head and nothing more: each holds
    // a plugin thread, its emit blocked.
    let stalled: Vec<_> = (0..2).map(|_| flood_started(&s)).collect();
    // Every thread is taken: new work is refused at once, not queued.
    let r = s.post_json("/invoke", r#"{"mode":"ok"}"#);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json()["detail"],
        "all 2 plugin threads are busy (--plugin-threads); retry later"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    // A client that waits for `100 Continue` gets the 503 in its place.
    assert_eq!(
        support::refused_before_continue(s.addr),
        "all 2 plugin threads are busy (--plugin-threads); retry later"
    );
    // The write timeout cuts both streams, their plugins see the stream
    // closed, and the threads come back.
    wait_counter(&s, "etl_serve_write_timeouts_total", 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = s.post_json("/invoke", r#"{"mode":"ok"}"#);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "the threads never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stalled);
}

#[test]
fn out_of_descriptors_the_queued_connections_are_still_answered_at_shutdown() {
    // About ten descriptors for connections, and thirty clients.
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=24:24", "--"])
        .arg(env!("CARGO_BIN_EXE_etl-serve"))
        .arg("--plugin")
        .arg(plugin("wordcount"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--timeout-keep-alive",
            "60",
        ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("UVICORN_") || k.starts_with("ETL_SERVE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut s = Server::spawn(cmd).expect("starts");
    let keep_alive = invoke_request(r#"{"text":"a b c"}"#).replace("Connection: close\r\n", "");
    let clients: Vec<TcpStream> = (0..30)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            c.write_all(keep_alive.as_bytes()).unwrap();
            c
        })
        .collect();
    assert!(
        s.wait_for_log("out of file descriptors", Duration::from_secs(10)),
        "{}",
        s.logs()
    );
    s.signal(SIGTERM);
    // Every request sent is answered: the ones accepted before, normally;
    // the ones still queued, with the shutdown-abort once the idle
    // connections gave their descriptors back. Every client keeps its
    // connection open until all are answered, as a pool would: the
    // descriptors come back only because the server ends its idle
    // connections, not because their clients leave.
    let (mut ok, mut aborted) = (0, 0);
    for c in &clients {
        let r = support::read_response(&mut BufReader::new(c)).expect("an answer");
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.json()["plugin_error"]["error_type"], "shutdown");
                aborted += 1;
            }
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert!(ok > 0 && aborted > 0, "{ok} answered, {aborted} aborted");
    let status = s.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", s.logs());
    // One warning per run of failures, not one per try (the old loop
    // logged twenty a second), and tries that back off: a run under 30 s
    // takes at most a dozen. How many runs there are depends on how the
    // descriptors come back; each ends with "accept works again", but the
    // last may end with the queue empty instead.
    let logs = s.logs();
    // The idle connections were ended to give their descriptors back.
    let closed: u32 = logs
        .lines()
        .filter(|l| l.contains("closed idle connections to accept the ones still queued"))
        .filter_map(|l| {
            l.split("closed=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u32>()
                .ok()
        })
        .sum();
    assert!(closed > 0, "{logs}");
    let warnings = logs.matches("accept failed").count();
    let recovered = logs.matches("accept works again").count();
    assert!(
        warnings >= 1 && (recovered..=recovered + 1).contains(&warnings),
        "{warnings} warnings, {recovered} recoveries: {logs}"
    );
    for line in logs.lines().filter(|l| l.contains("accept works again")) {
        let tries: u32 = line
            .split("failures=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"));
        assert!(tries <= 12, "{line}");
    }
}

#[test]
fn a_request_pipelined_behind_one_saying_connection_close_is_not_answered() {
    // Once a request says `Connection: close`, no later request on the
    // connection is processed (RFC 9112, section 9.6); etl-uvicorn answers
    // the first only, too. The replay of pipelined requests is for the
    // drain's own `Connection: close`, not the client's. The connection
    // still ends cleanly, not with a reset.
    let s = Server::start(&plugin("wordcount"), &[]);
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(
            b"GET /id HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n\
              GET /id HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    let r = support::read_response(&mut reader).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    support::assert_clean_close(&mut reader);
}

#[test]
fn requests_pipelined_behind_one_cut_by_sigterm_are_answered_too() {
    // Every request the server read gets an answer: the one in the plugin
    // at SIGTERM, and the ones hyper had read behind it (an `/invoke` gets
    // the shutdown-abort, a `GET /id` its id, as during any drain). Then a
    // clean close, not a reset.
    let mut s = Server::start(&plugin("slow"), &[]);
    let one = invoke_request(r#"{"units":100000}"#).replace("Connection: close\r\n", "");
    let id = "GET /id HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Four requests in one write: the first reaches the plugin, the others
    // wait behind it.
    let pipelined = format!("{one}{one}{id}{one}");
    stream.write_all(pipelined.as_bytes()).unwrap();
    s.wait_in_flight(1);
    s.signal(SIGTERM);
    let mut reader = BufReader::new(stream);
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(support::read_response(&mut reader).expect("an answer for each request"));
    }
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200, 503]);
    for r in answers.iter().filter(|r| r.status == 503) {
        assert_eq!(r.json()["plugin_error"]["error_type"], "shutdown");
    }
    assert_eq!(answers[2].json(), s_id(&answers[2]));
    support::assert_clean_close(&mut reader);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
}

#[test]
fn a_malformed_request_pipelined_behind_one_cut_by_sigterm_gets_its_400_whole() {
    // Behind the request in the plugin: a malformed one, then 4 MiB the
    // server never parses. Both answers arrive, then a clean close: what
    // follows is read and thrown away rather than reset under the 400.
    let mut s = Server::start(&plugin("slow"), &[]);
    let one = invoke_request(r#"{"units":100000}"#).replace("Connection: close\r\n", "");
    let stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    // More than hyper buffers ahead (about 400 KB): the rest waits unread
    // in the socket when the server ends the connection.
    let wrote = std::thread::spawn(move || {
        writer.write_all(format!("{one}GET /id HTTP/1.1\r\nHost t\r\n\r\n").as_bytes())?;
        writer.write_all(&vec![b'x'; 4 << 20])
    });
    s.wait_in_flight(1);
    s.signal(SIGTERM);
    let mut reader = BufReader::new(stream);
    let cut = support::read_response(&mut reader).expect("the cut request's answer");
    assert_eq!(cut.status, 503);
    let refused = support::read_response(&mut reader).expect("the malformed one's answer");
    assert_eq!(refused.status, 400);
    support::assert_clean_close(&mut reader);
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    // Bytes still coming when the server exits may be refused (see
    // docs/shutdown.md); the answers were already whole.
    let _ = wrote.join().unwrap();
}

/// The id an answer to `GET /id` carries: a JSON string.
fn s_id(r: &support::Response) -> serde_json::Value {
    let id = r.json();
    assert!(id.is_string(), "{}", r.text());
    id
}

#[test]
fn an_idle_keep_alive_connection_after_a_large_upload_does_not_hold_the_shutdown() {
    // A body that arrives in several reads after its request was
    // dispatched, answered; the connection then sits idle. It must count
    // as idle at shutdown: closed after the linger, exit 0, nothing "cut".
    // The keep-alive timeout is long, so only the shutdown closes it.
    let mut s = Server::start(
        &plugin("wordcount"),
        &["--graceful-timeout", "30s", "--timeout-keep-alive", "60"],
    );
    let body = format!(r#"{{"text":"{}"}}"#, "w ".repeat(200_000));
    let raw = invoke_request(&body).replace("Connection: close\r\n", "");
    let (head, rest) = raw.as_bytes().split_at(raw.len() - body.len() + 10);
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(head).unwrap();
    for part in rest.chunks(50_000) {
        std::thread::sleep(Duration::from_millis(20));
        stream.write_all(part).unwrap();
    }
    let mut reader = BufReader::new(stream);
    let r = support::read_response(&mut reader).expect("an answer");
    assert_eq!(r.status, 200);
    let signalled = Instant::now();
    s.signal(SIGTERM);
    let status = s.wait_exit(Duration::from_secs(40)).expect("exits");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "the idle connection held the shutdown for {:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", s.logs());
    drop(reader);
}

/// A client whose receive buffer is as small as the kernel allows, so that
/// most of a large answer waits in the server's send buffer until read.
fn connect_with_small_receive_buffer(addr: std::net::SocketAddr) -> TcpStream {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("the test servers listen on 127.0.0.1");
    };
    let fd = socket(
        nix::sys::socket::AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(v4)).unwrap();
    TcpStream::from(fd)
}

/// The TCP state of the server's end of the connection whose client end is
/// `client` (`/proc/net/tcp`: 01 established, 04 FIN-WAIT-1...), `None`
/// once it is gone.
fn server_end_state(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |p: u16| format!(":{p:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1].ends_with(&port(server.port())) && f[2].ends_with(&port(client.port())))
            .then(|| f[3].to_owned())
    })
}

#[test]
fn an_answer_closing_its_connection_survives_bytes_the_server_never_read() {
    // The server closes after this answer (`Connection: close`) while the
    // client sends more than the request: a pipelined request, sent once
    // the answer has begun, which the server will not read. Closing the
    // socket with those bytes unread would reset the connection and throw
    // away what the kernel had not yet sent of the answer, here most of a
    // 200 KB 422. The server ends its writing side and discards what comes
    // until the client closes instead.
    let s = Server::start(&plugin("wordcount"), &[]);
    let mut stream = connect_with_small_receive_buffer(s.addr);
    let body = format!(r#"{{"text":["{}"]}}"#, "x".repeat(200_000));
    let request = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    // Once the answer has begun, hyper reads no more of this connection.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut first = [0u8; 16];
    assert!(stream.peek(&mut first).unwrap() > 0, "the answer begins");
    let unread = format!(
        "GET /id HTTP/1.1\r\nHost: t\r\n\r\n{}",
        "y".repeat(64 * 1024)
    );
    stream.write_all(unread.as_bytes()).unwrap();
    // Wait until the server has ended its side (FIN-WAIT-1: its FIN waits
    // behind the unsent answer) or let go of the socket (the reset).
    let client = stream.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = server_end_state(s.addr, client);
        if state.as_deref() != Some("01") || Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut reader = BufReader::new(stream);
    let answer = support::read_response(&mut reader).unwrap_or_else(|e| {
        panic!("the whole answer, not {e} (the server's end of the connection: {state:?})")
    });
    assert_eq!(answer.status, 422);
    assert_eq!(answer.json()["detail"][0]["type"], "string_type");
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("a clean close after the answer");
    assert!(rest.is_empty(), "nothing after the answer: {rest:?}");
}

#[test]
fn a_client_that_uploads_its_whole_body_before_reading_gets_the_413() {
    // The 413 is sent before the body is read. A client that writes the
    // whole body before it reads (as many do) must still find the answer:
    // the server throws the body away until the client is done, rather
    // than resetting the connection under its writes. (It does so for the
    // head timeout, 5 s by default: far longer than 16 MiB takes here.)
    let s = Server::start(&plugin("wordcount"), &["--max-body-size", "1KiB"]);
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Far more than the socket buffers on both sides can hold.
    let body = vec![b' '; 16 << 20];
    let head = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
        .write_all(&body)
        .expect("the whole body is taken, not reset");
    let r = support::read_response(&mut BufReader::new(stream)).expect("the 413");
    assert_eq!(r.status, 413, "{}", r.text());
}

#[test]
fn a_client_that_keeps_sending_after_its_answer_is_cut_at_the_head_timeout() {
    // The lingering close reads what a client still sends after its last
    // answer for the head timeout only: a client that never stops cannot
    // hold the connection, its task and its descriptor, any longer.
    let s = Server::start(&plugin("wordcount"), &["--timeout-keep-alive", "1"]);
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(invoke_request(r#"{"text":"a"}"#).as_bytes())
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    assert_eq!(support::read_response(&mut reader).unwrap().status, 200);
    // The server has ended its writing side: the end of the stream.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let ended = Instant::now();
    // A byte every 20 ms, until a write fails: the server has let go of
    // the socket, and its kernel resets what arrives after.
    let cut = loop {
        if stream.write_all(b"y").is_err() {
            break ended.elapsed();
        }
        assert!(ended.elapsed() < Duration::from_secs(10), "never cut");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        cut > Duration::from_millis(500) && cut < Duration::from_secs(5),
        "cut {cut:?} after the answer, with a 1 s head timeout"
    );
}
