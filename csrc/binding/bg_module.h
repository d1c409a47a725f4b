/* bg_module.h - CPython binding layer: module state and per-file hooks.
 *
 * Each binding file (bg_sizing.c, bg_semaphore.c, bg_dispatcher.c, ...)
 * exports one bg_<name>_exec() that adds its functions and types to the module
 * and fills its part of the module state. Only this layer includes Python.h.
 */
#ifndef BATCHGATE_BG_MODULE_H
#define BATCHGATE_BG_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    /* Set by bg_module.c: the Python-level base of every batchgate error. */
    PyObject *BatchgateError;
    /* bg_semaphore.c adds its fields here. */
    PyTypeObject *SemaphoreType;
    PyTypeObject *BoundedSemaphoreType;
    PyTypeObject *SemAcquireType;   /* awaitable returned by acquire() */
    PyObject *get_running_loop;     /* asyncio's _get_running_loop */
    PyObject *sem_names;            /* tuple of interned method names */
    /* bg_loop_bridge.c (set up from bg_semaphore_exec). */
    PyTypeObject *LoopBridgeType;   /* per-loop wakeup fd + native queue */
    PyObject *loop_bridges;         /* WeakKeyDictionary loop -> bridge */
    PyObject *bridge_names;         /* tuple of interned method names */
    /* bg_dispatcher.c adds its fields here. */
    PyTypeObject *DispatcherType;   /* _native._Dispatcher: engine + notifier */
    PyTypeObject *JobType;          /* one generate/chat call or one map/as_completed */
    PyTypeObject *TemplateType;     /* validated request params (bg_tmpl) */
    PyTypeObject *ResultType;       /* batchgate.Result */
    PyObject *HTTPStatusError, *TransportError, *TimeoutError, *MalformedResponseError,
        *ClosedError;
    PyObject *CancelledError;       /* asyncio.CancelledError */
    PyObject *dsp_names;            /* tuple of interned names */
    PyObject *dsp_stop, *dsp_length; /* common finish reasons, shared */
} bg_state;

extern PyModuleDef bg_moduledef;

static inline bg_state *bg_module_state(PyObject *module)
{
    return (bg_state *)PyModule_GetState(module);
}

/* The module that defined tp or one of its bases (borrowed), as
 * PyType_GetModuleByDef does from 3.11 on. */
static inline PyObject *bg_module_of_type(PyTypeObject *tp)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyType_GetModuleByDef(tp, &bg_moduledef);
#else
    PyObject *mro = tp->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!(t->tp_flags & Py_TPFLAGS_HEAPTYPE))
            continue;
        PyObject *m = ((PyHeapTypeObject *)t)->ht_module;
        if (m && PyModule_GetDef(m) == &bg_moduledef)
            return m;
    }
    PyErr_Format(PyExc_TypeError, "%s is not a batchgate type", tp->tp_name);
    return NULL;
#endif
}

/* Module state reached from a heap type's method (defining class or type). */
static inline bg_state *bg_state_from_type(PyTypeObject *tp)
{
    PyObject *m = bg_module_of_type(tp);
    return m ? bg_module_state(m) : NULL;
}

/* Per-file exec hooks, called in this order from the module's Py_mod_exec. */
int bg_sizing_exec(PyObject *module, bg_state *st);
int bg_semaphore_exec(PyObject *module, bg_state *st);
int bg_semaphore_traverse(bg_state *st, visitproc visit, void *arg);
void bg_semaphore_clear(bg_state *st);
int bg_dispatcher_exec(PyObject *module, bg_state *st);
int bg_dispatcher_traverse(bg_state *st, visitproc visit, void *arg);
void bg_dispatcher_clear(bg_state *st);

#endif /* BATCHGATE_BG_MODULE_H */
