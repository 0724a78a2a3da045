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
    O(etl_host_api, set_filedata_meta), O(etl_host_api, set_failure),
    S(etl_invoke_ctx), O(etl_invoke_ctx, struct_size), O(etl_invoke_ctx, invocation),
    O(etl_invoke_ctx, host), O(etl_invoke_ctx, cancel_flag), O(etl_invoke_ctx, process_cancel_flag),
    S(etl_init_ctx), O(etl_init_ctx, struct_size), O(etl_init_ctx, config),
    O(etl_init_ctx, process_cancel_flag), O(etl_init_ctx, host_data), O(etl_init_ctx, set_error),
    S(etl_plugin), O(etl_plugin, abi_version_major), O(etl_plugin, abi_version_minor),
    O(etl_plugin, struct_size), O(etl_plugin, name), O(etl_plugin, version),
    O(etl_plugin, inputs_schema), O(etl_plugin, outputs_schema), O(etl_plugin, id),
    O(etl_plugin, capabilities), O(etl_plugin, flags), O(etl_plugin, init),
    O(etl_plugin, shutdown), O(etl_plugin, invoke), O(etl_plugin, precheck),
    /* constants */
    ETL_ABI_VERSION_MAJOR, ETL_ABI_VERSION_MINOR,
    ETL_RESULT_OK, ETL_RESULT_FAILED, ETL_RESULT_SHUTDOWN,
    (size_t)(ETL_CB_OK + 8), (size_t)(ETL_CB_INVALID + 8), (size_t)(ETL_CB_REJECTED + 8),
    (size_t)(ETL_CB_CLOSED + 8),
    ETL_CAP_USAGE, ETL_CAP_MESSAGE_CHANNELS, ETL_CAP_FILEDATA_META, ETL_CAP_CANCELLATION,
    ETL_FLAG_STREAMING,
};

int main(void) {
    for (size_t i = 0; i < sizeof(LAYOUT) / sizeof(LAYOUT[0]); i++) {
        printf("%zu\n", LAYOUT[i]);
    }
    return 0;
}
