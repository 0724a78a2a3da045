//! SIGTERM under load: many clients send to `slow` (the Rust plugin, or a
//! Python twin through the bridge) while the server is told to stop, and
//! every request written to a socket is classified.
//!
//! Loopback only, bounded in clients, rounds and time; it stops by itself.

use std::io::{BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::SIGTERM;

use super::{invoke_request, plugin, read_response, serve_python_with, Server};

/// What became of every request of a round.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcomes {
    /// A complete 200 envelope.
    pub ok: u64,
    /// A complete 503 shutdown-abort.
    pub shutdown_abort: u64,
    /// The connection could not be made: nothing was sent.
    pub connect_refused: u64,
    /// The request could not be written: the connection was reset before
    /// the write (the closing race, when the reset wins). The client knows
    /// nothing was delivered.
    pub write_failed: u64,
    /// The request was written and the connection closed with no byte back.
    pub empty_reply: u64,
    /// The request was written and the connection was reset.
    pub reset: u64,
    /// The closing race, the one case etl-serve cannot prevent: a fresh
    /// connection whose handshake the kernel completed in the instant
    /// between etl-serve's last accept and the close of its listening
    /// socket. The client wrote, got a reset within moments of connecting,
    /// and a new connect is refused. A connection etl-serve had accepted
    /// and then lost would instead reset at exit, a second or more later.
    pub closing_race: u64,
    /// A response started but did not complete.
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
    /// Rust `slow` (`etl_cancel:slow`, or `etl_cancel:slow_async`).
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
        let body = match i % 3 {
            0 => format!(r#"{{"units":300,"unit_ms":10,"cooperative":{cooperative}}}"#),
            1 => r#"{"units":20,"unit_ms":10,"cooperative":false}"#.to_owned(),
            _ => r#"{"units":1,"unit_ms":1,"cooperative":false}"#.to_owned(),
        };
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
        let sent = send(stream, reader, raw.as_bytes(), out);
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

/// Writes one request and classifies its answer. `Done(true)` when the
/// connection may be reused.
fn send(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    raw: &[u8],
    out: &mut Outcomes,
) -> Attempt {
    if stream.write_all(raw).is_err() {
        out.write_failed += 1;
        return Attempt::NotSent;
    }
    match read_response(reader) {
        Ok(r) => {
            let close = r
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let envelope: Option<serde_json::Value> = serde_json::from_slice(&r.body).ok();
            match (r.status, envelope) {
                (200, Some(e)) if e["status_code"] == 200 && e["output"]["done"].is_number() => {
                    out.ok += 1
                }
                (503, Some(e)) if e["plugin_error"]["error_type"] == "shutdown" && close => {
                    out.shutdown_abort += 1
                }
                (status, e) => {
                    eprintln!("unexpected answer {status}: {e:?}");
                    out.other += 1;
                }
            }
            Attempt::Done(!close)
        }
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && e.to_string() == "no response" => {
            out.empty_reply += 1;
            Attempt::Done(false)
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            Attempt::Reset
        }
        Err(e) => {
            eprintln!("truncated answer: {e}");
            out.truncated += 1;
            Attempt::Done(false)
        }
    }
}
