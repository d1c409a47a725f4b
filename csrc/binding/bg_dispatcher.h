/* bg_dispatcher.h - private to the dispatcher binding files:
 *   bg_dispatcher.c         _Dispatcher (engine + delivery via the loop bridge), module hooks
 *   bg_dispatcher_config.c  _Dispatcher's keyword arguments, _Template
 *   bg_dispatcher_admit.c   closed-loop admission: probe, setup, stats
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
    uint64_t next_id;
    unsigned long fork_gen;   /* bg_fork_generation when created */
    int closed;
    Py_ssize_t live_items;
    int64_t default_max_tokens;
    int64_t token_cap;
    bg_notify_node *backlog;  /* drained but not yet delivered (drain limit) */
    bg_spent spent;           /* answers read, for the engine thread to free */
    PyObject *call_soon;      /* bound loop's call_soon, for the backlog */
    int resched;              /* _on_readable already scheduled via call_soon */
    /* Finished requests, and their wake node on the bound loop's bridge
     * (none while unbound: they wait). Made in __init__, before the engine,
     * so the engine thread only ever sees a fixed pointer. */
    struct bg_loop_source *wake;
    PyObject *model_cache;    /* last Result.model str (shared by the results) */
    PyObject *weakreflist;
    Job *jobs;                /* every live job (borrowed): close() ends them all */
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
    const bg_req_opts *opts; /* the template's per-call options, or NULL */
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
    int count_preheld;    /* requests ride on count permits the submitting task holds */
    int tok_chat;         /* BG_EP_TOKENIZE of messages (items are messages JSON) */
    int64_t *prompt_counts; /* exact prompt tokens per input item (the server's
                               /tokenize), NULL: the estimator; malloc'd */
    Py_ssize_t n_prompt_counts;
    int finished;         /* outcome delivered (ONE/MAP) or stream ended */
    int cancelled;
    int holding_self;     /* a self-reference while items are in the engine */
    Job *jprev, *jnext;   /* on core->jobs while listed */
    int listed;
    /* Copied from the core at submit: what item_fill needs of it. */
    bg_state *st;
    int token_budget;     /* the core charges tokens (static cap or admission) */
    int64_t default_max_tokens;
};

typedef struct {
    PyObject_HEAD
    bg_tmpl *tmpl;
    bg_req_opts *opts;    /* owned, NULL = the engine's defaults */
} Template;

/* 80 bytes, like before the openai-shaped fields: a million results in a
 * map() cost no more. What only some answers have lives in `extra`. */
typedef struct {
    PyObject_HEAD
    PyObject *text;
    PyObject *finish_reason;
    PyObject *model;      /* str shared between results of the same model, or None */
    PyObject *extra;      /* NULL, or a list, see RX_* */
    double latency;
    unsigned int chat : 1;
    unsigned int attempts : 31;
    int32_t prompt_tokens, completion_tokens, total_tokens; /* -1 = not reported */
} Result;

/* Result.extra slots. */
enum {
    RX_RAW,     /* bytes of the answer (raw=True), else None */
    RX_RAW_OBJ, /* its parsed JSON, cached on first access, else None */
    RX_ID,      /* the server's "id" (single calls, or raw=True), else None */
    RX_CHOICES, /* several choices, tool calls or logprobs: a tuple of
                   (text, finish_reason, tool_calls_json, logprobs_json), else None */
    RX_COUNT
};

/* bg_dispatcher.c: 0 if the core can take work, else -1 with the error
 * (never initialised, created before fork(), closed). */
int bg_core_check(Core *c);

/* Bumped in every forked child (pthread_atfork): a Core from before the fork
 * is unusable there. Cheaper than getpid() on every wakeup and submit. */
extern unsigned long bg_fork_generation;
#define CORE_FORKED(c) ((c)->fork_gen != __atomic_load_n(&bg_fork_generation, __ATOMIC_RELAXED))

/* bg_dispatcher_result.c */
extern PyType_Spec bg_result_spec;
/* keep_id: also keep the server's id (single calls; bulk ones only with raw).
 * model_cache: the last model str built, reused while the name repeats. */
PyObject *bg_result_new(bg_state *st, const bg_request *r, int keep_id, PyObject **model_cache);
PyObject *bg_result_error(bg_state *st, const bg_request *r, Py_ssize_t index, int with_index);

/* bg_dispatcher_config.c: _Dispatcher(**kwargs), keywords only. Strings and
 * objects are borrowed from the call's arguments; header_lines points into
 * header_seq, both owned (bg_dsp_args_release). */
typedef struct {
    const char *base_url, *api_key;
    Py_ssize_t max_concurrent, max_inflight_tokens, max_retries, max_response_bytes,
        max_connections, default_max_tokens;
    PyObject *semaphore, *headers, *admission; /* Py_None when not given */
    double timeout, connect_timeout, backoff, max_backoff, max_retry_after;
    int verify, retry_timeouts;
    const char **header_lines;
    size_t n_headers;
    PyObject *header_seq;
} bg_dsp_args;
/* 0, or -1 with a TypeError/ValueError naming the argument (nothing to release). */
int bg_dsp_args_parse(bg_state *st, PyObject *args, PyObject *kwds, bg_dsp_args *a);
void bg_dsp_args_release(bg_dsp_args *a);
/* The engine settings the arguments give (not the semaphores nor on_done). */
void bg_dsp_engine_config(const bg_dsp_args *a, bg_engine_config *c);
extern PyType_Spec bg_template_spec;
/* _Dispatcher.template(model, params_json[, options]) -> _Template */
PyObject *bg_core_template(Core *self, PyObject *const *args, Py_ssize_t nargs);

/* bg_dispatcher_admit.c */
PyObject *bg_dsp_probe(PyObject *cls, PyObject *args);
int bg_dsp_admit_setup(Core *self, PyObject *cfg_dict, bg_engine_config *c);
PyObject *bg_dsp_admit_stats(Core *self);
PyObject *bg_dsp_admit_events(Core *self, PyObject *ignored);

/* bg_dispatcher.c: all a job asks of the core (loop thread, GIL held), so
 * the job code never touches the core's fields. */
/* The engine runs here: not closed, not inherited through fork(). */
int bg_core_open(const Core *c);
/* Give the engine n filled items (ids assigned here): 0, or -1 with
 * ClosedError set and nothing submitted (the caller still owns the items). */
int bg_core_submit(Core *c, DItem **items, Py_ssize_t n);
/* Cancel one request, or every request of a job's group; no-ops unless open. */
void bg_core_cancel(Core *c, uint64_t id);
void bg_core_cancel_group(Core *c, uint64_t group);
/* One submitted item was delivered (or dropped) by its job. */
void bg_core_item_delivered(Core *c);
/* bg_request_clear, the answer's memory going back to the engine's thread. */
void bg_core_item_clear(Core *c, bg_request *r);
/* The Result of a finished request (the core shares model strs between them). */
PyObject *bg_core_result_new(Core *c, const bg_request *r, int keep_id);
/* The live-jobs list that close() ends. */
void bg_core_add_job(Core *c, Job *j);
void bg_core_forget_job(Core *c, Job *j);

/* bg_dispatcher_job.c (loop thread, GIL held) */
extern PyType_Spec bg_job_spec;
typedef struct {
    bg_state *st;
    int mode;              /* JOB_* */
    int kind;              /* 0 completions, 1 chat, 2 tokenize, 3 tokenize chat */
    PyObject *source;      /* ONE: the prompt; MAP/STREAM: an iterable */
    Template *tmpl;
    PyObject *fut;         /* or Py_None */
    Py_ssize_t window;     /* checked: 1.. */
    int return_exceptions, count_preheld;
    PyObject *prompt_counts; /* list of int, or Py_None */
    uint64_t group;
    int token_budget;
    int64_t default_max_tokens;
} bg_job_params;
/* A new job, linked on the core and filled up to its window: new reference,
 * or NULL with an exception (a JOB_ONE's bad prompt is raised here). */
Job *bg_job_new(Core *c, const bg_job_params *p);
void bg_job_item_release(Job *j, DItem *it);
void bg_job_drop_self(Job *j);
void bg_job_maybe_finish(Job *j);
int bg_job_refill(Job *j);
void bg_job_item_done(Job *j, DItem *it);
/* The dispatcher closed: end the job now (ClosedError to its caller; dropped
 * quietly if the caller's loop is closed). */
void bg_job_close(Job *j, int drop);

#endif /* BATCHGATE_BG_DISPATCHER_H */
