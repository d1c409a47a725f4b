/* bg_semaphore.c - batchgate.Semaphore / BoundedSemaphore: drop-ins for
 * asyncio's, on the native bg_sem counter that the dispatcher shares. This
 * file: the types, their argument parsing, the permits each task holds, the
 * C API and module hooks. The acquire() awaitable is in
 * bg_semaphore_acquire.c, acquire_blocking() in bg_semaphore_blocking.c.
 *
 * Semantics follow CPython 3.13's asyncio.Semaphore: FIFO; locked() is true
 * while any non-cancelled waiter exists, including one woken but not yet
 * resumed; a waiter cancelled after being woken gives its permit back.
 */
#include "bg_semaphore_priv.h"

#include <structmember.h>

static const char *const name_strs[N_COUNT] = {
    "cancelled", "set_result", "create_future", "_asyncio_future_blocking", "result",
};

/* ---- Semaphore / BoundedSemaphore ---- */

int semobj_ready(Sem *self)
{
    if (self->sem == NULL) {
        PyErr_Format(PyExc_RuntimeError, "%s.__init__() was not called", Py_TYPE(self)->tp_name);
        return -1;
    }
    return 0;
}

/* Tiny FASTCALL parser: optional positional-or-keyword arguments in order. */
int semobj_parse_opt_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
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

int semobj_parse_permits(Sem *self, PyObject *obj, int64_t *n)
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
int semobj_hold_add(Sem *s, int64_t n)
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
    Py_VISIT(self->bridge);
    return 0;
}

static int sem_clear(Sem *self)
{
    Py_CLEAR(self->held_var);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->bridge);
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
    Py_CLEAR(self->bridge);
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
    if (semobj_ready(self) < 0)
        return NULL;
    if ((nargs || kwnames) &&
        (semobj_parse_opt_args("acquire", args, nargs, kwnames, names, 1, &n_obj) < 0 ||
         semobj_parse_permits(self, n_obj, &n) < 0))
        return NULL;
    return (PyObject *)semobj_acq_new(self, n, ACQ_INIT, 0);
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
    if (semobj_ready(self) < 0)
        return NULL;
    if ((nargs || kwnames) &&
        (semobj_parse_opt_args("release", args, nargs, kwnames, names, 1, &n_obj) < 0 ||
         semobj_parse_permits(self, n_obj, &n) < 0))
        return NULL;
    if (semobj_give(self, n) < 0)
        return release_error(self);
    hold_sub(self, n);
    Py_RETURN_NONE;
}

static int sem_locked_impl(Sem *self)
{
    if (self->woken > 0)
        return 1;
    if (self->pend_head != NULL && semobj_purge_cancelled(self) < 0)
        return -1;
    return bg_sem_would_block(self->sem, 1);
}

static PyObject *sem_locked(Sem *self, PyObject *Py_UNUSED(ignored))
{
    if (semobj_ready(self) < 0)
        return NULL;
    int r = sem_locked_impl(self);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyObject *sem_aenter(Sem *self, PyObject *Py_UNUSED(ignored))
{
    if (semobj_ready(self) < 0)
        return NULL;
    return (PyObject *)semobj_acq_new(self, 1, ACQ_INIT, 1);
}

static PyObject *sem_aexit(Sem *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args;
    (void)nargs;
    if (semobj_ready(self) < 0)
        return NULL;
    if (semobj_give(self, 1) < 0)
        return release_error(self);
    hold_sub(self, 1);
    return (PyObject *)semobj_acq_new(self, 1, ACQ_NOOP, 1);
}


static PyObject *sem_get_value(Sem *self, void *Py_UNUSED(closure))
{
    if (semobj_ready(self) < 0)
        return NULL;
    return PyLong_FromLongLong(bg_sem_value(self->sem));
}

static PyObject *sem_get_bound(Sem *self, void *Py_UNUSED(closure))
{
    if (semobj_ready(self) < 0)
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
    {"acquire_blocking", (PyCFunction)(void (*)(void))semobj_acquire_blocking,
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

bg_sem *bg_semaphore_core(bg_state *st, PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, st->SemaphoreType)) {
        PyErr_Format(PyExc_TypeError, "expected a batchgate.Semaphore, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    Sem *s = (Sem *)obj;
    if (semobj_ready(s) < 0)
        return NULL;
    bg_sem_incref(s->sem);
    return s->sem;
}


int bg_semaphore_exec(PyObject *module, bg_state *st)
{
    if (semobj_testhooks_exec(module) < 0)
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
    /* The loop bridge is the semaphore's and the dispatcher's: made first. */
    if (bg_loop_bridge_exec(module, st) < 0 ||
        bg_loop_set_handler(BG_NODE_SEM_GRANT, semobj_on_grant_node) < 0)
        return -1;
    st->SemAcquireType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &semobj_acq_spec, NULL);
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
    Py_VISIT(st->get_running_loop);
    Py_VISIT(st->sem_names);
    return bg_loop_bridge_traverse(st, visit, arg);
}

void bg_semaphore_clear(bg_state *st)
{
    Py_CLEAR(st->SemaphoreType);
    Py_CLEAR(st->BoundedSemaphoreType);
    Py_CLEAR(st->SemAcquireType);
    Py_CLEAR(st->get_running_loop);
    Py_CLEAR(st->sem_names);
    bg_loop_bridge_clear(st);
}
