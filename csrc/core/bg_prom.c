/* bg_prom.c - Prometheus text parser for the vLLM series admission reads
 * (see bg_prom.h). Every read is bounded by `end`: the text may be huge,
 * truncated anywhere or not text at all. */
#include "bg_prom.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

enum series {
    S_NONE = 0,
    S_KV,
    S_KV_V0,
    S_RUNNING,
    S_WAITING,
    S_PREEMPT,
    S_CACHE_CONFIG,
};

static const struct {
    const char *name;
    enum series s;
} known[] = {
    {"vllm:kv_cache_usage_perc", S_KV},
    {"vllm:gpu_cache_usage_perc", S_KV_V0},
    {"vllm:num_requests_running", S_RUNNING},
    {"vllm:num_requests_waiting", S_WAITING},
    {"vllm:num_preemptions_total", S_PREEMPT},
    {"vllm:cache_config_info", S_CACHE_CONFIG},
};

static bool is_name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
}

static bool is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9');
}

static const char *skip_blank(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

/* A label value between quotes, escapes kept: [v, v + n). */
typedef struct {
    const char *v;
    size_t n;
    bool present;
} span;

/* Does an escaped label value equal s (unescaped)? */
static bool label_equals(span l, const char *s)
{
    size_t i = 0, k = 0, sl = strlen(s);
    while (i < l.n) {
        char c = l.v[i++];
        if (c == '\\' && i < l.n) {
            char e = l.v[i++];
            c = e == 'n' ? '\n' : e;
        }
        if (k >= sl || s[k++] != c)
            return false;
    }
    return k == sl;
}

/* A non-negative decimal integer label value ("1234"); -1 otherwise ("None"). */
static int64_t label_int(span l)
{
    if (!l.present || l.n == 0 || l.n > 18)
        return -1;
    int64_t v = 0;
    for (size_t i = 0; i < l.n; i++) {
        if (l.v[i] < '0' || l.v[i] > '9')
            return -1;
        v = v * 10 + (l.v[i] - '0');
    }
    return v;
}

static bool ieq(const char *a, size_t n, const char *lit)
{
    size_t m = strlen(lit);
    if (n != m)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = a[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != lit[i])
            return false;
    }
    return true;
}

/* Locale-independent float: [+-]digits[.digits][e[+-]digits], NaN, Inf.
 * Returns false if the token is not entirely a number. */
static bool parse_value(const char *p, size_t n, double *out)
{
    if (n == 0 || n > 64)
        return false;
    size_t i = 0;
    bool neg = false;
    if (p[i] == '+' || p[i] == '-')
        neg = p[i++] == '-';
    if (ieq(p + i, n - i, "nan")) {
        *out = NAN;
        return true;
    }
    if (ieq(p + i, n - i, "inf") || ieq(p + i, n - i, "infinity")) {
        *out = neg ? -INFINITY : INFINITY;
        return true;
    }
    double mant = 0;
    int exp10 = 0, digits = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9') {
        if (digits < 19)
            mant = mant * 10 + (p[i] - '0');
        else
            exp10++;
        digits++;
        i++;
    }
    if (i < n && p[i] == '.') {
        i++;
        while (i < n && p[i] >= '0' && p[i] <= '9') {
            if (digits < 19) {
                mant = mant * 10 + (p[i] - '0');
                exp10--;
            }
            digits++;
            i++;
        }
    }
    if (digits == 0)
        return false;
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        i++;
        bool eneg = false;
        if (i < n && (p[i] == '+' || p[i] == '-'))
            eneg = p[i++] == '-';
        int e = 0, ed = 0;
        while (i < n && p[i] >= '0' && p[i] <= '9') {
            if (e < 100000)
                e = e * 10 + (p[i] - '0');
            ed++;
            i++;
        }
        if (ed == 0)
            return false;
        exp10 += eneg ? -e : e;
    }
    if (i != n)
        return false;
    double v = mant;
    if (exp10 > 400)
        v = mant == 0 ? 0 : INFINITY;
    else if (exp10 < -400)
        v = 0;
    else if (exp10 < 0)
        v = mant / pow(10.0, -exp10); /* exact powers up to 1e22: correctly rounded */
    else if (exp10 > 0)
        v = mant * pow(10.0, exp10);
    *out = neg ? -v : v;
    return true;
}

typedef struct {
    enum series s;
    span model_name, num_gpu_blocks, block_size;
    double value;
} sample_line;

/* Parse one line [p, end) (no newline). Returns 1 for a sample, 0 for a blank
 * or comment line, -1 for garbage. Labels are only kept for known series. */
static int parse_line(const char *p, const char *end, sample_line *out)
{
    p = skip_blank(p, end);
    if (p == end || *p == '#')
        return 0;
    if (!is_name_start(*p))
        return -1;
    const char *name = p;
    while (p < end && is_name_char(*p))
        p++;
    size_t name_len = (size_t)(p - name);
    out->s = S_NONE;
    for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++) {
        if (strlen(known[k].name) == name_len && memcmp(known[k].name, name, name_len) == 0) {
            out->s = known[k].s;
            break;
        }
    }
    memset(&out->model_name, 0, sizeof(span));
    memset(&out->num_gpu_blocks, 0, sizeof(span));
    memset(&out->block_size, 0, sizeof(span));
    const char *after_name = p;
    p = skip_blank(p, end);
    bool labels = p < end && *p == '{';
    if (!labels)
        p = after_name;
    if (labels) {
        p++;
        for (;;) {
            p = skip_blank(p, end);
            if (p < end && *p == '}') {
                p++;
                break;
            }
            if (p >= end || !is_name_start(*p) || *p == ':')
                return -1;
            const char *ln = p;
            while (p < end && is_name_char(*p) && *p != ':')
                p++;
            size_t ll = (size_t)(p - ln);
            p = skip_blank(p, end);
            if (p >= end || *p != '=')
                return -1;
            p = skip_blank(p + 1, end);
            if (p >= end || *p != '"')
                return -1;
            const char *v = ++p;
            while (p < end && *p != '"') {
                if (*p == '\\') {
                    if (p + 1 >= end)
                        return -1;
                    p++;
                }
                p++;
            }
            if (p >= end)
                return -1;
            span sv = {v, (size_t)(p - v), true};
            p++; /* closing quote */
            if (ll == 10 && memcmp(ln, "model_name", 10) == 0)
                out->model_name = sv;
            else if (ll == 14 && memcmp(ln, "num_gpu_blocks", 14) == 0)
                out->num_gpu_blocks = sv;
            else if (ll == 10 && memcmp(ln, "block_size", 10) == 0)
                out->block_size = sv;
            p = skip_blank(p, end);
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == '}') {
                p++;
                break;
            }
            return -1;
        }
    }
    const char *before = p;
    p = skip_blank(p, end);
    if (p == before || p == end)
        return -1; /* a value must follow, after a blank */
    const char *vs = p;
    while (p < end && *p != ' ' && *p != '\t')
        p++;
    if (!parse_value(vs, (size_t)(p - vs), &out->value))
        return -1;
    /* An optional integer timestamp may follow; anything else is garbage. */
    p = skip_blank(p, end);
    if (p < end) {
        if (*p == '-' || *p == '+')
            p++;
        const char *ts = p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == ts || skip_blank(p, end) != end)
            return -1;
    }
    return 1;
}

unsigned bg_prom_parse(const char *text, size_t len, const char *model, bg_prom_sample *out)
{
    memset(out, 0, sizeof(*out));
    out->num_gpu_blocks = out->block_size = -1;
    if (!text)
        return 0;
    bool filter = model && model[0];
    double kv = -1, kv_v0 = -1;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *lend = le;
        if (lend > p && lend[-1] == '\r')
            lend--;
        sample_line sl;
        int rc = parse_line(p, lend, &sl);
        p = nl ? nl + 1 : end;
        if (rc == 0)
            continue;
        if (rc < 0) {
            out->bad_lines++;
            continue;
        }
        out->lines++;
        if (sl.s == S_NONE)
            continue;
        if (filter && sl.model_name.present && !label_equals(sl.model_name, model))
            continue;
        double v = sl.value;
        switch (sl.s) {
        case S_KV:
        case S_KV_V0:
            if (isnan(v))
                break;
            v = v < 0 ? 0 : v > 1 ? 1 : v;
            if (sl.s == S_KV)
                kv = v > kv ? v : kv;
            else
                kv_v0 = v > kv_v0 ? v : kv_v0;
            break;
        case S_RUNNING:
        case S_WAITING:
        case S_PREEMPT:
            if (!isfinite(v) || v < 0)
                break;
            if (sl.s == S_RUNNING) {
                out->running += v;
                out->found |= BG_PROM_RUNNING;
            } else if (sl.s == S_WAITING) {
                out->waiting += v;
                out->found |= BG_PROM_WAITING;
            } else {
                out->preemptions += v;
                out->found |= BG_PROM_PREEMPTIONS;
            }
            break;
        case S_CACHE_CONFIG: {
            int64_t nb = label_int(sl.num_gpu_blocks), bs = label_int(sl.block_size);
            if (nb <= 0 || bs <= 0)
                break;
            if (out->num_gpu_blocks < 0)
                out->num_gpu_blocks = 0;
            if (out->num_gpu_blocks <= INT64_MAX / 2 - nb)
                out->num_gpu_blocks += nb;
            if (bs > out->block_size)
                out->block_size = bs;
            out->found |= BG_PROM_CACHE_CONFIG;
            break;
        }
        default:
            break;
        }
    }
    /* The v1 name wins; the v0 alias serves older servers. */
    if (kv >= 0 || kv_v0 >= 0) {
        out->kv_usage = kv >= 0 ? kv : kv_v0;
        out->found |= BG_PROM_KV_USAGE;
    }
    return out->found;
}
