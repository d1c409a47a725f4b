/* test_sem_capacity.c - bg_sem_set_capacity: a semaphore whose bound moves at
 * run time (the closed-loop admission limit). Usage: test_sem_capacity [iters]
 */
#define _POSIX_C_SOURCE 200809L
#include "bg_sem.h"
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int grant_log[64];
static int ngrants;

static void log_grant(bg_sem_waiter *w)
{
    grant_log[ngrants++] = (int)(intptr_t)w->ctx;
}

static void test_bounds(void)
{
    bg_sem *u = bg_sem_create(3, -1);
    CHECK(bg_sem_set_capacity(u, 2) == -1); /* unbounded: nothing to adjust */
    bg_sem_decref(u);

    bg_sem *s = bg_sem_create(10, 10);
    CHECK(bg_sem_capacity(s) == 10);
    CHECK(bg_sem_set_capacity(s, -1) == -1);
    CHECK(bg_sem_set_capacity(s, 11) == -1); /* max_value is the hard ceiling */
    CHECK(bg_sem_capacity(s) == 10);
    CHECK(bg_sem_set_capacity(s, 4) == 0);
    CHECK(bg_sem_capacity(s) == 4);
    CHECK(bg_sem_value(s) == 4);
    CHECK(bg_sem_max_value(s) == 10);
    CHECK(bg_sem_release(s, 1) == -1); /* would pass the capacity */
    CHECK(bg_sem_set_capacity(s, 10) == 0);
    CHECK(bg_sem_value(s) == 10);
    bg_sem_decref(s);
}

/* Shrinking below what is held: value goes negative, nothing is granted until
 * the debt is paid back, then FIFO grants resume. */
static void test_shrink_below_held(void)
{
    bg_sem *s = bg_sem_create(10, 10);
    CHECK(bg_sem_try_acquire(s, 8));
    CHECK(bg_sem_set_capacity(s, 5) == 0);
    CHECK(bg_sem_value(s) == -3);
    CHECK(!bg_sem_try_acquire(s, 1));
    CHECK(bg_sem_would_block(s, 1));

    ngrants = 0;
    bg_sem_waiter a, b;
    bg_sem_waiter_init(&a, 2, log_grant, (void *)(intptr_t)1);
    bg_sem_waiter_init(&b, 1, log_grant, (void *)(intptr_t)2);
    CHECK(bg_sem_acquire_async(s, &a) == 0);
    CHECK(bg_sem_acquire_async(s, &b) == 0);
    CHECK(bg_sem_release(s, 4) == 0); /* value 1: head wants 2, FIFO holds b back */
    CHECK(ngrants == 0);
    CHECK(bg_sem_value(s) == 1);
    CHECK(bg_sem_release(s, 4) == 0); /* everything back: value 5 */
    CHECK(ngrants == 2 && grant_log[0] == 1 && grant_log[1] == 2);
    CHECK(bg_sem_value(s) == 2);
    CHECK(bg_sem_release(s, 2) == 0);
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_value(s) == 5);
    bg_sem_decref(s);
}

/* Raising the capacity grants queued waiters at once, in order. */
static void test_grow_wakes_fifo(void)
{
    bg_sem *s = bg_sem_create(100, 100);
    CHECK(bg_sem_set_capacity(s, 0) == 0);
    ngrants = 0;
    bg_sem_waiter w[4];
    for (int i = 0; i < 4; i++) {
        bg_sem_waiter_init(&w[i], 3, log_grant, (void *)(intptr_t)(i + 1));
        CHECK(bg_sem_acquire_async(s, &w[i]) == 0);
    }
    CHECK(bg_sem_set_capacity(s, 7) == 0); /* room for two */
    CHECK(ngrants == 2 && grant_log[0] == 1 && grant_log[1] == 2);
    CHECK(bg_sem_queued(s) == 2);
    CHECK(bg_sem_set_capacity(s, 12) == 0);
    CHECK(ngrants == 4 && grant_log[2] == 3 && grant_log[3] == 4);
    CHECK(bg_sem_value(s) == 0);
    for (int i = 0; i < 4; i++)
        CHECK(bg_sem_release(s, 3) == 0);
    CHECK(bg_sem_value(s) == 12);
    bg_sem_decref(s);
}

/* A request larger than a lowered capacity runs alone once idle; capacity 0
 * grants nothing, not even that. */
static void test_oversize_and_zero(void)
{
    bg_sem *s = bg_sem_create(20, 20);
    CHECK(bg_sem_set_capacity(s, 0) == 0);
    CHECK(!bg_sem_try_acquire(s, 1));
    ngrants = 0;
    bg_sem_waiter big, small;
    bg_sem_waiter_init(&big, 15, log_grant, (void *)(intptr_t)1);
    bg_sem_waiter_init(&small, 1, log_grant, (void *)(intptr_t)2);
    CHECK(bg_sem_acquire_async(s, &big) == 0);
    CHECK(bg_sem_acquire_async(s, &small) == 0);
    CHECK(ngrants == 0);
    CHECK(bg_sem_set_capacity(s, 5) == 0); /* idle: big goes alone, small after it */
    CHECK(ngrants == 1 && grant_log[0] == 1);
    CHECK(bg_sem_value(s) == -10);
    CHECK(bg_sem_release(s, 15) == 0);
    CHECK(ngrants == 2 && grant_log[1] == 2);
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_value(s) == 5);
    /* The oversize rule needs an idle semaphore: with 1 held it waits. */
    CHECK(bg_sem_try_acquire(s, 1));
    CHECK(!bg_sem_try_acquire(s, 6));
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_try_acquire(s, 6));
    CHECK(bg_sem_release(s, 6) == 0);
    /* Beyond max_value stays invalid whatever the capacity. */
    bg_sem_waiter huge;
    bg_sem_waiter_init(&huge, 21, NULL, NULL);
    CHECK(bg_sem_acquire_async(s, &huge) == -1);
    CHECK(bg_sem_acquire_blocking(s, 21, 0) == -1);
    bg_sem_decref(s);
}

/* Blocking waiters wake when another thread raises the capacity. */
static bg_sem *g_sem;
static atomic_int g_acquired;

static void *blocking_taker(void *arg)
{
    (void)arg;
    if (bg_sem_acquire_blocking(g_sem, 2, 10LL * 1000000000LL) == 1)
        atomic_fetch_add(&g_acquired, 1);
    return NULL;
}

static void test_blocking_wake(void)
{
    g_sem = bg_sem_create(10, 10);
    CHECK(bg_sem_set_capacity(g_sem, 0) == 0);
    atomic_store(&g_acquired, 0);
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, blocking_taker, NULL);
    /* Wait until all three are queued. */
    for (int i = 0; i < 2000 && bg_sem_queued(g_sem) < 3; i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    CHECK(bg_sem_queued(g_sem) == 3);
    CHECK(atomic_load(&g_acquired) == 0);
    CHECK(bg_sem_set_capacity(g_sem, 6) == 0);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    CHECK(atomic_load(&g_acquired) == 3);
    CHECK(bg_sem_value(g_sem) == 0);
    CHECK(bg_sem_release(g_sem, 6) == 0);
    bg_sem_decref(g_sem);
}

/* Stress: workers acquire/release random weights while a controller thread
 * moves the capacity; held never exceeds max_value, and at the end every
 * permit is back. */
static atomic_int g_stop;
static atomic_long g_held, g_max_held;

static void *worker(void *arg)
{
    int iters = *(int *)arg;
    unsigned seed = (unsigned)(uintptr_t)&seed;
    for (int i = 0; i < iters; i++) {
        int64_t n = 1 + (int64_t)(rand_r(&seed) % 8);
        int got = bg_sem_acquire_blocking(g_sem, n, 2LL * 1000000000LL);
        if (got != 1)
            continue;
        long h = atomic_fetch_add(&g_held, n) + n;
        long m = atomic_load(&g_max_held);
        while (h > m && !atomic_compare_exchange_weak(&g_max_held, &m, h))
            ;
        atomic_fetch_sub(&g_held, n);
        CHECK(bg_sem_release(g_sem, n) == 0);
    }
    return NULL;
}

static void *controller(void *arg)
{
    (void)arg;
    unsigned seed = 7;
    while (!atomic_load(&g_stop)) {
        CHECK(bg_sem_set_capacity(g_sem, 1 + rand_r(&seed) % 24) == 0);
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    CHECK(bg_sem_set_capacity(g_sem, 24) == 0);
    return NULL;
}

static void test_stress(int iters)
{
    g_sem = bg_sem_create(24, 24);
    atomic_store(&g_stop, 0);
    atomic_store(&g_held, 0);
    atomic_store(&g_max_held, 0);
    pthread_t w[4], c;
    pthread_create(&c, NULL, controller, NULL);
    for (int i = 0; i < 4; i++)
        pthread_create(&w[i], NULL, worker, &iters);
    for (int i = 0; i < 4; i++)
        pthread_join(w[i], NULL);
    atomic_store(&g_stop, 1);
    pthread_join(c, NULL);
    CHECK(atomic_load(&g_max_held) <= 24);
    CHECK(bg_sem_value(g_sem) == 24);
    CHECK(bg_sem_queued(g_sem) == 0);
    bg_sem_decref(g_sem);
}

int main(int argc, char **argv)
{
    int iters = argc > 1 ? atoi(argv[1]) : 2000;
    test_bounds();
    test_shrink_below_held();
    test_grow_wakes_fifo();
    test_oversize_and_zero();
    test_blocking_wake();
    test_stress(iters);
    if (failures) {
        fprintf(stderr, "test_sem_capacity: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_sem_capacity: ok\n");
    return 0;
}
