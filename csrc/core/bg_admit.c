/* bg_admit.c - the closed-loop admission controller (algorithm in bg_admit.h). */
#include "bg_admit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define OUT_WINDOW 512
#define RATIO_WINDOW 256
#define RECOMPUTE_EVERY 16
#define EVENT_RING 64
#define GROW_EVENT_STEP 1.25 /* growth is recorded past +25% of the last event */
#define QUEUE_SAMPLES 3      /* a queue must persist this many samples */
#define WAIT_FRACTION 0.1    /* waiting allowance grows with the batch */
#define RATIO_EWMA 0.3       /* weight of a new sample in the used share */
#define PROMPT_EWMA (1.0 / 32) /* weight of a charge in the prompt share of charges */

struct bg_admit {
    bg_admit_params p;
    int64_t n_blocks, block_size, max_model_len;
    int64_t min_limit, max_limit;
    double limit; /* L, fractional so small gains accumulate */
    int64_t effective;
    double last_sample_t, last_cut_t;
    bool have_sample, stale;
    int waiting_over_n; /* consecutive samples with a queue over the allowance */
    double prev_waiting;
    double pre_base, pre_last;
    /* Overbooking: the share of the charged blocks the server really uses
     * (EWMA of usage * N / held); < 0 until measured. */
    double use_ratio;
    int64_t ceiling; /* current bound on L: high * N, times the overbooking */
    /* Block-weighted EWMAs of the prompt part and the whole of the charges
     * made since learning: their ratio is the least share the server can
     * hold of what is charged (every prompt in, no output yet). */
    double charged_prompt, charged_all;

    /* learned output lengths per sequence, and prompt estimate ratios */
    int32_t out_ring[OUT_WINDOW];
    size_t out_n, out_pos, out_since;
    double out_q, out_p50;
    float ratio_ring[RATIO_WINDOW];
    size_t ratio_n, ratio_pos, ratio_since;
    double prompt_ratio;

    bg_admit_stats st;

    bg_admit_event ev[EVENT_RING];
    size_t ev_head, ev_n;
    int64_t ev_last_to;
};

void bg_admit_params_defaults(bg_admit_params *p)
{
    p->target_usage = 0.85;
    p->high_usage = 0.92;
    p->decrease = 0.7;
    p->gain = 0.25;
    p->holdoff_s = 1.0;
    p->stale_s = 2.0;
    p->init_fraction = 0.5;
    p->min_fraction = 0.02;
    p->wait_allow = 2;
    p->out_quantile = 0.95;
    p->out_margin = 0.10;
    p->warmup = 4;
    p->overbook_max = 1.5;
    p->turnover = 1.0;
}

const char *bg_admit_reason_name(int reason)
{
    switch (reason) {
    case BG_ADMIT_GROW: return "grow";
    case BG_ADMIT_CUT_PREEMPT: return "preemption";
    case BG_ADMIT_CUT_HIGH: return "kv_high";
    case BG_ADMIT_CUT_QUEUE: return "queue";
    case BG_ADMIT_CUT_OVERLOAD: return "overload";
    case BG_ADMIT_STALE: return "stale";
    case BG_ADMIT_FRESH: return "fresh";
    default: return "?";
    }
}

static bool in01(double v)
{
    return v > 0 && v <= 1;
}

bg_admit *bg_admit_new(const bg_admit_params *p, int64_t kv_blocks, int64_t block_size,
                       int64_t max_model_len, double t0)
{
    bg_admit_params d;
    if (!p) {
        bg_admit_params_defaults(&d);
        p = &d;
    }
    if (kv_blocks < 1 || block_size < 1 || !in01(p->target_usage) || !in01(p->high_usage) ||
        p->high_usage < p->target_usage || !(p->decrease > 0 && p->decrease < 1) ||
        !(p->gain > 0 && p->gain <= 1) || !(p->holdoff_s >= 0) || !(p->stale_s > 0) ||
        !in01(p->init_fraction) || !(p->min_fraction >= 0 && p->min_fraction <= 1) ||
        !(p->wait_allow >= 0) || !in01(p->out_quantile) || !(p->out_margin >= 0) ||
        p->warmup < 1 || !(p->overbook_max >= 1 && p->overbook_max <= 4) ||
        !(p->turnover >= 0))
        return NULL;
    bg_admit *a = calloc(1, sizeof(*a));
    if (!a)
        return NULL;
    a->p = *p;
    a->n_blocks = kv_blocks;
    a->block_size = block_size;
    a->max_model_len = max_model_len > 0 ? max_model_len : 0;
    a->min_limit = (int64_t)(p->min_fraction * (double)kv_blocks);
    if (a->min_limit < 1)
        a->min_limit = 1;
    /* With exact charges the server then never passes the watermark; the
     * room above it absorbs estimate errors and other clients' bursts. */
    a->max_limit = (int64_t)(p->high_usage * (double)kv_blocks);
    if (a->max_limit < a->min_limit)
        a->max_limit = a->min_limit;
    a->limit = floor(p->init_fraction * (double)kv_blocks);
    if (a->limit < (double)a->min_limit)
        a->limit = (double)a->min_limit;
    if (a->limit > (double)a->max_limit)
        a->limit = (double)a->max_limit;
    a->ceiling = a->max_limit;
    a->use_ratio = -1;
    a->effective = (int64_t)a->limit;
    a->ev_last_to = a->effective;
    a->last_sample_t = t0;
    a->last_cut_t = -INFINITY;
    a->out_q = a->out_p50 = -1;
    a->prompt_ratio = 1.0;
    a->st.kv_usage = a->st.running = a->st.waiting = -1;
    return a;
}

void bg_admit_start(bg_admit *a, double usage, double waiting)
{
    if (!(usage >= 0 && usage <= 1) || !(waiting >= 0) || waiting > a->p.wait_allow)
        return; /* unknown or already queueing: keep init_fraction */
    /* Until answers come back every request reserves its max_tokens, an upper
     * bound: filling the room free up to the target cannot overrun. */
    double room = floor((a->p.target_usage - usage) * (double)a->n_blocks + 0.5);
    if (room > (double)a->max_limit)
        room = (double)a->max_limit;
    if (room > a->limit) {
        a->limit = room;
        a->effective = (int64_t)room;
        a->ev_last_to = a->effective;
    }
}

void bg_admit_free(bg_admit *a)
{
    free(a);
}

/* ---- events ------------------------------------------------------------ */

static void push_event(bg_admit *a, double t, int64_t from, int64_t to, int reason)
{
    size_t slot = (a->ev_head + a->ev_n) % EVENT_RING;
    if (a->ev_n == EVENT_RING) {
        a->ev_head = (a->ev_head + 1) % EVENT_RING; /* drop the oldest */
        a->ev_n--;
    }
    a->ev[slot] = (bg_admit_event){t, from, to, reason};
    a->ev_n++;
    a->ev_last_to = to;
}

size_t bg_admit_pop_events(bg_admit *a, bg_admit_event *out, size_t n)
{
    size_t k = 0;
    while (k < n && a->ev_n) {
        out[k++] = a->ev[a->ev_head];
        a->ev_head = (a->ev_head + 1) % EVENT_RING;
        a->ev_n--;
    }
    return k;
}

/* ---- the control law ----------------------------------------------------- */

static void cut(bg_admit *a, double now, int reason)
{
    int64_t from = (int64_t)a->limit;
    a->limit *= a->p.decrease;
    if (a->limit < (double)a->min_limit)
        a->limit = (double)a->min_limit;
    a->last_cut_t = now;
    a->st.cuts++;
    push_event(a, now, from, (int64_t)a->limit, reason);
}

static bool learned(const bg_admit *a);

/* The overbooking ceiling C (bg_admit.h): after turnover, high_usage * N
 * times the inverse of the measured share of the charges the server holds. */
static void update_ceiling(bg_admit *a, double u, int64_t held)
{
    double running = a->st.running > 0 ? a->st.running : 0;
    if (!learned(a) || (double)a->st.finished_seqs < a->p.turnover * running ||
        held < 1 || (double)held * 2 < a->limit)
        return;
    double r = u * (double)a->n_blocks / (double)held;
    a->use_ratio = a->use_ratio < 0 ? r : a->use_ratio + RATIO_EWMA * (r - a->use_ratio);
    /* Never below the prompt share of the charges: once a request is in,
     * its prompt is held whole, so overbooking can only bet on the output
     * part. Short answers to long prompts leave nothing to bet on, and
     * their readings under-read the share most (bg_admit.h). */
    double floor_share = a->charged_all > 0 ? a->charged_prompt / a->charged_all : 1;
    double share = a->use_ratio > floor_share ? a->use_ratio : floor_share;
    double over = share > 0 ? 1 / share : a->p.overbook_max;
    if (over < 1)
        over = 1;
    if (over > a->p.overbook_max)
        over = a->p.overbook_max;
    a->ceiling = (int64_t)(over * (double)a->max_limit);
    /* Never above the KV size: the share is an average over samples, and
     * past N a reading that was low by chance is an out-of-memory failure
     * on a server that cannot preempt (the naive test ran out in 1 of 4). */
    if (a->ceiling > a->n_blocks)
        a->ceiling = a->n_blocks;
    if (a->limit > (double)a->ceiling)
        a->limit = (double)a->ceiling; /* the share rose: overbook less */
}

void bg_admit_on_sample(bg_admit *a, double now, const bg_prom_sample *s, int64_t held)
{
    if (!(s->found & BG_PROM_KV_USAGE))
        return; /* not a usable sample: staleness keeps counting */
    double u = s->kv_usage;
    double waiting = (s->found & BG_PROM_WAITING) ? s->waiting : 0;
    bool new_preemption = false;
    if (s->found & BG_PROM_PREEMPTIONS) {
        if (!a->have_sample) {
            a->pre_base = a->pre_last = s->preemptions;
        } else if (s->preemptions > a->pre_last) {
            new_preemption = true;
            a->st.preemptions_seen += s->preemptions - a->pre_last;
            a->pre_last = s->preemptions;
        } else if (s->preemptions < a->pre_last) {
            a->pre_last = s->preemptions; /* server restarted: new baseline */
        }
    }
    a->have_sample = true;
    a->last_sample_t = now;
    a->st.samples++;
    a->st.kv_usage = u;
    a->st.running = (s->found & BG_PROM_RUNNING) ? s->running : -1;
    a->st.waiting = (s->found & BG_PROM_WAITING) ? s->waiting : -1;
    if (u > a->st.peak_kv_usage)
        a->st.peak_kv_usage = u;

    /* New arrivals wait one engine step (tens of ms) even on an idle server,
     * so a snapshot of the queue is noisy: only a queue above the allowance
     * on QUEUE_SAMPLES samples in a row that is not draining counts. */
    double running = (s->found & BG_PROM_RUNNING) ? s->running : 0;
    double allow = a->p.wait_allow > WAIT_FRACTION * running ? a->p.wait_allow
                                                             : WAIT_FRACTION * running;
    bool waiting_over = waiting > allow;
    a->waiting_over_n = waiting_over ? a->waiting_over_n + 1 : 0;
    bool queue = a->waiting_over_n >= QUEUE_SAMPLES && waiting >= a->prev_waiting;
    a->prev_waiting = waiting;
    bool in_holdoff = now - a->last_cut_t < a->p.holdoff_s;

    int reason = -1;
    if (new_preemption)
        reason = BG_ADMIT_CUT_PREEMPT;
    else if (u > a->p.high_usage)
        reason = BG_ADMIT_CUT_HIGH;
    else if (queue)
        reason = BG_ADMIT_CUT_QUEUE;
    if (reason >= 0) {
        if (!in_holdoff)
            cut(a, now, reason);
        return;
    }
    update_ceiling(a, u, held);
    /* After a cut, growth waits until what is in flight fits the cut limit
     * (the cut has taken effect) or holdoff_s has passed. */
    if ((in_holdoff && (double)held > a->limit) || u >= a->p.target_usage || waiting_over)
        return;
    if ((double)held * 2 < a->limit)
        return; /* demand-limited: the limit is not what holds us back */
    double headroom = (a->p.target_usage - u) * (double)a->n_blocks;
    double step = a->p.gain * headroom;
    if (step < 1)
        step = 1;
    double before = a->limit, next = a->limit + step;
    /* Never run ahead of the memory seen free: what is in flight plus the
     * headroom to the target. A sample taken right after a wave of
     * completions shows low usage, but also little in flight. */
    if (next > (double)held + headroom)
        next = (double)held + headroom;
    if (next > (double)a->ceiling)
        next = (double)a->ceiling;
    if (next > a->limit)
        a->limit = next;
    if (a->limit > before) {
        a->st.grows++;
        if ((int64_t)a->limit >= (int64_t)((double)a->ev_last_to * GROW_EVENT_STEP) ||
            ((int64_t)a->limit == a->ceiling && a->ev_last_to < a->ceiling))
            push_event(a, now, (int64_t)before, (int64_t)a->limit, BG_ADMIT_GROW);
    }
}

void bg_admit_on_overload(bg_admit *a, double now)
{
    a->st.overloads++;
    if (now - a->last_cut_t >= a->p.holdoff_s)
        cut(a, now, BG_ADMIT_CUT_OVERLOAD);
}

int64_t bg_admit_max_effective(const bg_admit *a)
{
    int64_t m = (int64_t)ceil(a->p.overbook_max * (double)a->max_limit);
    return m < a->n_blocks ? m : a->n_blocks;
}

int64_t bg_admit_effective(bg_admit *a, double now)
{
    bool stale = now - a->last_sample_t > a->p.stale_s;
    int64_t eff = stale ? 0 : (int64_t)a->limit;
    if (stale != a->stale) {
        a->stale = stale;
        if (stale)
            a->st.stale_episodes++;
        push_event(a, now, a->effective, eff, stale ? BG_ADMIT_STALE : BG_ADMIT_FRESH);
    }
    a->effective = eff;
    if (eff > a->st.peak_limit)
        a->st.peak_limit = eff;
    return eff;
}

/* ---- learning ------------------------------------------------------------ */

static int cmp_i32(const void *x, const void *y)
{
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

static int cmp_f(const void *x, const void *y)
{
    float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

static size_t q_index(size_t n, double q)
{
    size_t i = (size_t)ceil(q * (double)n);
    return i == 0 ? 0 : i - 1;
}

static void recompute_out(bg_admit *a)
{
    int32_t tmp[OUT_WINDOW];
    size_t n = a->out_n;
    memcpy(tmp, a->out_ring, n * sizeof(int32_t));
    qsort(tmp, n, sizeof(int32_t), cmp_i32);
    a->out_q = tmp[q_index(n, a->p.out_quantile)];
    a->out_p50 = tmp[q_index(n, 0.5)];
    a->out_since = 0;
}

static void recompute_ratio(bg_admit *a)
{
    float tmp[RATIO_WINDOW];
    size_t n = a->ratio_n;
    memcpy(tmp, a->ratio_ring, n * sizeof(float));
    qsort(tmp, n, sizeof(float), cmp_f);
    /* A high quantile: under-counting prompts is what overfills the cache. */
    double r = tmp[q_index(n, 0.9)];
    a->prompt_ratio = r < 0.5 ? 0.5 : r > 4 ? 4 : r;
    a->ratio_since = 0;
}

void bg_admit_on_finish(bg_admit *a, int64_t prompt_est, int64_t prompt_tokens,
                        int64_t completion_tokens, int64_t seqs)
{
    if (seqs < 1)
        return;
    if (completion_tokens >= 0) {
        int64_t per = (completion_tokens + seqs - 1) / seqs;
        if (per > INT32_MAX)
            per = INT32_MAX;
        a->out_ring[a->out_pos] = (int32_t)per;
        a->out_pos = (a->out_pos + 1) % OUT_WINDOW;
        if (a->out_n < OUT_WINDOW)
            a->out_n++;
        a->st.finished_seqs += (uint64_t)seqs;
        /* Recompute often while the window fills, then every few answers. */
        if (++a->out_since >= RECOMPUTE_EVERY || a->out_n <= 64)
            recompute_out(a);
    }
    if (prompt_est > 0 && prompt_tokens > 0) {
        a->ratio_ring[a->ratio_pos] = (float)((double)prompt_tokens / (double)prompt_est);
        a->ratio_pos = (a->ratio_pos + 1) % RATIO_WINDOW;
        if (a->ratio_n < RATIO_WINDOW)
            a->ratio_n++;
        if (++a->ratio_since >= RECOMPUTE_EVERY || a->ratio_n <= 64)
            recompute_ratio(a);
    }
}

static bool learned(const bg_admit *a)
{
    return a->st.finished_seqs >= (uint64_t)a->p.warmup && a->out_n > 0;
}

static int64_t reserve_tokens(const bg_admit *a)
{
    if (!learned(a))
        return -1;
    /* A few answers say little (and the first to finish are the shortest):
     * the margin starts wide and shrinks as 1/sqrt(answers seen). */
    double m = a->p.out_margin + 1 / sqrt((double)a->out_n);
    return (int64_t)ceil(a->out_q * (1 + m)) + 1;
}

int64_t bg_admit_charge(bg_admit *a, int64_t prompt_est, int64_t n_prompts,
                        int64_t n_per_prompt, int64_t max_tokens)
{
    if (n_prompts < 1)
        n_prompts = 1;
    if (n_per_prompt < 1)
        n_per_prompt = 1;
    if (prompt_est < 0)
        prompt_est = 0;
    double prompt = (double)prompt_est * a->prompt_ratio;
    double per_prompt = prompt / (double)n_prompts;
    double mml = (double)a->max_model_len;
    double out;
    if (max_tokens >= 0)
        out = (double)max_tokens;
    else if (mml > 0)
        out = mml - per_prompt > 1 ? mml - per_prompt : 1;
    else
        out = 4096; /* no max_tokens, no max_model_len: a cautious guess */
    int64_t res = reserve_tokens(a);
    if (res >= 0 && (double)res < out)
        out = (double)res;
    if (mml > 0 && per_prompt + out > mml)
        out = mml - per_prompt > 0 ? mml - per_prompt : 0;
    double seqs = (double)n_prompts * (double)n_per_prompt;
    double tokens = prompt * (double)n_per_prompt + seqs * out;
    double blocks = ceil(tokens / (double)a->block_size) + (seqs - 1);
    if (!(blocks >= 1))
        blocks = 1;
    if (blocks > (double)a->n_blocks)
        blocks = (double)a->n_blocks;
    if (res >= 0 && tokens > 0) {
        double pb = blocks * (prompt * (double)n_per_prompt) / tokens;
        if (a->charged_all <= 0) {
            a->charged_prompt = pb;
            a->charged_all = blocks;
        } else {
            a->charged_prompt += PROMPT_EWMA * (pb - a->charged_prompt);
            a->charged_all += PROMPT_EWMA * (blocks - a->charged_all);
        }
    }
    return (int64_t)blocks;
}

void bg_admit_get_stats(const bg_admit *a, bg_admit_stats *out)
{
    *out = a->st;
    out->kv_blocks = a->n_blocks;
    out->block_size = a->block_size;
    out->max_model_len = a->max_model_len;
    out->limit = (int64_t)a->limit;
    out->ceiling = a->ceiling;
    out->used_share = a->use_ratio;
    out->prompt_share = a->charged_all > 0 ? a->charged_prompt / a->charged_all : -1;
    out->effective = a->effective;
    out->stale = a->stale;
    out->learned = learned(a);
    out->reserve_out = reserve_tokens(a);
    out->out_p50 = a->out_p50;
    out->out_q = a->out_q;
    out->prompt_ratio = a->prompt_ratio;
    out->last_sample_t = a->last_sample_t;
}
