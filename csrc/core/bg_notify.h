/* bg_notify.h - hand events from any thread to one event loop, without the GIL.
 *
 * A mutex-protected intrusive FIFO of caller-owned nodes plus a wakeup fd
 * (eventfd on Linux, a non-blocking pipe elsewhere). The fd is written only
 * when the queue goes from empty to non-empty, so a burst of pushes costs one
 * wakeup. The consumer watches bg_notify_fd() (e.g. loop.add_reader) and calls
 * bg_notify_drain(), which clears the fd first and then takes the whole list
 * in one swap, so no push is ever missed.
 *
 * Pure C (no Python.h). Push never blocks beyond the short internal lock and
 * never calls back, so it is safe from grant callbacks and engine threads.
 */
#ifndef BATCHGATE_BG_NOTIFY_H
#define BATCHGATE_BG_NOTIFY_H

#include "bg_fifo.h" /* bg_notify_node */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bg_notify bg_notify;

/* Returns NULL with errno set on failure. */
bg_notify *bg_notify_create(void);
/* Closes the fd. Nodes still queued are not touched (owner's memory). */
void bg_notify_destroy(bg_notify *n);

/* The fd to watch for readability. */
int bg_notify_fd(const bg_notify *n);

/* Append a node. Returns 1 if this push made the queue non-empty (the fd was
 * written), 0 otherwise. The node must stay valid until drained. */
int bg_notify_push(bg_notify *n, bg_notify_node *node);

/* Write the fd unconditionally (e.g. to stop a thread in bg_notify_wait). */
void bg_notify_wake(bg_notify *n);

/* True if nodes are queued (a snapshot). */
int bg_notify_pending(bg_notify *n);

/* Clear the fd, then take every queued node in push order (NULL if none). */
bg_notify_node *bg_notify_drain(bg_notify *n);

/* Wait until the fd is readable. timeout_ms < 0 waits forever.
 * Returns 1 readable, 0 timed out, -1 error (errno set). */
int bg_notify_wait(bg_notify *n, int timeout_ms);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_NOTIFY_H */
