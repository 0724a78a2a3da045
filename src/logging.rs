//! Logs: tracing-subscriber writing to stderr, as text or one JSON object
//! per line, at uvicorn's level names (RUST_LOG overrides with finer
//! filters); and the access log, one line per request.
//!
//! Request and response bodies are never logged.

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::cli::{LogFormat, LogLevel};

/// Installs the global subscriber.
pub fn init(level: LogLevel, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.directive()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level, next to timestamp, level and message.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// One access log line.
pub struct Access<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub elapsed: Duration,
    pub bytes: u64,
    pub request_id: &'a str,
}

impl Access<'_> {
    pub fn log(&self) {
        tracing::info!(
            target: "etl_serve::access",
            method = self.method,
            path = self.path,
            status = self.status,
            duration_ms = (self.elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            bytes = self.bytes,
            request_id = self.request_id,
            "{} {} {}",
            self.method,
            self.path,
            self.status
        );
    }
}
