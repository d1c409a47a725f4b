/* test_fifo.c - the intrusive FIFO shared by every hand-off queue. */
#include "bg_fifo.h"
#include "check.h"

#include <stdio.h>

enum { N = 5 };

/* Walk a chain: its length, checking each node is nodes[first + i]. */
static int chain_is(const bg_notify_node *c, const bg_notify_node *nodes, int first, int n)
{
    int i = 0;
    for (; c; c = c->next, i++)
        if (i >= n || c != &nodes[first + i])
            return 0;
    return i == n;
}

static void test_push_pop_order(void)
{
    bg_notify_node nodes[N];
    bg_fifo f = BG_FIFO_INIT;
    CHECK(bg_fifo_empty(&f));
    CHECK(bg_fifo_pop(&f) == NULL);
    CHECK(bg_fifo_take(&f) == NULL);
    for (int i = 0; i < N; i++) {
        nodes[i].next = &nodes[0]; /* garbage a push must overwrite */
        bg_fifo_push(&f, &nodes[i]);
        CHECK(!bg_fifo_empty(&f));
        CHECK(f.tail == &nodes[i]);
    }
    CHECK(chain_is(f.head, nodes, 0, N));
    for (int i = 0; i < N; i++) {
        bg_notify_node *p = bg_fifo_pop(&f);
        CHECK(p == &nodes[i]);
        CHECK(p && p->next == NULL); /* detached: its owner may reuse it */
    }
    CHECK(bg_fifo_empty(&f));
    CHECK(f.tail == NULL);
    /* Usable again after running dry (tail was reset). */
    bg_fifo_push(&f, &nodes[2]);
    CHECK(f.head == &nodes[2] && f.tail == &nodes[2]);
    CHECK(bg_fifo_take(&f) == &nodes[2]);
    CHECK(bg_fifo_empty(&f) && f.tail == NULL);
}

static void test_append_and_take(void)
{
    bg_notify_node nodes[N];
    bg_fifo a = BG_FIFO_INIT, b = BG_FIFO_INIT;
    bg_fifo_append(&a, NULL); /* nothing to add */
    CHECK(bg_fifo_empty(&a));
    bg_fifo_push(&a, &nodes[0]);
    bg_fifo_push(&a, &nodes[1]);
    for (int i = 2; i < N; i++)
        bg_fifo_push(&b, &nodes[i]);
    bg_fifo_append(&a, bg_fifo_take(&b));
    CHECK(bg_fifo_empty(&b) && b.tail == NULL);
    CHECK(a.tail == &nodes[N - 1]); /* found the chain's end */
    CHECK(chain_is(a.head, nodes, 0, N));
    /* Into an empty list: head and tail both come from the chain. */
    bg_fifo_append(&b, bg_fifo_take(&a));
    CHECK(bg_fifo_empty(&a));
    CHECK(b.head == &nodes[0] && b.tail == &nodes[N - 1]);
    /* A push after an append links behind the chain's end. */
    bg_notify_node extra;
    bg_fifo_push(&b, &extra);
    CHECK(nodes[N - 1].next == &extra && b.tail == &extra);
}

int main(void)
{
    test_push_pop_order();
    test_append_and_take();
    if (failures) {
        fprintf(stderr, "test_fifo: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_fifo: ok\n");
    return 0;
}
