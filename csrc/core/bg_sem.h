/* bg_sem.h - native counting semaphore core: FIFO, weighted, thread-safe.
 *
 * Pure C (no Python.h). This one counter is shared by the Python-level
 * batchgate.Semaphore (asyncio waiters, blocking thread waiters) and the
 * dispatcher's engine thread, so a single object caps Python and native work
 * together.
 *
 * Rules every user relies on:
 *  - FIFO: a request is granted only when every earlier queued waiter has been
 *    granted, even if the newcomer asks for fewer permits (no starvation of a
 *    large request at the head).
 *  - A grant is final: permits granted to a waiter belong to its owner, who
 *    either keeps them or gives them back with bg_sem_release().
 *  - Grant callbacks run with the semaphore's internal lock held. They must not
 *    block, must not call back into this semaphore and must never take the
 *    GIL. Typical callback: push onto a native completion queue and write a
 *    wakeup fd, or curl_multi_wakeup().
 */
#ifndef BATCHGATE_BG_SEM_H
#define BATCHGATE_BG_SEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bg_sem bg_sem;
typedef struct bg_sem_waiter bg_sem_waiter;

typedef void (*bg_sem_grant_fn)(bg_sem_waiter *w);

enum bg_sem_waiter_state {
    BG_SEM_W_IDLE = 0, /* not queued (new, granted-and-consumed, or cancelled) */
    BG_SEM_W_QUEUED,   /* waiting in the FIFO */
    BG_SEM_W_GRANTED,  /* permits handed over; on_grant has run */
};

/* Caller-owned waiter node; lives until it is granted or cancelled. */
struct bg_sem_waiter {
    bg_sem_waiter *prev, *next; /* private to bg_sem */
    int64_t n;                  /* permits requested, >= 1 */
    int state;                  /* enum bg_sem_waiter_state; read under bg_sem */
    bg_sem_grant_fn on_grant;   /* may be NULL */
    void *ctx;                  /* owner's data */
};

/* max_value < 0: unbounded (release may raise the count up to INT64_MAX).
 * Fork: a child gets each semaphore's count as it was at fork() and a usable
 * lock; waiters queued by other threads are forgotten in the child. */
bg_sem *bg_sem_create(int64_t value, int64_t max_value);
void bg_sem_incref(bg_sem *s);
void bg_sem_decref(bg_sem *s);

static inline void bg_sem_waiter_init(bg_sem_waiter *w, int64_t n,
                                      bg_sem_grant_fn on_grant, void *ctx)
{
    w->prev = w->next = NULL;
    w->n = n;
    w->state = BG_SEM_W_IDLE;
    w->on_grant = on_grant;
    w->ctx = ctx;
}

/* Snapshot readers (values may change right after they return). */
int64_t bg_sem_value(bg_sem *s);
size_t bg_sem_queued(bg_sem *s);
/* max_value given at creation (< 0: unbounded). */
int64_t bg_sem_max_value(bg_sem *s);
/* True when an acquire of n would have to wait: a waiter is queued or value < n. */
bool bg_sem_would_block(bg_sem *s, int64_t n);

/* Take n permits now if possible (value >= n and nobody queued). */
bool bg_sem_try_acquire(bg_sem *s, int64_t n);

/* Take n = w->n permits or queue w. Returns 1 if granted at once (on_grant is
 * NOT called, state becomes IDLE), 0 if queued (on_grant is called later from
 * whichever thread releases), -1 if n is invalid (n < 1, or n > max_value on a
 * bounded semaphore: such a request could never be granted). */
int bg_sem_acquire_async(bg_sem *s, bg_sem_waiter *w);

/* Withdraw a waiter. Returns 1 if it was still queued (removed, nothing owed),
 * 0 if it had already been granted (caller now owns w->n permits and must
 * release them, which hands them on to the next waiter). Waking the queue
 * after a removal is done here: removing a large head waiter may unblock
 * smaller ones behind it. Either way the waiter ends IDLE; cancelling an IDLE
 * waiter (never queued, or already cancelled) returns -1 and changes nothing. */
int bg_sem_cancel(bg_sem *s, bg_sem_waiter *w);

/* Blocking acquire for plain threads, FIFO with all other waiters.
 * timeout_ns < 0 waits forever. Returns 1 acquired, 0 timed out, -1 if n is
 * invalid (as for bg_sem_acquire_async). Never call with the GIL held. */
int bg_sem_acquire_blocking(bg_sem *s, int64_t n, int64_t timeout_ns);

/* Give back n permits and grant queued waiters in FIFO order.
 * Returns 0, or -1 if the release would pass the capacity (max_value unless
 * changed with bg_sem_set_capacity; nothing changed), or INT64_MAX on an
 * unbounded semaphore (nothing changed). */
int bg_sem_release(bg_sem *s, int64_t n);

/* Adjustable capacity, for limits that move at run time (closed-loop
 * admission). Bounded semaphores only; 0 <= capacity <= max_value, which
 * stays the validity bound for requests. Raising it grants queued waiters at
 * once (FIFO); lowering it below what is held makes the value negative, and
 * nobody is granted until releases bring it back. While capacity is lowered,
 * a request above it (but within max_value) is granted alone once nothing is
 * held, so it is delayed, never stuck; capacity 0 grants nothing.
 * Returns 0, or -1 if the semaphore is unbounded or capacity out of range. */
int bg_sem_set_capacity(bg_sem *s, int64_t capacity);
int64_t bg_sem_capacity(bg_sem *s);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_SEM_H */
