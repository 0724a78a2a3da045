//! What a plugin sees of the host while it runs: its [`Context`], the
//! [`Emitter`] of a streaming plugin, cancellation tokens, and the host's
//! log.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::time::Duration;

use etl_abi as abi;
use serde::Serialize;

use crate::{with_json, Error};

/// A read-only view of a cancel flag the host owns.
///
/// `Copy + Send + Sync`: hand it to worker threads. The flag it reads lives
/// as long as the process, so a token never dangles; a per-invocation token
/// means something only while its invocation runs.
#[derive(Clone, Copy)]
pub struct CancellationToken {
    flag: Option<&'static AtomicU32>,
}

impl CancellationToken {
    /// A token that is never cancelled (for tests of plugin code).
    pub const NEVER: CancellationToken = CancellationToken { flag: None };

    /// # Safety
    /// `flag` is NULL or points to a host cancel flag (valid for the process).
    unsafe fn from_raw(flag: *const u32) -> CancellationToken {
        // SAFETY: the header guarantees the word stays mapped until exit and
        // is only written atomically; AtomicU32 has the layout of u32.
        CancellationToken {
            flag: unsafe { flag.cast::<AtomicU32>().as_ref() },
        }
    }

    /// Whether the host asked this work to stop. One atomic load.
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        self.flag.is_some_and(|f| f.load(Ordering::Acquire) != 0)
    }

    /// `Err(Error::shutdown())` once cancelled, for use with `?`.
    ///
    /// # Errors
    /// [`Error::shutdown`] when the flag is set.
    #[inline]
    pub fn raise_if_cancelled(&self) -> Result<(), Error> {
        if self.is_cancelled() {
            Err(Error::shutdown())
        } else {
            Ok(())
        }
    }
}

impl fmt::Debug for CancellationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancellationToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

pub(crate) static PROCESS_CANCEL: AtomicPtrCell = AtomicPtrCell::new();

/// The process-wide cancel flag, set once when the server starts shutting
/// down. For a plugin's own background threads; inside `invoke`, prefer
/// [`Context::cancellation`], which is also set when the client goes away.
pub fn process_cancellation() -> CancellationToken {
    // SAFETY: PROCESS_CANCEL holds NULL or the host's process-wide flag.
    unsafe { CancellationToken::from_raw(PROCESS_CANCEL.get()) }
}

pub(crate) struct AtomicPtrCell<T = u32>(AtomicPtr<T>);

impl<T> AtomicPtrCell<T> {
    pub(crate) const fn new() -> Self {
        AtomicPtrCell(AtomicPtr::new(std::ptr::null_mut()))
    }
    pub(crate) fn get(&self) -> *const T {
        self.0.load(Ordering::Acquire)
    }
    pub(crate) fn set(&self, p: *const T) {
        self.0.store(p.cast_mut(), Ordering::Release);
    }
}

/// The host's callbacks, from `init`, for [`log`] outside an invocation.
/// NULL before `init`, and with a host older than ABI 1.1.
pub(crate) static HOST: AtomicPtrCell<abi::EtlHostApi> = AtomicPtrCell::new();

/// The level of a line written with [`log`] or [`Context::log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn abi(self) -> i32 {
        match self {
            Level::Error => abi::LOG_ERROR,
            Level::Warn => abi::LOG_WARN,
            Level::Info => abi::LOG_INFO,
            Level::Debug => abi::LOG_DEBUG,
            Level::Trace => abi::LOG_TRACE,
        }
    }
}

/// Whether `host` has the callback at `offset` (a host built for a later
/// minor has more; one built for 1.0 lacks the 1.1 ones).
pub(crate) fn host_has(host: &abi::EtlHostApi, offset: usize) -> bool {
    host.struct_size as usize > offset
}

/// Writes a line into etl-serve's log, from anywhere: `init`, `shutdown`, a
/// background thread. Inside `invoke` prefer [`Context::log`], which adds
/// the request id. Does nothing before `init` or with a host older than ABI
/// 1.1; never blocks.
pub fn log(level: Level, message: impl AsRef<str>) {
    // SAFETY: HOST is NULL or the host's static table.
    let Some(host) = (unsafe { HOST.get().as_ref() }) else {
        return;
    };
    write_log(host, std::ptr::null_mut(), level, message.as_ref());
}

fn write_log(host: &abi::EtlHostApi, inv: *mut abi::EtlInvocation, level: Level, message: &str) {
    if host_has(host, std::mem::offset_of!(abi::EtlHostApi, log)) {
        // SAFETY: the callback exists (struct_size); NULL or a handle the host
        // gave; the message is borrowed for the call.
        unsafe { (host.log)(inv, level.abi(), abi::EtlStr::from_str(message)) };
    }
}

/// Filedata metadata the plugin reports (`filedata_meta` in the envelope).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileDataMeta {
    pub terminate_current: bool,
    pub new_records: Vec<serde_json::Value>,
}

/// What a plugin reports besides its output: usage, messages, filedata
/// metadata, and whether it should stop; and what it is told about the
/// request (its id, deadline and reserved fields).
///
/// `Send`: a plugin may hand it to a worker thread that ends before
/// `invoke` returns (`std::thread::scope`); the host serialises the
/// callbacks, which may be called from any thread while the invocation
/// runs, and the lifetime keeps it from outliving the call.
pub struct Context<'a> {
    pub(crate) raw: &'a abi::EtlInvokeCtx,
}

// SAFETY: see the type's docs: the host allows its callbacks from any
// thread during the invocation (etl_plugin.h), and `'a` ends with it.
unsafe impl Send for Context<'_> {}

impl<'a> Context<'a> {
    fn host(&self) -> &abi::EtlHostApi {
        // SAFETY: the host's table is static for the process (header).
        unsafe { &*self.raw.host }
    }

    /// Appends `{"name": name, "value": value}` to the envelope's `usage`.
    pub fn add_usage(&mut self, name: &str, value: i64) {
        // SAFETY: valid handle during invoke; the string is borrowed for the call.
        unsafe { (self.host().add_usage)(self.raw.invocation, abi::EtlStr::from_str(name), value) };
    }

    /// Adds a line to `message_channels.infos`.
    pub fn info(&mut self, message: impl AsRef<str>) {
        let m = abi::EtlStr::from_str(message.as_ref());
        // SAFETY: as in add_usage.
        unsafe { (self.host().add_info)(self.raw.invocation, m) };
    }

    /// Adds a line to `message_channels.warnings`.
    pub fn warning(&mut self, message: impl AsRef<str>) {
        let m = abi::EtlStr::from_str(message.as_ref());
        // SAFETY: as in add_usage.
        unsafe { (self.host().add_warning)(self.raw.invocation, m) };
    }

    /// Replaces the envelope's `filedata_meta`.
    pub fn set_filedata_meta(&mut self, meta: &FileDataMeta) {
        let json = serde_json::to_string(meta).expect("FileDataMeta always serialises");
        // SAFETY: as in add_usage.
        unsafe {
            (self.host().set_filedata_meta)(self.raw.invocation, abi::EtlStr::from_str(&json))
        };
    }

    /// Sets the envelope's `file_data` (ABI 1.1): the reference host echoes
    /// the `file_data` input the function received, changes included, so a
    /// plugin that takes one hands it back here. `None` is `null`, the
    /// default. Does nothing with a host older than the callback.
    ///
    /// # Errors
    /// The value does not serialise to a JSON object (or `null`).
    pub fn set_file_data<T: Serialize>(&mut self, file_data: Option<&T>) -> Result<(), Error> {
        let json = serde_json::to_string(&file_data)
            .map_err(|e| Error::new(format!("file_data does not serialise: {e}")))?;
        if !json.starts_with('{') && json != "null" {
            return Err(Error::new("file_data must be a JSON object"));
        }
        let host = self.host();
        if host_has(host, std::mem::offset_of!(abi::EtlHostApi, set_file_data)) {
            // SAFETY: the callback exists (struct_size); as in add_usage.
            unsafe { (host.set_file_data)(self.raw.invocation, abi::EtlStr::from_str(&json)) };
        }
        Ok(())
    }

    /// Whether the host's context has the field at `offset` (ABI 1.1+).
    fn has(&self, offset: usize) -> bool {
        self.raw.struct_size as usize > offset
    }

    /// An `etl_str` field of the context, if the host's context has it.
    fn text_field(&self, offset: usize, s: abi::EtlStr) -> Option<&'a str> {
        if !self.has(offset) {
            return None;
        }
        // SAFETY: the host keeps the field's bytes valid until the hook
        // returns, which `'a` does not outlive; the host writes UTF-8.
        let bytes = unsafe { s.as_bytes() };
        std::str::from_utf8(bytes).ok().filter(|t| !t.is_empty())
    }

    /// The request id (`x-request-id`), as on the access log line; `None`
    /// with a host older than ABI 1.1.
    pub fn request_id(&self) -> Option<&'a str> {
        self.text_field(
            std::mem::offset_of!(abi::EtlInvokeCtx, request_id),
            self.raw.request_id,
        )
    }

    /// The reserved `invocation_settings` field of the request, as JSON
    /// text: the plaintext settings, or an object with a sealed
    /// `dag_node_settings` document (docs/abi.md, "The reserved fields").
    /// `None` when the request had none.
    pub fn invocation_settings(&self) -> Option<&'a str> {
        self.text_field(
            std::mem::offset_of!(abi::EtlInvokeCtx, invocation_settings),
            self.raw.invocation_settings,
        )
    }

    /// The reserved `invocation_context` field, validated and with its
    /// `schema_version`, as JSON text; `None` when the request had none.
    pub fn invocation_context(&self) -> Option<&'a str> {
        self.text_field(
            std::mem::offset_of!(abi::EtlInvokeCtx, invocation_context),
            self.raw.invocation_context,
        )
    }

    /// Time left until this invocation's deadline: the caller's
    /// (`x-etl-timeout-ms`) or, once the server is stopping, the graceful
    /// deadline, whichever is sooner. `None` when there is none (or the
    /// host is older than ABI 1.1). The host does not stop the call at the
    /// deadline; use it to give up early or to bound a dependency's call.
    pub fn remaining(&self) -> Option<Duration> {
        let host = self.host();
        if !host_has(host, std::mem::offset_of!(abi::EtlHostApi, remaining_ms)) {
            return None;
        }
        // SAFETY: the callback exists; the handle is valid during the hook.
        let ms = unsafe { (host.remaining_ms)(self.raw.invocation) };
        u64::try_from(ms)
            .ok()
            .filter(|_| ms != abi::NO_DEADLINE)
            .map(Duration::from_millis)
    }

    /// Writes a line into etl-serve's log with this request's id.
    pub fn log(&self, level: Level, message: impl AsRef<str>) {
        write_log(self.host(), self.raw.invocation, level, message.as_ref());
    }

    /// This invocation's cancellation token.
    pub fn cancellation(&self) -> CancellationToken {
        // SAFETY: the header guarantees the flag outlives the process' use of it.
        unsafe { CancellationToken::from_raw(self.raw.cancel_flag) }
    }

    /// Whether this invocation was asked to stop (shutdown or client gone).
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        self.cancellation().is_cancelled()
    }

    /// `Err(Error::shutdown())` once this invocation was asked to stop.
    ///
    /// # Errors
    /// [`Error::shutdown`] when the flag is set.
    #[inline]
    pub fn raise_if_cancelled(&self) -> Result<(), Error> {
        self.cancellation().raise_if_cancelled()
    }
}

/// Sends the items of a streaming plugin, one NDJSON line each.
pub struct Emitter<'a, T> {
    pub(crate) raw: &'a abi::EtlInvokeCtx,
    pub(crate) _item: PhantomData<fn(&T)>,
}

impl<T: Serialize> Emitter<'_, T> {
    /// Sends one item. Blocks while the client is slower than the plugin.
    ///
    /// # Errors
    /// [`Error::shutdown`] when the client went away or the invocation was
    /// cancelled: stop and return it.
    pub fn emit(&mut self, item: &T) -> Result<(), Error> {
        let rc = with_json(item, |json| {
            // SAFETY: the host table is static; the handle is valid during
            // invoke.
            unsafe { ((*self.raw.host).emit)(self.raw.invocation, abi::EtlStr::from_bytes(json)) }
        })
        .map_err(|e| Error::new(format!("cannot serialise item: {e}")))?;
        match rc {
            abi::CB_OK => Ok(()),
            abi::CB_CLOSED => Err(Error::shutdown()),
            other => Err(Error::new(format!(
                "the host refused the item (code {other})"
            ))),
        }
    }
}
