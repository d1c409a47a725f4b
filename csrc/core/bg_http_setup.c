/* bg_http_setup.c - the engine's set-up and tear-down: configuration
 * defaults and checks, URLs, the header list (the API key only inside it),
 * the multi handle, the thread; destroy; statistics and result names. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup */
#endif
#include "bg_http_internal.h"

#include <curl/curl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *bg_result_kind_name(int kind)
{
    switch (kind) {
    case BG_RES_OK: return "ok";
    case BG_RES_HTTP: return "http";
    case BG_RES_TRANSPORT: return "transport";
    case BG_RES_TIMEOUT: return "timeout";
    case BG_RES_MALFORMED: return "malformed";
    case BG_RES_CANCELLED: return "cancelled";
    case BG_RES_CLOSED: return "closed";
    case BG_RES_NOMEM: return "nomem";
    default: return "?";
    }
}

void bg_request_clear(bg_request *r)
{
    free(r->message);
    r->message = NULL;
    bg_resp_free(&r->resp);
    free(r->raw);
    r->raw = NULL;
    r->raw_len = 0;
    r->retry_status = 0;
    r->retry_curl = 0;
    r->retry_wait_s = 0;
    r->kind = BG_RES_OK;
    r->status = 0;
    r->curl_code = 0;
    r->attempts = 0;
}

void bg_request_clear_into(bg_request *r, bg_spent *sp)
{
    void *m = bg_resp_take_mem(&r->resp);
    if (m) {
        *(void **)m = NULL; /* the block is dead: its first bytes carry the link */
        if (sp->tail)
            *(void **)sp->tail = m;
        else
            sp->head = m;
        sp->tail = m;
    }
    bg_request_clear(r);
}

void bg_spent_free(bg_spent *sp)
{
    void *m = sp->head;
    while (m) {
        void *next = *(void **)m;
        free(m);
        m = next;
    }
    sp->head = sp->tail = NULL;
}

void bg_engine_config_defaults(bg_engine_config *c)
{
    memset(c, 0, sizeof(*c));
    c->connect_timeout_ms = 10000;
    c->timeout_ms = 600000;
    c->max_retries = 3;
    c->verify_tls = true;
    c->max_response_bytes = 64u << 20;
    c->backoff_base_s = 0.5;
    c->backoff_max_s = 30.0;
    c->retry_after_max_s = 60.0;
    c->flush_defer_us = 1000;
}

static char *join_url(const char *base, const char *path)
{
    size_t bl = strlen(base);
    while (bl && base[bl - 1] == '/')
        bl--;
    size_t pl = strlen(path);
    char *u = malloc(bl + pl + 1);
    if (!u)
        return NULL;
    memcpy(u, base, bl);
    memcpy(u + bl, path, pl + 1);
    return u;
}

/* vLLM serves /tokenize at the server root, not under /v1. */
static char *tokenize_url_of(const char *base)
{
    size_t bl = strlen(base);
    while (bl && base[bl - 1] == '/')
        bl--;
    if (bl >= 3 && memcmp(base + bl - 3, "/v1", 3) == 0)
        bl -= 3;
    char *u = malloc(bl + sizeof("/tokenize"));
    if (!u)
        return NULL;
    memcpy(u, base, bl);
    memcpy(u + bl, "/tokenize", sizeof("/tokenize"));
    return u;
}

/* libcurl looks for a proxy in the environment on every transfer: five
 * getenv calls, each walking the whole environment (about 3 % of the engine
 * thread's CPU at 40k requests/s). With none of the variables it reads set,
 * "no proxy" said once is the same answer, so the engine reads the proxy
 * environment once, when it is created. Uppercase HTTP_PROXY is listed
 * although libcurl ignores it for http: with it set we simply leave the
 * lookup to libcurl. */
static bool proxy_in_env(void)
{
    static const char *const names[] = {"http_proxy", "HTTP_PROXY",  "https_proxy",
                                        "HTTPS_PROXY", "all_proxy",  "ALL_PROXY"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        const char *v = getenv(names[i]);
        if (v && v[0])
            return true;
    }
    return false;
}

bg_engine *bg_engine_create(const bg_engine_config *cfg, char *err, size_t errlen)
{
#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto fail; } while (0)
    bg_engine *e = calloc(1, sizeof(*e));
    if (!e) {
        bg_admit_free(cfg->admit); /* ours from here on, as documented */
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    bool mu_init = false, close_mu_init = false;
    e->cfg = *cfg;
    if (!cfg->base_url || !cfg->base_url[0])
        FAIL("base_url is required");
    if (strncmp(cfg->base_url, "http://", 7) != 0 && strncmp(cfg->base_url, "https://", 8) != 0)
        FAIL("base_url must start with http:// or https://");
    if (!cfg->count_sem)
        FAIL("count_sem is required");
    if (!cfg->on_done)
        FAIL("on_done is required");
    if (cfg->max_retries < 0)
        FAIL("max_retries must be >= 0");
    e->base_url = strdup(cfg->base_url);
    e->url_completions = join_url(cfg->base_url, "/completions");
    e->url_chat = join_url(cfg->base_url, "/chat/completions");
    e->url_tokenize = cfg->tokenize_url && cfg->tokenize_url[0] ? strdup(cfg->tokenize_url)
                                                                 : tokenize_url_of(cfg->base_url);
    if (!e->base_url || !e->url_completions || !e->url_chat || !e->url_tokenize)
        FAIL("out of memory");
    e->cfg.base_url = e->base_url;
    e->cfg.tokenize_url = e->url_tokenize;
    e->cfg.api_key = NULL; /* only the header keeps it */
    e->cfg.headers = NULL;
    e->cfg.n_headers = 0;

    struct curl_slist *sl = NULL, *tmp;
#define ADD_HEADER(s)                                                                      \
    do {                                                                                   \
        tmp = curl_slist_append(sl, (s));                                                  \
        if (!tmp)                                                                          \
            FAIL("out of memory");                                                         \
        sl = tmp;                                                                          \
        e->headers = sl;                                                                   \
    } while (0)
    ADD_HEADER("Content-Type: application/json");
    ADD_HEADER("Accept: application/json");
    ADD_HEADER("Expect:"); /* no 100-continue round trip for big bodies */
    if (cfg->api_key && cfg->api_key[0]) {
        /* Never echo the key: say what is wrong with it, not what it is. */
        if (strpbrk(cfg->api_key, "\r\n"))
            FAIL("api_key must not contain CR or LF (it would inject HTTP headers)");
        size_t kl = strlen(cfg->api_key);
        char *h = malloc(kl + 32);
        if (!h)
            FAIL("out of memory");
        snprintf(h, kl + 32, "Authorization: Bearer %s", cfg->api_key);
        tmp = curl_slist_append(sl, h);
        memset(h, 0, kl + 32);
        free(h);
        if (!tmp)
            FAIL("out of memory");
        sl = tmp;
        e->headers = sl;
    }
    for (size_t i = 0; i < cfg->n_headers; i++) {
        const char *h = cfg->headers[i];
        if (!h || !strchr(h, ':') || h[0] == ':' || strpbrk(h, "\r\n"))
            FAIL("header %zu must look like \"Name: value\" on one line", i);
        ADD_HEADER(h);
    }
#undef ADD_HEADER

    e->no_env_proxy = !proxy_in_env();
    e->multi = curl_multi_init();
    if (!e->multi)
        FAIL("curl_multi_init failed");
    curl_multi_setopt(e->multi, CURLMOPT_MAXCONNECTS,
                      cfg->max_connections > 0 ? cfg->max_connections : 1024L);
    if (cfg->max_connections > 0)
        curl_multi_setopt(e->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, cfg->max_connections);

    if (pthread_mutex_init(&e->mu, NULL) != 0)
        FAIL("pthread_mutex_init failed");
    mu_init = true;
    if (pthread_mutex_init(&e->close_mu, NULL) != 0)
        FAIL("pthread_mutex_init failed");
    close_mu_init = true;
    if (cfg->admit && bgh_admit_init(e, err, errlen) < 0)
        goto fail;
    e->rng = (uint64_t)bgh_now_ns() ^ ((uint64_t)(uintptr_t)e << 16) ^ 0x2545F4914F6CDD1Dull;
    if (!e->rng)
        e->rng = 1;
    bg_sem_incref(cfg->count_sem);
    if (cfg->token_sem)
        bg_sem_incref(cfg->token_sem);

    /* The engine thread takes no signals: Python's handlers run on the main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&e->thread, NULL, bgh_engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        bg_sem_decref(cfg->count_sem);
        if (cfg->token_sem)
            bg_sem_decref(cfg->token_sem);
        FAIL("cannot start the engine thread: %s", strerror(rc));
    }
    e->thread_started = true;
    return e;

fail:
    bgh_admit_cleanup(e); /* frees cfg->admit too */
    if (e->multi)
        curl_multi_cleanup(e->multi);
    curl_slist_free_all(e->headers);
    if (mu_init)
        pthread_mutex_destroy(&e->mu);
    if (close_mu_init)
        pthread_mutex_destroy(&e->close_mu);
    free(e->base_url);
    free(e->url_completions);
    free(e->url_chat);
    free(e->url_tokenize);
    free(e);
    return NULL;
#undef FAIL
}

void bg_engine_destroy(bg_engine *e)
{
    if (!e)
        return;
    bg_engine_close(e);
    while (e->easy_pool) {
        bg_easy *x = e->easy_pool;
        e->easy_pool = x->next;
        curl_easy_cleanup(x->h);
        free(x->buf);
        free(x);
    }
    bg_spent_free(&e->spent);
    bgh_admit_cleanup(e);
    curl_multi_cleanup(e->multi);
    curl_slist_free_all(e->headers);
    bg_sem_decref(e->cfg.count_sem);
    if (e->cfg.token_sem)
        bg_sem_decref(e->cfg.token_sem);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->close_mu);
    free(e->cancel_ids);
    free(e->cancel_groups);
    free(e->buckets);
    free(e->base_url);
    free(e->url_completions);
    free(e->url_chat);
    free(e->url_tokenize);
    free(e);
}

void bg_engine_get_stats(bg_engine *e, bg_engine_stats *out)
{
    out->submitted = __atomic_load_n(&e->st_submitted, __ATOMIC_RELAXED);
    out->completed = __atomic_load_n(&e->st_completed, __ATOMIC_RELAXED);
    out->attempts = __atomic_load_n(&e->st_attempts, __ATOMIC_RELAXED);
    out->retries = __atomic_load_n(&e->st_retries, __ATOMIC_RELAXED);
    out->in_flight = __atomic_load_n(&e->st_in_flight, __ATOMIC_RELAXED);
    out->max_in_flight = __atomic_load_n(&e->st_max_in_flight, __ATOMIC_RELAXED);
    out->live = out->submitted - out->completed;
}
