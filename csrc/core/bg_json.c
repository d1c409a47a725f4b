/* bg_json.c - request bodies and response parsing for the OpenAI-style API. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup, strncasecmp, clock_gettime */
#endif
#include "bg_json.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static const char *type_name(const cJSON *v)
{
    if (!v)
        return "missing";
    switch (v->type & 0xFF) {
    case cJSON_False:
    case cJSON_True: return "bool";
    case cJSON_NULL: return "null";
    case cJSON_Number: return "number";
    case cJSON_String: return "string";
    case cJSON_Array: return "list";
    case cJSON_Object: return "object";
    default: return "invalid";
    }
}

/* cJSON's parser writes a process-wide "last error" on every call, so two
 * threads parsing at once (several engines, or the loop thread building a
 * template) race on it. Every parse in batchgate goes through this lock. */
static pthread_mutex_t parse_mu = PTHREAD_MUTEX_INITIALIZER;

struct cJSON *bg_json_parse(const char *s, size_t len, const char **end)
{
    const char *e = NULL;
    pthread_mutex_lock(&parse_mu);
    cJSON *v = cJSON_ParseWithLengthOpts(s, len, &e, 0);
    pthread_mutex_unlock(&parse_mu);
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

/* A JSON number that is an exact integer in int64 range. */
static int get_int(const cJSON *v, int64_t *out)
{
    if (!cJSON_IsNumber(v))
        return -1;
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d) || d < -9.2e18 || d > 9.2e18)
        return -1;
    *out = (int64_t)d;
    return 0;
}

bg_tmpl *bg_tmpl_new(const char *model, const char *extra_json, size_t extra_len,
                     char *err, size_t errlen)
{
    bg_tmpl *t = calloc(1, sizeof(*t));
    cJSON *root = NULL;
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
        const char *end = NULL;
        root = bg_json_parse(extra_json, extra_len, &end);
        if (!root) {
            size_t off = end ? (size_t)(end - extra_json) : 0;
            set_err(err, errlen, "request params are not valid JSON (at byte %zu)", off);
            goto fail;
        }
        size_t rest = (size_t)(end - extra_json);
        while (rest < extra_len && is_ws(extra_json[rest]))
            rest++;
        if (rest != extra_len) {
            set_err(err, errlen, "request params: trailing data after the JSON object at byte %zu",
                    rest);
            goto fail;
        }
        if (!cJSON_IsObject(root)) {
            set_err(err, errlen, "request params must be a JSON object, got %s", type_name(root));
            goto fail;
        }
        static const char *const per_request[] = {"prompt", "messages"};
        for (size_t i = 0; i < 2; i++) {
            if (cJSON_GetObjectItemCaseSensitive(root, per_request[i])) {
                set_err(err, errlen,
                        "request params must not contain \"%s\": pass it as the argument",
                        per_request[i]);
                goto fail;
            }
        }
        const cJSON *stream = cJSON_GetObjectItemCaseSensitive(root, "stream");
        if (stream && !cJSON_IsFalse(stream) && !cJSON_IsNull(stream)) {
            set_err(err, errlen, "request params: \"stream\" responses are not supported");
            goto fail;
        }
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "model");
        if (m) {
            if (!cJSON_IsString(m)) {
                set_err(err, errlen, "request params: \"model\" must be a string, got %s",
                        type_name(m));
                goto fail;
            }
            extra_has_model = true;
        }
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(root, "n");
        if (n && !cJSON_IsNull(n)) {
            if (get_int(n, &t->n_per_prompt) < 0 || t->n_per_prompt < 1 ||
                t->n_per_prompt > 100000) {
                set_err(err, errlen, "request params: \"n\" must be a positive integer");
                goto fail;
            }
        }
        const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
        if (!mt || cJSON_IsNull(mt))
            mt = cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens");
        if (mt && !cJSON_IsNull(mt)) {
            if (get_int(mt, &t->max_tokens) < 0 || t->max_tokens < 0) {
                set_err(err, errlen,
                        "request params: \"max_tokens\" must be a non-negative integer, got %s",
                        type_name(mt));
                goto fail;
            }
        }
        /* Copy the caller's text between the braces verbatim: re-printing
         * through cJSON would round big integers (seeds) through doubles. */
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
    cJSON_Delete(root);
    return t;

nomem:
    set_err(err, errlen, "out of memory");
fail:
    cJSON_Delete(root);
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
    const char *end = NULL;
    cJSON *root = bg_json_parse(s, len, &end);
    int rc = -1;
    if (!root) {
        set_err(err, errlen, "messages are not valid JSON");
        return -1;
    }
    if (!cJSON_IsArray(root)) {
        set_err(err, errlen, "messages must be a list, got %s", type_name(root));
        goto done;
    }
    if (cJSON_GetArraySize(root) == 0) {
        set_err(err, errlen, "messages must not be empty");
        goto done;
    }
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, root) {
        if (!cJSON_IsObject(m)) {
            set_err(err, errlen, "messages[%d] must be an object, got %s", i, type_name(m));
            goto done;
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role)) {
            set_err(err, errlen, "messages[%d][\"role\"] must be a string, got %s", i,
                    type_name(role));
            goto done;
        }
        i++;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

/* ---- responses ------------------------------------------------------- */

/* Take ownership of a cJSON string's storage (saves a copy per choice). */
static char *steal_string(cJSON *v)
{
    char *s = v->valuestring;
    v->valuestring = NULL;
    return s;
}

static int64_t usage_field(const cJSON *u, const char *name)
{
    int64_t v;
    return get_int(cJSON_GetObjectItemCaseSensitive(u, name), &v) == 0 ? v : -1;
}

/* The serialized form of an optional structured field: NULL when absent,
 * null or an empty list/object, so the common answer costs one lookup. */
static int keep_json(const cJSON *v, char **out)
{
    *out = NULL;
    if (!v || cJSON_IsNull(v) || ((cJSON_IsArray(v) || cJSON_IsObject(v)) && !v->child))
        return 0;
    *out = cJSON_PrintUnformatted(v);
    return *out ? 0 : -1;
}

/* A top-level string field, taken without a copy; NULL if absent or not a string. */
static char *take_string(cJSON *root, const char *name)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(root, name);
    return cJSON_IsString(v) ? steal_string(v) : NULL;
}

void bg_resp_free(bg_resp *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n_choices; i++) {
        free(r->choices[i].text);
        free(r->choices[i].finish_reason);
        free(r->choices[i].tool_calls_json);
        free(r->choices[i].logprobs_json);
    }
    free(r->choices);
    free(r->id);
    free(r->model);
    memset(r, 0, sizeof(*r));
}

int bg_json_parse_response(const char *body, size_t len, enum bg_endpoint ep,
                           size_t expected, bg_resp *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const char *end = NULL;
    cJSON *root = bg_json_parse(body, len, &end);
    if (!root) {
        size_t off = end ? (size_t)(end - body) : 0;
        char snippet[41];
        size_t k = 0;
        for (; k < 40 && k < len; k++)
            snippet[k] = (body[k] >= 0x20 && body[k] < 0x7f) ? body[k] : '?';
        snippet[k] = '\0';
        set_err(err, errlen, "response is not JSON (error at byte %zu of %zu; starts with \"%s\")",
                off, len, snippet);
        return -1;
    }
    if (!cJSON_IsObject(root)) {
        set_err(err, errlen, "response must be a JSON object, got %s", type_name(root));
        goto fail;
    }
    cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    if (!choices) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, "error");
        if (e) {
            char *msg = bg_json_error_message(body, len, 200);
            set_err(err, errlen, "response has an \"error\" and no \"choices\": %s",
                    msg ? msg : "?");
            free(msg);
        } else {
            set_err(err, errlen, "response has no \"choices\"");
        }
        goto fail;
    }
    if (!cJSON_IsArray(choices)) {
        set_err(err, errlen, "response \"choices\" must be a list, got %s", type_name(choices));
        goto fail;
    }
    size_t n = (size_t)cJSON_GetArraySize(choices);
    if (expected > 0 && n != expected) {
        set_err(err, errlen, "response has %zu choices, expected %zu", n, expected);
        goto fail;
    }
    if (n > 0) {
        out->choices = calloc(n, sizeof(bg_choice));
        if (!out->choices) {
            set_err(err, errlen, "out of memory");
            goto fail;
        }
    }
    out->n_choices = n;
    size_t pos = 0;
    cJSON *c;
    cJSON_ArrayForEach(c, choices) {
        if (!cJSON_IsObject(c)) {
            set_err(err, errlen, "choices[%zu] must be an object, got %s", pos, type_name(c));
            goto fail;
        }
        int64_t idx = (int64_t)pos;
        cJSON *iv = cJSON_GetObjectItemCaseSensitive(c, "index");
        if (iv && get_int(iv, &idx) < 0) {
            set_err(err, errlen, "choices[%zu][\"index\"] must be an integer, got %s", pos,
                    type_name(iv));
            goto fail;
        }
        if (idx < 0 || (uint64_t)idx >= n) {
            set_err(err, errlen, "choices[%zu] has index %lld, out of range 0..%zu", pos,
                    (long long)idx, n - 1);
            goto fail;
        }
        bg_choice *dst = &out->choices[idx];
        if (dst->text) {
            set_err(err, errlen, "choices[%zu] repeats index %lld", pos, (long long)idx);
            goto fail;
        }
        cJSON *tv;
        const char *field;
        if (ep == BG_EP_CHAT) {
            cJSON *msg = cJSON_GetObjectItemCaseSensitive(c, "message");
            if (!cJSON_IsObject(msg)) {
                set_err(err, errlen, "choices[%zu][\"message\"] must be an object, got %s", pos,
                        type_name(msg));
                goto fail;
            }
            tv = cJSON_GetObjectItemCaseSensitive(msg, "content");
            field = "[\"message\"][\"content\"]";
            cJSON *tc = cJSON_GetObjectItemCaseSensitive(msg, "tool_calls");
            if (tc && !cJSON_IsNull(tc) && !cJSON_IsArray(tc)) {
                set_err(err, errlen, "choices[%zu][\"message\"][\"tool_calls\"] must be a list, "
                        "got %s", pos, type_name(tc));
                goto fail;
            }
            if (keep_json(tc, &dst->tool_calls_json) < 0)
                goto nomem;
            if (cJSON_IsNull(tv))
                tv = NULL; /* tool calls: no text */
            else if (!cJSON_IsString(tv))
                goto bad_text;
        } else {
            tv = cJSON_GetObjectItemCaseSensitive(c, "text");
            field = "[\"text\"]";
            if (!cJSON_IsString(tv))
                goto bad_text;
        }
        dst->text = tv ? steal_string(tv) : strdup("");
        if (!dst->text)
            goto nomem;
        if (keep_json(cJSON_GetObjectItemCaseSensitive(c, "logprobs"), &dst->logprobs_json) < 0)
            goto nomem;
        dst->text_len = strlen(dst->text);
        cJSON *fr = cJSON_GetObjectItemCaseSensitive(c, "finish_reason");
        if (cJSON_IsString(fr)) {
            dst->finish_reason = steal_string(fr);
        } else if (fr && !cJSON_IsNull(fr)) {
            set_err(err, errlen, "choices[%zu][\"finish_reason\"] must be a string or null, got %s",
                    pos, type_name(fr));
            goto fail;
        }
        pos++;
        continue;
    bad_text:
        set_err(err, errlen, "choices[%zu]%s must be a string, got %s", pos, field,
                type_name(tv));
        goto fail;
    }
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(root, "usage");
    out->usage.prompt_tokens = out->usage.completion_tokens = out->usage.total_tokens = -1;
    if (cJSON_IsObject(u)) {
        out->usage.present = true;
        out->usage.prompt_tokens = usage_field(u, "prompt_tokens");
        out->usage.completion_tokens = usage_field(u, "completion_tokens");
        out->usage.total_tokens = usage_field(u, "total_tokens");
    } else if (u && !cJSON_IsNull(u)) {
        set_err(err, errlen, "response \"usage\" must be an object, got %s", type_name(u));
        goto fail;
    }
    out->id = take_string(root, "id");
    out->model = take_string(root, "model");
    cJSON_Delete(root);
    return 0;
nomem:
    set_err(err, errlen, "out of memory");
fail:
    cJSON_Delete(root);
    bg_resp_free(out);
    return -1;
}

static char *sanitized_copy(const char *s, size_t len, size_t max_len)
{
    size_t n = len < max_len ? len : max_len;
    char *o = malloc(n + 4);
    if (!o)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        o[i] = (c < 0x20 || c == 0x7f) ? ' ' : (char)c;
    }
    if (n < len) {
        memcpy(o + n, "...", 4);
    } else {
        o[n] = '\0';
    }
    return o;
}

char *bg_json_error_message(const char *body, size_t len, size_t max_len)
{
    char *msg = NULL;
    cJSON *root = body && len ? bg_json_parse(body, len, NULL) : NULL;
    if (cJSON_IsObject(root)) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, "error");
        const cJSON *m = NULL;
        if (cJSON_IsObject(e))
            m = cJSON_GetObjectItemCaseSensitive(e, "message");
        else if (cJSON_IsString(e))
            m = e;
        if (!cJSON_IsString(m))
            m = cJSON_GetObjectItemCaseSensitive(root, "message");
        if (!cJSON_IsString(m))
            m = cJSON_GetObjectItemCaseSensitive(root, "detail");
        if (cJSON_IsString(m)) {
            msg = sanitized_copy(m->valuestring, strlen(m->valuestring), max_len);
        } else if (m) {
            char *printed = cJSON_PrintUnformatted(m);
            if (printed)
                msg = sanitized_copy(printed, strlen(printed), max_len);
            free(printed);
        }
    }
    cJSON_Delete(root);
    if (!msg)
        msg = sanitized_copy(body ? body : "", body ? len : 0, max_len);
    return msg;
}
