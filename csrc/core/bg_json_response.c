/* bg_json_response.c - answers of the OpenAI-style API, scanned in one pass
 * (bg_json_scan.h) into bg_resp, and the server's message of an error body.
 * No tree and no global state: engines parse on their threads at once. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup */
#endif
#include "bg_json.h"
#include "bg_json_scan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void bg_resp_free(bg_resp *r)
{
    if (!r)
        return;
    if (r->mem) {
        free(r->mem);
        memset(r, 0, sizeof(*r));
        return;
    }
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

void *bg_resp_take_mem(bg_resp *r)
{
    void *m = r->mem;
    if (m)
        memset(r, 0, sizeof(*r));
    return m;
}

static size_t str_size(const char *s)
{
    return s ? strlen(s) + 1 : 0;
}

static char *put_str(char **at, const char *s, size_t len)
{
    char *d = *at;
    memcpy(d, s, len);
    d[len] = '\0';
    *at += len + 1;
    return d;
}

static char *put_cstr(char **at, const char *s)
{
    return s ? put_str(at, s, strlen(s)) : NULL;
}

/* Move a parsed answer into one block: choices first, then the strings. The
 * pieces are freed here, on the parsing thread (its own malloc cache). Out
 * of memory leaves r as it was (each piece its own allocation). */
static void pack(bg_resp *r)
{
    size_t n = r->n_choices, total = n * sizeof(bg_choice);
    for (size_t i = 0; i < n; i++) {
        const bg_choice *c = &r->choices[i];
        total += c->text_len + 1 + str_size(c->finish_reason) + str_size(c->tool_calls_json) +
                 str_size(c->logprobs_json);
    }
    total += str_size(r->id) + str_size(r->model);
    if (total == 0)
        return;
    if (total < sizeof(void *))
        total = sizeof(void *); /* a spent block carries a list link (bg_spent) */
    char *mem = malloc(total);
    if (!mem)
        return;
    bg_choice *ch = (bg_choice *)(void *)mem;
    char *at = mem + n * sizeof(bg_choice);
    for (size_t i = 0; i < n; i++) {
        const bg_choice *c = &r->choices[i];
        ch[i].text = put_str(&at, c->text, c->text_len);
        ch[i].text_len = c->text_len;
        ch[i].finish_reason = put_cstr(&at, c->finish_reason);
        ch[i].tool_calls_json = put_cstr(&at, c->tool_calls_json);
        ch[i].logprobs_json = put_cstr(&at, c->logprobs_json);
    }
    char *id = put_cstr(&at, r->id), *model = put_cstr(&at, r->model);
    bg_usage u = r->usage;
    bg_resp_free(r);
    r->choices = n ? ch : NULL;
    r->n_choices = n;
    r->usage = u;
    r->id = id;
    r->model = model;
    r->mem = mem;
}

/* One choice as it came, before it is put at its "index". */
typedef struct {
    int64_t index;
    bg_buf text;
    char *finish_reason;
    char *tool_calls_json, *logprobs_json; /* see bg_choice */
} raw_choice;

typedef struct {
    raw_choice *v;
    size_t n, cap;
} raw_list;

static void raw_free(raw_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        bg_buf_free(&l->v[i].text);
        free(l->v[i].finish_reason);
        free(l->v[i].tool_calls_json);
        free(l->v[i].logprobs_json);
    }
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

/* The parse in progress: scanner, scratch key, error sink. */
typedef struct {
    bg_js js;
    bg_buf key;
    char *err;
    size_t errlen;
    bool shape_err; /* err holds a shape error (else a syntax error is due) */
} ctx;

#define SHAPE(c, ...)                                                                      \
    do {                                                                                   \
        bg_json_errf((c)->err, (c)->errlen, __VA_ARGS__);                                  \
        (c)->shape_err = true;                                                             \
        return -1;                                                                         \
    } while (0)

/* "<what> is not JSON (...)": where the scan stopped and the body's first 40
 * bytes, non-printables masked so a binary body cannot garble a log line. */
static void not_json_error(char *err, size_t errlen, const char *what, const bg_js *js,
                           const char *body, size_t len)
{
    char snippet[41];
    size_t k = 0;
    for (; k < 40 && k < len; k++)
        snippet[k] = (body[k] >= 0x20 && body[k] < 0x7f) ? body[k] : '?';
    snippet[k] = '\0';
    bg_json_errf(err, errlen, "%s is not JSON (%s at byte %zu of %zu; starts with \"%s\")",
                 what, js->err ? js->err : "bad value", bg_js_offset(js), len, snippet);
}

/* Consume one value and keep its JSON text in *out, unless it is null or an
 * empty list/object: those are as good as absent, so the common answer costs
 * nothing. The span is already validated by the skip. */
static int keep_json(ctx *c, char **out)
{
    free(*out);
    *out = NULL;
    int t = bg_js_peek(&c->js);
    if (t == BG_JT_ERR)
        return -1;
    const char *from = c->js.p;
    while (from < c->js.end && (*from == ' ' || *from == '\t' || *from == '\n' || *from == '\r'))
        from++;
    if (bg_js_skip(&c->js) < 0)
        return -1;
    size_t n = (size_t)(c->js.p - from);
    if (t == BG_JT_NULL)
        return 0;
    if (t == BG_JT_OBJ || t == BG_JT_ARR) {
        const char *q = from + 1;
        while (q < c->js.p && (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r'))
            q++;
        if (q < c->js.p && (*q == ']' || *q == '}'))
            return 0; /* empty */
    }
    char *k = malloc(n + 1);
    if (!k)
        return bg_js_fail(&c->js, "out of memory");
    memcpy(k, from, n);
    k[n] = '\0';
    *out = k;
    return 0;
}

/* A top-level string field (id, model) into *out; other types are ignored. */
static int take_string(ctx *c, char **out)
{
    if (bg_js_peek(&c->js) != BG_JT_STR)
        return bg_js_skip(&c->js);
    bg_buf b = {0};
    if (bg_js_string(&c->js, &b) < 0 || (!b.data && bg_buf_append(&b, "", 0) < 0)) {
        bg_buf_free(&b);
        return -1;
    }
    free(*out);
    *out = b.data;
    return 0;
}

/* "text" / "message"."content" of a choice into dst->text. */
static int take_text(ctx *c, raw_choice *dst, size_t pos, const char *field, bool null_ok,
                     bool *seen)
{
    int t = bg_js_peek(&c->js);
    if (t == BG_JT_NULL && null_ok) {
        *seen = true;
        dst->text.len = 0; /* a repeated key: the last one wins, text and all */
        if (dst->text.data)
            dst->text.data[0] = '\0';
        return bg_js_literal(&c->js, NULL);
    }
    if (t != BG_JT_STR) {
        if (t == BG_JT_ERR)
            return -1;
        SHAPE(c, "choices[%zu]%s must be a string, got %s", pos, field, bg_jt_name(t));
    }
    *seen = true;
    dst->text.len = 0;
    return bg_js_string(&c->js, &dst->text);
}

static int parse_message(ctx *c, raw_choice *dst, size_t pos, bool *seen)
{
    int t = bg_js_peek(&c->js);
    if (t != BG_JT_OBJ) {
        if (t == BG_JT_ERR)
            return -1;
        SHAPE(c, "choices[%zu][\"message\"] must be an object, got %s", pos, bg_jt_name(t));
    }
    int m;
    for (m = bg_js_obj_first(&c->js, &c->key); m == 1; m = bg_js_obj_more(&c->js, &c->key)) {
        if (bg_js_key_is(&c->key, "content")) {
            /* null content: tool calls, no text */
            if (take_text(c, dst, pos, "[\"message\"][\"content\"]", true, seen) < 0)
                return -1;
        } else if (bg_js_key_is(&c->key, "tool_calls")) {
            int tt = bg_js_peek(&c->js);
            if (tt != BG_JT_ARR && tt != BG_JT_NULL) {
                if (tt == BG_JT_ERR)
                    return -1;
                SHAPE(c, "choices[%zu][\"message\"][\"tool_calls\"] must be a list, got %s",
                      pos, bg_jt_name(tt));
            }
            if (keep_json(c, &dst->tool_calls_json) < 0)
                return -1;
        } else if (bg_js_skip(&c->js) < 0) {
            return -1;
        }
    }
    return m;
}

static int parse_choice(ctx *c, enum bg_endpoint ep, raw_choice *dst, size_t pos)
{
    int t = bg_js_peek(&c->js);
    if (t != BG_JT_OBJ) {
        if (t == BG_JT_ERR)
            return -1;
        SHAPE(c, "choices[%zu] must be an object, got %s", pos, bg_jt_name(t));
    }
    bool have_text = false, have_msg = false;
    int m;
    dst->index = (int64_t)pos;
    for (m = bg_js_obj_first(&c->js, &c->key); m == 1; m = bg_js_obj_more(&c->js, &c->key)) {
        int vt = bg_js_peek(&c->js);
        if (bg_js_key_is(&c->key, "index")) {
            int ir = vt == BG_JT_NUM ? bg_js_int(&c->js, &dst->index) : (vt == BG_JT_ERR ? -1 : 1);
            if (ir < 0)
                return -1;
            if (ir > 0)
                SHAPE(c, "choices[%zu][\"index\"] must be an integer, got %s", pos,
                      vt == BG_JT_NUM ? "a non-integer number" : bg_jt_name(vt));
        } else if (ep == BG_EP_COMPLETIONS && bg_js_key_is(&c->key, "text")) {
            if (take_text(c, dst, pos, "[\"text\"]", false, &have_text) < 0)
                return -1;
        } else if (ep == BG_EP_CHAT && bg_js_key_is(&c->key, "message")) {
            have_msg = true;
            if (parse_message(c, dst, pos, &have_text) < 0)
                return -1;
        } else if (bg_js_key_is(&c->key, "logprobs")) {
            if (keep_json(c, &dst->logprobs_json) < 0)
                return -1;
        } else if (bg_js_key_is(&c->key, "finish_reason")) {
            free(dst->finish_reason);
            dst->finish_reason = NULL;
            if (vt == BG_JT_STR) {
                bg_buf fr = {0};
                if (bg_js_string(&c->js, &fr) < 0) {
                    bg_buf_free(&fr);
                    return -1;
                }
                dst->finish_reason = fr.data;
            } else if (vt == BG_JT_NULL) {
                if (bg_js_literal(&c->js, NULL) < 0)
                    return -1;
            } else {
                if (vt == BG_JT_ERR)
                    return -1;
                SHAPE(c, "choices[%zu][\"finish_reason\"] must be a string or null, got %s", pos,
                      bg_jt_name(vt));
            }
        } else if (bg_js_skip(&c->js) < 0) {
            return -1;
        }
    }
    if (m < 0)
        return -1;
    if (ep == BG_EP_CHAT && !have_msg)
        SHAPE(c, "choices[%zu][\"message\"] must be an object, got missing", pos);
    if (!have_text)
        SHAPE(c, "choices[%zu]%s must be a string, got missing", pos,
              ep == BG_EP_CHAT ? "[\"message\"][\"content\"]" : "[\"text\"]");
    return 0;
}

static int parse_choices(ctx *c, enum bg_endpoint ep, raw_list *l)
{
    int t = bg_js_peek(&c->js);
    if (t != BG_JT_ARR) {
        if (t == BG_JT_ERR)
            return -1;
        SHAPE(c, "response \"choices\" must be a list, got %s", bg_jt_name(t));
    }
    int more;
    for (more = bg_js_arr_first(&c->js); more == 1; more = bg_js_arr_more(&c->js)) {
        if (l->n == l->cap) {
            size_t nc = l->cap ? l->cap * 2 : 4;
            raw_choice *p = realloc(l->v, nc * sizeof(*p));
            if (!p)
                return bg_js_fail(&c->js, "out of memory");
            l->v = p;
            l->cap = nc;
        }
        raw_choice *dst = &l->v[l->n++];
        memset(dst, 0, sizeof(*dst));
        if (parse_choice(c, ep, dst, l->n - 1) < 0)
            return -1;
    }
    return more;
}

static int usage_field(ctx *c, int64_t *out)
{
    int vt = bg_js_peek(&c->js);
    if (vt == BG_JT_NUM) {
        int ir = bg_js_int(&c->js, out);
        if (ir > 0)
            *out = -1; /* not an integer: treat as missing */
        return ir < 0 ? -1 : 0;
    }
    return bg_js_skip(&c->js);
}

static int parse_usage(ctx *c, bg_usage *u)
{
    int t = bg_js_peek(&c->js);
    if (t == BG_JT_NULL)
        return bg_js_literal(&c->js, NULL);
    if (t != BG_JT_OBJ) {
        if (t == BG_JT_ERR)
            return -1;
        SHAPE(c, "response \"usage\" must be an object, got %s", bg_jt_name(t));
    }
    u->present = true;
    int m;
    for (m = bg_js_obj_first(&c->js, &c->key); m == 1; m = bg_js_obj_more(&c->js, &c->key)) {
        int64_t *dst = bg_js_key_is(&c->key, "prompt_tokens")       ? &u->prompt_tokens
                       : bg_js_key_is(&c->key, "completion_tokens") ? &u->completion_tokens
                       : bg_js_key_is(&c->key, "total_tokens")      ? &u->total_tokens
                                                                    : NULL;
        int rc = dst ? usage_field(c, dst) : bg_js_skip(&c->js);
        if (rc < 0)
            return -1;
    }
    return m;
}

/* Put the choices at their indices: 0..n-1, each once. */
static int place(ctx *c, raw_list *l, size_t expected, bg_resp *out)
{
    size_t n = l->n;
    if (expected > 0 && n != expected)
        SHAPE(c, "response has %zu choices, expected %zu", n, expected);
    if (n == 0)
        return 0;
    out->choices = calloc(n, sizeof(bg_choice));
    if (!out->choices)
        SHAPE(c, "out of memory");
    out->n_choices = n;
    for (size_t pos = 0; pos < n; pos++) {
        raw_choice *rc = &l->v[pos];
        if (rc->index < 0 || (uint64_t)rc->index >= n)
            SHAPE(c, "choices[%zu] has index %lld, out of range 0..%zu", pos,
                  (long long)rc->index, n - 1);
        bg_choice *dst = &out->choices[rc->index];
        if (dst->text)
            SHAPE(c, "choices[%zu] repeats index %lld", pos, (long long)rc->index);
        if (!rc->text.data && bg_buf_append(&rc->text, "", 0) < 0)
            SHAPE(c, "out of memory");
        dst->text = rc->text.data;
        dst->text_len = rc->text.len;
        dst->finish_reason = rc->finish_reason;
        dst->tool_calls_json = rc->tool_calls_json;
        dst->logprobs_json = rc->logprobs_json;
        rc->text.data = NULL;
        rc->text.len = rc->text.cap = 0;
        rc->finish_reason = rc->tool_calls_json = rc->logprobs_json = NULL;
    }
    return 0;
}

int bg_json_parse_response(const char *body, size_t len, enum bg_endpoint ep,
                           size_t expected, bg_resp *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->usage.prompt_tokens = out->usage.completion_tokens = out->usage.total_tokens = -1;
    ctx c = {.err = err, .errlen = errlen};
    raw_list l = {0};
    bool have_choices = false, have_error = false;
    int m = -1;
    bg_js_init(&c.js, body, len);
    int t = bg_js_peek(&c.js);
    if (t != BG_JT_OBJ) {
        if (t != BG_JT_ERR && bg_js_skip(&c.js) == 0 && bg_js_finish(&c.js) == 0) {
            bg_json_errf(err, errlen, "response must be a JSON object, got %s", bg_jt_name(t));
            c.shape_err = true;
        }
        goto fail;
    }
    for (m = bg_js_obj_first(&c.js, &c.key); m == 1; m = bg_js_obj_more(&c.js, &c.key)) {
        int rc;
        if (bg_js_key_is(&c.key, "choices")) {
            if (have_choices) {
                bg_json_errf(err, errlen, "response repeats \"choices\"");
                c.shape_err = true;
                goto fail;
            }
            have_choices = true;
            rc = parse_choices(&c, ep, &l);
        } else if (bg_js_key_is(&c.key, "usage")) {
            out->usage.present = false;
            rc = parse_usage(&c, &out->usage);
        } else if (bg_js_key_is(&c.key, "id")) {
            rc = take_string(&c, &out->id);
        } else if (bg_js_key_is(&c.key, "model")) {
            rc = take_string(&c, &out->model);
        } else {
            have_error |= bg_js_key_is(&c.key, "error");
            rc = bg_js_skip(&c.js);
        }
        if (rc < 0)
            goto fail;
    }
    if (m < 0 || bg_js_finish(&c.js) < 0)
        goto fail;
    if (!have_choices) {
        if (have_error) {
            char *msg = bg_json_error_message(body, len, 200);
            bg_json_errf(err, errlen, "response has an \"error\" and no \"choices\": %s",
                         msg ? msg : "?");
            free(msg);
        } else {
            bg_json_errf(err, errlen, "response has no \"choices\"");
        }
        c.shape_err = true;
        goto fail;
    }
    if (place(&c, &l, expected, out) < 0)
        goto fail;
    raw_free(&l);
    bg_buf_free(&c.key);
    pack(out);
    return 0;
fail:
    if (!c.shape_err) {
        if (!c.js.err)
            (void)bg_js_skip(&c.js); /* names what is wrong at the stop */
        not_json_error(err, errlen, "response", &c.js, body, len);
    }
    raw_free(&l);
    bg_buf_free(&c.key);
    bg_resp_free(out);
    return -1;
}

/* ---- /tokenize -------------------------------------------------------- */

/* A non-negative integer member (count, max_model_len). */
static int tok_int(bg_js *js, const char *name, int64_t *out, char *err, size_t errlen)
{
    int t = bg_js_peek(js);
    if (t != BG_JT_NUM) {
        if (t != BG_JT_ERR && bg_js_skip(js) == 0)
            bg_json_errf(err, errlen, "tokenize response: \"%s\" must be an integer, got %s",
                         name, bg_jt_name(t));
        return -1;
    }
    int rc = bg_js_int(js, out);
    if (rc == 0 && *out >= 0)
        return 0;
    if (rc >= 0)
        bg_json_errf(err, errlen, "tokenize response: \"%s\" must be a non-negative integer",
                     name);
    return -1;
}

int bg_json_parse_tokenize(const char *body, size_t len, int64_t *count,
                           int64_t *max_model_len, char *err, size_t errlen)
{
    bg_js js;
    bg_buf key = {0};
    int64_t n_tokens = -1;
    *count = -1;
    *max_model_len = -1;
    err[0] = '\0';
    bg_js_init(&js, body, len);
    int t = bg_js_peek(&js);
    int m = -1;
    if (t != BG_JT_OBJ) {
        if (t != BG_JT_ERR && bg_js_skip(&js) == 0 && bg_js_finish(&js) == 0)
            bg_json_errf(err, errlen, "tokenize response must be a JSON object, got %s",
                         bg_jt_name(t));
        goto fail;
    }
    for (m = bg_js_obj_first(&js, &key); m == 1; m = bg_js_obj_more(&js, &key)) {
        int rc;
        if (bg_js_key_is(&key, "count")) {
            rc = tok_int(&js, "count", count, err, errlen);
        } else if (bg_js_key_is(&key, "max_model_len")) {
            rc = bg_js_peek(&js) == BG_JT_NULL ? bg_js_skip(&js)
                                                : tok_int(&js, "max_model_len", max_model_len,
                                                          err, errlen);
        } else if (bg_js_key_is(&key, "tokens") && bg_js_peek(&js) == BG_JT_ARR) {
            /* Only counted (the ids are not needed), still validated. */
            n_tokens = 0;
            int a;
            for (a = bg_js_arr_first(&js); a == 1; a = bg_js_arr_more(&js)) {
                if (bg_js_skip(&js) < 0)
                    break;
                n_tokens++;
            }
            rc = a < 0 || js.err ? -1 : 0;
        } else {
            rc = bg_js_skip(&js);
        }
        if (rc < 0)
            goto fail;
    }
    if (m < 0 || bg_js_finish(&js) < 0)
        goto fail;
    if (*count < 0)
        *count = n_tokens;
    if (*count < 0) {
        bg_json_errf(err, errlen, "tokenize response has no \"count\" (is this vLLM's /tokenize?)");
        goto fail;
    }
    bg_buf_free(&key);
    return 0;
fail:
    if (!err[0]) {
        not_json_error(err, errlen, "tokenize response", &js, body, len);
    }
    bg_buf_free(&key);
    *count = -1;
    return -1;
}

/* ---- error bodies ----------------------------------------------------- */

/* At most max_len bytes of s, control characters as spaces, never ending
 * inside a UTF-8 sequence; "..." when cut. */
static char *sanitized_copy(const char *s, size_t len, size_t max_len)
{
    size_t n = len < max_len ? len : max_len;
    if (n < len) {
        /* Back off to the start of the character the cut falls in. */
        size_t k = n;
        while (k > 0 && n - k < 3 && ((unsigned char)s[k] & 0xC0) == 0x80)
            k--;
        if (((unsigned char)s[k] & 0xC0) != 0x80)
            n = k;
    }
    char *o = malloc(n + 4);
    if (!o)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        o[i] = (ch < 0x20 || ch == 0x7f) ? ' ' : (char)ch;
    }
    if (n < len)
        memcpy(o + n, "...", 4);
    else
        o[n] = '\0';
    return o;
}

/* A string member's decoded value, or a raw span for non-strings. */
typedef struct {
    bg_buf str;
    const char *raw;
    size_t raw_len;
    bool is_str, present;
} field;

static int take_field(bg_js *js, field *f)
{
    bg_buf_free(&f->str);
    f->present = true;
    f->is_str = bg_js_peek(js) == BG_JT_STR;
    if (f->is_str)
        return bg_js_string(js, &f->str);
    const char *a = js->p;
    if (bg_js_skip(js) < 0)
        return -1;
    f->raw = a;
    f->raw_len = (size_t)(js->p - a);
    return 0;
}

char *bg_json_error_message(const char *body, size_t len, size_t max_len)
{
    bg_js js;
    bg_buf key = {0};
    field err_msg = {0}, err_str = {0}, message = {0}, detail = {0};
    char *msg = NULL;
    int m = -1;
    bg_js_init(&js, body, body ? len : 0);
    if (body && len && bg_js_peek(&js) == BG_JT_OBJ) {
        for (m = bg_js_obj_first(&js, &key); m == 1; m = bg_js_obj_more(&js, &key)) {
            int rc;
            if (bg_js_key_is(&key, "error") && bg_js_peek(&js) == BG_JT_OBJ) {
                int em;
                for (em = bg_js_obj_first(&js, &key); em == 1; em = bg_js_obj_more(&js, &key)) {
                    if (bg_js_key_is(&key, "message") ? take_field(&js, &err_msg) < 0
                                                      : bg_js_skip(&js) < 0)
                        break;
                }
                rc = em == 0 ? 0 : -1;
            } else if (bg_js_key_is(&key, "error")) {
                rc = take_field(&js, &err_str);
            } else if (bg_js_key_is(&key, "message")) {
                rc = take_field(&js, &message);
            } else if (bg_js_key_is(&key, "detail")) {
                rc = take_field(&js, &detail);
            } else {
                rc = bg_js_skip(&js);
            }
            if (rc < 0) {
                m = -1;
                break;
            }
        }
    }
    if (m == 0 && bg_js_finish(&js) == 0) {
        const field *pick = err_msg.is_str   ? &err_msg
                            : err_str.is_str ? &err_str
                            : message.is_str ? &message
                            : detail.present ? &detail
                                             : NULL;
        if (pick && pick->is_str)
            msg = sanitized_copy(pick->str.data ? pick->str.data : "", pick->str.len, max_len);
        else if (pick)
            msg = sanitized_copy(pick->raw, pick->raw_len, max_len);
    }
    bg_buf_free(&key);
    bg_buf_free(&err_msg.str);
    bg_buf_free(&err_str.str);
    bg_buf_free(&message.str);
    bg_buf_free(&detail.str);
    if (!msg)
        msg = sanitized_copy(body ? body : "", body ? len : 0, max_len);
    return msg;
}
