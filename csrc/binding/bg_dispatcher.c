/* bg_dispatcher.c - batchgate._native._Dispatcher: the CPython face of the
 * bg_http engine.
 *
 * Work is submitted as a _Job: one request (generate/chat), or a stream of
 * prompts pulled from an iterator a window at a time (map/as_completed), so a
 * million prompts never become a million Python objects in flight. The engine
 * thread never takes the GIL: each finished request is pushed on the
 * dispatcher's bg_notify queue, whose fd the event loop watches; the loop
 * thread drains it in one GIL hold (_on_readable), builds Result objects or
 * exceptions, refills windows and resolves futures.
 */
#include "bg_module.h"

#include "bg_estimate.h"
#include "bg_http.h"
#include "bg_json.h"
#include "bg_notify.h"
#include "bg_semaphore.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>
#include <unistd.h>

enum { JOB_ONE = 0, JOB_MAP = 1, JOB_STREAM = 2 };

enum {
    DN_DONE,
    DN_SET_RESULT,
    DN_SET_EXCEPTION,
    DN_STATUS,
    DN_MESSAGE,
    DN_ATTEMPTS,
    DN_CURL_CODE,
    DN_INDEX,
    DN_COUNT
};
static const char *const dn_strs[DN_COUNT] = {
    "done", "set_result", "set_exception", "status", "message", "attempts", "curl_code", "index",
};
#define DNAME(st, i) PyTuple_GET_ITEM((st)->dsp_names, (i))

typedef struct Core Core;
typedef struct Job Job;

/* One request in the engine, owned by its job's slot array. */
typedef struct {
    bg_request r;         /* first: the engine hands back &r */
    bg_notify_node node;
    Job *job;
    Py_ssize_t index;     /* position in the job's input */
    bg_str one;
    bg_str *many;         /* list prompt: malloc'd */
    PyObject *keep;       /* owns the bytes the prompts point into */
} DItem;

struct Core {
    PyObject_HEAD
    bg_state *st;
    bg_engine *engine;
    bg_sem *count, *tokens;
    bg_notify *notify;
    uint64_t next_id;
    pid_t pid;
    int closed;
    Py_ssize_t live_items;
    int64_t default_max_tokens;
    int64_t token_cap;
    bg_notify_node *backlog;  /* drained but not yet delivered (drain limit) */
    PyObject *call_soon;      /* bound loop's call_soon, for the backlog */
    int resched;              /* _on_readable already scheduled via call_soon */
    PyObject *weakreflist;
};

/* At most this many completions per loop callback, so one callback never
 * holds the loop for long; the rest follow in a call_soon. */
#define DRAIN_LIMIT 256

struct Job {
    PyObject_HEAD
    Core *core;
    PyObject *tmpl_obj;   /* _Template, keeps tmpl alive */
    const bg_tmpl *tmpl;
    int mode;
    int endpoint;
    uint64_t group;
    PyObject *source;     /* iterator; NULL once exhausted or cancelled */
    Py_ssize_t pulled, live, window;
    DItem *slots;
    DItem **free_slots;
    Py_ssize_t nfree;
    PyObject *results;    /* MAP: list in input order */
    PyObject *ready;      /* STREAM: list of (index, result) not yet taken */
    PyObject *fut;        /* ONE/MAP: the caller's future; STREAM: armed waiter */
    int return_exceptions;
    int finished;         /* outcome delivered (ONE/MAP) or stream ended */
    int cancelled;
    int holding_self;     /* a self-reference while items are in the engine */
};

typedef struct {
    PyObject_HEAD
    bg_tmpl *tmpl;
} Template;

typedef struct {
    PyObject_HEAD
    PyObject *text;
    PyObject *finish_reason;
    PyObject *texts;      /* tuple when a request produced several choices, else NULL */
    double latency;
    int attempts;
    int64_t prompt_tokens, completion_tokens, total_tokens;
} Result;

static int core_check(Core *c)
{
    if (!c->st) {
        PyErr_SetString(PyExc_RuntimeError, "_Dispatcher.__init__ was not called");
        return -1;
    }
    if (c->pid != getpid()) {
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

/* ---- Template ---------------------------------------------------------- */

static void template_dealloc(Template *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    bg_tmpl_decref(self->tmpl);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *template_get_max_tokens(Template *self, void *Py_UNUSED(c))
{
    return self->tmpl->max_tokens < 0 ? Py_NewRef(Py_None)
                                       : PyLong_FromLongLong(self->tmpl->max_tokens);
}

static PyObject *template_get_n(Template *self, void *Py_UNUSED(c))
{
    return PyLong_FromLongLong(self->tmpl->n_per_prompt);
}

static PyGetSetDef template_getset[] = {
    {"max_tokens", (getter)template_get_max_tokens, NULL, NULL, NULL},
    {"n", (getter)template_get_n, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot template_slots[] = {
    {Py_tp_dealloc, template_dealloc},
    {Py_tp_getset, template_getset},
    {0, NULL},
};

static PyType_Spec template_spec = {
    .name = "batchgate._native._Template",
    .basicsize = sizeof(Template),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = template_slots,
};

/* ---- Result ------------------------------------------------------------ */

/* Not GC-tracked: a Result holds only str, None and a tuple of str, which
 * cannot form cycles; a million results then cost no collector time. */
static void result_dealloc(Result *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_CLEAR(self->text);
    Py_CLEAR(self->finish_reason);
    Py_CLEAR(self->texts);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *tokens_or_none(int64_t v)
{
    return v < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(v);
}

static PyObject *result_get_usage(Result *self, void *Py_UNUSED(c))
{
    if (self->prompt_tokens < 0 && self->completion_tokens < 0 && self->total_tokens < 0)
        Py_RETURN_NONE;
    PyObject *d = PyDict_New(), *v = NULL;
    if (!d)
        return NULL;
    static const char *const keys[3] = {"prompt_tokens", "completion_tokens", "total_tokens"};
    int64_t vals[3] = {self->prompt_tokens, self->completion_tokens, self->total_tokens};
    for (int i = 0; i < 3; i++) {
        v = tokens_or_none(vals[i]);
        if (!v || PyDict_SetItemString(d, keys[i], v) < 0)
            goto fail;
        Py_CLEAR(v);
    }
    return d;
fail:
    Py_XDECREF(v);
    Py_DECREF(d);
    return NULL;
}

static PyObject *result_get_texts(Result *self, void *Py_UNUSED(c))
{
    if (self->texts)
        return Py_NewRef(self->texts);
    return PyTuple_Pack(1, self->text);
}

static PyObject *result_get_latency(Result *self, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(self->latency);
}

static PyObject *result_get_attempts(Result *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->attempts);
}

static PyObject *result_repr(Result *self)
{
    return PyUnicode_FromFormat("Result(text=%.200R, finish_reason=%R, attempts=%d)", self->text,
                                self->finish_reason, self->attempts);
}

static PyObject *result_str(Result *self)
{
    return Py_NewRef(self->text);
}

static PyMemberDef result_members[] = {
    {"text", T_OBJECT, offsetof(Result, text), READONLY, "first choice's text"},
    {"finish_reason", T_OBJECT, offsetof(Result, finish_reason), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef result_getset[] = {
    {"usage", (getter)result_get_usage, NULL, "token usage reported by the server, or None",
     NULL},
    {"texts", (getter)result_get_texts, NULL, "every choice's text in index order", NULL},
    {"latency", (getter)result_get_latency, NULL, "seconds from submission to completion", NULL},
    {"attempts", (getter)result_get_attempts, NULL, "HTTP attempts made (1 = no retry)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot result_slots[] = {
    {Py_tp_dealloc, result_dealloc},
    {Py_tp_members, result_members},
    {Py_tp_getset, result_getset},
    {Py_tp_repr, result_repr},
    {Py_tp_str, result_str},
    {0, NULL},
};

static PyType_Spec result_spec = {
    .name = "batchgate.Result",
    .basicsize = sizeof(Result),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = result_slots,
};

static PyObject *finish_reason_obj(bg_state *st, const char *fr)
{
    if (!fr)
        return Py_NewRef(Py_None);
    if (strcmp(fr, "stop") == 0)
        return Py_NewRef(st->dsp_stop);
    if (strcmp(fr, "length") == 0)
        return Py_NewRef(st->dsp_length);
    return PyUnicode_DecodeUTF8(fr, (Py_ssize_t)strlen(fr), "replace");
}

static PyObject *make_result(bg_state *st, const bg_request *r)
{
    Result *res = PyObject_New(Result, st->ResultType);
    if (!res)
        return NULL;
    res->text = res->finish_reason = res->texts = NULL;
    res->latency = (double)(r->t_done_ns - r->t_submit_ns) / 1e9;
    res->attempts = r->attempts;
    res->prompt_tokens = r->resp.usage.prompt_tokens;
    res->completion_tokens = r->resp.usage.completion_tokens;
    res->total_tokens = r->resp.usage.total_tokens;
    if (!r->resp.usage.present)
        res->prompt_tokens = res->completion_tokens = res->total_tokens = -1;
    const bg_resp *rs = &r->resp;
    if (rs->n_choices == 0) {
        res->text = PyUnicode_New(0, 0);
        res->finish_reason = Py_NewRef(Py_None);
    } else {
        res->text = PyUnicode_DecodeUTF8(rs->choices[0].text, (Py_ssize_t)rs->choices[0].text_len,
                                         "replace");
        res->finish_reason = finish_reason_obj(st, rs->choices[0].finish_reason);
    }
    if (!res->text || !res->finish_reason)
        goto fail;
    if (rs->n_choices > 1) {
        res->texts = PyTuple_New((Py_ssize_t)rs->n_choices);
        if (!res->texts)
            goto fail;
        PyTuple_SET_ITEM(res->texts, 0, Py_NewRef(res->text));
        for (size_t i = 1; i < rs->n_choices; i++) {
            PyObject *t = PyUnicode_DecodeUTF8(rs->choices[i].text,
                                               (Py_ssize_t)rs->choices[i].text_len, "replace");
            if (!t)
                goto fail;
            PyTuple_SET_ITEM(res->texts, (Py_ssize_t)i, t);
        }
    }
    return (PyObject *)res;
fail:
    Py_DECREF(res);
    return NULL;
}

/* An exception instance for a failed request, with attributes for its details. */
static PyObject *make_error(bg_state *st, const bg_request *r, Py_ssize_t index, int with_index)
{
    PyObject *cls;
    switch (r->kind) {
    case BG_RES_HTTP: cls = st->HTTPStatusError; break;
    case BG_RES_TRANSPORT: cls = st->TransportError; break;
    case BG_RES_TIMEOUT: cls = st->TimeoutError; break;
    case BG_RES_MALFORMED: cls = st->MalformedResponseError; break;
    case BG_RES_CLOSED: cls = st->ClosedError; break;
    case BG_RES_CANCELLED: cls = st->CancelledError; break;
    case BG_RES_NOMEM: cls = PyExc_MemoryError; break;
    default: cls = st->BatchgateError; break;
    }
    const char *m = r->message ? r->message
                               : (r->kind == BG_RES_CLOSED ? "the Dispatcher was closed"
                                                           : bg_result_kind_name(r->kind));
    PyObject *msg;
    if (r->kind == BG_RES_HTTP)
        msg = with_index ? PyUnicode_FromFormat("item %zd: HTTP %ld after %d attempt(s): %s",
                                                index, r->status, r->attempts, m)
                         : PyUnicode_FromFormat("HTTP %ld after %d attempt(s): %s", r->status,
                                                r->attempts, m);
    else
        msg = with_index ? PyUnicode_FromFormat("item %zd: %s", index, m)
                         : PyUnicode_FromString(m);
    if (!msg)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(cls, msg);
    Py_DECREF(msg);
    if (!exc || cls == PyExc_MemoryError || cls == st->CancelledError)
        return exc;
    PyObject *v;
#define SETATTR(name, expr)                                                     \
    do {                                                                        \
        v = (expr);                                                             \
        if (!v || PyObject_SetAttr(exc, DNAME(st, name), v) < 0) {              \
            Py_XDECREF(v);                                                      \
            Py_DECREF(exc);                                                     \
            return NULL;                                                        \
        }                                                                       \
        Py_DECREF(v);                                                           \
    } while (0)
    SETATTR(DN_ATTEMPTS, PyLong_FromLong(r->attempts));
    SETATTR(DN_MESSAGE, PyUnicode_FromString(m));
    SETATTR(DN_STATUS, r->status ? PyLong_FromLong(r->status) : Py_NewRef(Py_None));
    SETATTR(DN_CURL_CODE, r->curl_code ? PyLong_FromLong(r->curl_code) : Py_NewRef(Py_None));
    SETATTR(DN_INDEX, with_index ? PyLong_FromSsize_t(index) : Py_NewRef(Py_None));
#undef SETATTR
    return exc;
}

/* ---- futures ----------------------------------------------------------- */

/* fut.set_result(v) / set_exception(v) unless the future is already done
 * (cancelled by its awaiter). Returns 0 or -1 with an exception. */
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
        return -1;
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

static void item_release(Job *j, DItem *it)
{
    Py_CLEAR(it->keep);
    free(it->many);
    it->many = NULL;
    bg_request_clear(&it->r);
    it->job = NULL;
    j->free_slots[j->nfree++] = it;
}

static void job_drop_self(Job *j)
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
    job_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* Fill it from one input element. Completions: str, or a list/tuple of str
 * (one request, several prompts). Chat: a str holding the messages JSON. */
static int item_fill(Job *j, DItem *it, PyObject *x, Py_ssize_t index)
{
    Core *c = j->core;
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
        if (c->tokens)
            est = (int64_t)bg_estimate_ucs(PyUnicode_DATA(x), (size_t)PyUnicode_GET_LENGTH(x),
                                           PyUnicode_KIND(x), BG_EST_SCRIPT);
        if (j->endpoint == BG_EP_CHAT) {
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
            if (c->tokens)
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
    if (c->tokens) {
        int64_t mt = j->tmpl->max_tokens >= 0 ? j->tmpl->max_tokens : c->default_max_tokens;
        it->r.token_weight = est + mt * (int64_t)np * j->tmpl->n_per_prompt;
    } else {
        it->r.token_weight = 1;
    }
    it->r.id = ++c->next_id;
    it->r.group = j->group;
    it->r.endpoint = (enum bg_endpoint)j->endpoint;
    it->r.tmpl = j->tmpl;
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
        if (fut_resolve(j->core->st, fut, Py_None, 0) < 0)
            report_unraisable("batchgate: waking an as_completed() consumer");
        Py_DECREF(fut);
    }
}

/* Deliver the job's outcome when everything is in. */
static void job_maybe_finish(Job *j)
{
    if (j->finished || j->live > 0 || j->source)
        return;
    j->finished = 1;
    bg_state *st = j->core->st;
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
    bg_state *st = j->core->st;
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
    if (j->live > 0 && !j->cancelled && j->core->engine && !j->core->closed) {
        j->cancelled = 1;
        bg_engine_cancel_group(j->core->engine, j->group);
    }
}

static PyObject *fetch_exception(void)
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

/* Pull inputs until the window is full and submit them in one go. Errors
 * (bad input, iterator raising, closed engine) end the job via job_fail.
 * Returns -1 only when called from submit() for a JOB_ONE (raise directly). */
static int job_refill(Job *j)
{
    Core *c = j->core;
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
            item_release(j, it);
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
        if (bg_engine_submit_many(c->engine, (bg_request **)batch, (size_t)nb) < 0) {
            for (Py_ssize_t i = 0; i < nb; i++)
                item_release(j, batch[i]);
            Py_XDECREF(err);
            PyErr_SetString(c->st->ClosedError, "the Dispatcher is closed");
            err = fetch_exception();
        } else {
            j->live += nb;
            c->live_items += nb;
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

/* One finished request, on the loop thread with the GIL. */
static void job_item_done(Job *j, DItem *it)
{
    bg_state *st = j->core->st;
    const bg_request *r = &it->r;
    j->live--;
    j->core->live_items--;
    if (j->finished || j->cancelled) {
        item_release(j, it);
        return;
    }
    int ok = r->kind == BG_RES_OK;
    PyObject *obj = ok ? make_result(st, r) : make_error(st, r, it->index, j->mode != JOB_ONE);
    Py_ssize_t index = it->index;
    item_release(j, it);
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

/* job.cancel(): stop pulling and cancel what is in the engine. */
static PyObject *job_cancel(Job *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->source);
    if (!self->cancelled && self->live > 0 && self->core->engine && !self->core->closed &&
        self->core->pid == getpid()) {
        if (self->mode == JOB_ONE) {
            for (Py_ssize_t i = 0; i < self->window; i++)
                if (self->slots[i].job == self)
                    bg_engine_cancel(self->core->engine, self->slots[i].r.id);
        } else {
            bg_engine_cancel_group(self->core->engine, self->group);
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
    if (!self->cancelled && self->core->engine && !self->core->closed &&
        job_refill(self) < 0 && PyErr_Occurred()) {
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
    {"cancel", (PyCFunction)job_cancel, METH_NOARGS, NULL},
    {"take", (PyCFunction)job_take, METH_NOARGS, NULL},
    {"arm", (PyCFunction)job_arm, METH_O, NULL},
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

static PyType_Spec job_spec = {
    .name = "batchgate._native._Job",
    .basicsize = sizeof(Job),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = job_slots,
};

/* ---- Core -------------------------------------------------------------- */

/* Engine thread, no GIL, no engine lock: just queue it for the loop. */
static void core_on_done(bg_request *r, void *ctx)
{
    DItem *it = r->user;
    bg_notify_push((bg_notify *)ctx, &it->node);
}

/* Deliver up to limit finished requests (loop thread, GIL held): first the
 * backlog, else a fresh drain of the queue. Returns how many. */
static Py_ssize_t core_drain(Core *c, int deliver, Py_ssize_t limit)
{
    bg_notify_node *n = c->backlog;
    c->backlog = NULL;
    if (!n)
        n = bg_notify_drain(c->notify);
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
            job_item_done(j, it);
        } else {
            /* Closed loop / interpreter exit: drop and release. */
            j->live--;
            c->live_items--;
            j->finished = 1;
            item_release(j, it);
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
                    job_maybe_finish(j);
                    job_drop_self(j);
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
            Py_INCREF(j); /* job_drop_self below may release the last other ref */
            touched[ntouched++] = j;
        }
        n = next;
    }
    for (Py_ssize_t i = 0; i < ntouched; i++) {
        Job *j = touched[i];
        if (deliver && !c->closed && c->engine)
            (void)job_refill(j);
        if (deliver)
            job_maybe_finish(j);
        job_drop_self(j);
        Py_DECREF(j);
    }
    if (touched != touched_stack)
        free(touched);
    PyErr_Clear();
    return count;
}

static PyObject *core_on_readable(Core *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->st || self->pid != getpid() || !self->notify)
        Py_RETURN_NONE;
    self->resched = 0;
    core_drain(self, 1, DRAIN_LIMIT);
    if (self->backlog && self->call_soon) {
        PyObject *cb = PyObject_GetAttrString((PyObject *)self, "_on_readable");
        PyObject *h = cb ? PyObject_CallOneArg(self->call_soon, cb) : NULL;
        Py_XDECREF(cb);
        if (h) {
            Py_DECREF(h);
            self->resched = 1;
        } else {
            /* Loop closing: deliver the rest now rather than never. */
            PyErr_Clear();
            core_drain(self, 1, PY_SSIZE_T_MAX);
        }
    }
    Py_RETURN_NONE;
}

/* Fallback for loops without add_reader: block (GIL released) until the fd
 * is readable or timeout_ms passes. Returns True if readable. */
static PyObject *core_wait(Core *self, PyObject *arg)
{
    long timeout = PyLong_AsLong(arg);
    if (timeout == -1 && PyErr_Occurred())
        return NULL;
    if (timeout > 1000000)
        timeout = 1000000;
    if (!self->notify)
        Py_RETURN_FALSE;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = bg_notify_wait(self->notify, (int)timeout);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(r);
}

/* bind(loop_or_None): remember loop.call_soon for backlog callbacks. */
static PyObject *core_bind(Core *self, PyObject *loop)
{
    PyObject *cs = NULL;
    if (loop != Py_None && !(cs = PyObject_GetAttrString(loop, "call_soon")))
        return NULL;
    Py_XSETREF(self->call_soon, cs);
    self->resched = 0;
    Py_RETURN_NONE;
}

static PyObject *core_fileno(Core *self, PyObject *Py_UNUSED(ignored))
{
    if (core_check(self) < 0)
        return NULL;
    return PyLong_FromLong(bg_notify_fd(self->notify));
}

/* template(params_json: str | None) -> _Template */
static PyObject *core_template(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (core_check(self) < 0)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "template(model, params_json)");
        return NULL;
    }
    const char *model = NULL, *extra = NULL;
    Py_ssize_t elen = 0;
    if (args[0] != Py_None && !(model = PyUnicode_AsUTF8(args[0])))
        return NULL;
    if (args[1] != Py_None && !(extra = PyUnicode_AsUTF8AndSize(args[1], &elen)))
        return NULL;
    char err[300];
    bg_tmpl *t = bg_tmpl_new(model, extra, (size_t)elen, err, sizeof(err));
    if (!t) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Template *obj = PyObject_New(Template, self->st->TemplateType);
    if (!obj) {
        bg_tmpl_decref(t);
        return NULL;
    }
    obj->tmpl = t;
    return (PyObject *)obj;
}

/* submit(mode, chat, source, template, future, window, return_exceptions) -> _Job
 * ONE: source is the prompt (or messages JSON); MAP/STREAM: an iterator. */
static PyObject *core_submit(Core *self, PyObject *args)
{
    int mode, chat, return_exceptions;
    PyObject *source, *tmpl, *fut;
    Py_ssize_t window;
    if (!PyArg_ParseTuple(args, "ipOOOnp", &mode, &chat, &source, &tmpl, &fut, &window,
                          &return_exceptions))
        return NULL;
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
    if (mode == JOB_ONE)
        window = 1;
    if (window < 1 || window > (1 << 24)) {
        PyErr_Format(PyExc_ValueError, "window must be in 1..%d, got %zd", 1 << 24, window);
        return NULL;
    }
    Job *j = PyObject_GC_New(Job, st->JobType);
    if (!j)
        return NULL;
    memset((char *)j + sizeof(PyObject), 0, sizeof(Job) - sizeof(PyObject));
    j->core = (Core *)Py_NewRef(self);
    j->tmpl_obj = Py_NewRef(tmpl);
    j->tmpl = ((Template *)tmpl)->tmpl;
    j->mode = mode;
    j->endpoint = chat ? BG_EP_CHAT : BG_EP_COMPLETIONS;
    j->group = ++self->next_id;
    j->window = window;
    j->return_exceptions = return_exceptions;
    j->fut = fut == Py_None ? NULL : Py_NewRef(fut);
    PyObject_GC_Track(j);
    j->slots = calloc((size_t)window, sizeof(DItem));
    j->free_slots = malloc((size_t)window * sizeof(DItem *));
    if (!j->slots || !j->free_slots) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < window; i++)
        j->free_slots[i] = &j->slots[window - 1 - i];
    j->nfree = window;
    if (mode == JOB_ONE) {
        j->source = Py_NewRef(source);
    } else {
        j->source = PyObject_GetIter(source);
        if (!j->source)
            goto fail;
    }
    if (mode == JOB_MAP && !(j->results = PyList_New(0)))
        goto fail;
    if (mode == JOB_STREAM && !(j->ready = PyList_New(0)))
        goto fail;
    if (job_refill(j) < 0)
        goto fail;
    job_maybe_finish(j); /* an empty input finishes at once */
    return (PyObject *)j;
fail:
    Py_DECREF(j);
    return NULL;
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
    if (self->pid != getpid()) {
        /* Forked child: the engine thread does not exist here; leak it. */
        self->engine = NULL;
        self->closed = 1;
        Py_RETURN_NONE;
    }
    if (!self->engine)
        Py_RETURN_NONE;
    self->closed = 1;
    bg_engine *e = self->engine;
    Py_BEGIN_ALLOW_THREADS
    bg_engine_close(e); /* on_done only pushes to the notify queue: no GIL needed */
    Py_END_ALLOW_THREADS
    while (core_drain(self, !drop, PY_SSIZE_T_MAX) > 0 || self->backlog)
        ;
    bg_engine_destroy(e);
    self->engine = NULL;
    Py_RETURN_NONE;
}

static PyObject *core_stats(Core *self, PyObject *Py_UNUSED(ignored))
{
    bg_engine_stats s = {0};
    if (self->engine && self->pid == getpid())
        bg_engine_get_stats(self->engine, &s);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsnsLsL}", "submitted", (unsigned long long)s.submitted, "completed",
        (unsigned long long)s.completed, "attempts", (unsigned long long)s.attempts, "retries",
        (unsigned long long)s.retries, "live", (unsigned long long)s.live, "in_flight",
        (unsigned long long)s.in_flight, "max_in_flight", (unsigned long long)s.max_in_flight,
        "undelivered", self->live_items, "permits_free",
        (long long)(self->count ? bg_sem_value(self->count) : -1), "tokens_free",
        (long long)(self->tokens ? bg_sem_value(self->tokens) : -1));
}

static PyObject *core_get_live(Core *self, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(self->live_items);
}

static PyObject *core_get_closed(Core *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->closed);
}

static int core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"base_url", "api_key", "max_concurrent", "semaphore",
                             "max_inflight_tokens", "timeout", "connect_timeout", "max_retries",
                             "headers", "verify", "max_response_bytes", "backoff",
                             "max_backoff", "max_retry_after", "retry_timeouts",
                             "max_connections", "default_max_tokens", NULL};
    const char *base_url, *api_key = NULL;
    Py_ssize_t max_concurrent = 20, max_tokens_cap = 0, max_retries = 3, max_resp = 64 << 20;
    Py_ssize_t max_conn = 0, default_max_tokens = 16;
    PyObject *semaphore = Py_None, *headers = Py_None;
    double timeout = 600, connect_timeout = 10, backoff = 0.5, max_backoff = 30,
           max_retry_after = 60;
    int verify = 1, retry_timeouts = 0;
    if (self->engine || self->notify) {
        PyErr_SetString(PyExc_RuntimeError, "_Dispatcher.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|znOnddnOpndddpnn", kwlist, &base_url,
                                     &api_key, &max_concurrent, &semaphore, &max_tokens_cap,
                                     &timeout, &connect_timeout, &max_retries, &headers, &verify,
                                     &max_resp, &backoff, &max_backoff, &max_retry_after,
                                     &retry_timeouts, &max_conn, &default_max_tokens))
        return -1;
    bg_state *st = bg_state_from_type(Py_TYPE(self));
    if (!st)
        return -1;
    self->st = st;
    self->pid = getpid();
    self->default_max_tokens = default_max_tokens;
    const char **hdrs = NULL;
    Py_ssize_t nh = 0;
    PyObject *hseq = NULL;
    char err[300];
    if (semaphore != Py_None) {
        self->count = bg_semaphore_core(st, semaphore);
        if (!self->count)
            return -1;
    } else {
        if (max_concurrent < 1) {
            PyErr_Format(PyExc_ValueError, "max_concurrent must be >= 1, got %zd", max_concurrent);
            return -1;
        }
        self->count = bg_sem_create(max_concurrent, max_concurrent);
        if (!self->count) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (max_tokens_cap < 0) {
        PyErr_SetString(PyExc_ValueError, "max_inflight_tokens must be positive");
        goto fail;
    }
    if (max_tokens_cap > 0) {
        self->token_cap = max_tokens_cap;
        self->tokens = bg_sem_create(max_tokens_cap, max_tokens_cap);
        if (!self->tokens) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    if (headers != Py_None) {
        hseq = PySequence_Fast(headers, "headers must be a sequence of 'Name: value' strings");
        if (!hseq)
            goto fail;
        nh = PySequence_Fast_GET_SIZE(hseq);
        hdrs = PyMem_Calloc((size_t)nh + 1, sizeof(char *));
        if (!hdrs) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t i = 0; i < nh; i++) {
            hdrs[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(hseq, i));
            if (!hdrs[i])
                goto fail;
        }
    }
    self->notify = bg_notify_create();
    if (!self->notify) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.api_key = api_key;
    c.headers = hdrs;
    c.n_headers = (size_t)nh;
    c.timeout_ms = timeout > 0 ? (long)(timeout * 1000) : 0;
    c.connect_timeout_ms = connect_timeout > 0 ? (long)(connect_timeout * 1000) : 0;
    c.max_retries = (int)max_retries;
    c.verify_tls = verify;
    c.retry_timeouts = retry_timeouts;
    c.max_response_bytes = max_resp > 0 ? (size_t)max_resp : 0;
    c.backoff_base_s = backoff;
    c.backoff_max_s = max_backoff;
    c.retry_after_max_s = max_retry_after;
    c.max_connections = (long)max_conn;
    c.count_sem = self->count;
    c.token_sem = self->tokens;
    c.token_cap = self->token_cap;
    c.on_done = core_on_done;
    c.done_ctx = self->notify;
    if (max_retries < 0 || max_retries > 1000) {
        PyErr_Format(PyExc_ValueError, "max_retries must be in 0..1000, got %zd", max_retries);
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    self->engine = bg_engine_create(&c, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (!self->engine) {
        PyErr_SetString(PyExc_ValueError, err);
        goto fail;
    }
    PyMem_Free(hdrs);
    Py_XDECREF(hseq);
    return 0;
fail:
    PyMem_Free(hdrs);
    Py_XDECREF(hseq);
    if (self->notify) {
        bg_notify_destroy(self->notify);
        self->notify = NULL;
    }
    return -1;
}

static void core_dealloc(Core *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->engine && self->pid == getpid()) {
        /* Jobs hold a reference to us while they have items in the engine, so
         * nothing here has a job left to deliver to. */
        bg_engine *e = self->engine;
        self->engine = NULL;
        Py_BEGIN_ALLOW_THREADS
        bg_engine_destroy(e);
        Py_END_ALLOW_THREADS
    }
    Py_CLEAR(self->call_soon);
    if (self->pid == getpid()) {
        if (self->notify)
            bg_notify_destroy(self->notify);
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
     "Deliver finished requests (the loop's reader callback)."},
    {"wait", (PyCFunction)core_wait, METH_O, "Block until completions are ready (fallback)."},
    {"fileno", (PyCFunction)core_fileno, METH_NOARGS, "The completion wakeup fd."},
    {"bind", (PyCFunction)core_bind, METH_O, "Set the loop whose call_soon runs backlogs."},
    {"template", (PyCFunction)(void (*)(void))core_template, METH_FASTCALL, NULL},
    {"submit", (PyCFunction)core_submit, METH_VARARGS, NULL},
    {"close", (PyCFunction)(void (*)(void))core_close, METH_FASTCALL, NULL},
    {"stats", (PyCFunction)core_stats, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"live", (getter)core_get_live, NULL, "requests submitted and not yet delivered", NULL},
    {"closed", (getter)core_get_closed, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef core_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Core, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot core_slots[] = {
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

    st->TemplateType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &template_spec, NULL);
    st->ResultType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &result_spec, NULL);
    st->JobType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &job_spec, NULL);
    st->DispatcherType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &core_spec, NULL);
    if (!st->TemplateType || !st->ResultType || !st->JobType || !st->DispatcherType)
        return -1;
    if (PyModule_AddObjectRef(module, "Result", (PyObject *)st->ResultType) < 0 ||
        PyModule_AddObjectRef(module, "_Dispatcher", (PyObject *)st->DispatcherType) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "JOB_ONE", JOB_ONE) < 0 ||
        PyModule_AddIntConstant(module, "JOB_MAP", JOB_MAP) < 0 ||
        PyModule_AddIntConstant(module, "JOB_STREAM", JOB_STREAM) < 0)
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
