/* bg_http_transfer.c - the curl glue of one HTTP attempt on the engine
 * thread: pooled easy handles, body and header callbacks, option setting,
 * and what an answer means (read it, retry after a backoff or Retry-After,
 * or a final error). It reports to bg_http_request.c and changes no
 * request state itself. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strncasecmp */
#endif
#include "bg_http_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- easy handles ---------------------------------------------------- */

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    bg_easy *x = userp;
    bg_request *r = x->req;
    size_t n = size * nmemb;
    size_t cap = r->engine->cfg.max_response_bytes;
    if (cap && (x->len + n > cap || x->len + n < x->len)) {
        r->oversize = true;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    if (x->cap - x->len <= n) {
        size_t nc = x->cap ? x->cap : 4096;
        while (nc - x->len <= n) {
            if (nc > SIZE_MAX / 2)
                return 0;
            nc *= 2;
        }
        char *p = realloc(x->buf, nc);
        if (!p)
            return 0;
        x->buf = p;
        x->cap = nc;
    }
    memcpy(x->buf + x->len, data, n);
    x->len += n;
    x->buf[x->len] = '\0';
    return n;
}

static double parse_retry_after(const char *v, size_t n)
{
    while (n && (*v == ' ' || *v == '\t')) {
        v++;
        n--;
    }
    while (n && (v[n - 1] == '\r' || v[n - 1] == '\n' || v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    if (n == 0 || n > 63)
        return -1;
    char tmp[64];
    memcpy(tmp, v, n);
    tmp[n] = '\0';
    char *end;
    errno = 0;
    double secs = strtod(tmp, &end);
    if (end != tmp && *end == '\0' && errno == 0 && isfinite(secs))
        return secs < 0 ? 0 : secs;
    time_t t = curl_getdate(tmp, NULL); /* HTTP date */
    if (t == (time_t)-1)
        return -1;
    double d = difftime(t, time(NULL));
    return d < 0 ? 0 : d;
}

static size_t header_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    bg_request *r = ((bg_easy *)userp)->req;
    size_t n = size * nmemb;
    static const char key[] = "retry-after:";
    if (n > 5 && memcmp(data, "HTTP/", 5) == 0)
        r->retry_after_s = -1; /* a new response (e.g. after 100 Continue) */
    else if (n >= sizeof(key) - 1 && strncasecmp(data, key, sizeof(key) - 1) == 0)
        r->retry_after_s = parse_retry_after(data + sizeof(key) - 1, n - (sizeof(key) - 1));
    return n;
}

static bg_easy *easy_get(bg_engine *e)
{
    bg_easy *x = e->easy_pool;
    if (x) {
        e->easy_pool = x->next;
        return x;
    }
    x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->h = curl_easy_init();
    if (!x->h) {
        free(x);
        return NULL;
    }
    const bg_engine_config *c = &e->cfg;
    CURL *h = x->h;
    /* Options fixed for the engine's lifetime; per-request ones are set in start_transfer. */
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, x->errbuf);
    curl_easy_setopt(h, CURLOPT_POST, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(h, CURLOPT_PRIVATE, x);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, x);
    x->set_timeout_ms = -1; /* nothing set yet */
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    if (e->no_env_proxy) { /* skips libcurl's per-transfer getenv calls */
        curl_easy_setopt(h, CURLOPT_PROXY, "");
        curl_easy_setopt(h, CURLOPT_NOPROXY, "");
    }
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#endif
    if (c->connect_timeout_ms > 0)
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, c->verify_tls ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, c->verify_tls ? 2L : 0L);
    if (c->max_response_bytes)
        curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)c->max_response_bytes);
    return x;
}

void bgh_easy_put(bg_engine *e, bg_easy *x)
{
    x->len = 0;
    if (x->cap > BG_EASY_KEEP_BYTES) {
        free(x->buf);
        x->buf = NULL;
        x->cap = 0;
    }
    x->next = e->easy_pool;
    e->easy_pool = x;
}

int bgh_transfer_begin(bg_engine *e, bg_request *r)
{
    if (!r->body) {
        if (r->endpoint == BG_EP_CHAT || (r->endpoint == BG_EP_TOKENIZE && r->messages_json))
            r->body = bg_json_chat_body(r->tmpl, r->messages_json, r->messages_len, &r->body_len);
        else
            r->body = bg_json_completions_body(r->tmpl, r->prompts, r->n_prompts,
                                               r->prompt_as_list, &r->body_len);
        if (!r->body) {
            bgh_set_message(r, "out of memory building the request body");
            return BG_RES_NOMEM;
        }
    }
    bg_easy *x = easy_get(e);
    if (!x) {
        bgh_set_message(r, "out of memory creating a transfer");
        return BG_RES_NOMEM;
    }
    CURL *h = x->h;
    /* Handles are pooled across requests with different options: set them every time. */
    const bg_req_opts *o = r->opts;
    const char *url = r->endpoint == BG_EP_CHAT       ? e->url_chat
                      : r->endpoint == BG_EP_TOKENIZE ? e->url_tokenize
                                                      : e->url_completions;
    if (o && o->url_chat)
        url = r->endpoint == BG_EP_CHAT       ? o->url_chat
              : r->endpoint == BG_EP_TOKENIZE ? o->url_tokenize
                                              : o->url_completions;
    bool own_url = !(o && o->url_chat);
    if (!own_url || url != x->set_url) {
        curl_easy_setopt(h, CURLOPT_URL, url);
        x->set_url = own_url ? url : NULL;
    }
    const struct curl_slist *hdrs = o && o->headers ? o->headers : e->headers;
    if (hdrs != e->headers || hdrs != x->set_headers) {
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
        x->set_headers = hdrs == e->headers ? hdrs : NULL;
    }
    long timeout_ms = bgh_timeout_ms(e, r);
    if (timeout_ms != x->set_timeout_ms) {
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
        x->set_timeout_ms = timeout_ms;
    }
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
    x->req = r;
    x->errbuf[0] = '\0';
    x->len = 0;
    r->oversize = false;
    r->retry_after_s = -1;
    r->easy = x;
    r->attempts++;
    if (!r->t_first_send_ns)
        r->t_first_send_ns = bgh_now_ns();
    CURLMcode mc = curl_multi_add_handle(e->multi, h);
    if (mc != CURLM_OK) {
        x->req = NULL;
        r->easy = NULL;
        bgh_easy_put(e, x);
        bgh_set_message(r, "curl_multi_add_handle: %s", curl_multi_strerror(mc));
        return BG_RES_TRANSPORT;
    }
    STAT_ADD(e, st_attempts, 1);
    uint64_t inf = STAT_ADD(e, st_in_flight, 1);
    if (inf > __atomic_load_n(&e->st_max_in_flight, __ATOMIC_RELAXED))
        __atomic_store_n(&e->st_max_in_flight, inf, __ATOMIC_RELAXED);
    return BG_RES_OK;
}

bg_easy *bgh_transfer_detach(bg_engine *e, CURL *h, CURLcode code, bg_request **out)
{
    bg_easy *x = NULL;
    curl_easy_getinfo(h, CURLINFO_PRIVATE, (char **)&x);
    bg_request *r = x->req;
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(e->multi, h);
    x->req = NULL;
    r->easy = NULL;
    STAT_ADD(e, st_in_flight, (uint64_t)-1);
    r->status = status;
    r->curl_code = (int)code;
    *out = r;
    return x;
}

void bgh_transfer_abort(bg_engine *e, bg_request *r)
{
    bg_easy *x = r->easy;
    if (!x)
        return;
    curl_multi_remove_handle(e->multi, x->h);
    x->req = NULL;
    r->easy = NULL;
    bgh_easy_put(e, x);
    STAT_ADD(e, st_in_flight, (uint64_t)-1);
}

static bool retryable_status(long s)
{
    return s == 408 || s == 429 || s == 500 || s == 502 || s == 503 || s == 504;
}

static bool retryable_curl(CURLcode c)
{
    switch (c) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
        return true;
    default:
        return false;
    }
}

static uint64_t rng_next(bg_engine *e)
{
    uint64_t x = e->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return e->rng = x;
}

double bgh_retry_delay(bg_engine *e, bg_request *r)
{
    double d;
    if (r->retry_after_s >= 0) {
        d = r->retry_after_s < e->cfg.retry_after_max_s ? r->retry_after_s
                                                         : e->cfg.retry_after_max_s;
    } else {
        d = e->cfg.backoff_base_s * ldexp(1.0, r->attempts - 1);
        if (d > e->cfg.backoff_max_s)
            d = e->cfg.backoff_max_s;
        /* Equal jitter: half fixed, half random, so a burst of failures spreads out. */
        double u = (double)(rng_next(e) >> 11) / 9007199254740992.0;
        d = d / 2 + u * d / 2;
    }
    /* NaN (0 * inf), inf or absurd caps would make the conversion undefined:
     * keep the delay in [0, 1e9 s]. */
    if (!(d >= 0))
        d = 0;
    else if (d > 1e9)
        d = 1e9;
    return d;
}

enum bgh_verdict bgh_judge(bg_engine *e, bg_request *r, const bg_easy *x, CURLcode code,
                           int *kind)
{
    bool can_retry = r->attempts <= bgh_max_retries(e, r);
    if (code != CURLE_OK) {
        const char *cmsg = x->errbuf[0] ? x->errbuf : curl_easy_strerror(code);
        if (r->oversize || code == CURLE_FILESIZE_EXCEEDED) {
            bgh_set_message(r, "response body exceeds max_response_bytes (%zu)",
                            e->cfg.max_response_bytes);
            *kind = BG_RES_MALFORMED;
        } else if (code == CURLE_OPERATION_TIMEDOUT) {
            if (e->cfg.retry_timeouts && can_retry)
                return BGH_RETRY;
            bgh_set_message(r, "timed out after %d attempt(s): %s", r->attempts, cmsg);
            *kind = BG_RES_TIMEOUT;
        } else if (retryable_curl(code) && can_retry) {
            return BGH_RETRY;
        } else {
            bgh_set_message(r, "%s (curl error %d, %d attempt(s))", cmsg, (int)code, r->attempts);
            *kind = BG_RES_TRANSPORT;
        }
        return BGH_FINAL;
    }
    if (r->status >= 200 && r->status < 300)
        return BGH_ANSWER;
    if (retryable_status(r->status) && can_retry)
        return BGH_RETRY;
    /* The server's own words; callers add status and attempts. */
    free(r->message);
    r->message = bg_json_error_message(x->buf, x->len, 1000);
    *kind = BG_RES_HTTP;
    return BGH_FINAL;
}

int bgh_read_answer(bg_engine *e, bg_request *r, bg_easy *x)
{
    (void)e;
    char err[256];
    if (r->endpoint == BG_EP_TOKENIZE) {
        if (bg_json_parse_tokenize(x->buf ? x->buf : "", x->len, &r->tok_count,
                                   &r->tok_max_model_len, err, sizeof(err)) < 0) {
            bgh_set_message(r, "%s", err);
            return BG_RES_MALFORMED;
        }
        return BG_RES_OK;
    }
    size_t expected = r->endpoint == BG_EP_COMPLETIONS
                          ? r->n_prompts * (size_t)r->tmpl->n_per_prompt
                          : (size_t)r->tmpl->n_per_prompt;
    int rc = bg_json_parse_response(x->buf ? x->buf : "", x->len, r->endpoint, expected,
                                    &r->resp, err, sizeof(err));
    if (rc < 0) {
        bgh_set_message(r, "%s", err);
        return BG_RES_MALFORMED;
    }
    if (r->opts && r->opts->keep_raw && x->buf) {
        r->raw = x->buf; /* hand the buffer over: no copy; the handle grows a new one */
        r->raw_len = x->len;
        x->buf = NULL;
        x->len = x->cap = 0;
    }
    return BG_RES_OK;
}

/* ---- per-call options -------------------------------------------------- */

static size_t header_name_len(const char *h)
{
    const char *c = strchr(h, ':');
    const char *s = strchr(h, ';'); /* "Name;" = send it empty (libcurl) */
    if (!c || (s && s < c))
        c = s;
    return c ? (size_t)(c - h) : strlen(h);
}

static char *url_with_query(const char *url, const char *query)
{
    size_t ul = strlen(url), ql = strlen(query);
    char *u = malloc(ul + ql + 2);
    if (!u)
        return NULL;
    memcpy(u, url, ul);
    u[ul] = strchr(url, '?') ? '&' : '?';
    memcpy(u + ul + 1, query, ql + 1);
    return u;
}

bg_req_opts *bg_req_opts_new(const bg_engine *e, const bg_req_opts_spec *spec, char *err,
                             size_t errlen)
{
    bg_req_opts *o = calloc(1, sizeof(*o));
    if (!o) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    o->timeout_ms = spec->timeout_ms < 0 ? -1 : spec->timeout_ms;
    o->max_retries = spec->max_retries < 0 ? -1 : spec->max_retries;
    o->keep_raw = spec->keep_raw;
    for (size_t i = 0; i < spec->n_headers; i++) {
        const char *h = spec->headers[i];
        if (!h || header_name_len(h) == 0 || header_name_len(h) == strlen(h) ||
            strpbrk(h, "\r\n")) {
            snprintf(err, errlen, "header %zu must look like \"Name: value\" on one line", i);
            goto fail;
        }
    }
    if (spec->n_headers) {
        /* The engine's headers first, minus those the call replaces. */
        struct curl_slist *sl = NULL, *tmp;
        for (const struct curl_slist *p = e->headers; p; p = p->next) {
            size_t nl = header_name_len(p->data);
            bool replaced = false;
            for (size_t i = 0; i < spec->n_headers && !replaced; i++)
                replaced = header_name_len(spec->headers[i]) == nl &&
                           strncasecmp(spec->headers[i], p->data, nl) == 0;
            if (replaced)
                continue;
            if (!(tmp = curl_slist_append(sl, p->data)))
                goto nomem_list;
            sl = tmp;
        }
        for (size_t i = 0; i < spec->n_headers; i++) {
            if (!(tmp = curl_slist_append(sl, spec->headers[i])))
                goto nomem_list;
            sl = tmp;
        }
        o->headers = sl;
        goto headers_done;
    nomem_list:
        curl_slist_free_all(sl);
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
headers_done:
    if (spec->query && spec->query[0]) {
        if (strpbrk(spec->query, " \r\n#")) {
            snprintf(err, errlen, "query must be URL-encoded");
            goto fail;
        }
        o->url_completions = url_with_query(e->url_completions, spec->query);
        o->url_chat = url_with_query(e->url_chat, spec->query);
        o->url_tokenize = url_with_query(e->url_tokenize, spec->query);
        if (!o->url_completions || !o->url_chat || !o->url_tokenize) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
    }
    return o;
fail:
    bg_req_opts_free(o);
    return NULL;
}

void bg_req_opts_free(bg_req_opts *o)
{
    if (!o)
        return;
    if (o->headers) {
        /* The list may hold an Authorization line: wipe it before freeing. */
        for (struct curl_slist *p = o->headers; p; p = p->next)
            memset(p->data, 0, strlen(p->data));
        curl_slist_free_all(o->headers);
    }
    free(o->url_completions);
    free(o->url_chat);
    free(o->url_tokenize);
    free(o);
}
