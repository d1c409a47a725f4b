/* bg_semaphore_acquire.c - what Semaphore.acquire() and __aenter__() return,
 * and how grants reach the waiting task.
 *
 * The awaitable's first step takes the permits at once when nobody waits (no
 * future is made); otherwise it makes a loop future and queues a bg_sem
 * waiter. A grant callback (native lock held, no GIL) posts the waiter's node
 * to the loop's bridge (bg_loop_bridge): straight onto the caller's running
 * list when release() runs on the loop thread, else through the bridge's fd.
 * On the loop thread, with the GIL and no native lock, the future gets its
 * result - or, if it was cancelled meanwhile, the permits are released again
 * and so passed on (CPython gh-90155).
 */
#include "bg_semaphore_priv.h"

/* ---- native side: runs under the bg_sem lock, no Python ---- */

static void acq_on_grant(bg_sem_waiter *w)
{
    SemAcquire *a = (SemAcquire *)w->ctx;
    bg_loop_post(a->notify, &a->node);
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

/* bg_sem_release, catching grants of our loop's waiters in wl. */
static int release_into(Sem *s, int64_t n, bg_loop_work *wl)
{
    bg_loop_work *prev = bg_loop_work_enter(wl);
    int rc = bg_sem_release(s->sem, n);
    bg_loop_work_leave(prev);
    return rc;
}

/* Grants to waiters of our loop are completed right here when we are on the
 * loop thread (as asyncio's release does), else the loop learns of them
 * through its bridge. */
int semobj_give(Sem *s, int64_t n)
{
    if (s->npending > 0 && s->bridge != NULL && on_bound_loop_thread(s)) {
        bg_loop_work wl = {bg_loop_bridge_queue(s->bridge), BG_FIFO_INIT, 0};
        /* Grants other threads made earlier go first: wake in grant order. */
        bg_loop_take_grants(s->bridge, s->loop, &wl);
        int rc = release_into(s, n, &wl);
        bg_loop_work_run(&wl);
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
static void settle_queued(SemAcquire *a, int new_state, bg_loop_work *wl)
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
            semobj_give(s, a->n);
    } else {
        drop_inflight(a); /* removed: no grant will come */
    }
}

/* A grant reached the loop thread. */
void semobj_on_grant_node(bg_notify_node *node, bg_loop_work *wl)
{
    SemAcquire *a = node->payload;
    Sem *s = a->sem;
    if (wl->dying) {
        /* The bridge goes (the semaphore let go of it): nobody will resume
         * the waiter, but it must not stay listed once unreferenced. */
        if (a->state == ACQ_QUEUED) {
            pend_remove(s, a);
            a->state = ACQ_DONE;
            bg_sem_cancel(s->sem, &a->w);
            release_into(s, a->n, wl); /* the granted permits go on */
        }
        drop_inflight(a);
        return;
    }
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

/* Drop queued asyncio waiters whose futures were cancelled, from the front,
 * so that they do not count for locked() or block newcomers (asyncio ignores
 * cancelled futures in its deque). Stops at the first live waiter. */
int semobj_purge_cancelled(Sem *s)
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

/* ---- SemAcquire: what acquire() and __aenter__() return ----
 * Coroutine-like (send/throw/close/__await__), so asyncio.create_task() and
 * wait_for() accept it. Nothing happens until it is first awaited. */

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
        PyObject *bridge = bg_loop_bridge(st, running);
        if (bridge == NULL) {
            Py_DECREF(running);
            return NULL;
        }
        s->loop = running;
        s->bridge = bridge;
        return running;
    }
    if (running == s->loop && bg_loop_bridge_stale(s->bridge)) {
        /* Forked child: never touch the parent's queue (nor its lock). */
        PyObject *bridge = bg_loop_bridge(st, running);
        if (bridge == NULL) {
            Py_DECREF(running);
            return NULL;
        }
        Py_SETREF(s->bridge, bridge);
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
        if (s->pend_head != NULL && semobj_purge_cancelled(s) < 0)
            goto error;
        if (bg_sem_try_acquire(s->sem, a->n)) {
            if (semobj_hold_add(s, a->n) < 0) {
                semobj_give(s, a->n);
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
    a->notify = bg_loop_bridge_queue(s->bridge);
    bg_sem_waiter_init(&a->w, a->n, acq_on_grant, a);
    a->node.kind = BG_NODE_SEM_GRANT;
    a->node.payload = a;
    a->node.next = NULL;
    /* Grants from other threads only queue a node; it is processed on this
     * thread under the GIL, so the bookkeeping below is not racing it. */
    int rc = bg_sem_acquire_async(s->sem, &a->w);
    if (rc == 1) {
        if (fut_set_true(st, a->fut) < 0) {
            semobj_give(s, a->n);
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
        if (semobj_hold_add(s, a->n) < 0) {
            semobj_give(s, a->n);
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
        semobj_give(a->sem, a->n);
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
    semobj_give(a->sem, a->n);
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

PyType_Spec semobj_acq_spec = {
    .name = "batchgate._native._SemaphoreAcquire",
    .basicsize = sizeof(SemAcquire),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = acq_slots,
};

SemAcquire *semobj_acq_new(Sem *s, int64_t n, int state, int return_none)
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

