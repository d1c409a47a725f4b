/* bg_loop_bridge.c - one bridge per event loop between native threads and
 * asyncio (see bg_loop_bridge.h): the _LoopBridge type, its watcher thread
 * for loops without add_reader, and the per-producer wake sources.
 */
#include "bg_loop_bridge.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

enum {
    B_ADD_READER,
    B_CALL_SOON,
    B_CALL_SOON_TS,
    B_ON_READABLE,
    B_ON_READY,
    B_COUNT
};
static const char *const bname_strs[B_COUNT] = {
    "add_reader", "call_soon", "call_soon_threadsafe", "_on_readable", "_on_ready",
};
#define BNAME(st, i) PyTuple_GET_ITEM((st)->bridge_names, (i))

/* Per event loop (and process): the wakeup fd and native queue. */
typedef struct {
    PyObject_HEAD
    bg_notify *notify;
    bg_state *st;
    unsigned long fork_gen;  /* bg_fork_generation when made */
    int fallback;            /* no add_reader: a watcher thread forwards */
    int scheduled;           /* _on_ready is scheduled (GIL) */
    bg_fifo ready;           /* drained, not yet run (GIL) */
    PyObject *call_soon_threadsafe;          /* fallback watcher only */
} LoopBridge;

#define BRIDGE_STALE(b) ((b)->fork_gen != __atomic_load_n(&bg_fork_generation, __ATOMIC_RELAXED))

static bg_loop_node_fn node_handlers[BG_LOOP_NODE_KINDS];
static _Thread_local bg_loop_work *tls_work;

int bg_loop_set_handler(int kind, bg_loop_node_fn fn)
{
    if (kind <= 0 || kind >= BG_LOOP_NODE_KINDS) {
        PyErr_Format(PyExc_SystemError, "bad loop bridge node kind %d", kind);
        return -1;
    }
    node_handlers[kind] = fn;
    return 0;
}

/* ---- running nodes on the loop thread ---- */

void bg_loop_post(bg_notify *target, bg_notify_node *node)
{
    bg_loop_work *wl = tls_work;
    if (wl != NULL && wl->target == target)
        bg_fifo_push(&wl->q, node);
    else
        bg_notify_push(target, node);
}

bg_loop_work *bg_loop_work_enter(bg_loop_work *wl)
{
    bg_loop_work *prev = tls_work;
    tls_work = wl;
    return prev;
}

void bg_loop_work_leave(bg_loop_work *prev)
{
    tls_work = prev;
}

void bg_loop_work_run(bg_loop_work *wl)
{
    bg_notify_node *node;
    /* Popped before its handler runs: the handler may reuse the node. */
    while ((node = bg_fifo_pop(&wl->q)) != NULL) {
        if (node->kind > 0 && node->kind < BG_LOOP_NODE_KINDS && node_handlers[node->kind])
            node_handlers[node->kind](node, wl);
    }
}

void bg_loop_take_grants(PyObject *bridge, PyObject *loop, bg_loop_work *wl)
{
    LoopBridge *b = (LoopBridge *)bridge;
    bg_fifo all = b->ready;
    b->ready = (bg_fifo)BG_FIFO_INIT;
    if (bg_notify_pending(b->notify))
        bg_fifo_append(&all, bg_notify_drain(b->notify));
    int deferred = 0;
    bg_notify_node *node;
    while ((node = bg_fifo_pop(&all)) != NULL) {
        if (node->kind == BG_NODE_SEM_GRANT) {
            bg_fifo_push(&wl->q, node);
        } else {
            /* A dispatcher's delivery runs user iterators: never inside a
             * release() call. */
            bg_fifo_push(&b->ready, node);
            deferred = 1;
        }
    }
    if (deferred && !b->scheduled) {
        PyObject *cb = PyObject_GetAttr(bridge, BNAME(b->st, B_ON_READY));
        PyObject *h = cb ? PyObject_CallMethodOneArg(loop, BNAME(b->st, B_CALL_SOON), cb) : NULL;
        Py_XDECREF(cb);
        if (h) {
            Py_DECREF(h);
            b->scheduled = 1;
        } else {
            /* Loop closed: run them now rather than never. */
            PyErr_Clear();
            bg_loop_work now = {b->notify, b->ready, 0};
            b->ready = (bg_fifo)BG_FIFO_INIT;
            bg_loop_work_run(&now);
        }
    }
}

/* ---- the _LoopBridge type ---- */

static void bridge_drop_queued(LoopBridge *b)
{
    /* Let each owner release what its queued nodes hold. */
    bg_loop_work wl = {b->notify, b->ready, 1};
    b->ready = (bg_fifo)BG_FIFO_INIT;
    bg_fifo_append(&wl.q, bg_notify_drain(b->notify));
    bg_loop_work_run(&wl);
}

static void bridge_dealloc(LoopBridge *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->call_soon_threadsafe);
    /* Made before fork(): its lock may be held by a thread that is gone. */
    if (self->notify && !BRIDGE_STALE(self)) {
        bridge_drop_queued(self);
        bg_notify_destroy(self->notify);
    }
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int bridge_traverse(LoopBridge *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->call_soon_threadsafe);
    return 0;
}

static int bridge_clear(LoopBridge *self)
{
    Py_CLEAR(self->call_soon_threadsafe);
    return 0;
}

static PyObject *bridge_on_readable(LoopBridge *self, PyObject *Py_UNUSED(ignored))
{
    if (BRIDGE_STALE(self))
        Py_RETURN_NONE;
    bg_loop_work wl = {self->notify, BG_FIFO_INIT, 0};
    bg_fifo_append(&wl.q, bg_notify_drain(self->notify));
    bg_loop_work_run(&wl);
    Py_RETURN_NONE;
}

static PyObject *bridge_on_ready(LoopBridge *self, PyObject *Py_UNUSED(ignored))
{
    bg_loop_work wl = {self->notify, self->ready, 0};
    self->ready = (bg_fifo)BG_FIFO_INIT;
    self->scheduled = 0;
    if (!BRIDGE_STALE(self))
        bg_loop_work_run(&wl);
    Py_RETURN_NONE;
}

/* 1 if the loop behind call_soon_threadsafe is closed, 0 if not, -1 error. */
static int watched_loop_closed(LoopBridge *self)
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

/* Watcher thread body (loops without add_reader): wait on the fd without the
 * GIL, move drained nodes to the ready list and schedule _on_ready on the
 * loop. Ends once the loop is closed (checked every second while idle), and
 * lets go of the loop then. */
static PyObject *bridge_watch_loop(LoopBridge *self)
{
    for (;;) {
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = bg_notify_wait(self->notify, 1000);
        Py_END_ALLOW_THREADS
        if (BRIDGE_STALE(self))
            Py_RETURN_NONE;
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
        bg_fifo_append(&self->ready, list);
        if (!self->scheduled) {
            PyObject *cb = PyObject_GetAttr((PyObject *)self, BNAME(self->st, B_ON_READY));
            if (cb == NULL)
                return NULL;
            /* Set first: call_soon_threadsafe may drop the GIL (it writes the
             * loop's self-pipe), and _on_ready may run before it returns. */
            self->scheduled = 1;
            PyObject *h = PyObject_CallOneArg(self->call_soon_threadsafe, cb);
            Py_DECREF(cb);
            if (h == NULL) {
                self->scheduled = 0;
                if (PyErr_ExceptionMatches(PyExc_RuntimeError)) { /* loop closed */
                    PyErr_Clear();
                    Py_RETURN_NONE;
                }
                return NULL;
            }
            Py_DECREF(h);
        }
    }
}

static PyObject *bridge_watch(LoopBridge *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *r = bridge_watch_loop(self);
    Py_CLEAR(self->call_soon_threadsafe); /* the loop may go now */
    return r;
}

static PyMethodDef bridge_methods[] = {
    {"_on_readable", (PyCFunction)bridge_on_readable, METH_NOARGS, NULL},
    {"_on_ready", (PyCFunction)bridge_on_ready, METH_NOARGS, NULL},
    {"_watch", (PyCFunction)bridge_watch, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *bridge_get_fallback(LoopBridge *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->fallback);
}

static PyObject *bridge_get_fd(LoopBridge *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(bg_notify_fd(self->notify));
}

static PyGetSetDef bridge_getset[] = {
    {"fallback", (getter)bridge_get_fallback, NULL, "watched by a thread (no add_reader)", NULL},
    {"fd", (getter)bridge_get_fd, NULL, "the wakeup fd the loop watches", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot bridge_slots[] = {
    {Py_tp_dealloc, bridge_dealloc},
    {Py_tp_traverse, bridge_traverse},
    {Py_tp_clear, bridge_clear},
    {Py_tp_methods, bridge_methods},
    {Py_tp_getset, bridge_getset},
    {0, NULL},
};

static PyType_Spec bridge_spec = {
    .name = "batchgate._native._LoopBridge",
    .basicsize = sizeof(LoopBridge),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = bridge_slots,
};

static int start_watcher(LoopBridge *b, PyObject *loop)
{
    bg_state *st = b->st;
    PyObject *threading = NULL, *thread_cls = NULL, *target = NULL, *kwargs = NULL,
             *noargs = NULL, *thread = NULL, *r = NULL;
    int rc = -1;
    b->call_soon_threadsafe = PyObject_GetAttr(loop, BNAME(st, B_CALL_SOON_TS));
    if (b->call_soon_threadsafe == NULL)
        goto done;
    threading = PyImport_ImportModule("threading");
    if (threading == NULL)
        goto done;
    thread_cls = PyObject_GetAttrString(threading, "Thread");
    target = PyObject_GetAttrString((PyObject *)b, "_watch");
    kwargs = Py_BuildValue("{sOsssO}", "target", target ? target : Py_None, "name",
                           "batchgate-loop-notifier", "daemon", Py_True);
    noargs = PyTuple_New(0);
    if (thread_cls == NULL || target == NULL || kwargs == NULL || noargs == NULL)
        goto done;
    thread = PyObject_Call(thread_cls, noargs, kwargs);
    if (thread == NULL)
        goto done;
    r = PyObject_CallMethod(thread, "start", NULL);
    if (r == NULL)
        goto done;
    b->fallback = 1;
    rc = 0;
done:
    Py_XDECREF(threading);
    Py_XDECREF(thread_cls);
    Py_XDECREF(target);
    Py_XDECREF(kwargs);
    Py_XDECREF(noargs);
    Py_XDECREF(thread);
    Py_XDECREF(r);
    return rc;
}

PyObject *bg_loop_bridge(bg_state *st, PyObject *loop)
{
    PyObject *found = PyObject_GetItem(st->loop_bridges, loop);
    if (found != NULL) {
        if (!BRIDGE_STALE((LoopBridge *)found))
            return found;
        Py_DECREF(found); /* the parent's, before fork(): make our own */
    } else {
        /* TypeError: the loop cannot be weakly referenced (handled below). */
        if (!PyErr_ExceptionMatches(PyExc_KeyError) && !PyErr_ExceptionMatches(PyExc_TypeError))
            return NULL;
        PyErr_Clear();
    }

    LoopBridge *b = PyObject_GC_New(LoopBridge, st->LoopBridgeType);
    if (b == NULL)
        return NULL;
    b->notify = NULL;
    b->st = st;
    b->fork_gen = __atomic_load_n(&bg_fork_generation, __ATOMIC_RELAXED);
    b->fallback = 0;
    b->scheduled = 0;
    b->ready = (bg_fifo)BG_FIFO_INIT;
    b->call_soon_threadsafe = NULL;
    PyObject_GC_Track(b);
    b->notify = bg_notify_create();
    if (b->notify == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    PyObject *cb = PyObject_GetAttr((PyObject *)b, BNAME(st, B_ON_READABLE));
    if (cb == NULL)
        goto fail;
    PyObject *fd = PyLong_FromLong(bg_notify_fd(b->notify));
    if (fd == NULL) {
        Py_DECREF(cb);
        goto fail;
    }
    PyObject *r = PyObject_CallMethodObjArgs(loop, BNAME(st, B_ADD_READER), fd, cb, NULL);
    Py_DECREF(fd);
    Py_DECREF(cb);
    if (r != NULL) {
        Py_DECREF(r);
    } else if (PyErr_ExceptionMatches(PyExc_NotImplementedError) ||
               PyErr_ExceptionMatches(PyExc_AttributeError)) {
        /* e.g. the proactor loop: no add_reader. */
        PyErr_Clear();
        if (start_watcher(b, loop) < 0)
            goto fail;
    } else {
        goto fail;
    }
    if (PyObject_SetItem(st->loop_bridges, loop, (PyObject *)b) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            goto fail;
        /* A loop without weakref support: this bridge serves only the
         * object that asked for it. */
        PyErr_Clear();
    }
    return (PyObject *)b;
fail:
    Py_DECREF(b);
    return NULL;
}

bg_notify *bg_loop_bridge_queue(PyObject *bridge)
{
    return ((LoopBridge *)bridge)->notify;
}

int bg_loop_bridge_stale(PyObject *bridge)
{
    return BRIDGE_STALE((LoopBridge *)bridge);
}

/* ---- wake sources ----
 * The producer's queue and the wake node's state share one short mutex,
 * never held with the GIL wanted: the engine thread pushes under it without
 * the GIL, the loop thread takes it with the GIL but calls nothing inside.
 * A node posted to a bridge stays there until that bridge runs or dies; when
 * the source is rebound meanwhile (e.g. the old loop closed first), the old
 * node is left behind and a fresh one serves the new bridge. */

typedef struct {
    bg_notify_node node;         /* first: handlers get &node */
    bg_loop_source *src;
} wake_node;

struct bg_loop_source {
    pthread_mutex_t mu;
    bg_fifo q;                   /* the producer's queue (mu) */
    bg_notify *target;           /* bound bridge's queue, or NULL (mu) */
    wake_node *wake;             /* the node for target (mu) */
    int posted;                  /* wake is on its way to target (mu) */
    int nodes_out;               /* nodes on some bridge, wake included (mu) */
    int freed;                   /* owner done: the last claim frees (mu) */
    int pushing;                 /* posts decided under mu, still under way (atomic) */
    int kind;
    void *owner;                 /* NULL once detached (mu) */
    PyObject *bridge;            /* strong, keeps target alive (GIL) */
};

static wake_node *wake_new(bg_loop_source *s)
{
    wake_node *w = calloc(1, sizeof *w);
    if (w) {
        w->node.kind = s->kind;
        w->node.payload = s;
        w->src = s;
    }
    return w;
}

bg_loop_source *bg_loop_source_new(int kind, void *owner)
{
    bg_loop_source *s = calloc(1, sizeof *s);
    if (s == NULL || pthread_mutex_init(&s->mu, NULL) != 0) {
        free(s);
        PyErr_NoMemory();
        return NULL;
    }
    s->kind = kind;
    s->owner = owner;
    if ((s->wake = wake_new(s)) == NULL) {
        pthread_mutex_destroy(&s->mu);
        free(s);
        PyErr_NoMemory();
        return NULL;
    }
    return s;
}

static void source_destroy(bg_loop_source *s)
{
    pthread_mutex_destroy(&s->mu);
    free(s->wake);
    free(s);
}

/* Posting is decided under mu but done after it (the push may write the
 * bridge's fd: no syscall inside our lock, which the loop thread wants right
 * after that write wakes it). Whoever may free a target or a node first
 * waits for posts under way (source_quiesce). */
typedef struct {
    bg_notify *queue;
    bg_notify_node *node;
} post;

/* mu held. */
static post source_post(bg_loop_source *s)
{
    post p = {NULL, NULL};
    if (s->target && !s->posted && !bg_fifo_empty(&s->q)) {
        s->posted = 1;
        s->nodes_out++;
        __atomic_add_fetch(&s->pushing, 1, __ATOMIC_ACQ_REL);
        p.queue = s->target;
        p.node = &s->wake->node;
    }
    return p;
}

/* mu released. */
static void post_finish(bg_loop_source *s, post p)
{
    if (p.queue) {
        bg_notify_push(p.queue, p.node);
        __atomic_sub_fetch(&s->pushing, 1, __ATOMIC_RELEASE);
    }
}

static void source_quiesce(bg_loop_source *s)
{
    while (__atomic_load_n(&s->pushing, __ATOMIC_ACQUIRE) != 0)
        sched_yield();
}

void bg_loop_source_queue(bg_loop_source *s, bg_notify_node *node)
{
    pthread_mutex_lock(&s->mu);
    bg_fifo_push(&s->q, node);
    pthread_mutex_unlock(&s->mu);
}

void bg_loop_source_flush(bg_loop_source *s)
{
    pthread_mutex_lock(&s->mu);
    post p = source_post(s);
    pthread_mutex_unlock(&s->mu);
    post_finish(s, p);
}

bg_notify_node *bg_loop_source_take(bg_loop_source *s)
{
    pthread_mutex_lock(&s->mu);
    bg_notify_node *list = bg_fifo_take(&s->q);
    pthread_mutex_unlock(&s->mu);
    return list;
}

int bg_loop_source_pending(bg_loop_source *s)
{
    pthread_mutex_lock(&s->mu);
    int p = !bg_fifo_empty(&s->q);
    pthread_mutex_unlock(&s->mu);
    return p;
}

int bg_loop_source_bind(bg_loop_source *s, PyObject *bridge)
{
    wake_node *fresh = wake_new(s); /* not under mu: malloc may be slow */
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *old = s->bridge;
    s->bridge = Py_XNewRef(bridge);
    pthread_mutex_lock(&s->mu);
    if (s->posted) {
        /* Still on the old bridge's queue: leave it to that bridge. */
        s->wake = fresh;
        fresh = NULL;
        s->posted = 0;
    }
    s->target = bridge ? bg_loop_bridge_queue(bridge) : NULL;
    post p = source_post(s); /* completions that came while unbound */
    pthread_mutex_unlock(&s->mu);
    post_finish(s, p);
    free(fresh);
    source_quiesce(s);
    Py_XDECREF(old); /* after: nobody pushes to its queue any more */
    return 0;
}

void *bg_loop_source_claim(bg_notify_node *node, const bg_loop_work *wl, int *current)
{
    wake_node *w = (wake_node *)node;
    bg_loop_source *s = w->src;
    pthread_mutex_lock(&s->mu);
    s->nodes_out--;
    int ours = w == s->wake;
    if (ours)
        s->posted = 0;
    void *owner = s->owner;
    *current = ours && owner && !wl->dying && s->target == wl->target;
    post p = {NULL, NULL};
    if (owner && !*current)
        p = source_post(s); /* rebound meanwhile: wake the loop it is bound to now */
    int last = s->freed && s->nodes_out == 0;
    pthread_mutex_unlock(&s->mu);
    post_finish(s, p);
    if (!ours)
        free(w);
    if (last)
        source_destroy(s);
    return owner;
}

void bg_loop_source_detach(bg_loop_source *s)
{
    pthread_mutex_lock(&s->mu);
    s->owner = NULL;
    s->target = NULL;
    pthread_mutex_unlock(&s->mu);
    source_quiesce(s);
    Py_CLEAR(s->bridge);
}

void bg_loop_source_free(bg_loop_source *s)
{
    pthread_mutex_lock(&s->mu);
    s->owner = NULL;
    s->target = NULL;
    int out = s->nodes_out;
    s->freed = out > 0;
    pthread_mutex_unlock(&s->mu);
    source_quiesce(s);
    Py_CLEAR(s->bridge);
    if (out == 0)
        source_destroy(s);
}

/* ---- module hooks ---- */

int bg_loop_bridge_exec(PyObject *module, bg_state *st)
{
    PyObject *names = PyTuple_New(B_COUNT);
    if (names == NULL)
        return -1;
    for (int i = 0; i < B_COUNT; i++) {
        PyObject *s = PyUnicode_InternFromString(bname_strs[i]);
        if (s == NULL) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    st->bridge_names = names;
    PyObject *weakref = PyImport_ImportModule("weakref");
    if (weakref == NULL)
        return -1;
    st->loop_bridges = PyObject_CallMethod(weakref, "WeakKeyDictionary", NULL);
    Py_DECREF(weakref);
    if (st->loop_bridges == NULL)
        return -1;
    st->LoopBridgeType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &bridge_spec, NULL);
    if (st->LoopBridgeType == NULL)
        return -1;
    return 0;
}

int bg_loop_bridge_traverse(bg_state *st, visitproc visit, void *arg)
{
    Py_VISIT(st->LoopBridgeType);
    Py_VISIT(st->loop_bridges);
    Py_VISIT(st->bridge_names);
    return 0;
}

void bg_loop_bridge_clear(bg_state *st)
{
    Py_CLEAR(st->LoopBridgeType);
    Py_CLEAR(st->loop_bridges);
    Py_CLEAR(st->bridge_names);
}
