/*
 * wordcount_c: the `wordcount` example plugin, written in C against
 * include/etl_plugin.h alone.
 *
 * Input  {"text": string, "repeat": integer = 1}
 * Output {"words": int, "chars": int}: the whitespace-separated words and the
 * UTF-8 bytes of `text`, each times `repeat`, plus the usage record
 * {"name": "chars", "value": chars}.
 *
 * Its schemas are the Rust `wordcount`'s, so /schema and /id are identical.
 * The host has already validated the request against the inputs schema and
 * filled in `repeat`, so the parser below only has to walk a well-formed
 * object; it still refuses anything else instead of guessing.
 */
#include <stdint.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "etl_plugin.h"

static const char INPUTS[] =
    "{\"type\":\"object\",\"required\":[\"text\"],"
    "\"properties\":{\"text\":{\"type\":\"string\"},"
    "\"repeat\":{\"type\":\"integer\",\"default\":1}}}";

static const char OUTPUTS[] =
    "{\"type\":\"object\","
    "\"properties\":{\"words\":{\"type\":\"integer\"},\"chars\":{\"type\":\"integer\"}},"
    "\"required\":[\"words\",\"chars\"]}";

/* ---- a cursor over the request ---------------------------------------- */

typedef struct cursor {
    const unsigned char *p;
    const unsigned char *end;
} cursor;

static void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) {
        c->p++;
    }
}

static int eat(cursor *c, unsigned char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* Unicode White_Space, as Rust's char::is_whitespace. */
static int is_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

static int utf8_len(uint32_t cp) {
    return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
}

static int hex4(cursor *c, uint32_t *out) {
    uint32_t v = 0;
    if (c->end - c->p < 4) {
        return 0;
    }
    for (int i = 0; i < 4; i++) {
        unsigned char h = *c->p++;
        v <<= 4;
        if (h >= '0' && h <= '9') v |= (uint32_t)(h - '0');
        else if (h >= 'a' && h <= 'f') v |= (uint32_t)(h - 'a' + 10);
        else if (h >= 'A' && h <= 'F') v |= (uint32_t)(h - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

/* Reads one code point of a JSON string body (after the opening quote).
 * Returns 1 and sets *cp, 0 at the closing quote, -1 on malformed input. */
static int next_cp(cursor *c, uint32_t *cp) {
    if (c->p >= c->end) return -1;
    unsigned char b = *c->p++;
    if (b == '"') return 0;
    if (b == '\\') {
        if (c->p >= c->end) return -1;
        unsigned char e = *c->p++;
        switch (e) {
        case '"': *cp = '"'; return 1;
        case '\\': *cp = '\\'; return 1;
        case '/': *cp = '/'; return 1;
        case 'b': *cp = 0x08; return 1;
        case 'f': *cp = 0x0C; return 1;
        case 'n': *cp = 0x0A; return 1;
        case 'r': *cp = 0x0D; return 1;
        case 't': *cp = 0x09; return 1;
        case 'u': {
            uint32_t hi;
            if (!hex4(c, &hi)) return -1;
            if (hi >= 0xD800 && hi <= 0xDBFF && c->end - c->p >= 6 && c->p[0] == '\\' && c->p[1] == 'u') {
                cursor save = *c;
                uint32_t lo;
                c->p += 2;
                if (hex4(c, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                    *cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    return 1;
                }
                *c = save;
            }
            /* A lone surrogate becomes U+FFFD, as a Rust String would hold it. */
            *cp = (hi >= 0xD800 && hi <= 0xDFFF) ? 0xFFFD : hi;
            return 1;
        }
        default: return -1;
        }
    }
    /* Raw UTF-8 (the host hands over valid UTF-8). */
    int extra = b < 0x80 ? 0 : b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : 1;
    uint32_t v = extra == 0 ? b : extra == 1 ? (b & 0x1F) : extra == 2 ? (b & 0x0F) : (b & 0x07);
    if (c->end - c->p < extra) return -1;
    for (int i = 0; i < extra; i++) v = (v << 6) | (*c->p++ & 0x3F);
    *cp = v;
    return 1;
}

/* Walks a string, counting its UTF-8 bytes and whitespace-separated words. */
static int count_string(cursor *c, long long *words, long long *bytes) {
    if (!eat(c, '"')) return 0;
    int in_word = 0;
    uint32_t cp;
    int r;
    while ((r = next_cp(c, &cp)) == 1) {
        *bytes += utf8_len(cp);
        if (is_space(cp)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            (*words)++;
        }
    }
    return r == 0;
}

static int read_key(cursor *c, char *buf, size_t cap, size_t *len) {
    if (!eat(c, '"')) return 0;
    uint32_t cp;
    int r;
    *len = 0;
    while ((r = next_cp(c, &cp)) == 1) {
        if (*len + 1 < cap) buf[(*len)++] = cp < 0x80 ? (char)cp : '?';
    }
    return r == 0;
}

static int read_int(cursor *c, long long *out) {
    skip_ws(c);
    int neg = 0;
    long long v = 0;
    if (c->p < c->end && *c->p == '-') {
        neg = 1;
        c->p++;
    }
    const unsigned char *start = c->p;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        int digit = *c->p++ - '0';
        /* The host hands integers over exactly, of any size: refuse one
         * that does not fit rather than wrap around. */
        if (v > (LLONG_MAX - digit) / 10) return 0;
        v = v * 10 + digit;
    }
    /* A whole number may arrive as 2.0 or 2e0 after validation; keep its
     * integer part and skip the rest. */
    while (c->p < c->end && (*c->p == '.' || *c->p == 'e' || *c->p == 'E' || *c->p == '+' ||
                             *c->p == '-' || (*c->p >= '0' && *c->p <= '9'))) {
        c->p++;
    }
    *out = neg ? -v : v;
    return c->p != start;
}

/* Skips any JSON value. */
static int skip_value(cursor *c) {
    skip_ws(c);
    if (c->p >= c->end) return 0;
    if (*c->p == '"') {
        long long w = 0, b = 0;
        return count_string(c, &w, &b);
    }
    if (*c->p == '{' || *c->p == '[') {
        int depth = 0;
        do {
            if (*c->p == '"') {
                long long w = 0, b = 0;
                if (!count_string(c, &w, &b)) return 0;
                continue;
            }
            if (*c->p == '{' || *c->p == '[') depth++;
            if (*c->p == '}' || *c->p == ']') depth--;
            c->p++;
        } while (depth > 0 && c->p < c->end);
        return depth == 0;
    }
    while (c->p < c->end && *c->p != ',' && *c->p != '}' && *c->p != ']') c->p++;
    return 1;
}

/* ---- the hooks ----------------------------------------------------------- */

static int32_t fail(const etl_invoke_ctx *ctx, const char *message) {
    ctx->host->set_failure(ctx->invocation, 422, ETL_STR("InputError"), etl_str_from(message, strlen(message)));
    return ETL_RESULT_FAILED;
}

static int32_t wordcount_invoke(const etl_invoke_ctx *ctx, etl_str request) {
    cursor c = {(const unsigned char *)request.ptr, (const unsigned char *)request.ptr + request.len};
    long long words = 0, chars = 0, repeat = 1;
    int have_text = 0;

    if (!eat(&c, '{')) return fail(ctx, "the request is not a JSON object");
    if (!eat(&c, '}')) {
        do {
            char key[16];
            size_t key_len;
            if (!read_key(&c, key, sizeof key, &key_len) || !eat(&c, ':')) {
                return fail(ctx, "malformed request object");
            }
            if (key_len == 4 && memcmp(key, "text", 4) == 0) {
                words = chars = 0;
                if (!count_string(&c, &words, &chars)) return fail(ctx, "text must be a string");
                have_text = 1;
            } else if (key_len == 6 && memcmp(key, "repeat", 6) == 0) {
                if (!read_int(&c, &repeat)) return fail(ctx, "repeat must be an integer of at most 64 bits");
            } else if (!skip_value(&c)) {
                return fail(ctx, "malformed request object");
            }
        } while (eat(&c, ','));
        if (!eat(&c, '}')) return fail(ctx, "malformed request object");
    }
    if (!have_text) return fail(ctx, "text is required");

    if (__builtin_mul_overflow(words, repeat, &words) || __builtin_mul_overflow(chars, repeat, &chars)) {
        return fail(ctx, "the counts do not fit in 64 bits");
    }
    ctx->host->add_usage(ctx->invocation, ETL_STR("chars"), chars);

    char out[96];
    int n = snprintf(out, sizeof out, "{\"words\":%lld,\"chars\":%lld}", words, chars);
    ctx->host->emit(ctx->invocation, etl_str_from(out, (size_t)n));
    return ETL_RESULT_OK;
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
