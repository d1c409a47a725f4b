/* bg_json.c - request templates and bodies for the OpenAI-style API (responses
 * are parsed in bg_json_response.c). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup, strncasecmp, clock_gettime */
#endif
#include "bg_json.h"
#include "bg_json_scan.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void bg_json_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    bg_utf8_trim(err);
}

/* A cut made by snprintf may split a multi-byte character: drop its head. */
void bg_utf8_trim(char *s)
{
    size_t n = strlen(s);
    size_t k = 0; /* continuation bytes at the end */
    while (k < n && k < 3 && ((unsigned char)s[n - 1 - k] & 0xC0) == 0x80)
        k++;
    if (k == n)
        return;
    unsigned char lead = (unsigned char)s[n - 1 - k];
    size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (lead >= 0xC0 && k < need)
        s[n - 1 - k] = '\0';
}

/* bg_json_parse: cJSON for tests and tools only. cJSON's parser writes a
 * process-wide "last error" on every call, so parses are serialized; the
 * lock is taken across fork() (prepare/parent/child handlers) so a child
 * never inherits it held. The library itself parses with bg_json_scan.h. */
static pthread_mutex_t parse_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t parse_once = PTHREAD_ONCE_INIT;

static void parse_lock(void)
{
    pthread_mutex_lock(&parse_mu);
}

static void parse_unlock(void)
{
    pthread_mutex_unlock(&parse_mu);
}

static void parse_register_atfork(void)
{
    (void)pthread_atfork(parse_lock, parse_unlock, parse_unlock);
}

struct cJSON *bg_json_parse(const char *s, size_t len, const char **end)
{
    const char *e = NULL;
    pthread_once(&parse_once, parse_register_atfork);
    parse_lock();
    cJSON *v = cJSON_ParseWithLengthOpts(s, len, &e, 0);
    parse_unlock();
    if (end)
        *end = e;
    return v;
}

/* ---- growable buffer ------------------------------------------------- */

int bg_buf_reserve(bg_buf *b, size_t extra)
{
    if (b->cap - b->len > extra)
        return 0;
    size_t need = b->len + extra + 1;
    if (need < b->len) /* overflow */
        return -1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap = cap * 2 > cap ? cap * 2 : need;
    char *p = realloc(b->data, cap);
    if (!p)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

int bg_buf_append(bg_buf *b, const char *s, size_t n)
{
    if (bg_buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

void bg_buf_free(bg_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int bg_buf_append_json_string(bg_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    /* Worst case every byte becomes \u00XX. */
    if (n > (SIZE_MAX - 3) / 6 || bg_buf_reserve(b, n * 6 + 2) < 0)
        return -1;
    char *o = b->data + b->len;
    *o++ = '"';
    size_t run = 0; /* start of the current run of bytes copied verbatim */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        memcpy(o, s + run, i - run);
        o += i - run;
        run = i + 1;
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    memcpy(o, s + run, n - run);
    o += n - run;
    *o++ = '"';
    b->len = (size_t)(o - b->data);
    b->data[b->len] = '\0';
    return 0;
}

/* ---- templates ------------------------------------------------------- */

static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Validate the caller's params object and pick out the fields the engine
 * needs. The whole text must be one strict JSON object: it is copied into
 * every body verbatim, so nothing in it may close the body's object early. */
static int scan_params(bg_tmpl *t, const char *s, size_t len, bool *has_model, char *err,
                       size_t errlen)
{
    bg_js js;
    bg_buf key = {0};
    int64_t mt = -1, mct = -1;
    int rc = -1;
    bg_js_init(&js, s, len);
    int type = bg_js_peek(&js);
    if (type != BG_JT_OBJ) {
        if (type == BG_JT_ERR || bg_js_skip(&js) < 0)
            goto syntax;
        bg_json_errf(err, errlen, "request params must be a JSON object, got %s", bg_jt_name(type));
        goto done;
    }
    for (int m = bg_js_obj_first(&js, &key); m == 1; m = bg_js_obj_more(&js, &key)) {
        int vt = bg_js_peek(&js);
        if (bg_js_key_is(&key, "prompt") || bg_js_key_is(&key, "messages")) {
            bg_json_errf(err, errlen, "request params must not contain \"%s\": pass it as the argument",
                    key.data);
            goto done;
        }
        if (bg_js_key_is(&key, "stream")) {
            bool on = false;
            if (vt != BG_JT_BOOL && vt != BG_JT_NULL) {
                bg_json_errf(err, errlen, "request params: \"stream\" responses are not supported");
                goto done;
            }
            if (bg_js_literal(&js, &on) < 0)
                goto syntax;
            if (on) {
                bg_json_errf(err, errlen, "request params: \"stream\" responses are not supported");
                goto done;
            }
            continue;
        }
        if (bg_js_key_is(&key, "model")) {
            if (vt != BG_JT_STR) {
                bg_json_errf(err, errlen, "request params: \"model\" must be a string, got %s",
                        bg_jt_name(vt));
                goto done;
            }
            *has_model = true;
        } else if (bg_js_key_is(&key, "n") && vt != BG_JT_NULL) {
            int64_t n = 0;
            int ir = vt == BG_JT_NUM ? bg_js_int(&js, &n) : 1;
            if (ir < 0)
                goto syntax;
            if (ir > 0 || n < 1 || n > 100000) {
                bg_json_errf(err, errlen, "request params: \"n\" must be a positive integer");
                goto done;
            }
            t->n_per_prompt = n;
            continue;
        } else if ((bg_js_key_is(&key, "max_tokens") ||
                    bg_js_key_is(&key, "max_completion_tokens")) && vt != BG_JT_NULL) {
            int64_t v = 0;
            int ir = vt == BG_JT_NUM ? bg_js_int(&js, &v) : 1;
            if (ir < 0)
                goto syntax;
            if (ir > 0 || v < 0) {
                bg_json_errf(err, errlen,
                        "request params: \"%s\" must be a non-negative integer, got %s",
                        key.data, vt == BG_JT_NUM ? "a non-integer number" : bg_jt_name(vt));
                goto done;
            }
            if (key.len == 10)
                mt = v;
            else
                mct = v;
            continue;
        }
        if (bg_js_skip(&js) < 0)
            goto syntax;
    }
    if (js.err)
        goto syntax;
    if (bg_js_finish(&js) < 0) {
        bg_json_errf(err, errlen, "request params: trailing data after the JSON object at byte %zu",
                bg_js_offset(&js));
        goto done;
    }
    t->max_tokens = mt >= 0 ? mt : mct;
    rc = 0;
    goto done;
syntax:
    bg_json_errf(err, errlen, "request params are not valid JSON (%s at byte %zu)",
            js.err ? js.err : "bad value", bg_js_offset(&js));
done:
    bg_buf_free(&key);
    return rc;
}

bg_tmpl *bg_tmpl_new(const char *model, const char *extra_json, size_t extra_len,
                     char *err, size_t errlen)
{
    bg_tmpl *t = calloc(1, sizeof(*t));
    bg_buf pre = {0}, suf = {0};
    if (!t)
        goto nomem;
    t->n_per_prompt = 1;
    t->max_tokens = -1;
    t->refcnt = 1;

    const char *inner = NULL;
    size_t inner_len = 0;
    bool extra_has_model = false;
    if (extra_json && extra_len > 0) {
        if (scan_params(t, extra_json, extra_len, &extra_has_model, err, errlen) < 0)
            goto fail;
        /* Copy the caller's text between the braces verbatim: re-printing
         * would round big integers (seeds) through doubles. */
        size_t a = 0, b = extra_len;
        while (a < b && is_ws(extra_json[a]))
            a++;
        while (b > a && is_ws(extra_json[b - 1]))
            b--;
        a++; /* '{' */
        b--; /* '}' */
        while (a < b && is_ws(extra_json[a]))
            a++;
        while (b > a && is_ws(extra_json[b - 1]))
            b--;
        inner = extra_json + a;
        inner_len = b - a;
    }

    if (bg_buf_append(&pre, "{", 1) < 0)
        goto nomem;
    if (!extra_has_model && model && model[0]) {
        if (bg_buf_append(&pre, "\"model\":", 8) < 0 ||
            bg_buf_append_json_string(&pre, model, strlen(model)) < 0 ||
            bg_buf_append(&pre, ",", 1) < 0)
            goto nomem;
    }
    if (inner_len > 0) {
        if (bg_buf_append(&suf, ",", 1) < 0 || bg_buf_append(&suf, inner, inner_len) < 0)
            goto nomem;
    }
    if (bg_buf_append(&suf, "}", 1) < 0)
        goto nomem;
    t->prefix = pre.data;
    t->prefix_len = pre.len;
    t->suffix = suf.data;
    t->suffix_len = suf.len;
    return t;

nomem:
    bg_json_errf(err, errlen, "out of memory");
fail:
    bg_buf_free(&pre);
    bg_buf_free(&suf);
    free(t);
    return NULL;
}

void bg_tmpl_incref(bg_tmpl *t)
{
    __atomic_add_fetch(&t->refcnt, 1, __ATOMIC_RELAXED);
}

void bg_tmpl_decref(bg_tmpl *t)
{
    if (!t || __atomic_sub_fetch(&t->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    free(t->prefix);
    free(t->suffix);
    free(t);
}

/* ---- bodies ---------------------------------------------------------- */

char *bg_json_completions_body(const bg_tmpl *t, const bg_str *prompts, size_t n,
                               bool as_list, size_t *out_len)
{
    bg_buf b = {0};
    size_t guess = t->prefix_len + t->suffix_len + 16;
    for (size_t i = 0; i < n; i++)
        guess += prompts[i].len + prompts[i].len / 8 + 4;
    if (bg_buf_reserve(&b, guess) < 0 || bg_buf_append(&b, t->prefix, t->prefix_len) < 0 ||
        bg_buf_append(&b, "\"prompt\":", 9) < 0)
        goto nomem;
    bool list = as_list || n != 1;
    if (list && bg_buf_append(&b, "[", 1) < 0)
        goto nomem;
    for (size_t i = 0; i < n; i++) {
        if ((i > 0 && bg_buf_append(&b, ",", 1) < 0) ||
            bg_buf_append_json_string(&b, prompts[i].ptr, prompts[i].len) < 0)
            goto nomem;
    }
    if ((list && bg_buf_append(&b, "]", 1) < 0) ||
        bg_buf_append(&b, t->suffix, t->suffix_len) < 0)
        goto nomem;
    if (out_len)
        *out_len = b.len;
    return b.data;
nomem:
    bg_buf_free(&b);
    return NULL;
}

char *bg_json_chat_body(const bg_tmpl *t, const char *messages_json, size_t mlen,
                        size_t *out_len)
{
    bg_buf b = {0};
    if (bg_buf_reserve(&b, t->prefix_len + t->suffix_len + mlen + 16) < 0 ||
        bg_buf_append(&b, t->prefix, t->prefix_len) < 0 ||
        bg_buf_append(&b, "\"messages\":", 11) < 0 || bg_buf_append(&b, messages_json, mlen) < 0 ||
        bg_buf_append(&b, t->suffix, t->suffix_len) < 0) {
        bg_buf_free(&b);
        return NULL;
    }
    if (out_len)
        *out_len = b.len;
    return b.data;
}

int bg_json_check_messages(const char *s, size_t len, char *err, size_t errlen)
{
    bg_js js;
    bg_buf key = {0};
    int rc = -1, i = 0, m;
    bg_js_init(&js, s, len);
    int type = bg_js_peek(&js);
    if (type != BG_JT_ARR) {
        if (type == BG_JT_ERR || bg_js_skip(&js) < 0)
            goto syntax;
        bg_json_errf(err, errlen, "messages must be a list, got %s", bg_jt_name(type));
        goto done;
    }
    int more = bg_js_arr_first(&js);
    if (more == 0) {
        bg_json_errf(err, errlen, "messages must not be empty");
        goto done;
    }
    for (; more == 1; more = bg_js_arr_more(&js), i++) {
        int et = bg_js_peek(&js);
        if (et != BG_JT_OBJ) {
            if (et == BG_JT_ERR)
                goto syntax;
            bg_json_errf(err, errlen, "messages[%d] must be an object, got %s", i, bg_jt_name(et));
            goto done;
        }
        int role = BG_JT_ERR - 1; /* missing */
        for (m = bg_js_obj_first(&js, &key); m == 1; m = bg_js_obj_more(&js, &key)) {
            if (bg_js_key_is(&key, "role"))
                role = bg_js_peek(&js);
            if (bg_js_skip(&js) < 0)
                goto syntax;
        }
        if (m < 0)
            goto syntax;
        if (role != BG_JT_STR) {
            bg_json_errf(err, errlen, "messages[%d][\"role\"] must be a string, got %s", i,
                    role < BG_JT_ERR ? "missing" : bg_jt_name(role));
            goto done;
        }
    }
    if (more < 0 || bg_js_finish(&js) < 0)
        goto syntax;
    rc = 0;
    goto done;
syntax:
    bg_json_errf(err, errlen, "messages are not valid JSON (%s at byte %zu)",
            js.err ? js.err : "bad value", bg_js_offset(&js));
done:
    bg_buf_free(&key);
    return rc;
}
