/* fuzz_sizing.c - libFuzzer target for the estimator and the planner.
 * Any input: the UTF-8 estimator must agree with the code point path or
 * reject the bytes, and every plan must keep the budget, lose nothing and
 * duplicate nothing. Violations abort, which the fuzzer reports.
 *   make -C tests/c fuzz FUZZ_SECONDS=30 */
#include "bg_estimate.h"
#include "bg_plan.h"
#include "plan_invariants.h"

#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static void fuzz_estimate(const uint8_t *data, size_t size)
{
    uint64_t tokens[2];
    size_t bad = 0;
    int rc0 = bg_estimate_utf8((const char *)data, size, BG_EST_SCRIPT, &tokens[0], &bad);
    int rc1 = bg_estimate_utf8((const char *)data, size, BG_EST_CHARS, &tokens[1], &bad);
    REQUIRE(rc0 == rc1);
    if (rc0 < 0) {
        REQUIRE(bad < size);
        return;
    }
    /* Decode with a plain loop (input is known valid now) and compare. */
    uint32_t *cps = malloc((size + 1) * sizeof *cps);
    REQUIRE(cps);
    size_t n = 0;
    for (size_t i = 0; i < size;) {
        uint8_t b = data[i];
        size_t len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
        uint32_t cp = len == 1 ? b : (uint32_t)(b & (0x7F >> len));
        for (size_t k = 1; k < len; k++)
            cp = (cp << 6) | (data[i + k] & 0x3F);
        cps[n++] = cp;
        i += len;
    }
    REQUIRE(bg_estimate_ucs(cps, n, 4, BG_EST_SCRIPT) == tokens[0]);
    REQUIRE(bg_estimate_ucs(cps, n, 4, BG_EST_CHARS) == tokens[1]);
    REQUIRE((tokens[0] == 0) == (n == 0));
    free(cps);
}

static void fuzz_plan(const uint8_t *data, size_t size)
{
    if (size < 6)
        return;
    bg_plan_limits lim = {
        .budget = 1 + (data[0] | (uint64_t)data[1] << 8),
        .max_items = data[2] % 16,
        .oversize = (data[3] & 1) ? BG_OVERSIZE_ALONE : BG_OVERSIZE_ERROR,
    };
    lim.overhead = (data[4] | (uint64_t)data[5] << 8) % lim.budget;
    data += 6;
    size -= 6;
    size_t n = size / 2;
    uint64_t *tok = malloc((n + 1) * sizeof *tok);
    REQUIRE(tok);
    for (size_t i = 0; i < n; i++)
        tok[i] = data[2 * i] | (uint64_t)data[2 * i + 1] << 8;
    for (int packed = 0; packed < 2; packed++) {
        bg_plan p;
        size_t bad = 0;
        int rc = packed ? bg_plan_packed(tok, n, &lim, &p, &bad)
                        : bg_plan_contiguous(tok, n, &lim, &p, &bad);
        if (rc == BG_PLAN_OVERSIZE) {
            REQUIRE(lim.oversize == BG_OVERSIZE_ERROR && bad < n);
            REQUIRE(tok[bad] + lim.overhead > lim.budget);
            for (size_t i = 0; i < bad; i++)
                REQUIRE(tok[i] + lim.overhead <= lim.budget);
        } else {
            REQUIRE(rc == BG_PLAN_OK);
            REQUIRE(plan_violation(tok, n, &lim, &p) == NULL);
            bg_plan_free(&p);
        }
    }
    free(tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_estimate(data, size);
    fuzz_plan(data, size);
    return 0;
}
