/* plan_invariants.h - what every bg_plan must satisfy, shared by the C test
 * and the fuzz target: NULL when the plan is sound, else what broke. */
#ifndef BATCHGATE_TEST_PLAN_INVARIANTS_H
#define BATCHGATE_TEST_PLAN_INVARIANTS_H

#include "bg_plan.h"

#include <stdlib.h>

static inline const char *plan_violation(const uint64_t *tok, size_t n,
                                         const bg_plan_limits *lim, const bg_plan *p)
{
    const char *bad = NULL;
    unsigned char *seen = calloc(n + 1, 1);
    if (!seen)
        return "out of memory in the checker";
    if (p->starts[0] != 0 || p->starts[p->nbatches] != n)
        bad = "starts do not span all items";
    for (size_t b = 0; b < p->nbatches && !bad; b++) {
        size_t lo = p->starts[b], hi = p->starts[b + 1];
        if (hi <= lo) {
            bad = "empty batch";
            break;
        }
        uint64_t sum = lim->overhead;
        for (size_t k = lo; k < hi && !bad; k++) {
            size_t item = p->order ? p->order[k] : k;
            if (item >= n)
                bad = "item index out of range";
            else if (seen[item])
                bad = "item planned twice";
            else if (k > lo && p->order && p->order[k] <= p->order[k - 1])
                bad = "items of a batch not in input order";
            else {
                seen[item] = 1;
                sum += tok[item];
            }
        }
        if (bad)
            break;
        if (sum != p->tokens[b])
            bad = "batch token count is wrong";
        else if (sum > lim->budget && (hi - lo != 1 || lim->oversize != BG_OVERSIZE_ALONE))
            bad = "batch over budget";
        else if (sum <= lim->budget && lim->max_items && hi - lo > lim->max_items)
            bad = "batch over max_items";
    }
    for (size_t i = 0; i < n && !bad; i++)
        if (!seen[i])
            bad = "item lost";
    free(seen);
    return bad;
}

#endif /* BATCHGATE_TEST_PLAN_INVARIANTS_H */
