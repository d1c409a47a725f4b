/* bg_dispatcher_result.c - batchgate.Result and the exception objects of
 * failed requests, built on the loop thread from a finished bg_request. */
#include "bg_dispatcher.h"

#include <stddef.h>
#include <string.h>
#include <structmember.h>

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

PyType_Spec bg_result_spec = {
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

PyObject *bg_result_new(bg_state *st, const bg_request *r)
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
PyObject *bg_result_error(bg_state *st, const bg_request *r, Py_ssize_t index, int with_index)
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
                         : PyUnicode_DecodeUTF8(m, (Py_ssize_t)strlen(m), "replace");
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
    /* The server's bytes: never let them raise UnicodeDecodeError. */
    SETATTR(DN_MESSAGE, PyUnicode_DecodeUTF8(m, (Py_ssize_t)strlen(m), "replace"));
    SETATTR(DN_STATUS, r->status ? PyLong_FromLong(r->status) : Py_NewRef(Py_None));
    SETATTR(DN_CURL_CODE, r->curl_code ? PyLong_FromLong(r->curl_code) : Py_NewRef(Py_None));
    SETATTR(DN_INDEX, with_index ? PyLong_FromSsize_t(index) : Py_NewRef(Py_None));
#undef SETATTR
    return exc;
}
