//! The C ABI between etl-serve and its plugins, as Rust types.
//!
//! This crate mirrors `include/etl_plugin.h` field for field; the header is
//! the source of truth and its comments are the contract (who calls what, on
//! which thread, who owns each pointer). The `layout` test compiles the real
//! header with the system C compiler and checks every size and offset here
//! against it, so the two cannot drift.
//!
//! Plugin authors writing Rust use the `etl-plugin` SDK instead of this crate.

#![no_std]

use core::ffi::c_void;

/// `ETL_ABI_VERSION_MAJOR`: the host refuses plugins built for another major.
pub const ABI_VERSION_MAJOR: u16 = 1;
/// `ETL_ABI_VERSION_MINOR`: minors only append fields.
pub const ABI_VERSION_MINOR: u16 = 1;
/// `ETL_PLUGIN_ENTRY_SYMBOL`, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"etl_plugin_entry\0";

/// `ETL_RESULT_OK`.
pub const RESULT_OK: i32 = 0;
/// `ETL_RESULT_FAILED`.
pub const RESULT_FAILED: i32 = 1;
/// `ETL_RESULT_SHUTDOWN`.
pub const RESULT_SHUTDOWN: i32 = 2;

/// `ETL_CB_OK`.
pub const CB_OK: i32 = 0;
/// `ETL_CB_INVALID`.
pub const CB_INVALID: i32 = -1;
/// `ETL_CB_REJECTED`.
pub const CB_REJECTED: i32 = -2;
/// `ETL_CB_CLOSED`.
pub const CB_CLOSED: i32 = -3;

/// `ETL_CAP_USAGE`.
pub const CAP_USAGE: u32 = 1 << 0;
/// `ETL_CAP_MESSAGE_CHANNELS`.
pub const CAP_MESSAGE_CHANNELS: u32 = 1 << 1;
/// `ETL_CAP_FILEDATA_META`.
pub const CAP_FILEDATA_META: u32 = 1 << 2;
/// `ETL_CAP_CANCELLATION`.
pub const CAP_CANCELLATION: u32 = 1 << 3;
/// `ETL_CAP_SEALED_SETTINGS_V2` (1.1).
pub const CAP_SEALED_SETTINGS_V2: u32 = 1 << 4;

/// `ETL_LOG_ERROR` (1.1).
pub const LOG_ERROR: i32 = 1;
/// `ETL_LOG_WARN` (1.1).
pub const LOG_WARN: i32 = 2;
/// `ETL_LOG_INFO` (1.1).
pub const LOG_INFO: i32 = 3;
/// `ETL_LOG_DEBUG` (1.1).
pub const LOG_DEBUG: i32 = 4;
/// `ETL_LOG_TRACE` (1.1).
pub const LOG_TRACE: i32 = 5;

/// `ETL_NO_DEADLINE` (1.1).
pub const NO_DEADLINE: i64 = i64::MAX;

/// `ETL_AUDIENCE_NONE` (1.1).
pub const AUDIENCE_NONE: u32 = 0;
/// `ETL_AUDIENCE_USER` (1.1).
pub const AUDIENCE_USER: u32 = 1;
/// `ETL_AUDIENCE_PLATFORM` (1.1).
pub const AUDIENCE_PLATFORM: u32 = 2;

/// `ETL_FLAG_STREAMING`.
pub const FLAG_STREAMING: u32 = 1 << 0;

/// `etl_str`: a borrowed UTF-8 string of `len` bytes at `ptr`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EtlStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl EtlStr {
    /// The empty string (NULL pointer, zero length).
    pub const EMPTY: EtlStr = EtlStr {
        ptr: core::ptr::null(),
        len: 0,
    };

    /// Borrows `s`. The result is valid as long as `s` is.
    pub const fn from_str(s: &str) -> EtlStr {
        EtlStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Borrows `b`. The result is valid as long as `b` is.
    pub const fn from_bytes(b: &[u8]) -> EtlStr {
        EtlStr {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }

    /// The bytes this string points to.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `len` bytes for `'a` (or `len` must
    /// be 0), as the header requires of every `etl_str`.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: the caller guarantees `ptr` is readable for `len` bytes.
            unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// `etl_invocation`: an opaque handle, only ever passed back to the host.
#[repr(C)]
pub struct EtlInvocation {
    _private: [u8; 0],
}

/// `etl_plugin_error` (1.1): the envelope's `plugin_error`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EtlPluginError {
    pub error_type: EtlStr,
    pub error_reason: EtlStr,
    pub dependency: EtlStr,
    pub audience: u32,
    pub retryable: u32,
}

/// `etl_failure` (1.1): a failure as the envelope reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EtlFailure {
    pub struct_size: u32,
    pub status_code: i32,
    pub status_code_text: EtlStr,
    pub failure_category: EtlStr,
    pub plugin_error: *const EtlPluginError,
}

/// `etl_host_api`: the host's callbacks.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EtlHostApi {
    pub struct_size: u32,
    pub emit: unsafe extern "C" fn(*mut EtlInvocation, EtlStr) -> i32,
    pub add_usage: unsafe extern "C" fn(*mut EtlInvocation, EtlStr, i64) -> i32,
    pub add_info: unsafe extern "C" fn(*mut EtlInvocation, EtlStr) -> i32,
    pub add_warning: unsafe extern "C" fn(*mut EtlInvocation, EtlStr) -> i32,
    pub set_filedata_meta: unsafe extern "C" fn(*mut EtlInvocation, EtlStr) -> i32,
    pub set_failure: unsafe extern "C" fn(*mut EtlInvocation, i32, EtlStr, EtlStr) -> i32,
    /// 1.1.
    pub log: unsafe extern "C" fn(*mut EtlInvocation, i32, EtlStr) -> i32,
    /// 1.1.
    pub remaining_ms: unsafe extern "C" fn(*mut EtlInvocation) -> i64,
    /// 1.1.
    pub report_failure: unsafe extern "C" fn(*mut EtlInvocation, *const EtlFailure) -> i32,
    /// 1.1.
    pub add_usage_text: unsafe extern "C" fn(*mut EtlInvocation, EtlStr, EtlStr) -> i32,
    /// 1.1.
    pub set_file_data: unsafe extern "C" fn(*mut EtlInvocation, EtlStr) -> i32,
    /// 1.1.
    pub reject_request: unsafe extern "C" fn(*mut EtlInvocation, i32, EtlStr) -> i32,
}

/// `etl_invoke_ctx`: what `invoke` and `precheck` receive.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EtlInvokeCtx {
    pub struct_size: u32,
    pub invocation: *mut EtlInvocation,
    pub host: *const EtlHostApi,
    pub cancel_flag: *const u32,
    pub process_cancel_flag: *const u32,
    /// 1.1.
    pub state: *mut c_void,
    /// 1.1.
    pub request_id: EtlStr,
    /// 1.1.
    pub invocation_settings: EtlStr,
    /// 1.1.
    pub invocation_context: EtlStr,
}

/// `etl_init_ctx`: what `init` receives.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EtlInitCtx {
    pub struct_size: u32,
    pub config: EtlStr,
    pub process_cancel_flag: *const u32,
    pub host_data: *mut c_void,
    pub set_error: unsafe extern "C" fn(*mut c_void, EtlStr),
    /// 1.1.
    pub host: *const EtlHostApi,
    /// 1.1.
    pub state: *mut *mut c_void,
    /// 1.1.
    pub describe: unsafe extern "C" fn(*mut c_void, *const EtlDescription),
}

/// `etl_description` (1.1): what `init` can say that the table could not.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EtlDescription {
    pub struct_size: u32,
    pub name: EtlStr,
    pub version: EtlStr,
    pub inputs_schema: EtlStr,
    pub outputs_schema: EtlStr,
    pub id: EtlStr,
    pub capabilities: u32,
    pub flags: u32,
    pub request_schema: EtlStr,
}

/// `etl_plugin`: the plugin's table.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EtlPlugin {
    pub abi_version_major: u16,
    pub abi_version_minor: u16,
    pub struct_size: u32,
    pub name: EtlStr,
    pub version: EtlStr,
    pub inputs_schema: EtlStr,
    pub outputs_schema: EtlStr,
    pub id: EtlStr,
    pub capabilities: u32,
    pub flags: u32,
    pub init: Option<unsafe extern "C" fn(*const EtlInitCtx) -> i32>,
    pub shutdown: Option<unsafe extern "C" fn()>,
    pub invoke: Option<unsafe extern "C" fn(*const EtlInvokeCtx, EtlStr) -> i32>,
    pub precheck: Option<unsafe extern "C" fn(*const EtlInvokeCtx) -> i32>,
    /// 1.1.
    pub finish: Option<unsafe extern "C" fn(*mut c_void)>,
}

impl EtlPlugin {
    /// The size of the table in ABI 1.0, the smallest a host accepts.
    pub const SIZE_1_0: usize = core::mem::offset_of!(EtlPlugin, finish);
}

/// `etl_plugin_entry_fn`: the type of the exported entry symbol.
pub type EtlPluginEntryFn = unsafe extern "C" fn() -> *const EtlPlugin;
