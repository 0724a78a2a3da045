//! Startup: load the plugin, build the [`App`] the routes serve, bind,
//! serve, and shut down. `main` calls [`run`] and turns its error into one
//! line and an exit code.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::cli::Cli;
use crate::conn::Connections;
use crate::inline::{self, InlineCalls, InvokeRescue};
use crate::openapi;
use crate::plugin::{LoadError, Plugin};
use crate::proxy::Proxies;
use crate::reaper;
use crate::routes::body::{BodyLimits, MemoryBudget};
use crate::server::{self, ConnLimits, Listener};
use crate::shutdown::{self, Drain};
use crate::signals::ShutdownSignals;
use etl_dialect::validate::{reserved, InputModel};

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
    /// A bad combination of flags that clap does not check.
    Config(String),
    Plugin {
        path: String,
        error: LoadError,
    },
    Bind {
        addr: String,
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

/// Everything the routes need, built once at startup.
pub struct App {
    /// Never unloaded: a thread abandoned at the drain timeout may still be
    /// running its code when the process exits.
    pub plugin: &'static Plugin,
    /// Which plugin calls run inline (see `inline`).
    pub inline: &'static InlineCalls<InvokeRescue>,
    pub drain: Drain,
    pub inputs: InputModel,
    /// How request bodies are read: the size, pause and memory limits.
    pub body: BodyLimits,
    /// Most requests waiting on the plugin at once; more get 503.
    pub limit_concurrency: Option<usize>,
    /// Whether to log one line per request.
    pub access_log: bool,
    /// The peers trusted to name the client and its scheme.
    pub proxies: Proxies,
    pub schema_body: Bytes,
    pub id_body: Bytes,
    pub metadata_body: Bytes,
    pub openapi_body: Bytes,
    pub docs_body: Bytes,
}

/// `GET /metadata`, in the reference's key order: the reserved fields are
/// always accepted; the sealed settings capability only when the plugin
/// says it opens sealed documents.
fn metadata(m: &crate::plugin::Manifest) -> Bytes {
    let mut capabilities = vec!["invocation_settings", "invocation_context"];
    if m.capabilities & etl_abi::CAP_SEALED_SETTINGS_V2 != 0 {
        capabilities.push("invoke_with_sealed_dag_node_settings_v2");
    }
    Bytes::from(format!(
        r#"{{"api_version":"3","identifier":{},"capabilities":{}}}"#,
        serde_json::Value::from(m.id.as_str()),
        serde_json::Value::from(capabilities)
    ))
}

impl App {
    /// Prepares the routes for `plugin`, configured by `cli`, on a runtime
    /// with `workers` worker threads (see `inline`).
    ///
    /// # Errors
    /// The inputs schema cannot be compiled into a validator.
    fn new(plugin: Plugin, cli: &Cli, workers: usize, drain: Drain) -> Result<App, String> {
        let m = plugin.manifest();
        // The reference's feature flag, read once: the pod's environment.
        let require_sealed =
            reserved::requires_sealed(std::env::var(reserved::REQUIRE_SEALED_ENV).ok().as_deref());
        if require_sealed {
            info!(
                "{} is on: every /invoke must carry sealed dag_node_settings",
                reserved::REQUIRE_SEALED_ENV
            );
        }
        let inputs = InputModel::new(m.request())?.requiring_sealed_settings(require_sealed);
        let json = |v: &serde_json::Value| {
            Bytes::from(serde_json::to_vec(v).expect("a Value always serialises"))
        };
        let openapi = openapi::document(m);
        let proxies = if cli.proxy_headers() {
            let (proxies, texts) = Proxies::parse(&cli.forwarded_allow_ips());
            for text in texts {
                warn!(
                    "--forwarded-allow-ips: `{text}` is neither an IP address nor a network (host bits clear, as in 10.0.0.0/8): it trusts no peer, and only an X-Forwarded-For entry written the same way"
                );
            }
            proxies
        } else {
            Proxies::none()
        };
        Ok(App {
            inputs,
            body: BodyLimits {
                max: cli.max_body_size,
                pause: cli.body_read_timeout,
                memory: MemoryBudget::new(cli.max_body_memory),
            },
            limit_concurrency: cli.limit_concurrency.map(|n| n as usize),
            access_log: cli.access_log(),
            proxies,
            schema_body: json(&m.schema),
            id_body: json(&serde_json::Value::from(m.id.as_str())),
            metadata_body: metadata(m),
            docs_body: Bytes::from(openapi::docs_page(m)),
            openapi_body: json(&openapi),
            plugin: Box::leak(Box::new(plugin)),
            inline: Box::leak(Box::new(InlineCalls::new(workers))),
            drain,
        })
    }

    /// Starts the thread that watches the plugin calls running inline, and
    /// answers those still inside the plugin at the drain timeout (see
    /// `inline`). Called once, from inside the runtime.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start_inline_watchdog(&'static self) -> std::io::Result<()> {
        let drain = self.drain.clone();
        let runtime = tokio::runtime::Handle::current();
        self.inline.start_watchdog(
            move || drain.has_expired(),
            // A task spawned from outside the runtime wakes a parked worker.
            move || drop(runtime.spawn(async {})),
        )
    }
}

/// Loads the plugin, serves it until a shutdown signal, and drains; with
/// `--check`, prints what the plugin declares instead of serving it.
///
/// # Errors
/// A [`Fatal`] when the plugin cannot be loaded or the address bound;
/// nothing has been served then.
pub fn run(cli: Cli) -> Result<ExitCode, Fatal> {
    cli.check_limits().map_err(Fatal::Config)?;
    for name in crate::cli::unread_uvicorn_variables().map_err(Fatal::Config)? {
        warn!(
            variable = %name,
            "{name} is set, and etl-serve does not read it: it has no effect here"
        );
    }
    for (name, value) in crate::cli::otel_exporters_asked() {
        warn!(
            variable = name,
            "{name}={value} is set, and etl-serve exports nothing over OpenTelemetry: its metrics are at /metrics, and the access log names each request by its x-request-id"
        );
    }
    let workers = runtime_workers();
    let plugin_threads = cli.plugin_threads as usize;
    inline::set_plugin_threads(plugin_threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        // One more for loading the plugin.
        .max_blocking_threads(plugin_threads + 1)
        .thread_stack_size(THREAD_STACK)
        .enable_all()
        .thread_name("etl-serve")
        .build()
        .map_err(|e| Fatal::Os(format!("cannot start the async runtime: {e}")))?;
    let code = runtime.block_on(start(&cli, workers));
    // Do not wait for blocking threads: an abandoned plugin call never ends.
    runtime.shutdown_background();
    code
}

/// Everything from the signal handlers to the exit code, on the runtime.
async fn start(cli: &Cli, workers: usize) -> Result<ExitCode, Fatal> {
    // The handlers come first, so that a signal sent while the plugin
    // initialises is not lost (as PID 1, one without a handler is dropped).
    let mut signals = ShutdownSignals::install()
        .map_err(|e| Fatal::Os(format!("cannot install signal handlers: {e}")))?;
    if std::process::id() == 1 {
        reaper::spawn();
    }
    let plugin_path = cli
        .plugin
        .clone()
        .expect("the command line requires --plugin unless --probe");
    info!(path = %plugin_path.display(), "loading the plugin");
    let (path, config) = (plugin_path.clone(), cli.plugin_config.clone());
    let loading = tokio::task::spawn_blocking(move || Plugin::load(&path, &config));
    let plugin = tokio::select! {
        loaded = loading => loaded
            .map_err(|e| Fatal::Os(format!("the plugin loader thread failed: {e}")))?
            .map_err(|error| Fatal::Plugin {
                path: plugin_path.display().to_string(),
                error,
            })?,
        signal = signals.next() => shutdown::stopped_while_loading(signal),
    };
    if cli.check {
        print!("{}", check_report(&plugin_path, &plugin));
        plugin.shutdown();
        return Ok(ExitCode::SUCCESS);
    }
    let m = plugin.manifest();
    info!(
        plugin = %m.name, version = %m.version, id = %m.id,
        abi = %format!("{}.{}", m.abi_major, m.abi_minor),
        streaming = m.streaming, capabilities = %m.capability_names().join(","),
        "plugin loaded"
    );
    let drain = Drain::default();
    let app = App::new(plugin, cli, workers, drain.clone()).map_err(|why| Fatal::Plugin {
        path: plugin_path.display().to_string(),
        error: LoadError::BadSchema(why),
    })?;
    // Lives as long as the process: requests borrow it without counting.
    let app: &'static App = Box::leak(Box::new(app));
    let served = serve(cli, app, drain, signals).await;
    if served.is_err() {
        // Nothing was served (the address could not be bound): the plugin
        // was initialised, so it is shut down as at any other exit.
        app.plugin.shutdown();
        info!("nothing was served; the plugin's shutdown hook ran");
    }
    served
}

async fn serve(
    cli: &Cli,
    app: &'static App,
    drain: Drain,
    mut signals: ShutdownSignals,
) -> Result<ExitCode, Fatal> {
    let limits = ConnLimits {
        head_timeout: cli.timeout_keep_alive.min(cli.header_read_timeout),
        max_header_size: usize::try_from(cli.max_header_size).unwrap_or(usize::MAX),
        write_timeout: cli.write_timeout,
    };
    let timeout = humantime::format_duration(cli.graceful_timeout);
    match &cli.uds {
        Some(path) => {
            let listener = bind_unix(path)?;
            set_backlog(&listener, cli.backlog).map_err(|error| Fatal::Bind {
                addr: format!("unix:{}", path.display()),
                error,
            })?;
            info!(socket = %path.display(), graceful_timeout = %timeout, "listening on unix:{}", path.display());
            // The socket file is removed when the listener closes.
            serve_on(listener, app, limits, drain, &mut signals, cli).await
        }
        None => {
            let addr = SocketAddr::new(cli.host, cli.port);
            let bind_error = |error| Fatal::Bind {
                addr: addr.to_string(),
                error,
            };
            let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
            set_backlog(&listener, cli.backlog).map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            info!(address = %local, graceful_timeout = %timeout, "listening on http://{local}");
            serve_on(listener, app, limits, drain, &mut signals, cli).await
        }
    }
}

/// Serves until a shutdown signal, then runs the shutdown sequence.
async fn serve_on<L: Listener>(
    listener: L,
    app: &'static App,
    limits: ConnLimits,
    drain: Drain,
    signals: &mut ShutdownSignals,
    cli: &Cli,
) -> Result<ExitCode, Fatal> {
    app.start_inline_watchdog()
        .map_err(|e| Fatal::Os(format!("cannot start the inline-call watchdog: {e}")))?;
    // The listener accepts until the very end of the drain.
    let connections: &'static Connections = Box::leak(Box::default());
    let (close_listener, closed) = tokio::sync::oneshot::channel::<()>();
    let accepting = tokio::spawn(server::accept_until(
        listener,
        app,
        limits,
        connections,
        async {
            let _ = closed.await;
        },
    ));

    let signal = signals.next().await;
    let drained = shutdown::drain(&drain, signals, signal, cli.graceful_timeout).await;

    let _ = close_listener.send(());
    let plugin = app.plugin;
    Ok(shutdown::finish(
        connections,
        accepting,
        signals,
        || plugin.shutdown(),
        drained,
    )
    .await)
}

/// Sets the listen backlog: how many connections the kernel completes
/// before they are accepted (`--backlog`). Listening again on a listening
/// socket only changes its backlog; the kernel caps it at
/// `net.core.somaxconn`.
fn set_backlog(listener: &impl std::os::fd::AsFd, backlog: u32) -> std::io::Result<()> {
    use nix::sys::socket::{listen, Backlog};
    let backlog = Backlog::new(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    listen(listener, backlog)?;
    Ok(())
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by an
/// earlier run but never another kind of file, nor the socket of a server
/// that is still listening on it.
///
/// The socket's mode is uvicorn's: `0o666`, so that a client running as
/// another user (a sidecar) may connect, or the stale file's mode when it
/// replaces one. What may reach it is then the directory's to decide.
fn bind_unix(path: &PathBuf) -> Result<UnixListener, Fatal> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_error = |error| Fatal::Bind {
        addr: format!("unix:{}", path.display()),
        error,
    };
    let mut mode = 0o666;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Fatal::Config(format!(
                "--uds {}: the path exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Fatal::Config(format!(
                "--uds {}: another process is listening on this socket; refusing to replace it",
                path.display()
            )));
        }
        mode = meta.permissions().mode() & 0o7777;
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    Ok(listener)
}

/// What `--check` prints.
fn check_report(path: &Path, plugin: &Plugin) -> String {
    let m = plugin.manifest();
    let caps = m.capability_names();
    format!(
        "plugin:       {} {}\nfile:         {}\nabi:          {}.{} (this etl-serve speaks {}.{})\nstreaming:    {}\ncapabilities: {}\nprecheck:     {}\nid:           {}\nschema:\n{}\n",
        m.name,
        m.version,
        path.display(),
        m.abi_major,
        m.abi_minor,
        etl_abi::ABI_VERSION_MAJOR,
        etl_abi::ABI_VERSION_MINOR,
        if m.streaming { "yes" } else { "no" },
        if caps.is_empty() { "none".to_owned() } else { caps.join(", ") },
        if m.has_precheck { "yes" } else { "no" },
        m.id,
        serde_json::to_string_pretty(&m.schema).expect("a Value always serialises"),
    )
}

/// The stack of every runtime thread, where plugins run and bodies are
/// checked. A thread's default on Linux (glibc takes `ulimit -s`, 8 MiB),
/// which is what plugins written for the reference host ran on, rather
/// than Rust's 2 MiB. Checking a body nested `validate::MAX_DEPTH` deep
/// takes about 3 MiB in a debug build and under 1 MiB in release. Only
/// the pages a thread touches are resident.
const THREAD_STACK: usize = 8 << 20;

/// One async worker per CPU the process may use, and at least two, so that
/// a quick plugin can be called inline while one worker stays free (see
/// `inline`).
fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}
