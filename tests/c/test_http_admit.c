/* test_http_admit.c - closed-loop admission inside the engine: completions go
 * to tests/fake_vllm.py (a child process), /metrics to a small server thread
 * here whose answers the test switches (vLLM text, HTTP 500). Checks that the
 * engine scrapes, learns, holds new requests while metrics are stale, and
 * that close and cancel reach requests still in the admission queue.
 * Usage: test_http_admit [path/to/fake_vllm.py]
 */
#define _GNU_SOURCE
#include "bg_http.h"
#include "check.h"

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

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* ---- fake_vllm child (completions) ---------------------------------- */

static pid_t vllm_pid;
static char base_url[64];

static void start_vllm(const char *script)
{
    int fds[2];
    if (pipe(fds) != 0)
        exit(2);
    vllm_pid = fork();
    if (vllm_pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execlp("python3", "python3", script, "--port", "0", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[128];
    int port;
    if (!f || !fgets(line, sizeof(line), f) || sscanf(line, "PORT %d", &port) != 1) {
        fprintf(stderr, "fake server did not start\n");
        kill(vllm_pid, SIGTERM);
        exit(2);
    }
    fclose(f);
    snprintf(base_url, sizeof(base_url), "http://127.0.0.1:%d/v1", port);
}

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
} item;

static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static size_t ndone, ndup;

static void on_done(bg_request *r, void *ctx)
{
    (void)ctx;
    item *it = r->user;
    pthread_mutex_lock(&done_mu);
    if (it->seen++)
        ndup++;
    ndone++;
    pthread_cond_broadcast(&done_cv);
    pthread_mutex_unlock(&done_mu);
}

static size_t done_count(void)
{
    pthread_mutex_lock(&done_mu);
    size_t n = ndone;
    pthread_mutex_unlock(&done_mu);
    return n;
}

static bool wait_done(size_t n, double timeout_s)
{
    for (double t = 0; t < timeout_s; t += 0.01) {
        if (done_count() >= n)
            return true;
        sleep_s(0.01);
    }
    return done_count() >= n;
}

typedef struct {
    bg_engine *e;
    bg_sem *count, *tokens;
    bg_tmpl *tmpl;
} fixture;

static void fx_open(fixture *fx)
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
    c.on_done = on_done;
    c.admit = a;
    c.metrics_url = metrics_url;
    c.metrics_interval_ms = 50;
    c.max_retries = 0;
    fx->e = bg_engine_create(&c, err, sizeof(err));
    if (!fx->e) {
        fprintf(stderr, "engine: %s\n", err);
        exit(2);
    }
    pthread_mutex_lock(&done_mu);
    ndone = ndup = 0;
    pthread_mutex_unlock(&done_mu);
}

static void fx_close(fixture *fx)
{
    bg_engine_destroy(fx->e);
    bg_sem_decref(fx->count);
    bg_sem_decref(fx->tokens);
    bg_tmpl_decref(fx->tmpl);
}

static item *make_items(fixture *fx, size_t n)
{
    item *v = calloc(n, sizeof(*v));
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
        v[i].r.user = &v[i];
    }
    return v;
}

static void free_items(item *v, size_t n)
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
    fixture fx;
    fx_open(&fx);
    const size_t n = 200;
    item *v = make_items(&fx, n);
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    CHECK(wait_done(n, 60));
    CHECK(ndup == 0);
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
    fx_close(&fx);
    free_items(v, n);
}

static void test_stale_holds_then_resumes(void)
{
    fixture fx;
    fx_open(&fx);
    CHECK(wait_stale(fx.e, false, 2));
    atomic_store(&metrics_mode, 1);
    CHECK(wait_stale(fx.e, true, 5));
    item *v = make_items(&fx, 3);
    for (size_t i = 0; i < 3; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    sleep_s(0.5);
    CHECK(done_count() == 0); /* nothing admitted while the metrics are stale */
    bg_engine_admit_info in;
    CHECK(bg_engine_admit_info_get(fx.e, &in));
    CHECK(in.scrapes_failed > 0 && strstr(in.last_error, "500") != NULL);
    atomic_store(&metrics_mode, 0);
    CHECK(wait_done(3, 10));
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
    fx_close(&fx);
    free_items(v, 3);
}

/* Requests still in the admission queue: cancel reaches one, close the rest. */
static void test_cancel_and_close_queued(void)
{
    fixture fx;
    fx_open(&fx);
    atomic_store(&metrics_mode, 1);
    CHECK(wait_stale(fx.e, true, 5));
    const size_t n = 20;
    item *v = make_items(&fx, n);
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    sleep_s(0.1);
    bg_engine_cancel(fx.e, v[0].r.id); /* the one waiting on the semaphore */
    bg_engine_cancel(fx.e, v[7].r.id); /* one in the admission queue */
    CHECK(wait_done(2, 5));
    CHECK(v[0].r.kind == BG_RES_CANCELLED && v[7].r.kind == BG_RES_CANCELLED);
    bg_engine_close(fx.e);
    CHECK(done_count() == n && ndup == 0);
    for (size_t i = 1; i < n; i++)
        if (i != 7)
            CHECK(v[i].r.kind == BG_RES_CLOSED);
    atomic_store(&metrics_mode, 0);
    fx_close(&fx);
    free_items(v, n);
}

int main(int argc, char **argv)
{
    const char *script = argc > 1 ? argv[1] : "../fake_vllm.py";
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    start_vllm(script);
    start_metrics();
    test_scrape_and_learn();
    test_stale_holds_then_resumes();
    test_cancel_and_close_queued();
    stop_metrics();
    kill(vllm_pid, SIGTERM);
    waitpid(vllm_pid, NULL, 0);
    curl_global_cleanup();
    if (failures) {
        fprintf(stderr, "test_http_admit: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_http_admit: ok\n");
    return 0;
}
