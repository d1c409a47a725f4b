/* bg_plan.c - token-budget batch planner (see bg_plan.h). */
#include "bg_plan.h"

#include <stdlib.h>
#include <string.h>

/* Growable arrays for the plan's outputs. */
#define DEFINE_VEC(NAME, T)                                  \
    typedef struct {                                         \
        T *v;                                                \
        size_t len, cap;                                     \
    } NAME;                                                  \
    static int NAME##_push(NAME *a, T x)                     \
    {                                                        \
        if (a->len == a->cap) {                              \
            size_t cap = a->cap ? a->cap * 2 : 64;           \
            T *v = realloc(a->v, cap * sizeof *v);           \
            if (!v)                                          \
                return -1;                                   \
            a->v = v;                                        \
            a->cap = cap;                                    \
        }                                                    \
        a->v[a->len++] = x;                                  \
        return 0;                                            \
    }

DEFINE_VEC(size_vec, size_t)
DEFINE_VEC(u64_vec, uint64_t)

void bg_plan_free(bg_plan *p)
{
    if (!p)
        return;
    free(p->order);
    free(p->starts);
    free(p->tokens);
    free(p->oversize);
    memset(p, 0, sizeof *p);
}

static bool item_oversize(uint64_t t, const bg_plan_limits *lim)
{
    return lim->overhead > lim->budget || t > lim->budget - lim->overhead;
}

int bg_plan_contiguous(const uint64_t *tokens, size_t n, const bg_plan_limits *lim,
                       bg_plan *out, size_t *bad_item)
{
    memset(out, 0, sizeof *out);
    if (lim->budget == 0)
        return BG_PLAN_INVALID;
    size_vec starts = {0}, oversize = {0};
    u64_vec sums = {0};
    uint64_t room = lim->overhead > lim->budget ? 0 : lim->budget - lim->overhead;
    uint64_t cur = 0; /* tokens of the open batch, overhead excluded */
    size_t cur_n = 0;
    int rc = BG_PLAN_NOMEM;

    for (size_t i = 0; i < n; i++) {
        uint64_t t = tokens[i];
        if (item_oversize(t, lim)) {
            if (lim->oversize == BG_OVERSIZE_ERROR) {
                if (bad_item)
                    *bad_item = i;
                rc = BG_PLAN_OVERSIZE;
                goto fail;
            }
            if (cur_n > 0 && u64_vec_push(&sums, lim->overhead + cur) < 0)
                goto fail;
            if (size_vec_push(&starts, i) < 0 || size_vec_push(&oversize, i) < 0 ||
                u64_vec_push(&sums, lim->overhead + t) < 0)
                goto fail;
            cur = 0;
            cur_n = 0;
            continue;
        }
        bool full = cur_n > 0 && (t > room - cur ||
                                  (lim->max_items && cur_n == lim->max_items));
        if (full) {
            if (u64_vec_push(&sums, lim->overhead + cur) < 0)
                goto fail;
            cur = 0;
            cur_n = 0;
        }
        if (cur_n == 0 && size_vec_push(&starts, i) < 0)
            goto fail;
        cur += t;
        cur_n++;
    }
    if (cur_n > 0 && u64_vec_push(&sums, lim->overhead + cur) < 0)
        goto fail;
    if (size_vec_push(&starts, n) < 0)
        goto fail;
    out->starts = starts.v;
    out->tokens = sums.v;
    out->nbatches = sums.len;
    out->oversize = oversize.v;
    out->noversize = oversize.len;
    return BG_PLAN_OK;
fail:
    free(starts.v);
    free(oversize.v);
    free(sums.v);
    return rc;
}

/* ---- first-fit decreasing ---------------------------------------------- */

typedef struct {
    uint64_t tokens;
    size_t index;
} ranked_item;

static int ranked_desc(const void *a, const void *b)
{
    const ranked_item *x = a, *y = b;
    if (x->tokens != y->tokens)
        return x->tokens < y->tokens ? 1 : -1;
    return x->index < y->index ? -1 : (x->index > y->index);
}

/* Max-tree over bins' free room; a leaf of -1 is a closed or unused bin, so
 * "leftmost bin with room >= t" is one descent. */
typedef struct {
    int64_t *node;
    size_t leaves;
} room_tree;

static int room_tree_init(room_tree *rt, size_t nbins)
{
    rt->leaves = 1;
    while (rt->leaves < nbins)
        rt->leaves *= 2;
    rt->node = malloc(2 * rt->leaves * sizeof *rt->node);
    if (!rt->node)
        return -1;
    for (size_t i = 0; i < 2 * rt->leaves; i++)
        rt->node[i] = -1;
    return 0;
}

static void room_tree_set(room_tree *rt, size_t bin, int64_t room)
{
    size_t i = rt->leaves + bin;
    rt->node[i] = room;
    for (i /= 2; i >= 1; i /= 2) {
        int64_t l = rt->node[2 * i], r = rt->node[2 * i + 1];
        rt->node[i] = l > r ? l : r;
    }
}

/* Leftmost bin with room >= need, or SIZE_MAX. */
static size_t room_tree_find(const room_tree *rt, int64_t need)
{
    if (rt->node[1] < need)
        return SIZE_MAX;
    size_t i = 1;
    while (i < rt->leaves)
        i = rt->node[2 * i] >= need ? 2 * i : 2 * i + 1;
    return i - rt->leaves;
}

int bg_plan_packed(const uint64_t *tokens, size_t n, const bg_plan_limits *lim,
                   bg_plan *out, size_t *bad_item)
{
    memset(out, 0, sizeof *out);
    if (lim->budget == 0)
        return BG_PLAN_INVALID;
    if (lim->budget > (uint64_t)INT64_MAX)
        return BG_PLAN_INVALID;
    if (lim->oversize == BG_OVERSIZE_ERROR) {
        for (size_t i = 0; i < n; i++) {
            if (item_oversize(tokens[i], lim)) {
                if (bad_item)
                    *bad_item = i;
                return BG_PLAN_OVERSIZE;
            }
        }
    }
    int rc = BG_PLAN_NOMEM;
    int64_t room = lim->overhead > lim->budget ? 0 : (int64_t)(lim->budget - lim->overhead);
    ranked_item *ranked = malloc((n ? n : 1) * sizeof *ranked);
    size_t *bin_of = malloc((n ? n : 1) * sizeof *bin_of);
    size_t *bin_count = calloc(n ? n : 1, sizeof *bin_count);
    uint64_t *bin_sum = calloc(n ? n : 1, sizeof *bin_sum);
    size_t *batch_of_bin = malloc((n ? n : 1) * sizeof *batch_of_bin);
    room_tree rt = {0};
    size_vec oversize = {0};
    size_t nbins = 0;
    if (!ranked || !bin_of || !bin_count || !bin_sum || !batch_of_bin ||
        room_tree_init(&rt, n ? n : 1) < 0)
        goto done;

    for (size_t i = 0; i < n; i++) {
        ranked[i].tokens = tokens[i];
        ranked[i].index = i;
    }
    qsort(ranked, n, sizeof *ranked, ranked_desc);

    for (size_t k = 0; k < n; k++) {
        uint64_t t = ranked[k].tokens;
        size_t item = ranked[k].index;
        size_t bin;
        if (item_oversize(t, lim)) {
            bin = nbins++; /* alone, never offered to others */
        } else {
            bin = room_tree_find(&rt, (int64_t)t);
            if (bin == SIZE_MAX) {
                bin = nbins++;
                room_tree_set(&rt, bin, room);
            }
            int64_t left = rt.node[rt.leaves + bin] - (int64_t)t;
            bool full = lim->max_items && bin_count[bin] + 1 == lim->max_items;
            room_tree_set(&rt, bin, full ? -1 : left);
        }
        bin_of[item] = bin;
        bin_count[bin]++;
        bin_sum[bin] += t;
    }

    /* Number batches by their first item in input order; items then fall into
     * place in input order with a counting sort. */
    for (size_t b = 0; b < nbins; b++)
        batch_of_bin[b] = SIZE_MAX;
    out->starts = malloc((nbins + 1) * sizeof *out->starts);
    out->tokens = malloc((nbins ? nbins : 1) * sizeof *out->tokens);
    out->order = malloc((n ? n : 1) * sizeof *out->order);
    if (!out->starts || !out->tokens || !out->order)
        goto done;
    size_t nbatches = 0;
    for (size_t i = 0; i < n; i++) {
        size_t b = bin_of[i];
        if (batch_of_bin[b] == SIZE_MAX) {
            batch_of_bin[b] = nbatches;
            out->starts[nbatches] = bin_count[b]; /* sizes for now */
            out->tokens[nbatches] = lim->overhead + bin_sum[b];
            if (item_oversize(bin_sum[b], lim) && size_vec_push(&oversize, i) < 0)
                goto done;
            nbatches++;
        }
    }
    size_t pos = 0;
    for (size_t b = 0; b < nbatches; b++) {
        size_t sz = out->starts[b];
        out->starts[b] = pos;
        pos += sz;
    }
    out->starts[nbatches] = n;
    {
        /* Second pass fills each batch's slots in input order. */
        size_t *fill = bin_count; /* reused: next free slot per batch */
        for (size_t b = 0; b < nbatches; b++)
            fill[b] = out->starts[b];
        for (size_t i = 0; i < n; i++)
            out->order[fill[batch_of_bin[bin_of[i]]]++] = i;
    }
    out->nbatches = nbatches;
    out->oversize = oversize.v;
    out->noversize = oversize.len;
    oversize.v = NULL;
    rc = BG_PLAN_OK;
done:
    if (rc != BG_PLAN_OK)
        bg_plan_free(out);
    free(oversize.v);
    free(ranked);
    free(bin_of);
    free(bin_count);
    free(bin_sum);
    free(batch_of_bin);
    free(rt.node);
    return rc;
}
