/* test_prom.c - the Prometheus text parser on vLLM-shaped and hostile input. */
#include "bg_prom.h"
#include "check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned parse(const char *text, const char *model, bg_prom_sample *s)
{
    return bg_prom_parse(text, strlen(text), model, s);
}

/* What vLLM v1 serves (trimmed), with histogram noise around our series. */
static const char VLLM[] =
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    "vllm:num_requests_running{engine=\"0\",model_name=\"Qwen/Qwen2.5-0.5B\"} 7.0\n"
    "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
    "# TYPE vllm:num_requests_waiting gauge\n"
    "vllm:num_requests_waiting{engine=\"0\",model_name=\"Qwen/Qwen2.5-0.5B\"} 3.0\n"
    "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"Qwen/Qwen2.5-0.5B\"} 0.4375\n"
    "vllm:num_preemptions_total{engine=\"0\",model_name=\"Qwen/Qwen2.5-0.5B\"} 12.0\n"
    "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"Q\"} 9.0\n"
    "vllm:time_to_first_token_seconds_sum{engine=\"0\",model_name=\"Q\"} 1.5e-01\n"
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    "vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching="
    "\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\","
    "num_gpu_blocks=\"122\",num_gpu_blocks_override=\"None\"} 1.0\n";

static void test_vllm(void)
{
    bg_prom_sample s;
    unsigned f = parse(VLLM, NULL, &s);
    CHECK(f == (BG_PROM_KV_USAGE | BG_PROM_RUNNING | BG_PROM_WAITING | BG_PROM_PREEMPTIONS |
                BG_PROM_CACHE_CONFIG));
    CHECK(s.kv_usage == 0.4375);
    CHECK(s.running == 7 && s.waiting == 3 && s.preemptions == 12);
    CHECK(s.num_gpu_blocks == 122 && s.block_size == 16);
    CHECK(s.bad_lines == 0);
    CHECK(s.lines == 7);
    /* The model filter keeps matching series and label-less ones. */
    f = parse(VLLM, "Qwen/Qwen2.5-0.5B", &s);
    CHECK(f & BG_PROM_KV_USAGE && s.running == 7);
    f = parse(VLLM, "other", &s);
    CHECK(f == BG_PROM_CACHE_CONFIG); /* cache_config_info has no model_name */
}

static void test_several_series(void)
{
    const char *t =
        "vllm:kv_cache_usage_perc{model_name=\"a\",engine=\"0\"} 0.2\n"
        "vllm:kv_cache_usage_perc{model_name=\"a\",engine=\"1\"} 0.7\n"
        "vllm:kv_cache_usage_perc{model_name=\"b\"} 0.99\n"
        "vllm:num_requests_waiting{model_name=\"a\",engine=\"0\"} 1\n"
        "vllm:num_requests_waiting{model_name=\"a\",engine=\"1\"} 4\n"
        "vllm:num_requests_waiting{model_name=\"b\"} 100\n"
        "vllm:cache_config_info{engine=\"0\",block_size=\"16\",num_gpu_blocks=\"100\"} 1\n"
        "vllm:cache_config_info{engine=\"1\",block_size=\"32\",num_gpu_blocks=\"50\"} 1\n";
    bg_prom_sample s;
    parse(t, "a", &s);
    CHECK(s.kv_usage == 0.7); /* the fullest engine */
    CHECK(s.waiting == 5);
    CHECK(s.num_gpu_blocks == 150 && s.block_size == 32);
    parse(t, NULL, &s);
    CHECK(s.kv_usage == 0.99 && s.waiting == 105);
    /* Escaped label values compare unescaped. */
    const char *e = "vllm:kv_cache_usage_perc{model_name=\"x\\\"y\\\\z\"} 0.5\n";
    CHECK(parse(e, "x\"y\\z", &s) == BG_PROM_KV_USAGE && s.kv_usage == 0.5);
    CHECK(parse(e, "x\"y\\", &s) == 0);
}

static void test_values(void)
{
    bg_prom_sample s;
    /* NaN gauges are absent; Inf counts are ignored; usage is clamped. */
    CHECK(parse("vllm:kv_cache_usage_perc NaN\n", NULL, &s) == 0);
    CHECK(parse("vllm:kv_cache_usage_perc +Inf\n", NULL, &s) == BG_PROM_KV_USAGE &&
          s.kv_usage == 1);
    CHECK(parse("vllm:kv_cache_usage_perc -Inf\n", NULL, &s) == BG_PROM_KV_USAGE &&
          s.kv_usage == 0);
    CHECK(parse("vllm:num_requests_running +Inf\n", NULL, &s) == 0);
    CHECK(parse("vllm:num_requests_running -3\n", NULL, &s) == 0);
    CHECK(parse("vllm:kv_cache_usage_perc 2.5e-1 1700000000000\r\n", NULL, &s) &&
          s.kv_usage == 0.25); /* timestamp, CRLF */
    CHECK(parse("vllm:kv_cache_usage_perc 1e-99999\n", NULL, &s) && s.kv_usage == 0);
    CHECK(parse("vllm:num_requests_waiting 1e999999\n", NULL, &s) == 0); /* Inf */
    CHECK(parse("vllm:num_requests_waiting 12345678901234567890123\n", NULL, &s) &&
          s.waiting > 1.2e22 && s.waiting < 1.3e22);
    /* v0 name used only when v1 is absent. */
    CHECK(parse("vllm:gpu_cache_usage_perc 0.3\n", NULL, &s) && s.kv_usage == 0.3);
    CHECK(parse("vllm:gpu_cache_usage_perc 0.3\nvllm:kv_cache_usage_perc 0.6\n", NULL, &s) &&
          s.kv_usage == 0.6);
    /* cache_config_info with "None" blocks is not a cache config. */
    CHECK(parse("vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"None\"} 1\n", NULL,
                &s) == 0);
    CHECK(parse("vllm:cache_config_info{block_size=\"16\"} 1\n", NULL, &s) == 0);
    CHECK(parse("vllm:cache_config_info{block_size=\"0\",num_gpu_blocks=\"4\"} 1\n", NULL,
                &s) == 0);
    CHECK(parse("vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"9999999999999999999"
                "\"} 1\n", NULL, &s) == 0);
}

static void test_garbage(void)
{
    bg_prom_sample s;
    const char *bad[] = {
        "vllm:kv_cache_usage_perc\n",
        "vllm:kv_cache_usage_perc{\n",
        "vllm:kv_cache_usage_perc{a=\"1\" 0.5\n",
        "vllm:kv_cache_usage_perc{a=1} 0.5\n",
        "vllm:kv_cache_usage_perc{a=\"1\\\"} 0.5\n",
        "vllm:kv_cache_usage_perc 0.5x\n",
        "vllm:kv_cache_usage_perc 0.5 12x\n",
        "vllm:kv_cache_usage_perc 0.5 1 2\n",
        "vllm:kv_cache_usage_perc .\n",
        "vllm:kv_cache_usage_perc 1e\n",
        "vllm:kv_cache_usage_perc{=\"x\"} 0.5\n",
        "vllm:kv_cache_usage_perc{:a=\"x\"} 0.5\n",
        "vllm:kv_cache_usage_perc0.5\n",
        "<html><body>404 Not Found</body></html>\n",
        "{\"error\": \"not found\"}",
        "\xff\xfe\x00\x01",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        CHECK(bg_prom_parse(bad[i], strlen(bad[i]) + (i == 15 ? 4 - strlen(bad[i]) : 0), NULL,
                            &s) == 0);
        if (s.found)
            fprintf(stderr, "garbage %zu parsed\n", i);
    }
    /* Garbage lines around a good one: the good one survives. */
    const char *mixed = "garbage here\n\x01\x02\nvllm:kv_cache_usage_perc{a=\"b\",} 0.75\n"
                        "vllm:num_requests_running{ 1\n";
    CHECK(parse(mixed, NULL, &s) == BG_PROM_KV_USAGE && s.kv_usage == 0.75);
    CHECK(s.bad_lines == 3);
    /* Truncated anywhere (no NUL, no newline at the end): never reads past. */
    size_t n = strlen(VLLM);
    for (size_t cut = 0; cut <= n; cut++) {
        char *copy = malloc(cut ? cut : 1);
        memcpy(copy, VLLM, cut);
        bg_prom_parse(copy, cut, NULL, &s);
        free(copy);
    }
    CHECK(bg_prom_parse(NULL, 10, NULL, &s) == 0);
    CHECK(bg_prom_parse("", 0, NULL, &s) == 0);
}

static void test_huge(void)
{
    /* 8 MB of histogram lines, then our gauge: linear, no limit on size. */
    const char line[] = "vllm:e2e_request_latency_seconds_bucket{le=\"0.3\",model_name=\"m\"} 1\n";
    size_t ll = sizeof(line) - 1, reps = (8u << 20) / ll;
    const char tail[] = "vllm:kv_cache_usage_perc 0.125";
    char *big = malloc(reps * ll + sizeof(tail));
    for (size_t i = 0; i < reps; i++)
        memcpy(big + i * ll, line, ll);
    memcpy(big + reps * ll, tail, sizeof(tail) - 1);
    bg_prom_sample s;
    CHECK(bg_prom_parse(big, reps * ll + sizeof(tail) - 1, NULL, &s) == BG_PROM_KV_USAGE);
    CHECK(s.kv_usage == 0.125 && s.lines == reps + 1);
    free(big);
}

int main(void)
{
    test_vllm();
    test_several_series();
    test_values();
    test_garbage();
    test_huge();
    if (failures) {
        fprintf(stderr, "test_prom: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_prom: ok\n");
    return 0;
}
