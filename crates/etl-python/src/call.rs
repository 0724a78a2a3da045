//! One call into the Python plugin: `invoke` and `precheck` of the table
//! call `bridge.py` with the GIL held, and report what it answered through
//! the host's callbacks. A generator function's items reach the host as
//! they come, through a [`Sink`], with the GIL released around each
//! callback (an `emit` may wait for a slow client).

use std::sync::atomic::{AtomicU32, Ordering};

use etl_abi as abi;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::{forced, Flag, BRIDGE, STREAMS};

/// What `bridge.py`'s `invoke`, `stream` and `precheck` return (its module
/// docs say what each part is).
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
    String,
);

/// The status of an answer for a plugin that stopped on its token.
const SHUTDOWN: u16 = 0;

/// The status of an answer refusing the request: its text is the 422's
/// body.
const REJECTED: u16 = 1;

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

pub unsafe extern "C" fn invoke(ctx: *const abi::EtlInvokeCtx, request: abi::EtlStr) -> i32 {
    // SAFETY: the host passes a valid context and request for the call,
    // and (this bridge requires 1.1) a context with the reserved fields.
    let (ctx, request) = unsafe { (&*ctx, request.as_bytes()) };
    let text = |s: abi::EtlStr| String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned();
    let args = [
        String::from_utf8_lossy(request).into_owned(),
        text(ctx.invocation_settings),
        text(ctx.invocation_context),
    ];
    if STREAMS.load(Ordering::Relaxed) {
        run(ctx, "stream", &args)
    } else {
        run(ctx, "invoke", &args)
    }
}

pub unsafe extern "C" fn precheck(ctx: *const abi::EtlInvokeCtx) -> i32 {
    // SAFETY: the host passes a valid context for the call.
    run(unsafe { &*ctx }, "precheck", &[])
}

/// Where a streaming call hands its items: the host's callbacks for the
/// invocation.
#[pyclass(frozen)]
struct Sink {
    host: &'static abi::EtlHostApi,
    /// The invocation's handle, valid while the call runs, which is as long
    /// as `bridge.py` holds the sink.
    invocation: usize,
}

#[pymethods]
impl Sink {
    /// Reports what is new since the last item, then emits the item;
    /// false once the client is gone. The GIL is released meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn item(
        &self,
        py: Python<'_>,
        usage: Vec<(String, String)>,
        infos: Vec<String>,
        warnings: Vec<String>,
        filedata_meta: String,
        file_data: String,
        output: String,
    ) -> bool {
        let news = News {
            usage,
            infos,
            warnings,
            filedata_meta,
            file_data,
        };
        let (host, handle) = (self.host, self.invocation);
        py.detach(|| {
            let inv = handle as *mut abi::EtlInvocation;
            news.report(host, inv);
            // SAFETY: valid handle during the call; the output is borrowed.
            let rc = unsafe { (host.emit)(inv, abi::EtlStr::from_str(&output)) };
            rc == abi::CB_OK
        })
    }
}

/// What a call reported that the host has not been told yet.
struct News {
    usage: Vec<(String, String)>,
    infos: Vec<String>,
    warnings: Vec<String>,
    /// JSON text to set, or empty.
    filedata_meta: String,
    /// JSON text to set, or empty.
    file_data: String,
}

impl News {
    fn report(&self, host: &abi::EtlHostApi, inv: *mut abi::EtlInvocation) {
        // SAFETY (every callback below): valid handle during the call; the
        // arguments are borrowed for the call.
        for (name, value) in &self.usage {
            let (name, value) = (abi::EtlStr::from_str(name), abi::EtlStr::from_str(value));
            unsafe { (host.add_usage_text)(inv, name, value) };
        }
        for m in &self.infos {
            unsafe { (host.add_info)(inv, abi::EtlStr::from_str(m)) };
        }
        for m in &self.warnings {
            unsafe { (host.add_warning)(inv, abi::EtlStr::from_str(m)) };
        }
        if !self.filedata_meta.is_empty() {
            let meta = abi::EtlStr::from_str(&self.filedata_meta);
            unsafe { (host.set_filedata_meta)(inv, meta) };
        }
        if !self.file_data.is_empty() {
            unsafe { (host.set_file_data)(inv, abi::EtlStr::from_str(&self.file_data)) };
        }
    }
}

/// A Python thread state this thread keeps between calls.
///
/// Attaching a thread that has none makes CPython create one and, on
/// detaching, destroy it again: for every call. The host calls from a
/// pool of threads that live on between calls, so each keeps its state
/// (without the GIL) until the thread ends.
struct KeptThreadState {
    state: pyo3::ffi::PyGILState_STATE,
    saved: *mut pyo3::ffi::PyThreadState,
}

impl KeptThreadState {
    fn new() -> KeptThreadState {
        // SAFETY: Python is initialised (init ran); this thread holds no
        // GIL here, so Ensure attaches it and SaveThread lets the GIL go
        // again, keeping the thread state.
        unsafe {
            let state = pyo3::ffi::PyGILState_Ensure();
            let saved = pyo3::ffi::PyEval_SaveThread();
            KeptThreadState { state, saved }
        }
    }
}

impl Drop for KeptThreadState {
    fn drop(&mut self) {
        // SAFETY: the state saved in `new`, on this thread, which is
        // ending: take the GIL back with it and release it for good.
        unsafe {
            pyo3::ffi::PyEval_RestoreThread(self.saved);
            pyo3::ffi::PyGILState_Release(self.state);
        }
    }
}

thread_local! {
    static KEPT: KeptThreadState = KeptThreadState::new();
}

/// Calls `method` of the bridge with `args` (and, for "stream", a sink)
/// and reports what it answered.
fn run(ctx: &abi::EtlInvokeCtx, method: &str, args: &[String]) -> i32 {
    KEPT.with(|_| ());
    // SAFETY: the host's table is static.
    let host: &'static abi::EtlHostApi = unsafe { &*ctx.host };
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
            let flag = Bound::new(py, Flag { word }).map_err(|e| e.to_string())?;
            items.push(flag.into_any());
            if method == "stream" {
                let sink = Sink {
                    host,
                    invocation: inv as usize,
                };
                items.push(Bound::new(py, sink).map_err(|e| e.to_string())?.into_any());
            }
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
    let (status, text, category, plugin_error, output, usage, infos, warnings, meta, file_data) =
        match answer {
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
    News {
        usage,
        infos,
        warnings,
        filedata_meta: meta,
        file_data,
    }
    .report(host, inv);
    if status == SHUTDOWN {
        return abi::RESULT_SHUTDOWN;
    }
    if status == REJECTED {
        let body = text.unwrap_or_default();
        // SAFETY: valid handle during the call; borrowed argument.
        unsafe { (host.reject_request)(inv, 422, abi::EtlStr::from_str(&body)) };
        return abi::RESULT_FAILED;
    }
    if status == 200 {
        if method == "invoke" {
            let output = output.unwrap_or_else(|| "null".into());
            // SAFETY: valid handle during the call; borrowed argument.
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
    // SAFETY: valid handle during the call; borrowed arguments.
    unsafe { (host.report_failure)(inv, &failure) };
    abi::RESULT_FAILED
}
