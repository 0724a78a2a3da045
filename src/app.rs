//! Startup: load the plugin, bind, serve, and shut down. `main` calls
//! [`run`] and turns its error into one line and an exit code.

use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;

use crate::cli::Cli;
use crate::plugin::{LoadError, Plugin};
use crate::reaper;
use crate::routes::App;
use crate::server;
use crate::shutdown::{self, Drain, ShutdownSignals};

/// Exit codes of a failed start (those of a shutdown are in
/// [`crate::shutdown::exit`]).
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
    /// A bad flag or environment variable that clap does not check.
    Config(String),
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
            Fatal::Config(_) => exit::USAGE,
            Fatal::Plugin { .. } => exit::PLUGIN,
            Fatal::Bind { .. } | Fatal::Os(_) => exit::OS,
        })
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::Config(why) => f.write_str(why),
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
    let graceful_timeout = cli.graceful_timeout().map_err(Fatal::Config)?;
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
    let drain = Drain::default();
    let app = App::new(plugin, cli.max_body_size, drain.clone()).map_err(|why| Fatal::Plugin {
        path: cli.plugin.display().to_string(),
        error: LoadError::BadSchema(why),
    })?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("etl-serve")
        .build()
        .map_err(|e| Fatal::Os(format!("cannot start the async runtime: {e}")))?;
    let code = runtime.block_on(serve(&cli, Arc::new(app), drain, graceful_timeout));
    // Do not wait for blocking threads: an abandoned plugin call never ends.
    runtime.shutdown_background();
    code
}

async fn serve(
    cli: &Cli,
    app: Arc<App>,
    drain: Drain,
    graceful_timeout: Duration,
) -> Result<ExitCode, Fatal> {
    let mut signals = ShutdownSignals::install()
        .map_err(|e| Fatal::Os(format!("cannot install signal handlers: {e}")))?;
    let addr = SocketAddr::new(cli.host, cli.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| Fatal::Bind { addr, error })?;
    let local = listener
        .local_addr()
        .map_err(|error| Fatal::Bind { addr, error })?;
    if std::process::id() == 1 {
        reaper::spawn();
    }
    info!(address = %local, graceful_timeout = %humantime::format_duration(graceful_timeout), "listening on http://{local}");

    // The listener accepts until the very end of the drain.
    let (close_listener, closed) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::accept_until(listener, app.clone(), async {
        let _ = closed.await;
    }));

    let signal = signals.next().await;
    let code = shutdown::drain(&drain, &mut signals, signal, graceful_timeout).await;

    let _ = close_listener.send(());
    let connections = server
        .await
        .map_err(|e| Fatal::Os(format!("the accept loop failed: {e}")))?;
    let plugin = app.plugin();
    Ok(shutdown::finish(
        connections.shutdown(),
        &mut signals,
        || plugin.shutdown(),
        code,
    )
    .await)
}
