/* Prints the C layout of include/etl_plugin.h, one number a line, for the
 * Rust layout test, which compiles and runs it. Keep the order in step with
 * tests/layout.rs. */
#include <stddef.h>
#include <stdio.h>
#include "etl_plugin.h"

#define S(t) sizeof(t), _Alignof(t)
#define O(t, f) offsetof(t, f)

static const size_t LAYOUT[] = {
    S(etl_str), O(etl_str, ptr), O(etl_str, len),
    S(etl_host_api), O(etl_host_api, struct_size), O(etl_host_api, emit),
    O(etl_host_api, add_usage), O(etl_host_api, add_info), O(etl_host_api, add_warning),
    O(etl_host_api, set_filedata_meta), O(etl_host_api, set_failure), O(etl_host_api, log),
    O(etl_host_api, remaining_ms), O(etl_host_api, report_failure), O(etl_host_api, add_usage_text),
    O(etl_host_api, set_file_data), O(etl_host_api, reject_request),
    S(etl_invoke_ctx), O(etl_invoke_ctx, struct_size), O(etl_invoke_ctx, invocation),
    O(etl_invoke_ctx, host), O(etl_invoke_ctx, cancel_flag), O(etl_invoke_ctx, process_cancel_flag),
    O(etl_invoke_ctx, state), O(etl_invoke_ctx, request_id), O(etl_invoke_ctx, invocation_settings),
    O(etl_invoke_ctx, invocation_context),
    S(etl_init_ctx), O(etl_init_ctx, struct_size), O(etl_init_ctx, config),
    O(etl_init_ctx, process_cancel_flag), O(etl_init_ctx, host_data), O(etl_init_ctx, set_error),
    O(etl_init_ctx, host), O(etl_init_ctx, state), O(etl_init_ctx, describe),
    S(etl_description), O(etl_description, struct_size), O(etl_description, name),
    O(etl_description, version), O(etl_description, inputs_schema),
    O(etl_description, outputs_schema), O(etl_description, id),
    O(etl_description, capabilities), O(etl_description, flags),
    O(etl_description, request_schema),
    S(etl_plugin), O(etl_plugin, abi_version_major), O(etl_plugin, abi_version_minor),
    O(etl_plugin, struct_size), O(etl_plugin, name), O(etl_plugin, version),
    O(etl_plugin, inputs_schema), O(etl_plugin, outputs_schema), O(etl_plugin, id),
    O(etl_plugin, capabilities), O(etl_plugin, flags), O(etl_plugin, init),
    O(etl_plugin, shutdown), O(etl_plugin, invoke), O(etl_plugin, precheck), O(etl_plugin, finish),
    S(etl_plugin_error), O(etl_plugin_error, error_type), O(etl_plugin_error, error_reason),
    O(etl_plugin_error, dependency), O(etl_plugin_error, audience), O(etl_plugin_error, retryable),
    S(etl_failure), O(etl_failure, struct_size), O(etl_failure, status_code),
    O(etl_failure, status_code_text), O(etl_failure, failure_category), O(etl_failure, plugin_error),
    /* constants */
    ETL_ABI_VERSION_MAJOR, ETL_ABI_VERSION_MINOR,
    ETL_RESULT_OK, ETL_RESULT_FAILED, ETL_RESULT_SHUTDOWN,
    (size_t)(ETL_CB_OK + 8), (size_t)(ETL_CB_INVALID + 8), (size_t)(ETL_CB_REJECTED + 8),
    (size_t)(ETL_CB_CLOSED + 8),
    ETL_CAP_USAGE, ETL_CAP_MESSAGE_CHANNELS, ETL_CAP_FILEDATA_META, ETL_CAP_CANCELLATION,
    ETL_CAP_SEALED_SETTINGS_V2, ETL_FLAG_STREAMING,
    ETL_LOG_ERROR, ETL_LOG_WARN, ETL_LOG_INFO, ETL_LOG_DEBUG, ETL_LOG_TRACE,
    (size_t)ETL_NO_DEADLINE, ETL_AUDIENCE_NONE, ETL_AUDIENCE_USER, ETL_AUDIENCE_PLATFORM,
};

int main(void) {
    for (size_t i = 0; i < sizeof(LAYOUT) / sizeof(LAYOUT[0]); i++) {
        printf("%zu\n", LAYOUT[i]);
    }
    return 0;
}
