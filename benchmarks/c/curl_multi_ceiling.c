/* Ceiling of batchgate's design without Python: one libcurl multi loop that
 * builds each request body with cJSON and parses each response with cJSON.
 *
 * usage: curl_multi_ceiling URL CONCURRENCY N [WARMUP [TIMEOUT_S]]
 * Prints one JSON object with stats on stdout; exits non-zero on setup
 * failure or timeout. Only the N timed requests count (WARMUP runs first).
 */
#define _POSIX_C_SOURCE 200809L
#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct {
    CURL *easy;
    char *body;      /* request JSON, owned; curl reads it in place */
    char *resp;      /* response bytes, grown as needed */
    size_t resp_len;
    size_t resp_cap;
    long index;      /* which request this slot carries */
    char errbuf[CURL_ERROR_SIZE];
} slot;

typedef struct {
    long ok;
    long http_errors;
    long transport_errors;
    long parse_errors;
} counts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    slot *s = userdata;
    size_t n = size * nmemb;
    if (s->resp_len + n + 1 > s->resp_cap) {
        size_t cap = s->resp_cap ? s->resp_cap : 1024;
        while (cap < s->resp_len + n + 1)
            cap *= 2;
        char *grown = realloc(s->resp, cap);
        if (!grown)
            return 0; /* makes curl fail the transfer with CURLE_WRITE_ERROR */
        s->resp = grown;
        s->resp_cap = cap;
    }
    memcpy(s->resp + s->resp_len, ptr, n);
    s->resp_len += n;
    s->resp[s->resp_len] = '\0';
    return n;
}

/* Same shape of request batchgate sends for one prompt. */
static char *build_body(long index)
{
    char prompt[256];
    snprintf(prompt, sizeof prompt,
             "Review %ld: The product arrived on time and works as described. "
             "Summarise the sentiment of this review in one word.",
             index);
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    char *out = NULL;
    if (!cJSON_AddStringToObject(root, "model", "bench-model") ||
        !cJSON_AddStringToObject(root, "prompt", prompt) ||
        !cJSON_AddNumberToObject(root, "max_tokens", 16) ||
        !cJSON_AddNumberToObject(root, "temperature", 0))
        goto done;
    out = cJSON_PrintUnformatted(root);
done:
    cJSON_Delete(root);
    return out;
}

/* A response counts as ok only if it is JSON with choices[0].text a string. */
static int parse_ok(const slot *s)
{
    cJSON *root = cJSON_ParseWithLength(s->resp, s->resp_len);
    if (!root)
        return 0;
    int ok = 0;
    cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    cJSON *first = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    cJSON *text = first ? cJSON_GetObjectItemCaseSensitive(first, "text") : NULL;
    if (cJSON_IsString(text) && text->valuestring)
        ok = 1;
    cJSON_Delete(root);
    return ok;
}

static int start(CURLM *multi, slot *s, long index)
{
    free(s->body);
    s->body = build_body(index);
    if (!s->body)
        return -1;
    s->index = index;
    s->resp_len = 0;
    s->errbuf[0] = '\0';
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDS, s->body);
    curl_easy_setopt(s->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(s->body));
    return curl_multi_add_handle(multi, s->easy) == CURLM_OK ? 0 : -1;
}

/* Runs `total` requests through `conc` slots; returns 0, or -1 on timeout/setup failure. */
static int run(CURLM *multi, slot *slots, int conc, long total, double deadline, counts *c)
{
    long next = 0, done = 0;
    int running = 0;
    for (int i = 0; i < conc && next < total; i++)
        if (start(multi, &slots[i], next++) != 0)
            return -1;
    while (done < total) {
        if (now_s() > deadline) {
            fprintf(stderr, "timeout after %ld of %ld requests\n", done, total);
            return -1;
        }
        if (curl_multi_perform(multi, &running) != CURLM_OK)
            return -1;
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(multi, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            slot *s = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
            CURLcode rc = msg->data.result;
            curl_multi_remove_handle(multi, s->easy);
            long status = 0;
            curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
            if (rc != CURLE_OK)
                c->transport_errors++;
            else if (status != 200)
                c->http_errors++;
            else if (parse_ok(s))
                c->ok++;
            else
                c->parse_errors++;
            done++;
            if (next < total && start(multi, s, next++) != 0)
                return -1;
        }
        if (done < total && curl_multi_poll(multi, NULL, 0, 100, NULL) != CURLM_OK)
            return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s URL CONCURRENCY N [WARMUP [TIMEOUT_S]]\n", argv[0]);
        return 2;
    }
    const char *url = argv[1];
    int conc = atoi(argv[2]);
    long n = atol(argv[3]);
    long warmup = argc > 4 ? atol(argv[4]) : 0;
    double timeout_s = argc > 5 ? atof(argv[5]) : 300.0;
    if (conc < 1 || n < 1 || warmup < 0 || timeout_s <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return 1;

    int rc = 1;
    CURLM *multi = curl_multi_init();
    struct curl_slist *headers = NULL;
    headers = curl_slist_append(headers, "Content-Type: application/json");
    headers = curl_slist_append(headers, "Authorization: Bearer dummy");
    headers = curl_slist_append(headers, "Expect:");
    slot *slots = calloc((size_t)conc, sizeof *slots);
    if (!multi || !headers || !slots)
        goto out;
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)conc);
    for (int i = 0; i < conc; i++) {
        slot *s = &slots[i];
        s->easy = curl_easy_init();
        if (!s->easy)
            goto out;
        curl_easy_setopt(s->easy, CURLOPT_URL, url);
        curl_easy_setopt(s->easy, CURLOPT_HTTPHEADER, headers);
        curl_easy_setopt(s->easy, CURLOPT_WRITEFUNCTION, on_data);
        curl_easy_setopt(s->easy, CURLOPT_WRITEDATA, s);
        curl_easy_setopt(s->easy, CURLOPT_PRIVATE, (char *)s);
        curl_easy_setopt(s->easy, CURLOPT_ERRORBUFFER, s->errbuf);
        curl_easy_setopt(s->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(s->easy, CURLOPT_TIMEOUT_MS, 30000L);
        curl_easy_setopt(s->easy, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
        curl_easy_setopt(s->easy, CURLOPT_PROTOCOLS_STR, "http");
        /* Loopback only: ignore any http_proxy in the environment. */
        curl_easy_setopt(s->easy, CURLOPT_PROXY, "");
    }

    double deadline = now_s() + timeout_s;
    counts warm = {0}, timed = {0};
    if (warmup > 0 && run(multi, slots, conc, warmup, deadline, &warm) != 0)
        goto out;
    double cpu0 = cpu_s(), t0 = now_s();
    if (run(multi, slots, conc, n, deadline, &timed) != 0)
        goto out;
    double wall = now_s() - t0, cpu = cpu_s() - cpu0;

    printf("{\"requests\": %ld, \"ok\": %ld, \"http_errors\": %ld, "
           "\"transport_errors\": %ld, \"parse_errors\": %ld, "
           "\"seconds\": %.6f, \"rps\": %.1f, \"cpu_s\": %.6f}\n",
           n, timed.ok, timed.http_errors, timed.transport_errors, timed.parse_errors,
           wall, (double)n / wall, cpu);
    rc = timed.ok == n ? 0 : 3;

out:
    if (slots) {
        for (int i = 0; i < conc; i++) {
            if (slots[i].easy) {
                curl_multi_remove_handle(multi, slots[i].easy);
                curl_easy_cleanup(slots[i].easy);
            }
            free(slots[i].body);
            free(slots[i].resp);
        }
        free(slots);
    }
    curl_slist_free_all(headers);
    if (multi)
        curl_multi_cleanup(multi);
    curl_global_cleanup();
    return rc;
}
