/* bg_semaphore.c - batchgate.Semaphore / BoundedSemaphore: drop-ins for
 * asyncio's, on the native bg_sem counter that the dispatcher shares.
 *
 * acquire() returns a small coroutine-like object (SemAcquire). Its first step
 * takes the permits at once when nobody waits (no future is made); otherwise
 * it makes a loop future and queues a bg_sem waiter. A grant callback (native
 * lock held, no GIL) hands the waiter to the loop: straight onto the caller's
 * work list when release() runs on the loop thread, else onto the loop's
 * bg_notify queue, whose fd the loop watches (add_reader; a watcher thread
 * when the loop has none). On the loop thread, with the GIL and no native
 * lock, the future gets its result - or, if it was cancelled meanwhile, the
 * permits are released again and so passed on (CPython gh-90155).
 *
 * Semantics follow CPython 3.13's asyncio.Semaphore: FIFO; locked() is true
 * while any non-cancelled waiter exists, including one woken but not yet
 * resumed; a waiter cancelled after being woken gives its permit back.
 */
#include "bg_semaphore.h"

#include "bg_notify.h"

#include <errno.h>
#include <pthread.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>


enum {
    N_CANCELLED,
    N_SET_RESULT,
    N_CREATE_FUTURE,
    N_FUTURE_BLOCKING,
    N_RESULT,
    N_ADD_READER,
    N_CALL_SOON_TS,
    N_ON_READABLE,
    N_ON_READY,
    N_COUNT
};
static const char *const name_strs[N_COUNT] = {
    "cancelled", "set_result", "create_future", "_asyncio_future_blocking", "result",
    "add_reader", "call_soon_threadsafe", "_on_readable", "_on_ready",
};

#define NAME(st, i) PyTuple_GET_ITEM((st)->sem_names, (i))

typedef struct SemAcquire SemAcquire;

/* Per event loop: the wakeup fd and native queue that grants arrive on. */
typedef struct {
    PyObject_HEAD
    bg_notify *notify;
    bg_state *st;
    int fallback;  /* no add_reader: a watcher thread forwards via call_soon_threadsafe */
    int scheduled; /* fallback: _on_ready is scheduled (GIL) */
    bg_notify_node *ready_head, *ready_tail; /* fallback: drained, unprocessed (GIL) */
    PyObject *call_soon_threadsafe;          /* fallback only */
} LoopNotifier;

typedef struct {
    PyObject_HEAD
    bg_sem *sem;
    bg_state *st;            /* lives as long as our type, hence as us */
    PyObject *loop;          /* bound on the first wait, as asyncio's _get_loop */
    LoopNotifier *notifier;  /* of loop */
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

/* Grants collected on the loop thread instead of going through the fd. */
typedef struct {
    bg_notify *target;
    bg_notify_node *head, *tail;
} worklist;

static _Thread_local worklist *tls_work;

/* ---- native side: runs under the bg_sem lock, no Python ---- */

static void acq_on_grant(bg_sem_waiter *w)
{
    SemAcquire *a = (SemAcquire *)w->ctx;
    worklist *wl = tls_work;
    if (wl != NULL && wl->target == a->notify) {
        a->node.next = NULL;
        if (wl->tail)
            wl->tail->next = &a->node;
        else
            wl->head = &a->node;
        wl->tail = &a->node;
    } else {
        bg_notify_push(a->notify, &a->node);
    }
}

/* ---- helpers (GIL held) ---- */

static void pend_add(Sem *s, SemAcquire *a)
{
    a->pnext = NULL;
    a->pprev = s->pend_tail;
    if (s->pend_tail)
        s->pend_tail->pnext = a;
    else
        s->pend_head = a;
    s->pend_tail = a;
    s->npending++;
}

static void pend_remove(Sem *s, SemAcquire *a)
{
    if (a->pprev)
        a->pprev->pnext = a->pnext;
    else
        s->pend_head = a->pnext;
    if (a->pnext)
        a->pnext->pprev = a->pprev;
    else
        s->pend_tail = a->pprev;
    a->pprev = a->pnext = NULL;
    s->npending--;
}

/* 1 cancelled, 0 not, -1 error. */
static int fut_cancelled(bg_state *st, PyObject *fut)
{
    PyObject *r = PyObject_CallMethodNoArgs(fut, NAME(st, N_CANCELLED));
    if (r == NULL)
        return -1;
    int c = PyObject_IsTrue(r);
    Py_DECREF(r);
    return c;
}

static int fut_set_true(bg_state *st, PyObject *fut)
{
    PyObject *r = PyObject_CallMethodOneArg(fut, NAME(st, N_SET_RESULT), Py_True);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int on_bound_loop_thread(Sem *s)
{
    if (s->loop == NULL)
        return 0;
    PyObject *running = PyObject_CallNoArgs(s->st->get_running_loop);
    if (running == NULL) {
        PyErr_Clear();
        return 0;
    }
    int same = running == s->loop;
    Py_DECREF(running);
    return same;
}

static void run_worklist(worklist *wl);

/* bg_sem_release, catching grants of our loop's waiters in wl. */
static int release_into(Sem *s, int64_t n, worklist *wl)
{
    worklist *prev = tls_work;
    tls_work = wl;
    int rc = bg_sem_release(s->sem, n);
    tls_work = prev;
    return rc;
}

/* Release n permits; grants to waiters of our loop are completed right here
 * when we are on the loop thread (as asyncio's release does), else the loop
 * learns of them through its fd. */
static int sem_give(Sem *s, int64_t n)
{
    if (s->npending > 0 && s->notifier != NULL && on_bound_loop_thread(s)) {
        LoopNotifier *nt = s->notifier;
        worklist wl = {nt->notify, NULL, NULL};
        /* Grants other threads made earlier go first: wake in grant order.
         * (Fallback mode: the watcher may have moved some to the ready list.) */
        if (nt->ready_head) {
            wl.head = nt->ready_head;
            wl.tail = nt->ready_tail;
            nt->ready_head = nt->ready_tail = NULL;
        }
        if (bg_notify_pending(wl.target)) {
            bg_notify_node *more = bg_notify_drain(wl.target);
            if (wl.tail)
                wl.tail->next = more;
            else
                wl.head = more;
            for (wl.tail = wl.head; wl.tail && wl.tail->next; wl.tail = wl.tail->next)
                ;
        }
        int rc = release_into(s, n, &wl);
        run_worklist(&wl);
        return rc;
    }
    return bg_sem_release(s->sem, n);
}

static void drop_inflight(SemAcquire *a)
{
    if (a->inflight) {
        a->inflight = 0;
        Py_DECREF(a);
    }
}

/* A queued waiter whose wait ends early (cancelled or thrown into). Permits
 * granted meanwhile are given back, which passes them on. */
static void settle_queued(SemAcquire *a, int new_state, worklist *wl)
{
    Sem *s = a->sem;
    pend_remove(s, a);
    a->state = new_state;
    int c = bg_sem_cancel(s->sem, &a->w);
    if (c == 0) {
        /* Granted: the grant node is still on its way and drops the
         * self-reference when processed. */
        if (wl)
            release_into(s, a->n, wl);
        else
            sem_give(s, a->n);
    } else {
        drop_inflight(a); /* removed: no grant will come */
    }
}

/* A grant reached the loop thread. */
static void process_grant(SemAcquire *a, worklist *wl)
{
    Sem *s = a->sem;
    if (a->state == ACQ_QUEUED) {
        pend_remove(s, a);
        int c = fut_cancelled(s->st, a->fut);
        if (c == 0 && fut_set_true(s->st, a->fut) == 0) {
            a->state = ACQ_WOKEN;
            s->woken++;
            bg_sem_cancel(s->sem, &a->w); /* mark the grant consumed */
        } else {
            /* Cancelled before it could be woken: like asyncio's
             * _wake_up_next, skip it and pass the permits on. */
            if (c < 0 || PyErr_Occurred())
                PyErr_WriteUnraisable((PyObject *)a);
            a->state = ACQ_CANCELLED;
            bg_sem_cancel(s->sem, &a->w);
            release_into(s, a->n, wl);
        }
    }
    /* Otherwise already settled by a cancellation: nothing owed. */
    drop_inflight(a);
}

/* Handlers of other binding files' node kinds (set once at module exec). */
static bg_loop_node_fn node_handlers[BG_LOOP_NODE_KINDS];

int bg_loop_notifier_set_handler(int kind, bg_loop_node_fn fn)
{
    if (kind <= BG_NODE_SEM_GRANT || kind >= BG_LOOP_NODE_KINDS) {
        PyErr_Format(PyExc_SystemError, "bad loop notifier node kind %d", kind);
        return -1;
    }
    node_handlers[kind] = fn;
    return 0;
}

static void run_worklist(worklist *wl)
{
    bg_notify_node *node;
    while ((node = wl->head) != NULL) {
        wl->head = node->next;
        if (wl->head == NULL)
            wl->tail = NULL;
        if (node->kind == BG_NODE_SEM_GRANT)
            process_grant((SemAcquire *)node->payload, wl);
        else if (node->kind > 0 && node->kind < BG_LOOP_NODE_KINDS && node_handlers[node->kind])
            node_handlers[node->kind](node);
    }
}

/* Drop queued asyncio waiters whose futures were cancelled, from the front,
 * so that they do not count for locked() or block newcomers (asyncio ignores
 * cancelled futures in its deque). Stops at the first live waiter. */
static int purge_cancelled(Sem *s)
{
    while (s->pend_head != NULL) {
        SemAcquire *a = s->pend_head;
        int c = fut_cancelled(s->st, a->fut);
        if (c < 0)
            return -1;
        if (!c)
            break;
        settle_queued(a, ACQ_CANCELLED, NULL);
    }
    return 0;
}

/* ---- LoopNotifier ---- */

static void notifier_dealloc(LoopNotifier *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->call_soon_threadsafe);
    if (self->notify)
        bg_notify_destroy(self->notify);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int notifier_traverse(LoopNotifier *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->call_soon_threadsafe);
    return 0;
}

static int notifier_clear(LoopNotifier *self)
{
    Py_CLEAR(self->call_soon_threadsafe);
    return 0;
}

static PyObject *notifier_on_readable(LoopNotifier *self, PyObject *Py_UNUSED(ignored))
{
    worklist wl = {self->notify, NULL, NULL};
    wl.head = bg_notify_drain(self->notify);
    for (wl.tail = wl.head; wl.tail && wl.tail->next; wl.tail = wl.tail->next)
        ;
    run_worklist(&wl);
    Py_RETURN_NONE;
}

static PyObject *notifier_on_ready(LoopNotifier *self, PyObject *Py_UNUSED(ignored))
{
    worklist wl = {self->notify, self->ready_head, self->ready_tail};
    self->ready_head = self->ready_tail = NULL;
    self->scheduled = 0;
    run_worklist(&wl);
    Py_RETURN_NONE;
}

/* 1 if the loop behind call_soon_threadsafe is closed, 0 if not, -1 error. */
static int watched_loop_closed(LoopNotifier *self)
{
    PyObject *loop = PyObject_GetAttrString(self->call_soon_threadsafe, "__self__");
    if (loop == NULL)
        return -1;
    PyObject *r = PyObject_CallMethod(loop, "is_closed", NULL);
    Py_DECREF(loop);
    if (r == NULL)
        return -1;
    int closed = PyObject_IsTrue(r);
    Py_DECREF(r);
    return closed;
}

/* Fallback watcher thread body: wait on the fd without the GIL, move drained
 * nodes to the ready list and schedule _on_ready on the loop. Ends once the
 * loop is closed (checked every second while idle). */
static PyObject *notifier_watch(LoopNotifier *self, PyObject *Py_UNUSED(ignored))
{
    for (;;) {
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = bg_notify_wait(self->notify, 1000);
        Py_END_ALLOW_THREADS
        if (r < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (r == 0) {
            int closed = watched_loop_closed(self);
            if (closed < 0)
                return NULL;
            if (closed)
                Py_RETURN_NONE;
            continue;
        }
        bg_notify_node *list = bg_notify_drain(self->notify);
        if (list == NULL)
            continue;
        bg_notify_node *tail = list;
        while (tail->next)
            tail = tail->next;
        if (self->ready_tail)
            self->ready_tail->next = list;
        else
            self->ready_head = list;
        self->ready_tail = tail;
        if (!self->scheduled) {
            PyObject *cb = PyObject_GetAttr((PyObject *)self, NAME(self->st, N_ON_READY));
            if (cb == NULL)
                return NULL;
            /* Set first: call_soon_threadsafe may drop the GIL (it writes the
             * loop's self-pipe), and _on_ready may run before it returns. */
            self->scheduled = 1;
            PyObject *h = PyObject_CallOneArg(self->call_soon_threadsafe, cb);
            Py_DECREF(cb);
            if (h == NULL) {
                self->scheduled = 0;
                /* Loop closed: stop watching. */
                if (PyErr_ExceptionMatches(PyExc_RuntimeError)) {
                    PyErr_Clear();
                    Py_RETURN_NONE;
                }
                return NULL;
            }
            Py_DECREF(h);
        }
    }
}

static PyMethodDef notifier_methods[] = {
    {"_on_readable", (PyCFunction)notifier_on_readable, METH_NOARGS, NULL},
    {"_on_ready", (PyCFunction)notifier_on_ready, METH_NOARGS, NULL},
    {"_watch", (PyCFunction)notifier_watch, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot notifier_slots[] = {
    {Py_tp_dealloc, notifier_dealloc},
    {Py_tp_traverse, notifier_traverse},
    {Py_tp_clear, notifier_clear},
    {Py_tp_methods, notifier_methods},
    {0, NULL},
};

static PyType_Spec notifier_spec = {
    .name = "batchgate._native._LoopNotifier",
    .basicsize = sizeof(LoopNotifier),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = notifier_slots,
};

static int start_watcher(LoopNotifier *nt, PyObject *loop)
{
    bg_state *st = nt->st;
    PyObject *threading = NULL, *thread_cls = NULL, *target = NULL, *kwargs = NULL,
             *thread = NULL, *r = NULL;
    int rc = -1;
    nt->call_soon_threadsafe = PyObject_GetAttr(loop, NAME(st, N_CALL_SOON_TS));
    if (nt->call_soon_threadsafe == NULL)
        goto done;
    threading = PyImport_ImportModule("threading");
    if (threading == NULL)
        goto done;
    thread_cls = PyObject_GetAttrString(threading, "Thread");
    target = PyObject_GetAttrString((PyObject *)nt, "_watch");
    kwargs = Py_BuildValue("{sOsssO}", "target", target ? target : Py_None, "name",
                           "batchgate-loop-notifier", "daemon", Py_True);
    if (thread_cls == NULL || target == NULL || kwargs == NULL)
        goto done;
    PyObject *noargs = PyTuple_New(0);
    if (noargs == NULL)
        goto done;
    thread = PyObject_Call(thread_cls, noargs, kwargs);
    Py_DECREF(noargs);
    if (thread == NULL)
        goto done;
    r = PyObject_CallMethod(thread, "start", NULL);
    if (r == NULL)
        goto done;
    nt->fallback = 1;
    rc = 0;
done:
    Py_XDECREF(threading);
    Py_XDECREF(thread_cls);
    Py_XDECREF(target);
    Py_XDECREF(kwargs);
    Py_XDECREF(thread);
    Py_XDECREF(r);
    return rc;
}

/* The notifier of loop, made on first use: one fd per loop. New reference. */
static LoopNotifier *notifier_for_loop(bg_state *st, PyObject *loop)
{
    PyObject *found = PyObject_GetItem(st->loop_notifiers, loop);
    if (found != NULL)
        return (LoopNotifier *)found;
    /* TypeError: the loop cannot be weakly referenced (handled below). */
    if (!PyErr_ExceptionMatches(PyExc_KeyError) && !PyErr_ExceptionMatches(PyExc_TypeError))
        return NULL;
    PyErr_Clear();

    LoopNotifier *nt = PyObject_GC_New(LoopNotifier, st->LoopNotifierType);
    if (nt == NULL)
        return NULL;
    nt->notify = NULL;
    nt->st = st;
    nt->fallback = 0;
    nt->scheduled = 0;
    nt->ready_head = nt->ready_tail = NULL;
    nt->call_soon_threadsafe = NULL;
    PyObject_GC_Track(nt);
    nt->notify = bg_notify_create();
    if (nt->notify == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    PyObject *cb = PyObject_GetAttr((PyObject *)nt, NAME(st, N_ON_READABLE));
    if (cb == NULL)
        goto fail;
    PyObject *fd = PyLong_FromLong(bg_notify_fd(nt->notify));
    if (fd == NULL) {
        Py_DECREF(cb);
        goto fail;
    }
    PyObject *r = PyObject_CallMethodObjArgs(loop, NAME(st, N_ADD_READER), fd, cb, NULL);
    Py_DECREF(fd);
    Py_DECREF(cb);
    if (r != NULL) {
        Py_DECREF(r);
    } else if (PyErr_ExceptionMatches(PyExc_NotImplementedError) ||
               PyErr_ExceptionMatches(PyExc_AttributeError)) {
        /* e.g. the proactor loop: no add_reader. */
        PyErr_Clear();
        if (start_watcher(nt, loop) < 0)
            goto fail;
    } else {
        goto fail;
    }
    if (PyObject_SetItem(st->loop_notifiers, loop, (PyObject *)nt) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            goto fail;
        /* A loop without weakref support: this notifier serves only the
         * semaphore that asked for it. */
        PyErr_Clear();
    }
    return nt;
fail:
    Py_DECREF(nt);
    return NULL;
}

/* ---- SemAcquire: what acquire() and __aenter__() return ----
 * Coroutine-like (send/throw/close/__await__), so asyncio.create_task() and
 * wait_for() accept it. Nothing happens until it is first awaited. */

enum { ACQ_NOOP = ACQ_DONE + 1 }; /* __aexit__: already released, returns None */

/* ---- permits held per task ----
 * A task that took permits with acquire()/`async with` records them in a
 * ContextVar of this semaphore: a list [permits, riding, waiters] shared with
 * tasks created inside (gather copies the context). The dispatcher lets
 * requests such a task submits ride on those permits instead of asking for
 * more (`async with sem: await d.generate()` would otherwise need two, and
 * deadlock once every permit is held that way). Released permits come off the
 * record of the releasing context; a record is reused, so a task pays for one
 * ContextVar.set only on its first acquire. Only semaphores a dispatcher uses
 * keep records (_track_holders()); others pay nothing. */
static int hold_add(Sem *s, int64_t n)
{
    if (!s->track_holders)
        return 0;
    if (s->held_var == NULL) {
        s->held_var = PyContextVar_New("batchgate.Semaphore.held", NULL);
        if (s->held_var == NULL)
            return -1;
    }
    PyObject *rec = NULL;
    if (PyContextVar_Get(s->held_var, NULL, &rec) < 0)
        return -1;
    if (rec != NULL) {
        long long cur = PyLong_AsLongLong(PyList_GET_ITEM(rec, 0));
        PyObject *v = cur < 0 ? NULL : PyLong_FromLongLong(cur + n);
        if (v == NULL) {
            Py_DECREF(rec);
            return -1;
        }
        PyList_SetItem(rec, 0, v); /* steals v */
        Py_DECREF(rec);
        return 0;
    }
    rec = Py_BuildValue("[LiO]", (long long)n, 0, Py_None);
    if (rec == NULL)
        return -1;
    PyObject *tok = PyContextVar_Set(s->held_var, rec);
    Py_DECREF(rec);
    if (tok == NULL)
        return -1;
    Py_DECREF(tok);
    return 0;
}

/* Bookkeeping only, after a successful release (no exception set): a
 * failure here must not fail the release itself. */
static void hold_sub(Sem *s, int64_t n)
{
    if (s->held_var == NULL)
        return;
    PyObject *rec = NULL;
    if (PyContextVar_Get(s->held_var, NULL, &rec) == 0 && rec != NULL) {
        long long cur = PyLong_AsLongLong(PyList_GET_ITEM(rec, 0));
        if (cur > 0) {
            PyObject *v = PyLong_FromLongLong(cur > n ? cur - n : 0);
            if (v != NULL)
                PyList_SetItem(rec, 0, v);
        }
        Py_DECREF(rec);
    }
    PyErr_Clear();
}

static PyObject *acq_result(SemAcquire *a)
{
    return Py_NewRef(a->return_none ? Py_None : Py_True);
}

static PyObject *bind_loop(Sem *s)
{
    bg_state *st = s->st;
    if (st->get_running_loop == NULL) {
        PyObject *events = PyImport_ImportModule("asyncio.events");
        if (events == NULL)
            return NULL;
        st->get_running_loop = PyObject_GetAttrString(events, "_get_running_loop");
        Py_DECREF(events);
        if (st->get_running_loop == NULL)
            return NULL;
    }
    PyObject *running = PyObject_CallNoArgs(st->get_running_loop);
    if (running == NULL)
        return NULL;
    if (running == Py_None) {
        Py_DECREF(running);
        PyErr_SetString(PyExc_RuntimeError, "no running event loop");
        return NULL;
    }
    if (s->loop == NULL) {
        LoopNotifier *nt = notifier_for_loop(st, running);
        if (nt == NULL) {
            Py_DECREF(running);
            return NULL;
        }
        s->loop = running;
        s->notifier = nt;
        return running;
    }
    Py_DECREF(running);
    if (running != s->loop) {
        PyErr_Format(PyExc_RuntimeError, "%R is bound to a different event loop", (PyObject *)s);
        return NULL;
    }
    return s->loop;
}

static PySendResult acq_start(SemAcquire *a, PyObject **presult)
{
    Sem *s = a->sem;
    bg_state *st = s->st;
    /* asyncio: a newcomer waits while any live waiter exists, even one that
     * was woken and has not run yet. */
    if (s->woken == 0) {
        if (s->pend_head != NULL && purge_cancelled(s) < 0)
            goto error;
        if (bg_sem_try_acquire(s->sem, a->n)) {
            if (hold_add(s, a->n) < 0) {
                sem_give(s, a->n);
                goto error;
            }
            a->state = ACQ_DONE;
            *presult = acq_result(a);
            return PYGEN_RETURN;
        }
    }
    PyObject *loop = bind_loop(s);
    if (loop == NULL)
        goto error;
    a->fut = PyObject_CallMethodNoArgs(loop, NAME(st, N_CREATE_FUTURE));
    if (a->fut == NULL)
        goto error;
    if (PyObject_SetAttr(a->fut, NAME(st, N_FUTURE_BLOCKING), Py_True) < 0)
        goto error;
    a->notify = s->notifier->notify;
    bg_sem_waiter_init(&a->w, a->n, acq_on_grant, a);
    a->node.kind = BG_NODE_SEM_GRANT;
    a->node.payload = a;
    a->node.next = NULL;
    /* Grants from other threads only queue a node; it is processed on this
     * thread under the GIL, so the bookkeeping below is not racing it. */
    int rc = bg_sem_acquire_async(s->sem, &a->w);
    if (rc == 1) {
        if (fut_set_true(st, a->fut) < 0) {
            sem_give(s, a->n);
            goto error;
        }
        a->state = ACQ_WOKEN;
        s->woken++;
    } else if (rc == 0) {
        a->state = ACQ_QUEUED;
        a->inflight = 1;
        Py_INCREF(a);
        pend_add(s, a);
    } else {
        PyErr_SetString(PyExc_ValueError, "invalid number of permits");
        goto error;
    }
    *presult = Py_NewRef(a->fut);
    return PYGEN_NEXT;
error:
    a->state = ACQ_DONE;
    *presult = NULL;
    return PYGEN_ERROR;
}

/* Raise the cancelled future's CancelledError (with its message). */
static void raise_from_future(SemAcquire *a)
{
    PyObject *r = PyObject_CallMethodNoArgs(a->fut, NAME(a->sem->st, N_RESULT));
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_RuntimeError, "semaphore wait ended without a result");
    }
}

static PySendResult acq_am_send(SemAcquire *a, PyObject *arg, PyObject **presult)
{
    (void)arg;
    Sem *s = a->sem;
    *presult = NULL;
    switch (a->state) {
    case ACQ_INIT:
        return acq_start(a, presult);
    case ACQ_WOKEN:
        s->woken--;
        a->state = ACQ_DONE;
        if (hold_add(s, a->n) < 0) {
            sem_give(s, a->n);
            return PYGEN_ERROR;
        }
        *presult = acq_result(a);
        return PYGEN_RETURN;
    case ACQ_QUEUED: {
        int c = fut_cancelled(s->st, a->fut);
        if (c < 0)
            return PYGEN_ERROR;
        settle_queued(a, ACQ_DONE, NULL);
        if (c)
            raise_from_future(a);
        else
            PyErr_SetString(PyExc_RuntimeError, "await wasn't used with future");
        return PYGEN_ERROR;
    }
    case ACQ_CANCELLED:
        a->state = ACQ_DONE;
        raise_from_future(a);
        return PYGEN_ERROR;
    case ACQ_NOOP:
        a->state = ACQ_DONE;
        *presult = Py_NewRef(Py_None);
        return PYGEN_RETURN;
    default:
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
}

static PyObject *acq_iternext(SemAcquire *a)
{
    PyObject *res;
    switch (acq_am_send(a, Py_None, &res)) {
    case PYGEN_NEXT:
        return res;
    case PYGEN_RETURN:
        if (res != Py_None)
            PyErr_SetObject(PyExc_StopIteration, res);
        Py_DECREF(res);
        return NULL;
    default:
        return NULL;
    }
}

static PyObject *acq_send(SemAcquire *a, PyObject *arg)
{
    (void)arg;
    PyObject *r = acq_iternext(a);
    if (r == NULL && !PyErr_Occurred())
        PyErr_SetNone(PyExc_StopIteration);
    return r;
}

/* The wait ends without success: give back whatever is ours. */
static void acq_abandon(SemAcquire *a)
{
    switch (a->state) {
    case ACQ_QUEUED:
        settle_queued(a, ACQ_DONE, NULL);
        break;
    case ACQ_WOKEN:
        /* Woken, then cancelled before resuming: hand the permits on. */
        a->sem->woken--;
        a->state = ACQ_DONE;
        sem_give(a->sem, a->n);
        break;
    default:
        a->state = ACQ_DONE;
        break;
    }
}

static PyObject *acq_throw(SemAcquire *a, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    PyObject *typ = args[0];
    PyObject *val = nargs > 1 ? args[1] : Py_None;
    PyObject *tb = nargs > 2 ? args[2] : Py_None;
    if (!PyExceptionInstance_Check(typ) && !PyExceptionClass_Check(typ)) {
        PyErr_SetString(PyExc_TypeError,
                        "exceptions must be classes or instances deriving from BaseException");
        return NULL;
    }
    acq_abandon(a);
    if (PyExceptionInstance_Check(typ)) {
        if (tb != Py_None && PyException_SetTraceback(typ, tb) < 0)
            return NULL;
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    } else {
        PyErr_SetObject(typ, val);
    }
    return NULL;
}

static PyObject *acq_close(SemAcquire *a, PyObject *Py_UNUSED(ignored))
{
    acq_abandon(a);
    Py_RETURN_NONE;
}

static PyObject *acq_await(SemAcquire *a)
{
    return Py_NewRef(a);
}

/* Permits granted to a woken waiter nobody will resume go back. */
static void acq_give_back_owned(SemAcquire *a)
{
    if (a->state != ACQ_WOKEN || a->sem == NULL)
        return;
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
#endif
    a->sem->woken--;
    a->state = ACQ_DONE;
    sem_give(a->sem, a->n);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(et, ev, etb);
#endif
}

static int acq_traverse(SemAcquire *a, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(a));
    Py_VISIT(a->sem);
    Py_VISIT(a->fut);
    return 0;
}

static int acq_clear(SemAcquire *a)
{
    acq_give_back_owned(a);
    Py_CLEAR(a->fut);
    Py_CLEAR(a->sem);
    return 0;
}

static void acq_dealloc(SemAcquire *a)
{
    PyTypeObject *tp = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    acq_give_back_owned(a);
    Py_CLEAR(a->fut);
    Py_CLEAR(a->sem);
    tp->tp_free(a);
    Py_DECREF(tp);
}

static PyMethodDef acq_methods[] = {
    {"send", (PyCFunction)acq_send, METH_O, NULL},
    {"throw", (PyCFunction)(void (*)(void))acq_throw, METH_FASTCALL, NULL},
    {"close", (PyCFunction)acq_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot acq_slots[] = {
    {Py_tp_dealloc, acq_dealloc},
    {Py_tp_traverse, acq_traverse},
    {Py_tp_clear, acq_clear},
    {Py_tp_iter, acq_await},
    {Py_tp_iternext, acq_iternext},
    {Py_tp_methods, acq_methods},
    {Py_am_await, acq_await},
    {Py_am_send, acq_am_send},
    {0, NULL},
};

static PyType_Spec acq_spec = {
    .name = "batchgate._native._SemaphoreAcquire",
    .basicsize = sizeof(SemAcquire),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = acq_slots,
};

static SemAcquire *acq_new(Sem *s, int64_t n, int state, int return_none)
{
    SemAcquire *a = PyObject_GC_New(SemAcquire, s->st->SemAcquireType);
    if (a == NULL)
        return NULL;
    a->sem = (Sem *)Py_NewRef(s);
    a->fut = NULL;
    a->n = n;
    a->state = state;
    a->return_none = return_none;
    a->inflight = 0;
    a->pprev = a->pnext = NULL;
    a->notify = NULL;
    PyObject_GC_Track(a);
    return a;
}

/* ---- Semaphore / BoundedSemaphore ---- */

static int sem_ready(Sem *self)
{
    if (self->sem == NULL) {
        PyErr_Format(PyExc_RuntimeError, "%s.__init__() was not called", Py_TYPE(self)->tp_name);
        return -1;
    }
    return 0;
}

/* Tiny FASTCALL parser: optional positional-or-keyword arguments in order. */
static int parse_opt_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames, const char *const *names, int nnames,
                          PyObject **out)
{
    for (int i = 0; i < nnames; i++)
        out[i] = NULL;
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname,
                     nnames, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int i = 0; i < nnames; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                if (out[i] != NULL) {
                    PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                                 fname, names[i]);
                    return -1;
                }
                out[i] = args[nargs + k];
                found = 1;
                break;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname,
                         key);
            return -1;
        }
    }
    return 0;
}

static int parse_permits(Sem *self, PyObject *obj, int64_t *n)
{
    *n = 1;
    if (obj == NULL)
        return 0;
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "n must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0 || v > INT64_MAX / 2) {
        PyErr_Format(PyExc_OverflowError, "n is too large: %R", obj);
        return -1;
    }
    if (overflow < 0 || v < 1) {
        PyErr_Format(PyExc_ValueError, "n must be >= 1, got %R", obj);
        return -1;
    }
    int64_t bound = bg_sem_max_value(self->sem);
    if (bound >= 0 && v > bound) {
        PyErr_Format(PyExc_ValueError, "n=%lld exceeds the bound %lld of %s: it could never be "
                     "acquired", v, (long long)bound, Py_TYPE(self)->tp_name);
        return -1;
    }
    *n = (int64_t)v;
    return 0;
}

static int sem_init(Sem *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"value", NULL};
    PyObject *value_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:Semaphore", kwlist, &value_obj))
        return -1;
    long long value = 1;
    if (value_obj != NULL) {
        if (!PyLong_Check(value_obj)) {
            PyErr_Format(PyExc_TypeError, "Semaphore initial value must be an int, not %.100s",
                         Py_TYPE(value_obj)->tp_name);
            return -1;
        }
        int overflow = 0;
        value = PyLong_AsLongLongAndOverflow(value_obj, &overflow);
        if (value == -1 && PyErr_Occurred())
            return -1;
        if (overflow < 0)
            value = -1;
        if (overflow > 0 || value > INT64_MAX / 2) {
            PyErr_Format(PyExc_OverflowError, "Semaphore initial value is too large: %R",
                         value_obj);
            return -1;
        }
    }
    if (value < 0) {
        PyErr_SetString(PyExc_ValueError, "Semaphore initial value must be >= 0");
        return -1;
    }
    bg_state *st = bg_state_from_type(Py_TYPE(self));
    if (st == NULL)
        return -1;
    if (self->sem != NULL && (self->npending || self->woken || self->nblocking)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot re-initialise a semaphore that has waiters");
        return -1;
    }
    int bounded = PyObject_TypeCheck((PyObject *)self, st->BoundedSemaphoreType);
    bg_sem *sem = bg_sem_create(value, bounded ? value : -1);
    if (sem == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    bg_sem_decref(self->sem);
    self->sem = sem;
    self->st = st;
    return 0;
}

/* _held() -> [permits, riding, waiters] of the current context, or None when
 * it holds no permit of this semaphore. */
static PyObject *sem_held(Sem *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *rec = NULL;
    if (self->held_var == NULL)
        Py_RETURN_NONE;
    if (PyContextVar_Get(self->held_var, NULL, &rec) < 0)
        return NULL;
    if (rec == NULL)
        Py_RETURN_NONE;
    long long cur = PyLong_AsLongLong(PyList_GET_ITEM(rec, 0));
    if (cur <= 0) {
        Py_DECREF(rec);
        if (cur == -1 && PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return rec;
}

static PyObject *sem_track_holders(Sem *self, PyObject *Py_UNUSED(ignored))
{
    self->track_holders = 1;
    Py_RETURN_NONE;
}

static int sem_traverse(Sem *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->held_var);
    Py_VISIT(self->loop);
    Py_VISIT(self->notifier);
    return 0;
}

static int sem_clear(Sem *self)
{
    Py_CLEAR(self->held_var);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->notifier);
    return 0;
}

static void sem_dealloc(Sem *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    Py_CLEAR(self->held_var);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->notifier);
    bg_sem_decref(self->sem); /* the dispatcher may still hold the counter */
    self->sem = NULL;
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *sem_acquire(Sem *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    static const char *const names[] = {"n"};
    PyObject *n_obj = NULL;
    int64_t n = 1;
    if (sem_ready(self) < 0)
        return NULL;
    if ((nargs || kwnames) &&
        (parse_opt_args("acquire", args, nargs, kwnames, names, 1, &n_obj) < 0 ||
         parse_permits(self, n_obj, &n) < 0))
        return NULL;
    return (PyObject *)acq_new(self, n, ACQ_INIT, 0);
}

static PyObject *release_error(Sem *self)
{
    PyErr_Format(PyExc_ValueError, "%s released too many times",
                 bg_sem_max_value(self->sem) >= 0 ? "BoundedSemaphore" : "Semaphore");
    return NULL;
}

static PyObject *sem_release(Sem *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    static const char *const names[] = {"n"};
    PyObject *n_obj = NULL;
    int64_t n = 1;
    if (sem_ready(self) < 0)
        return NULL;
    if ((nargs || kwnames) &&
        (parse_opt_args("release", args, nargs, kwnames, names, 1, &n_obj) < 0 ||
         parse_permits(self, n_obj, &n) < 0))
        return NULL;
    if (sem_give(self, n) < 0)
        return release_error(self);
    hold_sub(self, n);
    Py_RETURN_NONE;
}

static int sem_locked_impl(Sem *self)
{
    if (self->woken > 0)
        return 1;
    if (self->pend_head != NULL && purge_cancelled(self) < 0)
        return -1;
    return bg_sem_would_block(self->sem, 1);
}

static PyObject *sem_locked(Sem *self, PyObject *Py_UNUSED(ignored))
{
    if (sem_ready(self) < 0)
        return NULL;
    int r = sem_locked_impl(self);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *sem_aenter(Sem *self, PyObject *Py_UNUSED(ignored))
{
    if (sem_ready(self) < 0)
        return NULL;
    return (PyObject *)acq_new(self, 1, ACQ_INIT, 1);
}

static PyObject *sem_aexit(Sem *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args;
    (void)nargs;
    if (sem_ready(self) < 0)
        return NULL;
    if (sem_give(self, 1) < 0)
        return release_error(self);
    hold_sub(self, 1);
    return (PyObject *)acq_new(self, 1, ACQ_NOOP, 1);
}

/* ---- blocking acquire for plain threads ---- */

typedef struct {
    bg_sem_waiter w;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int granted;
} thread_waiter;

static void thread_grant(bg_sem_waiter *w)
{
    thread_waiter *tw = (thread_waiter *)w->ctx;
    pthread_mutex_lock(&tw->mu);
    tw->granted = 1;
    pthread_cond_signal(&tw->cv);
    pthread_mutex_unlock(&tw->mu);
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Wake at least this often to let the main thread see Ctrl-C. */
#define BLOCKING_SLICE_NS (100 * 1000000LL)

static PyObject *sem_acquire_blocking(Sem *self, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    static const char *const names[] = {"n", "timeout"};
    PyObject *opt[2];
    int64_t n = 1, timeout_ns = -1;
    if (sem_ready(self) < 0)
        return NULL;
    if (parse_opt_args("acquire_blocking", args, nargs, kwnames, names, 2, opt) < 0 ||
        parse_permits(self, opt[0], &n) < 0)
        return NULL;
    if (opt[1] != NULL && opt[1] != Py_None) {
        double t = PyFloat_AsDouble(opt[1]);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(t >= 0)) {
            PyErr_Format(PyExc_ValueError, "timeout must be None or >= 0, got %R", opt[1]);
            return NULL;
        }
        timeout_ns = t > 1e9 ? (int64_t)1e18 : (int64_t)(t * 1e9);
    }

    thread_waiter tw;
    tw.granted = 0;
    bg_sem_waiter_init(&tw.w, n, thread_grant, &tw);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (pthread_mutex_init(&tw.mu, NULL) != 0) {
        pthread_condattr_destroy(&attr);
        return PyErr_NoMemory();
    }
    if (pthread_cond_init(&tw.cv, &attr) != 0) {
        pthread_condattr_destroy(&attr);
        pthread_mutex_destroy(&tw.mu);
        return PyErr_NoMemory();
    }
    pthread_condattr_destroy(&attr);

    int got = 0, interrupted = 0;
    int rc = bg_sem_acquire_async(self->sem, &tw.w);
    if (rc == 1) {
        got = 1;
    } else if (rc == 0) {
        int64_t deadline = timeout_ns < 0 ? INT64_MAX : mono_ns() + timeout_ns;
        self->nblocking++;
        for (;;) {
            int64_t now = mono_ns();
            if (now >= deadline)
                break;
            int64_t until = deadline - now > BLOCKING_SLICE_NS ? now + BLOCKING_SLICE_NS : deadline;
            struct timespec ts = {(time_t)(until / 1000000000LL), (long)(until % 1000000000LL)};
            int granted;
            Py_BEGIN_ALLOW_THREADS
            pthread_mutex_lock(&tw.mu);
            while (!tw.granted) {
                if (pthread_cond_timedwait(&tw.cv, &tw.mu, &ts) == ETIMEDOUT)
                    break;
            }
            granted = tw.granted;
            pthread_mutex_unlock(&tw.mu);
            Py_END_ALLOW_THREADS
            if (granted)
                break;
            if (PyErr_CheckSignals() < 0) {
                interrupted = 1;
                break;
            }
        }
        self->nblocking--;
        /* Under the semaphore's lock: also waits out a grant callback still
         * running, so tw can go away safely. */
        got = bg_sem_cancel(self->sem, &tw.w) == 0;
    } else {
        PyErr_SetString(PyExc_ValueError, "invalid number of permits");
        interrupted = 1;
    }
    pthread_cond_destroy(&tw.cv);
    pthread_mutex_destroy(&tw.mu);
    if (interrupted) {
        if (got)
            sem_give(self, n);
        return NULL;
    }
    return PyBool_FromLong(got);
}

static PyObject *sem_get_value(Sem *self, void *Py_UNUSED(closure))
{
    if (sem_ready(self) < 0)
        return NULL;
    return PyLong_FromLongLong(bg_sem_value(self->sem));
}

static PyObject *sem_get_bound(Sem *self, void *Py_UNUSED(closure))
{
    if (sem_ready(self) < 0)
        return NULL;
    int64_t b = bg_sem_max_value(self->sem);
    if (b < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(b);
}

static PyObject *sem_repr(Sem *self)
{
    PyObject *base = PyBaseObject_Type.tp_repr((PyObject *)self);
    if (base == NULL || self->sem == NULL)
        return base;
    PyObject *inner = NULL, *res = NULL;
    int locked = sem_locked_impl(self);
    if (locked < 0)
        goto done;
    inner = PyUnicode_Substring(base, 1, PyUnicode_GET_LENGTH(base) - 1);
    if (inner == NULL)
        goto done;
    Py_ssize_t waiters = self->npending + self->woken + self->nblocking;
    long long value = (long long)bg_sem_value(self->sem);
    if (locked && waiters)
        res = PyUnicode_FromFormat("<%U [locked, waiters:%zd]>", inner, waiters);
    else if (locked)
        res = PyUnicode_FromFormat("<%U [locked]>", inner);
    else if (waiters)
        res = PyUnicode_FromFormat("<%U [unlocked, value:%lld, waiters:%zd]>", inner, value,
                                   waiters);
    else
        res = PyUnicode_FromFormat("<%U [unlocked, value:%lld]>", inner, value);
done:
    Py_XDECREF(inner);
    Py_DECREF(base);
    return res;
}

static PyMethodDef sem_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))sem_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, /, n=1)\n--\n\nAwaitable: wait (FIFO) until n permits are free, take them, "
     "return True."},
    {"release", (PyCFunction)(void (*)(void))sem_release, METH_FASTCALL | METH_KEYWORDS,
     "release($self, /, n=1)\n--\n\nGive back n permits; callable from any thread."},
    {"locked", (PyCFunction)sem_locked, METH_NOARGS,
     "locked($self, /)\n--\n\nTrue if acquire() would have to wait."},
    {"acquire_blocking", (PyCFunction)(void (*)(void))sem_acquire_blocking,
     METH_FASTCALL | METH_KEYWORDS,
     "acquire_blocking($self, /, n=1, timeout=None)\n--\n\nFor plain threads: wait (FIFO, GIL "
     "released) for n permits. Returns True, or False on timeout."},
    {"_track_holders", (PyCFunction)sem_track_holders, METH_NOARGS,
     "_track_holders($self, /)\n--\n\n"
     "Record which tasks hold permits (a Dispatcher uses this semaphore)."},
    {"_held", (PyCFunction)sem_held, METH_NOARGS,
     "_held($self, /)\n--\n\n"
     "[permits, riding, waiters] this task holds (see Dispatcher), or None."},
    {"__aenter__", (PyCFunction)sem_aenter, METH_NOARGS, NULL},
    {"__aexit__", (PyCFunction)(void (*)(void))sem_aexit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sem_getset[] = {
    {"value", (getter)sem_get_value, NULL, "Free permits right now.", NULL},
    {"_value", (getter)sem_get_value, NULL, "Alias of value (asyncio's attribute).", NULL},
    {"bound", (getter)sem_get_bound, NULL, "The BoundedSemaphore's limit, else None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef sem_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Sem, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot sem_slots[] = {
    {Py_tp_doc, "Semaphore(value=1)\n--\n\nasyncio.Semaphore drop-in on a native, "
                "thread-safe, weighted FIFO counter."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, sem_init},
    {Py_tp_dealloc, sem_dealloc},
    {Py_tp_traverse, sem_traverse},
    {Py_tp_clear, sem_clear},
    {Py_tp_repr, sem_repr},
    {Py_tp_methods, sem_methods},
    {Py_tp_getset, sem_getset},
    {Py_tp_members, sem_members},
    {0, NULL},
};

static PyType_Spec sem_spec = {
    .name = "batchgate.Semaphore",
    .basicsize = sizeof(Sem),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = sem_slots,
};

static PyType_Slot bounded_slots[] = {
    {Py_tp_doc, "BoundedSemaphore(value=1)\n--\n\nSemaphore whose release() past the "
                "initial value raises ValueError."},
    {Py_tp_traverse, sem_traverse},
    {Py_tp_clear, sem_clear},
    {0, NULL},
};

static PyType_Spec bounded_spec = {
    .name = "batchgate.BoundedSemaphore",
    .basicsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = bounded_slots,
};

/* ---- C API and module hooks ---- */

PyObject *bg_loop_notifier(bg_state *st, PyObject *loop)
{
    return (PyObject *)notifier_for_loop(st, loop);
}

bg_notify *bg_loop_notifier_queue(PyObject *notifier)
{
    return ((LoopNotifier *)notifier)->notify;
}

bg_sem *bg_semaphore_core(bg_state *st, PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, st->SemaphoreType)) {
        PyErr_Format(PyExc_TypeError, "expected a batchgate.Semaphore, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    Sem *s = (Sem *)obj;
    if (sem_ready(s) < 0)
        return NULL;
    bg_sem_incref(s->sem);
    return s->sem;
}

/* ---- test hooks: act on the counter the way the dispatcher thread does ---- */

typedef struct {
    bg_sem *sem;
    int64_t n;
    int delay_ms;
} native_release_job;

static void *native_release_thread(void *p)
{
    native_release_job *job = p;
    struct timespec ts = {job->delay_ms / 1000, (long)(job->delay_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    bg_sem_release(job->sem, job->n); /* no GIL, no Python: like the engine */
    bg_sem_decref(job->sem);
    PyMem_RawFree(job);
    return NULL;
}

static PyObject *test_native_release_later(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs)
{
    long long n;
    int delay_ms;
    if (nargs != 3 || !PyArg_Parse(args[1], "L", &n) || !PyArg_Parse(args[2], "i", &delay_ms))
        return PyErr_Occurred() ? NULL
                                : PyErr_Format(PyExc_TypeError,
                                               "_sem_native_release_later(sem, n, delay_ms)");
    bg_sem *core = bg_semaphore_core(bg_module_state(module), args[0]);
    if (core == NULL)
        return NULL;
    native_release_job *job = PyMem_RawMalloc(sizeof *job);
    if (job == NULL) {
        bg_sem_decref(core);
        return PyErr_NoMemory();
    }
    job->sem = core;
    job->n = n;
    job->delay_ms = delay_ms;
    pthread_t th;
    int rc = pthread_create(&th, NULL, native_release_thread, job);
    if (rc != 0) {
        bg_sem_decref(core);
        PyMem_RawFree(job);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_detach(th);
    Py_RETURN_NONE;
}

static PyObject *test_native_try_acquire(PyObject *module, PyObject *const *args,
                                         Py_ssize_t nargs)
{
    long long n;
    if (nargs != 2 || !PyArg_Parse(args[1], "L", &n))
        return PyErr_Occurred() ? NULL
                                : PyErr_Format(PyExc_TypeError, "_sem_native_try_acquire(sem, n)");
    bg_sem *core = bg_semaphore_core(bg_module_state(module), args[0]);
    if (core == NULL)
        return NULL;
    bool ok = bg_sem_try_acquire(core, n);
    bg_sem_decref(core);
    return PyBool_FromLong(ok);
}

static PyMethodDef sem_test_methods[] = {
    {"_sem_native_release_later", (PyCFunction)(void (*)(void))test_native_release_later,
     METH_FASTCALL,
     "_sem_native_release_later(sem, n, delay_ms, /)\n--\n\n"
     "Test hook: release n permits from a native thread (no GIL) later."},
    {"_sem_native_try_acquire", (PyCFunction)(void (*)(void))test_native_try_acquire,
     METH_FASTCALL,
     "_sem_native_try_acquire(sem, n, /)\n--\n\nTest hook: take n permits through the C API."},
    {NULL, NULL, 0, NULL},
};

int bg_semaphore_exec(PyObject *module, bg_state *st)
{
    if (PyModule_AddFunctions(module, sem_test_methods) < 0)
        return -1;
    PyObject *names = PyTuple_New(N_COUNT);
    if (names == NULL)
        return -1;
    for (int i = 0; i < N_COUNT; i++) {
        PyObject *s = PyUnicode_InternFromString(name_strs[i]);
        if (s == NULL) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    st->sem_names = names;

    PyObject *weakref = PyImport_ImportModule("weakref");
    if (weakref == NULL)
        return -1;
    st->loop_notifiers = PyObject_CallMethod(weakref, "WeakKeyDictionary", NULL);
    Py_DECREF(weakref);
    if (st->loop_notifiers == NULL)
        return -1;

    st->LoopNotifierType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &notifier_spec, NULL);
    if (st->LoopNotifierType == NULL)
        return -1;
    st->SemAcquireType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &acq_spec, NULL);
    if (st->SemAcquireType == NULL)
        return -1;
    st->SemaphoreType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &sem_spec, NULL);
    if (st->SemaphoreType == NULL)
        return -1;
    st->BoundedSemaphoreType = (PyTypeObject *)PyType_FromModuleAndSpec(
        module, &bounded_spec, (PyObject *)st->SemaphoreType);
    if (st->BoundedSemaphoreType == NULL)
        return -1;
    if (PyModule_AddType(module, st->SemaphoreType) < 0 ||
        PyModule_AddType(module, st->BoundedSemaphoreType) < 0)
        return -1;
    return 0;
}

int bg_semaphore_traverse(bg_state *st, visitproc visit, void *arg)
{
    Py_VISIT(st->SemaphoreType);
    Py_VISIT(st->BoundedSemaphoreType);
    Py_VISIT(st->SemAcquireType);
    Py_VISIT(st->LoopNotifierType);
    Py_VISIT(st->get_running_loop);
    Py_VISIT(st->loop_notifiers);
    Py_VISIT(st->sem_names);
    return 0;
}

void bg_semaphore_clear(bg_state *st)
{
    Py_CLEAR(st->SemaphoreType);
    Py_CLEAR(st->BoundedSemaphoreType);
    Py_CLEAR(st->SemAcquireType);
    Py_CLEAR(st->LoopNotifierType);
    Py_CLEAR(st->get_running_loop);
    Py_CLEAR(st->loop_notifiers);
    Py_CLEAR(st->sem_names);
}
