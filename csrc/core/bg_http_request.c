/* bg_http_request.c - a request's life in the engine: the state table and
 * the only code that moves a request between states (permits, admission,
 * transfer, backoff, completion). See bg_http_request.h. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup */
#endif
#include "bg_http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the table ---------------------------------------------------------- */

#define B(s) (1u << (s))
/* For each target state, the states it may be entered from. */
static const unsigned legal_from[BGR_N_STATES] = {
    [BGR_IDLE] = 0,
    [BGR_INBOX] = B(BGR_IDLE) | B(BGR_DONE),
    [BGR_WAIT_ADMIT] = B(BGR_INBOX) | B(BGR_BACKOFF),
    [BGR_WAIT_TOKENS] = B(BGR_INBOX) | B(BGR_WAIT_ADMIT) | B(BGR_BACKOFF),
    [BGR_WAIT_COUNT] = B(BGR_INBOX) | B(BGR_WAIT_ADMIT) | B(BGR_BACKOFF) | B(BGR_WAIT_TOKENS),
    [BGR_FLIGHT] = B(BGR_INBOX) | B(BGR_WAIT_ADMIT) | B(BGR_BACKOFF) | B(BGR_WAIT_TOKENS) |
                   B(BGR_WAIT_COUNT),
    [BGR_BACKOFF] = B(BGR_FLIGHT),
    [BGR_DONE] = B(BGR_INBOX) | B(BGR_WAIT_ADMIT) | B(BGR_WAIT_TOKENS) | B(BGR_WAIT_COUNT) |
                 B(BGR_FLIGHT) | B(BGR_BACKOFF),
};
#undef B

const char *bgr_state_name(int s)
{
    static const char *const names[BGR_N_STATES] = {
        "idle", "inbox", "wait_admit", "wait_tokens", "wait_count", "flight", "backoff", "done",
    };
    return s >= 0 && s < BGR_N_STATES ? names[s] : "?";
}

bool bgr_legal(int from, int to)
{
    if (from < 0 || from >= BGR_N_STATES || to < 0 || to >= BGR_N_STATES)
        return false;
    return (legal_from[to] >> from) & 1u;
}

int bgr_move(bg_engine *e, bg_request *r, int to)
{
    if (!bgr_legal(r->state, to)) {
        if (e)
            STAT_ADD(e, st_illegal, 1);
        return -1;
    }
    /* Atomic only for bg_engine_submit_many's check of a request submitted
     * twice by mistake; nothing else reads it off the engine thread. */
    __atomic_store_n(&r->state, to, __ATOMIC_RELAXED);
    return 0;
}

/* ---- permits and completion --------------------------------------------- */

static void release_permits(bg_engine *e, bg_request *r)
{
    if (r->held_count) {
        r->held_count = false;
        bg_sem_release(e->cfg.count_sem, 1);
    }
    if (r->held_tokens) {
        r->held_tokens = false;
        bg_sem_release(e->cfg.token_sem, r->weight_taken);
    }
}

/* Hand the request back, once: a second finish is refused by the table. */
static void finish(bg_engine *e, bg_request *r, int kind)
{
    if (bgr_move(e, r, BGR_DONE) < 0)
        return;
    release_permits(e, r);
    bgh_hash_remove(e, r);
    if (e->admit_waiting == r)
        e->admit_waiting = NULL;
    if (kind != BG_RES_OK)
        bg_resp_free(&r->resp);
    r->kind = kind;
    free(r->body);
    r->body = NULL;
    r->t_done_ns = bgh_now_ns();
    STAT_ADD(e, st_completed, 1);
    bgh_admit_finished(e, r, kind); /* learns from usage; no-op without admission */
    if (!e->unflushed)
        e->unflushed_since_ns = r->t_done_ns;
    e->unflushed = true;
    e->cfg.on_done(r, e->cfg.done_ctx);
}

static void start(bg_engine *e, bg_request *r)
{
    int kind = bgh_transfer_begin(e, r);
    if (kind != BG_RES_OK) {
        finish(e, r, kind);
        return;
    }
    (void)bgr_move(e, r, BGR_FLIGHT);
}

/* Take the permits the request still lacks; start it once it has all. Tokens
 * first: the shared count cap is not held while waiting for the budget. */
static void advance(bg_engine *e, bg_request *r)
{
    if (!bgr_legal(r->state, BGR_FLIGHT)) {
        STAT_ADD(e, st_illegal, 1); /* finished or running already: nothing to take */
        return;
    }
    if (r->cancel_req) {
        finish(e, r, r->cancel_kind);
        return;
    }
    if (e->cfg.token_sem && !r->held_tokens && r->endpoint != BG_EP_TOKENIZE) {
        bg_sem_waiter_init(&r->w_tokens, r->weight_taken, bgh_on_grant, r);
        int rc = bg_sem_acquire_async(e->cfg.token_sem, &r->w_tokens);
        if (rc == 0) {
            /* The grant comes through the ready list, which only this
             * thread drains: setting the state after queueing is safe. */
            (void)bgr_move(e, r, BGR_WAIT_TOKENS);
            return;
        }
        if (rc < 0) {
            bgh_set_message(r, "invalid token weight %lld", (long long)r->weight_taken);
            finish(e, r, BG_RES_NOMEM);
            return;
        }
        r->held_tokens = true;
        if (e->admit_waiting == r)
            e->admit_waiting = NULL; /* granted at once: the admission queue moves on */
    }
    if (!r->held_count && !r->count_preheld) {
        bg_sem_waiter_init(&r->w_count, 1, bgh_on_grant, r);
        int rc = bg_sem_acquire_async(e->cfg.count_sem, &r->w_count);
        if (rc == 0) {
            (void)bgr_move(e, r, BGR_WAIT_COUNT);
            return;
        }
        if (rc < 0) {
            bgh_set_message(r, "the count semaphore cannot grant a permit (max_value < 1)");
            finish(e, r, BG_RES_NOMEM);
            return;
        }
        r->held_count = true;
    }
    start(e, r);
}

/* ---- events ---------------------------------------------------------------- */

int bgr_submitted(bg_engine *e, bg_request *r, int64_t now_ns)
{
    if (bgr_move(e, r, BGR_INBOX) < 0)
        return -1;
    r->engine = e;
    r->kind = BG_RES_OK;
    r->status = 0;
    r->curl_code = 0;
    r->message = NULL;
    r->attempts = 0;
    memset(&r->resp, 0, sizeof(r->resp));
    r->t_submit_ns = now_ns;
    r->t_first_send_ns = r->t_done_ns = 0;
    r->easy = NULL;
    r->body = NULL;
    r->tok_count = r->tok_max_model_len = -1;
    r->held_count = r->held_tokens = r->cancel_req = r->oversize = r->in_hash = false;
    r->hnext = NULL;
    return 0;
}

static void wait_admission(bg_engine *e, bg_request *r)
{
    if (bgr_move(e, r, BGR_WAIT_ADMIT) == 0)
        bgh_admit_enqueue(e, r); /* charged when it reaches the head */
}

void bgr_intake(bg_engine *e, bg_request *r)
{
    bgh_hash_insert(e, r);
    int64_t w = r->token_weight < 1 ? 1 : r->token_weight;
    int64_t cap = e->cfg.token_cap;
    if (e->cfg.token_sem && cap <= 0)
        cap = bg_sem_max_value(e->cfg.token_sem);
    if (cap > 0 && w > cap)
        w = cap; /* bigger than the budget: runs alone instead of never */
    r->weight_taken = w;
    if (e->cfg.admit && r->endpoint != BG_EP_TOKENIZE)
        wait_admission(e, r);
    else
        advance(e, r);
}

void bgr_granted(bg_engine *e, bg_request *r)
{
    if (r->state == BGR_WAIT_TOKENS) {
        r->held_tokens = true;
    } else if (r->state == BGR_WAIT_COUNT) {
        r->held_count = true;
    } else {
        STAT_ADD(e, st_illegal, 1); /* a grant for a request that waits for none */
        return;
    }
    if (e->admit_waiting == r)
        e->admit_waiting = NULL; /* the admission queue moves on */
    advance(e, r);
}

void bgr_admitted(bg_engine *e, bg_request *r, int64_t weight)
{
    r->weight_taken = weight;
    /* Cleared when it gets its blocks (at once in advance, or later in
     * bgr_granted) or finishes. */
    e->admit_waiting = r;
    advance(e, r);
}

void bgr_backoff_due(bg_engine *e, int64_t now_ns)
{
    while (e->backoff.head && e->backoff.head->due_ns <= now_ns) {
        bg_request *r = e->backoff.head;
        bgh_list_unlink(&e->backoff, r);
        if (e->cfg.admit && !r->cancel_req && r->endpoint != BG_EP_TOKENIZE)
            wait_admission(e, r); /* a retry is charged again, at the head */
        else
            advance(e, r);
    }
}

static void schedule_retry(bg_engine *e, bg_request *r)
{
    if (bgr_move(e, r, BGR_BACKOFF) < 0)
        return;
    release_permits(e, r);
    double d = bgh_retry_delay(e, r);
    r->due_ns = bgh_now_ns() + (int64_t)(d * 1e9);
    r->retry_status = r->status;
    r->retry_curl = r->curl_code;
    r->retry_wait_s += d;
    bgh_backoff_insert(&e->backoff, r);
    STAT_ADD(e, st_retries, 1);
}

void bgr_transfer_done(bg_engine *e, CURL *h, CURLcode code)
{
    bg_request *r;
    bg_easy *x = bgh_transfer_detach(e, h, code, &r);
    if (r->state != BGR_FLIGHT) {
        /* Not ours to judge (cannot happen: a transfer ends only in flight). */
        STAT_ADD(e, st_illegal, 1);
        bgh_easy_put(e, x);
        return;
    }
    if (code == CURLE_OK && (r->status == 429 || r->status == 503))
        bgh_admit_overload(e); /* the server's queue limits: admission backs off */
    int kind = BG_RES_OK;
    switch (bgh_judge(e, r, x, code, &kind)) {
    case BGH_ANSWER:
        /* Permits go back before parsing so the next request starts meanwhile. */
        release_permits(e, r);
        kind = bgh_read_answer(e, r, x);
        bgh_easy_put(e, x);
        finish(e, r, kind);
        break;
    case BGH_RETRY:
        bgh_easy_put(e, x);
        schedule_retry(e, r);
        break;
    default:
        bgh_easy_put(e, x);
        finish(e, r, kind);
        break;
    }
}

void bgr_cancel(bg_engine *e, bg_request *r, int kind)
{
    switch (r->state) {
    case BGR_WAIT_TOKENS:
    case BGR_WAIT_COUNT: {
        bool tok = r->state == BGR_WAIT_TOKENS;
        if (bg_sem_cancel(tok ? e->cfg.token_sem : e->cfg.count_sem,
                          tok ? &r->w_tokens : &r->w_count) == 1) {
            finish(e, r, kind);
        } else {
            /* Granted already: it sits in the ready list; bgr_granted ends it. */
            r->cancel_req = true;
            r->cancel_kind = kind;
        }
        break;
    }
    case BGR_FLIGHT:
        bgh_transfer_abort(e, r);
        finish(e, r, kind);
        break;
    case BGR_BACKOFF:
        bgh_list_unlink(&e->backoff, r);
        finish(e, r, kind);
        break;
    case BGR_WAIT_ADMIT:
        bgh_admit_unqueue(e, r);
        finish(e, r, kind);
        break;
    default:
        break; /* INBOX is taken in before cancels are read; DONE is not live */
    }
}
