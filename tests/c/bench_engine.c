/* bench_engine.c - engine throughput without Python: N completions requests
 * through bg_engine at concurrency C against a URL (e.g. the benchmark's nginx).
 * Usage: bench_engine BASE_URL [N] [C] */
#define _GNU_SOURCE
#include "bg_http.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static size_t done, failed, total;

static void on_done(bg_request *r, void *ctx)
{
    (void)ctx;
    pthread_mutex_lock(&mu);
    done++;
    if (r->kind != BG_RES_OK && failed++ == 0)
        fprintf(stderr, "first failure: %s %s\n", bg_result_kind_name(r->kind),
                r->message ? r->message : "");
    if (done == total)
        pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s BASE_URL [N] [C]\n", argv[0]);
        return 2;
    }
    size_t n = argc > 2 ? (size_t)atol(argv[2]) : 20000;
    int c = argc > 3 ? atoi(argv[3]) : 20;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    bg_sem *sem = bg_sem_create(c, c);
    bg_engine_config cfg;
    bg_engine_config_defaults(&cfg);
    cfg.base_url = argv[1];
    cfg.api_key = "dummy";
    cfg.count_sem = sem;
    cfg.on_done = on_done;
    char err[256];
    bg_engine *e = bg_engine_create(&cfg, err, sizeof(err));
    if (!e) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    const char *extra = "{\"max_tokens\":16,\"temperature\":0}";
    bg_tmpl *t = bg_tmpl_new("bench-model", extra, strlen(extra), err, sizeof(err));
    bg_request *rs = calloc(n, sizeof(*rs));
    bg_str *ps = calloc(n, sizeof(*ps));
    char (*texts)[128] = calloc(n, 128);
    bg_request **ptrs = calloc(n, sizeof(*ptrs));
    for (size_t i = 0; i < n; i++) {
        snprintf(texts[i], 128, "Review %zu: The product arrived on time and works as described. "
                 "Summarise the sentiment.", i);
        ps[i].ptr = texts[i];
        ps[i].len = strlen(texts[i]);
        rs[i].id = i + 1;
        rs[i].tmpl = t;
        rs[i].prompts = &ps[i];
        rs[i].n_prompts = 1;
        ptrs[i] = &rs[i];
    }
    struct rusage u0, u1;
    getrusage(RUSAGE_SELF, &u0);
    double t0 = now_s();
    total = n;
    bg_engine_submit_many(e, ptrs, n);
    pthread_mutex_lock(&mu);
    while (done < n)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    double dt = now_s() - t0;
    getrusage(RUSAGE_SELF, &u1);
    double cpu = (u1.ru_utime.tv_sec - u0.ru_utime.tv_sec) + (u1.ru_stime.tv_sec - u0.ru_stime.tv_sec) +
                 ((u1.ru_utime.tv_usec - u0.ru_utime.tv_usec) + (u1.ru_stime.tv_usec - u0.ru_stime.tv_usec)) / 1e6;
    printf("engine c=%d n=%zu: %.0f req/s, %.3f CPU-s/10k, failed=%zu\n", c, n, n / dt,
           cpu / n * 10000, failed);
    for (size_t i = 0; i < n; i++)
        bg_request_clear(&rs[i]);
    bg_engine_destroy(e);
    bg_tmpl_decref(t);
    bg_sem_decref(sem);
    free(rs);
    free(ps);
    free(texts);
    free(ptrs);
    curl_global_cleanup();
    return failed ? 1 : 0;
}
