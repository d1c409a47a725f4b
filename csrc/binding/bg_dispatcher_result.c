/* bg_dispatcher_result.c - batchgate.Result and the exception objects of
 * failed requests, built on the loop thread from a finished bg_request. */
#include "bg_dispatcher.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

/* ---- Result ------------------------------------------------------------ */

/* Not GC-tracked: a Result holds only str, None, bytes and tuples of those
 * (plus, once asked for, the parsed raw JSON), which cannot form cycles; a
 * million results then cost no collector time. */
static void result_dealloc(Result *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_CLEAR(self->text);
    Py_CLEAR(self->finish_reason);
    Py_CLEAR(self->model);
    Py_CLEAR(self->extra);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *extra_item(Result *self, int slot)
{
    return self->extra ? PyList_GET_ITEM(self->extra, slot) : Py_None;
}

/* batchgate._results.<name>(*args): the openai-shaped views are built in
 * Python, only when asked for. */
static PyObject *call_results(const char *name, PyObject *arg)
{
    PyObject *mod = PyImport_ImportModule("batchgate._results");
    if (!mod)
        return NULL;
    PyObject *fn = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    if (!fn)
        return NULL;
    PyObject *r = PyObject_CallOneArg(fn, arg);
    Py_DECREF(fn);
    return r;
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
    /* A dict that also answers usage.total_tokens, as openai's object does. */
    v = call_results("AttrDict", d);
    Py_DECREF(d);
    return v;
fail:
    Py_XDECREF(v);
    Py_DECREF(d);
    return NULL;
}

static PyObject *result_get_choice_data(Result *self, void *Py_UNUSED(c))
{
    PyObject *ch = extra_item(self, RX_CHOICES);
    if (ch != Py_None)
        return Py_NewRef(ch);
    PyObject *one = PyTuple_Pack(4, self->text, self->finish_reason, Py_None, Py_None);
    if (!one)
        return NULL;
    PyObject *t = PyTuple_Pack(1, one);
    Py_DECREF(one);
    return t;
}

static PyObject *result_get_texts(Result *self, void *Py_UNUSED(c))
{
    PyObject *ch = extra_item(self, RX_CHOICES);
    if (ch == Py_None)
        return PyTuple_Pack(1, self->text);
    Py_ssize_t n = PyTuple_GET_SIZE(ch);
    PyObject *t = PyTuple_New(n);
    for (Py_ssize_t i = 0; t && i < n; i++)
        PyTuple_SET_ITEM(t, i, Py_NewRef(PyTuple_GET_ITEM(PyTuple_GET_ITEM(ch, i), 0)));
    return t;
}

static PyObject *result_get_raw(Result *self, void *Py_UNUSED(c))
{
    PyObject *obj = extra_item(self, RX_RAW_OBJ);
    if (obj != Py_None)
        return Py_NewRef(obj);
    PyObject *raw = extra_item(self, RX_RAW);
    if (raw == Py_None)
        Py_RETURN_NONE;
    obj = call_results("parse_raw", raw);
    if (obj)
        PyList_SetItem(self->extra, RX_RAW_OBJ, Py_NewRef(obj)); /* cannot fail */
    return obj;
}

static PyObject *result_get_id(Result *self, void *Py_UNUSED(c))
{
    PyObject *id = extra_item(self, RX_ID);
    if (id != Py_None || extra_item(self, RX_RAW) == Py_None)
        return Py_NewRef(id);
    PyObject *raw = result_get_raw(self, NULL);
    if (!raw)
        return NULL;
    id = PyDict_Check(raw) ? PyDict_GetItemString(raw, "id") : NULL;
    Py_DECREF(raw);
    return Py_NewRef(id && PyUnicode_Check(id) ? id : Py_None);
}

static PyObject *result_get_choices(Result *self, void *Py_UNUSED(c))
{
    return call_results("choices", (PyObject *)self);
}

static PyObject *result_get_tool_calls(Result *self, void *Py_UNUSED(c))
{
    return call_results("tool_calls", (PyObject *)self);
}

static PyObject *result_get_chat(Result *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->chat);
}

static PyObject *result_get_latency(Result *self, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(self->latency);
}

static PyObject *result_get_attempts(Result *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong((long)self->attempts);
}

static PyObject *result_repr(Result *self)
{
    return PyUnicode_FromFormat("Result(text=%.200R, finish_reason=%R, attempts=%d)", self->text,
                                self->finish_reason, (int)self->attempts);
}

static PyObject *result_str(Result *self)
{
    return Py_NewRef(self->text);
}

static PyMemberDef result_members[] = {
    {"text", T_OBJECT, offsetof(Result, text), READONLY, "first choice's text"},
    {"finish_reason", T_OBJECT, offsetof(Result, finish_reason), READONLY, NULL},
    {"model", T_OBJECT, offsetof(Result, model), READONLY, "the model the server named"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef result_getset[] = {
    {"usage", (getter)result_get_usage, NULL, "token usage reported by the server, or None",
     NULL},
    {"texts", (getter)result_get_texts, NULL, "every choice's text in index order", NULL},
    {"choices", (getter)result_get_choices, NULL,
     "openai-shaped choices: index, text or message, finish_reason, logprobs", NULL},
    {"tool_calls", (getter)result_get_tool_calls, NULL,
     "the first choice's tool calls (chat), or None", NULL},
    {"id", (getter)result_get_id, NULL,
     "the server's response id (single calls; bulk calls with raw=True), or None", NULL},
    {"raw", (getter)result_get_raw, NULL,
     "the whole answer as parsed JSON when the call passed raw=True, else None", NULL},
    {"_choice_data", (getter)result_get_choice_data, NULL, NULL, NULL},
    {"_chat", (getter)result_get_chat, NULL, NULL, NULL},
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

static PyObject *str_or_none(const char *s)
{
    return s ? PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "replace") : Py_NewRef(Py_None);
}

static int32_t clamp_tokens(int64_t v)
{
    return v < 0 ? -1 : v > INT32_MAX ? INT32_MAX : (int32_t)v;
}

/* The shared model str: one object for a million results of one model. */
static PyObject *model_obj(const char *m, PyObject **cache)
{
    if (!m)
        return Py_NewRef(Py_None);
    if (*cache) {
        Py_ssize_t n;
        const char *c = PyUnicode_AsUTF8AndSize(*cache, &n);
        if (c && (size_t)n == strlen(m) && memcmp(c, m, (size_t)n) == 0)
            return Py_NewRef(*cache);
        PyErr_Clear();
    }
    PyObject *s = PyUnicode_DecodeUTF8(m, (Py_ssize_t)strlen(m), "replace");
    if (s)
        Py_XSETREF(*cache, Py_NewRef(s));
    return s;
}

static PyObject *choices_tuple(bg_state *st, const bg_resp *rs, PyObject *first_text)
{
    PyObject *t = PyTuple_New((Py_ssize_t)rs->n_choices);
    if (!t)
        return NULL;
    for (size_t i = 0; i < rs->n_choices; i++) {
        const bg_choice *c = &rs->choices[i];
        PyObject *text = i == 0 ? Py_NewRef(first_text)
                                : PyUnicode_DecodeUTF8(c->text, (Py_ssize_t)c->text_len, "replace");
        PyObject *fr = finish_reason_obj(st, c->finish_reason);
        PyObject *tc = str_or_none(c->tool_calls_json);
        PyObject *lp = str_or_none(c->logprobs_json);
        PyObject *item = text && fr && tc && lp ? PyTuple_Pack(4, text, fr, tc, lp) : NULL;
        Py_XDECREF(text);
        Py_XDECREF(fr);
        Py_XDECREF(tc);
        Py_XDECREF(lp);
        if (!item) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, item);
    }
    return t;
}

PyObject *bg_result_new(bg_state *st, const bg_request *r, int keep_id, PyObject **model_cache)
{
    Result *res = PyObject_New(Result, st->ResultType);
    if (!res)
        return NULL;
    res->text = res->finish_reason = res->model = res->extra = NULL;
    res->latency = (double)(r->t_done_ns - r->t_submit_ns) / 1e9;
    res->attempts = r->attempts > 0 ? (unsigned int)r->attempts : 0u;
    res->chat = r->endpoint == BG_EP_CHAT;
    const bg_resp *rs = &r->resp;
    res->prompt_tokens = clamp_tokens(rs->usage.prompt_tokens);
    res->completion_tokens = clamp_tokens(rs->usage.completion_tokens);
    res->total_tokens = clamp_tokens(rs->usage.total_tokens);
    if (!rs->usage.present)
        res->prompt_tokens = res->completion_tokens = res->total_tokens = -1;
    if (rs->n_choices == 0) {
        res->text = PyUnicode_New(0, 0);
        res->finish_reason = Py_NewRef(Py_None);
    } else {
        res->text = PyUnicode_DecodeUTF8(rs->choices[0].text, (Py_ssize_t)rs->choices[0].text_len,
                                         "replace");
        res->finish_reason = finish_reason_obj(st, rs->choices[0].finish_reason);
    }
    res->model = model_obj(rs->model, model_cache);
    if (!res->text || !res->finish_reason || !res->model)
        goto fail;
    int rich = rs->n_choices > 1;
    for (size_t i = 0; i < rs->n_choices && !rich; i++)
        rich = rs->choices[i].tool_calls_json || rs->choices[i].logprobs_json;
    keep_id = keep_id && rs->id;
    if (rich || keep_id || r->raw) {
        if (!(res->extra = PyList_New(RX_COUNT)))
            goto fail;
        for (int i = 0; i < RX_COUNT; i++)
            PyList_SET_ITEM(res->extra, i, Py_NewRef(Py_None));
        PyObject *v;
#define SET_EXTRA(slot, expr)                                                   \
    do {                                                                        \
        if (!(v = (expr)))                                                      \
            goto fail;                                                          \
        PyList_SetItem(res->extra, (slot), v);                                  \
    } while (0)
        if (r->raw)
            SET_EXTRA(RX_RAW, PyBytes_FromStringAndSize(r->raw, (Py_ssize_t)r->raw_len));
        if (keep_id)
            SET_EXTRA(RX_ID, str_or_none(rs->id));
        if (rich)
            SET_EXTRA(RX_CHOICES, choices_tuple(st, rs, res->text));
#undef SET_EXTRA
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
