// The attention kernel. Build with -DATTENTION_POSITIONS and -DHD_VEC (vector widths of attention.h's attend) and, for
// work-groups of one work-item (CPUs), -DGQA (query heads per key/value head): a work-group per key/value head and
// token (attend_heads), else one per query head and token (attend). `state` is a sequence's {pos, n_prompt}
// (state.cl), or a batch's {pos, slot} per row (attention.h's ROW_POS).

#include "attention.h"

__kernel void attention(__global const float *query, __global const kv_t *k_cache, __global const kv_t *v_cache,
                        __global float *att, __global float *out, __global const int *state,
                        const int n_heads, const int n_kv_heads, const int head_dim, const int seq_p,
                        const int q_stride, const int out_stride, const int cache_offset, const int slot_stride,
                        __local float *scratch, __global float *parts, __global volatile int *folds) {
#if defined(GQA)
    // With a work-group per key/value head and span of every row (the host's launch for passes of a few rows on a
    // CPU), a row of several spans takes one each (attend_span), and the last to finish folds them (fold_spans) and
    // leaves its count (folds [rows][n_kv_heads], zeros between launches) at 0 again; the stores of the others' sums
    // are seen once it has seen their counts (the CPU drivers' coherent memory and sequentially consistent atomics,
    // as matrix.cl's layers). Else a work-group per head and row takes the row's spans in turn (attend_heads).
    const int j = get_group_id(0) % n_kv_heads, s = get_group_id(0) / n_kv_heads, n = get_group_id(1);
    const int spans = get_num_groups(0) > n_kv_heads ? ROW_SPANS(ROW_POS(state, n, slot_stride)) : 1;
    if (spans == 1) {
        if (s == 0) attend_heads(j, n, ATT_VALUES);
    } else if (s < spans) {
        attend_span(j, n, s, parts, ATT_VALUES);
        mem_fence(CLK_GLOBAL_MEM_FENCE);
        if (atomic_inc(folds + n * n_kv_heads + j) == spans - 1) {
            mem_fence(CLK_GLOBAL_MEM_FENCE);
            fold_spans(j, n, parts, ATT_VALUES);
            atomic_xchg(folds + n * n_kv_heads + j, 0);
        }
    }
#else
    attend(get_group_id(0), get_group_id(1), query, k_cache, v_cache, att, out, state, n_heads, n_kv_heads,
           head_dim, seq_p, q_stride, out_stride, cache_offset, slot_stride, scratch);
#endif
}
