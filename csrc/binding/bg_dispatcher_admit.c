/* bg_dispatcher_admit.c - the Python face of closed-loop admission:
 * _Dispatcher.probe() (what a server says about its KV cache), the setup of
 * the controller and its block semaphore for core_init, and the admission
 * part of stats() and its limit-move events. */
#include "bg_dispatcher.h"

#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The engine's clock (CLOCK_MONOTONIC), in seconds. */
static double monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* probe(metrics_url, models_url, api_key, headers, verify, timeout, model) -> dict
 * Blocking, GIL released. Raises BatchgateError with the reason when the
 * server does not expose what admission needs. */
PyObject *bg_dsp_probe(PyObject *cls, PyObject *args)
{
    const char *metrics_url, *models_url = NULL, *api_key = NULL, *model = NULL;
    PyObject *headers;
    int verify;
    double timeout;
    if (!PyArg_ParseTuple(args, "szzOpdz", &metrics_url, &models_url, &api_key, &headers,
                          &verify, &timeout, &model))
        return NULL;
    bg_state *st = bg_state_from_type((PyTypeObject *)cls);
    if (!st)
        return NULL;
    if (strncmp(metrics_url, "http://", 7) != 0 && strncmp(metrics_url, "https://", 8) != 0) {
        PyErr_Format(PyExc_ValueError, "metrics_url must be an http(s) URL, got %.200s",
                     metrics_url);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(headers, "headers must be a sequence of str");
    if (!seq)
        return NULL;
    Py_ssize_t nh = PySequence_Fast_GET_SIZE(seq);
    const char **hdrs = PyMem_Calloc((size_t)nh + 1, sizeof(char *));
    PyObject *res = NULL;
    if (!hdrs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nh; i++)
        if (!(hdrs[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i))))
            goto done;
    long tmo = timeout > 0 && timeout < 3600 ? (long)(timeout * 1000) : 5000;
    bg_server_probe pr;
    char err[400];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = bg_probe_server(metrics_url, models_url, api_key, hdrs, (size_t)nh, verify, tmo, model,
                         &pr, err, sizeof(err));
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(st->BatchgateError, err);
        goto done;
    }
    res = Py_BuildValue("{sLsLsLsdsdsdsdss}", "kv_blocks", (long long)pr.metrics.num_gpu_blocks,
                        "block_size", (long long)pr.metrics.block_size, "max_model_len",
                        (long long)pr.max_model_len, "kv_usage", pr.metrics.kv_usage, "running",
                        pr.metrics.running, "waiting", pr.metrics.waiting, "preemptions",
                        pr.metrics.preemptions, "model_id", pr.model_id);
done:
    PyMem_Free(hdrs);
    Py_DECREF(seq);
    return res;
}

static int dict_double(PyObject *d, const char *key, double *out)
{
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed */
    if (!v)
        return 0;
    double x = PyFloat_AsDouble(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

static int dict_int(PyObject *d, const char *key, int64_t *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v)
        return 0;
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

/* From the dict Python built after a successful probe: create the block
 * semaphore (self->tokens) and the controller, and fill the engine config.
 * Strings are borrowed from cfg_dict, which outlives bg_engine_create. */
int bg_dsp_admit_setup(Core *self, PyObject *cfg_dict, bg_engine_config *c)
{
    if (!PyDict_Check(cfg_dict)) {
        PyErr_SetString(PyExc_TypeError, "admission config must be a dict");
        return -1;
    }
    int64_t blocks = 0, block_size = 0, mml = -1;
    double interval = 0.2;
    bg_admit_params p;
    bg_admit_params_defaults(&p);
    if (dict_int(cfg_dict, "kv_blocks", &blocks) < 0 ||
        dict_int(cfg_dict, "block_size", &block_size) < 0 ||
        dict_int(cfg_dict, "max_model_len", &mml) < 0 ||
        dict_double(cfg_dict, "interval", &interval) < 0 ||
        dict_double(cfg_dict, "stale_after", &p.stale_s) < 0 ||
        dict_double(cfg_dict, "target", &p.target_usage) < 0 ||
        dict_double(cfg_dict, "high", &p.high_usage) < 0)
        return -1;
    PyObject *url = PyDict_GetItemString(cfg_dict, "metrics_url");
    PyObject *model = PyDict_GetItemString(cfg_dict, "model");
    const char *url_s = url ? PyUnicode_AsUTF8(url) : NULL;
    if (!url_s) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "admission config needs metrics_url");
        return -1;
    }
    const char *model_s = NULL;
    if (model && model != Py_None && !(model_s = PyUnicode_AsUTF8(model)))
        return -1;
    if (blocks < 1 || block_size < 1 || blocks > ((int64_t)1 << 40)) {
        PyErr_Format(PyExc_ValueError, "bad KV cache size: %lld blocks of %lld tokens",
                     (long long)blocks, (long long)block_size);
        return -1;
    }
    if (!(interval >= 0.01 && interval <= 60)) {
        PyErr_Format(PyExc_ValueError, "metrics_interval must be in 0.01..60 s, got %g",
                     interval);
        return -1;
    }
    double usage0 = -1, waiting0 = -1; /* the probe's reading */
    if (dict_double(cfg_dict, "kv_usage", &usage0) < 0 ||
        dict_double(cfg_dict, "waiting", &waiting0) < 0)
        return -1;
    bg_admit *a = bg_admit_new(&p, blocks, block_size, mml, monotonic_s());
    if (a)
        bg_admit_start(a, usage0, waiting0);
    if (!a) {
        PyErr_Format(PyExc_ValueError,
                     "invalid admission parameters (need 0 < kv_target <= kv_high <= 1, "
                     "metrics_stale_after > 0)");
        return -1;
    }
    bg_admit_stats ast;
    bg_admit_get_stats(a, &ast);
    /* Bounded by what the controller can ask for, not by the KV size: an
     * overbooked limit counts charges above what the server holds (a single
     * request is still charged at most the KV size). */
    int64_t bound = bg_admit_max_effective(a);
    self->tokens = bg_sem_create(bound, bound);
    if (!self->tokens) {
        bg_admit_free(a);
        PyErr_NoMemory();
        return -1;
    }
    /* The controller's limit starts lower and moves (bg_sem_set_capacity). */
    if (bg_sem_set_capacity(self->tokens, ast.limit) < 0) {
        bg_admit_free(a);
        PyErr_SetString(PyExc_RuntimeError, "cannot set the admission limit");
        return -1;
    }
    self->token_cap = blocks;
    c->token_sem = self->tokens;
    c->token_cap = blocks;
    c->admit = a; /* the engine owns it from bg_engine_create on */
    c->metrics_url = url_s;
    c->metrics_model = model_s;
    c->metrics_interval_ms = (long)(interval * 1000);
    self->admit = 1;
    return 0;
}

PyObject *bg_dsp_admit_stats(Core *self)
{
    bg_engine_admit_info in;
    if (!self->admit || !self->engine || CORE_FORKED(self) ||
        !bg_engine_admit_info_get(self->engine, &in))
        Py_RETURN_NONE;
    const bg_admit_stats *s = &in.ctl;
    PyObject *d = Py_BuildValue(
        "{sLsLsLsLsLsLsLsLsLsdsdsLsdsdsdsdsdsKsKsKsKsOsOsLsdsdsdsKsKsKss}",
        "kv_blocks", (long long)s->kv_blocks, "block_size", (long long)s->block_size,
        "kv_tokens", (long long)(s->kv_blocks * s->block_size), "max_model_len",
        (long long)s->max_model_len, "limit_blocks", (long long)s->effective,
        "limit_tokens", (long long)(s->effective * s->block_size), "peak_limit_blocks",
        (long long)s->peak_limit, "ceiling_blocks", (long long)s->ceiling,
        "limit_max_blocks", (long long)bg_sem_max_value(self->tokens), "used_share",
        s->used_share, "prompt_share", s->prompt_share, "held_blocks",
        (long long)in.held_blocks, "kv_usage", s->kv_usage, "peak_kv_usage",
        s->peak_kv_usage, "running", s->running, "waiting", s->waiting,
        "preemptions_seen", s->preemptions_seen, "cuts", (unsigned long long)s->cuts,
        "grows", (unsigned long long)s->grows, "overloads", (unsigned long long)s->overloads,
        "stale_episodes",
        (unsigned long long)s->stale_episodes, "stale", s->stale ? Py_True : Py_False,
        "learned", s->learned ? Py_True : Py_False, "reserved_output_tokens",
        (long long)s->reserve_out, "output_tokens_p50", s->out_p50, "output_tokens_q",
        s->out_q, "prompt_ratio", s->prompt_ratio, "finished_sequences",
        (unsigned long long)s->finished_seqs, "scrapes", (unsigned long long)in.scrapes_ok,
        "scrape_errors", (unsigned long long)in.scrapes_failed, "last_scrape_error",
        in.last_error);
    return d;
}

/* [(monotonic_time, from_blocks, to_blocks, reason), ...] since the last call. */
PyObject *bg_dsp_admit_events(Core *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (!out || !self->admit || !self->engine || CORE_FORKED(self))
        return out;
    bg_admit_event ev[64];
    size_t n = bg_engine_admit_events(self->engine, ev, 64);
    for (size_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(dLLs)", ev[i].t, (long long)ev[i].from,
                                    (long long)ev[i].to, bg_admit_reason_name(ev[i].reason));
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}
