/* bg_http_request.h - the one state machine of a request, private to the
 * engine. bg_http_request.c is the only writer of bg_request.state: every
 * change goes through bgr_move, which refuses a move the table below does
 * not allow. The rest of the engine reports events (a grant arrived, a
 * transfer ended, a cancel was asked, a retry is due); the curl glue in
 * bg_http_transfer.c changes no state at all.
 *
 *   IDLE/DONE --submit--> INBOX --intake--> (WAIT_ADMIT) -> (WAIT_TOKENS)
 *     -> (WAIT_COUNT) -> FLIGHT -> DONE, or FLIGHT -> BACKOFF -> (WAIT_ADMIT
 *     | WAIT_TOKENS | WAIT_COUNT | FLIGHT); any live state -> DONE (cancel,
 *     close, errors). A wait state is entered only when the request really
 *     waits (a permit granted at once skips it). DONE is terminal until the
 *     caller submits the request again.
 */
#ifndef BATCHGATE_BG_HTTP_REQUEST_H
#define BATCHGATE_BG_HTTP_REQUEST_H

#include <stdbool.h>
#include <stdint.h>

#include <curl/curl.h>

typedef struct bg_engine bg_engine;
typedef struct bg_request bg_request;

enum bgr_state {
    BGR_IDLE = 0,    /* never submitted (a zeroed request) */
    BGR_INBOX,       /* submitted, not yet seen by the engine thread */
    BGR_WAIT_ADMIT,  /* in the admission queue, not yet charged (bg_http_admit.c) */
    BGR_WAIT_TOKENS, /* queued on the token semaphore */
    BGR_WAIT_COUNT,  /* queued on the count semaphore */
    BGR_FLIGHT,      /* a transfer is running */
    BGR_BACKOFF,     /* waiting to retry, no permits held */
    BGR_DONE,        /* handed back through on_done; kind says how it ended */
    BGR_N_STATES
};

const char *bgr_state_name(int state);
/* Whether the table allows from -> to. */
bool bgr_legal(int from, int to);
/* The only writer of r->state. An illegal move leaves the state as it is,
 * is counted on e (may be NULL) and returns -1. */
int bgr_move(bg_engine *e, bg_request *r, int to);

/* ---- events (engine thread unless noted) -------------------------------
 * Each may finish the request, which may free it in on_done: the caller
 * touches nothing of r afterwards. */

/* Submitting thread, under the engine's inbox lock: IDLE or DONE -> INBOX,
 * outputs reset. -1 (nothing changed) if r is still live. */
int bgr_submitted(bg_engine *e, bg_request *r, int64_t now_ns);
/* The engine thread took r from the inbox. */
void bgr_intake(bg_engine *e, bg_request *r);
/* A queued permit was granted (r came through the ready list). */
void bgr_granted(bg_engine *e, bg_request *r);
/* The admission queue's head was charged `weight` blocks and goes on. */
void bgr_admitted(bg_engine *e, bg_request *r, int64_t weight);
/* Requests whose backoff ended by now_ns go on. */
void bgr_backoff_due(bg_engine *e, int64_t now_ns);
/* A transfer of the engine's multi handle ended with `code`. */
void bgr_transfer_done(bg_engine *e, CURL *h, CURLcode code);
/* End r with `kind` (cancelled, closed, a multi failure), wherever it is. A
 * request whose permit grant is already on its way is marked and ends when
 * the grant arrives. */
void bgr_cancel(bg_engine *e, bg_request *r, int kind);

#endif /* BATCHGATE_BG_HTTP_REQUEST_H */
