/* bg_dispatcher.c - batchgate._native._Dispatcher: the CPython face of the
 * bg_http engine.
 *
 * Work is submitted as a _Job: one request (generate/chat), or a stream of
 * prompts pulled from an iterator a window at a time (map/as_completed), so a
 * million prompts never become a million Python objects in flight. The engine
 * thread never takes the GIL: each finished request is queued on the
 * dispatcher's wake source, and each round of the engine's loop that
 * finished something wakes the event loop once, through the loop's one
 * bridge (bg_loop_bridge, shared with the semaphores); the loop thread
 * drains it in one GIL hold, builds Result objects or exceptions, refills
 * windows and resolves futures.
 */
#include "bg_dispatcher.h"

#include "bg_loop_bridge.h"
#include "bg_semaphore.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>
#include <unistd.h>

static const char *const dn_strs[DN_COUNT] = {
    "done", "set_result", "set_exception", "status", "message", "attempts", "curl_code", "index",
};

unsigned long bg_fork_generation;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_child_bump(void)
{
    __atomic_add_fetch(&bg_fork_generation, 1, __ATOMIC_RELAXED);
}

static void fork_register(void)
{
    (void)pthread_atfork(NULL, NULL, fork_child_bump);
}

static int core_check(Core *c)
{
    if (!c->st) {
        PyErr_SetString(PyExc_RuntimeError, "_Dispatcher.__init__ was not called");
        return -1;
    }
    if (CORE_FORKED(c)) {
        PyErr_SetString(c->st->BatchgateError,
                        "this Dispatcher was created before fork(); create a new one in the "
                        "child process");
        return -1;
    }
    if (c->closed || !c->engine) {
        PyErr_SetString(c->st->ClosedError, "the Dispatcher is closed");
        return -1;
    }
    return 0;
}

int bg_core_check(Core *c)
{
    return core_check(c);
}

/* ---- what a job asks of the core (bg_dispatcher.h) ---------------------- */

int bg_core_open(const Core *c)
{
    return c->engine && !c->closed && !CORE_FORKED(c);
}

int bg_core_submit(Core *c, DItem **items, Py_ssize_t n)
{
    if (!bg_core_open(c)) {
        PyErr_SetString(c->st->ClosedError, "the Dispatcher is closed");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        items[i]->r.id = ++c->next_id;
    if (bg_engine_submit_many(c->engine, (bg_request **)items, (size_t)n) < 0) {
        PyErr_SetString(c->st->ClosedError, "the Dispatcher is closed");
        return -1;
    }
    c->live_items += n;
    return 0;
}

void bg_core_cancel(Core *c, uint64_t id)
{
    if (bg_core_open(c))
        bg_engine_cancel(c->engine, id);
}

void bg_core_cancel_group(Core *c, uint64_t group)
{
    if (bg_core_open(c))
        bg_engine_cancel_group(c->engine, group);
}

void bg_core_item_delivered(Core *c)
{
    c->live_items--;
}

void bg_core_item_clear(Core *c, bg_request *r)
{
    bg_request_clear_into(r, &c->spent);
}

PyObject *bg_core_result_new(Core *c, const bg_request *r, int keep_id)
{
    return bg_result_new(c->st, r, keep_id, &c->model_cache);
}

void bg_core_add_job(Core *c, Job *j)
{
    j->jprev = NULL;
    j->jnext = c->jobs;
    if (c->jobs)
        c->jobs->jprev = j;
    c->jobs = j;
    j->listed = 1;
}

void bg_core_forget_job(Core *c, Job *j)
{
    if (!j->listed)
        return;
    if (j->jprev)
        j->jprev->jnext = j->jnext;
    else
        c->jobs = j->jnext;
    if (j->jnext)
        j->jnext->jprev = j->jprev;
    j->jprev = j->jnext = NULL;
    j->listed = 0;
}

/* ---- Core -------------------------------------------------------------- */

/* Engine thread, no GIL, no engine lock: just queue it for the loop on our
 * wake source (ctx). Unbound, it waits there; bind() wakes the new loop. */
static void core_on_done(bg_request *r, void *ctx)
{
    DItem *it = r->user;
    bg_loop_source_queue((bg_loop_source *)ctx, &it->node);
}

/* Engine thread, after a round of core_on_done: wake the loop once for the
 * whole round (a loop woken at the first completion would take a handful
 * and be woken again for the rest). */
static void core_on_flush(void *ctx)
{
    bg_loop_source_flush((bg_loop_source *)ctx);
}

/* Deliver up to limit finished requests (loop thread, GIL held): first the
 * backlog, else a fresh drain of the queue. Returns how many. */
static Py_ssize_t core_drain(Core *c, int deliver, Py_ssize_t limit)
{
    bg_notify_node *n = c->backlog;
    c->backlog = NULL;
    if (!n)
        n = bg_loop_source_take(c->wake);
    Py_ssize_t count = 0;
    Job *touched_stack[32];
    Job **touched = touched_stack;
    Py_ssize_t ntouched = 0, cap = 32;
    while (n) {
        if (count >= limit) {
            c->backlog = n;
            break;
        }
        bg_notify_node *next = n->next;
        DItem *it = n->payload;
        Job *j = it->job;
        if (deliver) {
            bg_job_item_done(j, it);
        } else {
            /* Closed loop / interpreter exit: drop and release (the job's
             * caller hears ClosedError from core_end_jobs). */
            j->live--;
            c->live_items--;
            bg_job_item_release(j, it);
        }
        count++;
        /* Remember the job once to refill/finish it after the batch. */
        int seen = 0;
        for (Py_ssize_t i = 0; i < ntouched && !seen; i++)
            seen = touched[i] == j;
        if (!seen) {
            if (ntouched == cap) {
                Job **bigger = malloc((size_t)cap * 2 * sizeof(Job *));
                if (!bigger) {
                    /* Finish this one now instead of later. */
                    Py_INCREF(j);
                    bg_job_maybe_finish(j);
                    bg_job_drop_self(j);
                    Py_DECREF(j);
                    n = next;
                    continue;
                }
                memcpy(bigger, touched, (size_t)ntouched * sizeof(Job *));
                if (touched != touched_stack)
                    free(touched);
                touched = bigger;
                cap *= 2;
            }
            Py_INCREF(j); /* bg_job_drop_self below may release the last other ref */
            touched[ntouched++] = j;
        }
        n = next;
    }
    for (Py_ssize_t i = 0; i < ntouched; i++) {
        Job *j = touched[i];
        if (deliver && !c->closed && c->engine)
            (void)bg_job_refill(j);
        if (deliver)
            bg_job_maybe_finish(j);
        bg_job_drop_self(j);
        Py_DECREF(j);
    }
    if (touched != touched_stack)
        free(touched);
    /* The answers just read go back to the engine thread to be freed. */
    if (bg_core_open(c))
        bg_engine_give_back(c->engine, &c->spent);
    PyErr_Clear();
    return count;
}

/* Deliver a batch (loop thread, GIL held); what is left over runs in a
 * loop.call_soon, so one callback never holds the loop for long. */
static void core_deliver(Core *self);

/* Run _on_readable soon on the bound loop (once). */
static void core_schedule(Core *self)
{
    if (self->resched || !self->call_soon)
        return;
    PyObject *cb = PyObject_GetAttrString((PyObject *)self, "_on_readable");
    PyObject *h = cb ? PyObject_CallOneArg(self->call_soon, cb) : NULL;
    Py_XDECREF(cb);
    if (h) {
        Py_DECREF(h);
        self->resched = 1;
    } else {
        /* Loop closing: deliver the rest now rather than never. */
        PyErr_Clear();
        while (core_drain(self, 1, PY_SSIZE_T_MAX) > 0 || self->backlog)
            ;
    }
}

static void core_deliver(Core *self)
{
    /* A batch from the backlog leaves the queue alone: what it holds may have
     * spent its wake-up already, so it needs this callback's follow-up. */
    int had_backlog = self->backlog != NULL;
    core_drain(self, 1, DRAIN_LIMIT);
    if (self->backlog || (had_backlog && bg_loop_source_pending(self->wake)))
        core_schedule(self);
}

static PyObject *core_on_readable(Core *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->st || CORE_FORKED(self) || !self->wake)
        Py_RETURN_NONE;
    self->resched = 0;
    core_deliver(self);
    Py_RETURN_NONE;
}

/* The bridge's handler of BG_NODE_DISPATCH: our wake node came out of a
 * loop's bridge. Deliver only on the loop we are bound to now. */
static void core_on_wake(bg_notify_node *node, bg_loop_work *wl)
{
    int current;
    Core *self = bg_loop_source_claim(node, wl, &current);
    if (!self || !current || CORE_FORKED(self))
        return;
    Py_INCREF(self);
    core_deliver(self);
    Py_DECREF(self);
}

/* bind(loop_or_None): deliver on loop from now on, through its bridge (the
 * one the loop's semaphores use); None: deliver nowhere until bound again. */
static PyObject *core_bind(Core *self, PyObject *loop)
{
    if (loop == Py_None && (!self->st || CORE_FORKED(self)))
        Py_RETURN_NONE; /* nothing bound here: nothing to undo */
    if (loop != Py_None && core_check(self) < 0)
        return NULL;
    PyObject *cs = NULL, *bridge = NULL;
    if (loop != Py_None) {
        if (!(cs = PyObject_GetAttrString(loop, "call_soon")))
            return NULL;
        if (bg_loop_set_handler(BG_NODE_DISPATCH, core_on_wake) < 0 ||
            !(bridge = bg_loop_bridge(self->st, loop))) {
            Py_DECREF(cs);
            return NULL;
        }
    }
    /* Completions that came while unbound wake the new bridge here. */
    if (self->wake && bg_loop_source_bind(self->wake, bridge) < 0) {
        Py_XDECREF(cs);
        Py_XDECREF(bridge);
        return NULL;
    }
    Py_XDECREF(bridge);
    Py_XSETREF(self->call_soon, cs);
    self->resched = 0;
    Py_RETURN_NONE;
}

/* submit(mode, kind, source, template, future, window, return_exceptions,
 *        count_preheld=False, prompt_counts=None) -> _Job
 * prompt_counts: a list of int, the exact prompt tokens of each input item
 * (item i charged with prompt_counts[i] instead of the estimate).
 * kind: 0 (or False) completions, 1 (True) chat, 2 (TOKENIZE) vLLM's /tokenize
 * with one str per item, 3 (TOKENIZE_CHAT) its chat form (messages JSON per
 * item); their results are the counts (int). Tokenize requests
 * take count permits only: never token-budget or admission ones.
 * ONE: source is the prompt (or messages JSON); MAP/STREAM: an iterator.
 * count_preheld: the caller holds one count permit per window slot already. */
static PyObject *core_submit(Core *self, PyObject *args)
{
    int mode, chat, return_exceptions, count_preheld = 0;
    PyObject *source, *tmpl, *fut, *counts = Py_None;
    Py_ssize_t window;
    if (!PyArg_ParseTuple(args, "iiOOOnp|pO", &mode, &chat, &source, &tmpl, &fut, &window,
                          &return_exceptions, &count_preheld, &counts))
        return NULL;
    if (counts != Py_None && !PyList_Check(counts)) {
        PyErr_SetString(PyExc_TypeError, "prompt_counts must be a list of int or None");
        return NULL;
    }
    if (core_check(self) < 0)
        return NULL;
    bg_state *st = self->st;
    if (!PyObject_TypeCheck(tmpl, st->TemplateType)) {
        PyErr_SetString(PyExc_TypeError, "template must come from Dispatcher.template()");
        return NULL;
    }
    if (mode < JOB_ONE || mode > JOB_STREAM) {
        PyErr_SetString(PyExc_ValueError, "bad job mode");
        return NULL;
    }
    if (chat < 0 || chat > 3) {
        PyErr_SetString(PyExc_ValueError, "bad request kind");
        return NULL;
    }
    if (mode == JOB_ONE)
        window = 1;
    if (window < 1 || window > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "window must be in 1..%d, got %zd", 1 << 24, window);
        return NULL;
    }
    bg_job_params jp = {.st = st, .mode = mode, .kind = chat, .source = source,
                        .tmpl = (Template *)tmpl, .fut = fut, .window = window,
                        .return_exceptions = return_exceptions, .count_preheld = count_preheld,
                        .prompt_counts = counts, .group = ++self->next_id,
                        .token_budget = self->tokens != NULL,
                        .default_max_tokens = self->default_max_tokens};
    return (PyObject *)bg_job_new(self, &jp);
}

/* After the engine is gone: end every job still waiting for input (a map or
 * as_completed whose iterator was not used up would otherwise wait forever). */
static void core_end_jobs(Core *self, int drop)
{
    Py_ssize_t n = 0;
    for (Job *j = self->jobs; j; j = j->jnext)
        n++;
    if (n == 0)
        return;
    Job **v = PyMem_Malloc((size_t)n * sizeof(Job *));
    if (!v) {
        /* No room for a snapshot: close them in place (job_fail never unlinks). */
        for (Job *j = self->jobs; j; j = j->jnext)
            bg_job_close(j, drop);
        PyErr_Clear();
        return;
    }
    Py_ssize_t k = 0;
    for (Job *j = self->jobs; j && k < n; j = j->jnext)
        v[k++] = (Job *)Py_NewRef(j);
    for (Py_ssize_t i = 0; i < k; i++) {
        bg_job_close(v[i], drop);
        Py_DECREF(v[i]);
    }
    PyMem_Free(v);
    PyErr_Clear();
}

/* close(drop=False): stop the engine (every unfinished request ends with
 * ClosedError), join its thread with the GIL released, then deliver - or
 * with drop=True just release (no loop to deliver to). */
static PyObject *core_close(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    int drop = nargs > 0 ? PyObject_IsTrue(args[0]) : 0;
    if (drop < 0)
        return NULL;
    if (!self->st)
        Py_RETURN_NONE;
    if (CORE_FORKED(self)) {
        /* Forked child: the engine thread does not exist here; leak it. */
        self->engine = NULL;
        self->closed = 1;
        Py_RETURN_NONE;
    }
    if (!self->engine)
        Py_RETURN_NONE;
    self->closed = 1;
    /* Taken before the GIL is released: a second close() arriving meanwhile
     * (atexit, a finalizer, another thread) finds nothing left to destroy. */
    bg_engine *e = self->engine;
    self->engine = NULL;
    Py_BEGIN_ALLOW_THREADS
    bg_engine_close(e); /* on_done only pushes to the wake source: no GIL needed */
    Py_END_ALLOW_THREADS
    while (core_drain(self, !drop, PY_SSIZE_T_MAX) > 0 || self->backlog)
        ;
    bg_engine_destroy(e);
    bg_spent_free(&self->spent);
    core_end_jobs(self, drop);
    Py_RETURN_NONE;
}

static PyObject *core_stats(Core *self, PyObject *Py_UNUSED(ignored))
{
    bg_engine_stats s = {0};
    if (self->engine && !CORE_FORKED(self))
        bg_engine_get_stats(self->engine, &s);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsnsLsL}", "submitted", (unsigned long long)s.submitted, "completed",
        (unsigned long long)s.completed, "attempts", (unsigned long long)s.attempts, "retries",
        (unsigned long long)s.retries, "live", (unsigned long long)s.live, "in_flight",
        (unsigned long long)s.in_flight, "max_in_flight", (unsigned long long)s.max_in_flight,
        "undelivered", self->live_items, "permits_free",
        (long long)(self->count ? bg_sem_value(self->count) : -1), "tokens_free",
        (long long)(self->tokens ? bg_sem_value(self->tokens) : -1));
    if (d && self->admit) {
        PyObject *a = bg_dsp_admit_stats(self);
        if (!a || PyDict_SetItemString(d, "admission", a) < 0)
            Py_CLEAR(d);
        Py_XDECREF(a);
    }
    return d;
}

static PyObject *core_get_live(Core *self, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(self->live_items);
}

static PyObject *core_get_forked(Core *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->st && CORE_FORKED(self));
}

static PyObject *core_get_closed(Core *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->closed);
}

/* _Dispatcher(*, base_url, ...): keywords only, see bg_dispatcher_config.c. */
static int core_init(Core *self, PyObject *args, PyObject *kwds)
{
    if (self->engine || self->wake) {
        PyErr_SetString(PyExc_RuntimeError, "_Dispatcher.__init__ called twice");
        return -1;
    }
    bg_state *st = bg_state_from_type(Py_TYPE(self));
    if (!st)
        return -1;
    bg_dsp_args a;
    if (bg_dsp_args_parse(st, args, kwds, &a) < 0)
        return -1;
    self->st = st;
    self->fork_gen = __atomic_load_n(&bg_fork_generation, __ATOMIC_RELAXED);
    self->default_max_tokens = a.default_max_tokens;
    char err[300];
    if (a.semaphore != Py_None) {
        self->count = bg_semaphore_core(st, a.semaphore);
        if (!self->count)
            goto fail;
    } else {
        self->count = bg_sem_create(a.max_concurrent, a.max_concurrent);
        if (!self->count) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    if (a.max_inflight_tokens > 0) {
        self->token_cap = a.max_inflight_tokens;
        self->tokens = bg_sem_create(a.max_inflight_tokens, a.max_inflight_tokens);
        if (!self->tokens) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    /* Unbound until the first bind(): completions wait on it until then. */
    self->wake = bg_loop_source_new(BG_NODE_DISPATCH, self);
    if (!self->wake)
        goto fail;
    bg_engine_config c;
    bg_dsp_engine_config(&a, &c);
    c.count_sem = self->count;
    c.token_sem = self->tokens;
    c.token_cap = self->token_cap;
    c.on_done = core_on_done;
    c.on_flush = core_on_flush;
    c.done_ctx = self->wake;
    /* Closed loop: a KV-block semaphore whose capacity the engine moves. */
    if (a.admission != Py_None && bg_dsp_admit_setup(self, a.admission, &c) < 0)
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    self->engine = bg_engine_create(&c, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (!self->engine) {
        PyErr_SetString(PyExc_ValueError, err);
        goto fail;
    }
    bg_dsp_args_release(&a);
    return 0;
fail:
    bg_dsp_args_release(&a);
    if (self->wake) {
        bg_loop_source_free(self->wake);
        self->wake = NULL;
    }
    /* Nothing may survive a failed __init__ (a retried __init__ would
     * otherwise overwrite and leak these). */
    if (self->count) {
        bg_sem_decref(self->count);
        self->count = NULL;
    }
    if (self->tokens) {
        bg_sem_decref(self->tokens);
        self->tokens = NULL;
    }
    self->token_cap = 0;
    return -1;
}

static void core_dealloc(Core *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    /* Before the GIL is dropped below: a loop running its bridge must not
     * find us through our wake node any more. */
    if (self->wake && !CORE_FORKED(self))
        bg_loop_source_detach(self->wake);
    if (self->engine && !CORE_FORKED(self)) {
        /* Jobs hold a reference to us while they have items in the engine, so
         * nothing here has a job left to deliver to. */
        bg_engine *e = self->engine;
        self->engine = NULL;
        Py_BEGIN_ALLOW_THREADS
        bg_engine_destroy(e);
        Py_END_ALLOW_THREADS
    }
    Py_CLEAR(self->call_soon);
    Py_CLEAR(self->model_cache);
    if (!CORE_FORKED(self)) {
        bg_spent_free(&self->spent);
        if (self->wake)
            bg_loop_source_free(self->wake);
        if (self->count)
            bg_sem_decref(self->count);
        if (self->tokens)
            bg_sem_decref(self->tokens);
    }
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int core_traverse(Core *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->call_soon);
    return 0;
}

static int core_clear(Core *self)
{
    Py_CLEAR(self->call_soon);
    return 0;
}

static PyMethodDef core_methods[] = {
    {"_on_readable", (PyCFunction)core_on_readable, METH_NOARGS,
     "_on_readable($self, /)\n--\n\nDeliver finished requests (a batch; the rest later)."},
    {"bind", (PyCFunction)core_bind, METH_O,
     "bind($self, loop, /)\n--\n\nDeliver on this loop (through its bridge), or nowhere (None)."},
    /* Text signatures let stubtest hold _native.pyi to these argument lists. */
    {"template", (PyCFunction)(void (*)(void))bg_core_template, METH_FASTCALL,
     "template($self, model, params_json, options=None, /)\n--\n\n"},
    {"submit", (PyCFunction)core_submit, METH_VARARGS,
     "submit($self, mode, chat, source, template, future, window, return_exceptions, count_preheld=False, prompt_counts=None, /)\n--\n\n"},
    {"close", (PyCFunction)(void (*)(void))core_close, METH_FASTCALL,
     "close($self, drop=False, /)\n--\n\n"},
    {"stats", (PyCFunction)core_stats, METH_NOARGS, "stats($self, /)\n--\n\n"},
    {"probe", (PyCFunction)bg_dsp_probe, METH_VARARGS | METH_CLASS,
     "probe($type, metrics_url, models_url, api_key, headers, verify, timeout, model, /)\n--\n\n"
     "What the server says about itself (blocking, GIL released) -> dict."},
    {"admission_events", (PyCFunction)bg_dsp_admit_events, METH_NOARGS,
     "admission_events($self, /)\n--\n\n"
     "Limit moves recorded since the last call: [(t, from, to, reason)]."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"live", (getter)core_get_live, NULL, "requests submitted and not yet delivered", NULL},
    {"forked", (getter)core_get_forked, NULL,
     "made before a fork() of this process (unusable here); no getpid() per call", NULL},
    {"closed", (getter)core_get_closed, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef core_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Core, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* The class signature (help(), inspect): keywords only. */
static const char core_doc[] =
    "_Dispatcher(*, base_url, api_key=None, max_concurrent=20, semaphore=None, "
    "max_inflight_tokens=0, timeout=600.0, connect_timeout=10.0, max_retries=3, headers=None, "
    "verify=True, max_response_bytes=67108864, backoff=0.5, max_backoff=30.0, "
    "max_retry_after=60.0, retry_timeouts=False, max_connections=0, default_max_tokens=16, "
    "admission=None)\n--\n\n"
    "The native engine: a libcurl multi thread, its caps and its completion queue.";

static PyType_Slot core_slots[] = {
    {Py_tp_doc, (void *)core_doc},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_init, core_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_methods, core_methods},
    {Py_tp_getset, core_getset},
    {Py_tp_members, core_members},
    {0, NULL},
};

static PyType_Spec core_spec = {
    .name = "batchgate._native._Dispatcher",
    .basicsize = sizeof(Core),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = core_slots,
};

/* ---- module hooks -------------------------------------------------------- */

static PyObject *new_error(PyObject *module, const char *name, const char *doc, PyObject *bases)
{
    char full[100];
    snprintf(full, sizeof(full), "batchgate.%s", name);
    PyObject *cls = PyErr_NewExceptionWithDoc(full, doc, bases, NULL);
    if (cls && PyModule_AddObjectRef(module, name, cls) < 0)
        Py_CLEAR(cls);
    return cls;
}

int bg_dispatcher_exec(PyObject *module, bg_state *st)
{
    pthread_once(&fork_once, fork_register);
    PyObject *names = PyTuple_New(DN_COUNT);
    if (!names)
        return -1;
    for (int i = 0; i < DN_COUNT; i++) {
        PyObject *s = PyUnicode_InternFromString(dn_strs[i]);
        if (!s) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    st->dsp_names = names;
    st->dsp_stop = PyUnicode_InternFromString("stop");
    st->dsp_length = PyUnicode_InternFromString("length");
    if (!st->dsp_stop || !st->dsp_length)
        return -1;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (!asyncio)
        return -1;
    st->CancelledError = PyObject_GetAttrString(asyncio, "CancelledError");
    Py_DECREF(asyncio);
    if (!st->CancelledError)
        return -1;

    st->HTTPStatusError = new_error(module, "HTTPStatusError",
                                    "The server answered with an error status (after retries). "
                                    "Attributes: status, message, attempts.",
                                    st->BatchgateError);
    st->TransportError = new_error(module, "TransportError",
                                   "The connection failed (refused, reset, cut short) after "
                                   "retries. Attributes: curl_code, message, attempts.",
                                   st->BatchgateError);
    PyObject *tb = PyTuple_Pack(2, st->BatchgateError, PyExc_TimeoutError);
    if (!tb)
        return -1;
    st->TimeoutError = new_error(module, "TimeoutError",
                                 "A connect or total timeout expired.", tb);
    Py_DECREF(tb);
    st->MalformedResponseError = new_error(
        module, "MalformedResponseError",
        "A 2xx answer that is not what the API promises (not JSON, wrong shape, too big).",
        st->BatchgateError);
    st->ClosedError = new_error(module, "ClosedError", "The Dispatcher was closed.",
                                st->BatchgateError);
    if (!st->HTTPStatusError || !st->TransportError || !st->TimeoutError ||
        !st->MalformedResponseError || !st->ClosedError)
        return -1;

    st->TemplateType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &bg_template_spec, NULL);
    st->ResultType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &bg_result_spec, NULL);
    st->JobType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &bg_job_spec, NULL);
    st->DispatcherType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &core_spec, NULL);
    if (!st->TemplateType || !st->ResultType || !st->JobType || !st->DispatcherType)
        return -1;
    if (PyModule_AddObjectRef(module, "Result", (PyObject *)st->ResultType) < 0 ||
        PyModule_AddObjectRef(module, "_Dispatcher", (PyObject *)st->DispatcherType) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "JOB_ONE", JOB_ONE) < 0 ||
        PyModule_AddIntConstant(module, "JOB_MAP", JOB_MAP) < 0 ||
        PyModule_AddIntConstant(module, "JOB_STREAM", JOB_STREAM) < 0 ||
        PyModule_AddIntConstant(module, "KIND_TOKENIZE", 2) < 0 ||
        PyModule_AddIntConstant(module, "KIND_TOKENIZE_CHAT", 3) < 0)
        return -1;
    return 0;
}

int bg_dispatcher_traverse(bg_state *st, visitproc visit, void *arg)
{
    Py_VISIT(st->DispatcherType);
    Py_VISIT(st->JobType);
    Py_VISIT(st->TemplateType);
    Py_VISIT(st->ResultType);
    Py_VISIT(st->HTTPStatusError);
    Py_VISIT(st->TransportError);
    Py_VISIT(st->TimeoutError);
    Py_VISIT(st->MalformedResponseError);
    Py_VISIT(st->ClosedError);
    Py_VISIT(st->CancelledError);
    Py_VISIT(st->dsp_names);
    Py_VISIT(st->dsp_stop);
    Py_VISIT(st->dsp_length);
    return 0;
}

void bg_dispatcher_clear(bg_state *st)
{
    Py_CLEAR(st->DispatcherType);
    Py_CLEAR(st->JobType);
    Py_CLEAR(st->TemplateType);
    Py_CLEAR(st->ResultType);
    Py_CLEAR(st->HTTPStatusError);
    Py_CLEAR(st->TransportError);
    Py_CLEAR(st->TimeoutError);
    Py_CLEAR(st->MalformedResponseError);
    Py_CLEAR(st->ClosedError);
    Py_CLEAR(st->CancelledError);
    Py_CLEAR(st->dsp_names);
    Py_CLEAR(st->dsp_stop);
    Py_CLEAR(st->dsp_length);
}
