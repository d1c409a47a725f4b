/* bg_plan.h - split items into batches under a hard token budget.
 *
 * Every batch satisfies: overhead + sum(tokens of its items) <= budget and
 * item count <= max_items. An item that alone breaks the budget either stops
 * the plan (BG_OVERSIZE_ERROR) or gets a batch of its own and is reported
 * (BG_OVERSIZE_ALONE).
 */
#ifndef BATCHGATE_BG_PLAN_H
#define BATCHGATE_BG_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum bg_oversize_mode {
    BG_OVERSIZE_ERROR = 0,
    BG_OVERSIZE_ALONE = 1,
};

typedef struct {
    uint64_t budget;    /* max tokens per batch, >= 1 */
    uint64_t overhead;  /* tokens every batch pays (prompt template) */
    size_t max_items;   /* max items per batch; 0 = no limit */
    enum bg_oversize_mode oversize;
} bg_plan_limits;

typedef struct {
    /* Batch b holds order[starts[b] .. starts[b+1]-1]; starts has nbatches+1
     * entries. order is NULL for contiguous plans (order[i] == i). */
    size_t *order;
    size_t *starts;
    uint64_t *tokens;   /* per batch, overhead included */
    size_t nbatches;
    size_t *oversize;   /* item indices planned alone over budget, ascending */
    size_t noversize;
} bg_plan;

enum bg_plan_status {
    BG_PLAN_OK = 0,
    BG_PLAN_NOMEM = -1,
    BG_PLAN_OVERSIZE = -2, /* *bad_item names the first offending item */
    BG_PLAN_INVALID = -3,  /* budget == 0 */
};

/* Order-preserving, contiguous, fewest batches (greedy is optimal here). */
int bg_plan_contiguous(const uint64_t *tokens, size_t n, const bg_plan_limits *lim,
                       bg_plan *out, size_t *bad_item);

/* May reorder: first-fit decreasing, usually fewer batches. Items inside a
 * batch are listed in input order; batches are ordered by their first item. */
int bg_plan_packed(const uint64_t *tokens, size_t n, const bg_plan_limits *lim,
                   bg_plan *out, size_t *bad_item);

void bg_plan_free(bg_plan *p);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_PLAN_H */
