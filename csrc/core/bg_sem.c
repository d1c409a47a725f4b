/* bg_sem.c - native counting semaphore core (see bg_sem.h for the contract).
 *
 * One mutex guards the count and an intrusive doubly linked FIFO of waiters.
 * Grants happen only at the head of the FIFO, so a large request at the head
 * holds back smaller ones behind it (no starvation). Blocking thread waiters
 * are ordinary queue entries whose grant callback signals their own condvar.
 */
#define _POSIX_C_SOURCE 200809L
#include "bg_sem.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

struct bg_sem {
    pthread_mutex_t mu;
    bg_sem *all_prev, *all_next; /* every live semaphore, for fork() */
    atomic_long refcnt;
    int64_t value;     /* free permits */
    int64_t max_value; /* < 0: unbounded */
    int64_t capacity;  /* adjustable bound (bg_sem_set_capacity), <= max_value;
                          == max_value unless changed; value may go negative */
    bg_sem_waiter *head, *tail;
    size_t nqueued;
};

/* ---- fork safety ----
 * Every semaphore is on one list. Before fork() all their locks are taken (no
 * thread ever holds two of them, so any order is deadlock-free), so the child
 * gets consistent counts and locks it can use. The child then forgets every
 * queued waiter: they belong to threads and engines that do not exist there
 * (their permits are not owed to anyone in the child). */
static pthread_mutex_t all_mu = PTHREAD_MUTEX_INITIALIZER;
static bg_sem *all_head;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void)
{
    pthread_mutex_lock(&all_mu);
    for (bg_sem *s = all_head; s; s = s->all_next)
        pthread_mutex_lock(&s->mu);
}

static void fork_parent(void)
{
    for (bg_sem *s = all_head; s; s = s->all_next)
        pthread_mutex_unlock(&s->mu);
    pthread_mutex_unlock(&all_mu);
}

static void fork_child(void)
{
    for (bg_sem *s = all_head; s; s = s->all_next) {
        bg_sem_waiter *w = s->head;
        while (w) {
            bg_sem_waiter *nx = w->next;
            w->prev = w->next = NULL;
            w->state = BG_SEM_W_IDLE;
            w = nx;
        }
        s->head = s->tail = NULL;
        s->nqueued = 0;
        pthread_mutex_unlock(&s->mu);
    }
    pthread_mutex_unlock(&all_mu);
}

static void fork_register(void)
{
    (void)pthread_atfork(fork_prepare, fork_parent, fork_child);
}

static bool fits_locked(const bg_sem *s, int64_t n);

bg_sem *bg_sem_create(int64_t value, int64_t max_value)
{
    if (value < 0 || (max_value >= 0 && value > max_value)) {
        errno = EINVAL;
        return NULL;
    }
    bg_sem *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    int rc = pthread_mutex_init(&s->mu, NULL);
    if (rc != 0) {
        free(s);
        errno = rc;
        return NULL;
    }
    atomic_init(&s->refcnt, 1);
    s->value = value;
    s->max_value = max_value;
    s->capacity = max_value;
    pthread_once(&fork_once, fork_register);
    pthread_mutex_lock(&all_mu);
    s->all_next = all_head;
    if (all_head)
        all_head->all_prev = s;
    all_head = s;
    pthread_mutex_unlock(&all_mu);
    return s;
}

void bg_sem_incref(bg_sem *s)
{
    atomic_fetch_add_explicit(&s->refcnt, 1, memory_order_relaxed);
}

void bg_sem_decref(bg_sem *s)
{
    if (s == NULL)
        return;
    if (atomic_fetch_sub_explicit(&s->refcnt, 1, memory_order_acq_rel) != 1)
        return;
    /* Last reference: nobody can be queued any more (a queued waiter's owner
     * holds a reference), so there is nothing to wake. */
    pthread_mutex_lock(&all_mu);
    if (s->all_prev)
        s->all_prev->all_next = s->all_next;
    else
        all_head = s->all_next;
    if (s->all_next)
        s->all_next->all_prev = s->all_prev;
    pthread_mutex_unlock(&all_mu);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

int64_t bg_sem_value(bg_sem *s)
{
    pthread_mutex_lock(&s->mu);
    int64_t v = s->value;
    pthread_mutex_unlock(&s->mu);
    return v;
}

size_t bg_sem_queued(bg_sem *s)
{
    pthread_mutex_lock(&s->mu);
    size_t q = s->nqueued;
    pthread_mutex_unlock(&s->mu);
    return q;
}

int64_t bg_sem_max_value(bg_sem *s)
{
    return s->max_value; /* immutable after create */
}

bool bg_sem_would_block(bg_sem *s, int64_t n)
{
    pthread_mutex_lock(&s->mu);
    bool b = s->head != NULL || !fits_locked(s, n);
    pthread_mutex_unlock(&s->mu);
    return b;
}

static bool valid_n(const bg_sem *s, int64_t n)
{
    return n >= 1 && (s->max_value < 0 || n <= s->max_value);
}

/* Enough free permits for n. A request larger than a lowered capacity (but
 * within max_value) runs alone once nothing is held, instead of never; a
 * capacity of 0 grants nothing at all. Lock held. */
static bool fits_locked(const bg_sem *s, int64_t n)
{
    if (s->value >= n)
        return true;
    return s->capacity > 0 && n > s->capacity && s->value == s->capacity;
}

bool bg_sem_try_acquire(bg_sem *s, int64_t n)
{
    if (!valid_n(s, n))
        return false;
    pthread_mutex_lock(&s->mu);
    bool ok = s->head == NULL && fits_locked(s, n);
    if (ok)
        s->value -= n;
    pthread_mutex_unlock(&s->mu);
    return ok;
}

static void unlink_waiter(bg_sem *s, bg_sem_waiter *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        s->head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        s->tail = w->prev;
    w->prev = w->next = NULL;
    s->nqueued--;
}

static void enqueue_waiter(bg_sem *s, bg_sem_waiter *w)
{
    w->next = NULL;
    w->prev = s->tail;
    if (s->tail)
        s->tail->next = w;
    else
        s->head = w;
    s->tail = w;
    s->nqueued++;
    w->state = BG_SEM_W_QUEUED;
}

/* Grant from the head while permits suffice. Lock held. The callback is the
 * last touch of w: its owner may free it as soon as it learns of the grant. */
static void grant_locked(bg_sem *s)
{
    bg_sem_waiter *w;
    while ((w = s->head) != NULL && fits_locked(s, w->n)) {
        s->value -= w->n;
        unlink_waiter(s, w);
        w->state = BG_SEM_W_GRANTED;
        bg_sem_grant_fn fn = w->on_grant;
        if (fn)
            fn(w);
    }
}

int bg_sem_acquire_async(bg_sem *s, bg_sem_waiter *w)
{
    if (!valid_n(s, w->n))
        return -1;
    pthread_mutex_lock(&s->mu);
    if (s->head == NULL && fits_locked(s, w->n)) {
        s->value -= w->n;
        w->state = BG_SEM_W_IDLE;
        pthread_mutex_unlock(&s->mu);
        return 1;
    }
    enqueue_waiter(s, w);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int bg_sem_cancel(bg_sem *s, bg_sem_waiter *w)
{
    int ret;
    pthread_mutex_lock(&s->mu);
    switch (w->state) {
    case BG_SEM_W_QUEUED: {
        bool was_head = s->head == w;
        unlink_waiter(s, w);
        w->state = BG_SEM_W_IDLE;
        if (was_head)
            grant_locked(s); /* smaller waiters behind may fit now */
        ret = 1;
        break;
    }
    case BG_SEM_W_GRANTED:
        w->state = BG_SEM_W_IDLE;
        ret = 0;
        break;
    default:
        ret = -1;
        break;
    }
    pthread_mutex_unlock(&s->mu);
    return ret;
}

int bg_sem_release(bg_sem *s, int64_t n)
{
    if (n < 1)
        return -1;
    pthread_mutex_lock(&s->mu);
    if ((s->capacity >= 0 && s->value > s->capacity - n) || s->value > INT64_MAX - n) {
        pthread_mutex_unlock(&s->mu);
        return -1;
    }
    s->value += n;
    grant_locked(s);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* ---- adjustable capacity (closed-loop admission) ---- */

int bg_sem_set_capacity(bg_sem *s, int64_t capacity)
{
    if (s->max_value < 0 || capacity < 0 || capacity > s->max_value)
        return -1;
    pthread_mutex_lock(&s->mu);
    /* Held permits stay held: shrinking below them makes value negative, and
     * releases pay that debt back before anyone is granted again. */
    s->value += capacity - s->capacity;
    s->capacity = capacity;
    grant_locked(s);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int64_t bg_sem_capacity(bg_sem *s)
{
    pthread_mutex_lock(&s->mu);
    int64_t c = s->capacity;
    pthread_mutex_unlock(&s->mu);
    return c;
}

/* ---- blocking waiters ---- */

typedef struct {
    bg_sem_waiter w;
    pthread_cond_t cv;
} blocking_waiter;

static void blocking_grant(bg_sem_waiter *w)
{
    /* Runs under s->mu, which the waiting thread also uses with its condvar. */
    blocking_waiter *bw = (blocking_waiter *)w->ctx;
    pthread_cond_signal(&bw->cv);
}

static void deadline_after(struct timespec *ts, int64_t ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    int64_t sec = ns / 1000000000LL;
    int64_t rem = ns % 1000000000LL;
    ts->tv_sec += (time_t)sec;
    ts->tv_nsec += (long)rem;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec += 1;
        ts->tv_nsec -= 1000000000L;
    }
}

int bg_sem_acquire_blocking(bg_sem *s, int64_t n, int64_t timeout_ns)
{
    if (!valid_n(s, n))
        return -1;
    pthread_mutex_lock(&s->mu);
    if (s->head == NULL && fits_locked(s, n)) {
        s->value -= n;
        pthread_mutex_unlock(&s->mu);
        return 1;
    }
    if (timeout_ns == 0) {
        pthread_mutex_unlock(&s->mu);
        return 0;
    }

    blocking_waiter bw;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&bw.cv, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0) {
        pthread_mutex_unlock(&s->mu);
        errno = rc;
        return -1;
    }
    bg_sem_waiter_init(&bw.w, n, blocking_grant, &bw);
    enqueue_waiter(s, &bw.w);

    struct timespec deadline;
    if (timeout_ns > 0)
        deadline_after(&deadline, timeout_ns);
    int got = 1;
    while (bw.w.state == BG_SEM_W_QUEUED) {
        if (timeout_ns < 0) {
            pthread_cond_wait(&bw.cv, &s->mu);
        } else if (pthread_cond_timedwait(&bw.cv, &s->mu, &deadline) == ETIMEDOUT) {
            if (bw.w.state == BG_SEM_W_QUEUED) {
                bool was_head = s->head == &bw.w;
                unlink_waiter(s, &bw.w);
                if (was_head)
                    grant_locked(s);
                got = 0;
            }
            break;
        }
    }
    bw.w.state = BG_SEM_W_IDLE;
    pthread_mutex_unlock(&s->mu);
    pthread_cond_destroy(&bw.cv);
    return got;
}
