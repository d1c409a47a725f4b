/* test_http.c - the libcurl engine (bg_http) against tests/fake_vllm.py.
 *
 * Starts the fake server as a child process on a free loopback port, then
 * drives the engine through success, retries, errors, cancellation, token
 * budgets and close. Usage: test_http [path/to/fake_vllm.py]
 */
#define _GNU_SOURCE
#include "bg_http.h"
#include "check.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- fake server process ------------------------------------------- */

static pid_t server_pid;
static int server_port;
static char base_url[64];

static void start_server(const char *script)
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

static void stop_server(void)
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

static char *control(const char *path, bool post)
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

static void reset_server(void)
{
    free(control("/_reset", true));
}

static long stat_int(const char *name)
{
    char *s = control("/_stats", false);
    cJSON *j = s ? bg_json_parse(s, strlen(s), NULL) : NULL;
    const cJSON *v = cJSON_GetObjectItem(j, name);
    long out = cJSON_IsNumber(v) ? (long)v->valuedouble : -1;
    cJSON_Delete(j);
    free(s);
    return out;
}

/* ---- completion collector ------------------------------------------ */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t done;
    size_t dup; /* a request completed twice */
} collector;

static void on_done(bg_request *r, void *ctx)
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

static bool wait_done(collector *c, size_t n, double timeout_s)
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

static collector coll = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

static void coll_reset(void)
{
    pthread_mutex_lock(&coll.mu);
    coll.done = coll.dup = 0;
    pthread_mutex_unlock(&coll.mu);
}

/* ---- engine fixture ------------------------------------------------ */

typedef struct {
    bg_engine *e;
    bg_sem *count, *tokens;
    bg_tmpl *tmpl;
    int64_t cap;
} fixture;

static void fx_open(fixture *fx, int64_t cap, bg_engine_config *over, const char *extra)
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
    c.on_done = on_done;
    c.done_ctx = &coll;
    fx->e = bg_engine_create(&c, err, sizeof(err));
    if (!fx->e) {
        fprintf(stderr, "engine: %s\n", err);
        exit(2);
    }
    fx->tmpl = bg_tmpl_new("fake-model", extra, extra ? strlen(extra) : 0, err, sizeof(err));
    if (!fx->tmpl) {
        fprintf(stderr, "tmpl: %s\n", err);
        exit(2);
    }
    coll_reset();
    reset_server();
}

static void fx_close(fixture *fx)
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

typedef struct {
    bg_request r;
    bg_str p;
    char text[160];
    int seen;
} item;

static item *make_items(fixture *fx, size_t n, const char *fmt)
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

static void free_items(item *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        bg_request_clear(&v[i].r);
    free(v);
}

/* Submit one prompt and wait for it. */
static item *run_one(fixture *fx, const char *prompt)
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

static void expect_ok_text(item *it)
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

/* ---- tests ------------------------------------------------------------ */

static void test_many_ok_and_cap(void)
{
    fixture fx;
    fx_open(&fx, 8, NULL, "{\"max_tokens\":8,\"temperature\":0}");
    const size_t n = 600;
    item *v = make_items(&fx, n, "prompt %d [[delay=0.005]]");
    bg_request **rs = malloc(n * sizeof(*rs));
    for (size_t i = 0; i < n; i++)
        rs[i] = &v[i].r;
    double t0 = now_s();
    CHECK(bg_engine_submit_many(fx.e, rs, n) == 0);
    CHECK(wait_done(&coll, n, 60));
    double dt = now_s() - t0;
    CHECK(coll.dup == 0);
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].seen == 1);
        expect_ok_text(&v[i]);
        CHECK(v[i].r.attempts == 1);
        CHECK(v[i].r.resp.usage.present && v[i].r.resp.usage.total_tokens > 0);
    }
    long maxc = stat_int("max_in_flight");
    long conns = stat_int("connections");
    printf("  %zu requests in %.2fs, server max_in_flight=%ld connections=%ld\n", n, dt, maxc,
           conns);
    CHECK(maxc >= 2 && maxc <= 8);
    CHECK(conns <= 8 + 2); /* keep-alive reuse (+2: the two stats requests) */
    bg_engine_stats st;
    bg_engine_get_stats(fx.e, &st);
    CHECK(st.submitted == n && st.completed == n && st.live == 0 && st.in_flight == 0);
    free(rs);
    fx_close(&fx);
    free_items(v, n);
}

static void test_list_and_chat(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    item *it = make_items(&fx, 1, "x");
    bg_str ps[3] = {{"alpha", 5}, {"beta", 4}, {"gamma", 5}};
    it->r.prompts = ps;
    it->r.n_prompts = 3;
    CHECK(bg_engine_submit(fx.e, &it->r) == 0);
    CHECK(wait_done(&coll, 1, 20));
    CHECK(it->r.kind == BG_RES_OK && it->r.resp.n_choices == 3);
    if (it->r.resp.n_choices == 3) {
        /* The fake answers in reverse order; choices come back by index. */
        CHECK(strcmp(it->r.resp.choices[0].text, "echo:alpha") == 0);
        CHECK(strcmp(it->r.resp.choices[2].text, "echo:gamma") == 0);
    }
    free_items(it, 1);

    it = make_items(&fx, 1, "x");
    const char *msgs = "[{\"role\":\"system\",\"content\":\"be brief\"},"
                       "{\"role\":\"user\",\"content\":\"hello\"}]";
    it->r.endpoint = BG_EP_CHAT;
    it->r.messages_json = msgs;
    it->r.messages_len = strlen(msgs);
    CHECK(bg_engine_submit(fx.e, &it->r) == 0);
    CHECK(wait_done(&coll, 2, 20));
    CHECK(it->r.kind == BG_RES_OK && it->r.resp.n_choices == 1 &&
          strcmp(it->r.resp.choices[0].text, "echo:hello") == 0);
    free_items(it, 1);
    fx_close(&fx);
}

static void test_retryable_statuses(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    static const int codes[] = {408, 429, 500, 502, 503, 504};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        char p[100];
        snprintf(p, sizeof(p), "retry %d [[status=%d,times=2]]", codes[i], codes[i]);
        item *it = run_one(&fx, p);
        expect_ok_text(it);
        CHECK(it->r.attempts == 3);
        free_items(it, 1);
    }
    /* Retries exhausted: the last status and the server's message surface. */
    item *it = run_one(&fx, "always [[status=503,msg=engine sleeping]]");
    CHECK(it->r.kind == BG_RES_HTTP && it->r.status == 503 && it->r.attempts == 4);
    CHECK_CONTAINS(it->r.message, "engine sleeping");
    free_items(it, 1);
    /* 400 is final at once, with vLLM's message. */
    it = run_one(&fx, "long [[status=400,msg=maximum context length is 4096 tokens]]");
    CHECK(it->r.kind == BG_RES_HTTP && it->r.status == 400 && it->r.attempts == 1);
    CHECK_CONTAINS(it->r.message, "maximum context length is 4096 tokens");
    free_items(it, 1);
    it = run_one(&fx, "unauth [[status=401]]");
    CHECK(it->r.kind == BG_RES_HTTP && it->r.status == 401 && it->r.attempts == 1);
    free_items(it, 1);
    fx_close(&fx);
}

static void test_retry_after(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.backoff_base_s = 0.01;
    c.retry_after_max_s = 1.5;
    fx_open(&fx, 4, &c, NULL);
    double t0 = now_s();
    item *it = run_one(&fx, "ra [[status=429,retry_after=1,times=1]]");
    double dt = now_s() - t0;
    expect_ok_text(it);
    CHECK(it->r.attempts == 2 && dt >= 0.95 && dt < 5);
    free_items(it, 1);
    /* An HTTP date: at least one whole second ahead. */
    t0 = now_s();
    it = run_one(&fx, "rad [[status=503,retry_after_date=2,times=1]]");
    dt = now_s() - t0;
    expect_ok_text(it);
    CHECK(it->r.attempts == 2 && dt >= 0.9 && dt < 5);
    free_items(it, 1);
    /* Capped: the server asks for 100 s, the engine waits retry_after_max_s. */
    t0 = now_s();
    it = run_one(&fx, "racap [[status=503,retry_after=100,times=1]]");
    dt = now_s() - t0;
    expect_ok_text(it);
    CHECK(dt >= 1.4 && dt < 5);
    free_items(it, 1);
    fx_close(&fx);
}

/* With a cap of 1, a request backing off must not hold the only permit. */
static void test_permit_released_during_backoff(void)
{
    fixture fx;
    fx_open(&fx, 1, NULL, NULL);
    item *v = make_items(&fx, 2, "b%d");
    snprintf(v[0].text, sizeof(v[0].text), "slow [[status=503,retry_after=1,times=1]]");
    v[0].p.len = strlen(v[0].text);
    CHECK(bg_engine_submit(fx.e, &v[0].r) == 0);
    usleep(200 * 1000); /* A got its 503 and now waits ~1 s */
    double t0 = now_s();
    CHECK(bg_engine_submit(fx.e, &v[1].r) == 0);
    CHECK(wait_done(&coll, 1, 10));
    CHECK(now_s() - t0 < 0.5); /* B ran while A was backing off */
    CHECK(v[1].seen == 1 && v[0].seen == 0);
    CHECK(wait_done(&coll, 2, 10));
    expect_ok_text(&v[0]);
    expect_ok_text(&v[1]);
    CHECK(v[0].r.attempts == 2);
    fx_close(&fx);
    free_items(v, 2);
}

static void test_transport_faults(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    /* On a fresh engine (no pooled connection) each fault costs exactly one
     * retry of ours. */
    item *it = run_one(&fx, "c [[fault=close,times=1]]");
    expect_ok_text(it);
    CHECK(it->r.attempts == 2);
    free_items(it, 1);
    static const char *const once[] = {"a [[fault=reset,times=1]]", "b [[fault=truncate,times=1]]"};
    for (size_t i = 0; i < 2; i++) {
        it = run_one(&fx, once[i]);
        expect_ok_text(it);
        CHECK(it->r.attempts == 2);
        if (it->r.attempts != 2)
            fprintf(stderr, "  %s: attempts=%d\n", once[i], it->r.attempts);
        free_items(it, 1);
    }
    /* A reused keep-alive connection closed before any byte of the answer:
     * libcurl itself retries once on a new connection, so our attempt count
     * stays 1 while the server sees the request twice. */
    free_items(run_one(&fx, "warm"), 1);
    long before = stat_int("requests");
    it = run_one(&fx, "c2 [[fault=close,times=1]]");
    expect_ok_text(it);
    CHECK(it->r.attempts == 1 && stat_int("requests") - before == 2);
    free_items(it, 1);
    it = run_one(&fx, "d [[fault=reset]]");
    CHECK(it->r.kind == BG_RES_TRANSPORT && it->r.attempts == 4 && it->r.curl_code != 0);
    CHECK_CONTAINS(it->r.message, "curl error");
    free_items(it, 1);
    fx_close(&fx);

    /* Connection refused: a port nobody listens on. */
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.backoff_base_s = 0.01;
    c.max_retries = 1;
    int saved = server_port;
    char saved_url[64];
    memcpy(saved_url, base_url, sizeof(saved_url));
    snprintf(base_url, sizeof(base_url), "http://127.0.0.1:1/v1");
    fixture fx2;
    fx_open(&fx2, 2, &c, NULL);
    it = make_items(&fx2, 1, "refused");
    CHECK(bg_engine_submit(fx2.e, &it->r) == 0);
    CHECK(wait_done(&coll, 1, 20));
    CHECK(it->r.kind == BG_RES_TRANSPORT && it->r.attempts == 2 &&
          it->r.curl_code == CURLE_COULDNT_CONNECT);
    free_items(it, 1);
    fx_close(&fx2);
    memcpy(base_url, saved_url, sizeof(saved_url));
    server_port = saved;
}

static void test_malformed(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.backoff_base_s = 0.01;
    c.max_response_bytes = 1 << 20;
    c.timeout_ms = 1500; /* stalls time out; slow answers on a loaded box do not */
    fx_open(&fx, 4, &c, NULL);
    static const struct {
        const char *prompt;
        int kind;
        const char *needle;
    } cases[] = {
        {"[[fault=nonjson]]", BG_RES_MALFORMED, "not JSON"},
        {"[[shape=notobj]]", BG_RES_MALFORMED, "must be a JSON object"},
        {"[[shape=nochoices]]", BG_RES_MALFORMED, "no \"choices\""},
        {"[[shape=choices_obj]]", BG_RES_MALFORMED, "must be a list"},
        {"[[shape=text_int]]", BG_RES_MALFORMED, "[\"text\"] must be a string, got number"},
        {"[[shape=index_oob]]", BG_RES_MALFORMED, "out of range"},
        {"[[shape=index_str]]", BG_RES_MALFORMED, "must be an integer"},
        {"[[shape=fewer]]", BG_RES_MALFORMED, "0 choices, expected 1"},
        {"[[shape=extra]]", BG_RES_MALFORMED, "2 choices, expected 1"},
        {"[[shape=choice_str]]", BG_RES_MALFORMED, "must be an object"},
        {"[[shape=finish_int]]", BG_RES_MALFORMED, "finish_reason"},
        {"[[shape=usage_str]]", BG_RES_MALFORMED, "usage"},
        {"[[shape=error200]]", BG_RES_MALFORMED, "engine overloaded"},
        {"[[fault=oversize,size=3000000]]", BG_RES_MALFORMED, "max_response_bytes"},
        {"[[fault=stall]]", BG_RES_TIMEOUT, "timed out"},
        {"[[fault=stall_body]]", BG_RES_TIMEOUT, "timed out"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        coll_reset();
        item *it = run_one(&fx, cases[i].prompt);
        CHECK(it->r.kind == cases[i].kind);
        if (it->r.kind != cases[i].kind)
            fprintf(stderr, "  %s: kind=%s msg=%s\n", cases[i].prompt,
                    bg_result_kind_name(it->r.kind), it->r.message ? it->r.message : "");
        CHECK(it->r.attempts == 1);
        CHECK_CONTAINS(it->r.message, cases[i].needle);
        free_items(it, 1);
    }
    /* index_dup needs two prompts. */
    coll_reset();
    item *it = make_items(&fx, 1, "x");
    bg_str ps[2] = {{"p0 [[shape=index_dup]]", 22}, {"p1", 2}};
    it->r.prompts = ps;
    it->r.n_prompts = 2;
    CHECK(bg_engine_submit(fx.e, &it->r) == 0);
    CHECK(wait_done(&coll, 1, 20));
    CHECK(it->r.kind == BG_RES_MALFORMED);
    CHECK_CONTAINS(it->r.message, "repeats index");
    free_items(it, 1);
    fx_close(&fx);
}

static void test_headers_and_body_passthrough(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    const char *hdrs[] = {"X-Test: yes"};
    c.api_key = "sk-secret";
    c.headers = hdrs;
    c.n_headers = 1;
    fx_open(&fx, 2, &c,
            "{\"seed\":12345678901234567,\"guided_json\":{\"type\":\"object\"},"
            "\"response_format\":{\"type\":\"json_object\"},\"temperature\":0.25}");
    item *it = run_one(&fx, "hdr");
    expect_ok_text(it);
    free_items(it, 1);
    char *s = control("/_stats", false);
    CHECK_CONTAINS(s, "\"authorization\": \"Bearer sk-secret\"");
    CHECK_CONTAINS(s, "\"x-test\": \"yes\"");
    CHECK_CONTAINS(s, "\"seed\": 12345678901234567");
    CHECK_CONTAINS(s, "\"guided_json\": {\"type\": \"object\"}");
    CHECK_CONTAINS(s, "\"response_format\": {\"type\": \"json_object\"}");
    CHECK_CONTAINS(s, "\"model\": \"fake-model\"");
    free(s);
    fx_close(&fx);
}

/* Per-call options: retries, attempt timeout, replaced headers, query and
 * keeping the answer's bytes, on one engine alongside plain requests. */
static item *run_with(fixture *fx, const char *prompt, const bg_req_opts *o)
{
    item *it = make_items(fx, 1, "%d");
    snprintf(it->text, sizeof(it->text), "%s", prompt);
    it->p.len = strlen(it->text);
    it->r.opts = o;
    size_t before = coll.done;
    CHECK(bg_engine_submit(fx->e, &it->r) == 0);
    CHECK(wait_done(&coll, before + 1, 30));
    return it;
}

static void test_per_request_options(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.api_key = "sk-engine";
    c.max_retries = 3;
    c.backoff_base_s = 0.01;
    c.backoff_max_s = 0.02;
    c.timeout_ms = 30000;
    fx_open(&fx, 2, &c, NULL);
    char err[200];
    const char *hdrs[] = {"authorization: Bearer sk-call", "X-Call: 1"};
    bg_req_opts_spec sp = {.timeout_ms = 300, .max_retries = 0, .headers = hdrs,
                           .n_headers = 2, .keep_raw = true};
    bg_req_opts *o = bg_req_opts_new(fx.e, &sp, err, sizeof(err));
    CHECK(o != NULL);
    const char *bad[] = {"X-Bad: a\r\nX-Evil: b"};
    bg_req_opts_spec spb = {.timeout_ms = -1, .max_retries = -1, .headers = bad, .n_headers = 1};
    CHECK(bg_req_opts_new(fx.e, &spb, err, sizeof(err)) == NULL);
    bg_req_opts_spec spq = {.timeout_ms = -1, .max_retries = -1, .query = "a=1 2"};
    CHECK(bg_req_opts_new(fx.e, &spq, err, sizeof(err)) == NULL);

    item *it = run_with(&fx, "fail [[status=503]]", o);
    CHECK(it->r.kind == BG_RES_HTTP && it->r.attempts == 1); /* the call's 0 retries */
    free_items(it, 1);
    it = run_with(&fx, "fail2 [[status=503,times=2]]", NULL);
    CHECK(it->r.kind == BG_RES_OK && it->r.attempts == 3 && it->r.raw == NULL);
    CHECK(it->r.retry_status == 503 && it->r.retry_wait_s > 0);
    free_items(it, 1);
    double t0 = now_s();
    it = run_with(&fx, "slow [[delay=3]]", o);
    CHECK(it->r.kind == BG_RES_TIMEOUT && now_s() - t0 < 2.5);
    free_items(it, 1);
    it = run_with(&fx, "keep", o);
    expect_ok_text(it);
    CHECK(it->r.raw && it->r.raw_len == strlen(it->r.raw) && strstr(it->r.raw, "echo:keep"));
    free_items(it, 1);
    char *s = control("/_stats", false);
    CHECK_CONTAINS(s, "\"authorization\": \"Bearer sk-call\"");
    CHECK_CONTAINS(s, "\"x-call\": \"1\"");
    free(s);
    it = run_with(&fx, "plain", NULL);
    expect_ok_text(it);
    free_items(it, 1);
    s = control("/_stats", false);
    CHECK_CONTAINS(s, "\"authorization\": \"Bearer sk-engine\"");
    CHECK(strstr(s, "x-call") == NULL);
    free(s);
    fx_close(&fx);
    bg_req_opts_free(o);
}

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
    const char *script = argc > 1 ? argv[1] : "../fake_vllm.py";
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    start_server(script);
    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {
        {"many_ok_and_cap", test_many_ok_and_cap},
        {"list_and_chat", test_list_and_chat},
        {"retryable_statuses", test_retryable_statuses},
        {"retry_after", test_retry_after},
        {"permit_released_during_backoff", test_permit_released_during_backoff},
        {"transport_faults", test_transport_faults},
        {"malformed", test_malformed},
        {"headers_and_body_passthrough", test_headers_and_body_passthrough},
        {"per_request_options", test_per_request_options},
        {"token_budget", test_token_budget},
        {"tokenize", test_tokenize},
        {"cancel_half", test_cancel_half},
        {"cancel_group", test_cancel_group},
        {"close_in_flight", test_close_in_flight},
        {"shared_semaphore", test_shared_semaphore},
        {"count_preheld", test_count_preheld},
        {"multi_error", test_multi_error},
        {"config_rejects", test_config_rejects},
        {"sem_overflow", test_sem_overflow},
    };
    const char *only = getenv("TEST_ONLY");
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
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
        fprintf(stderr, "test_http: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_http: ok\n");
    return 0;
}
