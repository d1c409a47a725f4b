/* test_sem.c - tests of the pure C semaphore core (no Python).
 * Usage: test_sem [stress_iterations_per_thread]
 */
#define _POSIX_C_SOURCE 200809L
#include "bg_sem.h"
#include "check.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Grant log shared by the single-threaded tests. */
static int grant_log[64];
static int ngrants;

static void log_grant(bg_sem_waiter *w)
{
    grant_log[ngrants++] = (int)(intptr_t)w->ctx;
}

static void reset_log(void)
{
    ngrants = 0;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void test_basic(void)
{
    CHECK(bg_sem_create(-1, -1) == NULL);
    CHECK(bg_sem_create(3, 2) == NULL);
    bg_sem *s = bg_sem_create(2, -1);
    CHECK(s != NULL);
    CHECK(bg_sem_value(s) == 2);
    CHECK(bg_sem_max_value(s) == -1);
    CHECK(!bg_sem_would_block(s, 2));
    CHECK(bg_sem_would_block(s, 3));
    CHECK(!bg_sem_try_acquire(s, 0));
    CHECK(bg_sem_try_acquire(s, 2));
    CHECK(!bg_sem_try_acquire(s, 1));
    CHECK(bg_sem_value(s) == 0);
    CHECK(bg_sem_release(s, 0) == -1);
    CHECK(bg_sem_release(s, 5) == 0); /* unbounded may grow */
    CHECK(bg_sem_value(s) == 5);
    bg_sem_incref(s);
    bg_sem_decref(s);
    CHECK(bg_sem_value(s) == 5);
    bg_sem_decref(s);
}

static void test_fifo(void)
{
    bg_sem *s = bg_sem_create(0, -1);
    bg_sem_waiter w[5];
    reset_log();
    for (int i = 0; i < 5; i++) {
        bg_sem_waiter_init(&w[i], 1, log_grant, (void *)(intptr_t)i);
        CHECK(bg_sem_acquire_async(s, &w[i]) == 0);
        CHECK(w[i].state == BG_SEM_W_QUEUED);
    }
    CHECK(bg_sem_queued(s) == 5);
    /* A newcomer may not jump the queue even when a permit is free. */
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(ngrants == 1 && grant_log[0] == 0);
    CHECK(w[0].state == BG_SEM_W_GRANTED);
    CHECK(bg_sem_release(s, 3) == 0);
    CHECK(ngrants == 4);
    for (int i = 0; i < 4; i++)
        CHECK(grant_log[i] == i);
    CHECK(bg_sem_value(s) == 0);
    CHECK(bg_sem_queued(s) == 1);
    CHECK(bg_sem_release(s, 2) == 0);
    CHECK(ngrants == 5 && grant_log[4] == 4);
    CHECK(bg_sem_value(s) == 1);
    CHECK(bg_sem_queued(s) == 0);
    bg_sem_decref(s);
}

static void test_weighted_no_starvation(void)
{
    bg_sem *s = bg_sem_create(2, -1);
    bg_sem_waiter big, small1, small2;
    reset_log();
    bg_sem_waiter_init(&big, 5, log_grant, (void *)1);
    bg_sem_waiter_init(&small1, 1, log_grant, (void *)2);
    bg_sem_waiter_init(&small2, 1, log_grant, (void *)3);
    CHECK(bg_sem_acquire_async(s, &big) == 0); /* 2 < 5: queued */
    CHECK(bg_sem_acquire_async(s, &small1) == 0);
    CHECK(!bg_sem_try_acquire(s, 1)); /* value 2 but the big head waits */
    CHECK(bg_sem_would_block(s, 1));
    CHECK(bg_sem_release(s, 2) == 0); /* value 4 < 5: still nothing */
    CHECK(ngrants == 0);
    CHECK(bg_sem_release(s, 2) == 0); /* 6: big gets 5, small1 gets 1 */
    CHECK(ngrants == 2 && grant_log[0] == 1 && grant_log[1] == 2);
    CHECK(bg_sem_value(s) == 0);
    CHECK(bg_sem_acquire_async(s, &small2) == 0);
    CHECK(bg_sem_release(s, 5) == 0);
    CHECK(ngrants == 3 && grant_log[2] == 3);
    CHECK(bg_sem_value(s) == 4);
    /* Granted at once: IDLE, no callback. */
    bg_sem_waiter now;
    bg_sem_waiter_init(&now, 4, log_grant, (void *)4);
    CHECK(bg_sem_acquire_async(s, &now) == 1);
    CHECK(now.state == BG_SEM_W_IDLE && ngrants == 3);
    bg_sem_waiter bad;
    bg_sem_waiter_init(&bad, 0, log_grant, NULL);
    CHECK(bg_sem_acquire_async(s, &bad) == -1);
    bg_sem_decref(s);
}

static void test_cancel(void)
{
    bg_sem *s = bg_sem_create(1, -1);
    bg_sem_waiter big, small, last;
    reset_log();
    bg_sem_waiter_init(&big, 3, log_grant, (void *)1);
    bg_sem_waiter_init(&small, 1, log_grant, (void *)2);
    bg_sem_waiter_init(&last, 1, log_grant, (void *)3);
    CHECK(bg_sem_cancel(s, &big) == -1); /* never queued */
    CHECK(bg_sem_acquire_async(s, &big) == 0);
    CHECK(bg_sem_acquire_async(s, &small) == 0);
    CHECK(bg_sem_acquire_async(s, &last) == 0);
    /* Cancelling the queued big head lets the small one behind it through. */
    CHECK(bg_sem_cancel(s, &big) == 1);
    CHECK(big.state == BG_SEM_W_IDLE);
    CHECK(ngrants == 1 && grant_log[0] == 2);
    CHECK(bg_sem_cancel(s, &big) == -1); /* second cancel: nothing */
    CHECK(bg_sem_value(s) == 0);
    /* Cancel after grant: the owner holds the permit; releasing it hands it
     * on to the next waiter, none lost, none duplicated. */
    CHECK(bg_sem_cancel(s, &small) == 0);
    CHECK(small.state == BG_SEM_W_IDLE);
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(ngrants == 2 && grant_log[1] == 3);
    CHECK(bg_sem_value(s) == 0);
    CHECK(bg_sem_queued(s) == 0);
    /* Cancelling a non-head waiter wakes nobody. */
    bg_sem_waiter a, b;
    bg_sem_waiter_init(&a, 1, log_grant, (void *)4);
    bg_sem_waiter_init(&b, 1, log_grant, (void *)5);
    CHECK(bg_sem_acquire_async(s, &a) == 0);
    CHECK(bg_sem_acquire_async(s, &b) == 0);
    CHECK(bg_sem_cancel(s, &b) == 1);
    CHECK(ngrants == 2 && bg_sem_queued(s) == 1);
    CHECK(bg_sem_release(s, 1) == 0); /* to a */
    CHECK(ngrants == 3 && grant_log[2] == 4);
    CHECK(bg_sem_release(s, 2) == 0); /* the last holders give back */
    CHECK(bg_sem_value(s) == 2);
    bg_sem_decref(s);
}

static void test_bounded(void)
{
    bg_sem *s = bg_sem_create(2, 2);
    CHECK(bg_sem_max_value(s) == 2);
    CHECK(bg_sem_release(s, 1) == -1);
    CHECK(bg_sem_value(s) == 2);
    CHECK(bg_sem_try_acquire(s, 1));
    CHECK(bg_sem_release(s, 2) == -1); /* would pass the bound: nothing changed */
    CHECK(bg_sem_value(s) == 1);
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_release(s, 1) == -1);
    CHECK(!bg_sem_try_acquire(s, 3)); /* can never be granted */
    bg_sem_waiter w;
    bg_sem_waiter_init(&w, 3, NULL, NULL);
    CHECK(bg_sem_acquire_async(s, &w) == -1);
    CHECK(bg_sem_acquire_blocking(s, 3, -1) == -1);
    CHECK(bg_sem_value(s) == 2);
    bg_sem_decref(s);
}

typedef struct {
    bg_sem *s;
    int delay_ms;
    int64_t n;
} releaser_arg;

static void *releaser(void *p)
{
    releaser_arg *a = p;
    sleep_ms(a->delay_ms);
    bg_sem_release(a->s, a->n);
    return NULL;
}

static void test_blocking(void)
{
    bg_sem *s = bg_sem_create(0, -1);
    CHECK(bg_sem_acquire_blocking(s, 1, 0) == 0); /* poll */
    int64_t t0 = now_ns();
    CHECK(bg_sem_acquire_blocking(s, 1, 50 * 1000000LL) == 0);
    int64_t waited = now_ns() - t0;
    CHECK(waited >= 45 * 1000000LL);
    CHECK(bg_sem_queued(s) == 0);

    pthread_t th;
    releaser_arg a = {s, 20, 1};
    pthread_create(&th, NULL, releaser, &a);
    CHECK(bg_sem_acquire_blocking(s, 1, -1) == 1);
    pthread_join(th, NULL);
    CHECK(bg_sem_value(s) == 0);

    pthread_create(&th, NULL, releaser, &a);
    CHECK(bg_sem_acquire_blocking(s, 1, 5000 * 1000000LL) == 1);
    pthread_join(th, NULL);

    /* A blocking request that cannot be met times out and leaves the queue,
     * so the smaller request after it is granted at once. */
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_acquire_blocking(s, 3, 30 * 1000000LL) == 0);
    CHECK(bg_sem_queued(s) == 0);
    CHECK(bg_sem_acquire_blocking(s, 1, 0) == 1);
    CHECK(bg_sem_release(s, 1) == 0);
    bg_sem_decref(s);
}

/* Big blocking head in another thread, a small async waiter behind it. */
typedef struct {
    bg_sem *s;
    int rc;
} big_arg;

static void *big_blocker(void *p)
{
    big_arg *a = p;
    a->rc = bg_sem_acquire_blocking(a->s, 3, 80 * 1000000LL);
    return NULL;
}

static atomic_int small_granted;

static void flag_grant(bg_sem_waiter *w)
{
    (void)w;
    atomic_store(&small_granted, 1);
}

static void test_blocking_head_timeout(void)
{
    bg_sem *s = bg_sem_create(1, -1);
    big_arg a = {s, -2};
    pthread_t th;
    pthread_create(&th, NULL, big_blocker, &a);
    while (bg_sem_queued(s) == 0)
        sched_yield();
    bg_sem_waiter small;
    bg_sem_waiter_init(&small, 1, flag_grant, NULL);
    CHECK(bg_sem_acquire_async(s, &small) == 0); /* FIFO: behind the big one */
    pthread_join(th, NULL);
    CHECK(a.rc == 0);
    CHECK(atomic_load(&small_granted) == 1); /* head's timeout woke it */
    CHECK(small.state == BG_SEM_W_GRANTED);
    CHECK(bg_sem_value(s) == 0);
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_value(s) == 1);
    bg_sem_decref(s);
}

/* ---- multi-thread stress ---- */

#define INITIAL 5
static atomic_long held;      /* permits owned by workers right now */
static atomic_long max_held;  /* high-water mark */
static atomic_long granted_total;
static int stress_iters = 2000;

/* The flag is mutex-protected (not atomic) so helgrind can follow it. */
typedef struct {
    bg_sem_waiter w;
    pthread_mutex_t mu;
    int granted;
} async_waiter;

static void async_grant(bg_sem_waiter *w)
{
    async_waiter *aw = (async_waiter *)w->ctx;
    pthread_mutex_lock(&aw->mu);
    aw->granted = 1;
    pthread_mutex_unlock(&aw->mu);
}

static int async_granted(async_waiter *aw)
{
    pthread_mutex_lock(&aw->mu);
    int g = aw->granted;
    pthread_mutex_unlock(&aw->mu);
    return g;
}

static void take(int64_t n)
{
    long h = atomic_fetch_add(&held, n) + n;
    long m = atomic_load(&max_held);
    while (h > m && !atomic_compare_exchange_weak(&max_held, &m, h))
        ;
    atomic_fetch_add(&granted_total, 1);
    if (h > INITIAL) {
        fprintf(stderr, "held %ld > %d\n", h, INITIAL);
        failures++;
    }
}

static void give(bg_sem *s, int64_t n)
{
    atomic_fetch_sub(&held, n);
    if (bg_sem_release(s, n) != 0) {
        fprintf(stderr, "release failed\n");
        failures++;
    }
}

static void *stress_worker(void *p)
{
    bg_sem *s = p;
    unsigned seed = (unsigned)(uintptr_t)pthread_self();
    for (int i = 0; i < stress_iters; i++) {
        int64_t n = 1 + rand_r(&seed) % 3;
        int mode = rand_r(&seed) % 4;
        if (mode == 0) {
            if (bg_sem_try_acquire(s, n)) {
                take(n);
                give(s, n);
            }
        } else if (mode == 1) {
            int64_t timeout = (rand_r(&seed) % 2) ? -1 : (int64_t)(rand_r(&seed) % 200000);
            int rc = bg_sem_acquire_blocking(s, n, timeout);
            if (rc == 1) {
                take(n);
                if (rand_r(&seed) % 2)
                    sched_yield();
                give(s, n);
            } else if (rc != 0) {
                failures++;
            }
        } else {
            async_waiter aw;
            aw.granted = 0;
            pthread_mutex_init(&aw.mu, NULL);
            bg_sem_waiter_init(&aw.w, n, async_grant, &aw);
            int rc = bg_sem_acquire_async(s, &aw.w);
            if (rc == 1) {
                take(n);
                give(s, n);
                pthread_mutex_destroy(&aw.mu);
                continue;
            }
            int spins = rand_r(&seed) % 50;
            bool cancel = mode == 3;
            for (int k = 0; !async_granted(&aw); k++) {
                if (cancel && k >= spins)
                    break;
                sched_yield();
            }
            if (!cancel && async_granted(&aw)) {
                take(n);
                give(s, n);
            } else {
                int c = bg_sem_cancel(s, &aw.w);
                if (c == 0) {
                    /* Granted under us: hand the permits on. */
                    take(n);
                    give(s, n);
                } else if (c != 1) {
                    failures++;
                }
            }
            /* bg_sem_cancel or the observed grant ordered us after the
             * callback's unlock, so the mutex is free to go. */
            pthread_mutex_destroy(&aw.mu);
        }
    }
    return NULL;
}

static void test_stress(void)
{
    enum { NTHREADS = 6 };
    bg_sem *s = bg_sem_create(INITIAL, -1);
    pthread_t th[NTHREADS];
    for (int i = 0; i < NTHREADS; i++)
        pthread_create(&th[i], NULL, stress_worker, s);
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(th[i], NULL);
    /* Quiescence: value + held == initial, no waiter left. */
    CHECK(atomic_load(&held) == 0);
    CHECK(bg_sem_value(s) + atomic_load(&held) == INITIAL);
    CHECK(bg_sem_queued(s) == 0);
    CHECK(atomic_load(&max_held) <= INITIAL);
    CHECK(atomic_load(&granted_total) > 0);
    fprintf(stderr, "stress: %ld grants, max held %ld\n",
            atomic_load(&granted_total), atomic_load(&max_held));
    bg_sem_decref(s);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        stress_iters = atoi(argv[1]);
    test_basic();
    test_fifo();
    test_weighted_no_starvation();
    test_cancel();
    test_bounded();
    test_blocking();
    test_blocking_head_timeout();
    test_stress();
    if (failures) {
        fprintf(stderr, "test_sem: %d FAILED\n", failures);
        return 1;
    }
    printf("test_sem: ok\n");
    return 0;
}
