/* bg_dispatcher_config.c - what configures requests, checked before the
 * engine sees it: _Dispatcher's keyword arguments (parsed from one table, each
 * checked for type and range with an error naming the argument, turned into
 * the engine's configuration), and the request templates with their per-call
 * options (_Dispatcher.template()).
 *
 * Keywords only: a seventeen-argument positional call cannot be read, and a
 * misplaced float would silently become a different setting.
 */
#include "bg_dispatcher.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

enum { A_STR, A_STR_OR_NONE, A_INT, A_NUM, A_BOOL, A_OBJ };

typedef struct {
    const char *name;
    int kind;
    size_t off;
} arg_spec;

#define ARG(field, kind) {#field, kind, offsetof(bg_dsp_args, field)}
static const arg_spec arg_specs[] = {
    ARG(base_url, A_STR),
    ARG(api_key, A_STR_OR_NONE),
    ARG(max_concurrent, A_INT),
    ARG(semaphore, A_OBJ),
    ARG(max_inflight_tokens, A_INT),
    ARG(timeout, A_NUM),
    ARG(connect_timeout, A_NUM),
    ARG(max_retries, A_INT),
    ARG(headers, A_OBJ),
    ARG(verify, A_BOOL),
    ARG(max_response_bytes, A_INT),
    ARG(backoff, A_NUM),
    ARG(max_backoff, A_NUM),
    ARG(max_retry_after, A_NUM),
    ARG(retry_timeouts, A_BOOL),
    ARG(max_connections, A_INT),
    ARG(default_max_tokens, A_INT),
    ARG(admission, A_OBJ),
};
#undef ARG
#define N_ARGS ((Py_ssize_t)(sizeof(arg_specs) / sizeof(arg_specs[0])))

static const char *const kind_names[] = {"str", "str or None", "int", "a number", "bool", ""};

static void args_defaults(bg_dsp_args *a)
{
    memset(a, 0, sizeof(*a));
    a->max_concurrent = 20;
    a->max_retries = 3;
    a->max_response_bytes = 64 << 20;
    a->default_max_tokens = 16;
    a->semaphore = a->headers = a->admission = Py_None;
    a->timeout = 600;
    a->connect_timeout = 10;
    a->backoff = 0.5;
    a->max_backoff = 30;
    a->max_retry_after = 60;
    a->verify = 1;
}

static int wrong_type(const arg_spec *s, PyObject *v)
{
    PyErr_Format(PyExc_TypeError, "_Dispatcher() argument '%s' must be %s, not %.100s", s->name,
                 kind_names[s->kind], Py_TYPE(v)->tp_name);
    return -1;
}

static int store_str(const arg_spec *s, PyObject *v, const char **out)
{
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(v, &n);
    if (!p)
        return -1;
    if ((size_t)n != strlen(p)) {
        PyErr_Format(PyExc_ValueError, "_Dispatcher() argument '%s' must not contain NUL",
                     s->name);
        return -1;
    }
    *out = p;
    return 0;
}

/* One argument into its field. Exact types: bool is not taken for an int (nor
 * an int for a bool), so a shifted argument cannot pass as another. */
static int store_arg(bg_dsp_args *a, const arg_spec *s, PyObject *v)
{
    char *field = (char *)a + s->off;
    switch (s->kind) {
    case A_STR:
        if (!PyUnicode_Check(v))
            return wrong_type(s, v);
        return store_str(s, v, (const char **)(void *)field);
    case A_STR_OR_NONE:
        if (v == Py_None) {
            *(const char **)(void *)field = NULL;
            return 0;
        }
        if (!PyUnicode_Check(v))
            return wrong_type(s, v);
        return store_str(s, v, (const char **)(void *)field);
    case A_INT: {
        if (!PyLong_Check(v) || PyBool_Check(v))
            return wrong_type(s, v);
        Py_ssize_t x = PyLong_AsSsize_t(v);
        if (x == -1 && PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "_Dispatcher() argument '%s' is out of range",
                         s->name);
            return -1;
        }
        *(Py_ssize_t *)(void *)field = x;
        return 0;
    }
    case A_NUM: {
        if ((!PyFloat_Check(v) && !PyLong_Check(v)) || PyBool_Check(v))
            return wrong_type(s, v);
        double x = PyFloat_AsDouble(v);
        if (x == -1.0 && PyErr_Occurred())
            return -1;
        if (!(x >= 0)) { /* also NaN */
            PyErr_Format(PyExc_ValueError, "_Dispatcher() argument '%s' must be >= 0, got %R",
                         s->name, v);
            return -1;
        }
        *(double *)(void *)field = x;
        return 0;
    }
    case A_BOOL:
        if (!PyBool_Check(v))
            return wrong_type(s, v);
        *(int *)(void *)field = v == Py_True;
        return 0;
    default:
        *(PyObject **)(void *)field = v;
        return 0;
    }
}

static int range_error(const char *name, const char *want, Py_ssize_t got)
{
    PyErr_Format(PyExc_ValueError, "_Dispatcher() argument '%s' must be %s, got %zd", name, want,
                 got);
    return -1;
}

/* The checks that need more than one argument's type. */
static int check_values(bg_state *st, bg_dsp_args *a)
{
    if (a->semaphore != Py_None && !PyObject_TypeCheck(a->semaphore, st->SemaphoreType)) {
        PyErr_Format(PyExc_TypeError,
                     "_Dispatcher() argument 'semaphore' must be a batchgate.Semaphore or None, "
                     "not %.100s",
                     Py_TYPE(a->semaphore)->tp_name);
        return -1;
    }
    if (a->semaphore == Py_None && a->max_concurrent < 1)
        return range_error("max_concurrent", ">= 1", a->max_concurrent);
    if (a->max_inflight_tokens < 0)
        return range_error("max_inflight_tokens", ">= 0 (0: no token cap)",
                           a->max_inflight_tokens);
    if (a->max_retries < 0 || a->max_retries > 1000)
        return range_error("max_retries", "in 0..1000", a->max_retries);
    if (a->max_response_bytes < 0)
        return range_error("max_response_bytes", ">= 0 (0: no limit)", a->max_response_bytes);
    if (a->max_connections < 0)
        return range_error("max_connections", ">= 0 (0: libcurl's default)",
                           a->max_connections);
    if (a->admission != Py_None) {
        if (!PyDict_Check(a->admission)) {
            PyErr_Format(PyExc_TypeError,
                         "_Dispatcher() argument 'admission' must be a dict or None, not %.100s",
                         Py_TYPE(a->admission)->tp_name);
            return -1;
        }
        if (a->max_inflight_tokens > 0) {
            PyErr_SetString(PyExc_ValueError,
                            "_Dispatcher() arguments 'admission' and 'max_inflight_tokens' "
                            "exclude each other");
            return -1;
        }
    }
    return 0;
}

/* headers: a sequence of "Name: value" str, kept as UTF-8 pointers into the
 * str objects (alive as long as a->header_seq). */
static int parse_headers(bg_dsp_args *a)
{
    if (a->headers == Py_None)
        return 0;
    if (PyUnicode_Check(a->headers) || PyBytes_Check(a->headers)) {
        PyErr_SetString(PyExc_TypeError, "_Dispatcher() argument 'headers' must be a sequence of "
                                         "'Name: value' str, not one str");
        return -1;
    }
    a->header_seq = PySequence_Fast(a->headers, "_Dispatcher() argument 'headers' must be a "
                                                "sequence of 'Name: value' str");
    if (!a->header_seq)
        return -1;
    Py_ssize_t nh = PySequence_Fast_GET_SIZE(a->header_seq);
    a->header_lines = PyMem_Calloc((size_t)nh + 1, sizeof(char *));
    if (!a->header_lines) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nh; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(a->header_seq, i);
        Py_ssize_t hl;
        if (!PyUnicode_Check(h)) {
            PyErr_Format(PyExc_TypeError, "_Dispatcher() argument 'headers': item %zd must be "
                                          "a str, not %.100s",
                         i, Py_TYPE(h)->tp_name);
            return -1;
        }
        if (!(a->header_lines[i] = PyUnicode_AsUTF8AndSize(h, &hl)))
            return -1;
        if ((size_t)hl != strlen(a->header_lines[i])) {
            PyErr_Format(PyExc_ValueError, "header %zd must not contain NUL", i);
            return -1;
        }
    }
    a->n_headers = (size_t)nh;
    return 0;
}

int bg_dsp_args_parse(bg_state *st, PyObject *args, PyObject *kwds, bg_dsp_args *a)
{
    args_defaults(a);
    Py_ssize_t npos = args ? PyTuple_GET_SIZE(args) : 0;
    if (npos) {
        PyErr_Format(PyExc_TypeError,
                     "_Dispatcher() takes keyword arguments only (%zd positional given)", npos);
        return -1;
    }
    int have_base_url = 0;
    if (kwds) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwds, &pos, &key, &value)) {
            const arg_spec *s = NULL;
            for (Py_ssize_t i = 0; i < N_ARGS && !s; i++)
                if (PyUnicode_CompareWithASCIIString(key, arg_specs[i].name) == 0)
                    s = &arg_specs[i];
            if (!s) {
                PyErr_Format(PyExc_TypeError,
                             "_Dispatcher() got an unexpected keyword argument %R", key);
                goto fail;
            }
            if (store_arg(a, s, value) < 0)
                goto fail;
            have_base_url |= s->off == offsetof(bg_dsp_args, base_url);
        }
    }
    if (!have_base_url) {
        PyErr_SetString(PyExc_TypeError,
                        "_Dispatcher() missing required keyword argument 'base_url'");
        goto fail;
    }
    if (check_values(st, a) < 0 || parse_headers(a) < 0)
        goto fail;
    return 0;
fail:
    bg_dsp_args_release(a);
    return -1;
}

void bg_dsp_args_release(bg_dsp_args *a)
{
    PyMem_Free(a->header_lines);
    a->header_lines = NULL;
    a->n_headers = 0;
    Py_CLEAR(a->header_seq);
}

/* libcurl timeouts are whole milliseconds, 0 meaning none: round a positive
 * timeout up (0.0004 s must not become "no timeout"), and treat inf or
 * anything past 2^31 ms (~25 days) as none instead of an undefined cast. */
static long seconds_to_ms(double s)
{
    if (!(s > 0))
        return 0;
    double ms = ceil(s * 1000.0);
    return ms >= 2147483647.0 ? 0 : (long)ms;
}

void bg_dsp_engine_config(const bg_dsp_args *a, bg_engine_config *c)
{
    bg_engine_config_defaults(c);
    c->base_url = a->base_url;
    c->api_key = a->api_key;
    c->headers = a->header_lines;
    c->n_headers = a->n_headers;
    c->timeout_ms = seconds_to_ms(a->timeout);
    c->connect_timeout_ms = seconds_to_ms(a->connect_timeout);
    c->max_retries = (int)a->max_retries;
    c->verify_tls = a->verify;
    c->retry_timeouts = a->retry_timeouts;
    c->max_response_bytes = a->max_response_bytes > 0 ? (size_t)a->max_response_bytes : 0;
    c->backoff_base_s = a->backoff;
    c->backoff_max_s = a->max_backoff;
    c->retry_after_max_s = a->max_retry_after;
    c->max_connections = (long)a->max_connections;
}

/* ---- Template ---------------------------------------------------------- */

static void template_dealloc(Template *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    bg_tmpl_decref(self->tmpl);
    bg_req_opts_free(self->opts);
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

PyType_Spec bg_template_spec = {
    .name = "batchgate._native._Template",
    .basicsize = sizeof(Template),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = template_slots,
};

/* ---- _Dispatcher.template() ------------------------------------------- */

/* Per-call options from (timeout_ms, max_retries, header_lines, query, keep_raw);
 * NULL with no exception for None. */
static int opts_from_tuple(Core *self, PyObject *o, bg_req_opts **out)
{
    *out = NULL;
    if (o == Py_None)
        return 0;
    long timeout_ms;
    int max_retries, keep_raw;
    PyObject *hdrs, *query;
    if (!PyArg_ParseTuple(o, "liO!Op;template options", &timeout_ms, &max_retries, &PyTuple_Type,
                          &hdrs, &query, &keep_raw))
        return -1;
    Py_ssize_t nh = PyTuple_GET_SIZE(hdrs);
    const char **lines = PyMem_Calloc((size_t)nh + 1, sizeof(char *));
    if (!lines) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = -1;
    bg_req_opts_spec spec = {.timeout_ms = timeout_ms, .max_retries = max_retries,
                             .headers = lines, .n_headers = (size_t)nh, .keep_raw = keep_raw};
    for (Py_ssize_t i = 0; i < nh; i++) {
        Py_ssize_t n;
        PyObject *h = PyTuple_GET_ITEM(hdrs, i);
        if (!PyUnicode_Check(h)) {
            PyErr_SetString(PyExc_TypeError, "header lines must be str");
            goto done;
        }
        if (!(lines[i] = PyUnicode_AsUTF8AndSize(h, &n)))
            goto done;
        if ((size_t)n != strlen(lines[i])) {
            PyErr_SetString(PyExc_ValueError, "a header must not contain NUL");
            goto done;
        }
    }
    if (query != Py_None && !(spec.query = PyUnicode_AsUTF8(query)))
        goto done;
    char err[200];
    if (!(*out = bg_req_opts_new(self->engine, &spec, err, sizeof(err)))) {
        PyErr_SetString(PyExc_ValueError, err);
        goto done;
    }
    rc = 0;
done:
    PyMem_Free(lines);
    return rc;
}

/* template(model, params_json: str | None[, options]) -> _Template */
PyObject *bg_core_template(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (bg_core_check(self) < 0)
        return NULL;
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "template(model, params_json[, options])");
        return NULL;
    }
    const char *model = NULL, *extra = NULL;
    Py_ssize_t elen = 0, mlen = 0;
    if (args[0] != Py_None && !(model = PyUnicode_AsUTF8AndSize(args[0], &mlen)))
        return NULL;
    if (model && ((size_t)mlen != strlen(model) || strpbrk(model, "\r\n"))) {
        PyErr_SetString(PyExc_ValueError, "model must not contain NUL, CR or LF");
        return NULL;
    }
    if (args[1] != Py_None && !(extra = PyUnicode_AsUTF8AndSize(args[1], &elen)))
        return NULL;
    bg_req_opts *opts = NULL;
    if (nargs == 3 && opts_from_tuple(self, args[2], &opts) < 0)
        return NULL;
    char err[300];
    bg_tmpl *t = bg_tmpl_new(model, extra, (size_t)elen, err, sizeof(err));
    if (!t) {
        bg_req_opts_free(opts);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Template *obj = PyObject_New(Template, self->st->TemplateType);
    if (!obj) {
        bg_req_opts_free(opts);
        bg_tmpl_decref(t);
        return NULL;
    }
    obj->tmpl = t;
    obj->opts = opts;
    return (PyObject *)obj;
}
