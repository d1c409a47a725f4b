/* bg_admit.h - closed-loop admission: how much KV cache batchgate may have
 * in flight on one vLLM server, from what the server reports.
 *
 * Pure C (no Python.h), no threads, no clock: the caller feeds time (seconds,
 * any monotonic origin), metric samples and request outcomes, so a recorded
 * sequence always gives the same limits (tests/c/test_admit.c). The engine
 * (bg_http_admit.c) owns one per dispatcher and serialises the calls.
 *
 * Unit: KV blocks (vllm:cache_config_info's block_size tokens each), the
 * unit vLLM allocates in. A request is charged, before it is sent,
 *     ceil((prompt_tokens * prompt_ratio * n + seqs * reserve) / block_size)
 *       + (seqs - 1)
 * blocks, where seqs = prompts * n; the extra block per additional sequence
 * covers the partly filled last block each sequence wastes. prompt_ratio
 * corrects the local estimate with the server's usage.prompt_tokens, and
 * reserve is the output length to expect (below). The sum charged to the
 * requests in flight must stay under the limit L (a bg_sem whose capacity is
 * set to L: see bg_sem_set_capacity). L never exceeds its ceiling C, which
 * is high_usage * N until overbooking is measured (below): with exact
 * charges the server then never passes the high watermark, and the room
 * above it absorbs estimate errors and other clients' bursts (a request
 * bigger than that still runs, alone).
 *
 * Start: L0 = (target_usage - u0) * N when the probe (bg_admit_start) saw
 * usage u0 and no queue beyond wait_allow, else init_fraction * N (and never
 * less). On an idle server that is 0.85 N at once: until answers come back
 * every request reserves its whole max_tokens, an upper bound, so filling
 * the room to the target cannot overrun; short runs (a few seconds) would
 * otherwise spend most of their time climbing.
 *
 * Control law, evaluated on each fresh sample of /metrics (every 100 ms by
 * default):
 *   cut      L <- max(L_min, L * decrease) when a new preemption appears
 *            (vllm:num_preemptions_total rose), KV usage exceeds high_usage,
 *            a waiting queue persists (vllm:num_requests_waiting above
 *            max(wait_allow, 10% of running) on three samples in a row and
 *            not shrinking: new arrivals always wait one engine step, so a
 *            single snapshot says little), or the server answered 429/503
 *            (its queue limits). At most one cut per holdoff_s: a cut shows only
 *            once requests in flight finish, so cutting on every sample of
 *            the same episode would collapse the limit.
 *   grow     L <- min(C, L + max(1, gain * H), held + H)
 *            with H = (target_usage - usage) * N, the headroom to the
 *            target, and held = blocks charged in flight; only when usage <
 *            target_usage, the waiting queue is within its allowance, and
 *            held >= L / 2 (a limit nobody fills says nothing about the
 *            server); after a cut, only once held <= L (the cut has taken
 *            effect) or holdoff_s has passed. The held + H bound keeps the
 *            limit from running ahead of the memory actually seen free: a
 *            sample right after a wave of completions shows low usage, but
 *            also little in flight.
 *   ceiling  charges are final sizes (prompt + whole output), but requests
 *            in flight are part-way through their outputs and finish at
 *            different times, so the server holds only a share s of what is
 *            charged (0.75-0.8 for 200-token summaries of 750-token
 *            prompts). Once the answers finished reach turnover x the
 *            requests running (the in-flight set has mixed ages), s is
 *            measured as an EWMA (weight 0.3) of usage * N / held on
 *            samples where held >= L / 2, and
 *                C = high_usage * N * clamp(1 / max(s, p), 1, overbook_max)
 *            (and never above N), where p is the prompt share of the charges
 *            made since learning (block-weighted EWMA, weight 1/32): usage
 *            at C is planned at
 *            high_usage, growth stops at the target, the cuts correct the
 *            rest, and a share that rises (longer answers, another client)
 *            lowers C and clips L at once.
 *            Why p: a sample can only under-read the share (a
 *            request charged but still on its way, waiting at the server,
 *            or done there with its answer in transit holds nothing), and
 *            requests shorter than the scrape interval make the readings
 *            swing (the demo: 4,000-token prompts, 20-token answers, usage
 *            between 0.58 and 0.99 of the charges from one sample to the
 *            next). An average of such readings (~0.8) overbooked by x1.2
 *            and a naive server ran out of memory. Overbooking can only bet
 *            on the output part of a charge, since a request that is in
 *            holds its prompt whole: p caps the bet however the readings
 *            fall (x1.01 there), and leaves it whole where outputs dominate
 *            (p ~0.55 for summaries). A fast-attack share (a higher reading
 *            replaces s) was tried as well: the demo needs no more than p,
 *            and it cost 1-2% in mixed and shift (one benchmark run).
 *            Before turnover (a burst that started together also grows
 *            together) C stays high_usage * N. Because s is measured, C does
 *            not depend on how generous the reserve is: a cautious quantile
 *            costs nothing once the share is known. Never above N, as the
 *            issue asks: s is an average, and past N a sample that read it
 *            low is an out-of-memory failure on a server that cannot
 *            preempt (with C up to 1.38 N, tests/test_admission.py's naive
 *            run failed 1 of 4 times at s read 0.87-0.90). So overbooking
 *            buys at most N / (high_usage * N) = x1.087 with the defaults;
 *            the semaphore the limit is applied to is bounded by
 *            bg_admit_max_effective (min(overbook_max * high_usage, 1) * N).
 *   stale    no sample for stale_s: the effective limit is 0 (admit nothing
 *            new) until samples come back; L itself is kept.
 * The engine charges a request when it reaches the head of its admission
 * queue, not when it was submitted, so what was learned meanwhile counts.
 *
 * Output lengths: until `warmup` (4) sequences have finished, a request
 * reserves its max_tokens (or max_model_len - prompt when it has none). Then
 * it reserves min(max_tokens, q * (1 + out_margin + 1 / sqrt(n)) + 1) where q
 * is the out_quantile (p95) of usage.completion_tokens per sequence over the
 * last n <= 512 finished sequences: +60% over q after 4 answers, +20% after
 * 100, +14% with a full window (the first answers to come back are the
 * shortest of their burst, so few answers get a wide margin). A workload
 * that turns longer is caught twice: the window's quantile moves within a
 * few dozen answers, and meanwhile the real usage rises, which stops growth
 * at target_usage, lowers the ceiling and cuts at high_usage, whatever the
 * charge said.
 *
 * Why this shape (compared with what exists):
 *  - AIMD limiters (Netflix concurrency-limits: +1 per RTT, x0.9 on a drop)
 *    react to loss, i.e. after the damage; here the loss signal
 *    (preemption) is still a cut, but growth is steered by the KV gauge
 *    directly, proportional to the headroom, so the limit approaches
 *    target_usage fast from below and slows down near it instead of
 *    probing past it.
 *  - Vegas / Gradient limiters infer a queue from latency (limit *
 *    (1 - minRTT/RTT)). LLM latency grows with output length and batch
 *    size even without any queue, so the inference is noisy; vLLM reports
 *    the queue (num_requests_waiting) and the memory (kv_cache_usage_perc)
 *    outright, and we read them.
 *  - llm-d's utilization detector scores an endpoint max(waiting/5,
 *    kv/0.8) to pick where to route; we use the same two gauges to decide
 *    how much to send, plus the preemption counter, and like its
 *    concurrency detector we also charge requests in tokens, but in KV
 *    blocks with learned output lengths so the open-loop part stays close
 *    and the closed loop corrects what is left. Like llm-d, stale metrics
 *    count as saturated.
 */
#ifndef BATCHGATE_BG_ADMIT_H
#define BATCHGATE_BG_ADMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bg_prom.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    double target_usage;  /* grow while KV usage is below this (0.85) */
    double high_usage;    /* cut when usage is above this (0.92) */
    double decrease;      /* multiplicative cut factor (0.7) */
    double gain;          /* share of the headroom added per sample (0.25) */
    double holdoff_s;     /* after a cut: no growth, no other cut (1.0) */
    double stale_s;       /* metrics older than this: admit nothing (2.0) */
    double init_fraction; /* L0 / N when the probe saw a queue or no reading (0.5) */
    double min_fraction;  /* L_min / N (0.02, at least one block) */
    double wait_allow;    /* waiting requests tolerated, at least (2) */
    double out_quantile;  /* quantile of output lengths reserved (0.95) */
    double out_margin;    /* safety margin on it (0.10) */
    int warmup;           /* finished sequences before learning is trusted (4) */
    double overbook_max;  /* C / (high_usage * N), at most (1.5) */
    double turnover;      /* finished seqs per running one before overbooking (1) */
} bg_admit_params;

void bg_admit_params_defaults(bg_admit_params *p);

/* Why the limit moved (events and stats). */
enum bg_admit_reason {
    BG_ADMIT_GROW = 0,
    BG_ADMIT_CUT_PREEMPT,
    BG_ADMIT_CUT_HIGH,
    BG_ADMIT_CUT_QUEUE,
    BG_ADMIT_CUT_OVERLOAD,
    BG_ADMIT_STALE,  /* metrics stopped: effective limit 0 */
    BG_ADMIT_FRESH,  /* metrics back */
};
const char *bg_admit_reason_name(int reason);

typedef struct {
    double t;
    int64_t from, to; /* effective limit, blocks */
    int reason;
} bg_admit_event;

typedef struct bg_admit bg_admit;

/* kv_blocks, block_size >= 1; max_model_len <= 0 if unknown. t0 counts as
 * the time of a first sample (the probe that found the server). NULL if the
 * arguments are invalid or out of memory. */
bg_admit *bg_admit_new(const bg_admit_params *p, int64_t kv_blocks, int64_t block_size,
                       int64_t max_model_len, double t0);
void bg_admit_free(bg_admit *a);

/* The probe's reading (KV usage 0..1, waiting requests): on a server that
 * is not queueing, L starts at the room free up to target_usage instead of
 * init_fraction * N. Call once, before any sample. */
void bg_admit_start(bg_admit *a, double usage, double waiting);

/* A successful scrape. held = blocks charged to requests in flight now. */
void bg_admit_on_sample(bg_admit *a, double now, const bg_prom_sample *s, int64_t held);
/* The server refused for load (429, 503). */
void bg_admit_on_overload(bg_admit *a, double now);
/* A request finished: prompt_est = local estimate (sum over its prompts),
 * prompt_tokens / completion_tokens = the server's usage (< 0 if absent),
 * seqs = sequences it produced (prompts * n). */
void bg_admit_on_finish(bg_admit *a, int64_t prompt_est, int64_t prompt_tokens,
                        int64_t completion_tokens, int64_t seqs);

/* Blocks to charge a request (1..N). prompt_est: estimated prompt tokens
 * summed over its prompts; max_tokens < 0: none given (max_model_len -
 * prompt is assumed). */
int64_t bg_admit_charge(bg_admit *a, int64_t prompt_est, int64_t n_prompts,
                        int64_t n_per_prompt, int64_t max_tokens);

/* The limit admission should use at `now` (0 while metrics are stale). Also
 * records the stale/fresh transitions. */
int64_t bg_admit_effective(bg_admit *a, double now);
/* The largest value bg_admit_effective can return: the bound to give the
 * semaphore the limit is applied to (the overbooked ceiling's largest
 * value, never above the KV size). */
int64_t bg_admit_max_effective(const bg_admit *a);

typedef struct {
    int64_t kv_blocks, block_size, max_model_len;
    int64_t limit;          /* L, blocks */
    int64_t effective;      /* last value of bg_admit_effective */
    int64_t peak_limit;
    int64_t ceiling;        /* bound on L now: high_usage * N times the overbooking, <= N */
    double used_share;      /* measured usage / charged blocks (-1 before turnover) */
    double prompt_share;    /* prompt part of the charges since learning (-1: none) */
    double kv_usage, running, waiting; /* last sample (-1 before any) */
    double peak_kv_usage;
    double preemptions_seen; /* rise of the counter since the first sample */
    uint64_t samples, cuts, grows, overloads, stale_episodes;
    bool stale;
    bool learned;           /* warmup reached: reserve below is in use */
    int64_t reserve_out;    /* output tokens reserved per sequence (-1 before warmup) */
    double out_p50, out_q;  /* learned output lengths per sequence (-1 if none) */
    double prompt_ratio;    /* server's prompt tokens / local estimate */
    uint64_t finished_seqs;
    double last_sample_t;
} bg_admit_stats;
void bg_admit_get_stats(const bg_admit *a, bg_admit_stats *out);

/* Pop up to n recorded events (cuts, stale/fresh, and growth past +25% of
 * the last recorded value); oldest first. Returns how many. */
size_t bg_admit_pop_events(bg_admit *a, bg_admit_event *out, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_ADMIT_H */
