//! `libetl_python.so`: serves a Python plugin written for etl-uvicorn
//! through etl-serve, unchanged.
//!
//! ```text
//! etl-serve --plugin libetl_python.so --plugin-config 'wc_plugin:count' --port 8080
//! ```
//!
//! `--plugin-config` takes etl-uvicorn's own words: the APP (`module:attr`)
//! and its options `--app-dir`, `--method-name`, `--plugin-id`,
//! `--plugin-id-method`, `--precheck-app`, `--precheck-app-method`,
//! `--sealed-dag-node-settings-v2`; what they leave out comes from the
//! variables etl-uvicorn reads for it (`UVICORN_APP`,
//! `UVICORN_METHOD_NAME`, ...). The bridge embeds CPython (through pyo3), puts the
//! working directory, `--app-dir` and the `VIRTUAL_ENV`'s site-packages on
//! the import path (`PYTHONPATH` is honoured by Python itself), and lets
//! the reference host's own package, imported from there, wrap the function
//! (`bridge.py`). The plugin's schema and id are known only once it is
//! imported, so `init` describes them to the host (ABI 1.1).
//!
//! The reserved `/invoke` fields reach the function as the reference binds
//! them (`current_invocation_settings()`, `current_invocation_context()`),
//! resolved by `utic_invocation_settings` from the plugin's virtualenv.
//!
//! A `cancellation_token` parameter is injected (`is_cancelled()`,
//! `raise_if_cancelled()`), reading the host's cancel flag of the call; a
//! `PluginShutdown` the function raises is the 503 shutdown-abort.
//!
//! An async function runs as a task of one shared event loop, cancelled
//! (`CancelledError`) when its flag is set; a sync one still running when
//! the graceful deadline is near gets `PluginShutdown` raised in its thread
//! (`forced`).
//!
//! A generator function, sync or async, streams: each item is a line with
//! what the function reported so far, as etl-uvicorn streams an async
//! generator (`call`).

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use etl_abi as abi;
use pyo3::prelude::*;
use pyo3::types::PyModule;

mod call;
mod forced;

/// The table: static, with placeholder schemas that `init` replaces.
struct Table(abi::EtlPlugin);

// SAFETY: the table is never written; its pointers are to static strings.
unsafe impl Sync for Table {}

static TABLE: Table = Table(abi::EtlPlugin {
    abi_version_major: abi::ABI_VERSION_MAJOR,
    abi_version_minor: abi::ABI_VERSION_MINOR,
    struct_size: std::mem::size_of::<abi::EtlPlugin>() as u32,
    name: abi::EtlStr::from_str("python"),
    version: abi::EtlStr::from_str(env!("CARGO_PKG_VERSION")),
    inputs_schema: abi::EtlStr::from_str(r#"{"type":"object"}"#),
    outputs_schema: abi::EtlStr::from_str(r#"{"type":"object"}"#),
    id: abi::EtlStr::EMPTY,
    capabilities: abi::CAP_USAGE | abi::CAP_MESSAGE_CHANNELS | abi::CAP_FILEDATA_META,
    flags: 0,
    init: Some(init),
    shutdown: None,
    invoke: Some(call::invoke),
    precheck: Some(call::precheck),
    finish: None,
});

/// The entry symbol.
#[no_mangle]
pub extern "C" fn etl_plugin_entry() -> *const abi::EtlPlugin {
    &TABLE.0
}

/// The host's cancel flag of one invocation, as `bridge.py`'s
/// `CancellationToken` reads it.
#[pyclass(frozen)]
pub(crate) struct Flag {
    pub(crate) word: Option<&'static AtomicU32>,
}

/// Whether the plugin is a generator function, which `invoke` streams.
pub(crate) static STREAMS: AtomicBool = AtomicBool::new(false);

#[pymethods]
impl Flag {
    fn is_set(&self) -> bool {
        self.word.is_some_and(|w| w.load(Ordering::Acquire) != 0)
    }
}

/// The helper module (`bridge.py`), once loaded.
pub(crate) static BRIDGE: OnceLock<Py<PyModule>> = OnceLock::new();

/// What `--plugin-config` says, in etl-uvicorn's words.
#[derive(Debug, Default, PartialEq)]
struct Config {
    app: String,
    app_dir: Option<String>,
    method_name: Option<String>,
    plugin_id: Option<String>,
    plugin_id_method: Option<String>,
    precheck_app: Option<String>,
    precheck_app_method: Option<String>,
    sealed_settings_v2: bool,
}

/// etl-uvicorn reads each of its options from a variable too (click's
/// `UVICORN_` prefix) when the command line does not give it, and so does
/// the bridge: a pod spec written for etl-uvicorn keeps its meaning. The
/// host names the same ones (`BRIDGE_VARIABLES` in its `cli.rs`), so as
/// not to warn that nothing reads them.
const VARIABLES: [&str; 6] = [
    "UVICORN_APP_DIR",
    "UVICORN_METHOD_NAME",
    "UVICORN_PLUGIN_ID",
    "UVICORN_PLUGIN_ID_METHOD",
    "UVICORN_PRECHECK_APP",
    "UVICORN_PRECHECK_APP_METHOD",
];

/// A boolean variable as click reads it.
fn click_bool(var: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
        _ => Err(format!(
            "{var}: `{value}` is not a boolean (1, true, t, yes, y, on; 0, false, f, no, n, off)"
        )),
    }
}

impl Config {
    /// Reads `text`, the words of `--plugin-config`, and where they leave
    /// an option out, its variable through `env` (which answers `None` for
    /// a variable that is unset or empty, as click counts it).
    fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let words = shlex::split(text).ok_or("unbalanced quotes in --plugin-config")?;
        let mut config = Config::default();
        let mut words = words.into_iter();
        while let Some(word) = words.next() {
            let (name, inline) = match word.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                _ => (word.clone(), None),
            };
            if name == "--sealed-dag-node-settings-v2" && inline.is_none() {
                config.sealed_settings_v2 = true;
                continue;
            }
            let slot = match name.as_str() {
                "--app-dir" => &mut config.app_dir,
                "--method-name" => &mut config.method_name,
                "--plugin-id" => &mut config.plugin_id,
                "--plugin-id-method" => &mut config.plugin_id_method,
                "--precheck-app" => &mut config.precheck_app,
                "--precheck-app-method" => &mut config.precheck_app_method,
                other if other.starts_with('-') => {
                    return Err(format!(
                        "--plugin-config: unknown or not yet supported option `{other}`"
                    ))
                }
                _ if config.app.is_empty() => {
                    config.app = word;
                    continue;
                }
                _ => return Err(format!("--plugin-config: a second APP `{word}`")),
            };
            let value = match inline {
                Some(v) => v,
                None => words
                    .next()
                    .ok_or_else(|| format!("--plugin-config: `{name}` needs a value"))?,
            };
            *slot = Some(value);
        }
        let slots = [
            &mut config.app_dir,
            &mut config.method_name,
            &mut config.plugin_id,
            &mut config.plugin_id_method,
            &mut config.precheck_app,
            &mut config.precheck_app_method,
        ];
        for (var, slot) in VARIABLES.into_iter().zip(slots) {
            if slot.is_none() {
                *slot = env(var);
            }
        }
        const SEALED: &str = "UVICORN_SEALED_DAG_NODE_SETTINGS_V2";
        if !config.sealed_settings_v2 {
            if let Some(value) = env(SEALED) {
                config.sealed_settings_v2 = click_bool(SEALED, &value)?;
            }
        }
        if config.app.is_empty() {
            config.app = env("UVICORN_APP").ok_or(
                "--plugin-config (or UVICORN_APP) must name the APP, as for etl-uvicorn: `module:attr`",
            )?;
        }
        Ok(config)
    }
}

unsafe extern "C" fn init(ctx: *const abi::EtlInitCtx) -> i32 {
    // SAFETY: the host passes a valid context for the call.
    let ctx = unsafe { &*ctx };
    let fail = |message: &str| {
        // SAFETY: set_error and host_data come from the host for this call.
        unsafe { (ctx.set_error)(ctx.host_data, abi::EtlStr::from_str(message)) };
        1
    };
    if (ctx.struct_size as usize) <= std::mem::offset_of!(abi::EtlInitCtx, describe) {
        return fail("the Python bridge needs an etl-serve that speaks ABI 1.1");
    }
    // SAFETY: the config is borrowed for the call.
    let Ok(text) = std::str::from_utf8(unsafe { ctx.config.as_bytes() }) else {
        return fail("--plugin-config is not valid UTF-8");
    };
    let variable = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = match Config::parse(text, variable) {
        Ok(c) => c,
        Err(why) => return fail(&why),
    };
    match std::panic::catch_unwind(|| load(&config)) {
        Ok(Ok((inputs, outputs, id, streams, request))) => {
            STREAMS.store(streams, Ordering::Relaxed);
            let description = abi::EtlDescription {
                struct_size: std::mem::size_of::<abi::EtlDescription>() as u32,
                name: abi::EtlStr::from_str(&config.app),
                version: abi::EtlStr {
                    ptr: std::ptr::null(),
                    len: 0,
                },
                inputs_schema: abi::EtlStr::from_str(&inputs),
                outputs_schema: abi::EtlStr::from_str(&outputs),
                id: abi::EtlStr::from_str(&id),
                capabilities: if config.sealed_settings_v2 {
                    abi::CAP_SEALED_SETTINGS_V2
                } else {
                    0
                },
                flags: if streams { abi::FLAG_STREAMING } else { 0 },
                request_schema: if request == inputs {
                    abi::EtlStr::EMPTY
                } else {
                    abi::EtlStr::from_str(&request)
                },
            };
            // SAFETY: the callback and host_data come from the host; the
            // description is borrowed for the call.
            unsafe { (ctx.describe)(ctx.host_data, &description) };
            0
        }
        Ok(Err((line, traceback))) => {
            log(ctx.host, abi::LOG_ERROR, &traceback);
            fail(&line)
        }
        Err(_) => fail("the Python bridge panicked while loading the plugin"),
    }
}

/// What the plugin is, as `bridge.load` describes it: its inputs and
/// outputs schemas, its id, whether it streams, and the schema its requests
/// are checked against.
type Described = (String, String, String, bool, String);

/// Starts Python, imports the plugin, and describes it; or gives the
/// error's one line and its traceback.
fn load(config: &Config) -> Result<Described, (String, String)> {
    prepare_the_libraries();
    Python::initialize();
    Python::attach(|py| {
        if let Some(why) = venv_of_another_python(py) {
            return Err((format!("cannot load {}: {why}", config.app), why));
        }
        let run = || -> PyResult<Described> {
            let sys = py.import("sys")?;
            let path = sys.getattr("path")?;
            path.call_method1(
                "insert",
                (0, std::env::current_dir()?.to_string_lossy().to_string()),
            )?;
            if let Some(dir) = &config.app_dir {
                path.call_method1("insert", (0, dir))?;
            }
            if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
                let version = sys.getattr("version_info")?;
                let (major, minor): (u32, u32) = (
                    version.getattr("major")?.extract()?,
                    version.getattr("minor")?.extract()?,
                );
                let site_packages = format!("{venv}/lib/python{major}.{minor}/site-packages");
                py.import("site")?
                    .call_method1("addsitedir", (site_packages,))?;
            }
            let code = CString::new(include_str!("bridge.py")).expect("no NUL in bridge.py");
            let bridge =
                PyModule::from_code(py, &code, c"etl_serve_bridge.py", c"etl_serve_bridge")?;
            let described = bridge.call_method1(
                "load",
                (
                    &config.app,
                    &config.method_name,
                    &config.plugin_id,
                    &config.plugin_id_method,
                    &config.precheck_app,
                    &config.precheck_app_method,
                ),
            )?;
            let _ = BRIDGE.set(bridge.unbind());
            described.extract()
        };
        run().map_err(|e| {
            // One line for the startup error; the whole text is in the
            // traceback logged beside it.
            let what = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let line = format!("cannot load {}: {what}", config.app);
            let traceback = py
                .import("traceback")
                .and_then(|t| t.call_method1("format_exception", (e.value(py),)))
                .and_then(|lines| lines.extract::<Vec<String>>())
                .map(|lines| lines.concat())
                .unwrap_or_else(|_| line.clone());
            (line, traceback)
        })
    })
}

/// Why `VIRTUAL_ENV` cannot serve this Python, if it cannot: it has no
/// site-packages for the embedded Python's version (most likely it was
/// made with another Python, whose packages would not import, or import
/// wrongly).
fn venv_of_another_python(py: Python<'_>) -> Option<String> {
    let venv = std::env::var("VIRTUAL_ENV").ok()?;
    let v = py.version_info();
    let site_packages = format!("{venv}/lib/python{}.{}/site-packages", v.major, v.minor);
    if std::path::Path::new(&site_packages).is_dir() {
        return None;
    }
    Some(format!(
        "VIRTUAL_ENV {venv} has no {site_packages}: the bridge embeds Python {}.{}, \
         so the plugin's virtualenv must be made with Python {}.{}{}",
        v.major,
        v.minor,
        v.major,
        v.minor,
        other_pythons(&venv)
    ))
}

/// ` (it holds packages for python3.12)`, naming the Pythons a virtualenv
/// has packages for; empty when it has none.
fn other_pythons(venv: &str) -> String {
    let Ok(entries) = std::fs::read_dir(format!("{venv}/lib")) else {
        return String::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("python"))
        .collect();
    found.sort();
    if found.is_empty() {
        String::new()
    } else {
        format!(" (it holds packages for {})", found.join(", "))
    }
}

/// Opens again, with `flags` added, the loaded library that holds
/// `symbol`. RTLD_NOLOAD: only what is already loaded is touched.
fn reopen_holder_of(symbol: *const c_void, flags: libc::c_int) {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address.
    let found = unsafe { libc::dladdr(symbol, &mut info) };
    if found != 0 && !info.dli_fname.is_null() {
        // SAFETY: the name is a loaded library's.
        unsafe { libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NOLOAD | flags) };
    }
}

/// Python's extension modules (pydantic's core, for one) look up the
/// interpreter's symbols globally, but libpython came in with this
/// library, which the host opened with local symbols: reopen it global.
/// And this library stays mapped until the process ends, whatever the host
/// does: once Python has started, its objects (the classes defined here),
/// and the thread-local destructors of the threads that called it, point
/// into this library's code, and unmapping it (a host unloading a plugin
/// that failed to load, say) would leave them pointing at nothing.
fn prepare_the_libraries() {
    reopen_holder_of(
        pyo3::ffi::Py_IsInitialized as *const c_void,
        libc::RTLD_GLOBAL,
    );
    reopen_holder_of(etl_plugin_entry as *const c_void, libc::RTLD_NODELETE);
}

/// Writes `message` into the host's log.
fn log(host: *const abi::EtlHostApi, level: i32, message: &str) {
    // SAFETY: the host's table is static; this bridge requires ABI 1.1.
    let host = unsafe { &*host };
    unsafe { (host.log)(std::ptr::null_mut(), level, abi::EtlStr::from_str(message)) };
}

#[cfg(test)]
mod tests {
    use super::Config;

    /// No variable set.
    fn none(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn plugin_config_takes_etl_uvicorns_words() {
        let c = Config::parse(
            "wc:Counter --method-name run --plugin-id 'ids:the id'",
            none,
        )
        .unwrap();
        assert_eq!(c.app, "wc:Counter");
        assert_eq!(c.method_name.as_deref(), Some("run"));
        assert_eq!(c.plugin_id.as_deref(), Some("ids:the id"));
        assert_eq!(
            Config::parse("--app-dir=src m:f", none)
                .unwrap()
                .app_dir
                .as_deref(),
            Some("src")
        );
        let c = Config::parse(
            "m:f --precheck-app m:ready --sealed-dag-node-settings-v2",
            none,
        )
        .unwrap();
        assert_eq!(c.precheck_app.as_deref(), Some("m:ready"));
        assert!(c.sealed_settings_v2);
        assert!(Config::parse("", none).is_err());
        assert!(Config::parse("m:f --reload", none)
            .unwrap_err()
            .contains("--reload"));
        assert!(Config::parse("m:f --method-name", none).is_err());
        assert!(Config::parse("m:f other:g", none).is_err());
    }

    #[test]
    fn options_left_out_come_from_etl_uvicorns_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let c = Config::parse(
            "",
            env(&[
                ("UVICORN_APP", "wc:Counter"),
                ("UVICORN_METHOD_NAME", "run"),
                ("UVICORN_PLUGIN_ID", "the-id"),
                ("UVICORN_PRECHECK_APP", "wc:ready"),
                ("UVICORN_SEALED_DAG_NODE_SETTINGS_V2", " Y"),
            ]),
        )
        .unwrap();
        assert_eq!(c.app, "wc:Counter");
        assert_eq!(c.method_name.as_deref(), Some("run"));
        assert_eq!(c.plugin_id.as_deref(), Some("the-id"));
        assert_eq!(c.precheck_app.as_deref(), Some("wc:ready"));
        assert!(c.sealed_settings_v2);
        // The words win over the variables.
        let c = Config::parse(
            "m:f --method-name call",
            env(&[
                ("UVICORN_APP", "wc:Counter"),
                ("UVICORN_METHOD_NAME", "run"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.app.as_str(), c.method_name.as_deref()),
            ("m:f", Some("call"))
        );
        let off = Config::parse(
            "m:f",
            env(&[("UVICORN_SEALED_DAG_NODE_SETTINGS_V2", "off")]),
        );
        assert!(!off.unwrap().sealed_settings_v2);
        let bad = Config::parse(
            "m:f",
            env(&[("UVICORN_SEALED_DAG_NODE_SETTINGS_V2", "maybe")]),
        );
        assert!(bad
            .unwrap_err()
            .starts_with("UVICORN_SEALED_DAG_NODE_SETTINGS_V2: `maybe`"));
    }
}
