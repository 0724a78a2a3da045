//! The command line. Every flag has an environment variable (uvicorn's name
//! where it means the same thing), shown in `--help`; a flag wins over its
//! variable. A bad value is one error line naming the flag, or the variable
//! when that is where the value came from.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, CommandFactory, Parser, ValueEnum};

/// Serve an ETL plugin (a shared library) over the etl plugin HTTP contract.
#[derive(Parser, Debug)]
#[command(name = "etl-serve", version, about, max_term_width = 100)]
pub struct Cli {
    /// Path of the plugin shared library (e.g. target/release/libwordcount.so).
    #[arg(
        long,
        env = "ETL_SERVE_PLUGIN",
        value_name = "PATH",
        required_unless_present = "probe",
        help_heading = "Plugin"
    )]
    pub plugin: Option<PathBuf>,

    /// Configuration string handed to the plugin's init hook.
    #[arg(
        long,
        env = "ETL_SERVE_PLUGIN_CONFIG",
        value_name = "STRING",
        default_value = "",
        hide_default_value = true,
        help_heading = "Plugin"
    )]
    pub plugin_config: String,

    /// Ask the etl-serve that --host/--port (or --uds) point at whether it
    /// is ready: request /readyz, exit 0 on 200 and 1 otherwise. For a
    /// container HEALTHCHECK, where the image has no shell or curl.
    #[arg(long, help_heading = "Plugin")]
    pub probe: bool,

    /// Load and initialise the plugin, print what it declares (name, version,
    /// ABI, capabilities, id, schema), and exit: 0 if it loads, 65 if not.
    #[arg(long, help_heading = "Plugin")]
    pub check: bool,

    /// Address to listen on (the container image sets 0.0.0.0; `::` serves
    /// IPv6 and, where the system allows, IPv4). A host name is resolved,
    /// preferring IPv4 as uvicorn does.
    #[arg(
        long,
        env = "UVICORN_HOST",
        default_value = "127.0.0.1",
        value_parser = parse_host,
        help_heading = "Network"
    )]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free port, shown in the log).
    #[arg(
        long,
        env = "UVICORN_PORT",
        default_value_t = 8000,
        help_heading = "Network"
    )]
    pub port: u16,

    /// Serve on this Unix domain socket instead of --host/--port.
    #[arg(
        long,
        env = "UVICORN_UDS",
        value_name = "PATH",
        help_heading = "Network"
    )]
    pub uds: Option<PathBuf>,

    /// How many connections the kernel may complete before etl-serve
    /// accepts them (capped by the system's net.core.somaxconn).
    #[arg(long, env = "UVICORN_BACKLOG", value_name = "N", default_value = "2048",
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Network")]
    pub backlog: u32,

    /// Answer 503 at once when this many invocations are already in flight,
    /// instead of queueing without bound.
    #[arg(long, env = "UVICORN_LIMIT_CONCURRENCY", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub limit_concurrency: Option<u32>,

    /// Most plugin calls holding a thread at once (every call that does not
    /// run inline: streams, prechecks, slow invocations). Past it, new
    /// work gets 503 rather than waiting behind calls that may never end.
    #[arg(long, env = "ETL_SERVE_PLUGIN_THREADS", value_name = "N", default_value = "512",
          value_parser = clap::value_parser!(u32).range(1..=65536), help_heading = "Limits")]
    pub plugin_threads: u32,

    /// Close a connection that waits this long for its next request. The
    /// smaller of this and --header-read-timeout also bounds how long a
    /// connection the server ends waits for its client to close.
    /// Seconds (5, 2.5) or a duration (5s, 500ms).
    #[arg(long, env = "UVICORN_TIMEOUT_KEEP_ALIVE", value_name = "DURATION", default_value = "5",
          value_parser = parse_duration, help_heading = "Limits")]
    pub timeout_keep_alive: Duration,

    /// Close a connection whose request head (request line and headers) is
    /// not complete this long after etl-serve started waiting for it: the
    /// defence against slow-loris clients.
    #[arg(long, env = "ETL_SERVE_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = parse_duration, help_heading = "Limits")]
    pub header_read_timeout: Duration,

    /// Largest request head accepted; a larger one gets 431, a request line
    /// this long 414.
    /// Bytes, or with a unit: 512KiB, 16MiB, 10MB.
    #[arg(long, env = "ETL_SERVE_MAX_HEADER_SIZE", value_name = "SIZE", default_value = "64KiB",
          value_parser = parse_size, help_heading = "Limits")]
    pub max_header_size: u64,

    /// Largest request body accepted; a larger one gets 413 before it is read.
    /// The reference has no limit, and an ETL document's elements can run
    /// to hundreds of MiB.
    #[arg(long, env = "ETL_SERVE_MAX_BODY_SIZE", value_name = "SIZE", default_value = "256MiB",
          value_parser = parse_size, help_heading = "Limits")]
    pub max_body_size: u64,

    /// Close a connection whose client takes none of a response for this
    /// long (it stopped reading).
    #[arg(long, env = "ETL_SERVE_WRITE_TIMEOUT", value_name = "DURATION", default_value = "30s",
          value_parser = parse_duration, help_heading = "Limits")]
    pub write_timeout: Duration,

    /// Answer 408 to a request whose body stops arriving for this long.
    #[arg(long, env = "ETL_SERVE_BODY_READ_TIMEOUT", value_name = "DURATION", default_value = "10s",
          value_parser = parse_duration, help_heading = "Limits")]
    pub body_read_timeout: Duration,

    /// Most bytes of request bodies held at once, from a body's first byte
    /// until its response starts; a request that would go over gets 503.
    /// At least --max-body-size.
    #[arg(long, env = "ETL_SERVE_MAX_BODY_MEMORY", value_name = "SIZE", default_value = "512MiB",
          value_parser = parse_size, help_heading = "Limits")]
    pub max_body_memory: u64,

    /// How long a shutdown waits for invocations to finish before answering
    /// them with the 503 shutdown-abort and exiting. 0 cancels and exits at
    /// once.
    #[arg(long, env = "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", value_name = "DURATION", default_value = "30",
          value_parser = parse_duration, help_heading = "Shutdown")]
    pub graceful_timeout: Duration,

    /// Log level. RUST_LOG, when set, overrides it with finer filters
    /// (e.g. RUST_LOG=etl_serve=debug).
    #[arg(long, env = "UVICORN_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info, ignore_case = true,
          help_heading = "Logging")]
    pub log_level: LogLevel,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, env = "ETL_SERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text,
          help_heading = "Logging")]
    pub log_format: LogFormat,

    /// Log one line per request (method, path, status, duration, bytes,
    /// request id, client). On by default.
    #[arg(long, env = "UVICORN_ACCESS_LOG", action = ArgAction::Set, num_args = 0..=1,
          default_value = "true", default_missing_value = "true", value_name = "BOOL",
          value_parser = parse_bool, help_heading = "Logging")]
    pub access_log: bool,

    /// Turn the access log off (the same as --access-log=false).
    #[arg(long, help_heading = "Logging")]
    pub no_access_log: bool,

    /// Let the proxies --forwarded-allow-ips names say who the client is
    /// (X-Forwarded-For, in the access log) and which scheme it used
    /// (X-Forwarded-Proto, in redirects). On by default, as in uvicorn.
    #[arg(long, env = "UVICORN_PROXY_HEADERS", action = ArgAction::Set, num_args = 0..=1,
          default_value = "true", default_missing_value = "true", value_name = "BOOL",
          value_parser = parse_bool, help_heading = "Network")]
    pub proxy_headers: bool,

    /// Trust no proxy's headers (the same as --proxy-headers=false).
    #[arg(long, help_heading = "Network")]
    pub no_proxy_headers: bool,

    /// The proxies trusted with proxy headers, comma-separated: IP addresses,
    /// networks (10.0.0.0/8), or `*` alone for every peer; empty trusts none.
    /// When not given, FORWARDED_ALLOW_IPS, else 127.0.0.1,::1 (this host),
    /// as in uvicorn.
    #[arg(
        long,
        env = "UVICORN_FORWARDED_ALLOW_IPS",
        value_name = "LIST",
        help_heading = "Network"
    )]
    pub forwarded_allow_ips: Option<String>,
}

impl Cli {
    /// Whether to write access log lines.
    pub fn access_log(&self) -> bool {
        self.access_log && !self.no_access_log
    }

    /// Whether proxies may speak for the client.
    pub fn proxy_headers(&self) -> bool {
        self.proxy_headers && !self.no_proxy_headers
    }

    /// The trusted proxies' list, with uvicorn's fallbacks. uvicorn reads
    /// FORWARDED_ALLOW_IPS itself, not through click: set to the empty
    /// string, it is an empty list (no proxy trusted), not unset.
    pub fn forwarded_allow_ips(&self) -> String {
        self.forwarded_allow_ips
            .clone()
            .or_else(|| std::env::var("FORWARDED_ALLOW_IPS").ok())
            .unwrap_or_else(|| "127.0.0.1,::1".to_owned())
    }
}

/// uvicorn's log level names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Critical,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The tracing filter directive for this level. tracing has no
    /// critical level; critical shows errors only.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Critical | LogLevel::Error => "error",
            LogLevel::Warning => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Why the command line asks for something other than serving.
#[derive(Debug)]
pub enum NotServing {
    /// `--help` or `--version`: print this to stdout, and exit 0.
    Print(String),
    /// A usage error: print this to stderr (one line; with no arguments
    /// at all, the usage and where to look too), and exit 64.
    Usage(String),
}

/// The smallest `--max-header-size`: a request line and the few headers
/// every client sends.
const MIN_HEADER_SIZE: u64 = 1024;

impl Cli {
    /// Checks the limits that depend on each other, or on what a request
    /// needs at least; the error names the flags.
    ///
    /// # Errors
    /// One line saying which setting is wrong and why.
    pub fn check_limits(&self) -> Result<(), String> {
        if self.max_body_memory < self.max_body_size {
            return Err(format!(
                "--max-body-memory ({} bytes) is smaller than --max-body-size ({} bytes): no body of the largest size could be read",
                self.max_body_memory, self.max_body_size
            ));
        }
        if self.max_header_size < MIN_HEADER_SIZE {
            return Err(format!(
                "--max-header-size {} is too small to carry a request head; use at least {MIN_HEADER_SIZE} bytes (the default is 64KiB)",
                self.max_header_size
            ));
        }
        if self.body_read_timeout.is_zero() {
            return Err("--body-read-timeout must be more than 0".to_owned());
        }
        if self.write_timeout.is_zero() {
            return Err("--write-timeout must be more than 0".to_owned());
        }
        Ok(())
    }
}

/// Parses the command line and the environment.
///
/// # Errors
/// [`NotServing`] for `--help`, `--version` and usage errors.
pub fn parse() -> Result<Cli, NotServing> {
    ignore_empty_variables();
    Cli::try_parse().map_err(|e| match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            NotServing::Print(e.render().to_string())
        }
        // Run with nothing at all: say how to run it, not only what is
        // missing.
        _ if std::env::args_os().len() == 1 => NotServing::Usage(format!(
            "{}\nusage: etl-serve --plugin PATH [--host ADDR] [--port N] [OPTIONS]\nrun `etl-serve --help` for every option",
            one_line(&e)
        )),
        _ => NotServing::Usage(one_line(&e)),
    })
}

/// clap's error as one line, naming the environment variable when the bad
/// value came from it rather than from the flag.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let mut line = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(rest) = line.strip_prefix("error: ") {
        line = rest.to_owned();
    }
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
        // `arg` reads "--port <PORT>".
        let long = arg.split_whitespace().next().unwrap_or_default();
        let on_command_line = std::env::args()
            .skip(1)
            .any(|a| a == long || a.starts_with(&format!("{long}=")));
        if !on_command_line {
            if let Some(var) = env_var_of(long).filter(|v| std::env::var_os(v).is_some()) {
                line = line.replace(
                    &format!("'{arg}'"),
                    &format!("{var} (the variable for {long})"),
                );
            }
        }
    }
    format!("etl-serve: error: {line}")
}

/// The environment variable of the flag `--name`.
fn env_var_of(long: &str) -> Option<String> {
    let name = long.strip_prefix("--")?;
    let cmd = Cli::command();
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(name))?;
    arg.get_env().map(|v| v.to_string_lossy().into_owned())
}

/// Treats a variable set to the empty string as unset, as uvicorn (through
/// click) does, so that a pod spec's `UVICORN_LIMIT_CONCURRENCY: ""` means
/// "no limit" to both. Runs before any thread is started.
fn ignore_empty_variables() {
    for arg in Cli::command().get_arguments() {
        if let Some(var) = arg.get_env() {
            if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
                std::env::remove_var(var);
            }
        }
    }
}

/// The variables of etl-uvicorn's own options, which the Python bridge
/// reads in its place (`VARIABLES` in crates/etl-python, with the APP's and
/// the sealed-settings flag's); etl-serve's flags read the other
/// `UVICORN_*` variables it knows.
const BRIDGE_VARIABLES: [&str; 8] = [
    "UVICORN_APP",
    "UVICORN_APP_DIR",
    "UVICORN_METHOD_NAME",
    "UVICORN_PLUGIN_ID",
    "UVICORN_PLUGIN_ID_METHOD",
    "UVICORN_PRECHECK_APP",
    "UVICORN_PRECHECK_APP_METHOD",
    "UVICORN_SEALED_DAG_NODE_SETTINGS_V2",
];

/// The `UVICORN_*` variables set, and not empty, that nothing in etl-serve
/// reads, sorted: a pod spec written for etl-uvicorn may carry any of
/// uvicorn's. The caller logs them, so that none is dropped unseen.
///
/// # Errors
/// One line for a variable that would have turned TLS on under uvicorn:
/// serving plain HTTP in its place would send in the clear what was meant
/// to be encrypted.
pub fn unread_uvicorn_variables() -> Result<Vec<String>, String> {
    let cmd = Cli::command();
    let read: Vec<&std::ffi::OsStr> = cmd.get_arguments().filter_map(|a| a.get_env()).collect();
    let mut unread: Vec<String> = std::env::vars_os()
        .filter(|(_, value)| !value.is_empty())
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("UVICORN_"))
        .filter(|name| !read.iter().any(|r| *r == name.as_str()))
        .filter(|name| !BRIDGE_VARIABLES.contains(&name.as_str()))
        .collect();
    unread.sort();
    if let Some(tls) = unread
        .iter()
        .find(|name| *name == "UVICORN_SSL_CERTFILE" || *name == "UVICORN_SSL_KEYFILE")
    {
        return Err(format!(
            "{tls} is set, but etl-serve serves plain HTTP only: terminate TLS in front of it (an ingress or a sidecar) and unset the variable"
        ));
    }
    Ok(unread)
}

/// The OpenTelemetry exporters asked for, as `(variable, value)`:
/// etl-uvicorn exports traces and metrics of every request when
/// `OTEL_TRACES_EXPORTER` or `OTEL_METRICS_EXPORTER` names one (`otlp`,
/// `console`), and etl-serve exports nothing over OpenTelemetry, so the
/// caller says so.
pub fn otel_exporters_asked() -> Vec<(&'static str, String)> {
    ["OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"]
        .into_iter()
        .filter_map(|var| {
            let value = std::env::var(var).ok()?;
            let asked = value
                .split(',')
                .map(str::trim)
                .any(|exporter| !exporter.is_empty() && exporter != "none");
            asked.then_some((var, value))
        })
        .collect()
}

/// An IP address, or a host name resolved to its first IPv4 address (its
/// first address when it has no IPv4 one): uvicorn binds a name with an
/// IPv4 socket.
fn parse_host(s: &str) -> Result<IpAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = s.parse() {
        return Ok(ip);
    }
    let addrs: Vec<IpAddr> = (s, 0)
        .to_socket_addrs()
        .map_err(|e| format!("`{s}` is neither an IP address nor a host name that resolves: {e}"))?
        .map(|a| a.ip())
        .collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("the host name `{s}` resolves to no address"))
}

/// Seconds as uvicorn reads them (`30`, `2.5`), or a humantime duration
/// (`30s`, `1m30s`, `500ms`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let expected = "expected seconds (30, 2.5) or a duration (30s, 1m30s, 500ms)";
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("`{s}` is not a duration: {expected}"));
    }
    humantime::parse_duration(t).map_err(|_| format!("`{s}` is not a duration: {expected}"))
}

/// Parses `16MiB`, `512KiB`, `10MB`, `1024`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (expected e.g. 1048576, 512KiB, 16MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// A boolean as environment variables spell it, with every spelling
/// click (and so uvicorn) takes.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
        _ => Err(format!(
            "`{s}` is not a boolean (true/false, 1/0, yes/no, on/off, t/f, y/n)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_bool("FALSE"), Ok(false));
        assert_eq!(parse_bool("1"), Ok(true));
        // click's short spellings, which uvicorn takes.
        assert_eq!(parse_bool(" Y"), Ok(true));
        assert_eq!(parse_bool("f"), Ok(false));
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn proxy_headers_are_on_unless_turned_off() {
        let parse = |flags: &[&str]| {
            let args = ["etl-serve", "--plugin", "p.so"].iter().chain(flags);
            Cli::try_parse_from(args).unwrap().proxy_headers()
        };
        assert!(parse(&[]));
        assert!(parse(&["--proxy-headers"]));
        assert!(!parse(&["--no-proxy-headers"]));
        assert!(!parse(&["--proxy-headers=false"]));
    }

    #[test]
    fn every_flag_but_the_switches_has_an_environment_variable() {
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            let switches = [
                "check",
                "probe",
                "no_access_log",
                "no_proxy_headers",
                "help",
                "version",
            ];
            if switches.contains(&id) {
                continue;
            }
            assert!(
                arg.get_env().is_some(),
                "--{id} has no environment variable"
            );
        }
    }
}
