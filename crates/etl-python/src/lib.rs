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
//! `--sealed-dag-node-settings-v2`. The bridge embeds CPython (through pyo3), puts the
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
//! Not yet served: generators (streaming) and the envelope's `file_data`.

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use etl_abi as abi;
use pyo3::prelude::*;
use pyo3::types::{PyModule, PyString, PyTuple};

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
    invoke: Some(invoke),
    precheck: Some(precheck),
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
struct Flag {
    word: Option<&'static AtomicU32>,
}

#[pymethods]
impl Flag {
    fn is_set(&self) -> bool {
        self.word.is_some_and(|w| w.load(Ordering::Acquire) != 0)
    }
}

/// The helper module (`bridge.py`), once loaded.
static BRIDGE: OnceLock<Py<PyModule>> = OnceLock::new();

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

impl Config {
    fn parse(text: &str) -> Result<Config, String> {
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
        if config.app.is_empty() {
            return Err(
                "--plugin-config must name the APP, as for etl-uvicorn: `module:attr`".into(),
            );
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
    let config = match Config::parse(text) {
        Ok(c) => c,
        Err(why) => return fail(&why),
    };
    match std::panic::catch_unwind(|| load(&config)) {
        Ok(Ok((inputs, outputs, id))) => {
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
                flags: 0,
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

/// Starts Python, imports the plugin, and returns its schemas and id; or
/// the error's one line and its traceback.
fn load(config: &Config) -> Result<(String, String, String), (String, String)> {
    make_libpython_global();
    Python::initialize();
    Python::attach(|py| {
        let run = || -> PyResult<(String, String, String)> {
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

/// Python's extension modules (pydantic's core, for one) look up the
/// interpreter's symbols globally, but libpython came in with this
/// library, which the host opened with local symbols. Reopen it global.
fn make_libpython_global() {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address; Py_IsInitialized is a symbol
    // of the libpython this library links.
    let found = unsafe { libc::dladdr(pyo3::ffi::Py_IsInitialized as *const c_void, &mut info) };
    if found != 0 && !info.dli_fname.is_null() {
        // SAFETY: the name is the loaded library's; RTLD_NOLOAD only
        // promotes what is already there.
        unsafe {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD,
            )
        };
    }
}

/// Writes `message` into the host's log.
fn log(host: *const abi::EtlHostApi, level: i32, message: &str) {
    // SAFETY: the host's table is static; this bridge requires ABI 1.1.
    let host = unsafe { &*host };
    unsafe { (host.log)(std::ptr::null_mut(), level, abi::EtlStr::from_str(message)) };
}

/// What `bridge.invoke` returns.
type Answer = (
    u16,
    Option<String>,
    Option<String>,
    Option<(String, String, Option<String>, Option<String>, bool)>,
    Option<String>,
    Vec<(String, String)>,
    Vec<String>,
    Vec<String>,
    String,
);

/// The status `bridge.py` returns for a plugin that stopped on its token.
const SHUTDOWN: u16 = 0;

/// Why `bridge.py` returned no answer.
enum NoAnswer {
    /// The forced stop's `PluginShutdown` landed in the bridge's own code
    /// rather than in the plugin's.
    Stopped,
    Error(String),
}

impl From<String> for NoAnswer {
    fn from(why: String) -> NoAnswer {
        NoAnswer::Error(why)
    }
}

impl From<&str> for NoAnswer {
    fn from(why: &str) -> NoAnswer {
        NoAnswer::Error(why.into())
    }
}

const DEFAULT_FILEDATA_META: &str = r#"{"terminate_current":false,"new_records":[]}"#;

unsafe extern "C" fn invoke(ctx: *const abi::EtlInvokeCtx, request: abi::EtlStr) -> i32 {
    // SAFETY: the host passes a valid context and request for the call,
    // and (this bridge requires 1.1) a context with the reserved fields.
    let (ctx, request) = unsafe { (&*ctx, request.as_bytes()) };
    let text = |s: abi::EtlStr| String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned();
    let args = [
        String::from_utf8_lossy(request).into_owned(),
        text(ctx.invocation_settings),
        text(ctx.invocation_context),
    ];
    run(ctx, "invoke", &args)
}

unsafe extern "C" fn precheck(ctx: *const abi::EtlInvokeCtx) -> i32 {
    // SAFETY: the host passes a valid context for the call.
    run(unsafe { &*ctx }, "precheck", &[])
}

/// Calls `method` of the bridge with `args` and reports what it returned.
fn run(ctx: &abi::EtlInvokeCtx, method: &str, args: &[String]) -> i32 {
    // SAFETY: the host's table is static.
    let host = unsafe { &*ctx.host };
    let inv = ctx.invocation;
    // SAFETY: the host's flag stays mapped until the process exits and is
    // only written atomically (etl_plugin.h); AtomicU32 has its layout.
    let word = unsafe { ctx.cancel_flag.cast::<AtomicU32>().as_ref() };
    let answer: Result<Answer, NoAnswer> = std::panic::catch_unwind(|| {
        Python::attach(|py| {
            let bridge = BRIDGE.get().ok_or("called before init")?.bind(py);
            let mut items: Vec<Bound<'_, PyAny>> = args
                .iter()
                .map(|a| PyString::new(py, a).into_any())
                .collect();
            items.push(
                Bound::new(py, Flag { word })
                    .map_err(|e| e.to_string())?
                    .into_any(),
            );
            let args = PyTuple::new(py, items).map_err(|e| e.to_string())?;
            let listed = forced::list(py, host, inv, word);
            let answer = bridge
                .call_method1(method, args)
                .and_then(|r| r.extract::<Answer>());
            listed.unlist(py);
            answer.map_err(|e| {
                if e.get_type(py).name().is_ok_and(|n| n == "PluginShutdown") {
                    NoAnswer::Stopped
                } else {
                    NoAnswer::Error(e.to_string())
                }
            })
        })
    })
    .unwrap_or_else(|_| Err("the Python bridge panicked".into()));
    let (status, text, category, plugin_error, output, usage, infos, warnings, meta) = match answer
    {
        Ok(a) => a,
        Err(NoAnswer::Stopped) => return abi::RESULT_SHUTDOWN,
        Err(NoAnswer::Error(why)) => {
            let why = format!("[PythonBridgeError] {why}");
            let failure = abi::EtlFailure {
                struct_size: std::mem::size_of::<abi::EtlFailure>() as u32,
                status_code: 500,
                status_code_text: abi::EtlStr::from_str(&why),
                failure_category: abi::EtlStr::EMPTY,
                plugin_error: std::ptr::null(),
            };
            // SAFETY: valid handle during the call; borrowed arguments.
            unsafe { (host.report_failure)(inv, &failure) };
            return abi::RESULT_FAILED;
        }
    };
    // SAFETY (every callback below): valid handle during the call; the
    // arguments are borrowed for the call.
    for (name, value) in &usage {
        let (name, value) = (abi::EtlStr::from_str(name), abi::EtlStr::from_str(value));
        unsafe { (host.add_usage_text)(inv, name, value) };
    }
    for m in &infos {
        unsafe { (host.add_info)(inv, abi::EtlStr::from_str(m)) };
    }
    for m in &warnings {
        unsafe { (host.add_warning)(inv, abi::EtlStr::from_str(m)) };
    }
    if !meta.is_empty() && meta != DEFAULT_FILEDATA_META {
        unsafe { (host.set_filedata_meta)(inv, abi::EtlStr::from_str(&meta)) };
    }
    if status == SHUTDOWN {
        return abi::RESULT_SHUTDOWN;
    }
    if status == 200 {
        if method == "invoke" {
            let output = output.unwrap_or_else(|| "null".into());
            unsafe { (host.emit)(inv, abi::EtlStr::from_str(&output)) };
        }
        return abi::RESULT_OK;
    }
    let nullable = |s: &Option<String>| {
        s.as_deref()
            .map_or(abi::EtlStr::EMPTY, abi::EtlStr::from_str)
    };
    let plugin_error =
        plugin_error.as_ref().map(
            |(t, r, dependency, audience, retryable)| abi::EtlPluginError {
                error_type: abi::EtlStr::from_str(t),
                error_reason: abi::EtlStr::from_str(r),
                dependency: nullable(dependency),
                audience: match audience.as_deref() {
                    Some("user") => abi::AUDIENCE_USER,
                    Some("platform") => abi::AUDIENCE_PLATFORM,
                    _ => abi::AUDIENCE_NONE,
                },
                retryable: u32::from(*retryable),
            },
        );
    let text = text.unwrap_or_default();
    let failure = abi::EtlFailure {
        struct_size: std::mem::size_of::<abi::EtlFailure>() as u32,
        status_code: i32::from(status),
        status_code_text: abi::EtlStr::from_str(&text),
        failure_category: nullable(&category),
        plugin_error: plugin_error
            .as_ref()
            .map_or(std::ptr::null(), |e| e as *const abi::EtlPluginError),
    };
    unsafe { (host.report_failure)(inv, &failure) };
    abi::RESULT_FAILED
}

#[cfg(test)]
mod tests {
    use super::Config;

    #[test]
    fn plugin_config_takes_etl_uvicorns_words() {
        let c = Config::parse("wc:Counter --method-name run --plugin-id 'ids:the id'").unwrap();
        assert_eq!(c.app, "wc:Counter");
        assert_eq!(c.method_name.as_deref(), Some("run"));
        assert_eq!(c.plugin_id.as_deref(), Some("ids:the id"));
        assert_eq!(
            Config::parse("--app-dir=src m:f")
                .unwrap()
                .app_dir
                .as_deref(),
            Some("src")
        );
        let c = Config::parse("m:f --precheck-app m:ready --sealed-dag-node-settings-v2").unwrap();
        assert_eq!(c.precheck_app.as_deref(), Some("m:ready"));
        assert!(c.sealed_settings_v2);
        assert!(Config::parse("").is_err());
        assert!(Config::parse("m:f --reload")
            .unwrap_err()
            .contains("--reload"));
        assert!(Config::parse("m:f --method-name").is_err());
        assert!(Config::parse("m:f other:g").is_err());
    }
}
