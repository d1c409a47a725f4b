/* bg_estimate.h - token estimation from code points, no tokenizer needed.
 *
 * Two methods:
 *  - BG_EST_SCRIPT: a linear model over per-script features (Hangul syllables,
 *    CJK, Latin words, digits, punctuation, emoji, ...), weights fitted against
 *    a real Qwen tokenizer (see benchmarks/calibrate_estimator.py and README).
 *  - BG_EST_CHARS: the original pipeline's chars / 3.5 rule, rounded up per
 *    item so that sums stay conservative.
 *
 * Input is a code point array of width 1, 2 or 4 bytes (exactly CPython's
 * compact string storage, but nothing here depends on Python) or UTF-8.
 */
#ifndef BATCHGATE_BG_ESTIMATE_H
#define BATCHGATE_BG_ESTIMATE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum bg_est_method {
    BG_EST_SCRIPT = 0,
    BG_EST_CHARS = 1,
};

/* Features of the script model, in the order of bg_est_weights. */
enum bg_feature {
    BG_F_HANGUL = 0,   /* Hangul syllables and jamo */
    BG_F_HANGUL_RUNS,  /* maximal runs of Hangul (roughly: words) */
    BG_F_CJK,          /* Han ideographs and kana */
    BG_F_LETTER,       /* Latin, Greek, Cyrillic letters */
    BG_F_LETTER_RUNS,  /* letter runs (roughly: words) */
    BG_F_DIGIT,        /* ASCII digits: Qwen splits numbers into digits */
    BG_F_PUNCT,        /* punctuation and symbols */
    BG_F_PUNCT_RUNS,
    BG_F_NEWLINE,
    BG_F_EMOJI,        /* emoji code points incl. ZWJ and variation selectors */
    BG_F_OTHER_BYTES,  /* anything else, by UTF-8 length (byte-level BPE) */
    BG_F_EXTRA_SPACES, /* spaces beyond the first of each run */
    BG_NFEATURES
};

typedef struct {
    uint64_t f[BG_NFEATURES];
} bg_features;

/* Weights in milli-tokens per feature unit. */
extern const int32_t bg_est_weights[BG_NFEATURES];

/* Features of a code point array (width 1, 2 or 4). */
void bg_features_ucs(const void *data, size_t len, int width, bg_features *out);

/* Estimated tokens of a code point array; 0 only for the empty string. */
uint64_t bg_estimate_ucs(const void *data, size_t len, int width,
                         enum bg_est_method method);

/* Same for UTF-8 text. Returns 0 on success, -1 if the bytes are not valid
 * UTF-8 (then *err_offset is the offending byte's offset). */
int bg_estimate_utf8(const char *s, size_t len, enum bg_est_method method,
                     uint64_t *tokens, size_t *err_offset);

/* The chars / 3.5 rule for a text of n code points: ceil(2n / 7). */
static inline uint64_t bg_estimate_chars_rule(uint64_t n_codepoints)
{
    return (2 * n_codepoints + 6) / 7;
}

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_ESTIMATE_H */
