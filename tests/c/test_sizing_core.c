/* test_sizing_core.c - the estimator and planner without Python, meant to run
 * under ASan/UBSan and valgrind. Exits non-zero on the first failed check. */
#include "bg_estimate.h"
#include "check.h"
#include "plan_invariants.h"
#include "bg_plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

static uint32_t random_cp(void)
{
    static const uint32_t picks[] = {'a', 'Z', '7', ' ', ' ', '\n', '!', 0xAC00, 0xD55C, 0x4E2D,
                                     0x3042, 0x1F600, 0x200D, 0xFE0F, 0xE9, 0x416, 0x3000,
                                     0x2026, 0x0E01, 0x10FFFF, 0x7F, 0x80};
    if (rnd() % 4 == 0) {
        uint32_t cp = (uint32_t)(rnd() % 0x110000);
        return (cp >= 0xD800 && cp <= 0xDFFF) ? 'x' : cp;
    }
    return picks[rnd() % (sizeof picks / sizeof picks[0])];
}

/* UTF-8 and code point arrays of every width must estimate the same. */
static void test_utf8_matches_ucs(void)
{
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = rnd() % 200;
        uint32_t *ucs4 = malloc((n + 1) * sizeof *ucs4);
        uint16_t *ucs2 = malloc((n + 1) * sizeof *ucs2);
        uint8_t *ucs1 = malloc(n + 1);
        char *utf8 = malloc(4 * n + 1);
        size_t blen = 0;
        int narrow1 = 1, narrow2 = 1;
        for (size_t i = 0; i < n; i++) {
            uint32_t cp = random_cp();
            if (iter % 3 == 0)
                cp &= 0xFF; /* some all-Latin-1 strings */
            ucs4[i] = cp;
            narrow1 &= cp < 0x100;
            narrow2 &= cp < 0x10000;
            ucs2[i] = (uint16_t)cp;
            ucs1[i] = (uint8_t)cp;
            blen += utf8_encode(cp, utf8 + blen);
        }
        for (int m = 0; m < 2; m++) {
            uint64_t want = bg_estimate_ucs(ucs4, n, 4, (enum bg_est_method)m), got = 0;
            size_t bad = 0;
            CHECK(bg_estimate_utf8(utf8, blen, (enum bg_est_method)m, &got, &bad) == 0);
            CHECK(got == want);
            if (narrow2)
                CHECK(bg_estimate_ucs(ucs2, n, 2, (enum bg_est_method)m) == want);
            if (narrow1)
                CHECK(bg_estimate_ucs(ucs1, n, 1, (enum bg_est_method)m) == want);
            CHECK((want == 0) == (n == 0));
        }
        free(ucs4); free(ucs2); free(ucs1); free(utf8);
    }
}

/* The estimate (one table step per code point) against the plain sum of
 * features x weights, on review-like text: long Hangul/ASCII stretches with
 * everything else mixed in, at every length and storage width. */
static uint64_t estimate_from_features(const void *data, size_t n, int width)
{
    if (n == 0)
        return 0;
    bg_features f;
    bg_features_ucs(data, n, width, &f);
    int64_t milli = 0;
    for (int k = 0; k < BG_NFEATURES; k++)
        milli += (int64_t)f.f[k] * bg_est_weights[k];
    return milli <= 1000 ? 1 : (uint64_t)((milli + 999) / 1000);
}

static uint32_t review_cp(void)
{
    static const uint32_t common[] = {0xAC00, 0xB9DB, 0xC788, 0xC5B4, 0xC694, 0xD7A3, ' ',
                                      ' ', 'a', 'Z', 'q', '0', '9', '.', '!', '~', '\n',
                                      0x314B, 0x3131};
    if (rnd() % 8)
        return common[rnd() % (sizeof common / sizeof common[0])];
    return random_cp();
}

static void test_estimate_matches_features(void)
{
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = iter < 80 ? (size_t)iter : rnd() % 700;
        uint32_t *ucs4 = malloc((n + 1) * sizeof *ucs4);
        uint16_t *ucs2 = malloc((n + 1) * sizeof *ucs2);
        uint8_t *ucs1 = malloc(n + 1);
        int narrow1 = 1, narrow2 = 1;
        for (size_t i = 0; i < n; i++) {
            uint32_t cp = review_cp();
            if (iter % 5 == 0)
                cp &= 0xFF;
            if (iter % 7 == 0 && cp >= 0x10000)
                cp = 0xD800 + (cp & 0x7FF); /* lone surrogates, as CPython can hold */
            ucs4[i] = cp;
            narrow1 &= cp < 0x100;
            narrow2 &= cp < 0x10000;
            ucs2[i] = (uint16_t)cp;
            ucs1[i] = (uint8_t)cp;
        }
        uint64_t want = estimate_from_features(ucs4, n, 4);
        CHECK(bg_estimate_ucs(ucs4, n, 4, BG_EST_SCRIPT) == want);
        if (narrow2) {
            CHECK(estimate_from_features(ucs2, n, 2) == want);
            CHECK(bg_estimate_ucs(ucs2, n, 2, BG_EST_SCRIPT) == want);
        }
        if (narrow1) {
            CHECK(estimate_from_features(ucs1, n, 1) == want);
            CHECK(bg_estimate_ucs(ucs1, n, 1, BG_EST_SCRIPT) == want);
        }
        free(ucs4); free(ucs2); free(ucs1);
    }
}

static void test_invalid_utf8(void)
{
    static const char *bad[] = {"\x80", "ab\xC3", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80",
                                "ok\xFF", "\xE2\x82"};
    static const size_t at[] = {0, 2, 0, 0, 0, 2, 0};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t t = 0;
        size_t off = 99;
        CHECK(bg_estimate_utf8(bad[i], strlen(bad[i]), BG_EST_SCRIPT, &t, &off) == -1);
        CHECK(off == at[i]);
    }
}

static void test_features(void)
{
    /* "ab  c\n가나 😀!!" */
    const uint32_t s[] = {'a', 'b', ' ', ' ', 'c', '\n', 0xAC00, 0xB098, ' ', 0x1F600, '!', '!'};
    bg_features f;
    bg_features_ucs(s, sizeof s / sizeof s[0], 4, &f);
    CHECK(f.f[BG_F_LETTER] == 3 && f.f[BG_F_LETTER_RUNS] == 2);
    CHECK(f.f[BG_F_EXTRA_SPACES] == 1);
    CHECK(f.f[BG_F_NEWLINE] == 1);
    CHECK(f.f[BG_F_HANGUL] == 2 && f.f[BG_F_HANGUL_RUNS] == 1);
    CHECK(f.f[BG_F_EMOJI] == 1);
    CHECK(f.f[BG_F_PUNCT] == 2 && f.f[BG_F_PUNCT_RUNS] == 1);
    CHECK(bg_estimate_chars_rule(7) == 2 && bg_estimate_chars_rule(8) == 3);
}

static void check_plan(const uint64_t *tok, size_t n, const bg_plan_limits *lim,
                       const bg_plan *p, int packed)
{
    const char *bad = plan_violation(tok, n, lim, p);
    if (bad)
        fprintf(stderr, "plan of %zu items: %s\n", n, bad);
    CHECK(bad == NULL);
    CHECK(packed || p->order == NULL);
}

static void test_planner_random(void)
{
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = rnd() % 300;
        uint64_t *tok = malloc((n + 1) * sizeof *tok);
        for (size_t i = 0; i < n; i++)
            tok[i] = rnd() % 8 == 0 ? rnd() % 400 : rnd() % 40;
        bg_plan_limits lim = {
            .budget = 1 + rnd() % 300,
            .max_items = rnd() % 3 ? rnd() % 20 : 0,
            .oversize = BG_OVERSIZE_ALONE,
        };
        lim.overhead = rnd() % 2 ? rnd() % lim.budget : 0;
        for (int packed = 0; packed < 2; packed++) {
            bg_plan p;
            size_t bad = 0;
            int rc = packed ? bg_plan_packed(tok, n, &lim, &p, &bad)
                            : bg_plan_contiguous(tok, n, &lim, &p, &bad);
            CHECK(rc == BG_PLAN_OK);
            if (rc == BG_PLAN_OK)
                check_plan(tok, n, &lim, &p, packed);
            bg_plan_free(&p);

            bg_plan_limits strict = lim;
            strict.oversize = BG_OVERSIZE_ERROR;
            rc = packed ? bg_plan_packed(tok, n, &strict, &p, &bad)
                        : bg_plan_contiguous(tok, n, &strict, &p, &bad);
            size_t first = n;
            for (size_t i = 0; i < n && first == n; i++)
                if (tok[i] + lim.overhead > lim.budget)
                    first = i;
            if (first < n) {
                CHECK(rc == BG_PLAN_OVERSIZE && bad == first);
            } else {
                CHECK(rc == BG_PLAN_OK);
                check_plan(tok, n, &strict, &p, packed);
            }
            bg_plan_free(&p);
        }
        free(tok);
    }
}

static void test_planner_edges(void)
{
    bg_plan p;
    size_t bad;
    bg_plan_limits zero = {.budget = 0};
    CHECK(bg_plan_contiguous(NULL, 0, &zero, &p, &bad) == BG_PLAN_INVALID);
    bg_plan_limits lim = {.budget = 10};
    CHECK(bg_plan_contiguous(NULL, 0, &lim, &p, &bad) == BG_PLAN_OK && p.nbatches == 0);
    bg_plan_free(&p);
    CHECK(bg_plan_packed(NULL, 0, &lim, &p, &bad) == BG_PLAN_OK && p.nbatches == 0);
    bg_plan_free(&p);
    const uint64_t big[] = {UINT64_MAX / 2, 1};
    lim.oversize = BG_OVERSIZE_ALONE;
    CHECK(bg_plan_contiguous(big, 2, &lim, &p, &bad) == BG_PLAN_OK && p.nbatches == 2 &&
          p.noversize == 1 && p.oversize[0] == 0);
    bg_plan_free(&p);
    CHECK(bg_plan_packed(big, 2, &lim, &p, &bad) == BG_PLAN_OK && p.nbatches == 2 &&
          p.noversize == 1 && p.oversize[0] == 0);
    bg_plan_free(&p);
}

int main(void)
{
    test_features();
    test_utf8_matches_ucs();
    test_estimate_matches_features();
    test_invalid_utf8();
    test_planner_edges();
    test_planner_random();
    if (failures) {
        fprintf(stderr, "test_sizing_core: %d checks failed\n", failures);
        return 1;
    }
    printf("test_sizing_core: all checks passed\n");
    return 0;
}
