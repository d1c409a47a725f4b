/* bg_http_internal.h - private to the engine's files: bg_http.c (engine
 * thread, lists, public API), bg_http_request.c (the request state machine),
 * bg_http_transfer.c (curl glue for one HTTP attempt: easy handles, answers,
 * retry policy) and bg_http_admit.c (closed-loop admission). Everything here
 * runs on the engine thread unless noted. */
#ifndef BATCHGATE_BG_HTTP_INTERNAL_H
#define BATCHGATE_BG_HTTP_INTERNAL_H

#include "bg_http.h"
#include "bg_http_request.h"

#include <curl/curl.h>
#include <pthread.h>
#include <time.h>

typedef struct bg_easy {
    CURL *h;
    struct bg_easy *next;
    bg_request *req; /* carried now; the handle's PRIVATE and callback data is the bg_easy */
    /* Options as last set on h, to skip unchanged ones (CURLOPT_URL copies
     * the string each time). Only the engine's own URL and header list are
     * remembered: a per-call bg_req_opts may be freed and its address reused. */
    const char *set_url;
    const struct curl_slist *set_headers;
    long set_timeout_ms;
    char errbuf[CURL_ERROR_SIZE];
    /* Response body, reused by the handle's next transfers (no malloc per
     * request); freed when a big answer left it large. */
    char *buf;
    size_t len, cap;
} bg_easy;

/* Pooled handles keep at most this much body buffer between transfers. */
#define BG_EASY_KEEP_BYTES (1u << 20)

typedef struct {
    bg_request *head, *tail;
} req_list;

/* Doubly linked FIFO of requests (engine thread only); bg_http.c. */
void bgh_list_push(req_list *l, bg_request *r);
void bgh_list_unlink(req_list *l, bg_request *r);

struct bg_req_opts {
    long timeout_ms;
    int max_retries;
    bool keep_raw;
    struct curl_slist *headers;       /* engine's merged with the call's, or NULL */
    char *url_completions, *url_chat, *url_tokenize; /* with the query, or NULL */
};

/* A response body with a size bound (bg_http_admit.c). */
typedef struct {
    char *data;
    size_t len, cap;
    bool oversize;
} bgh_buf;

struct bg_engine {
    bg_engine_config cfg; /* string fields point into owned copies below */
    char *base_url, *api_key;
    char *url_completions, *url_chat, *url_tokenize;
    struct curl_slist *headers;
    bool no_env_proxy; /* no proxy variable was set at creation (bg_http_setup.c) */
    CURLM *multi;
    pthread_t thread;
    bool thread_started;
    bool closed; /* bg_engine_close has joined */
    pthread_mutex_t close_mu;

    /* Shared with submitters and grant callbacks, under mu. */
    pthread_mutex_t mu;
    req_list inbox, ready;
    uint64_t *cancel_ids, *cancel_groups;
    size_t n_cancel_ids, cap_cancel_ids, n_cancel_groups, cap_cancel_groups;
    bool pending; /* something above is waiting: a wakeup is already on its way */
    bool polling; /* the engine may be asleep in curl_multi_poll: wake it */
    bool closing;
    bg_spent spent; /* blocks given back, freed by the engine thread */

    /* Engine thread only. */
    bg_request **buckets;
    size_t n_buckets, live;
    bool unflushed;   /* on_done ran since the last on_flush */
    int64_t unflushed_since_ns; /* when the first of them ran */
    req_list backoff; /* sorted by due_ns */
    bg_easy *easy_pool;
    uint64_t rng;

    /* Closed-loop admission (bg_http_admit.c), unused without cfg.admit.
     * admit_mu guards the controller and the counters for other threads;
     * never held while calling into a semaphore. */
    pthread_mutex_t admit_mu;
    bool admit_mu_init;
    req_list admit_queue;       /* engine thread: FIFO of BGR_WAIT_ADMIT requests */
    bg_request *admit_waiting;  /* engine thread: the one queued on token_sem */
    char *metrics_url, *metrics_model;
    CURL *scrape;
    char scrape_errbuf[CURL_ERROR_SIZE];
    bgh_buf scrape_body;
    bool scrape_busy;
    int64_t next_scrape_ns, applied_cap;
    uint64_t scrapes_ok, scrapes_failed;
    char scrape_last_error[160];

    /* Statistics (atomic). */
    uint64_t st_submitted, st_completed, st_attempts, st_retries, st_in_flight;
    uint64_t st_max_in_flight; /* written by the engine thread only */
    uint64_t st_illegal;       /* refused state moves and stray events: a bug if not 0 */
#ifdef BG_TESTING
    int test_fail_multi; /* next n curl_multi_perform calls "fail" (under mu) */
    uint64_t test_spent_freed; /* atomic */
    bool test_busy; /* every round ends as if work were waiting (under mu) */
#endif
};

#define STAT_ADD(e, field, v) __atomic_add_fetch(&(e)->field, (v), __ATOMIC_RELAXED)

static inline int64_t bgh_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* bg_http.c */
void *bgh_engine_main(void *arg); /* the engine thread (started by bg_http_setup.c) */
void bgh_backoff_insert(req_list *l, bg_request *r);
void bgh_hash_insert(bg_engine *e, bg_request *r);
void bgh_hash_remove(bg_engine *e, bg_request *r);
/* A semaphore granted a queued request (any thread, under the semaphore's
 * lock): queue it on the ready list for bgr_granted. */
void bgh_on_grant(bg_sem_waiter *w);
void bgh_set_message(bg_request *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* bg_http_admit.c (engine thread unless noted) */
int bgh_admit_init(bg_engine *e, char *err, size_t errlen); /* creating thread */
void bgh_admit_cleanup(bg_engine *e);                       /* after the thread ended */
/* Requests enter the token semaphore one at a time, charged when they reach
 * the head, so the charge uses what was learned while they waited. */
void bgh_admit_enqueue(bg_engine *e, bg_request *r);
void bgh_admit_unqueue(bg_engine *e, bg_request *r);
void bgh_admit_pump(bg_engine *e);
/* Start a scrape when due, apply the limit; returns ms until the next scrape. */
int bgh_admit_tick(bg_engine *e);
bool bgh_admit_owns(const bg_engine *e, CURL *h);
void bgh_admit_scrape_done(bg_engine *e, CURLcode code);
void bgh_admit_finished(bg_engine *e, const bg_request *r, int kind);
void bgh_admit_overload(bg_engine *e);

/* bg_http_transfer.c */
/* Options of a request: its own, else the engine's. */
static inline long bgh_timeout_ms(const bg_engine *e, const bg_request *r)
{
    return r->opts && r->opts->timeout_ms >= 0 ? r->opts->timeout_ms : e->cfg.timeout_ms;
}
static inline int bgh_max_retries(const bg_engine *e, const bg_request *r)
{
    return r->opts && r->opts->max_retries >= 0 ? r->opts->max_retries : e->cfg.max_retries;
}
/* The curl glue reports; it changes no request state. */
void bgh_easy_put(bg_engine *e, bg_easy *x);
/* Build the body if needed, take a pooled handle, set its options and add it
 * to the multi. BG_RES_OK, or the kind to end with (message set). */
int bgh_transfer_begin(bg_engine *e, bg_request *r);
/* Take the ended transfer out of the multi: its request (status and
 * curl_code recorded) and its handle (the answer still in its buffer). */
bg_easy *bgh_transfer_detach(bg_engine *e, CURL *h, CURLcode code, bg_request **out);
/* Abort a running transfer (cancel, close): handle back to the pool. */
void bgh_transfer_abort(bg_engine *e, bg_request *r);
enum bgh_verdict {
    BGH_ANSWER, /* a 2xx answer to read with bgh_read_answer */
    BGH_RETRY,  /* worth another attempt */
    BGH_FINAL,  /* ends with *kind (message set) */
};
enum bgh_verdict bgh_judge(bg_engine *e, bg_request *r, const bg_easy *x, CURLcode code,
                           int *kind);
/* Parse a 2xx answer into r; the kind it ends with (message set if not OK). */
int bgh_read_answer(bg_engine *e, bg_request *r, bg_easy *x);
/* Seconds to wait before the next attempt (Retry-After, else jittered backoff). */
double bgh_retry_delay(bg_engine *e, bg_request *r);

#endif /* BATCHGATE_BG_HTTP_INTERNAL_H */
