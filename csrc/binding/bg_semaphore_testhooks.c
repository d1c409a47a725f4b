/* bg_semaphore_testhooks.c - test-only module functions that act on a
 * Semaphore's native counter the way the dispatcher's engine thread does
 * (from a thread without the GIL), so tests can cross that boundary.
 */
#include "bg_semaphore_priv.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

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

int semobj_testhooks_exec(PyObject *module)
{
    return PyModule_AddFunctions(module, sem_test_methods);
}
