//! One call into the plugin, seen from the host: the `etl_invoke_ctx` it is
//! handed, the callbacks it reports through, and the cancel flags.
//!
//! The plugin names an invocation by an opaque handle, which is really a
//! number looked up in a registry of live invocations. A callback with a
//! handle whose invocation has ended (a plugin thread that outlived
//! `invoke`) finds nothing and gets `ETL_CB_CLOSED`: never a dangling
//! pointer. Cancel flags come from a pool that is never freed, so a plugin
//! that reads its flag late reads a valid word.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use bytes::Bytes;
use etl_abi as abi;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::envelope::{self, UsageList};
use crate::sync::lock;

/// The process-wide cancel flag (`process_cancel_flag`).
static PROCESS_CANCEL: AtomicU32 = AtomicU32::new(0);

/// Invocations inside the plugin, and the cancel flags not in use: one lock
/// for both, since an invocation takes a flag as it registers and gives it
/// back as it leaves. Spread over [`SHARDS`] registries by handle: every
/// invocation registers, calls back and leaves from whichever worker thread
/// runs it, and one lock for all of them would bounce between the cores on
/// every request.
static LIVE: LazyLock<[Shard; SHARDS]> = LazyLock::new(Default::default);
const SHARDS: usize = 16;

/// One registry, alone on its cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Registry>);

/// The registry that holds (or will hold) the invocation `handle`. By the
/// handle's block, so that the invocations one thread starts use one shard
/// for a while, whose lines then stay in that core's cache.
fn registry(handle: u64) -> MutexGuard<'static, Registry> {
    lock(&LIVE[(crate::unique::block_of(handle) % SHARDS as u64) as usize].0)
}

#[derive(Default)]
struct Registry {
    /// Invocations inside the plugin, by handle.
    live: HashMap<u64, Arc<Invocation>, BuildHasherDefault<HandleHasher>>,
    /// Cancel flags not in use. Each was leaked once and is reused forever.
    free_flags: Vec<&'static AtomicU32>,
}

/// Hashes a handle. Handles are distinct counter values chosen by the host,
/// never by a client, so a multiplicative mix spreads them well and no
/// flooding-resistant hash is needed. Against the standard SipHash: about
/// 270 instructions of each request (1.4%, `bench/callgrind`).
#[derive(Default)]
struct HandleHasher(u64);

impl Hasher for HandleHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

thread_local! {
    /// The invocation this thread is calling the plugin for, as its handle
    /// and address ((0, null) when none). A callback made on the calling
    /// thread, as nearly all are, finds its invocation here, without the
    /// registry's lock and lookup. Set only by [`Invocation::call`].
    static CURRENT: Cell<(u64, *const Invocation)> = const { Cell::new((0, std::ptr::null())) };
}

/// The callbacks, static for the life of the process.
static HOST_API: abi::EtlHostApi = abi::EtlHostApi {
    struct_size: std::mem::size_of::<abi::EtlHostApi>() as u32,
    emit: cb_emit,
    add_usage: cb_add_usage,
    add_info: cb_add_info,
    add_warning: cb_add_warning,
    set_filedata_meta: cb_set_filedata_meta,
    set_failure: cb_set_failure,
};

/// The process-wide flag's address, for `etl_init_ctx`.
pub fn process_cancel_flag() -> *const u32 {
    PROCESS_CANCEL.as_ptr().cast_const()
}

/// Whether shutdown has started.
pub fn shutting_down() -> bool {
    PROCESS_CANCEL.load(Ordering::Acquire) != 0
}

/// Sets the process-wide flag, then every live invocation's flag. Returns
/// how many invocations were live. An invocation that registers after this
/// sees the process-wide flag and sets its own (see [`Invocation::start`]).
pub fn cancel_all() -> usize {
    PROCESS_CANCEL.store(1, Ordering::Release);
    let mut cancelled = 0;
    for shard in LIVE.iter() {
        let registry = lock(&shard.0);
        for inv in registry.live.values() {
            inv.cancel.store(1, Ordering::Release);
        }
        cancelled += registry.live.len();
    }
    cancelled
}

/// How many invocations are inside the plugin now.
pub fn live_count() -> usize {
    LIVE.iter().map(|shard| lock(&shard.0).live.len()).sum()
}

/// What the invocation runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// `invoke` of a plugin that answers with one output.
    Invoke,
    /// `invoke` of a streaming plugin; items go to the stream's channel.
    Stream,
    /// `precheck`: `emit` is refused.
    Precheck,
}

/// A chunk of a streaming response.
pub enum Chunk {
    /// One NDJSON line, an item envelope.
    Line(Bytes),
    /// The plugin returned; the stream ends after what this says.
    Done(Collected),
}

/// A failure the plugin described with `set_failure`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub error_type: String,
    pub message: String,
}

/// Everything the plugin reported, taken once `invoke` returned.
#[derive(Debug, Default, Clone)]
pub struct Collected {
    /// The result code `invoke` returned (set by the caller).
    pub result: i32,
    /// The output of a plain plugin.
    pub output: Option<Box<RawValue>>,
    /// Items a streaming plugin emitted.
    pub items: u64,
    pub usage: UsageList,
    /// The rest, which most invocations never report: boxed, so that a
    /// `Collected` stays small as it is moved on to the answer.
    more: Option<Box<Reported>>,
}

/// What an invocation reported besides its output and usage.
#[derive(Debug, Default, Clone)]
pub struct Reported {
    pub infos: Vec<String>,
    pub warnings: Vec<String>,
    /// A validated `{"terminate_current": bool, "new_records": [...]}`.
    pub filedata_meta: Option<Value>,
    pub failure: Option<Failure>,
    /// The first way the plugin broke the ABI contract, if any.
    pub violation: Option<String>,
}

/// What an invocation that reported none of it reports.
static NOTHING_MORE: Reported = Reported {
    infos: Vec::new(),
    warnings: Vec::new(),
    filedata_meta: None,
    failure: None,
    violation: None,
};

impl Collected {
    /// The infos, warnings, filedata meta, failure and violation.
    pub fn more(&self) -> &Reported {
        self.more.as_deref().unwrap_or(&NOTHING_MORE)
    }

    /// The same, to add to.
    pub fn more_mut(&mut self) -> &mut Reported {
        self.more.get_or_insert_with(Box::default)
    }

    fn violate(&mut self, why: impl Into<String>) {
        let more = self.more_mut();
        if more.violation.is_none() {
            more.violation = Some(why.into());
        }
    }
}

/// One call into the plugin.
pub struct Invocation {
    handle: u64,
    kind: Kind,
    cancel: &'static AtomicU32,
    state: Mutex<Collected>,
    stream: Option<mpsc::Sender<Chunk>>,
    started: std::time::Instant,
    client_gone: AtomicBool,
}

/// Invocations cancelled because their client went away.
static CLIENT_GONE: AtomicU64 = AtomicU64::new(0);

/// How many invocations were cancelled because their client went away.
pub fn client_gone_count() -> u64 {
    CLIENT_GONE.load(Ordering::Relaxed)
}

/// Keeps an invocation registered; unregisters it and recycles its flag on
/// drop, after which its handle answers `ETL_CB_CLOSED`.
#[must_use = "the invocation is unregistered when the guard drops"]
pub struct Registered {
    inv: Arc<Invocation>,
}

impl Invocation {
    /// Registers a new invocation. `stream` receives a streaming plugin's
    /// lines.
    pub fn start(kind: Kind, stream: Option<mpsc::Sender<Chunk>>) -> Registered {
        let handle = crate::unique::next();
        let mut registry = registry(handle);
        let cancel = registry
            .free_flags
            .pop()
            .unwrap_or_else(|| Box::leak(Box::new(AtomicU32::new(0))));
        cancel.store(0, Ordering::Relaxed);
        let inv = Arc::new(Invocation {
            handle,
            kind,
            cancel,
            state: Mutex::new(Collected::default()),
            stream,
            started: std::time::Instant::now(),
            client_gone: AtomicBool::new(false),
        });
        registry.live.insert(handle, inv.clone());
        drop(registry);
        // Registered after cancel_all went through this shard: cancel
        // ourselves.
        if shutting_down() {
            cancel.store(1, Ordering::Release);
        }
        Registered { inv }
    }

    /// Calls into the plugin through `call`, which gets the context to
    /// hand it, on this thread. Callbacks on this thread find the
    /// invocation without the registry until `call` returns.
    pub fn call<T>(&self, call: impl FnOnce(&abi::EtlInvokeCtx) -> T) -> T {
        /// Puts back what was current before, even if `call` unwinds.
        struct Restore((u64, *const Invocation));
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0);
            }
        }
        let _restore = Restore(CURRENT.replace((self.handle, self)));
        call(&self.ctx())
    }

    /// The context handed to the plugin. Valid while `self` is registered.
    fn ctx(&self) -> abi::EtlInvokeCtx {
        abi::EtlInvokeCtx {
            struct_size: std::mem::size_of::<abi::EtlInvokeCtx>() as u32,
            invocation: self.handle as *mut abi::EtlInvocation,
            host: &HOST_API,
            cancel_flag: self.cancel.as_ptr().cast_const(),
            process_cancel_flag: process_cancel_flag(),
        }
    }

    /// Asks the plugin to stop this invocation (client gone, shutdown).
    pub fn cancel(&self) {
        self.cancel.store(1, Ordering::Release);
    }

    /// The client of this invocation went away: stop the plugin's work,
    /// and count and log it.
    pub fn cancel_for_client(&self) {
        if !self.client_gone.swap(true, Ordering::AcqRel) {
            self.cancel();
            let total = CLIENT_GONE.fetch_add(1, Ordering::Relaxed) + 1;
            crate::metrics::METRICS.client_disconnect();
            tracing::info!(
                invocation = self.handle,
                client_disconnect_cancels = total,
                "client went away: invocation cancelled"
            );
        }
    }

    /// A copy of what the plugin reported so far, for an invocation that is
    /// answered without waiting for the plugin.
    pub fn snapshot(&self) -> Collected {
        lock(&self.state).clone()
    }

    fn emit(&self, json: &[u8]) -> i32 {
        let raw = match parse_raw(json) {
            Ok(raw) => raw,
            Err(why) => {
                lock(&self.state).violate(format!("the plugin emitted {why}"));
                return abi::CB_INVALID;
            }
        };
        match self.kind {
            Kind::Precheck => {
                lock(&self.state).violate("the plugin called emit during precheck");
                abi::CB_REJECTED
            }
            Kind::Invoke => {
                let mut state = lock(&self.state);
                if state.output.is_some() {
                    state.violate("the plugin emitted more than one output but does not stream");
                    return abi::CB_REJECTED;
                }
                state.output = Some(raw);
                abi::CB_OK
            }
            Kind::Stream => {
                let line = {
                    let mut state = lock(&self.state);
                    state.items += 1;
                    envelope::item_line(&state, &raw)
                };
                let sent = self
                    .stream
                    .as_ref()
                    .is_some_and(|tx| tx.blocking_send(Chunk::Line(line)).is_ok());
                if sent {
                    abi::CB_OK
                } else {
                    // The client went away: the plugin should stop.
                    self.cancel();
                    abi::CB_CLOSED
                }
            }
        }
    }
}

impl Registered {
    pub fn invocation(&self) -> &Invocation {
        &self.inv
    }

    /// When the invocation started.
    pub fn started(&self) -> std::time::Instant {
        self.inv.started
    }

    /// A shared handle, to cancel the invocation from another task.
    pub fn shared(&self) -> Arc<Invocation> {
        self.inv.clone()
    }

    /// Unregisters the invocation and takes what the plugin reported.
    pub fn finish(self, result: i32) -> Collected {
        let mut collected = std::mem::take(&mut *lock(&self.inv.state));
        collected.result = result;
        if self.inv.client_gone.load(Ordering::Acquire) {
            tracing::info!(
                invocation = self.inv.handle,
                result,
                elapsed_ms = self.inv.started.elapsed().as_millis() as u64,
                "plugin returned after its client went away"
            );
        }
        collected
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut registry = registry(self.inv.handle);
        registry.live.remove(&self.inv.handle);
        registry.free_flags.push(self.inv.cancel);
    }
}

/// Parses emitted bytes as one JSON value, or says what is wrong with them.
fn parse_raw(json: &[u8]) -> Result<Box<RawValue>, String> {
    let text =
        std::str::from_utf8(json).map_err(|_| "output that is not valid UTF-8".to_owned())?;
    serde_json::from_str::<Box<RawValue>>(text)
        .map_err(|e| format!("output that is not valid JSON ({e})"))
}

// ---------------------------------------------------------------------------
// The callbacks. Each runs on a plugin thread; none may unwind into C.
// ---------------------------------------------------------------------------

/// Runs `f` on the live invocation named by `handle`, or answers
/// `ETL_CB_CLOSED` when there is none. Never unwinds.
fn with_live(handle: *mut abi::EtlInvocation, f: impl FnOnce(&Invocation) -> i32) -> i32 {
    let handle = handle as u64;
    let (current, inv) = CURRENT.get();
    // Handles are never 0, so the empty (0, null) never matches.
    if handle == current {
        // SAFETY: CURRENT holds this address only while Invocation::call
        // runs on this thread with a borrow of the invocation, and this
        // callback runs inside that call.
        let inv = unsafe { &*inv };
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(inv)))
            .unwrap_or(abi::CB_INVALID);
    }
    let inv = registry(handle).live.get(&handle).cloned();
    let Some(inv) = inv else {
        return abi::CB_CLOSED;
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&inv))).unwrap_or(abi::CB_INVALID)
}

/// The string's text, or `None` (and a recorded violation) when it is not
/// UTF-8.
fn text<'a>(inv: &Invocation, what: &str, s: abi::EtlStr) -> Option<&'a str> {
    // SAFETY: the header makes every etl_str argument readable for the call.
    let bytes = unsafe { s.as_bytes() };
    match std::str::from_utf8(bytes) {
        Ok(t) => Some(t),
        Err(_) => {
            lock(&inv.state).violate(format!("the plugin passed {what} that is not valid UTF-8"));
            None
        }
    }
}

unsafe extern "C" fn cb_emit(handle: *mut abi::EtlInvocation, json: abi::EtlStr) -> i32 {
    // SAFETY: the header makes the argument readable for the call.
    with_live(handle, |inv| inv.emit(unsafe { json.as_bytes() }))
}

unsafe extern "C" fn cb_add_usage(
    handle: *mut abi::EtlInvocation,
    name: abi::EtlStr,
    value: i64,
) -> i32 {
    with_live(handle, |inv| {
        let Some(name) = text(inv, "a usage name", name) else {
            return abi::CB_INVALID;
        };
        lock(&inv.state).usage.push(name, value);
        abi::CB_OK
    })
}

unsafe extern "C" fn cb_add_info(handle: *mut abi::EtlInvocation, message: abi::EtlStr) -> i32 {
    with_live(handle, |inv| {
        let Some(m) = text(inv, "an info message", message) else {
            return abi::CB_INVALID;
        };
        lock(&inv.state).more_mut().infos.push(m.to_owned());
        abi::CB_OK
    })
}

unsafe extern "C" fn cb_add_warning(handle: *mut abi::EtlInvocation, message: abi::EtlStr) -> i32 {
    with_live(handle, |inv| {
        let Some(m) = text(inv, "a warning message", message) else {
            return abi::CB_INVALID;
        };
        lock(&inv.state).more_mut().warnings.push(m.to_owned());
        abi::CB_OK
    })
}

unsafe extern "C" fn cb_set_filedata_meta(
    handle: *mut abi::EtlInvocation,
    json: abi::EtlStr,
) -> i32 {
    with_live(handle, |inv| {
        let Some(t) = text(inv, "filedata_meta", json) else {
            return abi::CB_INVALID;
        };
        match envelope::filedata_meta_from_json(t) {
            Ok(meta) => {
                lock(&inv.state).more_mut().filedata_meta = Some(meta);
                abi::CB_OK
            }
            Err(why) => {
                lock(&inv.state).violate(format!("the plugin set an invalid filedata_meta: {why}"));
                abi::CB_INVALID
            }
        }
    })
}

unsafe extern "C" fn cb_set_failure(
    handle: *mut abi::EtlInvocation,
    status: i32,
    error_type: abi::EtlStr,
    message: abi::EtlStr,
) -> i32 {
    with_live(handle, |inv| {
        // SAFETY: readable for the call. Failure text is shown, not parsed,
        // so bad UTF-8 is replaced rather than rejected.
        let (t, m) = unsafe { (error_type.as_bytes(), message.as_bytes()) };
        let status = u16::try_from(status)
            .ok()
            .filter(|s| (100..=599).contains(s))
            .unwrap_or(500);
        let error_type = String::from_utf8_lossy(t);
        let error_type = if error_type.is_empty() {
            "PluginError".into()
        } else {
            error_type.into_owned()
        };
        lock(&inv.state).more_mut().failure = Some(Failure {
            status,
            error_type,
            message: String::from_utf8_lossy(m).into_owned(),
        });
        abi::CB_OK
    })
}
