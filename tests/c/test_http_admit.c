/* test_http_admit.c - closed-loop admission inside the engine: completions go
 * to tests/fake_vllm.py (a child process), /metrics to a small server thread
 * here whose answers the test switches (vLLM text, HTTP 500). Checks that the
 * engine scrapes, learns, holds new requests while metrics are stale, and
 * that close and cancel reach requests still in the admission queue.
 * Usage: test_http_admit [path/to/fake_vllm.py]
 */
#define _GNU_SOURCE
#include "http_fixture.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- metrics server thread ------------------------------------------ */

static int msock;
static char metrics_url[64];
static atomic_int metrics_mode; /* 0: vLLM text, 1: HTTP 500 */
static atomic_int metrics_stop;
static atomic_long metrics_hits;
static pthread_t metrics_thread;

static const char METRICS[] =
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"fake\"} 0.1\n"
    "vllm:num_requests_running{engine=\"0\",model_name=\"fake\"} 1.0\n"
    "vllm:num_requests_waiting{engine=\"0\",model_name=\"fake\"} 0.0\n"
    "vllm:num_preemptions_total{engine=\"0\",model_name=\"fake\"} 0.0\n"
    "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"256\"} 1.0\n";

static void *metrics_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&metrics_stop)) {
        struct pollfd p = {msock, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0)
            continue;
        int c = accept(msock, NULL, NULL);
        if (c < 0)
            continue;
        char req[4096];
        size_t n = 0;
        while (n < sizeof(req) - 1) {
            ssize_t k = recv(c, req + n, sizeof(req) - 1 - n, 0);
            if (k <= 0)
                break;
            n += (size_t)k;
            req[n] = '\0';
            if (strstr(req, "\r\n\r\n"))
                break;
        }
        atomic_fetch_add(&metrics_hits, 1);
        char head[256];
        const char *body = atomic_load(&metrics_mode) == 0 ? METRICS : "boom\n";
        int hl = snprintf(head, sizeof(head),
                          "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                          "Connection: close\r\n\r\n",
                          atomic_load(&metrics_mode) == 0 ? "200 OK" : "500 Error",
                          strlen(body));
        if (send(c, head, (size_t)hl, MSG_NOSIGNAL) == hl)
            (void)send(c, body, strlen(body), MSG_NOSIGNAL);
        close(c);
    }
    return NULL;
}

static void start_metrics(void)
{
    msock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    if (bind(msock, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(msock, 64) != 0 ||
        getsockname(msock, (struct sockaddr *)&a, &al) != 0) {
        perror("metrics server");
        exit(2);
    }
    snprintf(metrics_url, sizeof(metrics_url), "http://127.0.0.1:%d/metrics", ntohs(a.sin_port));
    pthread_create(&metrics_thread, NULL, metrics_main, NULL);
}

static void stop_metrics(void)
{
    atomic_store(&metrics_stop, 1);
    pthread_join(metrics_thread, NULL);
    close(msock);
}

/* ---- completions ---------------------------------------------------- */

typedef struct {
    bg_request r;
    bg_str prompt;
    char text[64];
    int seen;
} admit_item;

typedef struct {
    bg_engine *e;
    bg_sem *count, *tokens;
    bg_tmpl *tmpl;
} admit_fx;

static void admit_open(admit_fx *fx)
{
    char err[256];
    memset(fx, 0, sizeof(*fx));
    fx->count = bg_sem_create(16, 16);
    fx->tokens = bg_sem_create(256, 256);
    fx->tmpl = bg_tmpl_new("fake", "{\"max_tokens\":100}", 18, err, sizeof(err));
    bg_admit_params p;
    bg_admit_params_defaults(&p);
    p.stale_s = 0.5;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    bg_admit *a = bg_admit_new(&p, 256, 16, 2048, (double)ts.tv_sec + ts.tv_nsec / 1e9);
    bg_admit_stats st;
    bg_admit_get_stats(a, &st);
    CHECK(bg_sem_set_capacity(fx->tokens, st.limit) == 0);
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.base_url = base_url;
    c.count_sem = fx->count;
    c.token_sem = fx->tokens;
    c.token_cap = 256;
    c.admit = a;
    c.metrics_url = metrics_url;
    c.metrics_interval_ms = 50;
    c.max_retries = 0;
    fx->e = engine_on_collector(&c);
    coll_reset();
}

static void admit_close(admit_fx *fx)
{
    bg_engine_destroy(fx->e);
    bg_sem_decref(fx->count);
    bg_sem_decref(fx->tokens);
    bg_tmpl_decref(fx->tmpl);
}

static admit_item *admit_items(admit_fx *fx, size_t n)
{
    admit_item *v = calloc(n, sizeof(*v));
    for (size_t i = 0; i < n; i++) {
        snprintf(v[i].text, sizeof(v[i].text), "prompt %zu", i);
        v[i].prompt.ptr = v[i].text;
        v[i].prompt.len = strlen(v[i].text);
        v[i].r.id = i + 1;
        v[i].r.tmpl = fx->tmpl;
        v[i].r.prompts = &v[i].prompt;
        v[i].r.n_prompts = 1;
        v[i].r.prompt_est = 50;
        v[i].r.max_tokens = 100;
        v[i].r.user = &v[i].seen;
    }
    return v;
}

static void admit_free(admit_item *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        bg_request_clear(&v[i].r);
    free(v);
}

static bool wait_stale(bg_engine *e, bool want, double timeout_s)
{
    bg_engine_admit_info in;
    for (double t = 0; t < timeout_s; t += 0.02) {
        if (bg_engine_admit_info_get(e, &in) && in.ctl.stale == want)
            return true;
        sleep_s(0.02);
    }
    return false;
}

static void test_scrape_and_learn(void)
{
    admit_fx fx;
    admit_open(&fx);
    const size_t n = 200;
    admit_item *v = admit_items(&fx, n);
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    CHECK(wait_done(&coll, n, 60));
    CHECK(coll.dup == 0);
    for (size_t i = 0; i < n; i++)
        CHECK(v[i].r.kind == BG_RES_OK);
    sleep_s(0.2);
    bg_engine_admit_info in;
    CHECK(bg_engine_admit_info_get(fx.e, &in));
    CHECK(in.scrapes_ok > 0 && in.ctl.samples > 0);
    CHECK(in.ctl.finished_seqs == n && in.ctl.learned);
    CHECK(in.ctl.reserve_out > 0 && in.ctl.reserve_out < 100); /* echo answers are short */
    CHECK(in.held_blocks == 0);
    CHECK(in.ctl.kv_usage == 0.1);
    bg_admit_event ev[8];
    (void)bg_engine_admit_events(fx.e, ev, 8);
    admit_close(&fx);
    admit_free(v, n);
}

static void test_stale_holds_then_resumes(void)
{
    admit_fx fx;
    admit_open(&fx);
    CHECK(wait_stale(fx.e, false, 2));
    atomic_store(&metrics_mode, 1);
    CHECK(wait_stale(fx.e, true, 5));
    admit_item *v = admit_items(&fx, 3);
    for (size_t i = 0; i < 3; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    sleep_s(0.5);
    CHECK(coll_done() == 0); /* nothing admitted while the metrics are stale */
    bg_engine_admit_info in;
    CHECK(bg_engine_admit_info_get(fx.e, &in));
    CHECK(in.scrapes_failed > 0 && strstr(in.last_error, "500") != NULL);
    atomic_store(&metrics_mode, 0);
    CHECK(wait_done(&coll, 3, 10));
    for (size_t i = 0; i < 3; i++)
        CHECK(v[i].r.kind == BG_RES_OK);
    bg_admit_event ev[16];
    size_t k = bg_engine_admit_events(fx.e, ev, 16);
    bool stale = false, fresh = false;
    for (size_t i = 0; i < k; i++) {
        stale |= ev[i].reason == BG_ADMIT_STALE;
        fresh |= ev[i].reason == BG_ADMIT_FRESH;
    }
    CHECK(stale && fresh);
    admit_close(&fx);
    admit_free(v, 3);
}

/* Requests still in the admission queue: cancel reaches one, close the rest. */
static void test_cancel_and_close_queued(void)
{
    admit_fx fx;
    admit_open(&fx);
    atomic_store(&metrics_mode, 1);
    CHECK(wait_stale(fx.e, true, 5));
    const size_t n = 20;
    admit_item *v = admit_items(&fx, n);
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    sleep_s(0.1);
    bg_engine_cancel(fx.e, v[0].r.id); /* the one waiting on the semaphore */
    bg_engine_cancel(fx.e, v[7].r.id); /* one in the admission queue */
    CHECK(wait_done(&coll, 2, 5));
    CHECK(v[0].r.kind == BG_RES_CANCELLED && v[7].r.kind == BG_RES_CANCELLED);
    bg_engine_close(fx.e);
    CHECK(coll_done() == n && coll.dup == 0);
    for (size_t i = 1; i < n; i++)
        if (i != 7)
            CHECK(v[i].r.kind == BG_RES_CLOSED);
    atomic_store(&metrics_mode, 0);
    admit_close(&fx);
    admit_free(v, n);
}

int main(int argc, char **argv)
{
    static const test_case tests[] = {
        {"scrape_and_learn", test_scrape_and_learn},
        {"stale_holds_then_resumes", test_stale_holds_then_resumes},
        {"cancel_and_close_queued", test_cancel_and_close_queued},
    };
    start_metrics();
    int rc = run_tests("test_http_admit", tests, sizeof(tests) / sizeof(tests[0]), argc, argv);
    stop_metrics();
    return rc;
}
