//! Logs: tracing-subscriber writing to stderr, as text or one JSON object
//! per line, at uvicorn's level names (RUST_LOG overrides with finer
//! filters); and the access log, one line per request.
//!
//! Lines are handed to a thread of their own, which writes them. A log pipe
//! nobody reads therefore never stalls a request or the shutdown: once
//! [`BUFFERED_LINES`] wait, further lines are dropped and counted
//! (`etl_serve_log_lines_dropped_total`).
//!
//! Text lines carry no colours, also on a terminal: tracing-subscriber's
//! `ansi` feature paints every field name and separator even with colours
//! off, which cost the access log about 3,800 instructions a line. Its
//! `tracing-log` feature is off too: nothing here logs through `log`.
//!
//! Request and response bodies are never logged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::cli::{LogFormat, LogLevel};
use crate::proxy::Client;
use crate::sync::lock;

/// Lines waiting for the log thread before new ones are dropped: at a few
/// hundred bytes a line, a few megabytes at most.
const BUFFERED_LINES: usize = 10_000;

/// The most bytes the log thread writes to stderr at once. It gathers the
/// lines that wait together into one write(2), and flushes whenever no
/// line waits (tracing-appender's loop), so a line alone is written at
/// once. POSIX keeps a write of at most this many bytes to a pipe in one
/// piece, so lines stay whole next to what a plugin writes to the same
/// stderr. With the access log on, gathering took a tenth of the server's
/// CPU time per request and two thirds of its context switches away.
const PIPE_BUF: usize = 4096;

/// Flushes the waiting lines when dropped; see [`flush`].
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();
/// Whether the logs are JSON (`--log-format json`).
static JSON: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber.
pub fn init(level: LogLevel, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.directive()));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("etl-serve-log")
        .finish(std::io::BufWriter::with_capacity(
            PIPE_BUF,
            std::io::stderr(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    JSON.store(matches!(format, LogFormat::Json), Ordering::Relaxed);
    *lock(&WRITER) = Some(guard);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        // Fields at the top level, next to timestamp, level and message.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

/// Writes out the lines still waiting, before the process exits or writes
/// to stderr itself. Bounded: when the pipe does not take them, gives up
/// after about a second. Later lines are dropped.
pub fn flush() {
    drop(lock(&WRITER).take());
}

/// Lines dropped because the log thread could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// One access log line.
pub struct Access<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub elapsed: Duration,
    pub bytes: u64,
    pub request_id: &'a str,
    pub client: Option<&'a Client>,
}

impl Access<'_> {
    /// Writes the line. In text the message says the method, path and
    /// status, so the fields add only the rest; in JSON every one is a
    /// field of its own as well, for queries.
    pub fn log(&self) {
        let duration_ms = (self.elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        let client = self.client.map(tracing::field::display);
        if JSON.load(Ordering::Relaxed) {
            tracing::info!(
                target: "etl_serve::access",
                method = self.method,
                path = self.path,
                status = self.status,
                duration_ms,
                bytes = self.bytes,
                request_id = self.request_id,
                client,
                "{} {} {}",
                self.method,
                self.path,
                self.status
            );
        } else {
            tracing::info!(
                target: "etl_serve::access",
                duration_ms,
                bytes = self.bytes,
                request_id = self.request_id,
                client,
                "{} {} {}",
                self.method,
                self.path,
                self.status
            );
        }
    }
}

/// A line a plugin wrote through the `log` callback (ABI 1.1), at its
/// `ETL_LOG_*` level (anything else reads as info), with the request id of
/// the invocation it named, if any.
pub fn plugin_line(level: i32, request_id: Option<&str>, message: &str) {
    macro_rules! line {
        ($level:expr) => {
            match request_id {
                Some(request_id) => {
                    tracing::event!(target: "etl_serve::plugin", $level, request_id, "{message}")
                }
                None => tracing::event!(target: "etl_serve::plugin", $level, "{message}"),
            }
        };
    }
    match level {
        etl_abi::LOG_ERROR => line!(tracing::Level::ERROR),
        etl_abi::LOG_WARN => line!(tracing::Level::WARN),
        etl_abi::LOG_DEBUG => line!(tracing::Level::DEBUG),
        etl_abi::LOG_TRACE => line!(tracing::Level::TRACE),
        _ => line!(tracing::Level::INFO),
    }
}
