/* bg_semaphore_blocking.c - Semaphore.acquire_blocking(): plain threads wait
 * in the same FIFO as asyncio tasks, on a condition variable with the GIL
 * released, waking every 100 ms to let the main thread see Ctrl-C.
 */
#include "bg_semaphore_priv.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

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

PyObject *semobj_acquire_blocking(Sem *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    static const char *const names[] = {"n", "timeout"};
    PyObject *opt[2];
    int64_t n = 1, timeout_ns = -1;
    if (semobj_ready(self) < 0)
        return NULL;
    if (semobj_parse_opt_args("acquire_blocking", args, nargs, kwnames, names, 2, opt) < 0 ||
        semobj_parse_permits(self, opt[0], &n) < 0)
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
            semobj_give(self, n);
        return NULL;
    }
    return PyBool_FromLong(got);
}

