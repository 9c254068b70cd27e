// The non-matrix parts of a transformer layer, in float32, and the device-side sampling helpers.
// Build with -DPOS_VEC and -DHD_VEC (vector widths of the attention kernel).
// `state` is the model's small int buffer {pos, n_prompt}: kernels read the position from it, so a
// recorded token step can be replayed without re-binding arguments.

// The attention kernel (common.cl's attend), one work-group per head and token.
__kernel void attention(__global const float *query, __global const float *k_cache, __global const float *v_cache,
                        __global float *att, __global float *out, __global const int *state,
                        const int n_heads, const int n_kv_heads, const int head_dim, const int seq_p,
                        const int q_stride, const int out_stride, const int cache_offset,
                        __local float *scratch) {
    attend(get_group_id(0), get_group_id(1), query, k_cache, v_cache, att, out, state, n_heads, n_kv_heads,
           head_dim, seq_p, q_stride, out_stride, cache_offset, scratch);
}

// Greedy sampling on the device, one work-group: the first index of the largest logit becomes
// tokens[pos + 1] (unless that slot still holds a prompt token), then pos advances. Each work-item scans a
// contiguous run of 16-float vectors, keeping per lane the largest value and the first vector that held it
// (vector compares and selects: PoCL makes fmax a call and does not vectorize a scalar scan); work-item 0
// also takes the n % 16 tail; a tree joins them.
__kernel void argmax_next(__global const float *logits, __global int *tokens, __global int *state, const int n,
                          __local float *best, __local int *best_i) {
    const int lid = get_local_id(0), L = get_local_size(0);
    const int n16 = n / 16, per = (n16 + L - 1) / L, v0 = min(lid * per, n16), v1 = min(v0 + per, n16);
    __global const float16 *l16 = (__global const float16 *)logits;
    float16 m = -INFINITY;
    int16 at = 0;
    for (int v = v0; v < v1; v++) {
        const float16 a = l16[v];
        const int16 gt = a > m;
        m = gt ? a : m;
        at = gt ? (int16)(v) : at;
    }
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int lane = 0; lane < 16 && v0 < v1; lane++) {
        const float mv = ((const float *)&m)[lane];
        const int i = ((const int *)&at)[lane] * 16 + lane;
        if (mv > bv || (mv == bv && i < bi)) { bv = mv; bi = i; }
    }
    for (int i = 16 * n16; i < n && lid == 0; i++)
        if (logits[i] > bv) { bv = logits[i]; bi = i; }
    best[lid] = bv;
    best_i[lid] = bi;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = L / 2; h > 0; h >>= 1) {
        if (lid < h && (best[lid + h] > best[lid] || (best[lid + h] == best[lid] && best_i[lid + h] < best_i[lid]))) {
            best[lid] = best[lid + h];
            best_i[lid] = best_i[lid + h];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
        const int pos = state[0];
        if (pos + 1 >= state[1]) tokens[pos + 1] = best_i[0];
        state[0] = pos + 1;
    }
}

// Advance past n tokens whose successors are already known (prompt tokens, host-sampled tokens).
__kernel void advance(__global int *state, const int n) {
    state[0] += n;
}
