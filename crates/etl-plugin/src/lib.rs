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
//!
//! # Numbers
//!
//! The host hands `invoke` the request's numbers as they were sent, every
//! digit. A typed field takes what fits it: `u128` and `i128` hold integers
//! up to 128 bits. A `serde_json::Value` in the input keeps what serde_json
//! keeps: an integer beyond 64 bits becomes the nearest `f64`, unless the
//! plugin's crate enables serde_json's `arbitrary_precision` feature (the
//! reference host, in Python, keeps such integers whole). Cargo unifies
//! features across the packages it builds together, and etl-serve enables
//! that one: an example built with it (`cargo build --workspace`, or as the
//! Dockerfile builds) keeps them whole, and the same plugin built alone
//! (`-p wordcount`, or in a repository of its own) does not.

use etl_abi as abi;
pub use schemars::{self, JsonSchema};
use serde::de::DeserializeOwned;
use serde::Serialize;

mod context;
mod error;
mod runtime;
pub mod schema;

pub use context::{
    log, process_cancellation, CancellationToken, Context, Emitter, FileDataMeta, Level,
};
pub use error::{Audience, Error, PluginError};
pub use schema::{inputs_schema_for, schema_for};

/// Which injected capabilities a plugin declares (`ETL_CAP_*`).
///
/// The callbacks work whatever is declared; the bits show up in
/// `etl-serve --check` and its startup log line, and `cancellation` tells
/// operators that the plugin stops promptly on shutdown.
/// `sealed_settings_v2` is different: it says the plugin opens sealed
/// settings documents itself ([`Context::invocation_settings`]), and makes
/// `/metadata` advertise that to controllers.
///
/// Build one from [`Capabilities::NONE`] (`..Capabilities::NONE`), so that
/// capabilities added later do not break the plugin's build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub usage: bool,
    pub message_channels: bool,
    pub filedata_meta: bool,
    pub cancellation: bool,
    pub sealed_settings_v2: bool,
}

impl Capabilities {
    /// No capabilities.
    pub const NONE: Capabilities = Capabilities {
        usage: false,
        message_channels: false,
        filedata_meta: false,
        cancellation: false,
        sealed_settings_v2: false,
    };

    fn bits(self) -> u32 {
        (self.usage as u32 * abi::CAP_USAGE)
            | (self.message_channels as u32 * abi::CAP_MESSAGE_CHANNELS)
            | (self.filedata_meta as u32 * abi::CAP_FILEDATA_META)
            | (self.cancellation as u32 * abi::CAP_CANCELLATION)
            | (self.sealed_settings_v2 as u32 * abi::CAP_SEALED_SETTINGS_V2)
    }
}

/// A plugin's own readiness check, answering `GET /precheck` (reach its
/// dependencies, check its credentials...). Optional: implement it for the
/// plugin type, and [`export_plugin!`] finds it. A plugin without one
/// answers a plain success, and `etl-serve --check` says `precheck: no`.
///
/// It runs on a host worker thread, with the same [`Context`] as `invoke`
/// (usage and messages are reported; there is no output).
pub trait Precheck {
    /// Checks that the plugin can work.
    ///
    /// # Errors
    /// An [`Error`] becomes the precheck answer's `status_code` and
    /// `status_code_text`; [`Error::shutdown`] its 503.
    fn precheck(&self, ctx: &mut Context) -> Result<(), Error>;
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

    /// See [`Plugin::shutdown`].
    fn shutdown(&self) {}
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

// What export_plugin! expands to. Not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use super::runtime::*;
}

/// Exports a plugin type as the library's `etl_plugin_entry` symbol.
///
/// `export_plugin!(MyPlugin)` for a [`Plugin`];
/// `export_plugin!(streaming MyPlugin)` for a [`StreamingPlugin`].
/// Use it once per library (`crate-type = ["cdylib"]`).
#[macro_export]
macro_rules! export_plugin {
    (streaming $ty:ty) => {
        $crate::export_plugin!(@with $crate::__private::Streaming<$ty>, $ty);
    };
    ($ty:ty) => {
        $crate::export_plugin!(@with $crate::__private::Plain<$ty>, $ty);
    };
    (@with $adapter:ty, $ty:ty) => {
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
                #[allow(unused_imports)]
                use $crate::__private::{NoPrecheck as _, ViaPrecheck as _};
                let precheck = (&&&$crate::__private::Probe::<$ty>(::core::marker::PhantomData))
                    .precheck_fn();
                RUNTIME.table(
                    $crate::__private::Hooks {
                        init: etl_init,
                        shutdown: etl_shutdown,
                        invoke: etl_invoke,
                        precheck: etl_precheck,
                    },
                    precheck,
                )
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
