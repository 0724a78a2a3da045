//! Startup: load the plugin, bind, serve, and shut down. `main` calls
//! [`run`] and turns its error into one line and an exit code.

use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::cli::Cli;
use crate::invocation;
use crate::plugin::{LoadError, Plugin};
use crate::routes::App;
use crate::server;
use crate::shutdown::ShutdownSignals;

/// Exit codes (also in docs/operations.md).
pub mod exit {
    /// Bad flags or environment variables (EX_USAGE).
    pub const USAGE: u8 = 64;
    /// The plugin could not be loaded or initialised.
    pub const PLUGIN: u8 = 65;
    /// The address could not be bound, or another OS failure (EX_OSERR).
    pub const OS: u8 = 71;
}

/// A reason etl-serve could not start.
#[derive(Debug)]
pub enum Fatal {
    Plugin {
        path: String,
        error: LoadError,
    },
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    Os(String),
}

impl Fatal {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Fatal::Plugin { .. } => exit::PLUGIN,
            Fatal::Bind { .. } | Fatal::Os(_) => exit::OS,
        })
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::Plugin { path, error } => write!(f, "cannot load plugin {path}: {error}"),
            Fatal::Bind { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            Fatal::Os(why) => f.write_str(why),
        }
    }
}

/// Loads the plugin, serves it until a shutdown signal, and drains.
///
/// # Errors
/// A [`Fatal`] when the plugin cannot be loaded or the port bound; nothing
/// has been served then.
pub fn run(cli: Cli) -> Result<ExitCode, Fatal> {
    let plugin = Plugin::load(&cli.plugin, &cli.plugin_config).map_err(|error| Fatal::Plugin {
        path: cli.plugin.display().to_string(),
        error,
    })?;
    let m = plugin.manifest();
    info!(
        plugin = %m.name, version = %m.version, id = %m.id,
        abi = %format!("{}.{}", m.abi_major, m.abi_minor),
        streaming = m.streaming, capabilities = ?m.capability_names(),
        "plugin loaded"
    );
    let app = App::new(plugin, cli.max_body_size).map_err(|why| Fatal::Plugin {
        path: cli.plugin.display().to_string(),
        error: LoadError::BadSchema(why),
    })?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("etl-serve")
        .build()
        .map_err(|e| Fatal::Os(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(serve(cli, Arc::new(app)))
}

async fn serve(cli: Cli, app: Arc<App>) -> Result<ExitCode, Fatal> {
    let mut signals = ShutdownSignals::install()
        .map_err(|e| Fatal::Os(format!("cannot install signal handlers: {e}")))?;
    let addr = SocketAddr::new(cli.host, cli.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| Fatal::Bind { addr, error })?;
    let local = listener
        .local_addr()
        .map_err(|error| Fatal::Bind { addr, error })?;
    info!(address = %local, "listening on http://{local}");

    let mut signal_name = "";
    let graceful = server::accept_until(listener, app.clone(), async {
        signal_name = signals.next().await;
    })
    .await;

    let in_flight = invocation::cancel_all();
    info!(
        signal = signal_name,
        in_flight, "shutdown started: cancel flags set, draining"
    );
    tokio::select! {
        () = graceful.shutdown() => {}
        second = signals.next() => {
            warn!(signal = second, "second signal: exiting at once");
            return Ok(ExitCode::from(130));
        }
        () = tokio::time::sleep(Duration::from_secs(30)) => {
            warn!(abandoned = invocation::live_count(), "drain timed out after 30 s");
            return Ok(ExitCode::from(1));
        }
    }
    if invocation::live_count() == 0 {
        app.plugin().shutdown();
    }
    info!("drained; exiting");
    Ok(ExitCode::SUCCESS)
}
