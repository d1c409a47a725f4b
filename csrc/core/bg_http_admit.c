/* bg_http_admit.c - closed-loop admission inside the engine: the /metrics
 * scrape on the engine thread (its own easy handle on the engine's multi,
 * no GIL), the controller's inputs (samples, finished requests, 429/503) and
 * its output (the token semaphore's capacity); plus a blocking probe of a
 * server's metrics and /v1/models for callers deciding whether to use it. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup */
#endif
#include "bg_http_internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCRAPE_MAX_BYTES (16u << 20) /* vLLM's page is ~100 KB with histograms */
#define DEFAULT_INTERVAL_MS 100

static double secs(int64_t ns)
{
    return (double)ns / 1e9;
}

/* ---- a bounded response buffer, shared by the scrape and the probe ------ */

static size_t buf_write(char *data, size_t size, size_t nmemb, void *userp)
{
    bgh_buf *b = userp;
    size_t n = size * nmemb;
    if (b->len + n > SCRAPE_MAX_BYTES) {
        b->oversize = true;
        return 0;
    }
    if (b->cap - b->len <= n) {
        size_t nc = b->cap ? b->cap : 16384;
        while (nc - b->len <= n)
            nc *= 2;
        char *p = realloc(b->data, nc);
        if (!p)
            return 0;
        b->data = p;
        b->cap = nc;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

static void set_get_options(CURL *h, const char *url, struct curl_slist *headers,
                            bool verify_tls, long timeout_ms, char *errbuf)
{
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, buf_write);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, verify_tls ? 1L : 0L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, verify_tls ? 2L : 0L);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#endif
}

/* ---- engine side ---------------------------------------------------------- */

static long interval_ms(const bg_engine *e)
{
    return e->cfg.metrics_interval_ms > 0 ? e->cfg.metrics_interval_ms : DEFAULT_INTERVAL_MS;
}

int bgh_admit_init(bg_engine *e, char *err, size_t errlen)
{
    if (!e->cfg.admit)
        return 0;
    if (!e->cfg.token_sem || bg_sem_max_value(e->cfg.token_sem) < 1) {
        snprintf(err, errlen, "admission needs a bounded token semaphore");
        return -1;
    }
    if (!e->cfg.metrics_url || strncmp(e->cfg.metrics_url, "http", 4) != 0) {
        snprintf(err, errlen, "admission needs an http(s) metrics_url");
        return -1;
    }
    if (pthread_mutex_init(&e->admit_mu, NULL) != 0) {
        snprintf(err, errlen, "pthread_mutex_init failed");
        return -1;
    }
    e->admit_mu_init = true;
    e->metrics_url = strdup(e->cfg.metrics_url);
    e->metrics_model = e->cfg.metrics_model ? strdup(e->cfg.metrics_model) : NULL;
    e->scrape = curl_easy_init();
    if (!e->metrics_url || (e->cfg.metrics_model && !e->metrics_model) || !e->scrape) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    e->cfg.metrics_url = e->metrics_url;
    e->cfg.metrics_model = e->metrics_model;
    /* A scrape slower than the staleness bound is as good as none. */
    long timeout = 2000 > 4 * interval_ms(e) ? 2000 : 4 * interval_ms(e);
    set_get_options(e->scrape, e->metrics_url, e->headers, e->cfg.verify_tls, timeout,
                    e->scrape_errbuf);
    e->applied_cap = bg_sem_capacity(e->cfg.token_sem);
    e->next_scrape_ns = 0; /* at once */
    return 0;
}

void bgh_admit_cleanup(bg_engine *e)
{
    if (e->scrape) {
        if (e->scrape_busy)
            curl_multi_remove_handle(e->multi, e->scrape);
        curl_easy_cleanup(e->scrape);
        e->scrape = NULL;
    }
    free(e->scrape_body.data);
    memset(&e->scrape_body, 0, sizeof(e->scrape_body));
    free(e->metrics_url);
    free(e->metrics_model);
    e->metrics_url = e->metrics_model = NULL;
    bg_admit_free(e->cfg.admit);
    e->cfg.admit = NULL;
    if (e->admit_mu_init) {
        pthread_mutex_destroy(&e->admit_mu);
        e->admit_mu_init = false;
    }
}

static int64_t charge(bg_engine *e, const bg_request *r)
{
    int64_t n_prompts = r->endpoint == BG_EP_CHAT ? 1 : (int64_t)r->n_prompts;
    int64_t n = r->tmpl ? r->tmpl->n_per_prompt : 1;
    pthread_mutex_lock(&e->admit_mu);
    int64_t w = bg_admit_charge(e->cfg.admit, r->prompt_est, n_prompts, n, r->max_tokens);
    pthread_mutex_unlock(&e->admit_mu);
    int64_t max = bg_sem_max_value(e->cfg.token_sem);
    return w < 1 ? 1 : w > max ? max : w;
}

/* The queue only: bg_http_request.c moved r to BGR_WAIT_ADMIT. */
void bgh_admit_enqueue(bg_engine *e, bg_request *r)
{
    bgh_list_push(&e->admit_queue, r);
}

void bgh_admit_unqueue(bg_engine *e, bg_request *r)
{
    bgh_list_unlink(&e->admit_queue, r);
}

void bgh_admit_pump(bg_engine *e)
{
    if (!e->cfg.admit)
        return;
    /* One waiter at a time on the semaphore: the head is charged now; those
     * granted at once go on, and the loop stops at the first that waits. */
    while (!e->admit_waiting && e->admit_queue.head) {
        bg_request *r = e->admit_queue.head;
        bgh_list_unlink(&e->admit_queue, r);
        bgr_admitted(e, r, charge(e, r)); /* r may be gone after this */
    }
}

static int64_t held_blocks(bg_engine *e)
{
    int64_t h = bg_sem_capacity(e->cfg.token_sem) - bg_sem_value(e->cfg.token_sem);
    return h < 0 ? 0 : h;
}

/* Give the semaphore the controller's current limit. Engine thread; no lock
 * held, since raising the capacity grants waiters (on_grant takes e->mu). */
static void apply_limit(bg_engine *e, int64_t now_ns)
{
    pthread_mutex_lock(&e->admit_mu);
    int64_t cap = bg_admit_effective(e->cfg.admit, secs(now_ns));
    pthread_mutex_unlock(&e->admit_mu);
    int64_t max = bg_sem_max_value(e->cfg.token_sem);
    if (cap > max)
        cap = max;
    if (cap != e->applied_cap && bg_sem_set_capacity(e->cfg.token_sem, cap) == 0)
        e->applied_cap = cap;
}

int bgh_admit_tick(bg_engine *e)
{
    if (!e->cfg.admit)
        return 1000;
    int64_t now = bgh_now_ns();
    if (!e->scrape_busy && now >= e->next_scrape_ns) {
        e->scrape_body.len = 0;
        e->scrape_body.oversize = false;
        curl_easy_setopt(e->scrape, CURLOPT_WRITEDATA, &e->scrape_body);
        e->scrape_errbuf[0] = '\0';
        if (curl_multi_add_handle(e->multi, e->scrape) == CURLM_OK)
            e->scrape_busy = true;
        e->next_scrape_ns = now + (int64_t)interval_ms(e) * 1000000;
    }
    apply_limit(e, now);
    int64_t wait = (e->next_scrape_ns - now + 999999) / 1000000;
    return wait < 0 ? 0 : wait > 1000 ? 1000 : (int)wait;
}

bool bgh_admit_owns(const bg_engine *e, CURL *h)
{
    return e->scrape && h == e->scrape;
}

static void scrape_failed(bg_engine *e, const char *what, long status)
{
    pthread_mutex_lock(&e->admit_mu);
    e->scrapes_failed++;
    snprintf(e->scrape_last_error, sizeof(e->scrape_last_error), "%.120s (HTTP status %ld)",
             what, status);
    pthread_mutex_unlock(&e->admit_mu);
}

void bgh_admit_scrape_done(bg_engine *e, CURLcode code)
{
    long status = 0;
    curl_easy_getinfo(e->scrape, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(e->multi, e->scrape);
    e->scrape_busy = false;
    int64_t now = bgh_now_ns();
    if (code != CURLE_OK) {
        scrape_failed(e, e->scrape_body.oversize ? "answer too large"
                         : e->scrape_errbuf[0]     ? e->scrape_errbuf
                                                   : curl_easy_strerror(code),
                      status);
    } else if (status < 200 || status >= 300) {
        scrape_failed(e, "not a 2xx answer", status);
    } else {
        bg_prom_sample s;
        bg_prom_parse(e->scrape_body.data, e->scrape_body.len, e->metrics_model, &s);
        if (!(s.found & BG_PROM_KV_USAGE)) {
            scrape_failed(e, "no vllm:kv_cache_usage_perc in the answer", status);
        } else {
            int64_t held = held_blocks(e);
            pthread_mutex_lock(&e->admit_mu);
            e->scrapes_ok++;
            bg_admit_on_sample(e->cfg.admit, secs(now), &s, held);
            pthread_mutex_unlock(&e->admit_mu);
        }
    }
    apply_limit(e, now);
}

void bgh_admit_finished(bg_engine *e, const bg_request *r, int kind)
{
    if (!e->cfg.admit || kind != BG_RES_OK || !r->resp.usage.present)
        return;
    int64_t seqs = (int64_t)r->resp.n_choices;
    pthread_mutex_lock(&e->admit_mu);
    bg_admit_on_finish(e->cfg.admit, r->prompt_est, r->resp.usage.prompt_tokens,
                       r->resp.usage.completion_tokens, seqs);
    pthread_mutex_unlock(&e->admit_mu);
}

void bgh_admit_overload(bg_engine *e)
{
    if (!e->cfg.admit)
        return;
    int64_t now = bgh_now_ns();
    pthread_mutex_lock(&e->admit_mu);
    bg_admit_on_overload(e->cfg.admit, secs(now));
    pthread_mutex_unlock(&e->admit_mu);
    apply_limit(e, now);
}

bool bg_engine_admit_info_get(bg_engine *e, bg_engine_admit_info *out)
{
    memset(out, 0, sizeof(*out));
    if (!e->cfg.admit || !e->admit_mu_init)
        return false;
    out->held_blocks = held_blocks(e);
    pthread_mutex_lock(&e->admit_mu);
    bg_admit_get_stats(e->cfg.admit, &out->ctl);
    out->scrapes_ok = e->scrapes_ok;
    out->scrapes_failed = e->scrapes_failed;
    memcpy(out->last_error, e->scrape_last_error, sizeof(out->last_error));
    pthread_mutex_unlock(&e->admit_mu);
    return true;
}

size_t bg_engine_admit_events(bg_engine *e, bg_admit_event *out, size_t n)
{
    if (!e->cfg.admit || !e->admit_mu_init)
        return 0;
    pthread_mutex_lock(&e->admit_mu);
    size_t k = bg_admit_pop_events(e->cfg.admit, out, n);
    pthread_mutex_unlock(&e->admit_mu);
    return k;
}

/* ---- the probe -------------------------------------------------------------- */

static int http_get(const char *url, struct curl_slist *headers, bool verify_tls,
                    long timeout_ms, bgh_buf *b, char *err, size_t errlen)
{
    CURL *h = curl_easy_init();
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    char errbuf[CURL_ERROR_SIZE] = "";
    set_get_options(h, url, headers, verify_tls, timeout_ms, errbuf);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, b);
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    if (rc != CURLE_OK) {
        snprintf(err, errlen, "%s", b->oversize ? "answer too large"
                                    : errbuf[0] ? errbuf : curl_easy_strerror(rc));
        return -1;
    }
    if (status < 200 || status >= 300) {
        snprintf(err, errlen, "HTTP status %ld", status);
        return -1;
    }
    return 0;
}

/* max_model_len of the /v1/models entry named `model` (or the first). */
static void read_models(const char *body, size_t len, const char *model, bg_server_probe *out)
{
    cJSON *root = bg_json_parse(body, len, NULL);
    if (!root)
        return;
    cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
    cJSON *pick = NULL, *it;
    cJSON_ArrayForEach(it, data)
    {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        if (!pick)
            pick = it;
        if (model && model[0] && cJSON_IsString(id) && strcmp(id->valuestring, model) == 0) {
            pick = it;
            break;
        }
    }
    if (pick) {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(pick, "id");
        cJSON *mml = cJSON_GetObjectItemCaseSensitive(pick, "max_model_len");
        if (cJSON_IsString(id))
            snprintf(out->model_id, sizeof(out->model_id), "%s", id->valuestring);
        if (cJSON_IsNumber(mml) && mml->valuedouble >= 1 && mml->valuedouble < 1e12)
            out->max_model_len = (int64_t)mml->valuedouble;
    }
    cJSON_Delete(root);
}

int bg_probe_server(const char *metrics_url, const char *models_url, const char *api_key,
                    const char *const *headers, size_t n_headers, bool verify_tls,
                    long timeout_ms, const char *model, bg_server_probe *out, char *err,
                    size_t errlen)
{
    memset(out, 0, sizeof(*out));
    out->max_model_len = -1;
    out->metrics.num_gpu_blocks = out->metrics.block_size = -1;
    err[0] = '\0';
    struct curl_slist *sl = NULL, *tmp;
    int ret = -1;
    if (api_key && api_key[0]) {
        size_t kl = strlen(api_key);
        char *hdr = malloc(kl + 32);
        if (!hdr) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        snprintf(hdr, kl + 32, "Authorization: Bearer %s", api_key);
        tmp = curl_slist_append(sl, hdr);
        memset(hdr, 0, kl + 32);
        free(hdr);
        if (!tmp)
            goto oom;
        sl = tmp;
    }
    for (size_t i = 0; i < n_headers; i++) {
        if (!headers[i] || strpbrk(headers[i], "\r\n"))
            continue; /* checked by the caller; never let one through here */
        if (!(tmp = curl_slist_append(sl, headers[i])))
            goto oom;
        sl = tmp;
    }
    bgh_buf b = {0};
    if (models_url) {
        char merr[160];
        if (http_get(models_url, sl, verify_tls, timeout_ms, &b, merr, sizeof(merr)) == 0)
            read_models(b.data ? b.data : "", b.len, model, out);
        b.len = 0;
        b.oversize = false;
    }
    char gerr[200];
    if (http_get(metrics_url, sl, verify_tls, timeout_ms, &b, gerr, sizeof(gerr)) < 0) {
        snprintf(err, errlen, "GET %s failed: %s", metrics_url, gerr);
    } else {
        unsigned f = bg_prom_parse(b.data, b.len, model && model[0] ? model : NULL,
                                   &out->metrics);
        if (!(f & BG_PROM_CACHE_CONFIG))
            snprintf(err, errlen,
                     "%s has no vllm:cache_config_info with num_gpu_blocks and block_size "
                     "(%zu sample lines, %zu malformed)",
                     metrics_url, out->metrics.lines, out->metrics.bad_lines);
        else if (!(f & BG_PROM_KV_USAGE))
            snprintf(err, errlen, "%s has no vllm:kv_cache_usage_perc", metrics_url);
        else
            ret = 0;
    }
    free(b.data);
    curl_slist_free_all(sl);
    return ret;
oom:
    curl_slist_free_all(sl);
    snprintf(err, errlen, "out of memory");
    return -1;
}
