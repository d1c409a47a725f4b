/* http_fixture.c - shared set-up of the engine tests (see http_fixture.h). */
#define _GNU_SOURCE
#include "http_fixture.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* ---- fake server process ------------------------------------------- */

static pid_t server_pid;
int server_port;
char base_url[64];

void start_server(const char *script)
{
    int fds[2];
    if (pipe(fds) != 0) {
        perror("pipe");
        exit(2);
    }
    server_pid = fork();
    if (server_pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execlp("python3", "python3", script, "--port", "0", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[128];
    if (!f || !fgets(line, sizeof(line), f) || sscanf(line, "PORT %d", &server_port) != 1) {
        fprintf(stderr, "fake server did not start\n");
        kill(server_pid, SIGTERM);
        exit(2);
    }
    fclose(f);
    snprintf(base_url, sizeof(base_url), "http://127.0.0.1:%d/v1", server_port);
}

void stop_server(void)
{
    if (server_pid > 0) {
        kill(server_pid, SIGTERM);
        waitpid(server_pid, NULL, 0);
    }
}

/* Blocking helper requests to the control endpoints. */
static size_t collect(char *d, size_t s, size_t n, void *u)
{
    bg_buf *b = u;
    return bg_buf_append(b, d, s * n) == 0 ? s * n : 0;
}

char *control(const char *path, bool post)
{
    char url[128];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", server_port, path);
    bg_buf b = {0};
    CURL *h = curl_easy_init();
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    if (post)
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
    CURLcode rc = curl_easy_perform(h);
    curl_easy_cleanup(h);
    if (rc != CURLE_OK) {
        bg_buf_free(&b);
        return NULL;
    }
    return b.data;
}

void reset_server(void)
{
    free(control("/_reset", true));
}

long stat_int(const char *name)
{
    char *s = control("/_stats", false);
    cJSON *j = s ? bg_json_parse(s, strlen(s), NULL) : NULL;
    const cJSON *v = cJSON_GetObjectItem(j, name);
    long out = cJSON_IsNumber(v) ? (long)v->valuedouble : -1;
    cJSON_Delete(j);
    free(s);
    return out;
}

void on_done(bg_request *r, void *ctx)
{
    collector *c = ctx;
    int *seen = r->user;
    pthread_mutex_lock(&c->mu);
    if (seen && (*seen)++ > 0)
        c->dup++;
    c->done++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

bool wait_done(collector *c, size_t n, double timeout_s)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += (time_t)timeout_s;
    pthread_mutex_lock(&c->mu);
    while (c->done < n) {
        if (pthread_cond_timedwait(&c->cv, &c->mu, &dl) != 0)
            break;
    }
    bool ok = c->done >= n;
    pthread_mutex_unlock(&c->mu);
    return ok;
}

collector coll = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

size_t coll_done(void)
{
    pthread_mutex_lock(&coll.mu);
    size_t n = coll.done;
    pthread_mutex_unlock(&coll.mu);
    return n;
}

void coll_reset(void)
{
    pthread_mutex_lock(&coll.mu);
    coll.done = coll.dup = 0;
    pthread_mutex_unlock(&coll.mu);
}

/* ---- engine fixture ------------------------------------------------ */

bg_engine *engine_on_collector(bg_engine_config *c)
{
    char err[256];
    if (!c->base_url)
        c->base_url = base_url;
    c->on_done = on_done;
    c->done_ctx = &coll;
    bg_engine *e = bg_engine_create(c, err, sizeof(err));
    if (!e) {
        fprintf(stderr, "engine: %s\n", err);
        exit(2);
    }
    return e;
}

void fx_open(fixture *fx, int64_t cap, bg_engine_config *over, const char *extra)
{
    memset(fx, 0, sizeof(*fx));
    char err[256];
    fx->cap = cap;
    fx->count = bg_sem_create(cap, cap);
    bg_engine_config c;
    if (over) {
        c = *over;
    } else {
        bg_engine_config_defaults(&c);
        c.backoff_base_s = 0.01;
        c.backoff_max_s = 0.05;
    }
    c.base_url = base_url;
    c.count_sem = fx->count;
    fx->e = engine_on_collector(&c);
    fx->tmpl = bg_tmpl_new("fake-model", extra, extra ? strlen(extra) : 0, err, sizeof(err));
    if (!fx->tmpl) {
        fprintf(stderr, "tmpl: %s\n", err);
        exit(2);
    }
    coll_reset();
    reset_server();
}

void fx_close(fixture *fx)
{
    bg_engine_destroy(fx->e);
    /* Every permit is back once the engine is gone. */
    CHECK(bg_sem_value(fx->count) == fx->cap);
    CHECK(bg_sem_queued(fx->count) == 0);
    bg_sem_decref(fx->count);
    if (fx->tokens)
        bg_sem_decref(fx->tokens);
    bg_tmpl_decref(fx->tmpl);
}

item *make_items(fixture *fx, size_t n, const char *fmt)
{
    item *v = calloc(n, sizeof(item));
    for (size_t i = 0; i < n; i++) {
        snprintf(v[i].text, sizeof(v[i].text), fmt, (int)i);
        v[i].p.ptr = v[i].text;
        v[i].p.len = strlen(v[i].text);
        v[i].r.id = i + 1;
        v[i].r.endpoint = BG_EP_COMPLETIONS;
        v[i].r.tmpl = fx->tmpl;
        v[i].r.prompts = &v[i].p;
        v[i].r.n_prompts = 1;
        v[i].r.user = &v[i].seen;
        v[i].r.token_weight = 1;
    }
    return v;
}

void free_items(item *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        bg_request_clear(&v[i].r);
    free(v);
}

/* Submit one prompt and wait for it. */
item *run_one(fixture *fx, const char *prompt)
{
    item *it = make_items(fx, 1, "%d");
    snprintf(it->text, sizeof(it->text), "%s", prompt);
    it->p.len = strlen(it->text);
    size_t before = coll.done;
    CHECK(bg_engine_submit(fx->e, &it->r) == 0);
    CHECK(wait_done(&coll, before + 1, 30));
    CHECK(it->seen == 1);
    return it;
}

void expect_ok_text(item *it)
{
    char want[200];
    snprintf(want, sizeof(want), "echo:%s", it->text);
    CHECK(it->r.kind == BG_RES_OK);
    if (it->r.kind != BG_RES_OK) {
        fprintf(stderr, "  %s: kind=%s msg=%s\n", it->text, bg_result_kind_name(it->r.kind),
                it->r.message ? it->r.message : "");
        return;
    }
    CHECK(it->r.resp.n_choices == 1 && strcmp(it->r.resp.choices[0].text, want) == 0);
}

/* ---- runner ------------------------------------------------------------ */

int run_tests(const char *prog, const test_case *tests, size_t n, int argc, char **argv)
{
    const char *script = argc > 1 ? argv[1] : "../fake_vllm.py";
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    start_server(script);
    const char *only = getenv("TEST_ONLY");
    for (size_t i = 0; i < n; i++) {
        if (only && !strstr(tests[i].name, only))
            continue;
        int before = failures;
        double t0 = now_s();
        tests[i].fn();
        printf("%s %s (%.2fs)\n", failures == before ? "ok  " : "FAIL", tests[i].name,
               now_s() - t0);
        fflush(stdout);
    }
    stop_server();
    curl_global_cleanup();
    if (failures) {
        fprintf(stderr, "%s: %d failure(s)\n", prog, failures);
        return 1;
    }
    printf("%s: ok\n", prog);
    return 0;
}
