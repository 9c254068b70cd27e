// The attention kernel. Build with -DATTENTION_POSITIONS and -DHD_VEC (vector widths of attention.h's attend) and, for
// work-groups of one work-item (CPUs), -DGQA (query heads per key/value head): a work-group per key/value head and
// token (attend_heads), else one per query head and token (attend). `state` is a sequence's {pos, n_prompt}
// (state.cl), or a batch's {pos, slot} per row (attention.h's ROW_POS).

#include "attention.h"

__kernel void attention(__global const float *query, __global const kv_t *k_cache, __global const kv_t *v_cache,
                        __global float *att, __global float *out, __global const int *state,
                        const int n_heads, const int n_kv_heads, const int head_dim, const int seq_p,
                        const int q_stride, const int out_stride, const int cache_offset, const int slot_stride,
                        __local float *scratch) {
#if defined(GQA)
    attend_heads(get_group_id(0), get_group_id(1), query, k_cache, v_cache, att, out, state, n_heads, n_kv_heads,
                 head_dim, seq_p, q_stride, out_stride, cache_offset, slot_stride);
#else
    attend(get_group_id(0), get_group_id(1), query, k_cache, v_cache, att, out, state, n_heads, n_kv_heads,
           head_dim, seq_p, q_stride, out_stride, cache_offset, slot_stride, scratch);
#endif
}
