//! The Rust mirror and the C header agree on every size, alignment, offset
//! and constant. The numbers on the C side come from `layout_probe.c`,
//! which this test compiles against `include/etl_plugin.h` with the C
//! compiler (`CC`, else `cc`) and runs. Only this test needs a C compiler:
//! building the crate does not.

use core::mem::{align_of, offset_of, size_of};
use etl_abi::*;

macro_rules! s {
    ($t:ty) => {
        [size_of::<$t>(), align_of::<$t>()]
    };
}

#[test]
fn rust_types_match_the_c_header() {
    let rust: Vec<usize> = [
        &s!(EtlStr)[..],
        &[offset_of!(EtlStr, ptr), offset_of!(EtlStr, len)],
        &s!(EtlHostApi),
        &[
            offset_of!(EtlHostApi, struct_size),
            offset_of!(EtlHostApi, emit),
            offset_of!(EtlHostApi, add_usage),
            offset_of!(EtlHostApi, add_info),
            offset_of!(EtlHostApi, add_warning),
            offset_of!(EtlHostApi, set_filedata_meta),
            offset_of!(EtlHostApi, set_failure),
            offset_of!(EtlHostApi, log),
            offset_of!(EtlHostApi, remaining_ms),
            offset_of!(EtlHostApi, report_failure),
            offset_of!(EtlHostApi, add_usage_text),
            offset_of!(EtlHostApi, set_file_data),
            offset_of!(EtlHostApi, reject_request),
        ],
        &s!(EtlInvokeCtx),
        &[
            offset_of!(EtlInvokeCtx, struct_size),
            offset_of!(EtlInvokeCtx, invocation),
            offset_of!(EtlInvokeCtx, host),
            offset_of!(EtlInvokeCtx, cancel_flag),
            offset_of!(EtlInvokeCtx, process_cancel_flag),
            offset_of!(EtlInvokeCtx, state),
            offset_of!(EtlInvokeCtx, request_id),
            offset_of!(EtlInvokeCtx, invocation_settings),
            offset_of!(EtlInvokeCtx, invocation_context),
        ],
        &s!(EtlInitCtx),
        &[
            offset_of!(EtlInitCtx, struct_size),
            offset_of!(EtlInitCtx, config),
            offset_of!(EtlInitCtx, process_cancel_flag),
            offset_of!(EtlInitCtx, host_data),
            offset_of!(EtlInitCtx, set_error),
            offset_of!(EtlInitCtx, host),
            offset_of!(EtlInitCtx, state),
            offset_of!(EtlInitCtx, describe),
        ],
        &s!(EtlDescription),
        &[
            offset_of!(EtlDescription, struct_size),
            offset_of!(EtlDescription, name),
            offset_of!(EtlDescription, version),
            offset_of!(EtlDescription, inputs_schema),
            offset_of!(EtlDescription, outputs_schema),
            offset_of!(EtlDescription, id),
            offset_of!(EtlDescription, capabilities),
            offset_of!(EtlDescription, flags),
            offset_of!(EtlDescription, request_schema),
        ],
        &s!(EtlPlugin),
        &[
            offset_of!(EtlPlugin, abi_version_major),
            offset_of!(EtlPlugin, abi_version_minor),
            offset_of!(EtlPlugin, struct_size),
            offset_of!(EtlPlugin, name),
            offset_of!(EtlPlugin, version),
            offset_of!(EtlPlugin, inputs_schema),
            offset_of!(EtlPlugin, outputs_schema),
            offset_of!(EtlPlugin, id),
            offset_of!(EtlPlugin, capabilities),
            offset_of!(EtlPlugin, flags),
            offset_of!(EtlPlugin, init),
            offset_of!(EtlPlugin, shutdown),
            offset_of!(EtlPlugin, invoke),
            offset_of!(EtlPlugin, precheck),
            offset_of!(EtlPlugin, finish),
        ],
        &s!(EtlPluginError),
        &[
            offset_of!(EtlPluginError, error_type),
            offset_of!(EtlPluginError, error_reason),
            offset_of!(EtlPluginError, dependency),
            offset_of!(EtlPluginError, audience),
            offset_of!(EtlPluginError, retryable),
        ],
        &s!(EtlFailure),
        &[
            offset_of!(EtlFailure, struct_size),
            offset_of!(EtlFailure, status_code),
            offset_of!(EtlFailure, status_code_text),
            offset_of!(EtlFailure, failure_category),
            offset_of!(EtlFailure, plugin_error),
        ],
        &[ABI_VERSION_MAJOR as usize, ABI_VERSION_MINOR as usize],
        &[
            RESULT_OK as usize,
            RESULT_FAILED as usize,
            RESULT_SHUTDOWN as usize,
        ],
        &[
            (CB_OK + 8) as usize,
            (CB_INVALID + 8) as usize,
            (CB_REJECTED + 8) as usize,
            (CB_CLOSED + 8) as usize,
        ],
        &[
            CAP_USAGE as usize,
            CAP_MESSAGE_CHANNELS as usize,
            CAP_FILEDATA_META as usize,
            CAP_CANCELLATION as usize,
            CAP_SEALED_SETTINGS_V2 as usize,
            FLAG_STREAMING as usize,
        ],
        &[
            LOG_ERROR as usize,
            LOG_WARN as usize,
            LOG_INFO as usize,
            LOG_DEBUG as usize,
            LOG_TRACE as usize,
            NO_DEADLINE as usize,
            AUDIENCE_NONE as usize,
            AUDIENCE_USER as usize,
            AUDIENCE_PLATFORM as usize,
        ],
    ]
    .concat();

    assert_eq!(
        rust,
        c_layout(),
        "include/etl_plugin.h and crates/etl-abi disagree"
    );
}

/// The numbers `layout_probe.c` prints.
fn c_layout() -> Vec<usize> {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let probe = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("etl_abi_layout_probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(here.join("../../include"))
        .arg(here.join("layout_probe.c"))
        .arg("-o")
        .arg(&probe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "compiling layout_probe.c failed");
    let out = std::process::Command::new(&probe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn entry_symbol_matches_the_header() {
    let header = include_str!("../../../include/etl_plugin.h");
    let name = core::str::from_utf8(&ENTRY_SYMBOL[..ENTRY_SYMBOL.len() - 1]).unwrap();
    assert!(header.contains(&format!("#define ETL_PLUGIN_ENTRY_SYMBOL \"{name}\"")));
}
