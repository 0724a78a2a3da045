/*
 * etl_plugin.h: the C ABI between etl-serve (the host) and an ETL plugin.
 *
 * A plugin is a shared library that exports one symbol, `etl_plugin_entry`,
 * returning a pointer to a static `etl_plugin` table. The host loads the
 * library, checks the table's ABI version, calls `init` once, then calls
 * `invoke` (and `precheck`) from many threads, and `shutdown` once at the end.
 * This header is all a C author needs; docs/abi.md walks through it.
 *
 * COMPATIBILITY POLICY
 *
 *   The ABI version is MAJOR.MINOR (ETL_ABI_VERSION_MAJOR/MINOR below).
 *   - A MINOR release only *appends* fields to the end of a struct, or adds
 *     new constant values. Every struct that can grow starts with (or holds)
 *     its own size, so each side reads only the fields the other side knows.
 *     Each appended field is marked with the version that added it.
 *   - A MAJOR release may change anything. The host refuses to load a plugin
 *     whose MAJOR differs from its own, with a message naming both versions.
 *   - The host accepts any MINOR of its MAJOR: fields past the plugin's
 *     `struct_size` are treated as absent (NULL / zero).
 *
 * TRUST MODEL
 *
 *   A plugin runs inside the host process with the host's privileges. It is
 *   trusted not to be malicious: the host checks everything it is handed
 *   through this ABI (UTF-8, JSON, call order) and answers a clean error for
 *   a misbehaving plugin, but it cannot contain a plugin that corrupts memory,
 *   aborts or crashes. Such a crash ends the process.
 *
 * NAMING
 *
 *   etl_*            types and constants shared by both sides
 *   etl_plugin.*     hooks the plugin implements and the host calls
 *   etl_host_api.*   callbacks the host implements and the plugin calls
 *
 * STRINGS AND BUFFERS
 *
 *   Every string crosses the boundary as an `etl_str`: a pointer and a length
 *   in bytes, UTF-8, not necessarily NUL-terminated. A zero-length `etl_str`
 *   may have a NULL pointer. Whoever passes an `etl_str` owns its bytes; the
 *   receiver copies what it wants to keep before the call returns, unless the
 *   field's own comment says otherwise. Where a comment says "NULL: null", a
 *   NULL `ptr` stands for JSON null and a non-NULL one for a string (which
 *   may be empty).
 *
 * WHAT 1.1 ADDED
 *
 *   A state pointer from `init` handed to every later hook; a log callback;
 *   the request id, the deadline and the reserved `/invoke` fields in the
 *   invoke context; a structured failure (`report_failure`). A 1.0 plugin
 *   loads and works unchanged: it never reads the fields it does not know,
 *   and the host never reads past the plugin's `struct_size`.
 */
#ifndef ETL_PLUGIN_H
#define ETL_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Versions                                                                  */
/* ------------------------------------------------------------------------ */

/* The ABI this header describes. A plugin puts these in its etl_plugin. */
#define ETL_ABI_VERSION_MAJOR 1
#define ETL_ABI_VERSION_MINOR 1

/* The name of the one symbol a plugin exports. */
#define ETL_PLUGIN_ENTRY_SYMBOL "etl_plugin_entry"

/* ------------------------------------------------------------------------ */
/* Shared types and constants                                                */
/* ------------------------------------------------------------------------ */

/* A borrowed UTF-8 string: `len` bytes at `ptr`. See STRINGS AND BUFFERS. */
typedef struct etl_str {
    const char *ptr;
    size_t len;
} etl_str;

/* What `invoke` and `precheck` return. */
#define ETL_RESULT_OK 0       /* the plugin did its work */
#define ETL_RESULT_FAILED 1   /* the plugin failed; see etl_host_api.set_failure */
#define ETL_RESULT_SHUTDOWN 2 /* the plugin stopped because its cancel flag was set */

/* What every host callback returns. Negative values are errors; the plugin
 * may ignore them, the host has already recorded what it needs. */
#define ETL_CB_OK 0
/* The argument was not valid UTF-8, not valid JSON, or of the wrong shape.
 * The host records a contract violation: the request answers a 500 envelope
 * naming it, whatever invoke returns. */
#define ETL_CB_INVALID (-1)
/* The call is not allowed now: a second `emit` from a plugin that does not
 * stream, or `emit` during `precheck`. Also recorded as a contract violation. */
#define ETL_CB_REJECTED (-2)
/* The invocation is over for the host: `invoke` already returned (a late
 * call from a thread the plugin kept running), or the client of a stream went
 * away. Nothing is recorded; a streaming plugin should stop. */
#define ETL_CB_CLOSED (-3)

/* Injected capabilities a plugin asks for, in etl_plugin.capabilities. They
 * mirror the reference host's opt-in parameters. The host always lets the
 * plugin call every callback; the bits declare intent and appear in the
 * `--check` report and the startup log line (named usage, message_channels,
 * filedata_meta, cancellation, sealed_settings_v2). ETL_CAP_CANCELLATION
 * says the plugin reads its cancel flag, so shutdown can expect it to stop
 * promptly. Only ETL_CAP_SEALED_SETTINGS_V2 shows in GET /metadata. */
#define ETL_CAP_USAGE (1u << 0)
#define ETL_CAP_MESSAGE_CHANNELS (1u << 1)
#define ETL_CAP_FILEDATA_META (1u << 2)
#define ETL_CAP_CANCELLATION (1u << 3)
/* (1.1) The plugin resolves sealed settings documents itself: a
 * `dag_node_settings` member of `invocation_settings` reaches it as sent (see
 * etl_invoke_ctx.invocation_settings). `/metadata` then lists the capability
 * "invoke_with_sealed_dag_node_settings_v2", which tells a controller it may
 * send such documents. */
#define ETL_CAP_SEALED_SETTINGS_V2 (1u << 4)

/* Bits of etl_plugin.flags. */
/* The plugin streams: `emit` may be called any number of times, and each
 * item becomes one NDJSON line of the response. Without it, `emit` must be
 * called exactly once on success. */
#define ETL_FLAG_STREAMING (1u << 0)

/* (1.1) Levels of etl_host_api.log, most severe first. */
#define ETL_LOG_ERROR 1
#define ETL_LOG_WARN 2
#define ETL_LOG_INFO 3
#define ETL_LOG_DEBUG 4
#define ETL_LOG_TRACE 5

/* (1.1) What etl_host_api.remaining_ms returns when the invocation has no
 * deadline. */
#define ETL_NO_DEADLINE INT64_MAX

/* (1.1) Who can act on a failure: etl_plugin_error.audience. */
#define ETL_AUDIENCE_NONE 0     /* "audience": null */
#define ETL_AUDIENCE_USER 1     /* "audience": "user" */
#define ETL_AUDIENCE_PLATFORM 2 /* "audience": "platform" */

/* ------------------------------------------------------------------------ */
/* The cancel flags                                                          */
/* ------------------------------------------------------------------------ */

/*
 * A cancel flag is a 32-bit word that only the host writes, atomically, with
 * release ordering: 0 means keep going, anything else means stop. A plugin
 * reads it with etl_flag_is_set(), never writes it, and never frees it.
 *
 * Two flags exist:
 *   - the per-invocation flag (etl_invoke_ctx.cancel_flag), set when the
 *     server starts shutting down and when the client of that request goes
 *     away;
 *   - the process-wide flag (etl_invoke_ctx.process_cancel_flag and
 *     etl_init_ctx.process_cancel_flag), set once when shutdown starts, for a
 *     plugin's own background threads.
 *
 * Both words stay mapped and readable until the process exits, so a pointer
 * may be handed to any thread. The per-invocation word is reused by a later
 * invocation once this one returns, so read it only while the invocation
 * that handed it out is running.
 */
static inline int etl_flag_is_set(const uint32_t *flag) {
    if (flag == NULL) {
        return 0;
    }
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_load_n(flag, __ATOMIC_ACQUIRE) != 0;
#else
    return *(const volatile uint32_t *)flag != 0;
#endif
}

/* ------------------------------------------------------------------------ */
/* The host's callbacks                                                      */
/* ------------------------------------------------------------------------ */

/*
 * An opaque handle naming one invocation. The plugin never dereferences it;
 * it only passes it back to the callbacks below. The host checks the handle
 * on every call: after the invocation ended, a call returns ETL_CB_CLOSED and
 * has no effect (it is never undefined behaviour to call with a stale handle).
 */
typedef struct etl_invocation etl_invocation;

/*
 * (1.1) The envelope's `plugin_error` object: a classification a controller
 * can act on. The reference host fills it for its user errors as
 * {"error_type":"configuration","error_reason":<failure_category or
 * "invalid_input">,"dependency":null,"audience":"user","retryable":false}.
 * Borrowed for the call, like every etl_str argument.
 */
typedef struct etl_plugin_error {
    etl_str error_type;   /* required, e.g. "configuration" */
    etl_str error_reason; /* required, e.g. "invalid_input" */
    etl_str dependency;   /* the failing dependency's name; NULL: null */
    uint32_t audience;    /* ETL_AUDIENCE_* */
    uint32_t retryable;   /* 0: false, anything else: true */
} etl_plugin_error;

/*
 * (1.1) A failure exactly as the envelope reports it; see
 * etl_host_api.report_failure. Borrowed for the call.
 */
typedef struct etl_failure {
    /* sizeof(etl_failure) as the plugin was built. */
    uint32_t struct_size;
    /* The envelope's status_code: 100..=599, anything else reads as 500. */
    int32_t status_code;
    /* The envelope's status_code_text, verbatim (no "[Type] " is added). */
    etl_str status_code_text;
    /* The envelope's failure_category; NULL: null. */
    etl_str failure_category;
    /* The envelope's plugin_error; NULL: null. */
    const etl_plugin_error *plugin_error;
} etl_failure;

/*
 * The callbacks a plugin uses to report its results. The table is owned by
 * the host, static, and valid until the process exits.
 *
 * Every callback may be called from any thread while the invocation runs
 * (from `invoke` being entered to `invoke` returning); the host serialises
 * them. Every `etl_str` argument is borrowed for the duration of the call:
 * the host copies what it keeps.
 */
typedef struct etl_host_api {
    /* sizeof(etl_host_api) as the host knows it. Check it before using a
     * callback added after 1.0. */
    uint32_t struct_size;

    /* Emit one output item: a JSON value, normally an object matching the
     * plugin's outputs schema. A plain plugin calls it exactly once before
     * returning ETL_RESULT_OK; a streaming plugin calls it once per item,
     * and each call may block while the client reads (back-pressure).
     * Returns ETL_CB_OK, ETL_CB_INVALID (not UTF-8 or not JSON),
     * ETL_CB_REJECTED (second emit from a plain plugin, or during precheck),
     * or ETL_CB_CLOSED (a streaming client went away, or the invocation is
     * over: stop and return). */
    int32_t (*emit)(etl_invocation *invocation, etl_str output_json);

    /* Append a usage record {"name": name, "value": value} to the envelope's
     * `usage`. Kept on success, failure and shutdown alike. */
    int32_t (*add_usage)(etl_invocation *invocation, etl_str name, int64_t value);

    /* Append a message to the envelope's message_channels.infos / .warnings. */
    int32_t (*add_info)(etl_invocation *invocation, etl_str message);
    int32_t (*add_warning)(etl_invocation *invocation, etl_str message);

    /* Replace the envelope's `filedata_meta` with a JSON object of the form
     * {"terminate_current": bool, "new_records": [ ... ]}; a missing key
     * keeps its default (false, []). ETL_CB_INVALID for any other shape. */
    int32_t (*set_filedata_meta)(etl_invocation *invocation, etl_str filedata_meta_json);

    /* Describe the failure that `invoke` is about to report with
     * ETL_RESULT_FAILED. `status_code` (100..=599, else 500) becomes the
     * envelope's status_code; the envelope's status_code_text becomes
     * "[<error_type>] <message>", with error_type "PluginError" when empty.
     * The last call wins. */
    int32_t (*set_failure)(etl_invocation *invocation, int32_t status_code, etl_str error_type,
                           etl_str message);

    /* (1.1) Write one line into the host's log at `level` (ETL_LOG_*; other
     * values read as ETL_LOG_INFO), with the invocation's request id when
     * `invocation` is live. `invocation` may be NULL (in `init`, or from a
     * background thread): the line is written without a request id. A line
     * is written even for a stale handle. Never blocks: past a full log pipe
     * lines are dropped and counted (docs/operations.md). Callable from any
     * thread, at any time after `init` starts. Returns ETL_CB_OK, or
     * ETL_CB_INVALID when `message` is not UTF-8 (the line is written with
     * the bad bytes replaced). */
    int32_t (*log)(etl_invocation *invocation, int32_t level, etl_str message);

    /* (1.1) Milliseconds left until this invocation's deadline: the sooner of
     * the caller's (the `x-etl-timeout-ms` request header, counted from when
     * the host read the request head) and, once shutdown has started, the
     * graceful deadline. 0 when it has passed; ETL_NO_DEADLINE when there is
     * none; ETL_CB_CLOSED when the invocation is over. The host does not stop
     * a call at its deadline: it is the plugin's to use (give up early, pass
     * it on to a dependency). Cheap; may change during the call. */
    int64_t (*remaining_ms)(etl_invocation *invocation);

    /* (1.1) Describe the failure `invoke` (or `precheck`) is about to report
     * with ETL_RESULT_FAILED, field for field as the envelope shows it. It
     * replaces anything set_failure set, and the other way round: the last
     * call wins. ETL_CB_INVALID (and a contract violation) when a string is
     * not UTF-8 or `plugin_error` lacks error_type or error_reason. */
    int32_t (*report_failure)(etl_invocation *invocation, const etl_failure *failure);

    /* (1.1) add_usage for a value given as the text of a JSON integer, of
     * any size (a Python int may not fit 64 bits). ETL_CB_INVALID (and a
     * contract violation) when it is not an integer. */
    int32_t (*add_usage_text)(etl_invocation *invocation, etl_str name, etl_str value);

    /* (1.1) Set the envelope's `file_data`: a JSON object, or `null` (the
     * default). Every envelope of the invocation written after the call
     * carries it as given (for a stream, each later line; the failure or
     * shutdown envelope too), unchecked against any schema. The last call
     * wins. The reference host echoes the `file_data` input the function
     * received, changes included: a plugin that takes one does the same.
     * ETL_CB_INVALID (and a contract violation) when it is not UTF-8, or
     * not a JSON object or null. */
    int32_t (*set_file_data)(etl_invocation *invocation, etl_str file_data_json);

    /* (1.1) Refuse the request as the host refuses bad input: the client
     * gets `status` (400..=499) with the JSON `body` (content type
     * application/json) instead of an envelope. For a plugin that checks
     * its input itself, beyond the inputs schema: the Python bridge
     * validates with the reference's own model and answers its 422
     * (`{"detail": [...]}`, FastAPI's shape) where the two disagree. Call it
     * from `invoke` (of a streaming plugin: before its first `emit`), then
     * return ETL_RESULT_FAILED; the last call wins. ETL_CB_INVALID (and a
     * contract violation) when `status` is out of range or `body` is not
     * JSON; ETL_CB_REJECTED from a precheck or after a stream's first
     * item. */
    int32_t (*reject_request)(etl_invocation *invocation, int32_t status, etl_str body_json);
} etl_host_api;

/*
 * What `invoke` and `precheck` receive. The struct itself is host memory
 * valid only until the hook returns: copy the fields you need to keep. The
 * fields' own lifetimes are longer, as each comment says.
 */
typedef struct etl_invoke_ctx {
    /* sizeof(etl_invoke_ctx) as the host knows it. */
    uint32_t struct_size;
    /* This invocation's handle; see etl_invocation. */
    etl_invocation *invocation;
    /* The callbacks; static, valid until the process exits. */
    const etl_host_api *host;
    /* This invocation's cancel flag; see "The cancel flags". */
    const uint32_t *cancel_flag;
    /* The process-wide cancel flag; valid until the process exits. */
    const uint32_t *process_cancel_flag;

    /* (1.1) What `init` stored in *etl_init_ctx.state (NULL if nothing). */
    void *state;
    /* (1.1) The request id: the `x-request-id` the caller sent, or the one
     * the host made up; it is echoed in the response and on the access log
     * line. Valid until the hook returns. */
    etl_str request_id;
    /* (1.1) The reserved `invocation_settings` field of the /invoke body, as
     * JSON text; empty when the body has none. The host has applied the
     * reference host's transport rules (docs/abi.md, "The reserved fields"):
     * it is an object, either the plaintext settings, or one with a
     * `dag_node_settings` member holding a sealed settings document, passed
     * on unopened (see ETL_CAP_SEALED_SETTINGS_V2). Valid until the hook
     * returns. Empty in precheck. */
    etl_str invocation_settings;
    /* (1.1) The reserved `invocation_context` field, validated (identity
     * facets, `schema_version` "1") and with its `schema_version` filled in,
     * as a JSON object; empty when the body has none. Valid until the hook
     * returns. Empty in precheck. */
    etl_str invocation_context;
} etl_invoke_ctx;

/* Has this invocation been asked to stop? Cheap: one atomic load. A plugin
 * that declares ETL_CAP_CANCELLATION calls it between units of work and, when
 * it returns non-zero, returns ETL_RESULT_SHUTDOWN. */
static inline int etl_is_cancelled(const etl_invoke_ctx *ctx) {
    return etl_flag_is_set(ctx->cancel_flag);
}

/* An etl_str over `len` bytes at `ptr`, for callback arguments. */
static inline etl_str etl_str_from(const char *ptr, size_t len) {
    etl_str s;
    s.ptr = ptr;
    s.len = len;
    return s;
}

/* An etl_str over a string literal (without its NUL), for callback
 * arguments: host->add_usage(inv, ETL_STR("pages"), 3). */
#define ETL_STR(literal) etl_str_from((literal), sizeof(literal) - 1)

/* The same as an initializer, for a static etl_plugin table:
 * .name = ETL_STR_INIT("my_plugin"). */
#define ETL_STR_INIT(literal) {(literal), sizeof(literal) - 1}

/*
 * (1.1) What a plugin can only say once `init` has run: a plugin that learns
 * its schemas by loading something (the Python bridge imports a module)
 * passes this to etl_init_ctx.describe. Each etl_str with a non-NULL `ptr`
 * replaces the table's field of the same name; `capabilities` and `flags`
 * are added to the table's. Borrowed for the call: the host copies it.
 */
typedef struct etl_description {
    /* sizeof(etl_description) as the plugin was built. */
    uint32_t struct_size;
    etl_str name;
    etl_str version;
    etl_str inputs_schema;
    etl_str outputs_schema;
    etl_str id;
    uint32_t capabilities;
    uint32_t flags;
    /* The schema request bodies are checked against, when it is not
     * `inputs_schema` (NULL `ptr`: it is). etl-uvicorn publishes a
     * function's injected `message_channels` and `filedata_meta` parameters
     * in /schema (and so in the id) but never takes them from a request;
     * the Python bridge describes both schemas. Read when `struct_size`
     * covers it. */
    etl_str request_schema;
} etl_description;

/* What `init` receives. Valid only until `init` returns, except where said. */
typedef struct etl_init_ctx {
    /* sizeof(etl_init_ctx) as the host knows it. */
    uint32_t struct_size;
    /* The operator's configuration string (--plugin-config or
     * ETL_SERVE_PLUGIN_CONFIG), empty when none was given. Borrowed. */
    etl_str config;
    /* The process-wide cancel flag; valid until the process exits, so it may
     * be kept for background threads. */
    const uint32_t *process_cancel_flag;
    /* Pass to set_error. Owned by the host. */
    void *host_data;
    /* Explain why init fails, before returning non-zero. The message is
     * copied and shown to the operator as the reason the plugin did not
     * load. May be called on the init thread only. */
    void (*set_error)(void *host_data, etl_str message);

    /* (1.1) The host's callbacks, for `log` (with a NULL invocation) from
     * `init` and from the plugin's own threads; static, valid until the
     * process exits. */
    const etl_host_api *host;
    /* (1.1) Where `init` may store one pointer of its own (its state): the
     * host hands it back as etl_invoke_ctx.state and to `finish`, so a
     * plugin needs no globals. Starts as NULL. Host memory, valid until
     * `init` returns; the pointer stored is the plugin's and the host never
     * dereferences it. */
    void **state;
    /* (1.1) Describe the plugin from `init` (see etl_description): the
     * host reads the schemas, computes the id and checks everything only
     * after `init` returned, from the table and what this said. May be
     * called on the init thread only; the last call wins. */
    void (*describe)(void *host_data, const etl_description *description);
} etl_init_ctx;

/* ------------------------------------------------------------------------ */
/* The plugin's table                                                        */
/* ------------------------------------------------------------------------ */

/*
 * Everything the host knows of a plugin. The plugin owns the table and every
 * string in it; all of it must stay valid and unchanged for as long as the
 * library is loaded (in practice: a static table and string literals). The
 * host never writes to it.
 */
typedef struct etl_plugin {
    /* The ABI version the plugin was built against: set these to
     * ETL_ABI_VERSION_MAJOR and ETL_ABI_VERSION_MINOR. The host reads these
     * two fields before anything else. */
    uint16_t abi_version_major;
    uint16_t abi_version_minor;
    /* sizeof(etl_plugin) as the plugin was built. */
    uint32_t struct_size;

    /* Human-readable name and version, shown by `--check` and in logs. */
    etl_str name;
    etl_str version;

    /* JSON Schema (a JSON object) of the request body, and of one output
     * item. GET /schema answers {"inputs": ..., "outputs": ...}. Top-level
     * `properties`, `required` and `default` drive validation and defaults. */
    etl_str inputs_schema;
    etl_str outputs_schema;

    /* The plugin id served at GET /id. Empty (len 0): the host derives it
     * from the schemas exactly as the reference host does. */
    etl_str id;

    /* ETL_CAP_* bits and ETL_FLAG_* bits. */
    uint32_t capabilities;
    uint32_t flags;

    /* Optional (NULL when absent). Called once, on a host thread (not
     * necessarily the process's main thread), before any other hook and
     * before the server listens; the host reads the schemas and id only
     * after it returned (see etl_init_ctx.describe). Return 0 on success; any
     * other value stops the host, which reports the message given to
     * ctx->set_error. */
    int32_t (*init)(const etl_init_ctx *ctx);

    /* Optional. Called once, after the last invoke/precheck has returned,
     * when the server stops. Free what init allocated. Not called when the
     * drain timed out with invocations still inside the plugin. The library
     * may stay mapped after it. */
    void (*shutdown)(void);

    /* Required. Run the plugin on one request. Called on a host thread,
     * possibly on several threads at once: it must be thread-safe. Usually
     * a worker thread of the host's blocking pool; while the plugin's calls
     * are quick (64 in a row under 1 ms), the host may run a call on one of
     * its HTTP threads instead, to save a thread hand-off (docs/abi.md, "Which
     * thread"). Do not rely on which thread it is. `request_json` is the
     * validated request body with defaults applied, a JSON object in UTF-8
     * (docs/abi.md, "What request holds": conversions, key order, integers
     * of any size), owned by the host and valid until invoke returns. Report the result through
     * ctx->host and return an ETL_RESULT_* value. */
    int32_t (*invoke)(const etl_invoke_ctx *ctx, etl_str request_json);

    /* Optional. Answer GET /precheck: check that the plugin can work (reach
     * its dependencies, ...). Same threads and callbacks as invoke, except
     * that emit is rejected and it always runs on a blocking-pool worker
     * thread. NULL answers 200 with an empty usage list. */
    int32_t (*precheck)(const etl_invoke_ctx *ctx);

    /* (1.1) Optional. When set, called in place of `shutdown` (under the same
     * rules), with the state `init` stored: free it here. */
    void (*finish)(void *state);
} etl_plugin;

/* Marks the entry function as exported even when the library is built with
 * -fvisibility=hidden (recommended: export nothing else):
 *   ETL_PLUGIN_EXPORT const etl_plugin *etl_plugin_entry(void) { ... } */
#if defined(_WIN32)
#define ETL_PLUGIN_EXPORT __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#define ETL_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define ETL_PLUGIN_EXPORT
#endif

/* The type of the entry symbol. It must return the same pointer every time,
 * may be called more than once, and must not fail. */
typedef const etl_plugin *(*etl_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* ETL_PLUGIN_H */
