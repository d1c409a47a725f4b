/* bg_http.c - the engine at work: its thread and libcurl multi loop, the
 * lists and id hash, wakeups, and submit/cancel/close. Set-up and tear-down
 * are in bg_http_setup.c; what happens to a request in bg_http_request.c;
 * the curl glue of one attempt in bg_http_transfer.c. */
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

/* The round's completions are all handed over: let the consumer wake its
 * reader once for them. */
static void flush_done(bg_engine *e)
{
    if (e->unflushed) {
        e->unflushed = false;
        if (e->cfg.on_flush)
            e->cfg.on_flush(e->cfg.done_ctx);
    }
}

/* The engine goes round again at once: flush now only if a count permit
 * is free (the consumer's refill would use it), or the oldest unflushed
 * completion has waited flush_defer_us. */
static bool flush_due(bg_engine *e)
{
    int64_t defer_ns = (int64_t)e->cfg.flush_defer_us * 1000;
    return defer_ns <= 0 || bg_sem_value(e->cfg.count_sem) > 0 ||
           bgh_now_ns() - e->unflushed_since_ns >= defer_ns;
}

void *bgh_engine_main(void *arg)
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
        bg_spent spent = e->spent;
        e->spent.head = e->spent.tail = NULL;
        pthread_mutex_unlock(&e->mu);
#ifdef BG_TESTING
        for (void *m = spent.head; m; m = *(void **)m)
            STAT_ADD(e, test_spent_freed, 1);
#endif
        bg_spent_free(&spent); /* into this thread's malloc cache, for the next answers */

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
            if (e->live == 0) {
                flush_done(e);
                break;
            }
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
        if (e->unflushed) {
            pthread_mutex_lock(&e->mu);
            bool busy = e->pending;
#ifdef BG_TESTING
            busy = busy || e->test_busy;
#endif
            pthread_mutex_unlock(&e->mu);
            if (!busy || flush_due(e))
                flush_done(e);
        }
        pthread_mutex_lock(&e->mu);
        bool pending = e->pending;
#ifdef BG_TESTING
        pending = pending || e->test_busy;
#endif
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

void bg_engine_give_back(bg_engine *e, bg_spent *sp)
{
    if (!sp->head)
        return;
    pthread_mutex_lock(&e->mu);
    /* No wake-up: the engine takes them at the top of its next round. */
    if (e->spent.tail)
        *(void **)e->spent.tail = sp->head;
    else
        e->spent.head = sp->head;
    e->spent.tail = sp->tail;
    pthread_mutex_unlock(&e->mu);
    sp->head = sp->tail = NULL;
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

#ifdef BG_TESTING
uint64_t bg_engine_test_illegal(bg_engine *e)
{
    return __atomic_load_n(&e->st_illegal, __ATOMIC_RELAXED);
}

uint64_t bg_engine_test_spent_freed(bg_engine *e)
{
    return __atomic_load_n(&e->test_spent_freed, __ATOMIC_RELAXED);
}

void bg_engine_test_busy(bg_engine *e, bool on)
{
    pthread_mutex_lock(&e->mu);
    e->test_busy = on;
    bool wake = mark_pending_locked(e);
    pthread_mutex_unlock(&e->mu);
    if (wake)
        curl_multi_wakeup(e->multi);
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
