//! Write etl-serve plugins in safe Rust.
//!
//! A plugin is a type implementing [`Plugin`] (one output per request) or
//! [`StreamingPlugin`] (any number of output items, sent as NDJSON lines),
//! exported with [`export_plugin!`]. The SDK writes the `extern "C"` entry
//! symbol and the whole table of `include/etl_plugin.h`, derives the JSON
//! Schemas of `/schema` from the input and output types (through
//! [`schemars`]), and catches every panic at the boundary so it becomes a
//! 500 envelope instead of unwinding into the host.
//!
//! # Example
//!
//! A complete plugin crate. Its `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "shout"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]   # a shared library etl-serve can load
//!
//! [dependencies]
//! # The SDK is not on crates.io: depend on it by path in a checkout of
//! # etl-serve, or by git with the URL of the etl-serve repository you use
//! # (etl-plugin = { git = "URL" }; cargo finds the crate in it).
//! etl-plugin = { path = "../etl-serve/crates/etl-plugin" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! The SDK is the only schema dependency: it re-exports [`schemars`], and
//! `#[derive(JsonSchema)]` finds it through the `schemars` name in scope, so
//! import that name with the rest. `src/lib.rs`:
//!
//! ```
//! use etl_plugin::{export_plugin, schemars, Context, Error, JsonSchema, Plugin};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize, JsonSchema)]
//! pub struct Input {
//!     text: String,
//! }
//!
//! #[derive(Serialize, JsonSchema)]
//! pub struct Output {
//!     shouted: String,
//! }
//!
//! pub struct Shout;
//!
//! impl Plugin for Shout {
//!     type Input = Input;
//!     type Output = Output;
//!     const NAME: &'static str = "shout";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!
//!     fn init(_config: &str) -> Result<Self, Error> {
//!         Ok(Shout)
//!     }
//!
//!     fn invoke(&self, input: Input, ctx: &mut Context) -> Result<Output, Error> {
//!         ctx.raise_if_cancelled()?; // answer 503 shutdown-abort if the server is stopping
//!         ctx.add_usage("chars", input.text.len() as i64);
//!         if input.text.is_empty() {
//!             return Err(Error::with_status(400, "text is empty"));
//!         }
//!         Ok(Output { shouted: input.text.to_uppercase() })
//!     }
//! }
//!
//! export_plugin!(Shout);
//! ```
//!
//! `cargo build --release` makes `target/release/libshout.so`; serve it with
//! `etl-serve --plugin target/release/libshout.so`. No C compiler is needed.
//!
//! # Threads
//!
//! `invoke` runs on host worker threads, several at once, so a plugin is
//! `Send + Sync` and keeps mutable state behind its own locks. `init` and
//! `shutdown` run once each, on a host thread, never while an `invoke` runs.
//!
//! # Cancellation
//!
//! When the server receives SIGTERM, or the client of a request goes away,
//! the host sets that invocation's cancel flag. Check it between units of
//! work with [`Context::is_cancelled`] or [`Context::raise_if_cancelled`];
//! returning [`Error::shutdown`] makes the caller get a retryable 503 instead
//! of a failure. [`CancellationToken`] is `Copy + Send` for worker threads.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use etl_abi as abi;
pub use schemars::{self, JsonSchema};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub mod schema;

pub use schema::schema_for;

/// Which injected capabilities a plugin declares (`ETL_CAP_*`).
///
/// The callbacks work whatever is declared; the bits show up in
/// `etl-serve --check` and its startup log line, and `cancellation` tells
/// operators that the plugin stops promptly on shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub usage: bool,
    pub message_channels: bool,
    pub filedata_meta: bool,
    pub cancellation: bool,
}

impl Capabilities {
    /// No capabilities.
    pub const NONE: Capabilities = Capabilities {
        usage: false,
        message_channels: false,
        filedata_meta: false,
        cancellation: false,
    };

    fn bits(self) -> u32 {
        (self.usage as u32 * abi::CAP_USAGE)
            | (self.message_channels as u32 * abi::CAP_MESSAGE_CHANNELS)
            | (self.filedata_meta as u32 * abi::CAP_FILEDATA_META)
            | (self.cancellation as u32 * abi::CAP_CANCELLATION)
    }
}

/// A plugin that answers each request with exactly one output.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// The request body. Its JSON Schema is `/schema`'s `inputs`; the host
    /// validates the body against it and fills in defaults before `invoke`.
    type Input: DeserializeOwned + JsonSchema;
    /// The output. Its JSON Schema is `/schema`'s `outputs`.
    type Output: Serialize + JsonSchema;

    /// The plugin's name, shown in logs and `--check`.
    const NAME: &'static str;
    /// The plugin's version.
    const VERSION: &'static str;
    /// The injected capabilities it declares.
    const CAPABILITIES: Capabilities = Capabilities::NONE;
    /// An explicit plugin id; `None` lets the host derive it from the schemas.
    const ID: Option<&'static str> = None;

    /// Builds the plugin from the operator's `--plugin-config` string (empty
    /// when none was given). Runs once before the server listens; an error
    /// stops the server with its message.
    fn init(config: &str) -> Result<Self, Error>;

    /// Runs the plugin on one request.
    ///
    /// # Errors
    /// An [`Error`] becomes the envelope's `status_code` and
    /// `status_code_text`; [`Error::shutdown`] becomes the 503 shutdown-abort.
    fn invoke(&self, input: Self::Input, ctx: &mut Context) -> Result<Self::Output, Error>;

    /// Answers `GET /precheck`. The default reports success.
    ///
    /// # Errors
    /// As for [`Plugin::invoke`].
    fn precheck(&self, ctx: &mut Context) -> Result<(), Error> {
        let _ = ctx;
        Ok(())
    }

    /// Runs once when the server stops, after the last invocation returned.
    fn shutdown(&self) {}
}

/// A plugin that answers each request with a stream of items, each sent to
/// the client as one NDJSON line as soon as it is emitted.
pub trait StreamingPlugin: Send + Sync + Sized + 'static {
    /// The request body; see [`Plugin::Input`].
    type Input: DeserializeOwned + JsonSchema;
    /// One item of the stream; its schema is `/schema`'s `outputs`.
    type Item: Serialize + JsonSchema;

    /// See [`Plugin::NAME`].
    const NAME: &'static str;
    /// See [`Plugin::VERSION`].
    const VERSION: &'static str;
    /// See [`Plugin::CAPABILITIES`].
    const CAPABILITIES: Capabilities = Capabilities::NONE;
    /// See [`Plugin::ID`].
    const ID: Option<&'static str> = None;

    /// See [`Plugin::init`].
    fn init(config: &str) -> Result<Self, Error>;

    /// Runs the plugin on one request, sending items through `out`.
    ///
    /// # Errors
    /// An error after some items becomes the stream's last line; before any
    /// item, the whole answer. [`Error::shutdown`] is the shutdown-abort.
    fn invoke(
        &self,
        input: Self::Input,
        ctx: &mut Context,
        out: &mut Emitter<Self::Item>,
    ) -> Result<(), Error>;

    /// See [`Plugin::precheck`].
    ///
    /// # Errors
    /// As for [`Plugin::invoke`].
    fn precheck(&self, ctx: &mut Context) -> Result<(), Error> {
        let _ = ctx;
        Ok(())
    }

    /// See [`Plugin::shutdown`].
    fn shutdown(&self) {}
}

/// Why a plugin call did not succeed.
///
/// Any `std::error::Error` converts into it with `?`; its type name becomes
/// the bracketed class in `status_code_text` (`"[ParseIntError] ..."`), as
/// the reference host does with Python exception classes.
pub struct Error {
    kind: ErrorKind,
}

enum ErrorKind {
    Failed {
        status: u16,
        error_type: Cow<'static, str>,
        message: String,
    },
    Shutdown,
}

impl Error {
    /// A failure with status 500 and the class `PluginError`.
    pub fn new(message: impl Into<String>) -> Error {
        Error::with_status(500, message)
    }

    /// A failure with an HTTP status (100..=599; anything else reads as 500).
    pub fn with_status(status: u16, message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Failed {
                status,
                error_type: Cow::Borrowed("PluginError"),
                message: message.into(),
            },
        }
    }

    /// Names the error's class, shown as `[class]` in `status_code_text`.
    #[must_use]
    pub fn with_type(mut self, error_type: impl Into<Cow<'static, str>>) -> Error {
        if let ErrorKind::Failed { error_type: t, .. } = &mut self.kind {
            *t = error_type.into();
        }
        self
    }

    /// The plugin stopped because it was cancelled: the caller gets the
    /// retryable 503 shutdown-abort, not a failure.
    pub fn shutdown() -> Error {
        Error {
            kind: ErrorKind::Shutdown,
        }
    }

    /// Whether this is [`Error::shutdown`].
    pub fn is_shutdown(&self) -> bool {
        matches!(self.kind, ErrorKind::Shutdown)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Error {
        let full = std::any::type_name::<E>();
        let short = full.rsplit("::").next().unwrap_or(full);
        Error::new(e.to_string()).with_type(short.split('<').next().unwrap_or(short).to_owned())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Failed {
                status,
                error_type,
                message,
            } => {
                write!(f, "[{error_type}] {message} (status {status})")
            }
            ErrorKind::Shutdown => f.write_str("shutdown"),
        }
    }
}

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

static PROCESS_CANCEL: AtomicPtrCell = AtomicPtrCell::new();

/// The process-wide cancel flag, set once when the server starts shutting
/// down. For a plugin's own background threads; inside `invoke`, prefer
/// [`Context::cancellation`], which is also set when the client goes away.
pub fn process_cancellation() -> CancellationToken {
    // SAFETY: PROCESS_CANCEL holds NULL or the host's process-wide flag.
    unsafe { CancellationToken::from_raw(PROCESS_CANCEL.get()) }
}

struct AtomicPtrCell(std::sync::atomic::AtomicPtr<u32>);

impl AtomicPtrCell {
    const fn new() -> Self {
        AtomicPtrCell(std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()))
    }
    fn get(&self) -> *const u32 {
        self.0.load(Ordering::Acquire)
    }
    fn set(&self, p: *const u32) {
        self.0.store(p.cast_mut(), Ordering::Release);
    }
}

/// Filedata metadata the plugin reports (`filedata_meta` in the envelope).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileDataMeta {
    pub terminate_current: bool,
    pub new_records: Vec<serde_json::Value>,
}

/// What a plugin reports besides its output: usage, messages, filedata
/// metadata, and whether it should stop.
pub struct Context<'a> {
    raw: &'a abi::EtlInvokeCtx,
}

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
    raw: &'a abi::EtlInvokeCtx,
    _item: PhantomData<fn(&T)>,
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

/// Serialises `value` as JSON and passes the bytes to `f`, in a buffer this
/// thread keeps for the next value: no allocation per output once the
/// buffer has grown to the outputs' size. (A buffer grown past 64 KiB is
/// let go, so one huge output does not stay resident.)
fn with_json<T: Serialize + ?Sized, R>(
    value: &T,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, serde_json::Error> {
    thread_local! {
        static BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    // Taken out of the cell, so a nested call (none is expected) would
    // simply start a buffer of its own.
    let mut buf = BUFFER.take();
    buf.clear();
    let result = serde_json::to_writer(&mut buf, value).map(|()| f(&buf));
    if buf.capacity() <= 64 * 1024 {
        BUFFER.set(buf);
    }
    result
}

// ---------------------------------------------------------------------------
// What export_plugin! expands to. Not part of the public API.
// ---------------------------------------------------------------------------

#[doc(hidden)]
pub mod __private {
    pub use super::runtime::*;
}

mod runtime {
    use super::*;

    /// One exported plugin: its instance (after init) and its table.
    pub struct Runtime<A: Adapter> {
        instance: OnceLock<A::Plugin>,
        table: OnceLock<Table>,
    }

    /// The table with the strings it points into, kept together.
    pub struct Table {
        plugin: abi::EtlPlugin,
        _strings: [Box<str>; 5],
    }

    // SAFETY: the table is written once, then only read; the raw pointers in
    // it point into the boxed strings next to it, which never move or change.
    unsafe impl Send for Table {}
    // SAFETY: as above.
    unsafe impl Sync for Table {}

    /// The extern "C" hooks for a runtime, written by the macro.
    pub struct Hooks {
        pub init: unsafe extern "C" fn(*const abi::EtlInitCtx) -> i32,
        pub shutdown: unsafe extern "C" fn(),
        pub invoke: unsafe extern "C" fn(*const abi::EtlInvokeCtx, abi::EtlStr) -> i32,
        pub precheck: unsafe extern "C" fn(*const abi::EtlInvokeCtx) -> i32,
    }

    /// Bridges [`Plugin`] and [`StreamingPlugin`] to one runtime.
    pub trait Adapter: 'static {
        type Plugin: Send + Sync + 'static;
        type Input: DeserializeOwned + JsonSchema;
        type Output: JsonSchema;
        const NAME: &'static str;
        const VERSION: &'static str;
        const CAPABILITIES: Capabilities;
        const ID: Option<&'static str>;
        const STREAMING: bool;
        fn init(config: &str) -> Result<Self::Plugin, Error>;
        fn run(p: &Self::Plugin, input: Self::Input, raw: &abi::EtlInvokeCtx) -> Result<(), Error>;
        fn precheck(p: &Self::Plugin, ctx: &mut Context) -> Result<(), Error>;
        fn shutdown(p: &Self::Plugin);
    }

    /// Adapter for a [`Plugin`].
    pub struct Plain<P>(PhantomData<P>);
    /// Adapter for a [`StreamingPlugin`].
    pub struct Streaming<P>(PhantomData<P>);

    impl<P: Plugin> Adapter for Plain<P> {
        type Plugin = P;
        type Input = P::Input;
        type Output = P::Output;
        const NAME: &'static str = P::NAME;
        const VERSION: &'static str = P::VERSION;
        const CAPABILITIES: Capabilities = P::CAPABILITIES;
        const ID: Option<&'static str> = P::ID;
        const STREAMING: bool = false;
        fn init(config: &str) -> Result<P, Error> {
            P::init(config)
        }
        fn run(p: &P, input: P::Input, raw: &abi::EtlInvokeCtx) -> Result<(), Error> {
            let output = p.invoke(input, &mut Context { raw })?;
            let rc = super::with_json(&output, |json| {
                // SAFETY: static host table, handle valid during invoke.
                unsafe { ((*raw.host).emit)(raw.invocation, abi::EtlStr::from_bytes(json)) }
            })
            .map_err(|e| Error::new(format!("cannot serialise output: {e}")))?;
            if rc == abi::CB_OK || rc == abi::CB_CLOSED {
                Ok(())
            } else {
                Err(Error::new(format!(
                    "the host refused the output (code {rc})"
                )))
            }
        }
        fn precheck(p: &P, ctx: &mut Context) -> Result<(), Error> {
            p.precheck(ctx)
        }
        fn shutdown(p: &P) {
            p.shutdown()
        }
    }

    impl<P: StreamingPlugin> Adapter for Streaming<P> {
        type Plugin = P;
        type Input = P::Input;
        type Output = P::Item;
        const NAME: &'static str = P::NAME;
        const VERSION: &'static str = P::VERSION;
        const CAPABILITIES: Capabilities = P::CAPABILITIES;
        const ID: Option<&'static str> = P::ID;
        const STREAMING: bool = true;
        fn init(config: &str) -> Result<P, Error> {
            P::init(config)
        }
        fn run(p: &P, input: P::Input, raw: &abi::EtlInvokeCtx) -> Result<(), Error> {
            p.invoke(
                input,
                &mut Context { raw },
                &mut Emitter {
                    raw,
                    _item: PhantomData,
                },
            )
        }
        fn precheck(p: &P, ctx: &mut Context) -> Result<(), Error> {
            p.precheck(ctx)
        }
        fn shutdown(p: &P) {
            p.shutdown()
        }
    }

    fn panic_message(payload: &(dyn Any + Send)) -> String {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic with a non-string payload".to_owned()
        }
    }

    /// Reports `err` through the host and returns the matching result code.
    fn report(raw: &abi::EtlInvokeCtx, err: Error) -> i32 {
        match err.kind {
            ErrorKind::Shutdown => abi::RESULT_SHUTDOWN,
            ErrorKind::Failed {
                status,
                error_type,
                message,
            } => {
                // SAFETY: static host table, handle valid during the hook.
                unsafe {
                    ((*raw.host).set_failure)(
                        raw.invocation,
                        i32::from(status),
                        abi::EtlStr::from_str(&error_type),
                        abi::EtlStr::from_str(&message),
                    )
                };
                abi::RESULT_FAILED
            }
        }
    }

    impl<A: Adapter> Runtime<A> {
        #[allow(clippy::new_without_default)]
        pub const fn new() -> Self {
            Runtime {
                instance: OnceLock::new(),
                table: OnceLock::new(),
            }
        }

        /// The table, built on first use; NULL if building it panicked
        /// (the host then refuses the plugin with "returned NULL").
        pub fn table(&'static self, hooks: Hooks) -> *const abi::EtlPlugin {
            match catch_unwind(AssertUnwindSafe(|| self.build_table(hooks))) {
                Ok(table) => table,
                Err(_) => std::ptr::null(),
            }
        }

        fn build_table(&'static self, hooks: Hooks) -> *const abi::EtlPlugin {
            let t = self.table.get_or_init(|| {
                let strings: [Box<str>; 5] = [
                    A::NAME.into(),
                    A::VERSION.into(),
                    schema_for::<A::Input>().to_string().into(),
                    schema_for::<A::Output>().to_string().into(),
                    A::ID.unwrap_or("").into(),
                ];
                let s = |i: usize| abi::EtlStr::from_str(&strings[i]);
                let plugin = abi::EtlPlugin {
                    abi_version_major: abi::ABI_VERSION_MAJOR,
                    abi_version_minor: abi::ABI_VERSION_MINOR,
                    struct_size: std::mem::size_of::<abi::EtlPlugin>() as u32,
                    name: s(0),
                    version: s(1),
                    inputs_schema: s(2),
                    outputs_schema: s(3),
                    id: s(4),
                    capabilities: A::CAPABILITIES.bits(),
                    flags: if A::STREAMING { abi::FLAG_STREAMING } else { 0 },
                    init: Some(hooks.init),
                    shutdown: Some(hooks.shutdown),
                    invoke: Some(hooks.invoke),
                    precheck: Some(hooks.precheck),
                };
                Table {
                    plugin,
                    _strings: strings,
                }
            });
            &t.plugin
        }

        /// `etl_plugin.init`.
        ///
        /// # Safety
        /// `ctx` is a valid `etl_init_ctx` for the duration of the call.
        pub unsafe fn init(&'static self, ctx: *const abi::EtlInitCtx) -> i32 {
            // SAFETY: the caller passes a valid context.
            let ctx = unsafe { &*ctx };
            PROCESS_CANCEL.set(ctx.process_cancel_flag);
            let fail = |msg: &str| {
                // SAFETY: set_error and host_data come from the host for this call.
                unsafe { (ctx.set_error)(ctx.host_data, abi::EtlStr::from_str(msg)) };
                1
            };
            // SAFETY: the config string is borrowed for the duration of init.
            let config = match std::str::from_utf8(unsafe { ctx.config.as_bytes() }) {
                Ok(c) => c,
                Err(_) => return fail("the plugin configuration is not valid UTF-8"),
            };
            match catch_unwind(|| A::init(config)) {
                Ok(Ok(p)) => {
                    if self.instance.set(p).is_err() {
                        return fail("init was called twice");
                    }
                    0
                }
                Ok(Err(e)) => fail(&format!("{e:?}")),
                Err(panic) => fail(&format!("init panicked: {}", panic_message(&*panic))),
            }
        }

        /// `etl_plugin.shutdown`.
        pub fn shutdown(&'static self) {
            if let Some(p) = self.instance.get() {
                let _ = catch_unwind(AssertUnwindSafe(|| A::shutdown(p)));
            }
        }

        /// `etl_plugin.invoke`.
        ///
        /// # Safety
        /// `ctx` is a valid `etl_invoke_ctx` and `request` a valid `etl_str`
        /// for the duration of the call.
        pub unsafe fn invoke(
            &'static self,
            ctx: *const abi::EtlInvokeCtx,
            request: abi::EtlStr,
        ) -> i32 {
            // SAFETY: the caller passes a valid context for this call.
            let raw = unsafe { &*ctx };
            let Some(p) = self.instance.get() else {
                return report(raw, Error::new("invoke was called before init"));
            };
            // SAFETY: the request is borrowed for the duration of invoke.
            let bytes = unsafe { request.as_bytes() };
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                // One UTF-8 check of the whole input, so that the parser
                // need not check each string in it again.
                let text = std::str::from_utf8(bytes).map_err(|e| {
                    Error::with_status(422, format!("invalid input: not UTF-8 ({e})"))
                        .with_type("InputError")
                })?;
                let input: A::Input = serde_json::from_str(text).map_err(|e| {
                    Error::with_status(422, format!("invalid input: {e}")).with_type("InputError")
                })?;
                A::run(p, input, raw)
            }));
            match outcome {
                Ok(Ok(())) => abi::RESULT_OK,
                Ok(Err(e)) => report(raw, e),
                Err(panic) => report(
                    raw,
                    Error::new(panic_message(&*panic)).with_type("PluginPanic"),
                ),
            }
        }

        /// `etl_plugin.precheck`.
        ///
        /// # Safety
        /// `ctx` is a valid `etl_invoke_ctx` for the duration of the call.
        pub unsafe fn precheck(&'static self, ctx: *const abi::EtlInvokeCtx) -> i32 {
            // SAFETY: the caller passes a valid context for this call.
            let raw = unsafe { &*ctx };
            let Some(p) = self.instance.get() else {
                return report(raw, Error::new("precheck was called before init"));
            };
            match catch_unwind(AssertUnwindSafe(|| A::precheck(p, &mut Context { raw }))) {
                Ok(Ok(())) => abi::RESULT_OK,
                Ok(Err(e)) => report(raw, e),
                Err(panic) => report(
                    raw,
                    Error::new(panic_message(&*panic)).with_type("PluginPanic"),
                ),
            }
        }
    }
}

/// Exports a plugin type as the library's `etl_plugin_entry` symbol.
///
/// `export_plugin!(MyPlugin)` for a [`Plugin`];
/// `export_plugin!(streaming MyPlugin)` for a [`StreamingPlugin`].
/// Use it once per library (`crate-type = ["cdylib"]`).
#[macro_export]
macro_rules! export_plugin {
    (streaming $ty:ty) => {
        $crate::export_plugin!(@with $crate::__private::Streaming<$ty>);
    };
    ($ty:ty) => {
        $crate::export_plugin!(@with $crate::__private::Plain<$ty>);
    };
    (@with $adapter:ty) => {
        const _: () = {
            static RUNTIME: $crate::__private::Runtime<$adapter> = $crate::__private::Runtime::new();

            unsafe extern "C" fn etl_init(ctx: *const $crate::__abi::EtlInitCtx) -> i32 {
                // SAFETY: the host passes a valid context (etl_plugin.h).
                unsafe { RUNTIME.init(ctx) }
            }
            unsafe extern "C" fn etl_shutdown() {
                RUNTIME.shutdown()
            }
            unsafe extern "C" fn etl_invoke(
                ctx: *const $crate::__abi::EtlInvokeCtx,
                request: $crate::__abi::EtlStr,
            ) -> i32 {
                // SAFETY: the host passes a valid context and request (etl_plugin.h).
                unsafe { RUNTIME.invoke(ctx, request) }
            }
            unsafe extern "C" fn etl_precheck(ctx: *const $crate::__abi::EtlInvokeCtx) -> i32 {
                // SAFETY: the host passes a valid context (etl_plugin.h).
                unsafe { RUNTIME.precheck(ctx) }
            }

            #[no_mangle]
            pub extern "C" fn etl_plugin_entry() -> *const $crate::__abi::EtlPlugin {
                RUNTIME.table($crate::__private::Hooks {
                    init: etl_init,
                    shutdown: etl_shutdown,
                    invoke: etl_invoke,
                    precheck: etl_precheck,
                })
            }
        };
    };
}

#[doc(hidden)]
pub use etl_abi as __abi;

#[cfg(test)]
mod tests {
    use super::with_json;

    #[test]
    fn each_value_gets_exactly_its_own_json() {
        let long = with_json(&serde_json::json!({"a": "x".repeat(100)}), <[u8]>::to_vec).unwrap();
        assert_eq!(long.len(), 108);
        // Shorter after longer: nothing of the earlier value is left over.
        assert_eq!(with_json(&[1, 2], <[u8]>::to_vec).unwrap(), b"[1,2]");
        let huge = "y".repeat(100 * 1024);
        assert_eq!(with_json(&huge, <[u8]>::len).unwrap(), huge.len() + 2);
        assert_eq!(with_json("z", <[u8]>::to_vec).unwrap(), b"\"z\"");
    }

    #[test]
    fn a_value_that_cannot_be_serialised_is_an_error() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), 3);
        assert!(with_json(&map, |_| ()).is_err());
    }
}
