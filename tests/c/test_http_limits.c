/* test_http_limits.c - the libcurl engine (bg_http) against tests/fake_vllm.py:
 * permits and lifecycle. Token budgets, /tokenize, cancellation by id and
 * group, close with requests in flight, completion rounds (on_flush),
 * semaphores shared between engines and pre-held permits, multi errors and
 * refused configurations.
 * Usage: test_http_limits [path/to/fake_vllm.py]
 */
#define _GNU_SOURCE
#include "http_fixture.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_token_budget(void)
{
    fixture fx;
    fx_open(&fx, 16, NULL, "{\"max_tokens\":30}");
    bg_engine_destroy(fx.e);
    /* Rebuild with a token semaphore of 100: at most 3 requests of weight 30. */
    fx.tokens = bg_sem_create(100, 100);
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.count_sem = fx.count;
    c.token_sem = fx.tokens;
    c.on_done = on_done;
    c.done_ctx = &coll;
    char err[200];
    fx.e = bg_engine_create(&c, err, sizeof(err));
    const size_t n = 60;
    item *v = make_items(&fx, n, "tok %d [[delay=0.02]]");
    for (size_t i = 0; i < n; i++) {
        v[i].r.token_weight = 30;
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    }
    /* One request heavier than the whole budget still runs (alone). */
    item *big = make_items(&fx, 1, "big");
    big->r.id = 999;
    big->r.token_weight = 1000;
    CHECK(bg_engine_submit(fx.e, &big->r) == 0);
    CHECK(wait_done(&coll, n + 1, 60));
    for (size_t i = 0; i < n; i++)
        expect_ok_text(&v[i]);
    expect_ok_text(big);
    long maxtok = stat_int("max_in_flight_tokens");
    long maxc = stat_int("max_in_flight");
    printf("  token budget 100 (weight 30): server max tokens in flight=%ld, requests=%ld\n",
           maxtok, maxc);
    CHECK(maxtok >= 60 && maxtok <= 90);
    CHECK(maxc <= 3);
    CHECK(bg_sem_value(fx.tokens) == 100);
    free_items(v, n);
    free_items(big, 1);
    fx_close(&fx);
}

/* /tokenize at the server root: count permits only (the token budget is
 * exhausted on purpose and must not matter), the count cap bounds the
 * concurrency, errors keep the server's status. */
static void test_tokenize(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, "{\"add_special_tokens\":true}");
    bg_engine_destroy(fx.e);
    fx.tokens = bg_sem_create(10, 10);
    CHECK(bg_sem_try_acquire(fx.tokens, 10)); /* no token permit left for anyone */
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.count_sem = fx.count;
    c.token_sem = fx.tokens;
    c.on_done = on_done;
    c.done_ctx = &coll;
    char err[200];
    fx.e = bg_engine_create(&c, err, sizeof(err));
    CHECK(fx.e != NULL);
    const size_t n = 40;
    item *v = make_items(&fx, n, "count these %d words [[delay=0.02]]");
    for (size_t i = 0; i < n; i++) {
        v[i].r.endpoint = BG_EP_TOKENIZE;
        v[i].r.token_weight = 5;
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    }
    item *bad = make_items(&fx, 1, "x [[status=400,msg=bad]]");
    bad->r.id = 999;
    bad->r.endpoint = BG_EP_TOKENIZE;
    CHECK(bg_engine_submit(fx.e, &bad->r) == 0);
    CHECK(wait_done(&coll, n + 1, 60));
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].r.kind == BG_RES_OK);
        CHECK(v[i].r.tok_count == 5); /* the fake counts words: "count these N words [[..]]" */
        CHECK(v[i].r.tok_max_model_len == 4096);
    }
    CHECK(bad->r.kind == BG_RES_HTTP && bad->r.status == 400);
    CHECK_CONTAINS(bad->r.message, "bad");
    long maxc = stat_int("max_in_flight");
    printf("  %zu tokenize requests, count cap 4: server max_in_flight=%ld\n", n, maxc);
    CHECK(maxc >= 2 && maxc <= 4);
    CHECK(bg_sem_value(fx.tokens) == 0); /* never touched */
    bg_sem_release(fx.tokens, 10);
    free_items(v, n);
    free_items(bad, 1);
    fx_close(&fx);
}

static uint64_t rnd_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 7;
    rnd_state ^= rnd_state << 17;
    return rnd_state;
}

static void test_cancel_half(void)
{
    fixture fx;
    fx_open(&fx, 16, NULL, NULL);
    const size_t n = 3000;
    item *v = make_items(&fx, n, "c %d [[delay=0.01]]");
    bg_request **rs = malloc(n * sizeof(*rs));
    for (size_t i = 0; i < n; i++)
        rs[i] = &v[i].r;
    /* A few also fail and back off, to cancel in that state too. */
    for (size_t i = 0; i < n; i += 97) {
        snprintf(v[i].text, sizeof(v[i].text), "c %d [[status=503,times=1]]", (int)i);
        v[i].p.len = strlen(v[i].text);
    }
    CHECK(bg_engine_submit_many(fx.e, rs, n) == 0);
    bool *want_cancel = calloc(n, sizeof(bool));
    size_t ncancel = 0;
    for (size_t k = 0; k < n; k++) {
        size_t i = (size_t)(rnd() % n);
        if (!want_cancel[i]) {
            want_cancel[i] = true;
            ncancel++;
            bg_engine_cancel(fx.e, v[i].r.id);
        }
        if (k % 200 == 0)
            usleep(2000);
    }
    bg_engine_cancel(fx.e, 123456789); /* unknown: ignored */
    CHECK(wait_done(&coll, n, 120));
    CHECK(coll.dup == 0);
    size_t ok = 0, cancelled = 0, other = 0;
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].seen == 1);
        if (v[i].r.kind == BG_RES_OK) {
            ok++;
            expect_ok_text(&v[i]);
        } else if (v[i].r.kind == BG_RES_CANCELLED) {
            cancelled++;
            CHECK(want_cancel[i]);
        } else {
            other++;
        }
    }
    printf("  cancel: %zu asked, %zu cancelled, %zu ok, %zu other\n", ncancel, cancelled, ok,
           other);
    CHECK(other == 0 && cancelled > ncancel / 2 && ok + cancelled == n);
    /* The server may still count aborted requests, so ask the engine. */
    bg_engine_stats st;
    bg_engine_get_stats(fx.e, &st);
    CHECK(st.max_in_flight <= 16 && st.max_in_flight >= 8);
    free(want_cancel);
    free(rs);
    fx_close(&fx);
    free_items(v, n);
}

static void test_cancel_group(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    const size_t n = 200;
    item *v = make_items(&fx, n, "g %d [[delay=0.05]]");
    for (size_t i = 0; i < n; i++) {
        v[i].r.group = (i % 2) ? 7 : 8;
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    }
    bg_engine_cancel_group(fx.e, 7);
    CHECK(wait_done(&coll, n, 60));
    size_t cancelled_odd = 0;
    for (size_t i = 0; i < n; i++) {
        if (i % 2 == 0)
            CHECK(v[i].r.kind == BG_RES_OK);
        else
            cancelled_odd += v[i].r.kind == BG_RES_CANCELLED;
    }
    CHECK(cancelled_odd >= n / 2 - 4);
    fx_close(&fx);
    free_items(v, n);
}

static void test_close_in_flight(void)
{
    fixture fx;
    fx_open(&fx, 8, NULL, NULL);
    const size_t n = 400;
    item *v = make_items(&fx, n, "close %d [[delay=0.3]]");
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    usleep(100 * 1000);
    double t0 = now_s();
    bg_engine_close(fx.e);
    double dt = now_s() - t0;
    CHECK(dt < 1.0);
    CHECK(coll.done == n && coll.dup == 0);
    size_t closed = 0;
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].seen == 1);
        closed += v[i].r.kind == BG_RES_CLOSED;
    }
    CHECK(closed == n);
    item *late = make_items(&fx, 1, "late");
    CHECK(bg_engine_submit(fx.e, &late->r) == -1);
    CHECK(late->seen == 0);
    free_items(late, 1);
    printf("  close with %zu pending took %.3fs\n", n, dt);
    /* The server still sleeps in the aborted requests' handlers: let them end
     * before the next test resets its counters (or in_flight goes negative). */
    for (int i = 0; i < 300 && stat_int("in_flight") > 0; i++)
        usleep(10 * 1000);
    fx_close(&fx);
    free_items(v, n);
}

/* on_flush: called on the engine thread after each round of on_done calls,
 * so every completion is followed by a flush (also when close() ends what is
 * in flight), and one flush can cover many completions. */
static struct {
    pthread_mutex_t mu;
    size_t unflushed, flushes, max_round;
    pthread_t engine_thread;
    int other_thread; /* a flush or on_done off the engine thread */
} fl = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0};

static void fl_on_done(bg_request *r, void *ctx)
{
    pthread_mutex_lock(&fl.mu);
    if (fl.unflushed == 0 && fl.flushes == 0 && fl.max_round == 0)
        fl.engine_thread = pthread_self();
    else if (!pthread_equal(fl.engine_thread, pthread_self()))
        fl.other_thread = 1;
    fl.unflushed++;
    pthread_mutex_unlock(&fl.mu);
    on_done(r, ctx);
}

static void fl_on_flush(void *ctx)
{
    CHECK(ctx == &coll);
    pthread_mutex_lock(&fl.mu);
    if (!pthread_equal(fl.engine_thread, pthread_self()))
        fl.other_thread = 1;
    CHECK(fl.unflushed > 0); /* only after a round that finished something */
    if (fl.unflushed > fl.max_round)
        fl.max_round = fl.unflushed;
    fl.unflushed = 0;
    fl.flushes++;
    pthread_mutex_unlock(&fl.mu);
}

static void test_flush_rounds(void)
{
    fixture fx;
    fx_open(&fx, 64, NULL, NULL);
    bg_engine_destroy(fx.e);
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.count_sem = fx.count;
    c.on_done = fl_on_done;
    c.on_flush = fl_on_flush;
    c.done_ctx = &coll;
    char err[200];
    fx.e = bg_engine_create(&c, err, sizeof(err));
    CHECK(fx.e != NULL);
    const size_t n = 300, slow = 40;
    item *v = make_items(&fx, n, "round %d");
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    CHECK(wait_done(&coll, n, 60));
    /* The round's flush follows its last on_done: wait for it. */
    for (int i = 0; i < 500; i++) {
        pthread_mutex_lock(&fl.mu);
        size_t left = fl.unflushed;
        pthread_mutex_unlock(&fl.mu);
        if (left == 0)
            break;
        usleep(2000);
    }
    pthread_mutex_lock(&fl.mu);
    CHECK(fl.unflushed == 0);
    CHECK(fl.flushes >= 1 && fl.flushes < n); /* rounds, not one per request */
    CHECK(fl.max_round > 1);
    size_t flushes = fl.flushes;
    pthread_mutex_unlock(&fl.mu);
    printf("  %zu completions in %zu flushes\n", n, flushes);
    /* Ended by close(): the last round is flushed before the thread exits. */
    item *w = make_items(&fx, slow, "held %d [[delay=1]]");
    for (size_t i = 0; i < slow; i++)
        CHECK(bg_engine_submit(fx.e, &w[i].r) == 0);
    usleep(100 * 1000);
    bg_engine_close(fx.e);
    CHECK(coll.done == n + slow);
    pthread_mutex_lock(&fl.mu);
    CHECK(fl.unflushed == 0);
    CHECK(fl.flushes > flushes);
    CHECK(!fl.other_thread);
    pthread_mutex_unlock(&fl.mu);
    for (int i = 0; i < 300 && stat_int("in_flight") > 0; i++)
        usleep(10 * 1000);
    fx_close(&fx);
    free_items(v, n);
    free_items(w, slow);
}

/* flush_defer_us: a busy engine whose count permits are all in use flushes
 * at most that late, not every round; a count permit left free, or an
 * engine about to sleep, flushes at once whatever the setting. */
static void fl_reset(void)
{
    pthread_mutex_lock(&fl.mu);
    fl.unflushed = fl.flushes = fl.max_round = 0;
    fl.other_thread = 0;
    pthread_mutex_unlock(&fl.mu);
}

static bg_engine *fl_engine(fixture *fx, long defer_us)
{
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    CHECK(c.flush_defer_us > 0); /* deferring is the default */
    c.base_url = base_url;
    c.count_sem = fx->count;
    c.on_done = fl_on_done;
    c.on_flush = fl_on_flush;
    c.done_ctx = &coll;
    c.flush_defer_us = defer_us;
    char err[200];
    bg_engine *e = bg_engine_create(&c, err, sizeof(err));
    CHECK(e != NULL);
    return e;
}

/* Wait for the flush that follows the last on_done; how many there were. */
static size_t fl_settle(size_t *max_round)
{
    for (int i = 0; i < 1000; i++) {
        pthread_mutex_lock(&fl.mu);
        size_t left = fl.unflushed;
        pthread_mutex_unlock(&fl.mu);
        if (left == 0)
            break;
        usleep(2000);
    }
    pthread_mutex_lock(&fl.mu);
    CHECK(fl.unflushed == 0);
    size_t f = fl.flushes;
    *max_round = fl.max_round;
    pthread_mutex_unlock(&fl.mu);
    return f;
}

static void test_flush_deferred(void)
{
    fixture fx;
    fx_open(&fx, 1, NULL, NULL); /* one permit: one transfer, one completion per round */
    bg_engine_destroy(fx.e);
    const size_t n = 10;
    bg_request *rs[10];
    size_t max_round = 0;

    /* Busy, 10 s: each completion hands its permit to the next waiter, so
     * nothing is flushed until the last one leaves the permit free. */
    fx.e = fl_engine(&fx, 10 * 1000 * 1000);
    bg_engine_test_busy(fx.e, true);
    fl_reset();
    coll_reset();
    item *v = make_items(&fx, n, "busy %d");
    for (size_t i = 0; i < n; i++)
        rs[i] = &v[i].r;
    CHECK(bg_engine_submit_many(fx.e, rs, n) == 0); /* one intake: all queued at once */
    CHECK(wait_done(&coll, n, 30));
    CHECK(fl_settle(&max_round) == 1);
    CHECK(max_round == n);
    bg_engine_destroy(fx.e);
    free_items(v, n);

    /* The same with 0: every round that finished something flushes. */
    fx.e = fl_engine(&fx, 0);
    bg_engine_test_busy(fx.e, true);
    fl_reset();
    coll_reset();
    v = make_items(&fx, n, "every %d");
    for (size_t i = 0; i < n; i++)
        rs[i] = &v[i].r;
    CHECK(bg_engine_submit_many(fx.e, rs, n) == 0);
    CHECK(wait_done(&coll, n, 30));
    CHECK(fl_settle(&max_round) == n);
    CHECK(max_round == 1);
    bg_engine_destroy(fx.e);
    free_items(v, n);

    fx.e = NULL;
    fx_close(&fx);

    /* Not forced busy, 10 s, both permits held (a slow answer, and the one a
     * fast answer hands to a slow waiter): the engine is about to sleep, so
     * it flushes the fast answer at once, not when a permit comes free. */
    fixture f2;
    fx_open(&f2, 2, NULL, NULL);
    bg_engine_destroy(f2.e);
    f2.e = fl_engine(&f2, 10 * 1000 * 1000);
    fl_reset();
    coll_reset();
    item *w = make_items(&f2, 3, "idle %d [[delay=3]]");
    snprintf(w[1].text, sizeof(w[1].text), "idle fast");
    w[1].p.len = strlen(w[1].text);
    for (size_t i = 0; i < 3; i++)
        rs[i] = &w[i].r;
    double t0 = now_s();
    CHECK(bg_engine_submit_many(f2.e, rs, 3) == 0);
    CHECK(wait_done(&coll, 1, 30));
    CHECK(fl_settle(&max_round) == 1);
    CHECK(now_s() - t0 < 2); /* not at ~3 s, when the slow ones end */
    CHECK(wait_done(&coll, 3, 30));
    fl_settle(&max_round);
    pthread_mutex_lock(&fl.mu);
    CHECK(!fl.other_thread);
    pthread_mutex_unlock(&fl.mu);
    fx_close(&f2);
    free_items(w, 3);
}

/* A persistent curl_multi error ends what is in flight instead of spinning. */
static void test_multi_error(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    item *v = make_items(&fx, 4, "stuck %d [[delay=2]]");
    for (size_t i = 0; i < 4; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    usleep(200 * 1000); /* all four in flight */
    double t0 = now_s();
    bg_engine_test_fail_multi(fx.e, 1000000);
    CHECK(wait_done(&coll, 4, 10));
    CHECK(now_s() - t0 < 1.5); /* before the server would have answered */
    for (size_t i = 0; i < 4; i++) {
        CHECK(v[i].r.kind == BG_RES_TRANSPORT);
        CHECK_CONTAINS(v[i].r.message, "curl_multi_perform failed");
    }
    /* The error pauses the loop instead of spinning: ~10 ms per round. */
    bg_engine_test_fail_multi(fx.e, 0);
    item *after = run_one(&fx, "after");
    expect_ok_text(after);
    free_items(after, 1);
    fx_close(&fx);
    free_items(v, 4);
}

/* Secrets and header injection are refused before anything is sent. */
static void test_config_rejects(void)
{
    bg_sem *s = bg_sem_create(1, 1);
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.count_sem = s;
    c.on_done = on_done;
    char err[256] = "";
    c.api_key = "sk-secret\r\nX-Injected: 1";
    CHECK(bg_engine_create(&c, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "api_key must not contain CR or LF");
    CHECK(strstr(err, "sk-secret") == NULL);
    c.api_key = NULL;
    const char *bad[] = {"X-A: 1\r\nX-B: 2"};
    c.headers = bad;
    c.n_headers = 1;
    CHECK(bg_engine_create(&c, err, sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "header 0");
    bg_sem_decref(s);
}

/* An unbounded semaphore refuses to count past INT64_MAX. */
static void test_sem_overflow(void)
{
    bg_sem *s = bg_sem_create(INT64_MAX - 1, -1);
    CHECK(bg_sem_release(s, 1) == 0);
    CHECK(bg_sem_release(s, 1) == -1 && bg_sem_value(s) == INT64_MAX);
    bg_sem_decref(s);
}

static void test_shared_semaphore(void)
{
    /* Two engines and a plain thread share one cap of 6. */
    fixture a, b;
    fx_open(&a, 6, NULL, NULL);
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.count_sem = a.count;
    c.on_done = on_done;
    c.done_ctx = &coll;
    char err[200];
    b = a;
    b.e = bg_engine_create(&c, err, sizeof(err));
    bg_sem_incref(a.count);
    bg_tmpl_incref(a.tmpl);
    const size_t n = 200;
    item *va = make_items(&a, n, "A %d [[delay=0.01]]");
    item *vb = make_items(&b, n, "B %d [[delay=0.01]]");
    CHECK(bg_sem_acquire_blocking(a.count, 2, -1) == 1); /* a "Python" holder */
    for (size_t i = 0; i < n; i++) {
        CHECK(bg_engine_submit(a.e, &va[i].r) == 0);
        CHECK(bg_engine_submit(b.e, &vb[i].r) == 0);
    }
    usleep(50 * 1000);
    bg_sem_release(a.count, 2);
    CHECK(wait_done(&coll, 2 * n, 60));
    for (size_t i = 0; i < n; i++) {
        expect_ok_text(&va[i]);
        expect_ok_text(&vb[i]);
    }
    long maxc = stat_int("max_in_flight");
    printf("  shared cap 6 over two engines: server max_in_flight=%ld\n", maxc);
    CHECK(maxc <= 6 && maxc >= 3);
    fx_close(&b);
    fx_close(&a);
    free_items(va, n);
    free_items(vb, n);
}

/* A submitter that already holds every count permit (a task inside
 * `async with sem`) marks its requests count_preheld: they run without taking
 * a permit, retry without releasing one, and leave the count untouched. */
static void test_count_preheld(void)
{
    fixture fx;
    fx_open(&fx, 2, NULL, NULL);
    CHECK(bg_sem_try_acquire(fx.count, 2)); /* the "task" holds both */
    const size_t n = 6;
    item *v = make_items(&fx, n, "ride %d");
    snprintf(v[0].text, sizeof(v[0].text), "ride retry [[status=503,times=2]]");
    v[0].p.len = strlen(v[0].text);
    bg_request *rs[6];
    for (size_t i = 0; i < n; i++) {
        v[i].r.count_preheld = true;
        rs[i] = &v[i].r;
    }
    CHECK(bg_engine_submit_many(fx.e, rs, n) == 0);
    CHECK(wait_done(&coll, n, 20)); /* without the flag: stuck forever */
    for (size_t i = 0; i < n; i++)
        expect_ok_text(&v[i]);
    CHECK(v[0].r.attempts == 3);
    CHECK(bg_sem_value(fx.count) == 0); /* nothing taken, nothing given back */
    CHECK(bg_sem_release(fx.count, 2) == 0);
    fx_close(&fx);
    free_items(v, n);
}

int main(int argc, char **argv)
{
    static const test_case tests[] = {
        {"token_budget", test_token_budget},
        {"tokenize", test_tokenize},
        {"cancel_half", test_cancel_half},
        {"cancel_group", test_cancel_group},
        {"close_in_flight", test_close_in_flight},
        {"flush_rounds", test_flush_rounds},
        {"flush_deferred", test_flush_deferred},
        {"shared_semaphore", test_shared_semaphore},
        {"count_preheld", test_count_preheld},
        {"multi_error", test_multi_error},
        {"config_rejects", test_config_rejects},
        {"sem_overflow", test_sem_overflow},
    };
    return run_tests("test_http_limits", tests, sizeof(tests) / sizeof(tests[0]), argc, argv);
}
