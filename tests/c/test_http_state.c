/* test_http_state.c - the request state machine (bg_http_request.c): the
 * table refuses every move it does not list, a live request cannot be
 * submitted twice, and under retries, cancels (by id and group) and close
 * racing each other every request ends exactly once, in one terminal kind,
 * with no refused move inside the engine.
 * Usage: test_http_state [path/to/fake_vllm.py]
 */
#define _GNU_SOURCE
#include "http_fixture.h"
#include "bg_http_request.h"

#if defined(__has_include) && __has_include(<valgrind/helgrind.h>)
#include <valgrind/helgrind.h>
#else
#define VALGRIND_HG_DISABLE_CHECKING(addr, len) ((void)(addr), (void)(len))
#endif
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The lifecycle as documented, written out independently of the engine's
 * table: for each state, the states it may go to. */
static const char *const expected_to[BGR_N_STATES] = {
    [BGR_IDLE] = "inbox",
    [BGR_INBOX] = "wait_admit wait_tokens wait_count flight done",
    [BGR_WAIT_ADMIT] = "wait_tokens wait_count flight done",
    [BGR_WAIT_TOKENS] = "wait_count flight done",
    [BGR_WAIT_COUNT] = "flight done",
    [BGR_FLIGHT] = "backoff done",
    [BGR_BACKOFF] = "wait_admit wait_tokens wait_count flight done",
    [BGR_DONE] = "inbox",
};

static bool listed(const char *list, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0'))
            return true;
    return false;
}

static void test_table(void)
{
    int refused = 0, allowed = 0;
    for (int from = 0; from < BGR_N_STATES; from++) {
        for (int to = 0; to < BGR_N_STATES; to++) {
            bool want = listed(expected_to[from], bgr_state_name(to));
            CHECK(bgr_legal(from, to) == want);
            if (bgr_legal(from, to) != want)
                fprintf(stderr, "  %s -> %s: table says %d\n", bgr_state_name(from),
                        bgr_state_name(to), !want);
            bg_request r;
            memset(&r, 0, sizeof(r));
            r.state = from;
            int rc = bgr_move(NULL, &r, to);
            CHECK(rc == (want ? 0 : -1));
            CHECK(r.state == (want ? to : from)); /* a refused move changes nothing */
            refused += rc < 0;
            allowed += rc == 0;
        }
    }
    CHECK(allowed == 23 && refused == 41);
    CHECK(!bgr_legal(-1, BGR_INBOX) && !bgr_legal(BGR_IDLE, BGR_N_STATES));
    CHECK(strcmp(bgr_state_name(BGR_N_STATES), "?") == 0);
    /* One whole life, with a retry, then a second submission. */
    static const int path[] = {BGR_INBOX,  BGR_WAIT_ADMIT, BGR_WAIT_TOKENS, BGR_WAIT_COUNT,
                               BGR_FLIGHT, BGR_BACKOFF,    BGR_FLIGHT,      BGR_DONE,
                               BGR_INBOX,  BGR_FLIGHT,     BGR_DONE};
    bg_request r;
    memset(&r, 0, sizeof(r));
    for (size_t i = 0; i < sizeof(path) / sizeof(path[0]); i++)
        CHECK(bgr_move(NULL, &r, path[i]) == 0);
    /* Finished: it cannot finish again, run again or wait again. */
    CHECK(bgr_move(NULL, &r, BGR_DONE) == -1 && bgr_move(NULL, &r, BGR_FLIGHT) == -1 &&
          bgr_move(NULL, &r, BGR_BACKOFF) == -1 && r.state == BGR_DONE);
}

/* A request the engine still holds cannot be submitted again, alone or in a
 * batch (which then takes nothing); once handed back it may be. */
static void test_live_resubmit_refused(void)
{
    fixture fx;
    fx_open(&fx, 2, NULL, NULL);
    item *v = make_items(&fx, 2, "live %d [[delay=0.3]]");
    /* Submitting a live request races with the engine by nature; the state is
     * read and written atomically, which helgrind does not model. */
    VALGRIND_HG_DISABLE_CHECKING(&v[0].r.state, sizeof(v[0].r.state));
    CHECK(bg_engine_submit(fx.e, &v[0].r) == 0);
    CHECK(bg_engine_submit(fx.e, &v[0].r) == -1);
    bg_request *both[2] = {&v[1].r, &v[0].r};
    CHECK(bg_engine_submit_many(fx.e, both, 2) == -1);
    CHECK(v[1].r.state == BGR_IDLE); /* untouched */
    CHECK(wait_done(&coll, 1, 20));
    sleep_s(0.2); /* a wrongly taken second copy would finish meanwhile */
    CHECK(coll_done() == 1 && coll.dup == 0 && v[0].seen == 1 && v[1].seen == 0);
    expect_ok_text(&v[0]);
    bg_request_clear(&v[0].r);
    CHECK(bg_engine_submit_many(fx.e, both, 2) == 0); /* finished: submitted again */
    CHECK(wait_done(&coll, 3, 20));
    CHECK(v[0].seen == 2 && v[1].seen == 1);
    expect_ok_text(&v[1]);
    CHECK(v[0].r.kind == BG_RES_OK && v[0].r.attempts == 1);
    bg_engine_stats st;
    bg_engine_get_stats(fx.e, &st);
    CHECK(st.submitted == 3 && st.completed == 3);
    CHECK(bg_engine_test_illegal(fx.e) == 0);
    fx_close(&fx);
    free_items(v, 2);
}

/* ---- races -------------------------------------------------------------- */

typedef struct {
    bg_engine *e;
    size_t n;
    unsigned seed;
    atomic_int stop;
} canceller;

static void *cancel_main(void *arg)
{
    canceller *c = arg;
    unsigned s = c->seed;
    /* Odd ids at random, and group 3 early on: the rest may run to the end. */
    for (int k = 0; !atomic_load(&c->stop) && k < 4000; k++) {
        s = s * 1103515245u + 12345u;
        bg_engine_cancel(c->e, 1 + 2 * ((s >> 8) % (c->n / 2)));
        if (k == 30)
            bg_engine_cancel_group(c->e, 3);
        usleep(1000 + (s >> 20) % 3000);
    }
    return NULL;
}

/* A "Python" holder of the shared count semaphore: takes a permit and gives
 * it back over and over, so grants also come from a thread other than the
 * engine's and can land between a cancel and the engine's next look. */
typedef struct {
    bg_sem *count;
    atomic_int stop;
} holder;

static void *holder_main(void *arg)
{
    holder *h = arg;
    while (!atomic_load(&h->stop)) {
        if (bg_sem_acquire_blocking(h->count, 1, 20 * 1000 * 1000) == 1) {
            usleep(300);
            bg_sem_release(h->count, 1);
        }
        usleep(200);
    }
    return NULL;
}

/* Requests that retry (503 once, a reset connection once, 503 for good, 429
 * with a Retry-After that keeps them in backoff for a second),
 * wait for token permits, or just run, while another thread cancels at
 * random, a third takes and returns count permits, and the main thread
 * closes the engine at a different moment each round. */
static void race_round(unsigned seed, double close_after_s)
{
    fixture fx;
    fx_open(&fx, 6, NULL, NULL);
    bg_engine_destroy(fx.e);
    fx.tokens = bg_sem_create(40, 40);
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.count_sem = fx.count;
    c.token_sem = fx.tokens;
    c.max_retries = 2;
    c.backoff_base_s = 0.005;
    c.backoff_max_s = 0.02;
    fx.e = engine_on_collector(&c);
    const size_t n = 240;
    item *v = make_items(&fx, n, "%d");
    bg_request *rs[240];
    static const char *const kinds[] = {"[[delay=0.005]]", "[[status=503,times=1]]",
                                        "[[fault=reset,times=1]]", "[[delay=0.05]]",
                                        "[[status=503]]", "[[status=429,retry_after=1,times=1]]"};
    for (size_t i = 0; i < n; i++) {
        snprintf(v[i].text, sizeof(v[i].text), "race %u %zu %s", seed, i, kinds[i % 6]);
        v[i].p.len = strlen(v[i].text);
        v[i].r.token_weight = 1 + (int64_t)(i % 15);
        v[i].r.group = 1 + i % 4;
        rs[i] = &v[i].r;
    }
    canceller cn = {fx.e, n, seed, 0};
    holder hd = {fx.count, 0};
    pthread_t th, th_hold;
    pthread_create(&th, NULL, cancel_main, &cn);
    pthread_create(&th_hold, NULL, holder_main, &hd);
    CHECK(bg_engine_submit_many(fx.e, rs, n / 2) == 0);
    sleep_s(0.01);
    CHECK(bg_engine_submit_many(fx.e, rs + n / 2, n - n / 2) == 0);
    sleep_s(close_after_s);
    bg_engine_close(fx.e); /* the canceller keeps going meanwhile */
    atomic_store(&cn.stop, 1);
    atomic_store(&hd.stop, 1);
    pthread_join(th, NULL);
    pthread_join(th_hold, NULL);
    CHECK(coll_done() == n && coll.dup == 0);
    size_t by_kind[BG_RES_NOMEM + 1] = {0};
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].seen == 1);
        CHECK(v[i].r.state == BGR_DONE);
        int k = v[i].r.kind;
        if (k >= 0 && k <= BG_RES_NOMEM)
            by_kind[k]++;
        if (k == BG_RES_OK) {
            CHECK(i % 6 != 4); /* always 503: never OK */
            char want[200];
            snprintf(want, sizeof(want), "echo:%s", v[i].text);
            CHECK(v[i].r.resp.n_choices == 1 &&
                  strcmp(v[i].r.resp.choices[0].text, want) == 0);
        } else if (k == BG_RES_HTTP) {
            CHECK(i % 6 == 4 && v[i].r.status == 503 && v[i].r.attempts == 3);
        } else {
            CHECK(k == BG_RES_CANCELLED || k == BG_RES_CLOSED);
        }
    }
    printf("  round %u (close at %.2fs): ok=%zu http=%zu cancelled=%zu closed=%zu\n", seed,
           close_after_s, by_kind[BG_RES_OK], by_kind[BG_RES_HTTP], by_kind[BG_RES_CANCELLED],
           by_kind[BG_RES_CLOSED]);
    CHECK(by_kind[BG_RES_OK] + by_kind[BG_RES_HTTP] + by_kind[BG_RES_CANCELLED] +
              by_kind[BG_RES_CLOSED] ==
          n);
    CHECK(bg_engine_test_illegal(fx.e) == 0);
    CHECK(bg_sem_value(fx.tokens) == 40 && bg_sem_queued(fx.tokens) == 0);
    fx_close(&fx);
    free_items(v, n);
    /* Aborted requests may still sleep in the server: let them end first. */
    for (int i = 0; i < 300 && stat_int("in_flight") > 0; i++)
        usleep(10 * 1000);
}

static void test_terminal_once_under_races(void)
{
    race_round(1, 0.02);
    race_round(2, 0.15);
    race_round(3, 0.6);
    race_round(4, 2.0);
}

int main(int argc, char **argv)
{
    static const test_case tests[] = {
        {"table", test_table},
        {"live_resubmit_refused", test_live_resubmit_refused},
        {"terminal_once_under_races", test_terminal_once_under_races},
    };
    return run_tests("test_http_state", tests, sizeof(tests) / sizeof(tests[0]), argc, argv);
}
