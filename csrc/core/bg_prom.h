/* bg_prom.h - the few vLLM series closed-loop admission reads, out of a
 * Prometheus text exposition (format 0.0.4).
 *
 * Pure C (no Python.h), no allocation, one pass over the text; the input
 * need not be NUL-terminated. Lines that do not parse are skipped and counted
 * (a scrape with some garbage still yields what is readable); comments,
 * labels with escapes, NaN/+Inf/-Inf values, timestamps and CRLF are handled.
 *
 * Series read (vLLM v1 names, v0 aliases accepted):
 *   vllm:kv_cache_usage_perc (v0: vllm:gpu_cache_usage_perc)  gauge 0..1
 *   vllm:num_requests_running, vllm:num_requests_waiting      gauges
 *   vllm:num_preemptions_total                                counter
 *   vllm:cache_config_info{num_gpu_blocks="N",block_size="B"} info gauge
 *
 * Several series of one name (data-parallel engines, several models): with
 * a model filter only series whose model_name label equals it count (series
 * without a model_name label always count, as cache_config_info has none);
 * the rest are combined conservatively: the highest KV usage, the sum of
 * running, waiting, preemptions and GPU blocks, the largest block size.
 */
#ifndef BATCHGATE_BG_PROM_H
#define BATCHGATE_BG_PROM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    BG_PROM_KV_USAGE = 1u << 0,
    BG_PROM_RUNNING = 1u << 1,
    BG_PROM_WAITING = 1u << 2,
    BG_PROM_PREEMPTIONS = 1u << 3,
    BG_PROM_CACHE_CONFIG = 1u << 4, /* num_gpu_blocks and block_size both valid */
};

typedef struct {
    unsigned found;        /* BG_PROM_* bits: which fields below are valid */
    double kv_usage;       /* 0..1 (clamped) */
    double running, waiting;
    double preemptions;    /* cumulative */
    int64_t num_gpu_blocks, block_size;
    size_t lines, bad_lines; /* sample lines seen / skipped as malformed */
} bg_prom_sample;

/* Parse text[0..len). model: NULL or "" = every series counts. Returns the
 * found bits (0 if nothing we read was there: not a vLLM /metrics). */
unsigned bg_prom_parse(const char *text, size_t len, const char *model, bg_prom_sample *out);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_PROM_H */
