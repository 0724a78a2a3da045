//! One call into the plugin, seen from the host: the `etl_invoke_ctx` it is
//! handed, the callbacks it reports through, and the cancel flags.
//!
//! The plugin names an invocation by an opaque handle, which is really a
//! number looked up in a registry of live invocations. A callback with a
//! handle whose invocation has ended (a plugin thread that outlived
//! `invoke`) finds nothing and gets `ETL_CB_CLOSED`: never a dangling
//! pointer. Cancel flags come from a pool that is never freed, so a plugin
//! that reads its flag late reads a valid word. The callbacks themselves are
//! in [`callbacks`].

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use etl_abi as abi;
use etl_dialect::validate::Reserved;
use hyper::header::HeaderValue;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::envelope::{self, UsageList};
use crate::sync::lock;

mod callbacks;

pub use callbacks::HOST_API;

/// The process-wide cancel flag (`process_cancel_flag`).
static PROCESS_CANCEL: AtomicU32 = AtomicU32::new(0);

/// The graceful deadline, once shutdown has started.
static DRAIN_DEADLINE: OnceLock<Instant> = OnceLock::new();

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

/// The process-wide flag's address, for `etl_init_ctx`.
pub fn process_cancel_flag() -> *const u32 {
    PROCESS_CANCEL.as_ptr().cast_const()
}

/// Whether shutdown has started.
pub fn shutting_down() -> bool {
    PROCESS_CANCEL.load(Ordering::Acquire) != 0
}

/// Clears the process-wide flag again, for a test that runs alone in its
/// process.
#[cfg(test)]
pub fn reset_for_test() {
    PROCESS_CANCEL.store(0, Ordering::SeqCst);
}

/// Records the graceful `deadline`, sets the process-wide flag, then every
/// live invocation's flag. Returns how many invocations were live. An
/// invocation that registers after this sees the process-wide flag and sets
/// its own (see [`Invocation::start`]).
pub fn cancel_all(deadline: Instant) -> usize {
    let _ = DRAIN_DEADLINE.set(deadline);
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

/// A failure the plugin described with `set_failure` or `report_failure`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    /// The envelope's `status_code_text`.
    pub text: String,
    /// The envelope's `failure_category` and `plugin_error`.
    pub class: Class,
}

/// How a failure is classified for a controller: the envelope's
/// `failure_category`, and its `plugin_error` as JSON text in the
/// reference's key order. Both null unless the plugin said (ABI 1.1).
#[derive(Debug, Clone, Default)]
pub struct Class {
    pub category: Option<String>,
    pub plugin_error: Option<String>,
}

/// What the plugin is told about the request behind an invocation (ABI 1.1).
#[derive(Debug, Default)]
pub struct RequestInfo {
    /// The `x-request-id` of the request.
    pub request_id: Option<HeaderValue>,
    /// The caller's deadline (`x-etl-timeout-ms`).
    pub deadline: Option<Instant>,
    /// The reserved `/invoke` fields, as JSON text.
    pub reserved: Reserved,
}

/// The plugin's own pointer from `init` (ABI 1.1), handed back to every
/// hook. The host never dereferences it.
#[derive(Clone, Copy, Debug)]
pub struct PluginState(pub *mut c_void);

// SAFETY: the host only passes the pointer back to the plugin's hooks, which
// the header requires to be callable from any thread.
unsafe impl Send for PluginState {}
// SAFETY: as above; the host never reads through it.
unsafe impl Sync for PluginState {}

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
    /// The envelope's `file_data`, a JSON object (`None`: null).
    pub file_data: Option<Box<RawValue>>,
    /// The plugin refused the request itself: the status and JSON body to
    /// answer instead of an envelope.
    pub rejection: Option<(u16, Box<RawValue>)>,
    pub failure: Option<Failure>,
    /// The first way the plugin broke the ABI contract, if any.
    pub violation: Option<String>,
}

/// What an invocation that reported none of it reports.
static NOTHING_MORE: Reported = Reported {
    infos: Vec::new(),
    warnings: Vec::new(),
    filedata_meta: None,
    file_data: None,
    rejection: None,
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
    started: Instant,
    client_gone: AtomicBool,
    request: RequestInfo,
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
    /// Registers a new invocation for `request`. `stream` receives a
    /// streaming plugin's lines.
    pub fn start(
        kind: Kind,
        stream: Option<mpsc::Sender<Chunk>>,
        request: RequestInfo,
    ) -> Registered {
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
            started: Instant::now(),
            client_gone: AtomicBool::new(false),
            request,
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
    /// hand it (with the plugin's `state`), on this thread. Callbacks on
    /// this thread find the invocation without the registry until `call`
    /// returns.
    pub fn call<T>(&self, state: PluginState, call: impl FnOnce(&abi::EtlInvokeCtx) -> T) -> T {
        /// Puts back what was current before, even if `call` unwinds.
        struct Restore((u64, *const Invocation));
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0);
            }
        }
        let _restore = Restore(CURRENT.replace((self.handle, self)));
        call(&self.ctx(state))
    }

    /// The context handed to the plugin. Valid while `self` is registered.
    fn ctx(&self, state: PluginState) -> abi::EtlInvokeCtx {
        let text = |t: &Option<String>| {
            t.as_deref()
                .map_or(abi::EtlStr::EMPTY, abi::EtlStr::from_str)
        };
        let request = &self.request;
        abi::EtlInvokeCtx {
            struct_size: std::mem::size_of::<abi::EtlInvokeCtx>() as u32,
            invocation: self.handle as *mut abi::EtlInvocation,
            host: &HOST_API,
            cancel_flag: self.cancel.as_ptr().cast_const(),
            process_cancel_flag: process_cancel_flag(),
            state: state.0,
            request_id: request
                .request_id
                .as_ref()
                .map_or(abi::EtlStr::EMPTY, |id| {
                    abi::EtlStr::from_bytes(id.as_bytes())
                }),
            invocation_settings: text(&request.reserved.settings),
            invocation_context: text(&request.reserved.context),
        }
    }

    /// Milliseconds until this invocation's deadline (`remaining_ms`).
    fn remaining_ms(&self) -> i64 {
        let drain = DRAIN_DEADLINE.get().copied().filter(|_| shutting_down());
        let deadline = match (self.request.deadline, drain) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(d) => d,
                None => return abi::NO_DEADLINE,
            },
        };
        let left = deadline.saturating_duration_since(Instant::now());
        i64::try_from(left.as_millis()).unwrap_or(abi::NO_DEADLINE - 1)
    }

    /// The request id, for the plugin's log lines.
    fn request_id(&self) -> Option<&str> {
        self.request
            .request_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
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
    pub fn started(&self) -> Instant {
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
