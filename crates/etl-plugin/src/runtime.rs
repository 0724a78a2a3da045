//! What [`export_plugin!`](crate::export_plugin) expands to: the table
//! and the `extern "C"` hooks' bodies. Not part of the public API.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use etl_abi as abi;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use crate::context::{host_has, HOST, PROCESS_CANCEL};
use crate::error::{ErrorKind, Failure};
use crate::{
    schema_for, with_json, Audience, Capabilities, Context, Emitter, Error, Plugin, Precheck,
    StreamingPlugin,
};

/// One exported plugin: its instance (after init) and its table.
pub struct Runtime<A: Adapter> {
    instance: OnceLock<A::Plugin>,
    table: OnceLock<Table>,
    /// The plugin's [`Precheck`], if it implements it.
    precheck: OnceLock<Option<PrecheckFn<A::Plugin>>>,
}

/// A plugin's `Precheck::precheck`.
pub type PrecheckFn<P> = fn(&P, &mut Context) -> Result<(), Error>;

/// Tells, at the macro's call site, whether a plugin type implements
/// [`Precheck`]: `(&&&Probe::<T>(PhantomData)).precheck_fn()` resolves to
/// [`ViaPrecheck`] when it does (a receiver with more references wins) and
/// to [`NoPrecheck`] when it does not. Stable Rust cannot ask a generic
/// function this; a concrete type in the expansion can.
pub struct Probe<T>(pub PhantomData<T>);

/// The plugin implements [`Precheck`].
pub trait ViaPrecheck<T> {
    fn precheck_fn(&self) -> Option<PrecheckFn<T>>;
}

impl<T: Precheck> ViaPrecheck<T> for &&Probe<T> {
    fn precheck_fn(&self) -> Option<PrecheckFn<T>> {
        Some(<T as Precheck>::precheck)
    }
}

/// The plugin does not implement [`Precheck`].
pub trait NoPrecheck<T> {
    fn precheck_fn(&self) -> Option<PrecheckFn<T>>;
}

impl<T> NoPrecheck<T> for &Probe<T> {
    fn precheck_fn(&self) -> Option<PrecheckFn<T>> {
        None
    }
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

impl Hooks {
    /// The table's `precheck`: the hook when the plugin implements
    /// [`Precheck`] (`body`), else NULL, so that the host answers a plain
    /// success and `--check` says `precheck: no`.
    fn precheck<P>(
        &self,
        body: Option<PrecheckFn<P>>,
    ) -> Option<unsafe extern "C" fn(*const abi::EtlInvokeCtx) -> i32> {
        body.map(|_| self.precheck)
    }
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
        let rc = with_json(&output, |json| {
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
    let failure = match err.kind {
        ErrorKind::Shutdown => return abi::RESULT_SHUTDOWN,
        ErrorKind::Failed(failure) => failure,
    };
    // SAFETY: static host table.
    let host = unsafe { &*raw.host };
    let classified = failure.category.is_some() || failure.plugin_error.is_some();
    if classified && host_has(host, std::mem::offset_of!(abi::EtlHostApi, report_failure)) {
        report_classified(host, raw.invocation, &failure);
    } else {
        // SAFETY: handle valid during the hook; strings borrowed for the call.
        unsafe {
            (host.set_failure)(
                raw.invocation,
                i32::from(failure.status),
                abi::EtlStr::from_str(&failure.error_type),
                abi::EtlStr::from_str(&failure.message),
            )
        };
    }
    abi::RESULT_FAILED
}

/// Reports a failure with its classification (`report_failure`, ABI 1.1).
fn report_classified(host: &abi::EtlHostApi, inv: *mut abi::EtlInvocation, failure: &Failure) {
    let nullable = |s: Option<&str>| s.map_or(abi::EtlStr::EMPTY, abi::EtlStr::from_str);
    let text = failure.text();
    let plugin_error = failure.plugin_error.as_ref().map(|e| abi::EtlPluginError {
        error_type: abi::EtlStr::from_str(&e.error_type),
        error_reason: abi::EtlStr::from_str(&e.error_reason),
        dependency: nullable(e.dependency.as_deref()),
        audience: match e.audience {
            None => abi::AUDIENCE_NONE,
            Some(Audience::User) => abi::AUDIENCE_USER,
            Some(Audience::Platform) => abi::AUDIENCE_PLATFORM,
        },
        retryable: u32::from(e.retryable),
    });
    let report = abi::EtlFailure {
        struct_size: std::mem::size_of::<abi::EtlFailure>() as u32,
        status_code: i32::from(failure.status),
        status_code_text: abi::EtlStr::from_str(&text),
        failure_category: nullable(failure.category.as_deref()),
        plugin_error: plugin_error
            .as_ref()
            .map_or(std::ptr::null(), |e| e as *const abi::EtlPluginError),
    };
    // SAFETY: the callback exists (checked by the caller); everything
    // `report` points to lives until the call returns.
    unsafe { (host.report_failure)(inv, &report) };
}

impl<A: Adapter> Runtime<A> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Runtime {
            instance: OnceLock::new(),
            table: OnceLock::new(),
            precheck: OnceLock::new(),
        }
    }

    /// The table, built on first use; NULL if building it panicked
    /// (the host then refuses the plugin with "returned NULL").
    /// `precheck` is the plugin's [`Precheck`], found by [`Probe`].
    pub fn table(
        &'static self,
        hooks: Hooks,
        precheck: Option<PrecheckFn<A::Plugin>>,
    ) -> *const abi::EtlPlugin {
        let precheck = *self.precheck.get_or_init(|| precheck);
        match catch_unwind(AssertUnwindSafe(|| self.build_table(hooks, precheck))) {
            Ok(table) => table,
            Err(_) => std::ptr::null(),
        }
    }

    fn build_table(
        &'static self,
        hooks: Hooks,
        precheck: Option<PrecheckFn<A::Plugin>>,
    ) -> *const abi::EtlPlugin {
        let t = self.table.get_or_init(|| {
            let strings: [Box<str>; 5] = [
                A::NAME.into(),
                A::VERSION.into(),
                crate::schema::inputs_schema_for::<A::Input>()
                    .to_string()
                    .into(),
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
                precheck: hooks.precheck(precheck),
                // The instance lives in the runtime, not behind a state
                // pointer: `shutdown` finds it there.
                finish: None,
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
        if ctx.struct_size as usize > std::mem::offset_of!(abi::EtlInitCtx, host) {
            HOST.set(ctx.host);
        }
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
            let input: A::Input = parse_input(text).map_err(|e| {
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
        let Some(precheck) = self.precheck.get().copied().flatten() else {
            return report(
                raw,
                Error::new("precheck was called, but the plugin has none"),
            );
        };
        match catch_unwind(AssertUnwindSafe(|| precheck(p, &mut Context { raw }))) {
            Ok(Ok(())) => abi::RESULT_OK,
            Ok(Err(e)) => report(raw, e),
            Err(panic) => report(
                raw,
                Error::new(panic_message(&*panic)).with_type("PluginPanic"),
            ),
        }
    }
}

/// A plugin's input, parsed from the request the host hands over. serde_json
/// stops at 128 levels of nesting by default; the host has already refused
/// a body nested deeper than 1000 (docs/abi.md, "What `request` holds"), and
/// calls run on 8 MiB stacks, so the input is parsed as deep as it comes.
fn parse_input<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    let mut parser = serde_json::Deserializer::from_str(text);
    parser.disable_recursion_limit();
    let input = T::deserialize(&mut parser)?;
    parser.end()?;
    Ok(input)
}
