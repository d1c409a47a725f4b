/* bg_module.c - the batchgate._native module: multi-phase init, state, libcurl
 * global init. Functions and types live in the other binding files. */
#include "bg_module.h"

#include <curl/curl.h>
#include <pthread.h>

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_OK;

static void curl_global_init_once(void)
{
    /* Once per process and before any engine thread exists: curl_global_init
     * is not thread-safe on older libcurl. */
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static int check_libcurl(void)
{
    const curl_version_info_data *info = curl_version_info(CURLVERSION_NOW);
    if (info->version_num < LIBCURL_VERSION_NUM) {
        PyErr_Format(PyExc_ImportError,
                     "batchgate was built against libcurl %s but the runtime libcurl is %s; "
                     "install libcurl %s or newer",
                     LIBCURL_VERSION, info->version, LIBCURL_VERSION);
        return -1;
    }
    pthread_once(&curl_once, curl_global_init_once);
    if (curl_init_rc != CURLE_OK) {
        PyErr_Format(PyExc_ImportError, "curl_global_init failed: %s",
                     curl_easy_strerror(curl_init_rc));
        return -1;
    }
    return 0;
}

static int module_exec(PyObject *m)
{
    bg_state *st = bg_module_state(m);
    if (check_libcurl() < 0)
        return -1;
    st->BatchgateError = PyErr_NewExceptionWithDoc(
        "batchgate.BatchgateError", "Base class of every error raised by batchgate.",
        PyExc_Exception, NULL);
    if (!st->BatchgateError || PyModule_AddObjectRef(m, "BatchgateError", st->BatchgateError) < 0)
        return -1;
    if (PyModule_AddStringConstant(m, "libcurl_version", curl_version_info(CURLVERSION_NOW)->version) < 0)
        return -1;
    if (bg_sizing_exec(m, st) < 0)
        return -1;
    if (bg_semaphore_exec(m, st) < 0)
        return -1;
    if (bg_dispatcher_exec(m, st) < 0)
        return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    bg_state *st = bg_module_state(m);
    Py_VISIT(st->BatchgateError);
    int rc = bg_semaphore_traverse(st, visit, arg);
    return rc ? rc : bg_dispatcher_traverse(st, visit, arg);
}

static int module_clear(PyObject *m)
{
    bg_state *st = bg_module_state(m);
    Py_CLEAR(st->BatchgateError);
    bg_semaphore_clear(st);
    bg_dispatcher_clear(st);
    return 0;
}

static void module_free(void *m)
{
    (void)module_clear((PyObject *)m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* One engine thread per dispatcher, state per module: safe in several
     * interpreters, but the shared libcurl init rules out a per-interpreter GIL. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

PyModuleDef bg_moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "batchgate._native",
    .m_doc = "Native core of batchgate: token estimation, batch planning, semaphore, dispatcher.",
    .m_size = sizeof(bg_state),
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModuleDef_Init(&bg_moduledef);
}
