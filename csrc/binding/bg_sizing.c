/* bg_sizing.c - Python bindings of the estimator and the batch planner.
 *
 * Texts are read straight from CPython's compact string storage (1, 2 or 4
 * bytes per code point): no UTF-8 encoding, no per-item Python calls.
 * Argument defaults and Config lookups live in python/batchgate/sizing.py;
 * this file validates items and does the per-item work.
 */
#include "bg_module.h"

#include "bg_estimate.h"
#include "bg_plan.h"

#include <stdint.h>
#include <stdlib.h>

/* Borrowed view of a str's code points. Returns -1 with TypeError set when
 * obj is not a str; `what`/`index` name the item in the message. */
static int text_view(PyObject *obj, const char *what, Py_ssize_t index,
                     const void **data, size_t *len, int *width)
{
    if (!PyUnicode_Check(obj)) {
        if (index >= 0)
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be str, not %.100s", what, index,
                         Py_TYPE(obj)->tp_name);
        else
            PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what,
                         Py_TYPE(obj)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0)
        return -1;
#endif
    *data = PyUnicode_DATA(obj);
    *len = (size_t)PyUnicode_GET_LENGTH(obj);
    *width = (int)PyUnicode_KIND(obj);
    return 0;
}

/* A list/tuple of the items, or TypeError naming the argument. A str is a
 * sequence too, but passing one where a list of texts belongs is a bug. */
static PyObject *as_text_sequence(PyObject *obj, const char *what)
{
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj) ||
        !PySequence_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a sequence of str (e.g. a list), not %.100s",
                     what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PySequence_Fast(obj, what);
}

static int parse_method(PyObject *method, enum bg_est_method *out)
{
    if (!PyUnicode_Check(method)) {
        PyErr_Format(PyExc_TypeError, "method must be str ('script' or 'chars'), not %.100s",
                     Py_TYPE(method)->tp_name);
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(method, "script") == 0) {
        *out = BG_EST_SCRIPT;
    } else if (PyUnicode_CompareWithASCIIString(method, "chars") == 0) {
        *out = BG_EST_CHARS;
    } else {
        PyErr_Format(PyExc_ValueError, "method must be 'script' or 'chars', not %R", method);
        return -1;
    }
    return 0;
}

/* ---- calculate_dynamic_batch_size ------------------------------------------------ */

/* The original pipeline's formula, bit for bit:
 *   avg_chars  = sum(len(t) for t in texts[:50]) / min(50, n)
 *   avg_tokens = max(1, int(avg_chars / 3.5))
 *   size       = max(1, int(max_tokens / avg_tokens))
 *   result     = max(min_size, min(size, max_size))
 * Every item is type-checked, not only the sample, so bad input fails here. */
static PyObject *dynamic_batch_size(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "dynamic_batch_size(texts, max_tokens, min_size, max_size, default_size)");
        return NULL;
    }
    PyObject *max_tokens = args[1], *min_size = args[2], *max_size = args[3];
    PyObject *seq = as_text_sequence(args[0], "content_list");
    if (!seq)
        return NULL;
    PyObject *result = NULL, *size = NULL, *tmp = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint64_t total = 0;
    Py_ssize_t sample = n < 50 ? n : 50;
    for (Py_ssize_t i = 0; i < n; i++) {
        const void *data;
        size_t len;
        int width;
        if (text_view(items[i], "content_list", i, &data, &len, &width) < 0)
            goto done;
        if (i < sample)
            total += len;
    }
    if (n == 0) {
        result = Py_NewRef(args[4]);
        goto done;
    }
    double avg_chars = (double)total / (double)sample;
    double avg_tokens_f = avg_chars / 3.5;
    int64_t avg_tokens = avg_tokens_f < 1.0 ? 1 : (int64_t)avg_tokens_f;

    /* int(max_tokens / avg_tokens): exact in doubles below 2**53; above that
     * defer to Python's correctly rounded int division. */
    int overflow = 0;
    long long mt = PyLong_AsLongLongAndOverflow(max_tokens, &overflow);
    if (mt == -1 && PyErr_Occurred())
        goto done;
    if (!overflow && mt >= 0 && mt < (1LL << 53)) {
        double q = (double)mt / (double)avg_tokens;
        size = PyLong_FromLongLong((long long)q);
    } else {
        PyObject *den = PyLong_FromLongLong(avg_tokens);
        if (!den)
            goto done;
        tmp = PyNumber_TrueDivide(max_tokens, den);
        Py_DECREF(den);
        if (!tmp)
            goto done;
        size = PyNumber_Long(tmp);
    }
    if (!size)
        goto done;
    PyObject *one = PyLong_FromLong(1);
    if (!one)
        goto done;
    int lt = PyObject_RichCompareBool(size, one, Py_LT);
    if (lt == 1)
        Py_SETREF(size, one);
    else
        Py_DECREF(one);
    if (lt < 0)
        goto done;
    /* min(size, max_size) keeps size on ties; max(min_size, x) keeps min_size. */
    int gt = PyObject_RichCompareBool(max_size, size, Py_LT);
    if (gt < 0)
        goto done;
    if (gt)
        Py_SETREF(size, Py_NewRef(max_size));
    int lo = PyObject_RichCompareBool(size, min_size, Py_GT);
    if (lo < 0)
        goto done;
    result = lo ? Py_NewRef(size) : Py_NewRef(min_size);
done:
    Py_XDECREF(size);
    Py_XDECREF(tmp);
    Py_DECREF(seq);
    return result;
}

/* ---- estimate_tokens / estimate_many / token_features ---------------------------- */

static PyObject *estimate_tokens(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "estimate_tokens(text, method)");
        return NULL;
    }
    enum bg_est_method method;
    const void *data;
    size_t len;
    int width;
    if (parse_method(args[1], &method) < 0 ||
        text_view(args[0], "text", -1, &data, &len, &width) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(bg_estimate_ucs(data, len, width, method));
}

/* Large lists hold str objects scattered over the heap: without help every
 * item starts with a cache miss on its header. Ask for the header a few items
 * ahead, and for the code points once that header has arrived. */
#define PREFETCH_HEADER_AHEAD 32
#define PREFETCH_DATA_AHEAD 16
#define PREFETCH_MAX_LINES 8

/* GCC 12's dead-code pass was seen to drop __builtin_prefetch in this loop at
 * -O1 and above (with NDEBUG), so x86-64 states the instruction itself. */
static inline void prefetch_line(const void *p)
{
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p));
#elif defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p);
#else
    (void)p;
#endif
}

static inline void prefetch_text(PyObject *const *items, Py_ssize_t i, Py_ssize_t n)
{
    if (i + PREFETCH_HEADER_AHEAD < n)
        prefetch_line(items[i + PREFETCH_HEADER_AHEAD]);
    if (i + PREFETCH_DATA_AHEAD < n) {
        PyObject *o = items[i + PREFETCH_DATA_AHEAD];
        if (PyUnicode_CheckExact(o) && PyUnicode_IS_COMPACT(o)) {
            const char *data = PyUnicode_DATA(o);
            size_t bytes = (size_t)PyUnicode_GET_LENGTH(o) * PyUnicode_KIND(o);
            size_t lines = (((uintptr_t)data & 63) + bytes + 63) / 64;
            if (lines > PREFETCH_MAX_LINES)
                lines = PREFETCH_MAX_LINES;
            for (size_t k = 0; k < lines; k++)
                prefetch_line(data + 64 * k - ((uintptr_t)data & 63));
        }
    }
}

/* Estimates for every item into a malloc'd array (caller frees). */
static uint64_t *estimate_all(PyObject **items, Py_ssize_t n, const char *what,
                              enum bg_est_method method)
{
    uint64_t *out = malloc((size_t)(n ? n : 1) * sizeof *out);
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        prefetch_text(items, i, n);
        const void *data;
        size_t len;
        int width;
        if (text_view(items[i], what, i, &data, &len, &width) < 0) {
            free(out);
            return NULL;
        }
        out[i] = bg_estimate_ucs(data, len, width, method);
    }
    return out;
}

static PyObject *estimate_many(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "estimate_many(texts, method)");
        return NULL;
    }
    enum bg_est_method method;
    if (parse_method(args[1], &method) < 0)
        return NULL;
    PyObject *seq = as_text_sequence(args[0], "texts");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = NULL;
    uint64_t *est = estimate_all(PySequence_Fast_ITEMS(seq), n, "texts", method);
    if (!est)
        goto done;
    result = PyList_New(n);
    if (!result)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(est[i]);
        if (!v) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, v);
    }
done:
    free(est);
    Py_DECREF(seq);
    return result;
}

static PyObject *token_features(PyObject *module, PyObject *text)
{
    (void)module;
    const void *data;
    size_t len;
    int width;
    if (text_view(text, "text", -1, &data, &len, &width) < 0)
        return NULL;
    bg_features f;
    bg_features_ucs(data, len, width, &f);
    PyObject *t = PyTuple_New(BG_NFEATURES);
    if (!t)
        return NULL;
    for (int i = 0; i < BG_NFEATURES; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(f.f[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* ---- plan ------------------------------------------------------------------------ */

/* A token count from a user-supplied count (or a counter's return value). */
static int token_count_from(PyObject *v, const char *what, Py_ssize_t index, uint64_t *out)
{
    if (PyBool_Check(v) || !PyIndex_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s[%zd] must be an int token count, not %.100s", what,
                     index, Py_TYPE(v)->tp_name);
        return -1;
    }
    PyObject *num = PyNumber_Index(v);
    if (!num)
        return -1;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(num, &overflow);
    Py_DECREF(num);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] is too large a token count", what, index);
        return -1;
    }
    if (overflow < 0 || x < 0) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] must be >= 0, got %R", what, index, v);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

static uint64_t *counts_from_sequence(PyObject *counts, Py_ssize_t n)
{
    if (PyUnicode_Check(counts) || !PySequence_Check(counts)) {
        PyErr_Format(PyExc_TypeError, "counts must be a sequence of int, not %.100s",
                     Py_TYPE(counts)->tp_name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(counts, "counts must be a sequence of int");
    if (!seq)
        return NULL;
    uint64_t *out = NULL;
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "counts has %zd items but texts has %zd",
                     PySequence_Fast_GET_SIZE(seq), n);
        goto done;
    }
    out = malloc((size_t)(n ? n : 1) * sizeof *out);
    if (!out) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (token_count_from(items[i], "counts", i, &out[i]) < 0) {
            free(out);
            out = NULL;
            goto done;
        }
    }
done:
    Py_DECREF(seq);
    return out;
}

static uint64_t *counts_from_counter(PyObject *counter, PyObject **items, Py_ssize_t n)
{
    uint64_t *out = malloc((size_t)(n ? n : 1) * sizeof *out);
    if (!out) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] must be str, not %.100s", i,
                         Py_TYPE(items[i])->tp_name);
            goto fail;
        }
        PyObject *v = PyObject_CallOneArg(counter, items[i]);
        if (!v)
            goto fail;
        int rc = token_count_from(v, "counter(texts)", i, &out[i]);
        Py_DECREF(v);
        if (rc < 0)
            goto fail;
    }
    return out;
fail:
    free(out);
    return NULL;
}

static PyObject *size_list(const size_t *v, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromSize_t(v[i]);
        if (!x) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, x);
    }
    return list;
}

static PyObject *u64_list(const uint64_t *v, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(v[i]);
        if (!x) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, x);
    }
    return list;
}

/* Lists of the input texts, batch by batch. */
static PyObject *batches_of_texts(PyObject **items, const bg_plan *p)
{
    PyObject *batches = PyList_New((Py_ssize_t)p->nbatches);
    if (!batches)
        return NULL;
    for (size_t b = 0; b < p->nbatches; b++) {
        size_t lo = p->starts[b], hi = p->starts[b + 1];
        PyObject *batch = PyList_New((Py_ssize_t)(hi - lo));
        if (!batch) {
            Py_DECREF(batches);
            return NULL;
        }
        for (size_t k = lo; k < hi; k++) {
            size_t item = p->order ? p->order[k] : k;
            PyList_SET_ITEM(batch, (Py_ssize_t)(k - lo), Py_NewRef(items[item]));
        }
        PyList_SET_ITEM(batches, (Py_ssize_t)b, batch);
    }
    return batches;
}

static int size_arg(PyObject *obj, const char *name, size_t *out)
{
    size_t v = PyLong_AsSize_t(obj);
    if (v == (size_t)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-negative int that fits in size_t", name);
        return -1;
    }
    *out = v;
    return 0;
}

/* plan(texts, budget, counts, counter, max_batch_size, overhead, alone, method, pack)
 *   -> (batches, batch_tokens, oversize_indices, starts, order_or_None)
 * Arguments were validated by batchgate.sizing; items are validated here. */
static PyObject *plan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "plan(texts, budget, counts, counter, max_batch_size, overhead, "
                        "alone, method, pack)");
        return NULL;
    }
    PyObject *counts = args[2], *counter = args[3];
    bg_plan_limits lim = {0};
    size_t budget, overhead, max_items;
    enum bg_est_method method;
    if (size_arg(args[1], "max_tokens_per_batch", &budget) < 0 ||
        size_arg(args[4], "max_batch_size", &max_items) < 0 ||
        size_arg(args[5], "overhead_tokens", &overhead) < 0 ||
        parse_method(args[7], &method) < 0)
        return NULL;
    int alone = PyObject_IsTrue(args[6]), pack = PyObject_IsTrue(args[8]);
    if (alone < 0 || pack < 0)
        return NULL;
    lim.budget = budget;
    lim.overhead = overhead;
    lim.max_items = max_items;
    lim.oversize = alone ? BG_OVERSIZE_ALONE : BG_OVERSIZE_ERROR;

    PyObject *seq = as_text_sequence(args[0], "texts");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *result = NULL, *batches = NULL, *tokens = NULL, *oversize = NULL,
             *starts = NULL, *order = NULL;
    bg_plan p = {0};
    uint64_t *est = NULL;

    if (counts != Py_None) {
        /* Items must still be texts: the batches hand them to a prompt. */
        for (Py_ssize_t i = 0; i < n; i++) {
            if (!PyUnicode_Check(items[i])) {
                PyErr_Format(PyExc_TypeError, "texts[%zd] must be str, not %.100s", i,
                             Py_TYPE(items[i])->tp_name);
                goto done;
            }
        }
        est = counts_from_sequence(counts, n);
    } else if (counter != Py_None) {
        /* The counter runs arbitrary code that could mutate a list we only
         * borrow: plan over a private copy. */
        if (PyList_Check(seq)) {
            PyObject *copy = PyList_GetSlice(seq, 0, n);
            if (!copy)
                goto done;
            Py_SETREF(seq, copy);
            items = PySequence_Fast_ITEMS(seq);
        }
        est = counts_from_counter(counter, items, n);
    } else {
        est = estimate_all(items, n, "texts", method);
    }
    if (!est)
        goto done;

    size_t bad = 0;
    int rc = pack ? bg_plan_packed(est, (size_t)n, &lim, &p, &bad)
                  : bg_plan_contiguous(est, (size_t)n, &lim, &p, &bad);
    if (rc == BG_PLAN_OVERSIZE) {
        PyErr_Format(PyExc_ValueError,
                     "texts[%zu] alone needs %llu tokens (+%zu overhead), over "
                     "max_tokens_per_batch=%zu; pass oversize='alone' to give it a batch of "
                     "its own",
                     bad, (unsigned long long)est[bad], overhead, budget);
        goto done;
    }
    if (rc == BG_PLAN_INVALID) {
        PyErr_SetString(PyExc_ValueError, "max_tokens_per_batch must be >= 1");
        goto done;
    }
    if (rc != BG_PLAN_OK) {
        PyErr_NoMemory();
        goto done;
    }
    batches = batches_of_texts(items, &p);
    tokens = batches ? u64_list(p.tokens, p.nbatches) : NULL;
    oversize = tokens ? size_list(p.oversize, p.noversize) : NULL;
    starts = oversize ? size_list(p.starts, p.nbatches + 1) : NULL;
    if (!starts)
        goto done;
    if (p.order) {
        order = size_list(p.order, (size_t)n);
        if (!order)
            goto done;
    } else {
        order = Py_NewRef(Py_None);
    }
    result = PyTuple_Pack(5, batches, tokens, oversize, starts, order);
done:
    Py_XDECREF(batches);
    Py_XDECREF(tokens);
    Py_XDECREF(oversize);
    Py_XDECREF(starts);
    Py_XDECREF(order);
    bg_plan_free(&p);
    free(est);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef sizing_methods[] = {
    {"dynamic_batch_size", (PyCFunction)(void (*)(void))dynamic_batch_size, METH_FASTCALL,
     "dynamic_batch_size(texts, max_tokens, min_size, max_size, default_size, /)\n--\n\n"
     "The original pipeline's batch size formula (see batchgate.calculate_dynamic_batch_size)."},
    {"estimate_tokens", (PyCFunction)(void (*)(void))estimate_tokens, METH_FASTCALL,
     "estimate_tokens(text, method, /)\n--\n\nEstimated tokens of one text."},
    {"estimate_many", (PyCFunction)(void (*)(void))estimate_many, METH_FASTCALL,
     "estimate_many(texts, method, /)\n--\n\nEstimated tokens of each text, as a list."},
    {"_token_features", token_features, METH_O,
     "_token_features(text, /)\n--\n\n"
     "The script model's feature vector of a text (for calibration)."},
    {"plan", (PyCFunction)(void (*)(void))plan, METH_FASTCALL,
     "plan(texts, budget, counts, counter, max_batch_size, overhead, alone, method, pack, /)"
     "\n--\n\nPlan batches under a token budget (see batchgate.plan_batches)."},
    {NULL, NULL, 0, NULL},
};

int bg_sizing_exec(PyObject *module, bg_state *st)
{
    (void)st;
    if (PyModule_AddFunctions(module, sizing_methods) < 0)
        return -1;
    /* The script model's weights (milli-tokens per feature), for calibration
     * scripts and tests that recompute estimates from features. */
    PyObject *w = PyTuple_New(BG_NFEATURES);
    if (!w)
        return -1;
    for (int i = 0; i < BG_NFEATURES; i++) {
        PyObject *v = PyLong_FromLong(bg_est_weights[i]);
        if (!v) {
            Py_DECREF(w);
            return -1;
        }
        PyTuple_SET_ITEM(w, i, v);
    }
    int rc = PyModule_AddObjectRef(module, "_estimator_weights", w);
    Py_DECREF(w);
    return rc;
}
