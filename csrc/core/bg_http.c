/* bg_http.c - the engine: its thread and libcurl multi loop, the lists and
 * id hash, wakeups, and the public API. What happens to a request lives in
 * bg_http_request.c; the curl glue of one attempt in bg_http_transfer.c. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup, strncasecmp, clock_gettime */
#endif
#include "bg_http_internal.h"

#include <curl/curl.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

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
}

/* ---- lists --------------------------------------------------------- */

void bgh_list_push(req_list *l, bg_request *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

void bgh_list_unlink(req_list *l, bg_request *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->next = r->prev = NULL;
}

/* Insert by due time; retries mostly arrive in deadline order, so scan from the tail. */
void bgh_backoff_insert(req_list *l, bg_request *r)
{
    bg_request *after = l->tail;
    while (after && after->due_ns > r->due_ns)
        after = after->prev;
    if (!after) {
        r->prev = NULL;
        r->next = l->head;
        if (l->head)
            l->head->prev = r;
        else
            l->tail = r;
        l->head = r;
        return;
    }
    r->prev = after;
    r->next = after->next;
    if (after->next)
        after->next->prev = r;
    else
        l->tail = r;
    after->next = r;
}

/* ---- id hash (engine thread only) ----------------------------------- */

static size_t hash_slot(const bg_engine *e, uint64_t id)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 20) & (e->n_buckets - 1);
}

static int hash_grow(bg_engine *e)
{
    size_t nb = e->n_buckets ? e->n_buckets * 2 : 1024;
    bg_request **b = calloc(nb, sizeof(*b));
    if (!b)
        return -1;
    bg_request **old = e->buckets;
    size_t on = e->n_buckets;
    e->buckets = b;
    e->n_buckets = nb;
    for (size_t i = 0; i < on; i++) {
        bg_request *r = old[i];
        while (r) {
            bg_request *nx = r->hnext;
            size_t s = hash_slot(e, r->id);
            r->hnext = b[s];
            b[s] = r;
            r = nx;
        }
    }
    free(old);
    return 0;
}

void bgh_hash_insert(bg_engine *e, bg_request *r)
{
    /* Growth failure only makes chains longer. */
    if (e->live >= e->n_buckets)
        (void)hash_grow(e);
    size_t s = hash_slot(e, r->id);
    r->hnext = e->buckets[s];
    e->buckets[s] = r;
    r->in_hash = true;
    e->live++;
}

void bgh_hash_remove(bg_engine *e, bg_request *r)
{
    if (!r->in_hash)
        return;
    bg_request **pp = &e->buckets[hash_slot(e, r->id)];
    while (*pp && *pp != r)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = r->hnext;
    r->hnext = NULL;
    r->in_hash = false;
    e->live--;
}

static bg_request *hash_find(bg_engine *e, uint64_t id)
{
    if (!e->n_buckets)
        return NULL;
    for (bg_request *r = e->buckets[hash_slot(e, id)]; r; r = r->hnext)
        if (r->id == id)
            return r;
    return NULL;
}

/* ---- wakeups --------------------------------------------------------- */

/* Caller holds e->mu. Returns true if the caller must wake the engine: only
 * on the first news since it last looked, and only if it may be asleep (it
 * checks `pending` under e->mu before it polls, so a busy engine sees the
 * news without a syscall). */
static bool mark_pending_locked(bg_engine *e)
{
    bool wake = !e->pending && e->polling;
    e->pending = true;
    return wake;
}

/* The engine whose thread this is (NULL on other threads). */
static _Thread_local bg_engine *tls_engine;

/* Runs under the semaphore's lock on whatever thread released: tiny. */
void bgh_on_grant(bg_sem_waiter *w)
{
    bg_request *r = w->ctx;
    bg_engine *e = r->engine;
    pthread_mutex_lock(&e->mu);
    bgh_list_push(&e->ready, r);
    bool wake = mark_pending_locked(e);
    pthread_mutex_unlock(&e->mu);
    /* Our own thread checks `pending` before it polls: no syscall needed. */
    if (wake && tls_engine != e)
        curl_multi_wakeup(e->multi);
}

/* ---- messages --------------------------------------------------------- */

void bgh_set_message(bg_request *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void bgh_set_message(bg_request *r, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    free(r->message);
    r->message = strdup(buf);
}

/* ---- engine thread --------------------------------------------------- */

/* Cancel everything live (close). Collect first: finishing edits the hash. */
static void cancel_all(bg_engine *e, int kind, bool by_group, uint64_t group)
{
    size_t n = 0, cap = e->live;
    if (!cap)
        return;
    bg_request **v = malloc(cap * sizeof(*v));
    if (!v) {
        /* Out of memory: cancel one at a time by rescanning. */
        for (;;) {
            bg_request *pick = NULL;
            for (size_t i = 0; i < e->n_buckets && !pick; i++)
                for (bg_request *r = e->buckets[i]; r && !pick; r = r->hnext)
                    if ((!by_group || r->group == group) && !r->cancel_req)
                        pick = r;
            if (!pick)
                return;
            /* Each pass finishes pick or marks it, so this ends. */
            bgr_cancel(e, pick, kind);
        }
    }
    for (size_t i = 0; i < e->n_buckets; i++)
        for (bg_request *r = e->buckets[i]; r; r = r->hnext)
            if ((!by_group || r->group == group) && n < cap)
                v[n++] = r;
    for (size_t i = 0; i < n; i++)
        if (!v[i]->cancel_req)
            bgr_cancel(e, v[i], kind);
    free(v);
}

/* The multi handle itself failed (out of memory, a libcurl bug): what is in
 * flight may never finish, and retrying at once would spin. End the
 * transfers with the error and pause a little before going on. */
static void multi_failed(bg_engine *e, const char *what, CURLMcode mc)
{
    size_t n = 0;
    for (size_t i = 0; i < e->n_buckets; i++)
        for (bg_request *r = e->buckets[i]; r; r = r->hnext)
            n += r->state == BGR_FLIGHT;
    bg_request **v = n ? malloc(n * sizeof(*v)) : NULL;
    size_t k = 0;
    for (size_t i = 0; v && i < e->n_buckets; i++)
        for (bg_request *r = e->buckets[i]; r; r = r->hnext)
            if (r->state == BGR_FLIGHT && k < n)
                v[k++] = r;
    for (size_t i = 0; i < k; i++) {
        bg_request *r = v[i];
        bgh_set_message(r, "%s failed: %s (%d)", what, curl_multi_strerror(mc), (int)mc);
        bgr_cancel(e, r, BG_RES_TRANSPORT);
    }
    free(v);
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static void *engine_main(void *arg)
{
    bg_engine *e = arg;
    tls_engine = e;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        bg_request *in = e->inbox.head, *rd = e->ready.head;
        e->inbox.head = e->inbox.tail = NULL;
        e->ready.head = e->ready.tail = NULL;
        uint64_t *ids = e->cancel_ids, *groups = e->cancel_groups;
        size_t n_ids = e->n_cancel_ids, n_groups = e->n_cancel_groups;
        e->cancel_ids = e->cancel_groups = NULL;
        e->n_cancel_ids = e->cap_cancel_ids = e->n_cancel_groups = e->cap_cancel_groups = 0;
        e->pending = false;
        e->polling = false;
        bool closing = e->closing;
        pthread_mutex_unlock(&e->mu);

        while (in) {
            bg_request *nx = in->next;
            bgr_intake(e, in);
            in = nx;
        }
        while (rd) {
            bg_request *nx = rd->next;
            bgr_granted(e, rd);
            rd = nx;
        }
        for (size_t i = 0; i < n_ids; i++) {
            bg_request *r = hash_find(e, ids[i]);
            if (r && !r->cancel_req)
                bgr_cancel(e, r, BG_RES_CANCELLED);
        }
        for (size_t i = 0; i < n_groups; i++)
            cancel_all(e, BG_RES_CANCELLED, true, groups[i]);
        free(ids);
        free(groups);
        if (closing) {
            cancel_all(e, BG_RES_CLOSED, false, 0);
            if (e->live == 0)
                break;
        }

        bgr_backoff_due(e, bgh_now_ns());

        int admit_wait_ms = bgh_admit_tick(e); /* scrape when due, apply the limit */
        bgh_admit_pump(e);                     /* charge and queue the next requests */
        int running = 0;
        CURLMcode mc = curl_multi_perform(e->multi, &running);
#ifdef BG_TESTING
        pthread_mutex_lock(&e->mu);
        if (e->test_fail_multi > 0) {
            e->test_fail_multi--;
            mc = CURLM_INTERNAL_ERROR;
        }
        pthread_mutex_unlock(&e->mu);
#endif
        if (mc != CURLM_OK)
            multi_failed(e, "curl_multi_perform", mc);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(e->multi, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            if (bgh_admit_owns(e, msg->easy_handle))
                bgh_admit_scrape_done(e, msg->data.result);
            else
                bgr_transfer_done(e, msg->easy_handle, msg->data.result);
        }

        int timeout_ms = admit_wait_ms < 1000 ? admit_wait_ms : 1000;
        if (e->backoff.head) {
            int64_t d = (e->backoff.head->due_ns - bgh_now_ns() + 999999) / 1000000;
            if (d < timeout_ms)
                timeout_ms = d < 0 ? 0 : (int)d;
        }
        pthread_mutex_lock(&e->mu);
        bool pending = e->pending;
        e->polling = !pending;
        pthread_mutex_unlock(&e->mu);
        /* Work waiting (often a permit this thread just released and granted):
         * go round again at once. curl_multi_perform reads what has arrived,
         * so a zero-timeout poll of every socket would only cost a syscall. */
        if (pending)
            continue;
        mc = curl_multi_poll(e->multi, NULL, 0, timeout_ms, NULL);
        if (mc != CURLM_OK)
            multi_failed(e, "curl_multi_poll", mc);
    }
    return NULL;
}

/* ---- public API ------------------------------------------------------ */

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
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
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

int bg_engine_submit_many(bg_engine *e, bg_request **rs, size_t n)
{
    if (n == 0)
        return 0;
    /* A request still live (submitted, not finished) would be in two places
     * at once: refuse the whole call before changing anything. */
    for (size_t i = 0; i < n; i++)
        if (!bgr_legal(__atomic_load_n(&rs[i]->state, __ATOMIC_RELAXED), BGR_INBOX))
            return -1;
    int64_t t = bgh_now_ns();
    pthread_mutex_lock(&e->mu);
    if (e->closing) {
        pthread_mutex_unlock(&e->mu);
        return -1;
    }
    STAT_ADD(e, st_submitted, n); /* before the engine can complete any of them */
    for (size_t i = 0; i < n; i++) {
        (void)bgr_submitted(e, rs[i], t);
        bgh_list_push(&e->inbox, rs[i]);
    }
    bool wake = mark_pending_locked(e);
    pthread_mutex_unlock(&e->mu);
    if (wake)
        curl_multi_wakeup(e->multi);
    return 0;
}

int bg_engine_submit(bg_engine *e, bg_request *r)
{
    return bg_engine_submit_many(e, &r, 1);
}

static void push_id(bg_engine *e, uint64_t **arr, size_t *n, size_t *cap, uint64_t v)
{
    pthread_mutex_lock(&e->mu);
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 16;
        uint64_t *p = realloc(*arr, nc * sizeof(uint64_t));
        if (!p) {
            pthread_mutex_unlock(&e->mu);
            return; /* out of memory: the cancel is dropped, the request still completes */
        }
        *arr = p;
        *cap = nc;
    }
    (*arr)[(*n)++] = v;
    bool wake = mark_pending_locked(e);
    pthread_mutex_unlock(&e->mu);
    if (wake)
        curl_multi_wakeup(e->multi);
}

void bg_engine_cancel(bg_engine *e, uint64_t id)
{
    push_id(e, &e->cancel_ids, &e->n_cancel_ids, &e->cap_cancel_ids, id);
}

void bg_engine_cancel_group(bg_engine *e, uint64_t group)
{
    push_id(e, &e->cancel_groups, &e->n_cancel_groups, &e->cap_cancel_groups, group);
}

void bg_engine_close(bg_engine *e)
{
    pthread_mutex_lock(&e->close_mu);
    if (!e->closed) {
        pthread_mutex_lock(&e->mu);
        e->closing = true;
        (void)mark_pending_locked(e);
        pthread_mutex_unlock(&e->mu);
        curl_multi_wakeup(e->multi);
        if (e->thread_started)
            pthread_join(e->thread, NULL);
        e->closed = true;
    }
    pthread_mutex_unlock(&e->close_mu);
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

#ifdef BG_TESTING
uint64_t bg_engine_test_illegal(bg_engine *e)
{
    return __atomic_load_n(&e->st_illegal, __ATOMIC_RELAXED);
}

void bg_engine_test_fail_multi(bg_engine *e, int n)
{
    pthread_mutex_lock(&e->mu);
    e->test_fail_multi = n;
    bool wake = mark_pending_locked(e);
    pthread_mutex_unlock(&e->mu);
    if (wake)
        curl_multi_wakeup(e->multi);
}
#endif

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
