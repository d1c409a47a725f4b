/* bg_http.h - the dispatcher engine: one native thread running a libcurl multi
 * loop per engine.
 *
 * Pure C (no Python.h). Callers submit bg_request structs from any thread;
 * the engine takes permits from one or two bg_sem (count cap, token budget),
 * builds the body, sends it with keep-alive reuse, retries what is worth
 * retrying, parses the answer, and hands every request back exactly once
 * through on_done, called on the engine thread with no engine lock held.
 */
#ifndef BATCHGATE_BG_HTTP_H
#define BATCHGATE_BG_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bg_admit.h"
#include "bg_json.h"
#include "bg_sem.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bg_engine bg_engine;
typedef struct bg_request bg_request;
typedef struct bg_req_opts bg_req_opts;

/* Outcome of a request. */
enum bg_result_kind {
    BG_RES_OK = 0,
    BG_RES_HTTP,      /* final non-2xx status: status, message (server's), attempts */
    BG_RES_TRANSPORT, /* curl failure after retries: curl_code, message */
    BG_RES_TIMEOUT,   /* connect or total timeout (curl_code says which) */
    BG_RES_MALFORMED, /* 2xx but the body is not what the API promises, or too big */
    BG_RES_CANCELLED, /* bg_engine_cancel */
    BG_RES_CLOSED,    /* engine closed before the request finished */
    BG_RES_NOMEM,
};

const char *bg_result_kind_name(int kind);

struct bg_request {
    /* ---- input, set by the caller before submit, read-only afterwards ---- */
    uint64_t id;          /* caller's id; bg_engine_cancel() looks it up */
    uint64_t group;       /* caller's group (e.g. one map() call); 0 = none */
    enum bg_endpoint endpoint;
    const bg_tmpl *tmpl;  /* borrowed: must outlive the request */
    const bg_str *prompts; /* completions: borrowed until on_done */
    size_t n_prompts;
    bool prompt_as_list;  /* send "prompt": [..] even for one prompt */
    const char *messages_json; /* chat: borrowed serialized JSON array */
    size_t messages_len;
    int64_t token_weight; /* permits taken from the token sem (clamped to its cap);
                             BG_EP_TOKENIZE takes none (nor admission): count only */
    bool count_preheld;   /* the submitter already holds a count permit for this request
                             (a task inside `async with sem`): never take or release one */
    void *user;           /* caller's data, untouched */
    const bg_req_opts *opts; /* borrowed per-call options, NULL = the engine's */
    /* Closed-loop admission only (engine config `admit`): the engine charges
     * the request in KV blocks from these instead of token_weight. */
    int64_t prompt_est;   /* estimated prompt tokens, summed over the prompts */
    int64_t max_tokens;   /* per sequence; < 0: none given */

    /* ---- output, valid in on_done ---- */
    int kind;             /* enum bg_result_kind */
    long status;          /* last HTTP status, 0 if none */
    int curl_code;        /* last CURLcode, 0 if none */
    char *message;        /* owned (free with bg_request_clear): error text;
                             for BG_RES_HTTP the server's message only */
    int attempts;         /* transfers started */
    bg_resp resp;         /* BG_RES_OK: parsed choices and usage */
    int64_t tok_count;    /* BG_EP_TOKENIZE, BG_RES_OK: the server's "count" */
    int64_t tok_max_model_len; /* BG_EP_TOKENIZE: "max_model_len", -1 if absent */
    int64_t t_submit_ns, t_first_send_ns, t_done_ns; /* CLOCK_MONOTONIC */
    char *raw;            /* BG_RES_OK with opts->keep_raw: the answer's bytes, owned */
    size_t raw_len;
    /* Retries, for the caller's log (the engine thread never logs). */
    long retry_status;    /* HTTP status that caused the last retry, 0 if none */
    int retry_curl;       /* CURLcode that caused the last retry, 0 if none */
    double retry_wait_s;  /* total backoff slept */

    /* ---- private to the engine ---- */
    bg_engine *engine;
    bg_request *next, *prev; /* engine lists */
    bg_request *hnext;       /* id hash chain */
    bg_sem_waiter w_count, w_tokens;
    void *easy;              /* CURL* while in flight */
    char *body;
    size_t body_len;
    int64_t due_ns;          /* backoff deadline */
    double retry_after_s;    /* from the last response, -1 if none */
    int64_t weight_taken;
    int state;               /* enum bgr_state (bg_http_request.h) */
    bool held_count, held_tokens, cancel_req, oversize, in_hash;
    int cancel_kind;
};

/* Reset outputs and free what the engine attached (message, resp). Inputs kept. */
void bg_request_clear(bg_request *r);

/* Answers the engine thread allocated, handed back for it to free. glibc
 * serves each thread from its own malloc arena: a consumer thread freeing
 * them takes the engine's arena lock and contends with it (futex waits on
 * both sides). A list of spent blocks; zero-initialize. */
typedef struct {
    void *head, *tail;
} bg_spent;
/* As bg_request_clear, but r's packed answer (bg_resp.mem) goes to sp. */
void bg_request_clear_into(bg_request *r, bg_spent *sp);
/* Free sp's blocks here and now (no engine to give them to). */
void bg_spent_free(bg_spent *sp);

typedef void (*bg_done_fn)(bg_request *r, void *ctx);
typedef void (*bg_flush_fn)(void *ctx);

typedef struct {
    const char *base_url;   /* e.g. "http://127.0.0.1:8000/v1" */
    const char *tokenize_url; /* NULL: the server root of base_url (a trailing /v1
                                 dropped) + "/tokenize", where vLLM serves it */
    const char *api_key;    /* NULL: no Authorization header */
    const char *const *headers; /* "Name: value" lines */
    size_t n_headers;
    long connect_timeout_ms; /* 0 = libcurl default */
    long timeout_ms;         /* per attempt, 0 = none */
    int max_retries;         /* retries after the first attempt */
    bool verify_tls;
    bool retry_timeouts;     /* treat timeouts like transport failures */
    size_t max_response_bytes; /* 0 = unlimited */
    double backoff_base_s;   /* first retry delay (before jitter) */
    double backoff_max_s;
    double retry_after_max_s; /* cap for Retry-After */
    long max_connections;    /* 0 = no extra cap beyond the semaphores */
    bg_sem *count_sem;       /* required: one permit per request in flight */
    bg_sem *token_sem;       /* optional: token_weight permits */
    int64_t token_cap;       /* token_sem's capacity; weights are clamped to it */
    bg_done_fn on_done;
    /* Optional: called with done_ctx on the engine thread (no engine lock
     * held) after a round of on_done calls (see flush_defer_us), always
     * before the engine sleeps, so a consumer can queue completions in
     * on_done and wake its reader once per round instead of once per
     * request. */
    bg_flush_fn on_flush;
    /* A busy engine (going round again at once, every count permit in use,
     * so no refill is waited for) calls on_flush at most this long after
     * the first completion it covers, not every round: fewer, larger
     * hand-offs to a consumer that must wake for each. Before sleeping, or
     * with a count permit free, it flushes at once. 0: every round. */
    long flush_defer_us;
    void *done_ctx;
    /* Closed-loop admission (bg_http_admit.c). With `admit`, the engine
     * scrapes metrics_url every metrics_interval_ms from its own thread,
     * feeds the controller, charges requests in KV blocks and sets
     * token_sem's capacity (max_value = the KV size in blocks) to the
     * controller's limit. The engine owns `admit` from bg_engine_create on
     * (also when that fails). */
    bg_admit *admit;
    const char *metrics_url;
    const char *metrics_model; /* model_name label filter, NULL: every series */
    long metrics_interval_ms;  /* <= 0: 200 */
} bg_engine_config;

void bg_engine_config_defaults(bg_engine_config *c);

/* Creates the engine and starts its thread. NULL with err on failure. The
 * engine takes a reference on each semaphore. curl_global_init must have run. */
bg_engine *bg_engine_create(const bg_engine_config *cfg, char *err, size_t errlen);

/* Queue requests (FIFO). Returns 0, or -1 if the engine is closing or one of
 * the requests is still live (submitted and not yet handed back): then no
 * request was taken and on_done will not be called for them. A finished
 * request may be submitted again (to this or another engine). */
int bg_engine_submit(bg_engine *e, bg_request *r);
int bg_engine_submit_many(bg_engine *e, bg_request **rs, size_t n);

/* Ask the engine to cancel a request (by id) or every request of a group.
 * Asynchronous: the request completes with BG_RES_CANCELLED (unless it
 * already finished). Unknown ids are ignored. */
void bg_engine_cancel(bg_engine *e, uint64_t id);
void bg_engine_cancel_group(bg_engine *e, uint64_t group);

/* Any thread: the engine frees sp's blocks on its own thread in its next
 * round (it is not woken for them); sp is left empty. */
void bg_engine_give_back(bg_engine *e, bg_spent *sp);

/* Stop: every unfinished request completes with BG_RES_CLOSED (in-flight ones
 * are aborted), then the thread is joined. Idempotent; must not be called
 * from on_done. */
void bg_engine_close(bg_engine *e);

/* Close (if needed) and free. */
void bg_engine_destroy(bg_engine *e);

/* ---- per-call options ----
 * What openai-python lets a call override: its attempt timeout, retries,
 * extra headers (replacing the engine's of the same name) and query, plus
 * keeping the answer's bytes. Built once per distinct set on the caller's
 * thread; immutable afterwards, so any number of requests may point at it.
 * It must outlive every request using it. */
typedef struct {
    long timeout_ms;    /* per attempt; -1 = the engine's, 0 = none */
    int max_retries;    /* -1 = the engine's */
    const char *const *headers; /* "Name: value" lines (no CR/LF) */
    size_t n_headers;
    const char *query;  /* appended after '?' (already encoded), NULL = none */
    bool keep_raw;      /* hand the answer's bytes back in bg_request.raw */
} bg_req_opts_spec;

bg_req_opts *bg_req_opts_new(const bg_engine *e, const bg_req_opts_spec *spec, char *err,
                             size_t errlen);
void bg_req_opts_free(bg_req_opts *o);

typedef struct {
    uint64_t submitted, completed, attempts, retries;
    uint64_t live;          /* submitted - completed */
    uint64_t in_flight;     /* transfers running now */
    uint64_t max_in_flight; /* most transfers ever running at once */
} bg_engine_stats;
void bg_engine_get_stats(bg_engine *e, bg_engine_stats *out);

#ifdef BG_TESTING
/* Fault injection for the C tests: the next n curl_multi_perform calls
 * report CURLM_INTERNAL_ERROR. */
void bg_engine_test_fail_multi(bg_engine *e, int n);
/* Refused state moves and stray events so far (0 unless the engine has a bug). */
uint64_t bg_engine_test_illegal(bg_engine *e);
/* Given-back blocks the engine thread has freed so far (not counting destroy). */
uint64_t bg_engine_test_spent_freed(bg_engine *e);
/* on: every round ends as if work were waiting (the engine never sleeps). */
void bg_engine_test_busy(bg_engine *e, bool on);
#endif

/* ---- closed-loop admission (bg_http_admit.c) ---- */

typedef struct {
    bg_admit_stats ctl;      /* the controller's view */
    uint64_t scrapes_ok, scrapes_failed;
    int64_t held_blocks;     /* charged to requests in flight now */
    char last_error[160];    /* last scrape failure, "" if none */
} bg_engine_admit_info;

/* false if the engine runs without admission. Any thread. */
bool bg_engine_admit_info_get(bg_engine *e, bg_engine_admit_info *out);
/* Pop the controller's recorded limit moves (any thread). */
size_t bg_engine_admit_events(bg_engine *e, bg_admit_event *out, size_t n);

/* What a server says about itself, read once before a run (blocking; call
 * without the GIL). */
typedef struct {
    bg_prom_sample metrics;  /* from metrics_url */
    int64_t max_model_len;   /* from models_url, -1 if unknown */
    char model_id[256];      /* the /v1/models entry used, "" if none */
} bg_server_probe;

/* 0 if metrics_url answered with vLLM metrics including the KV gauge and
 * cache_config_info; -1 with a reason in err otherwise (out is still
 * filled with what was found). models_url may be NULL. */
int bg_probe_server(const char *metrics_url, const char *models_url, const char *api_key,
                    const char *const *headers, size_t n_headers, bool verify_tls,
                    long timeout_ms, const char *model, bg_server_probe *out, char *err,
                    size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_HTTP_H */
