// The non-matrix parts of a transformer layer, in float32, and the position counter's advance (greedy
// sampling is gemv.cl's argmax_embed).
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

// x[0 .. n) = x[row * n .. row * n + n): after a prefill chunk only the last token's residual row goes on to the
// LM head. A kernel, not clEnqueueCopyBuffer: after a buffer copy Oclgrind 21.10 takes parts of the buffer the
// copy did not touch for uninitialized, which made every later check of x report (tests/test_oclgrind.py).
__kernel void move_row(__global float *x, const int row, const int n) {
    for (int i = get_global_id(0); i < n; i += get_global_size(0))
        x[i] = x[(size_t)row * n + i];
}

// Advance past n tokens whose successors are already known (prompt tokens, host-sampled tokens).
__kernel void advance(__global int *state, const int n) {
    state[0] += n;
}
