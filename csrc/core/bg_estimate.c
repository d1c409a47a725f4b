/* bg_estimate.c - script-aware token estimator (see bg_estimate.h). */
#include "bg_estimate.h"

#include <pthread.h>
#include <string.h>

/* Code point classes. OTHER is split by UTF-8 length because byte-level BPE
 * tokenizers spend tokens roughly per byte on scripts they saw rarely. */
enum cp_class {
    C_HANGUL = 0,
    C_CJK,
    C_LETTER,
    C_DIGIT,
    C_NEWLINE,
    C_SPACE,
    C_EMOJI,
    C_PUNCT,
    C_OTHER1,
    C_OTHER2,
    C_OTHER3,
    C_OTHER4,
    C_NCLASSES
};

/* Milli-tokens per feature, fitted by benchmarks/calibrate_estimator.py
 * (non-negative least squares, error weighted by 1/true tokens) against the
 * Qwen2/2.5 vocabulary on konlpy's Korean corpora, CPython's English docs and
 * synthetic mixed reviews. Held-out error per text ~8 %, per 50-text batch
 * ~2 % (README, "Token estimator"). */
#define W_HANGUL 835
#define W_HANGUL_RUNS 176
#define W_CJK 1128
#define W_LETTER 57
#define W_LETTER_RUNS 780
#define W_DIGIT 1260
#define W_PUNCT 55
#define W_PUNCT_RUNS 1080
#define W_NEWLINE 301
#define W_EMOJI 2019
#define W_OTHER_BYTES 396
#define W_EXTRA_SPACES 65

const int32_t bg_est_weights[BG_NFEATURES] = {
    [BG_F_HANGUL] = W_HANGUL,
    [BG_F_HANGUL_RUNS] = W_HANGUL_RUNS,
    [BG_F_CJK] = W_CJK,
    [BG_F_LETTER] = W_LETTER,
    [BG_F_LETTER_RUNS] = W_LETTER_RUNS,
    [BG_F_DIGIT] = W_DIGIT,
    [BG_F_PUNCT] = W_PUNCT,
    [BG_F_PUNCT_RUNS] = W_PUNCT_RUNS,
    [BG_F_NEWLINE] = W_NEWLINE,
    [BG_F_EMOJI] = W_EMOJI,
    [BG_F_OTHER_BYTES] = W_OTHER_BYTES,
    [BG_F_EXTRA_SPACES] = W_EXTRA_SPACES,
};

/* The same weights per class: the hot loop then needs two lookups per code
 * point. Every space but the first of a run counts: all count, one per run
 * is taken back. */
static const int64_t per_char_weight[C_NCLASSES] = {
    [C_HANGUL] = W_HANGUL,
    [C_CJK] = W_CJK,
    [C_LETTER] = W_LETTER,
    [C_DIGIT] = W_DIGIT,
    [C_NEWLINE] = W_NEWLINE,
    [C_SPACE] = W_EXTRA_SPACES,
    [C_EMOJI] = W_EMOJI,
    [C_PUNCT] = W_PUNCT,
    [C_OTHER1] = 1 * W_OTHER_BYTES,
    [C_OTHER2] = 2 * W_OTHER_BYTES,
    [C_OTHER3] = 3 * W_OTHER_BYTES,
    [C_OTHER4] = 4 * W_OTHER_BYTES,
};
static const int64_t per_run_weight[C_NCLASSES] = {
    [C_HANGUL] = W_HANGUL_RUNS,
    [C_LETTER] = W_LETTER_RUNS,
    [C_PUNCT] = W_PUNCT_RUNS,
    [C_SPACE] = -W_EXTRA_SPACES,
};

static inline enum cp_class classify_wide(uint32_t cp)
{
    if (cp >= 0xAC00 && cp <= 0xD7A3)
        return C_HANGUL;
    if ((cp >= 0x1100 && cp <= 0x11FF) || (cp >= 0x3130 && cp <= 0x318F) ||
        (cp >= 0xA960 && cp <= 0xA97F) || (cp >= 0xD7B0 && cp <= 0xD7FF))
        return C_HANGUL;
    if ((cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3040 && cp <= 0x30FF) ||
        (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0xF900 && cp <= 0xFAFF) ||
        (cp >= 0x20000 && cp <= 0x3FFFF))
        return C_CJK;
    if ((cp >= 0x100 && cp <= 0x24F) || (cp >= 0x370 && cp <= 0x4FF))
        return C_LETTER;
    if (cp == 0x3000)
        return C_SPACE;
    if ((cp >= 0x1F000 && cp <= 0x1FAFF) || (cp >= 0x2600 && cp <= 0x27BF) ||
        (cp >= 0x2B00 && cp <= 0x2BFF) || cp == 0x200D ||
        (cp >= 0xFE00 && cp <= 0xFE0F) || (cp >= 0xE0000 && cp <= 0xE007F))
        return C_EMOJI;
    if ((cp >= 0x2000 && cp <= 0x206F) || (cp >= 0x3001 && cp <= 0x303F) ||
        (cp >= 0xFF00 && cp <= 0xFFEF))
        return C_PUNCT;
    if (cp < 0x800)
        return C_OTHER2;
    if (cp < 0x10000)
        return C_OTHER3;
    return C_OTHER4;
}

static enum cp_class classify_latin1(uint32_t cp)
{
    if ((cp >= 'A' && cp <= 'Z') || (cp >= 'a' && cp <= 'z'))
        return C_LETTER;
    if (cp >= '0' && cp <= '9')
        return C_DIGIT;
    if (cp == '\n')
        return C_NEWLINE;
    if (cp == ' ' || cp == '\t' || cp == '\r' || cp == '\v' || cp == '\f' || cp == 0xA0)
        return C_SPACE;
    if ((cp >= 0x21 && cp <= 0x2F) || (cp >= 0x3A && cp <= 0x40) ||
        (cp >= 0x5B && cp <= 0x60) || (cp >= 0x7B && cp <= 0x7E) ||
        (cp >= 0xA1 && cp <= 0xBF) || cp == 0xD7 || cp == 0xF7)
        return C_PUNCT;
    if (cp >= 0xC0)
        return C_LETTER;
    return cp < 0x80 ? C_OTHER1 : C_OTHER2;
}

/* Lookup tables built once: the class of every BMP code point (64 KiB, so
 * 1- and 2-byte strings classify with one load), and the milli-tokens a code
 * point of class c adds after one of class p (its own weight, plus its
 * class's run weight when it starts a run), at [p << 4 | c]. With them the
 * estimate is two loads and an add per code point, no counters in memory;
 * the loop takes four code points a turn into two sums, so their loads do
 * not wait on each other (0.72 -> 0.52 ns per code point in cache, the
 * benchmark's reviews). */
#define NO_CLASS C_NCLASSES
/* The step table packs a class in 4 bits, NO_CLASS included. */
_Static_assert(C_NCLASSES < 16, "character classes must fit in 4 bits");
typedef struct {
    unsigned char bmp[0x10000];
    int32_t step[(C_NCLASSES + 1) * 16]; /* [prev << 4 | cls] */
} lookup_tables;

static lookup_tables tables;
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void tables_build(void)
{
    for (uint32_t cp = 0; cp < 0x10000; cp++)
        tables.bmp[cp] = (unsigned char)(cp < 256 ? classify_latin1(cp) : classify_wide(cp));
    for (int p = 0; p <= C_NCLASSES; p++)
        for (int c = 0; c < C_NCLASSES; c++)
            tables.step[p << 4 | c] =
                (int32_t)(per_char_weight[c] + (p != c ? per_run_weight[c] : 0));
}

static const lookup_tables *get_tables(void)
{
    pthread_once(&tables_once, tables_build);
    return &tables;
}

static inline int classify(const lookup_tables *t, uint32_t cp)
{
    return cp < 0x10000 ? t->bmp[cp] : (int)classify_wide(cp);
}

/* Per storage width: milli-tokens of a text, and per-class counts. */
#define DEFINE_WIDTH_LOOPS(SUFFIX, CHAR_T)                                           \
    static int64_t script_milli_##SUFFIX(const lookup_tables *t, const CHAR_T *s,    \
                                         size_t len)                                 \
    {                                                                                \
        int64_t m0 = 0, m1 = 0;                                                      \
        unsigned prev = NO_CLASS;                                                    \
        size_t i = 0;                                                                \
        for (; i + 4 <= len; i += 4) {                                               \
            unsigned c0 = (unsigned)classify(t, (uint32_t)s[i]);                     \
            unsigned c1 = (unsigned)classify(t, (uint32_t)s[i + 1]);                 \
            unsigned c2 = (unsigned)classify(t, (uint32_t)s[i + 2]);                 \
            unsigned c3 = (unsigned)classify(t, (uint32_t)s[i + 3]);                 \
            m0 += t->step[prev << 4 | c0] + t->step[c1 << 4 | c2];                   \
            m1 += t->step[c0 << 4 | c1] + t->step[c2 << 4 | c3];                     \
            prev = c3;                                                               \
        }                                                                            \
        for (; i < len; i++) {                                                       \
            unsigned c = (unsigned)classify(t, (uint32_t)s[i]);                      \
            m0 += t->step[prev << 4 | c];                                            \
            prev = c;                                                                \
        }                                                                            \
        return m0 + m1;                                                              \
    }                                                                                \
    static void count_classes_##SUFFIX(const lookup_tables *t, const CHAR_T *s,      \
                                       size_t len, uint64_t chars[C_NCLASSES],       \
                                       uint64_t runs[C_NCLASSES])                    \
    {                                                                                \
        int prev = NO_CLASS;                                                         \
        for (size_t i = 0; i < len; i++) {                                           \
            int cls = classify(t, (uint32_t)s[i]);                                   \
            chars[cls]++;                                                            \
            runs[cls] += (cls != prev);                                              \
            prev = cls;                                                              \
        }                                                                            \
    }

DEFINE_WIDTH_LOOPS(ucs1, uint8_t)
DEFINE_WIDTH_LOOPS(ucs2, uint16_t)
DEFINE_WIDTH_LOOPS(ucs4, uint32_t)

static void count_classes(const void *data, size_t len, int width,
                          uint64_t chars[C_NCLASSES], uint64_t runs[C_NCLASSES])
{
    const lookup_tables *t = get_tables();
    memset(chars, 0, sizeof(uint64_t) * C_NCLASSES);
    memset(runs, 0, sizeof(uint64_t) * C_NCLASSES);
    switch (width) {
    case 1: count_classes_ucs1(t, (const uint8_t *)data, len, chars, runs); break;
    case 2: count_classes_ucs2(t, (const uint16_t *)data, len, chars, runs); break;
    default: count_classes_ucs4(t, (const uint32_t *)data, len, chars, runs); break;
    }
}

static void features_from_classes(const uint64_t chars[C_NCLASSES],
                                  const uint64_t runs[C_NCLASSES], bg_features *out)
{
    uint64_t *f = out->f;
    f[BG_F_HANGUL] = chars[C_HANGUL];
    f[BG_F_HANGUL_RUNS] = runs[C_HANGUL];
    f[BG_F_CJK] = chars[C_CJK];
    f[BG_F_LETTER] = chars[C_LETTER];
    f[BG_F_LETTER_RUNS] = runs[C_LETTER];
    f[BG_F_DIGIT] = chars[C_DIGIT];
    f[BG_F_PUNCT] = chars[C_PUNCT];
    f[BG_F_PUNCT_RUNS] = runs[C_PUNCT];
    f[BG_F_NEWLINE] = chars[C_NEWLINE];
    f[BG_F_EMOJI] = chars[C_EMOJI];
    f[BG_F_OTHER_BYTES] = chars[C_OTHER1] + 2 * chars[C_OTHER2] +
                          3 * chars[C_OTHER3] + 4 * chars[C_OTHER4];
    f[BG_F_EXTRA_SPACES] = chars[C_SPACE] - runs[C_SPACE];
}

void bg_features_ucs(const void *data, size_t len, int width, bg_features *out)
{
    uint64_t chars[C_NCLASSES], runs[C_NCLASSES];
    count_classes(data, len, width, chars, runs);
    features_from_classes(chars, runs, out);
}

static uint64_t milli_to_tokens(int64_t milli)
{
    if (milli <= 1000)
        return 1; /* a non-empty text is at least one token */
    return (uint64_t)((milli + 999) / 1000);
}

uint64_t bg_estimate_ucs(const void *data, size_t len, int width,
                         enum bg_est_method method)
{
    if (len == 0)
        return 0;
    if (method == BG_EST_CHARS)
        return bg_estimate_chars_rule(len);
    const lookup_tables *t = get_tables();
    int64_t milli;
    switch (width) {
    case 1: milli = script_milli_ucs1(t, (const uint8_t *)data, len); break;
    case 2: milli = script_milli_ucs2(t, (const uint16_t *)data, len); break;
    default: milli = script_milli_ucs4(t, (const uint32_t *)data, len); break;
    }
    return milli_to_tokens(milli);
}

/* Decode one UTF-8 sequence; rejects overlongs, surrogates and > U+10FFFF. */
static int utf8_next(const unsigned char *s, size_t len, size_t *i, uint32_t *cp)
{
    unsigned char b = s[*i];
    uint32_t c;
    size_t need;
    uint32_t min;
    if (b < 0x80) {
        *cp = b;
        *i += 1;
        return 0;
    } else if ((b & 0xE0) == 0xC0) {
        c = b & 0x1F; need = 1; min = 0x80;
    } else if ((b & 0xF0) == 0xE0) {
        c = b & 0x0F; need = 2; min = 0x800;
    } else if ((b & 0xF8) == 0xF0) {
        c = b & 0x07; need = 3; min = 0x10000;
    } else {
        return -1;
    }
    if (len - *i <= need)
        return -1;
    for (size_t k = 1; k <= need; k++) {
        unsigned char cb = s[*i + k];
        if ((cb & 0xC0) != 0x80)
            return -1;
        c = (c << 6) | (cb & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
        return -1;
    *cp = c;
    *i += need + 1;
    return 0;
}

int bg_estimate_utf8(const char *str, size_t len, enum bg_est_method method,
                     uint64_t *tokens, size_t *err_offset)
{
    const unsigned char *s = (const unsigned char *)str;
    const lookup_tables *t = get_tables();
    int64_t milli = 0;
    uint64_t ncp = 0;
    int prev = NO_CLASS;
    size_t i = 0;
    while (i < len) {
        size_t at = i;
        uint32_t cp;
        if (utf8_next(s, len, &i, &cp) < 0) {
            if (err_offset)
                *err_offset = at;
            return -1;
        }
        int cls = classify(t, cp);
        milli += t->step[prev << 4 | cls];
        prev = cls;
        ncp++;
    }
    if (ncp == 0)
        *tokens = 0;
    else if (method == BG_EST_CHARS)
        *tokens = bg_estimate_chars_rule(ncp);
    else
        *tokens = milli_to_tokens(milli);
    return 0;
}
