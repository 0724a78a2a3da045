//! What the integration tests share: building the plugins, starting the
//! real `etl-serve` binary on a free loopback port (with a Rust or C
//! plugin, or a Python one through the bridge), and a small HTTP/1.1
//! client over a raw socket (so tests control exactly what is sent).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WORKSPACE: &str = env!("CARGO_MANIFEST_DIR");

/// target/<profile>, where cargo put this test binary (…/deps/<test>).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lies in <profile>/deps")
        .to_path_buf()
}

/// The path of an example or fixture plugin library, building all of them
/// the first time (one `cargo build` for the whole run).
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "wordcount",
            "-p",
            "wordcount_c",
            "-p",
            "slow",
            "-p",
            "ticker",
        ])
        .args(["-p", "panicky", "-p", "etl-python"])
        .current_dir(WORKSPACE);
        if profile_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the plugins");
        assert!(status.success(), "building the plugins failed");
    });
    let path = profile_dir().join(format!("lib{name}.so"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The `faulty.c` fixture compiled with `-D<variant>` (or none), once.
pub fn fixture(variant: Option<&str>) -> PathBuf {
    c_fixture("faulty", variant)
}

/// The C fixture `tests/fixtures/<source>.c` compiled with `-D<variant>`
/// (or none), once.
pub fn c_fixture(source: &str, variant: Option<&str>) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let name = format!(
        "{source}_{}",
        variant.unwrap_or("default").to_ascii_lowercase()
    );
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lib{name}.so"));
    let mut built = BUILT.lock().unwrap();
    if !built.contains(&name) {
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let mut cmd = Command::new(&cc);
        cmd.args([
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
        ])
        .arg("-I")
        .arg(Path::new(WORKSPACE).join("include"))
        .arg(Path::new(WORKSPACE).join(format!("tests/fixtures/{source}.c")))
        .arg("-o")
        .arg(&out)
        .arg("-lpthread");
        if let Some(v) = variant {
            cmd.arg(format!("-D{v}"));
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
        assert!(status.success(), "compiling the fixture {name} failed");
        built.push(name);
    }
    out
}

/// A running etl-serve process whose stderr is collected; killed on drop.
pub struct Spawned {
    child: Child,
    logs: Arc<Mutex<String>>,
    listening: std::sync::mpsc::Receiver<String>,
    /// While true, nobody reads the process's stderr.
    paused: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// Disconnects when the reader has seen the end of stderr.
    stderr_done: std::sync::mpsc::Receiver<()>,
}

impl Spawned {
    /// Starts `cmd` with stderr captured.
    pub fn new(mut cmd: Command) -> Spawned {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn etl-serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, listening) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        let paused = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let pause = paused.clone();
        let (done, stderr_done) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _done = done;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lock, resumed) = &*pause;
                drop(resumed.wait_while(lock.lock().unwrap(), |p| *p).unwrap());
                {
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                // Announced after it is in the logs, so a test that starts
                // the server sees the listening line.
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    // Text or JSON logs: the address ends at the first
                    // character that cannot be part of it.
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_hexdigit() || ".:[]".contains(*c))
                        .collect();
                    let _ = tx.send(addr);
                }
            }
        });
        Spawned {
            child,
            logs,
            listening,
            paused,
            stderr_done,
        }
    }

    /// Stops reading the process's stderr (as a log collector that hangs),
    /// or starts again.
    pub fn pause_logs(&self, paused: bool) {
        let (lock, resumed) = &*self.paused;
        *lock.lock().unwrap() = paused;
        resumed.notify_all();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub fn running(&self) -> bool {
        // try_wait needs &mut; a signal 0 asks the kernel instead.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
    }

    /// Waits up to `timeout` for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        signal_pid(self.pid(), signal);
    }

    /// Waits up to `timeout` for the process to exit, then (for at most 5 s
    /// more, and unless the logs are paused) until its last lines are in the
    /// logs: the reader has seen the end of stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // (Not while the test keeps stderr unread on purpose.)
                if !*self.paused.0.lock().unwrap() {
                    let _ = self.stderr_done.recv_timeout(Duration::from_secs(5));
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `etl-serve` listening on loopback, killed on drop.
pub struct Server {
    proc: Spawned,
    pub addr: SocketAddr,
}

/// How a server that should not have started ended.
#[derive(Debug)]
pub struct Failed {
    pub status: ExitStatus,
    pub stderr: String,
}

pub fn etl_serve() -> Command {
    without_inherited_settings(Command::new(env!("CARGO_BIN_EXE_etl-serve")))
}

/// Serves `wordcount` on a new Unix socket named `name` (a stale file of
/// that name is removed first), with `args`, once it listens; the socket's
/// path with it.
pub fn serve_wordcount_on_unix_socket(name: &str, args: &[&str]) -> (Spawned, PathBuf) {
    let sock = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("etl-serve-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = etl_serve();
    cmd.arg("--plugin")
        .arg(plugin("wordcount"))
        .arg("--uds")
        .arg(&sock)
        .args(args);
    let s = Spawned::new(cmd);
    assert!(
        s.wait_for_log("listening on unix:", Duration::from_secs(30)),
        "{}",
        s.logs()
    );
    (s, sock)
}

/// The reference's virtualenv, made by `scripts/reference-venv` if missing.
pub fn reference_venv() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(workspace.join("scripts/reference-venv"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/reference-venv");
    assert!(out.status.success(), "scripts/reference-venv failed");
    workspace.join(String::from_utf8(out.stdout).unwrap().trim())
}

/// etl-serve serving the Python `app` through the bridge, importable from
/// `dir`, with the reference's virtualenv.
pub fn serve_python(app: &str, dir: &str) -> Server {
    serve_python_with(app, dir, &[])
}

/// As [`serve_python`], with more arguments for etl-serve.
pub fn serve_python_with(app: &str, dir: &str, args: &[&str]) -> Server {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = reference_venv();
    let pythonpath = workspace.join(dir);
    let args: Vec<&str> = ["--plugin-config", app]
        .iter()
        .chain(args)
        .copied()
        .collect();
    Server::start_with(
        &plugin("etl_python"),
        &args,
        &[
            ("VIRTUAL_ENV", venv.to_str().unwrap()),
            ("PYTHONPATH", pythonpath.to_str().unwrap()),
        ],
    )
    .unwrap_or_else(|f| panic!("etl-serve with the Python bridge did not start: {f:?}"))
}

/// `cmd` without the settings the tests' own environment could pass on.
fn without_inherited_settings(mut cmd: Command) -> Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("UVICORN_") || k.starts_with("ETL_SERVE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Server {
    /// Starts etl-serve on `plugin` with extra `args`, and waits until it
    /// listens.
    pub fn start(plugin: &Path, args: &[&str]) -> Server {
        Server::start_with(plugin, args, &[])
            .unwrap_or_else(|f| panic!("etl-serve did not start: {f:?}"))
    }

    /// Like `start`, with environment variables, returning how it ended if
    /// it exits instead of listening.
    pub fn start_with(
        plugin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, Failed> {
        let mut cmd = etl_serve();
        cmd.arg("--plugin")
            .arg(plugin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args);
        cmd.envs(env.iter().copied());
        Server::spawn(cmd)
    }

    /// Starts etl-serve on `plugin` with extra `args` as the user a
    /// container runs it as (65532, with no capabilities), through
    /// `setpriv`, when the tests run as root; else as the tests' own user.
    /// The binary and the plugin are run from copies in a directory that
    /// user can read, wherever the workspace is, removed once it listens.
    pub fn start_unprivileged(plugin: &Path, args: &[&str]) -> Server {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { nix::libc::geteuid() } != 0 {
            return Server::start(plugin, args);
        }
        use std::os::unix::fs::PermissionsExt;
        // One directory per call, so that calls from tests running at once
        // do not remove each other's copies.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "etl-serve-unprivileged-{}-{call}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(&dir, open.clone()).unwrap();
        let copy = |from: &Path| {
            let to = dir.join(from.file_name().unwrap());
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, open.clone()).unwrap();
            to
        };
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65532", "--regid=65532", "--clear-groups", "--"])
            .arg(copy(Path::new(env!("CARGO_BIN_EXE_etl-serve"))))
            .arg("--plugin")
            .arg(copy(plugin))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args);
        let started = Server::spawn(without_inherited_settings(cmd));
        // Listening, it has both files open and mapped.
        let _ = std::fs::remove_dir_all(&dir);
        let s = started.unwrap_or_else(|f| panic!("etl-serve did not start: {f:?}"));
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
        let line = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_owned()
        };
        assert!(line("Uid:").contains("65532"), "{}", line("Uid:"));
        assert!(
            line("CapEff:").ends_with("0000000000000000"),
            "{}",
            line("CapEff:")
        );
        s
    }

    /// Starts `cmd` (an etl-serve command line, possibly behind a wrapper
    /// such as `unshare`) and waits until it listens.
    pub fn spawn(cmd: Command) -> Result<Server, Failed> {
        let mut proc = Spawned::new(cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = proc.listening.recv_timeout(Duration::from_millis(20)) {
                let addr = addr
                    .parse()
                    .expect("a socket address in the listening line");
                return Ok(Server { proc, addr });
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                // Let the reader thread take in what is left.
                let _ = proc.stderr_done.recv_timeout(Duration::from_secs(5));
                return Err(Failed {
                    status,
                    stderr: proc.logs(),
                });
            }
            assert!(
                Instant::now() < deadline,
                "etl-serve did not listen within 30 s"
            );
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Sends `signal` to the process we started.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        self.proc.signal(signal);
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Waits up to `timeout` for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.proc.wait_for_log(needle, timeout)
    }

    pub fn pause_logs(&self, paused: bool) {
        self.proc.pause_logs(paused);
    }

    /// Waits until `etl_serve_invocations_in_flight` reads `n`.
    pub fn wait_in_flight(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!("etl_serve_invocations_in_flight {n}");
        while !self.get("/metrics").text().contains(&want) {
            assert!(Instant::now() < deadline, "never {n} in flight");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    /// Sends a request on a new connection from another thread; join the
    /// handle for the response and when it arrived.
    pub fn send_in_background(&self, raw: String) -> std::thread::JoinHandle<(Response, Instant)> {
        let addr = self.addr;
        std::thread::spawn(move || {
            let r = request(addr, raw.as_bytes());
            (r, Instant::now())
        })
    }

    /// A keep-alive connection to the server.
    pub fn connect(&self) -> Conn {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Conn {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn get(&self, path: &str) -> Response {
        request(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").into_bytes(),
        )
    }

    pub fn post_json(&self, path: &str, body: &str) -> Response {
        self.post(path, Some("application/json"), body.as_bytes())
    }

    pub fn post(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        req.push_str("\r\n");
        let mut raw = req.into_bytes();
        raw.extend_from_slice(body);
        request(self.addr, &raw)
    }
}

pub fn signal_pid(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("send signal");
}

/// A `POST /invoke` request with a JSON body, closing the connection.
pub fn invoke_request(body: &str) -> String {
    format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A connection that stays open between requests.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Sends one request (keep-alive) and reads its response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<Response> {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
        if let Some(b) = body {
            raw.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            raw.push_str("\r\n");
        }
        self.stream.write_all(raw.as_bytes())?;
        read_response(&mut self.reader)
    }

    /// Sends raw request bytes and reads one response.
    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<Response> {
        self.stream.write_all(raw)?;
        read_response(&mut self.reader)
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Whether the server closed the connection (reads EOF).
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// An HTTP response as read off the socket.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body's NDJSON lines, each parsed.
    pub fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }
}

/// The value of `etl_serve_plugin_calls_total{thread="..."}` now.
pub fn plugin_calls(s: &Server, thread: &str) -> u64 {
    let text = s.get("/metrics").text();
    let series = format!("etl_serve_plugin_calls_total{{thread=\"{thread}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Sends quick calls to `slow` (`{"units":0}`) until the last one ran
/// inline (quick calls earn inline dispatch after the inline module's
/// warm-up of 64). Returns the inline call count.
pub fn warm_up_inline(s: &Server) -> u64 {
    let mut inline_before = 0;
    for sent in 1.. {
        let r = s.post_json("/invoke", r#"{"units":0}"#);
        assert_eq!(r.status, 200, "{}", r.text());
        if sent >= 64 {
            let now = plugin_calls(s, "inline");
            if now > inline_before && inline_before > 0 {
                return now;
            }
            inline_before = now;
        }
        assert!(sent < 2000, "quick calls never ran inline");
    }
    unreachable!()
}

/// The head of an `/invoke` that waits for `100 Continue` before it sends
/// its 12-byte body.
pub const WAITS_FOR_CONTINUE: &[u8] = b"POST /invoke HTTP/1.1\r\nHost: a\r\n\
Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 12\r\n\r\n";

/// Sends [`WAITS_FOR_CONTINUE`] to `addr` and checks that a 503 came in
/// place of `100 Continue`, closing the connection (the body is never
/// read). Returns the 503's `detail`.
pub fn refused_before_continue(addr: SocketAddr) -> String {
    let r = request(addr, WAITS_FOR_CONTINUE);
    assert_eq!(
        (r.status, r.header("connection")),
        (503, Some("close")),
        "{}",
        r.text()
    );
    r.json()["detail"].as_str().unwrap_or_default().to_owned()
}

/// Sends `raw` on a new connection and reads one response (the request
/// should say `Connection: close`).
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(raw).expect("write request");
    read_response(&mut BufReader::new(stream)).expect("a complete response")
}

/// As [`request`], from the local address `source` (any of 127.0.0.0/8),
/// as a proxy or client at another address would send it.
pub fn request_from(source: std::net::Ipv4Addr, addr: SocketAddr, raw: &[u8]) -> Response {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let [a, b, c, d] = source.octets();
    bind(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, 0)).unwrap();
    let SocketAddr::V4(server) = addr else {
        panic!("the test servers listen on 127.0.0.1");
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(server)).unwrap();
    let mut stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(raw).expect("write request");
    read_response(&mut BufReader::new(stream)).expect("a complete response")
}

/// Reads the end of the connection after the last answer: a clean close
/// with nothing more, not a reset.
pub fn assert_clean_close(reader: &mut impl Read) {
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("a clean close, not a reset");
    assert!(rest.is_empty(), "nothing after the last answer: {rest:?}");
}

/// Reads one response from `r`: status line, headers, and a body framed by
/// Content-Length, chunked encoding, or the end of the connection.
pub fn read_response(r: &mut impl BufRead) -> std::io::Result<Response> {
    let (status, headers) = read_head(r)?;
    let body = read_body(r, status, &headers)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Reads the body of a response whose head [`read_head`] read.
pub fn read_body(
    r: &mut impl BufRead,
    status: u16,
    headers: &HashMap<String, String>,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        while let Some(chunk) = read_chunk(r)? {
            body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| std::io::Error::other("bad content-length"))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// Reads a response head: its status, and its headers by lower-case name.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, HashMap<String, String>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = HashMap::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Ok((status, headers))
}

/// Sends `raw`, a streaming `/invoke`, on a new connection to `addr`; once
/// its first item has arrived (the stream is running), calls `then` (a
/// signal, say), and reads the stream to its end. Returns its NDJSON lines,
/// each parsed.
pub fn stream_cut_after_first_item(addr: SocketAddr, raw: &str, then: impl FnOnce()) -> Vec<Value> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(raw.as_bytes()).expect("write request");
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader).expect("a response head");
    assert_eq!(status, 200);
    let mut body = read_chunk(&mut reader)
        .expect("a first chunk")
        .expect("a first item");
    then();
    while let Some(chunk) = read_chunk(&mut reader).expect("the rest of the stream") {
        body.extend_from_slice(&chunk);
    }
    Response {
        status,
        headers: HashMap::new(),
        body,
    }
    .lines()
}

/// Reads one chunk of a chunked body: `None` at its end.
pub fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let size = usize::from_str_radix(line.trim(), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    let mut chunk = vec![0; size + 2];
    r.read_exact(&mut chunk)?;
    chunk.truncate(size);
    Ok((size > 0).then_some(chunk))
}

pub mod load;

/// A command that runs etl-serve as PID 1 of a new PID namespace:
/// `unshare --pid --fork` as root, or, for any other user, inside a user
/// namespace of its own (`--user --map-root-user`). Fails the test where
/// neither is permitted, rather than leave PID 1 behaviour untested.
pub fn as_pid_1() -> Command {
    let permitted = |namespaces: &[&str]| {
        Command::new("unshare")
            .args(namespaces)
            .args(["--pid", "--fork", "true"])
            .output()
    };
    let namespaces: &[&str] = match permitted(&[]) {
        Ok(out) if out.status.success() => &[],
        _ => match permitted(&["--user", "--map-root-user"]) {
            Ok(out) if out.status.success() => &["--user", "--map-root-user"],
            other => panic!(
                "PID 1 behaviour needs `unshare --pid --fork`, as root or in an \
                 unprivileged user namespace, and neither is permitted here: {other:?}"
            ),
        },
    };
    let mut cmd = Command::new("unshare");
    cmd.args(namespaces)
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_etl-serve"));
    without_inherited_settings(cmd)
}

/// Whether this kernel lets etl-serve attach a socket filter to a TCP
/// socket when it runs as `Server::start_unprivileged` runs it
/// (`unprivileged`), or as `Server::start` does: asked in a child process
/// that, in the first case and when the tests run as root, becomes that
/// user before it tries.
pub fn may_filter_tcp(unprivileged: bool) -> bool {
    use nix::libc;
    use std::os::unix::process::CommandExt;
    let mut probe = std::process::Command::new("true");
    // SAFETY: the closure runs in the forked child before exec, and makes
    // only system calls, with no allocation and no lock.
    unsafe {
        probe.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if unprivileged
                && libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(65532, 65532, 65532) != 0
                    || libc::setresuid(65532, 65532, 65532) != 0)
            {
                return fail();
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                return fail();
            }
            let mut drop_all = [libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: 0,
            }];
            let program = libc::sock_fprog {
                len: 1,
                filter: drop_all.as_mut_ptr(),
            };
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                std::ptr::addr_of!(program).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            );
            if rc != 0 {
                return fail();
            }
            Ok(())
        });
    }
    match probe.status() {
        Ok(status) => status.success(),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
        Err(e) => panic!("could not ask the kernel: {e}"),
    }
}
