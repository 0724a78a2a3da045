//! SIGTERM under load: many clients send to `slow` (the Rust plugin, or a
//! Python twin through the bridge, which may stream) while the server is
//! told to stop, and every request written to a socket is classified.
//!
//! Loopback only, bounded in clients, rounds and time; it stops by itself.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;

use super::{invoke_request, plugin, read_body, read_head, serve_python_with, Server};

/// What became of every request of a round.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcomes {
    /// A complete 200 envelope.
    pub ok: u64,
    /// A complete 503 shutdown-abort.
    pub shutdown_abort: u64,
    /// Of those, streams that had sent items, ended by the shutdown-abort's
    /// line.
    pub stream_cut: u64,
    /// The connection could not be made: nothing was sent.
    pub connect_refused: u64,
    /// The request could not be written: the connection was reset before
    /// the write (the closing race, when the reset wins). The client knows
    /// nothing was delivered.
    pub write_failed: u64,
    /// The request was written and the connection closed with no byte back.
    pub empty_reply: u64,
    /// The request was written and the connection was reset before any
    /// byte of the answer came.
    pub reset: u64,
    /// The closing race, the one case etl-serve cannot prevent: a fresh
    /// connection whose handshake the kernel completed in the instant
    /// between etl-serve's last accept and the close of its listening
    /// socket. The client wrote, got a reset within moments of connecting,
    /// and a new connect is refused. A connection etl-serve had accepted
    /// and then lost would instead reset at exit, a second or more later.
    pub closing_race: u64,
    /// A response started (a byte of it came) but did not complete, or
    /// none came within the client's read timeout.
    pub truncated: u64,
    /// A complete response that is neither of the two allowed.
    pub other: u64,
    /// The exit code of the server.
    pub exit_code: Option<i32>,
    /// Whether the server said it closed its listener behind a backlog
    /// cut, having been refused the socket filter.
    pub backlog_cut: bool,
}

impl Outcomes {
    fn add(&mut self, o: &Outcomes) {
        self.ok += o.ok;
        self.shutdown_abort += o.shutdown_abort;
        self.stream_cut += o.stream_cut;
        self.connect_refused += o.connect_refused;
        self.write_failed += o.write_failed;
        self.empty_reply += o.empty_reply;
        self.reset += o.reset;
        self.closing_race += o.closing_race;
        self.truncated += o.truncated;
        self.other += o.other;
    }

    /// Requests written that did not end as a complete 200 or 503.
    pub fn lost(&self) -> u64 {
        self.empty_reply + self.reset + self.truncated + self.other
    }
}

/// One round's setup.
#[derive(Clone, Debug)]
pub struct Round {
    pub clients: usize,
    /// Whether `slow` checks its flag.
    pub cooperative: bool,
    pub graceful_timeout: &'static str,
    /// How long the load runs before SIGTERM.
    pub warmup: Duration,
    /// Whether the server runs as a container runs it
    /// (`Server::start_unprivileged`).
    pub unprivileged: bool,
    /// The Python twin of `slow` to serve through the bridge instead of the
    /// Rust `slow`: `etl_cancel:slow` or `etl_cancel:slow_async`, or one
    /// that streams a line per unit, `etl_cancel:slow_stream` or
    /// `etl_cancel:slow_stream_async`.
    pub python: Option<&'static str>,
}

/// What one send ended as, for the caller to act on.
enum Attempt {
    Done(bool),
    NotSent,
    /// Reset after the request was written; the caller classifies it.
    Reset,
}

/// Runs one round and returns what became of every request.
pub fn round(r: &Round) -> Outcomes {
    let args = ["--graceful-timeout", r.graceful_timeout, "--no-access-log"];
    let server = match (r.python, r.unprivileged) {
        (Some(app), false) => serve_python_with(app, "tests/fixtures/python", &args),
        (None, true) => Server::start_unprivileged(&plugin("slow"), &args),
        (None, false) => Server::start(&plugin("slow"), &args),
        (Some(_), true) => {
            unimplemented!("the bridge as user 65532 needs a virtualenv it can read")
        }
    };
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Mutex::new(Outcomes::default()));
    let mut threads = Vec::new();
    for i in 0..r.clients {
        let stop = stop.clone();
        let totals = totals.clone();
        let cooperative = r.cooperative;
        threads.push(std::thread::spawn(move || {
            let mut mine = Outcomes::default();
            client(i, addr, cooperative, &stop, &mut mine);
            totals.lock().unwrap().add(&mine);
        }));
    }
    std::thread::sleep(r.warmup);
    let mut server = server;
    server.signal(SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(60))
        .expect("the server exits under load");
    // Keep sending a little after the exit: those connections are refused.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let mut totals = totals.lock().unwrap().clone();
    totals.exit_code = status.code();
    totals.backlog_cut = server.logs().contains("its backlog is cut to 0 instead");
    totals
}

/// One client: even ones reuse a keep-alive connection, odd ones open a
/// fresh connection per request. A third of the clients send long requests
/// (3 s, cooperative as the round says), a third 200 ms requests that ignore
/// the flag (so they finish during the drain), a third 1 ms requests.
fn client(i: usize, addr: SocketAddr, cooperative: bool, stop: &AtomicBool, out: &mut Outcomes) {
    let keep_alive = i % 2 == 0;
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut connected = Instant::now();
    let mut fresh = true;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (units, unit_ms, cooperative) = match i % 3 {
            0 => (300, 10, cooperative),
            1 => (20, 10, false),
            _ => (1, 1, false),
        };
        let body =
            format!(r#"{{"units":{units},"unit_ms":{unit_ms},"cooperative":{cooperative}}}"#);
        let mut raw = invoke_request(&body);
        if keep_alive {
            raw = raw.replace("Connection: close\r\n", "");
        }
        if conn.is_none() {
            match TcpStream::connect(addr) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let reader = BufReader::new(s.try_clone().unwrap());
                    conn = Some((s, reader));
                    connected = Instant::now();
                    fresh = true;
                }
                Err(_) => {
                    out.connect_refused += 1;
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            }
        }
        let (stream, reader) = conn.as_mut().unwrap();
        let sent = send(stream, reader, raw.as_bytes(), units, out);
        if matches!(sent, Attempt::Reset) {
            let quick = connected.elapsed() < Duration::from_millis(250);
            let refused = TcpStream::connect(addr).is_err();
            if fresh && quick && refused {
                out.closing_race += 1;
            } else {
                eprintln!(
                    "reset: fresh={fresh} after {:?} reconnect refused={refused}",
                    connected.elapsed()
                );
                out.reset += 1;
            }
        }
        fresh = false;
        match sent {
            Attempt::Done(reusable) if keep_alive && reusable => {}
            _ => conn = None,
        }
    }
}

/// Writes one request for `units` units and classifies its answer.
/// `Done(true)` when the connection may be reused.
fn send(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    raw: &[u8],
    units: u64,
    out: &mut Outcomes,
) -> Attempt {
    if stream.write_all(raw).is_err() {
        out.write_failed += 1;
        return Attempt::NotSent;
    }
    // Whether any byte of the answer came decides what a break means.
    // Before the first, a reset may be the closing race (the caller looks);
    // after it, the answer was cut short.
    match reader.fill_buf() {
        Ok([]) => {
            out.empty_reply += 1;
            return Attempt::Done(false);
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            return Attempt::Reset;
        }
        Err(e) => {
            eprintln!("no answer: {e}");
            out.truncated += 1;
            return Attempt::Done(false);
        }
    }
    let (status, headers) = match read_head(reader) {
        Ok(head) => head,
        Err(e) => {
            eprintln!("truncated answer head: {e}");
            out.truncated += 1;
            return Attempt::Done(false);
        }
    };
    // Once the head has arrived, any break in the body (a reset too) cuts
    // an answer short.
    let body = match read_body(reader, status, &headers) {
        Ok(body) => body,
        Err(e) => {
            eprintln!("truncated answer {status}: {e}");
            out.truncated += 1;
            return Attempt::Done(false);
        }
    };
    let close = headers
        .get("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let ndjson = headers
        .get("content-type")
        .is_some_and(|v| v == "application/x-ndjson");
    let answer = if status == 200 && ndjson {
        stream_answer(&body, units)
    } else {
        envelope_answer(status, &body, close, units)
    };
    match answer {
        Ok(Answer::Whole) => out.ok += 1,
        Ok(Answer::ShutdownAbort { stream_cut }) => {
            out.shutdown_abort += 1;
            out.stream_cut += u64::from(stream_cut);
        }
        Err(why) => {
            eprintln!("unexpected answer {status}: {why}");
            out.other += 1;
        }
    }
    Attempt::Done(!close)
}

/// A complete answer of one of the two kinds allowed.
enum Answer {
    /// The plugin's result for every unit asked.
    Whole,
    /// The 503 shutdown-abort, or a stream's items ended by its line.
    ShutdownAbort { stream_cut: bool },
}

/// Classifies a single envelope: a 200 with `done` equal to the units
/// asked, or the 503 shutdown-abort closing its connection.
fn envelope_answer(status: u16, body: &[u8], close: bool, units: u64) -> Result<Answer, String> {
    let e: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| String::from_utf8_lossy(body).into_owned())?;
    if status == 200 && e["status_code"] == 200 && e["output"]["done"] == units {
        Ok(Answer::Whole)
    } else if status == 503 && e["plugin_error"]["error_type"] == "shutdown" && close {
        Ok(Answer::ShutdownAbort { stream_cut: false })
    } else {
        Err(format!("{e} (connection: close {close})"))
    }
}

/// Classifies a stream's NDJSON lines: `done` 1, 2, ... in order, and
/// either every unit asked or, last, the shutdown-abort's line.
fn stream_answer(body: &[u8], units: u64) -> Result<Answer, String> {
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a line is not JSON ({e})"))?;
    let aborted = lines
        .last()
        .is_some_and(|l| l["status_code"] == 503 && l["plugin_error"]["error_type"] == "shutdown");
    let items = &lines[..lines.len() - usize::from(aborted)];
    if let Some((n, item)) = items
        .iter()
        .enumerate()
        .find(|(n, item)| item["status_code"] != 200 || item["output"]["done"] != n + 1)
    {
        return Err(format!("item {n} of {}: {item}", lines.len()));
    }
    match (aborted, items.len() as u64) {
        // A stream stopped before its first item answers the plain 503.
        (true, 0) => Err("a 200 whose only line is the shutdown-abort".to_owned()),
        (true, _) => Ok(Answer::ShutdownAbort { stream_cut: true }),
        (false, n) if n == units => Ok(Answer::Whole),
        (false, n) => Err(format!("{n} items of {units}, and no shutdown-abort")),
    }
}
