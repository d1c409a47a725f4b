/* bg_fifo.h - the intrusive singly linked FIFO every hand-off queue uses.
 *
 * One node type and four operations, shared by the locked wakeup queue
 * (bg_notify), the dispatchers' completion queues and the loop thread's work
 * lists (the binding's loop bridge), so there is one list implementation to
 * get right. No locking here: each user holds its own lock, or none on the
 * one thread that owns the list.
 *
 * Pure C (no Python.h), header only: these are a handful of stores each.
 */
#ifndef BATCHGATE_BG_FIFO_H
#define BATCHGATE_BG_FIFO_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bg_notify_node bg_notify_node;
struct bg_notify_node {
    bg_notify_node *next; /* private to the list holding the node */
    int kind;             /* owner-defined tag */
    void *payload;        /* owner-defined */
};

typedef struct {
    bg_notify_node *head, *tail;
} bg_fifo;

#define BG_FIFO_INIT {NULL, NULL}

static inline int bg_fifo_empty(const bg_fifo *f)
{
    return f->head == NULL;
}

/* Append one node. */
static inline void bg_fifo_push(bg_fifo *f, bg_notify_node *node)
{
    node->next = NULL;
    if (f->tail)
        f->tail->next = node;
    else
        f->head = node;
    f->tail = node;
}

/* Append a NULL-terminated chain (walks it once to find its end). */
static inline void bg_fifo_append(bg_fifo *f, bg_notify_node *chain)
{
    if (chain == NULL)
        return;
    if (f->tail)
        f->tail->next = chain;
    else
        f->head = chain;
    bg_notify_node *t = chain;
    while (t->next)
        t = t->next;
    f->tail = t;
}

/* Remove and return the first node, or NULL. */
static inline bg_notify_node *bg_fifo_pop(bg_fifo *f)
{
    bg_notify_node *node = f->head;
    if (node) {
        f->head = node->next;
        if (f->head == NULL)
            f->tail = NULL;
        node->next = NULL;
    }
    return node;
}

/* Take the whole list as a NULL-terminated chain in push order (NULL if
 * empty), leaving f empty. */
static inline bg_notify_node *bg_fifo_take(bg_fifo *f)
{
    bg_notify_node *chain = f->head;
    f->head = f->tail = NULL;
    return chain;
}

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_FIFO_H */
