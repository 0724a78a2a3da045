//! Starting, probing and stopping the servers under test: etl-serve, the
//! bare hyper baseline, the reference host, and etl-serve serving the
//! reference's Python plugin through the Python bridge.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::http;

/// Which host a server is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Host {
    EtlServe,
    BareHyper,
    Reference,
    /// etl-serve with `libetl_python.so`, serving the reference's plugin
    /// module from the reference's virtualenv.
    PythonBridge,
}

impl Host {
    pub fn label(self) -> &'static str {
        match self {
            Host::EtlServe => "etl-serve",
            Host::BareHyper => "bare hyper",
            Host::Reference => "etl-uvicorn",
            Host::PythonBridge => "etl-serve, Python bridge",
        }
    }
}

/// Where the programs are.
pub struct Paths {
    /// `target/release`.
    pub release: PathBuf,
    /// The reference's virtualenv, when the run includes it.
    pub venv: Option<PathBuf>,
    /// `bench/reference`, the Python plugins.
    pub python_plugins: PathBuf,
    /// Where servers' stderr goes.
    pub logs: PathBuf,
}

/// How to start one server: the host, the plugin, extra flags and env.
pub struct Spec<'a> {
    pub host: Host,
    pub plugin: &'a str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl<'a> Spec<'a> {
    pub fn new(host: Host, plugin: &'a str) -> Spec<'a> {
        Spec {
            host,
            plugin,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    fn command(&self, paths: &Paths, port: u16) -> Command {
        let port = port.to_string();
        let mut cmd = match self.host {
            Host::EtlServe => {
                let mut cmd = Command::new(paths.release.join("etl-serve"));
                let lib = paths.release.join(format!("lib{}.so", self.plugin));
                cmd.arg("--plugin")
                    .arg(lib)
                    .args(["--port", &port, "--no-access-log"]);
                cmd
            }
            Host::BareHyper => {
                let mut cmd = Command::new(paths.release.join("bare-hyper"));
                cmd.arg(&port);
                cmd
            }
            Host::PythonBridge => {
                let venv = paths
                    .venv
                    .as_ref()
                    .expect("the bridge runs only with the reference's venv");
                let mut cmd = Command::new(paths.release.join("etl-serve"));
                cmd.arg("--plugin")
                    .arg(paths.release.join("libetl_python.so"))
                    .arg("--plugin-config")
                    .arg(format!("etl_bench_plugins:{}", self.plugin))
                    .args(["--port", &port, "--no-access-log"])
                    .env("VIRTUAL_ENV", venv)
                    .env("PYTHONPATH", &paths.python_plugins);
                cmd
            }
            Host::Reference => {
                let venv = paths
                    .venv
                    .as_ref()
                    .expect("the reference runs only with a venv");
                let mut cmd = Command::new(venv.join("bin/etl-uvicorn"));
                cmd.arg(format!("etl_bench_plugins:{}", self.plugin))
                    .args(["--port", &port, "--no-access-log", "--log-level", "warning"])
                    .args(["--loop", "uvloop", "--http", "httptools"])
                    .env("PYTHONPATH", &paths.python_plugins);
                cmd
            }
        };
        cmd.args(&self.args);
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        cmd
    }
}

/// A running server.
pub struct Server {
    pub host: Host,
    pub addr: SocketAddr,
    child: Option<Child>,
    /// From exec to the first answered `GET /id`.
    pub startup: Duration,
}

/// The longest a stop may take before the process is killed.
pub const STOP_LIMIT: Duration = Duration::from_secs(60);

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral loopback port")
}

impl Server {
    /// Starts the server and waits until it answers `GET /id`.
    pub fn start(spec: &Spec<'_>, paths: &Paths) -> Result<Server, String> {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_path = paths.logs.join(format!(
            "{}-{}.log",
            spec.host.label().replace(' ', "-"),
            spec.plugin
        ));
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = spec.command(paths, port);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.host.label()))?;
        let mut server = Server {
            host: spec.host,
            addr,
            child: Some(child),
            startup: Duration::ZERO,
        };
        let deadline = started + Duration::from_secs(60);
        loop {
            if http::get(addr, "/id", Duration::from_secs(5)).is_ok() {
                server.startup = started.elapsed();
                return Ok(server);
            }
            if let Some(status) = server.child_mut().try_wait().ok().flatten() {
                return Err(format!(
                    "{} exited during startup ({status}); see {}",
                    spec.host.label(),
                    log_path.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not answer within 60 s", spec.host.label()));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a running server has its child")
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// Resident set size now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmRSS:")
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let _ = kill(self.pid(), Signal::SIGTERM);
    }

    /// Waits for the process to exit, at most `limit`: past it the process
    /// is killed and `None` says so. The wait itself blocks in `waitpid`, so
    /// the moment of exit is seen at once.
    pub fn wait(mut self, limit: Duration) -> Option<ExitStatus> {
        let pid = self.pid();
        let mut child = self.child.take().expect("running");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait().expect("wait for a child"));
        });
        let status = rx.recv_timeout(limit).ok();
        if status.is_none() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        let _ = waiter.join();
        status
    }

    /// SIGTERM, then waits at most a minute: how long it took, and how it
    /// ended.
    pub fn stop(self) -> (Duration, Option<ExitStatus>) {
        let started = Instant::now();
        self.sigterm();
        let status = self.wait(STOP_LIMIT);
        (started.elapsed(), status)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `kB` field of `/proc/PID/status`, 0 when unreadable.
fn status_field(pid: Pid, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether a program is there to run.
pub fn require(path: &Path, hint: &str) -> Result<(), String> {
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("{} is missing: {hint}", path.display()))
    }
}
