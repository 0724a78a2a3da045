//! etl-serve: serve an ETL plugin loaded from a shared library over the etl
//! plugin HTTP contract.
//!
//! Where things are: `app` (startup and the top-level flow), `shutdown`
//! (signals and the drain), `reaper` (orphans, when PID 1), `server` (the
//! accept loop), `routes` (every HTTP
//! route), `plugin` (loading a library through the C ABI), `invocation`
//! (the host side of one call into the plugin), `envelope`, `validate`,
//! `plugin_id` and `openapi` (what the routes answer).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

mod app;
mod cli;
mod envelope;
mod invocation;
mod openapi;
mod plugin;
mod plugin_id;
mod reaper;
mod routes;
mod server;
mod shutdown;
mod validate;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { app::exit::USAGE } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match app::run(cli) {
        Ok(code) => code,
        Err(fatal) => {
            eprintln!("etl-serve: error: {fatal}");
            fatal.exit_code()
        }
    }
}
