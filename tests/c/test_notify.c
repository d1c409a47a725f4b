/* test_notify.c - tests of the pure C loop notifier (no Python). */
#define _POSIX_C_SOURCE 200809L
#include "bg_notify.h"
#include "check.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void test_order_and_edge(void)
{
    bg_notify *n = bg_notify_create();
    CHECK(n != NULL);
    CHECK(bg_notify_fd(n) >= 0);
    CHECK(bg_notify_wait(n, 0) == 0); /* nothing yet */
    CHECK(bg_notify_drain(n) == NULL);
    bg_notify_node nodes[3];
    for (int i = 0; i < 3; i++) {
        nodes[i].kind = i;
        nodes[i].payload = &nodes[i];
    }
    CHECK(bg_notify_push(n, &nodes[0]) == 1); /* empty -> non-empty: wakes */
    CHECK(bg_notify_push(n, &nodes[1]) == 0);
    CHECK(bg_notify_push(n, &nodes[2]) == 0);
    CHECK(bg_notify_wait(n, 0) == 1);
    bg_notify_node *l = bg_notify_drain(n);
    for (int i = 0; i < 3; i++) {
        CHECK(l == &nodes[i]);
        CHECK(l && l->kind == i);
        l = l ? l->next : NULL;
    }
    CHECK(l == NULL);
    CHECK(bg_notify_wait(n, 0) == 0); /* fd cleared by drain */
    CHECK(bg_notify_push(n, &nodes[0]) == 1);
    CHECK(bg_notify_drain(n) == &nodes[0]);
    bg_notify_destroy(n);
}

enum { PRODUCERS = 4, PER_PRODUCER = 20000 };

typedef struct {
    bg_notify *n;
    bg_notify_node *nodes;
} producer_arg;

static void *producer(void *p)
{
    producer_arg *a = p;
    for (int i = 0; i < PER_PRODUCER; i++)
        bg_notify_push(a->n, &a->nodes[i]);
    return NULL;
}

static void test_threads(void)
{
    bg_notify *n = bg_notify_create();
    bg_notify_node *nodes = calloc(PRODUCERS * PER_PRODUCER, sizeof *nodes);
    char *seen = calloc(PRODUCERS * PER_PRODUCER, 1);
    pthread_t th[PRODUCERS];
    producer_arg args[PRODUCERS];
    for (int i = 0; i < PRODUCERS * PER_PRODUCER; i++) {
        nodes[i].kind = i / PER_PRODUCER;
        nodes[i].payload = (void *)(intptr_t)i;
    }
    for (int t = 0; t < PRODUCERS; t++) {
        args[t].n = n;
        args[t].nodes = nodes + t * PER_PRODUCER;
        pthread_create(&th[t], NULL, producer, &args[t]);
    }
    int got = 0, drains = 0;
    int last[PRODUCERS];
    for (int t = 0; t < PRODUCERS; t++)
        last[t] = -1;
    /* Consume like an event loop: wait for the fd, then drain. A lost wakeup
     * shows up as a timeout here. */
    while (got < PRODUCERS * PER_PRODUCER) {
        int r = bg_notify_wait(n, 30000); /* generous: sanitizers on a loaded machine */
        CHECK(r == 1);
        if (r != 1)
            break;
        drains++;
        for (bg_notify_node *l = bg_notify_drain(n); l; l = l->next) {
            int i = (int)(intptr_t)l->payload;
            CHECK(!seen[i]);
            seen[i] = 1;
            CHECK(i > last[l->kind]); /* per-producer FIFO */
            last[l->kind] = i;
            got++;
        }
    }
    for (int t = 0; t < PRODUCERS; t++)
        pthread_join(th[t], NULL);
    CHECK(got == PRODUCERS * PER_PRODUCER);
    CHECK(bg_notify_drain(n) == NULL);
    fprintf(stderr, "notify: %d nodes in %d drains\n", got, drains);
    free(seen);
    free(nodes);
    bg_notify_destroy(n);
}

int main(void)
{
    test_order_and_edge();
    test_threads();
    if (failures) {
        fprintf(stderr, "test_notify: %d FAILED\n", failures);
        return 1;
    }
    printf("test_notify: ok\n");
    return 0;
}
