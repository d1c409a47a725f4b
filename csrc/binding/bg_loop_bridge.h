/* bg_loop_bridge.h - the one bridge between native threads and an asyncio
 * event loop, shared by everything that completes futures on that loop (the
 * semaphore's grants, the dispatchers' completions).
 *
 * One bridge per loop: a bg_notify queue whose fd the loop watches with
 * add_reader (a watcher thread forwarding with call_soon_threadsafe for loops
 * without it). Any thread pushes nodes of a registered kind without the GIL;
 * the loop thread drains the queue in one GIL hold and runs each node's
 * handler in push order.
 *
 * A producer that completes many things (a dispatcher) does not push one node
 * per completion: it keeps its own queue and a bg_loop_source, whose single
 * node is posted to the bound bridge at the end of a round of completions
 * (the engine's on_flush) if the queue is not empty and the node not already
 * posted. Its handler then drains the producer's queue.
 */
#ifndef BATCHGATE_BG_LOOP_BRIDGE_H
#define BATCHGATE_BG_LOOP_BRIDGE_H

#include "bg_module.h"
#include "bg_notify.h"

enum {
    BG_NODE_SEM_GRANT = 1, /* a semaphore grant (bg_semaphore_acquire.c) */
    BG_NODE_DISPATCH = 2,  /* a dispatcher's bg_loop_source (bg_dispatcher.c) */
    BG_LOOP_NODE_KINDS = 8,
};

/* Nodes being processed on the loop thread (GIL held). Grants made there go
 * onto the running list instead of through the fd (see bg_loop_post). */
typedef struct {
    bg_notify *target;            /* the bridge queue these nodes belong to */
    bg_fifo q;
    int dying;                    /* the bridge is being freed: release only */
} bg_loop_work;

/* Runs on the loop thread with the GIL and no native lock held. With
 * wl->dying, only release what the node owns: the loop will not run again. */
typedef void (*bg_loop_node_fn)(bg_notify_node *node, bg_loop_work *wl);

/* Register the handler of a node kind, at module exec. 0, or -1 with
 * SystemError set. */
int bg_loop_set_handler(int kind, bg_loop_node_fn fn);

/* The bridge of a loop, made on first use (one per loop and process): new
 * reference to an opaque object that keeps its queue alive, or NULL with an
 * exception. GIL held. */
PyObject *bg_loop_bridge(bg_state *st, PyObject *loop);
/* Its native queue. */
bg_notify *bg_loop_bridge_queue(PyObject *bridge);
/* True if the bridge was made before a fork() (unusable in this process). */
int bg_loop_bridge_stale(PyObject *bridge);

/* Any thread, any locks: hand node to target. If this thread is running the
 * handlers of that same queue (bg_loop_work_enter), the node joins that run
 * instead of going through the fd. */
void bg_loop_post(bg_notify *target, bg_notify_node *node);

/* Catch bg_loop_post()s to wl->target made by this thread (until leave). */
bg_loop_work *bg_loop_work_enter(bg_loop_work *wl);
void bg_loop_work_leave(bg_loop_work *prev);
/* Run every node on wl, including those added while running. */
void bg_loop_work_run(bg_loop_work *wl);

/* On loop's thread, GIL held: move the semaphore grants queued on the bridge
 * (in order) to the end of wl, so a release() there wakes waiters in grant
 * order. Other nodes stay with the bridge and run soon (loop.call_soon). */
void bg_loop_take_grants(PyObject *bridge, PyObject *loop, bg_loop_work *wl);

/* ---- one wake node per producer ----
 * A source holds the producer's queue of completions. A flush with work
 * queued posts a wake node (kind given at creation) to the bound bridge; its
 * handler claims the node and takes the queue. */
typedef struct bg_loop_source bg_loop_source;

/* An unbound source. NULL with MemoryError set. */
bg_loop_source *bg_loop_source_new(int kind, void *owner);
/* Any thread, no GIL, never blocks on Python. A producer finishes work in
 * rounds: queue each completion (wakes nobody), then flush once per round
 * (wakes the bound bridge if something is queued and the wake node is not
 * already on its way). */
void bg_loop_source_queue(bg_loop_source *s, bg_notify_node *node);
void bg_loop_source_flush(bg_loop_source *s);
/* The whole queue, in push order (NULL if empty). */
bg_notify_node *bg_loop_source_take(bg_loop_source *s);
int bg_loop_source_pending(bg_loop_source *s);
/* GIL held: bind to bridge (NULL: unbind), keeping a reference to it; work
 * queued while unbound wakes the new bridge at once. 0, or -1 with
 * MemoryError set (still bound as before). */
int bg_loop_source_bind(bg_loop_source *s, PyObject *bridge);
/* The handler's first call, with the node that came out of a bridge: returns
 * the owner (NULL once detached), *current telling whether wl is the bridge the
 * source is bound to now. If not, deliver nothing: the bound one was woken. */
void *bg_loop_source_claim(bg_notify_node *node, const bg_loop_work *wl, int *current);
/* The owner is going away: claims return NULL from now on. GIL held. */
void bg_loop_source_detach(bg_loop_source *s);
/* After detach, once nothing pushes any more: free now, or when the node
 * still on its way to a bridge is claimed. */
void bg_loop_source_free(bg_loop_source *s);

/* Bumped in every forked child (bg_dispatcher.c registers the atfork). */
extern unsigned long bg_fork_generation;

/* bg_loop_bridge.c module hooks, from bg_semaphore_exec & co. */
int bg_loop_bridge_exec(PyObject *module, bg_state *st);
int bg_loop_bridge_traverse(bg_state *st, visitproc visit, void *arg);
void bg_loop_bridge_clear(bg_state *st);

#endif /* BATCHGATE_BG_LOOP_BRIDGE_H */
