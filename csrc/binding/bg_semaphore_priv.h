/* bg_semaphore_priv.h - private to the batchgate.Semaphore files:
 *   bg_semaphore.c           the Semaphore/BoundedSemaphore types, argument
 *                            parsing, permits held per task, module hooks
 *   bg_semaphore_acquire.c   the acquire() awaitable and grants to the loop
 *   bg_semaphore_blocking.c  acquire_blocking() for plain threads
 *   bg_semaphore_testhooks.c test hooks acting like the dispatcher thread
 */
#ifndef BATCHGATE_BG_SEMAPHORE_PRIV_H
#define BATCHGATE_BG_SEMAPHORE_PRIV_H

#include "bg_semaphore.h"

#include "bg_loop_bridge.h"
#include "bg_notify.h"
#include "bg_sem.h"

#include <stdint.h>

enum {
    N_CANCELLED,
    N_SET_RESULT,
    N_CREATE_FUTURE,
    N_FUTURE_BLOCKING,
    N_RESULT,
    N_COUNT
};
#define NAME(st, i) PyTuple_GET_ITEM((st)->sem_names, (i))

typedef struct SemAcquire SemAcquire;

typedef struct {
    PyObject_HEAD
    bg_sem *sem;
    bg_state *st;            /* lives as long as our type, hence as us */
    PyObject *loop;          /* bound on the first wait, as asyncio's _get_loop */
    PyObject *bridge;        /* of loop (bg_loop_bridge) */
    SemAcquire *pend_head, *pend_tail; /* asyncio waiters queued in sem (GIL) */
    Py_ssize_t npending;
    Py_ssize_t woken;        /* futures resolved, tasks not yet resumed */
    Py_ssize_t nblocking;    /* threads inside acquire_blocking */
    PyObject *held_var;      /* ContextVar: this context's hold record (see hold_add) */
    int track_holders;       /* a dispatcher uses us: record holders (else no cost) */
    PyObject *weakreflist;
} Sem;

enum acq_state {
    ACQ_INIT,      /* not started */
    ACQ_QUEUED,    /* waiter in the native queue (grant maybe in flight) */
    ACQ_WOKEN,     /* permits ours, future resolved, not yet resumed */
    ACQ_CANCELLED, /* future cancelled and settled, CancelledError pending */
    ACQ_DONE,      /* finished: returned or raised */
    ACQ_NOOP,      /* __aexit__: already released, returns None */
};

struct SemAcquire {
    PyObject_HEAD
    Sem *sem;
    PyObject *fut;
    int64_t n;
    int state;
    int return_none; /* __aenter__ returns None, acquire() True */
    int inflight;    /* self-reference held: queued, or grant node unprocessed */
    SemAcquire *pprev, *pnext;
    bg_notify *notify;
    bg_sem_waiter w;
    bg_notify_node node;
};

/* bg_semaphore.c */
int semobj_ready(Sem *self);
/* Optional positional-or-keyword FASTCALL arguments, in order. */
int semobj_parse_opt_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames, const char *const *names, int nnames,
                          PyObject **out);
int semobj_parse_permits(Sem *self, PyObject *obj, int64_t *n);
int semobj_hold_add(Sem *s, int64_t n);

/* bg_semaphore_acquire.c (GIL held) */
extern PyType_Spec semobj_acq_spec;
SemAcquire *semobj_acq_new(Sem *s, int64_t n, int state, int return_none);
/* Release n permits; waiters of our loop are woken right here when called on
 * the loop thread. 0, or -1 when released too many times. */
int semobj_give(Sem *s, int64_t n);
/* Forget queued waiters whose futures were cancelled (front only). */
int semobj_purge_cancelled(Sem *s);
/* The bridge's handler of BG_NODE_SEM_GRANT. */
void semobj_on_grant_node(bg_notify_node *node, bg_loop_work *wl);

/* bg_semaphore_blocking.c */
PyObject *semobj_acquire_blocking(Sem *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames);

/* bg_semaphore_testhooks.c */
int semobj_testhooks_exec(PyObject *module);

#endif /* BATCHGATE_BG_SEMAPHORE_PRIV_H */
