//! etl-serve: serve an ETL plugin loaded from a shared library over the etl
//! plugin HTTP contract.
//!
//! Where things are: `app` (startup, the [`app::App`] the routes serve,
//! and the top-level flow), `shutdown` (signals and the drain: the whole
//! sequence from SIGTERM to the exit code), `reaper` (orphans, when PID 1),
//! `server` (the accept loop), `conn` (one connection's plumbing under
//! hyper), `routes` (every HTTP route, a file per concern), `inline` (which
//! thread a plugin call runs on, and the inline path whole), `plugin`
//! (loading a library through the C ABI), `invocation` (the host side of
//! one call into the plugin), `envelope` and `openapi` (what the routes
//! answer), `cli`, `probe` (`--probe`, a health check), `logging`,
//! `metrics`, `proxy` (which peers may name the client and its scheme),
//! `crash` (making a plugin crash visible), `unique` (ids without a
//! contended counter), `sync` (locking that outlives a panic), and
//! `no_libm` (why the binary does not load libm). How a body becomes
//! the plugin's input, and the plugin id, are the `etl-dialect` crate's.

use std::process::ExitCode;

mod app;
mod cli;
mod conn;
mod crash;
mod envelope;
mod inline;
mod invocation;
mod logging;
mod metrics;
mod no_libm;
mod openapi;
mod plugin;
mod probe;
mod proxy;
mod reaper;
mod routes;
mod server;
mod shutdown;
mod signals;
mod sync;
mod unique;

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(cli::NotServing::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(cli::NotServing::Usage(line)) => {
            eprintln!("{line}");
            return ExitCode::from(app::exit::USAGE);
        }
    };
    if cli.probe {
        return probe::run(&cli);
    }
    logging::init(cli.log_level, cli.log_format);
    crash::install();
    let result = app::run(cli);
    logging::flush();
    match result {
        Ok(code) => code,
        Err(fatal) => {
            eprintln!("etl-serve: error: {fatal}");
            fatal.exit_code()
        }
    }
}
