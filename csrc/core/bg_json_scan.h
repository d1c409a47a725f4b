/* bg_json_scan.h - a strict one-pass JSON pull scanner (RFC 8259), no tree,
 * no global state: safe on any number of threads at once and across fork().
 *
 * Pure C. The caller walks the text with the functions below, decoding only
 * the strings and integers it wants and skipping (but still validating) the
 * rest. Strings decode to explicit lengths, so "\u0000" survives. Any syntax
 * error sets s->err (a static message) and s->p at the offending byte; every
 * later call then fails too, so callers may check once at the end.
 */
#ifndef BATCHGATE_BG_JSON_SCAN_H
#define BATCHGATE_BG_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bg_json.h"

enum bg_jt {
    BG_JT_ERR = -1, /* end of input or a byte no value starts with */
    BG_JT_OBJ = 0,
    BG_JT_ARR,
    BG_JT_STR,
    BG_JT_NUM,
    BG_JT_BOOL,
    BG_JT_NULL,
};

/* Deep enough for any real schema, shallow enough for a thread's stack. */
#define BG_JS_MAX_DEPTH 512

typedef struct {
    const char *start, *p, *end;
    int depth;
    const char *err; /* NULL while fine */
} bg_js;

void bg_js_init(bg_js *s, const char *text, size_t len);
/* Fail with msg at the current position (keeps the first error). Returns -1. */
int bg_js_fail(bg_js *s, const char *msg);
size_t bg_js_offset(const bg_js *s);
const char *bg_jt_name(int t); /* "object", "list", ..., "invalid" */

/* Type of the next value (after whitespace), without consuming it. */
int bg_js_peek(bg_js *s);
/* Consume and validate one value of any type. 0 or -1. */
int bg_js_skip(bg_js *s);
/* Consume one string; append its decoded bytes to out (NULL: just validate). */
int bg_js_string(bg_js *s, bg_buf *out);
/* Consume one number; *out gets it if it is an integer in int64 range written
 * without exponent (a zero fraction such as 2.0 counts). Returns 0 if it is
 * such an integer, 1 if it is a valid number that is not, -1 on bad syntax. */
int bg_js_int(bg_js *s, int64_t *out);
/* Consume true/false/null. */
int bg_js_literal(bg_js *s, bool *value);

/* Objects: first() consumes '{'; then first()/more() return 1 with the next
 * member's key decoded into key (reset first) and the ':' consumed - the
 * caller must then consume the value - or 0 after the closing '}', -1 on
 * error. Arrays alike without keys. */
int bg_js_obj_first(bg_js *s, bg_buf *key);
int bg_js_obj_more(bg_js *s, bg_buf *key);
int bg_js_arr_first(bg_js *s);
int bg_js_arr_more(bg_js *s);

/* 0 if only whitespace is left, else -1 ("trailing data"). */
int bg_js_finish(bg_js *s);

/* Shared by the bg_json*.c files: snprintf into err, then bg_utf8_trim. */
void bg_json_errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static inline bool bg_js_key_is(const bg_buf *key, const char *lit)
{
    size_t n = 0;
    while (lit[n])
        n++;
    if (key->len != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (key->data[i] != lit[i])
            return false;
    return true;
}

#endif /* BATCHGATE_BG_JSON_SCAN_H */
