/* bg_semaphore.h - C-level access to batchgate.Semaphore for other binding
 * files (the dispatcher shares the semaphore's native counter). */
#ifndef BATCHGATE_BG_SEMAPHORE_H
#define BATCHGATE_BG_SEMAPHORE_H

#include "bg_module.h"
#include "bg_notify.h"
#include "bg_sem.h"

/* The native counter of a batchgate.Semaphore (or BoundedSemaphore, or a
 * subclass), as a new reference: release it with bg_sem_decref(). The counter
 * outlives the Python object if needed. Returns NULL with TypeError set when
 * obj is not one, or RuntimeError when its __init__ never ran. GIL held. */
bg_sem *bg_semaphore_core(bg_state *st, PyObject *obj);

/* ---- per-loop notifier, shareable with other binding files ----
 * One wakeup fd per event loop, watched with loop.add_reader (or, for loops
 * without it, by a watcher thread that forwards with call_soon_threadsafe).
 * Any thread may bg_notify_push() a node of a registered kind onto its queue
 * without the GIL; the handler then runs on the loop thread with the GIL,
 * in push order, together with the semaphore's own grants. */
enum {
    BG_NODE_SEM_GRANT = 1,   /* semaphore grants (bg_semaphore.c) */
    BG_NODE_DISPATCH = 2,    /* free for the dispatcher's completions */
    BG_LOOP_NODE_KINDS = 8,
};

typedef void (*bg_loop_node_fn)(bg_notify_node *node);

/* Register the handler of a node kind (> BG_NODE_SEM_GRANT), at module exec.
 * Returns 0, or -1 with SystemError set. */
int bg_loop_notifier_set_handler(int kind, bg_loop_node_fn fn);

/* The notifier of a running loop (made on first use): new reference to an
 * opaque object that keeps the queue alive, or NULL with an exception. */
PyObject *bg_loop_notifier(bg_state *st, PyObject *loop);
/* Its native queue: push nodes here from any thread. */
bg_notify *bg_loop_notifier_queue(PyObject *notifier);

#endif /* BATCHGATE_BG_SEMAPHORE_H */
