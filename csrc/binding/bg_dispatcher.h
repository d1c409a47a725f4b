/* bg_dispatcher.h - private to the dispatcher binding files:
 *   bg_dispatcher.c         _Dispatcher (engine + notifier), _Template, module hooks
 *   bg_dispatcher_job.c     _Job: windows of requests, delivery to futures
 *   bg_dispatcher_result.c  batchgate.Result and the error objects
 */
#ifndef BATCHGATE_BG_DISPATCHER_H
#define BATCHGATE_BG_DISPATCHER_H

#include "bg_module.h"

#include "bg_http.h"
#include "bg_json.h"
#include "bg_notify.h"

#include <stdint.h>
#include <sys/types.h>

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
    int admit;                /* closed-loop admission: tokens counts KV blocks */
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

/* bg_dispatcher_result.c */
extern PyType_Spec bg_result_spec;
PyObject *bg_result_new(bg_state *st, const bg_request *r);
PyObject *bg_result_error(bg_state *st, const bg_request *r, Py_ssize_t index, int with_index);

/* bg_dispatcher_admit.c */
PyObject *bg_dsp_probe(PyObject *cls, PyObject *args);
int bg_dsp_admit_setup(Core *self, PyObject *cfg_dict, bg_engine_config *c);
PyObject *bg_dsp_admit_stats(Core *self);
PyObject *bg_dsp_admit_events(Core *self, PyObject *ignored);

/* bg_dispatcher_job.c (loop thread, GIL held) */
extern PyType_Spec bg_job_spec;
void bg_job_item_release(Job *j, DItem *it);
void bg_job_drop_self(Job *j);
void bg_job_maybe_finish(Job *j);
int bg_job_refill(Job *j);
void bg_job_item_done(Job *j, DItem *it);

#endif /* BATCHGATE_BG_DISPATCHER_H */
