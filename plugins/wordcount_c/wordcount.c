/*
 * wordcount_c: the `wordcount` example plugin, written in C against
 * include/etl_plugin.h, with Jansson (https://github.com/akheron/jansson,
 * Debian: libjansson-dev) to read the request.
 *
 * Input  {"text": string, "repeat": integer = 1}
 * Output {"words": int, "chars": int}: the whitespace-separated words and the
 * UTF-8 bytes of `text`, each times `repeat`, plus the usage record
 * {"name": "chars", "value": chars}.
 *
 * Its schemas are the Rust `wordcount`'s, so /schema and /id are identical.
 * The host has already validated the request against the inputs schema and
 * filled in `repeat`; the checks below are for what JSON Schema cannot say
 * (an integer that does not fit in 64 bits).
 *
 * Build: cc -shared -fPIC -I include wordcount.c -ljansson -o libwordcount_c.so
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "etl_plugin.h"

static const char INPUTS[] =
    "{\"type\":\"object\",\"required\":[\"text\"],"
    "\"properties\":{\"text\":{\"type\":\"string\"},"
    "\"repeat\":{\"type\":\"integer\",\"default\":1}}}";

static const char OUTPUTS[] =
    "{\"type\":\"object\","
    "\"properties\":{\"words\":{\"type\":\"integer\"},\"chars\":{\"type\":\"integer\"}},"
    "\"required\":[\"words\",\"chars\"]}";

/* Unicode White_Space, as Rust's char::is_whitespace and Python's str.split. */
static int is_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

/* Counts the whitespace-separated words of `s`, `len` bytes of valid UTF-8
 * (Jansson checks that every string it returns is). */
static long long count_words(const unsigned char *s, size_t len) {
    long long words = 0;
    int in_word = 0;
    size_t i = 0;
    while (i < len) {
        unsigned char b = s[i++];
        int extra = b < 0x80 ? 0 : b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : 1;
        uint32_t cp = extra == 0 ? b : extra == 1 ? (b & 0x1F) : extra == 2 ? (b & 0x0F) : (b & 0x07);
        for (int k = 0; k < extra && i < len; k++) cp = (cp << 6) | (s[i++] & 0x3F);
        if (is_space(cp)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    return words;
}

/* ---- the hooks ----------------------------------------------------------- */

static int32_t fail(const etl_invoke_ctx *ctx, const char *message) {
    ctx->host->set_failure(ctx->invocation, 422, ETL_STR("InputError"), etl_str_from(message, strlen(message)));
    return ETL_RESULT_FAILED;
}

/* Reads `repeat`: an integer, or a whole number written as a float (2.0). */
static int read_repeat(const json_t *value, long long *out) {
    if (value == NULL) {
        *out = 1;
        return 1;
    }
    if (json_is_integer(value)) {
        *out = json_integer_value(value);
        return 1;
    }
    if (json_is_real(value)) {
        double d = json_real_value(value);
        /* 2^63 is the first double past LLONG_MAX. */
        if (d >= -9223372036854775808.0 && d < 9223372036854775808.0 && d == (double)(long long)d) {
            *out = (long long)d;
            return 1;
        }
    }
    return 0;
}

static int32_t count(const etl_invoke_ctx *ctx, const json_t *request) {
    const json_t *text = json_object_get(request, "text");
    if (!json_is_string(text)) return fail(ctx, "text must be a string");
    long long repeat;
    if (!read_repeat(json_object_get(request, "repeat"), &repeat)) {
        return fail(ctx, "repeat must be an integer of at most 64 bits");
    }

    long long chars = (long long)json_string_length(text);
    long long words = count_words((const unsigned char *)json_string_value(text), json_string_length(text));
    if (__builtin_mul_overflow(words, repeat, &words) || __builtin_mul_overflow(chars, repeat, &chars)) {
        return fail(ctx, "the counts do not fit in 64 bits");
    }
    ctx->host->add_usage(ctx->invocation, ETL_STR("chars"), chars);

    json_t *out = json_pack("{s:I, s:I}", "words", (json_int_t)words, "chars", (json_int_t)chars);
    /* JSON_PRESERVE_ORDER: words before chars, as the schema lists them. */
    char *text_out = out ? json_dumps(out, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(out);
    if (text_out == NULL) return fail(ctx, "out of memory");
    /* The host copies the output before emit returns. */
    ctx->host->emit(ctx->invocation, etl_str_from(text_out, strlen(text_out)));
    free(text_out);
    return ETL_RESULT_OK;
}

static int32_t wordcount_invoke(const etl_invoke_ctx *ctx, etl_str request) {
    json_error_t error;
    /* JSON_ALLOW_NUL: "\u0000" is a character of `text` like any other. */
    json_t *parsed = json_loadb(request.ptr, request.len, JSON_ALLOW_NUL, &error);
    if (parsed == NULL) {
        /* The host hands integers of any size exactly; Jansson holds 64 bits. */
        if (json_error_code(&error) == json_error_numeric_overflow) {
            return fail(ctx, "a number in the request does not fit in 64 bits");
        }
        return fail(ctx, error.text);
    }
    int32_t result = json_is_object(parsed) ? count(ctx, parsed) : fail(ctx, "the request is not a JSON object");
    json_decref(parsed);
    return result;
}

static const etl_plugin PLUGIN = {
    .abi_version_major = ETL_ABI_VERSION_MAJOR,
    .abi_version_minor = ETL_ABI_VERSION_MINOR,
    .struct_size = sizeof(etl_plugin),
    .name = ETL_STR_INIT("wordcount_c"),
    .version = ETL_STR_INIT("0.1.0"),
    .inputs_schema = ETL_STR_INIT(INPUTS),
    .outputs_schema = ETL_STR_INIT(OUTPUTS),
    .id = {NULL, 0},
    .capabilities = ETL_CAP_USAGE,
    .flags = 0,
    .init = NULL,
    .shutdown = NULL,
    .invoke = wordcount_invoke,
    .precheck = NULL,
};

ETL_PLUGIN_EXPORT const etl_plugin *etl_plugin_entry(void) {
    return &PLUGIN;
}
