//! The command line. Every flag has an environment variable, and the flag
//! wins over it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Serve an ETL plugin (a shared library) over the etl plugin HTTP contract.
#[derive(Parser, Debug)]
#[command(name = "etl-serve", version, about, max_term_width = 100)]
pub struct Cli {
    /// Path of the plugin shared library (e.g. target/release/libwordcount.so).
    #[arg(long, env = "ETL_SERVE_PLUGIN", value_name = "PATH")]
    pub plugin: PathBuf,

    /// Configuration string handed to the plugin's init hook.
    #[arg(
        long,
        env = "ETL_SERVE_PLUGIN_CONFIG",
        value_name = "STRING",
        default_value = "",
        hide_default_value = true
    )]
    pub plugin_config: String,

    /// Address to listen on.
    #[arg(
        long,
        env = "UVICORN_HOST",
        default_value = "127.0.0.1",
        help_heading = "Network"
    )]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free port and logs it).
    #[arg(
        long,
        env = "UVICORN_PORT",
        default_value_t = 8000,
        help_heading = "Network"
    )]
    pub port: u16,

    /// Largest request body accepted; larger ones get 413 before they are read.
    /// Bytes, or with a unit: 512KiB, 16MiB, 1GiB, 10MB.
    #[arg(long, env = "ETL_SERVE_MAX_BODY_SIZE", value_name = "SIZE", default_value = "16MiB",
          value_parser = parse_size, help_heading = "Limits")]
    pub max_body_size: u64,

    /// How long a shutdown waits for invocations to finish before answering
    /// them with the 503 shutdown-abort and exiting: 30s, 1m30s, 500ms, or
    /// seconds (2.5). 0 cancels and exits at once.
    /// [env: UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=] [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Shutdown")]
    pub graceful_timeout: Option<Duration>,
}

/// The environment variable for `--graceful-timeout`, uvicorn's name.
pub const GRACEFUL_TIMEOUT_ENV: &str = "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN";
const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);

impl Cli {
    /// The graceful timeout: the flag, else the environment variable, else
    /// 30 s.
    ///
    /// # Errors
    /// The variable is set to something that is not a duration; the message
    /// names it and its value.
    pub fn graceful_timeout(&self) -> Result<Duration, String> {
        if let Some(d) = self.graceful_timeout {
            return Ok(d);
        }
        match std::env::var(GRACEFUL_TIMEOUT_ENV) {
            Ok(v) => parse_duration(&v)
                .map_err(|why| format!("invalid {GRACEFUL_TIMEOUT_ENV}={v:?}: {why}")),
            Err(std::env::VarError::NotPresent) => Ok(DEFAULT_GRACEFUL_TIMEOUT),
            Err(std::env::VarError::NotUnicode(v)) => Err(format!(
                "invalid {GRACEFUL_TIMEOUT_ENV}={v:?}: not valid UTF-8"
            )),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_size};
    use std::time::Duration;

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
}
