/* bg_dispatcher_job.c - _Job: one generate/chat call, or a map/as_completed
 * over an iterator pulled a window at a time. Runs on the loop thread with the
 * GIL; the engine only ever sees the DItem slots. The dispatcher core is
 * reached only through its bg_core_* functions (bg_dispatcher.h), never its
 * fields. */
#include "bg_dispatcher.h"

#include "bg_estimate.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* ---- futures ----------------------------------------------------------- */

static PyObject *PyErr_GetRaisedException_compat(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
#endif
}

static void PyErr_SetRaisedException_compat(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* fut.set_result(v) / set_exception(v) unless the future is already done
 * (cancelled by its awaiter). Returns 0 or -1 with an exception. */
static int fut_resolve(bg_state *st, PyObject *fut, PyObject *v, int is_exc);

/* set_result failed: if only because the future's loop is closed, the result
 * has nobody to go to - drop it quietly instead of one "Exception ignored"
 * per request. Returns 0 if dropped, -1 to report. */
static int drop_if_loop_closed(PyObject *fut)
{
    if (!PyErr_ExceptionMatches(PyExc_RuntimeError))
        return -1;
    PyObject *exc = PyErr_GetRaisedException_compat();
    PyObject *loop = PyObject_CallMethod(fut, "get_loop", NULL);
    PyObject *closed = loop ? PyObject_CallMethod(loop, "is_closed", NULL) : NULL;
    int is = closed ? PyObject_IsTrue(closed) : -1;
    Py_XDECREF(loop);
    Py_XDECREF(closed);
    if (is == 1) {
        PyErr_Clear();
        Py_DECREF(exc);
        return 0;
    }
    PyErr_Clear();
    PyErr_SetRaisedException_compat(exc);
    return -1;
}

static int fut_resolve(bg_state *st, PyObject *fut, PyObject *v, int is_exc)
{
    PyObject *done = PyObject_CallMethodNoArgs(fut, DNAME(st, DN_DONE));
    if (!done)
        return -1;
    int d = PyObject_IsTrue(done);
    Py_DECREF(done);
    if (d)
        return d < 0 ? -1 : 0;
    PyObject *r = PyObject_CallMethodOneArg(fut, DNAME(st, is_exc ? DN_SET_EXCEPTION : DN_SET_RESULT),
                                            v);
    if (!r)
        return drop_if_loop_closed(fut);
    Py_DECREF(r);
    return 0;
}

/* Errors raised while delivering (e.g. a closed loop) must not stop the
 * drain: report them like an unraisable callback error. */
static void report_unraisable(const char *where)
{
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(PyUnicode_FromString(where));
}

/* ---- Job --------------------------------------------------------------- */

void bg_job_item_release(Job *j, DItem *it)
{
    Py_CLEAR(it->keep);
    free(it->many);
    it->many = NULL;
    if (j->core)
        bg_core_item_clear(j->core, &it->r);
    else
        bg_request_clear(&it->r);
    it->job = NULL;
    j->free_slots[j->nfree++] = it;
}

void bg_job_drop_self(Job *j)
{
    if (j->holding_self && j->live == 0) {
        j->holding_self = 0;
        Py_DECREF(j);
    }
}

static int job_traverse(Job *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->core);
    Py_VISIT(self->tmpl_obj);
    Py_VISIT(self->source);
    Py_VISIT(self->results);
    Py_VISIT(self->ready);
    Py_VISIT(self->fut);
    for (Py_ssize_t i = 0; self->slots && i < self->window; i++)
        Py_VISIT(self->slots[i].keep);
    return 0;
}

static int job_clear(Job *self)
{
    /* Items in the engine point at us and keep us alive (holding_self), so a
     * cleared job has none: slots hold no engine state here. */
    Py_CLEAR(self->source);
    Py_CLEAR(self->results);
    Py_CLEAR(self->ready);
    Py_CLEAR(self->fut);
    Py_CLEAR(self->tmpl_obj);
    if (self->core)
        bg_core_forget_job(self->core, self);
    Py_CLEAR(self->core);
    return 0;
}

static void job_dealloc(Job *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    for (Py_ssize_t i = 0; self->slots && i < self->window; i++) {
        Py_CLEAR(self->slots[i].keep);
        free(self->slots[i].many);
    }
    free(self->slots);
    free(self->free_slots);
    free(self->prompt_counts);
    job_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* Fill it from one input element. Completions: str, or a list/tuple of str
 * (one request, several prompts). Chat: a str holding the messages JSON. */
static int item_fill(Job *j, DItem *it, PyObject *x, Py_ssize_t index)
{
    int64_t est = 0;
    size_t np = 1;
    it->many = NULL;
    it->keep = NULL;
    if (PyUnicode_Check(x)) {
        Py_ssize_t n;
        const char *p;
        if (PyUnicode_IS_COMPACT_ASCII(x)) {
            /* ASCII: CPython's own bytes are the UTF-8, no copy. */
            p = (const char *)PyUnicode_DATA(x);
            n = PyUnicode_GET_LENGTH(x);
            it->keep = Py_NewRef(x);
        } else {
            /* A bytes copy freed with the item, not a cache kept on the str. */
            it->keep = PyUnicode_AsUTF8String(x);
            if (!it->keep)
                goto bad_text;
            p = PyBytes_AS_STRING(it->keep);
            n = PyBytes_GET_SIZE(it->keep);
        }
        it->one.ptr = p;
        it->one.len = (size_t)n;
        if (j->token_budget)
            est = (int64_t)bg_estimate_ucs(PyUnicode_DATA(x), (size_t)PyUnicode_GET_LENGTH(x),
                                           PyUnicode_KIND(x), BG_EST_SCRIPT);
        if (j->endpoint == BG_EP_CHAT || j->tok_chat) {
            it->r.messages_json = p;
            it->r.messages_len = (size_t)n;
            it->r.prompts = NULL;
            it->r.n_prompts = 0;
        } else {
            it->r.prompts = &it->one;
            it->r.n_prompts = 1;
            it->r.prompt_as_list = false;
        }
    } else if (j->endpoint == BG_EP_COMPLETIONS && (PyList_Check(x) || PyTuple_Check(x))) {
        PyObject *seq = PySequence_Tuple(x); /* a snapshot the caller cannot mutate */
        if (!seq)
            return -1;
        Py_ssize_t k = PyTuple_GET_SIZE(seq);
        if (k == 0) {
            Py_DECREF(seq);
            if (j->mode == JOB_ONE)
                PyErr_SetString(PyExc_ValueError, "prompt list must not be empty");
            else
                PyErr_Format(PyExc_ValueError, "prompts[%zd] is an empty list", index);
            return -1;
        }
        PyObject *keeps = PyTuple_New(k);
        it->many = malloc((size_t)k * sizeof(bg_str));
        if (!keeps || !it->many) {
            Py_DECREF(seq);
            Py_XDECREF(keeps);
            free(it->many);
            it->many = NULL;
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < k; i++) {
            PyObject *s = PyTuple_GET_ITEM(seq, i), *kp;
            if (!PyUnicode_Check(s)) {
                if (j->mode == JOB_ONE)
                    PyErr_Format(PyExc_TypeError, "prompt[%zd] must be str, not %.100s", i,
                                 Py_TYPE(s)->tp_name);
                else
                    PyErr_Format(PyExc_TypeError, "prompts[%zd][%zd] must be str, not %.100s",
                                 index, i, Py_TYPE(s)->tp_name);
                goto bad_list;
            }
            if (PyUnicode_IS_COMPACT_ASCII(s)) {
                kp = Py_NewRef(s);
                it->many[i].ptr = (const char *)PyUnicode_DATA(s);
                it->many[i].len = (size_t)PyUnicode_GET_LENGTH(s);
            } else {
                kp = PyUnicode_AsUTF8String(s);
                if (!kp)
                    goto bad_list;
                it->many[i].ptr = PyBytes_AS_STRING(kp);
                it->many[i].len = (size_t)PyBytes_GET_SIZE(kp);
            }
            PyTuple_SET_ITEM(keeps, i, kp);
            if (j->token_budget)
                est += (int64_t)bg_estimate_ucs(PyUnicode_DATA(s), (size_t)PyUnicode_GET_LENGTH(s),
                                                PyUnicode_KIND(s), BG_EST_SCRIPT);
        }
        Py_DECREF(seq);
        it->keep = keeps;
        it->r.prompts = it->many;
        it->r.n_prompts = (size_t)k;
        it->r.prompt_as_list = true;
        np = (size_t)k;
        goto filled;
    bad_list:
        Py_DECREF(seq);
        Py_DECREF(keeps);
        free(it->many);
        it->many = NULL;
        return -1;
    } else {
        if (j->mode == JOB_ONE)
            PyErr_Format(PyExc_TypeError, "prompt must be str%s, not %.100s",
                         j->endpoint == BG_EP_COMPLETIONS ? " or a list of str" : "",
                         Py_TYPE(x)->tp_name);
        else
            PyErr_Format(PyExc_TypeError, "prompts[%zd] must be str%s, not %.100s", index,
                         j->endpoint == BG_EP_COMPLETIONS ? " or a list of str" : "",
                         Py_TYPE(x)->tp_name);
        return -1;
    }
filled:
    if (j->prompt_counts && index < j->n_prompt_counts)
        est = j->prompt_counts[index]; /* the server's own count replaces the estimate */
    if (j->token_budget) {
        int64_t mt = j->tmpl->max_tokens >= 0 ? j->tmpl->max_tokens : j->default_max_tokens;
        int64_t w;
        /* max_tokens may be up to 2^63: saturate (the engine clamps the
         * weight to the budget, so such a request runs alone). */
        if (mt < 0 || __builtin_mul_overflow(mt, (int64_t)np, &w) ||
            __builtin_mul_overflow(w, j->tmpl->n_per_prompt, &w) ||
            __builtin_add_overflow(w, est, &w))
            w = INT64_MAX;
        it->r.token_weight = w;
    } else {
        it->r.token_weight = 1;
    }
    /* For closed-loop admission, which charges in KV blocks on the engine. */
    it->r.prompt_est = est;
    it->r.max_tokens = j->tmpl->max_tokens >= 0 ? j->tmpl->max_tokens
                       : j->endpoint == BG_EP_CHAT ? -1
                                                   : j->default_max_tokens;
    it->r.group = j->group;
    it->r.count_preheld = j->count_preheld != 0;
    it->r.endpoint = (enum bg_endpoint)j->endpoint;
    it->r.tmpl = j->tmpl;
    it->r.opts = j->opts;
    it->r.user = it;
    it->job = j;
    it->index = index;
    it->node.next = NULL;
    it->node.kind = 0;
    it->node.payload = it;
    return 0;
bad_text:
    if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyErr_Clear();
        if (j->mode == JOB_ONE)
            PyErr_SetString(PyExc_ValueError, "prompt is not valid Unicode (lone surrogate?)");
        else
            PyErr_Format(PyExc_ValueError,
                         "prompts[%zd] is not valid Unicode (lone surrogate?)", index);
    }
    return -1;
}

static void job_stream_wake(Job *j)
{
    if (j->fut) {
        PyObject *fut = j->fut;
        j->fut = NULL;
        if (fut_resolve(j->st, fut, Py_None, 0) < 0)
            report_unraisable("batchgate: waking an as_completed() consumer");
        Py_DECREF(fut);
    }
}

/* Deliver the job's outcome when everything is in. */
void bg_job_maybe_finish(Job *j)
{
    if (j->finished || j->live > 0 || j->source)
        return;
    j->finished = 1;
    bg_state *st = j->st;
    if (j->mode == JOB_MAP && j->fut && !j->cancelled) {
        if (fut_resolve(st, j->fut, j->results, 0) < 0)
            report_unraisable("batchgate: delivering map() results");
    } else if (j->mode == JOB_STREAM) {
        job_stream_wake(j);
    }
}

/* A failure that ends the whole job (bad input, closed engine, first error
 * of a map without return_exceptions). Steals exc. */
static void job_fail(Job *j, PyObject *exc)
{
    bg_state *st = j->st;
    Py_CLEAR(j->source);
    if (!j->finished) {
        j->finished = 1;
        if (j->mode == JOB_STREAM) {
            /* Delivered in order with the rest; the consumer raises it. */
            PyObject *pair = Py_BuildValue("(nO)", (Py_ssize_t)-1, exc);
            if (!pair || PyList_Append(j->ready, pair) < 0)
                report_unraisable("batchgate: as_completed() error");
            Py_XDECREF(pair);
            job_stream_wake(j);
        } else if (j->fut) {
            if (fut_resolve(st, j->fut, exc, 1) < 0)
                report_unraisable("batchgate: delivering an error");
        }
    }
    Py_DECREF(exc);
    if (j->live > 0 && !j->cancelled && bg_core_open(j->core)) {
        j->cancelled = 1;
        bg_core_cancel_group(j->core, j->group);
    }
}

void bg_job_close(Job *j, int drop)
{
    if (j->finished) {
        Py_CLEAR(j->source);
        return;
    }
    /* Even with drop (no loop to deliver finished requests to) the caller's
     * future gets ClosedError: on a closed loop fut_resolve drops it quietly,
     * on a live one it ends the await instead of leaving it hanging. */
    (void)drop;
    PyObject *msg = PyUnicode_FromString("the Dispatcher was closed");
    PyObject *exc = msg ? PyObject_CallOneArg(j->st->ClosedError, msg) : NULL;
    Py_XDECREF(msg);
    if (!exc) {
        report_unraisable("batchgate: closing a job");
        Py_CLEAR(j->source);
        j->finished = 1;
        return;
    }
    job_fail(j, exc);
}

static PyObject *fetch_exception(void)
{
    return PyErr_GetRaisedException_compat();
}

/* Pull inputs until the window is full and submit them in one go. Errors
 * (bad input, iterator raising, closed engine) end the job via job_fail.
 * Returns -1 only when called from submit() for a JOB_ONE (raise directly). */
int bg_job_refill(Job *j)
{
    if (!j->source || j->cancelled)
        return 0;
    Py_ssize_t room = j->window - j->live;
    if (j->mode == JOB_STREAM)
        room -= PyList_GET_SIZE(j->ready);
    if (room <= 0)
        return 0;
    DItem *batch_stack[64];
    DItem **batch = room <= 64 ? batch_stack : malloc((size_t)room * sizeof(DItem *));
    Py_ssize_t nb = 0;
    PyObject *err = NULL;
    if (!batch) {
        batch = batch_stack;
        PyErr_NoMemory();
        err = fetch_exception();
        room = 0;
    }
    while (nb < room) {
        PyObject *x;
        if (j->mode == JOB_ONE) {
            x = j->source; /* the prompt itself */
            j->source = NULL;
        } else {
            x = PyIter_Next(j->source);
            if (!x) {
                if (PyErr_Occurred())
                    err = fetch_exception();
                Py_CLEAR(j->source);
                break;
            }
        }
        DItem *it = j->free_slots[--j->nfree];
        memset(&it->r, 0, sizeof(it->r));
        if (item_fill(j, it, x, j->pulled) < 0) {
            Py_DECREF(x);
            j->free_slots[j->nfree++] = it;
            err = fetch_exception();
            Py_CLEAR(j->source);
            break;
        }
        Py_DECREF(x);
        if (j->mode == JOB_MAP && PyList_Append(j->results, Py_None) < 0) {
            bg_job_item_release(j, it);
            err = fetch_exception();
            Py_CLEAR(j->source);
            break;
        }
        j->pulled++;
        batch[nb++] = it;
        if (j->mode == JOB_ONE)
            break;
    }
    if (nb > 0) {
        if (bg_core_submit(j->core, batch, nb) < 0) {
            for (Py_ssize_t i = 0; i < nb; i++)
                bg_job_item_release(j, batch[i]);
            Py_XDECREF(err);
            err = fetch_exception(); /* the core's ClosedError */
        } else {
            j->live += nb;
            if (!j->holding_self) {
                j->holding_self = 1;
                Py_INCREF(j);
            }
        }
    }
    if (batch != batch_stack)
        free(batch);
    if (err) {
        if (j->mode == JOB_ONE && j->live == 0) {
            /* Nothing started: raise from submit() itself. */
            j->finished = 1;
            PyErr_SetObject((PyObject *)Py_TYPE(err), err);
            Py_DECREF(err);
            return -1;
        }
        job_fail(j, err);
    }
    return 0;
}

/* A retried request: log its retries now, on the loop thread (the engine
 * thread never takes the GIL; it only records the last reason and the wait). */
static void log_retries(const bg_request *r, Py_ssize_t index)
{
    PyObject *mod = PyImport_ImportModule("batchgate._results");
    PyObject *res = mod ? PyObject_CallMethod(mod, "log_retries", "Onilid",
                                              r->kind == BG_RES_OK ? Py_True : Py_False, index,
                                              r->attempts, r->retry_status, r->retry_curl,
                                              r->retry_wait_s)
                        : NULL;
    Py_XDECREF(mod);
    Py_XDECREF(res);
    if (!res)
        report_unraisable("batchgate: logging retries");
}

/* One finished request, on the loop thread with the GIL. */
void bg_job_item_done(Job *j, DItem *it)
{
    bg_state *st = j->st;
    const bg_request *r = &it->r;
    j->live--;
    bg_core_item_delivered(j->core);
    if (j->finished || j->cancelled) {
        bg_job_item_release(j, it);
        return;
    }
    int ok = r->kind == BG_RES_OK;
    if (r->attempts > 1)
        log_retries(r, j->mode == JOB_ONE ? -1 : it->index);
    PyObject *obj = !ok ? NULL
                    : j->endpoint == BG_EP_TOKENIZE
                        ? PyLong_FromLongLong((long long)r->tok_count) /* the server's count */
                        : bg_core_result_new(j->core, r, j->mode == JOB_ONE);
    if (!ok)
        obj = bg_result_error(st, r, it->index, j->mode != JOB_ONE);
    Py_ssize_t index = it->index;
    bg_job_item_release(j, it);
    if (!obj) {
        obj = fetch_exception();
        ok = 0;
    }
    switch (j->mode) {
    case JOB_ONE:
        j->finished = 1;
        if (fut_resolve(st, j->fut, obj, !ok) < 0)
            report_unraisable("batchgate: delivering a result");
        Py_DECREF(obj);
        break;
    case JOB_MAP:
        if (!ok && !j->return_exceptions) {
            job_fail(j, obj);
            break;
        }
        PyList_SET_ITEM(j->results, index, obj); /* steals; the slot held None */
        Py_DECREF(Py_None);
        break;
    case JOB_STREAM: {
        PyObject *pair = Py_BuildValue("(nN)", index, obj);
        if (!pair || PyList_Append(j->ready, pair) < 0)
            report_unraisable("batchgate: as_completed() result");
        Py_XDECREF(pair);
        job_stream_wake(j);
        break;
    }
    }
}

/* ---- a new job -------------------------------------------------------- */

Job *bg_job_new(Core *c, const bg_job_params *p)
{
    Job *j = PyObject_GC_New(Job, p->st->JobType);
    if (!j)
        return NULL;
    memset((char *)j + sizeof(PyObject), 0, sizeof(Job) - sizeof(PyObject));
    j->core = (Core *)Py_NewRef((PyObject *)c);
    j->st = p->st;
    j->token_budget = p->token_budget;
    j->default_max_tokens = p->default_max_tokens;
    j->tmpl_obj = Py_NewRef((PyObject *)p->tmpl);
    j->tmpl = p->tmpl->tmpl;
    j->opts = p->tmpl->opts;
    j->mode = p->mode;
    j->endpoint = p->kind >= 2 ? BG_EP_TOKENIZE : p->kind ? BG_EP_CHAT : BG_EP_COMPLETIONS;
    j->tok_chat = p->kind == 3;
    j->group = p->group;
    j->window = p->window;
    j->return_exceptions = p->return_exceptions;
    j->count_preheld = p->count_preheld;
    j->fut = p->fut == Py_None ? NULL : Py_NewRef(p->fut);
    PyObject_GC_Track(j);
    j->slots = calloc((size_t)j->window, sizeof(DItem));
    j->free_slots = malloc((size_t)j->window * sizeof(DItem *));
    if (!j->slots || !j->free_slots) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < j->window; i++)
        j->free_slots[i] = &j->slots[j->window - 1 - i];
    if (p->prompt_counts != Py_None) {
        Py_ssize_t nc = PyList_GET_SIZE(p->prompt_counts);
        j->prompt_counts = malloc((size_t)(nc ? nc : 1) * sizeof(int64_t));
        if (!j->prompt_counts) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t i = 0; i < nc; i++) {
            PyObject *o = PyList_GET_ITEM(p->prompt_counts, i);
            if (!PyLong_Check(o)) { /* no __index__: nothing may run and edit the list */
                PyErr_Format(PyExc_TypeError, "prompt_counts[%zd] must be an int", i);
                goto fail;
            }
            long long v = PyLong_AsLongLong(o);
            if (v == -1 && PyErr_Occurred())
                goto fail;
            if (v < 0) {
                PyErr_Format(PyExc_ValueError, "prompt_counts[%zd] must be >= 0", i);
                goto fail;
            }
            j->prompt_counts[i] = (int64_t)v;
        }
        j->n_prompt_counts = nc;
    }
    j->nfree = j->window;
    if (p->mode == JOB_ONE) {
        j->source = Py_NewRef(p->source);
    } else {
        j->source = PyObject_GetIter(p->source);
        if (!j->source)
            goto fail;
    }
    if (p->mode == JOB_MAP && !(j->results = PyList_New(0)))
        goto fail;
    if (p->mode == JOB_STREAM && !(j->ready = PyList_New(0)))
        goto fail;
    bg_core_add_job(c, j);
    if (bg_job_refill(j) < 0)
        goto fail;
    bg_job_maybe_finish(j); /* an empty input finishes at once */
    return j;
fail:
    Py_DECREF(j);
    return NULL;
}

/* job.cancel(): stop pulling and cancel what is in the engine. */
static PyObject *job_cancel(Job *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->source);
    if (!self->cancelled && self->live > 0) {
        if (self->mode == JOB_ONE) {
            for (Py_ssize_t i = 0; i < self->window; i++)
                if (self->slots[i].job == self)
                    bg_core_cancel(self->core, self->slots[i].r.id);
        } else {
            bg_core_cancel_group(self->core, self->group);
        }
    }
    self->cancelled = 1;
    if (self->mode == JOB_STREAM && !self->finished && self->live == 0) {
        self->finished = 1;
        job_stream_wake(self);
    }
    Py_RETURN_NONE;
}

/* Stream: the results that arrived since the last call (a list, possibly
 * empty), or None once everything was delivered. */
static PyObject *job_take(Job *self, PyObject *Py_UNUSED(ignored))
{
    if (self->mode != JOB_STREAM) {
        PyErr_SetString(PyExc_TypeError, "take() is for as_completed jobs");
        return NULL;
    }
    PyObject *out = self->ready;
    if (PyList_GET_SIZE(out) == 0) {
        if (self->finished || (self->cancelled && self->live == 0) ||
            (!self->source && self->live == 0))
            Py_RETURN_NONE;
        return PyList_New(0);
    }
    self->ready = PyList_New(0);
    if (!self->ready) {
        self->ready = out;
        return NULL;
    }
    if (!self->cancelled && bg_core_open(self->core) && bg_job_refill(self) < 0 && PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Stream: arm a future resolved when take() has something new. */
static PyObject *job_arm(Job *self, PyObject *fut)
{
    if (self->mode != JOB_STREAM) {
        PyErr_SetString(PyExc_TypeError, "arm() is for as_completed jobs");
        return NULL;
    }
    Py_XSETREF(self->fut, Py_NewRef(fut));
    if (PyList_GET_SIZE(self->ready) > 0 || self->finished || (!self->source && self->live == 0))
        job_stream_wake(self);
    Py_RETURN_NONE;
}

static PyObject *job_get_live(Job *self, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(self->live);
}

static PyObject *job_get_pulled(Job *self, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(self->pulled);
}

static PyObject *job_get_finished(Job *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->finished);
}

static PyMethodDef job_methods[] = {
    {"cancel", (PyCFunction)job_cancel, METH_NOARGS, "cancel($self, /)\n--\n\n"},
    {"take", (PyCFunction)job_take, METH_NOARGS, "take($self, /)\n--\n\n"},
    {"arm", (PyCFunction)job_arm, METH_O, "arm($self, future, /)\n--\n\n"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef job_getset[] = {
    {"live", (getter)job_get_live, NULL, "requests of this job in the engine", NULL},
    {"pulled", (getter)job_get_pulled, NULL, "inputs taken from the iterator", NULL},
    {"finished", (getter)job_get_finished, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot job_slots[] = {
    {Py_tp_dealloc, job_dealloc},
    {Py_tp_traverse, job_traverse},
    {Py_tp_clear, job_clear},
    {Py_tp_methods, job_methods},
    {Py_tp_getset, job_getset},
    {0, NULL},
};

PyType_Spec bg_job_spec = {
    .name = "batchgate._native._Job",
    .basicsize = sizeof(Job),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = job_slots,
};
