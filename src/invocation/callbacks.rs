//! The callbacks of `etl_host_api`, which a plugin calls while an
//! invocation runs (and, for `log`, at any time). Each runs on a plugin
//! thread; none may unwind into C.

use etl_abi as abi;

use serde_json::value::RawValue;

use super::{registry, Class, Failure, Invocation, Kind, CURRENT};
use crate::envelope;
use crate::sync::lock;

/// The callbacks, static for the life of the process.
pub static HOST_API: abi::EtlHostApi = abi::EtlHostApi {
    struct_size: std::mem::size_of::<abi::EtlHostApi>() as u32,
    emit: cb_emit,
    add_usage: cb_add_usage,
    add_info: cb_add_info,
    add_warning: cb_add_warning,
    set_filedata_meta: cb_set_filedata_meta,
    set_failure: cb_set_failure,
    log: cb_log,
    remaining_ms: cb_remaining_ms,
    report_failure: cb_report_failure,
    add_usage_text: cb_add_usage_text,
    set_file_data: cb_set_file_data,
    reject_request: cb_reject_request,
};

/// Runs `f` on the live invocation named by `handle`, or answers
/// `ETL_CB_CLOSED` when there is none. Never unwinds.
fn with_live(handle: *mut abi::EtlInvocation, f: impl FnOnce(&Invocation) -> i32) -> i32 {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| live(handle as u64, f)))
        .map_or(abi::CB_INVALID, |r| r.unwrap_or(abi::CB_CLOSED))
}

/// Runs `f` on the live invocation `handle`, or returns `None` when there
/// is none.
fn live<T>(handle: u64, f: impl FnOnce(&Invocation) -> T) -> Option<T> {
    let (current, inv) = CURRENT.get();
    // Handles are never 0, so the empty (0, null) never matches.
    if handle == current {
        // SAFETY: CURRENT holds this address only while Invocation::call
        // runs on this thread with a borrow of the invocation, and this
        // callback runs inside that call.
        return Some(f(unsafe { &*inv }));
    }
    let inv = registry(handle).live.get(&handle).cloned()?;
    Some(f(&inv))
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

unsafe extern "C" fn cb_add_usage_text(
    handle: *mut abi::EtlInvocation,
    name: abi::EtlStr,
    value: abi::EtlStr,
) -> i32 {
    with_live(handle, |inv| {
        let (Some(name), Some(value)) = (
            text(inv, "a usage name", name),
            text(inv, "a usage value", value),
        ) else {
            return abi::CB_INVALID;
        };
        if !envelope::is_integer_text(value) {
            lock(&inv.state).violate(format!(
                "the plugin gave the usage value `{value}`, not an integer"
            ));
            return abi::CB_INVALID;
        }
        lock(&inv.state).usage.push_text(name, value);
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

unsafe extern "C" fn cb_set_file_data(handle: *mut abi::EtlInvocation, json: abi::EtlStr) -> i32 {
    with_live(handle, |inv| {
        let Some(t) = text(inv, "file_data", json) else {
            return abi::CB_INVALID;
        };
        match envelope::file_data_from_json(t) {
            Ok(file_data) => {
                lock(&inv.state).more_mut().file_data = file_data;
                abi::CB_OK
            }
            Err(why) => {
                lock(&inv.state).violate(format!("the plugin set an invalid file_data: {why}"));
                abi::CB_INVALID
            }
        }
    })
}

unsafe extern "C" fn cb_reject_request(
    handle: *mut abi::EtlInvocation,
    status: i32,
    body: abi::EtlStr,
) -> i32 {
    with_live(handle, |inv| {
        let too_late = match inv.kind {
            Kind::Invoke => false,
            Kind::Stream => lock(&inv.state).items > 0,
            Kind::Precheck => true,
        };
        if too_late {
            lock(&inv.state).violate(
                "the plugin called reject_request from a precheck, or after a stream's first item",
            );
            return abi::CB_REJECTED;
        }
        let Some(t) = text(inv, "a rejection body", body) else {
            return abi::CB_INVALID;
        };
        let status = match u16::try_from(status) {
            Ok(s @ 400..=499) => s,
            _ => {
                lock(&inv.state).violate(format!(
                    "the plugin rejected a request with the status {status}, not a 4xx"
                ));
                return abi::CB_INVALID;
            }
        };
        match serde_json::from_str::<Box<RawValue>>(t) {
            Ok(body) => {
                lock(&inv.state).more_mut().rejection = Some((status, body));
                abi::CB_OK
            }
            Err(e) => {
                lock(&inv.state).violate(format!(
                    "the plugin rejected a request with a body that is not JSON ({e})"
                ));
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
        let error_type = String::from_utf8_lossy(t);
        let error_type = if error_type.is_empty() {
            "PluginError".into()
        } else {
            error_type
        };
        lock(&inv.state).more_mut().failure = Some(Failure {
            status: http_status(status),
            text: format!("[{error_type}] {}", String::from_utf8_lossy(m)),
            class: Class::default(),
        });
        abi::CB_OK
    })
}

/// A status code a plugin gave: 100..=599, anything else reads as 500.
fn http_status(status: i32) -> u16 {
    u16::try_from(status)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .unwrap_or(500)
}

unsafe extern "C" fn cb_report_failure(
    handle: *mut abi::EtlInvocation,
    failure: *const abi::EtlFailure,
) -> i32 {
    with_live(handle, |inv| {
        // SAFETY: the header makes `failure` readable for the call; a plugin
        // built against a later 1.x may pass a larger struct, of which only
        // the fields known here are read.
        let Some(f) = (unsafe { failure.as_ref() }) else {
            lock(&inv.state).violate("the plugin reported a NULL failure");
            return abi::CB_INVALID;
        };
        match failure_from(f) {
            Ok(failure) => {
                lock(&inv.state).more_mut().failure = Some(failure);
                abi::CB_OK
            }
            Err(why) => {
                lock(&inv.state).violate(format!("the plugin reported an invalid failure: {why}"));
                abi::CB_INVALID
            }
        }
    })
}

/// Reads an `etl_failure` into the envelope's fields.
fn failure_from(f: &abi::EtlFailure) -> Result<Failure, String> {
    if (f.struct_size as usize) < std::mem::size_of::<abi::EtlFailure>() {
        return Err(format!("struct_size is {} bytes", f.struct_size));
    }
    // SAFETY (each string): borrowed for the call, per the header.
    let text = |what: &str, s: abi::EtlStr| -> Result<String, String> {
        let bytes = unsafe { s.as_bytes() };
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| format!("{what} is not valid UTF-8"))
    };
    let nullable = |what: &str, s: abi::EtlStr| -> Result<Option<String>, String> {
        if s.ptr.is_null() {
            Ok(None)
        } else {
            text(what, s).map(Some)
        }
    };
    let category = nullable("failure_category", f.failure_category)?;
    // SAFETY: NULL or readable for the call, per the header.
    let plugin_error = match unsafe { f.plugin_error.as_ref() } {
        None => None,
        Some(e) => {
            let error_type = text("plugin_error.error_type", e.error_type)?;
            let error_reason = text("plugin_error.error_reason", e.error_reason)?;
            if error_type.is_empty() || error_reason.is_empty() {
                return Err("plugin_error needs an error_type and an error_reason".into());
            }
            let audience = match e.audience {
                abi::AUDIENCE_USER => Some("user"),
                abi::AUDIENCE_PLATFORM => Some("platform"),
                abi::AUDIENCE_NONE => None,
                other => {
                    return Err(format!(
                        "plugin_error.audience {other} is not an ETL_AUDIENCE_*"
                    ))
                }
            };
            // The reference's key order: error_type, error_reason,
            // dependency, audience, retryable.
            let value = serde_json::json!({
                "error_type": error_type,
                "error_reason": error_reason,
                "dependency": nullable("plugin_error.dependency", e.dependency)?,
                "audience": audience,
                "retryable": e.retryable != 0,
            });
            Some(value.to_string())
        }
    };
    Ok(Failure {
        status: http_status(f.status_code),
        text: text("status_code_text", f.status_code_text)?,
        class: Class {
            category,
            plugin_error,
        },
    })
}

unsafe extern "C" fn cb_remaining_ms(handle: *mut abi::EtlInvocation) -> i64 {
    std::panic::catch_unwind(|| live(handle as u64, Invocation::remaining_ms))
        .ok()
        .flatten()
        .unwrap_or(i64::from(abi::CB_CLOSED))
}

unsafe extern "C" fn cb_log(
    handle: *mut abi::EtlInvocation,
    level: i32,
    message: abi::EtlStr,
) -> i32 {
    // SAFETY: the header makes the message readable for the call.
    let bytes = unsafe { message.as_bytes() };
    let (text, rc) = match std::str::from_utf8(bytes) {
        Ok(t) => (std::borrow::Cow::Borrowed(t), abi::CB_OK),
        Err(_) => (String::from_utf8_lossy(bytes), abi::CB_INVALID),
    };
    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let request_id = if handle.is_null() {
            None
        } else {
            live(handle as u64, |inv| inv.request_id().map(str::to_owned)).flatten()
        };
        crate::logging::plugin_line(level, request_id.as_deref(), &text);
    }));
    if written.is_err() {
        return abi::CB_INVALID;
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::super::{Invocation, Kind, PluginState, RequestInfo, CURRENT};
    use super::live;

    /// Once `Invocation::call` returns, the thread's shortcut to its
    /// invocation is gone: a callback on that thread with the handle finds
    /// the invocation through the registry while it is registered, and
    /// none once it is not, never memory it no longer owns.
    #[test]
    fn the_calling_thread_forgets_its_invocation_when_the_call_returns() {
        let request = RequestInfo {
            request_id: None,
            deadline: None,
            reserved: Default::default(),
        };
        let registered = Invocation::start(Kind::Invoke, None, request);
        let handle = registered.invocation().handle;
        let state = PluginState(std::ptr::null_mut());
        let inside = registered.invocation().call(state, |_| CURRENT.get().0);
        assert_eq!(inside, handle, "the shortcut while the call runs");
        assert_eq!(CURRENT.get(), (0, std::ptr::null()), "none after it");
        assert!(live(handle, |_| ()).is_some(), "still registered");
        drop(registered);
        assert!(live(handle, |_| ()).is_none(), "unregistered");
    }
}
