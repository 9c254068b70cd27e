// The non-matrix parts of a transformer layer, in float32, and the device-side sampling helpers.
// `state` is the model's small int buffer {pos, n_prompt}: kernels read the position from it, so a
// recorded token step can be replayed without re-binding arguments.

// out = x * g / sqrt(mean(x^2) + eps), one work-group per row of n (rows of a prefill chunk)
__kernel void rmsnorm(__global const float *x, __global const float *g, __global float *out, const int n,
                      const int stride, const float eps, __local float *scratch) {
    const int row = get_group_id(0), lid = get_local_id(0), L = get_local_size(0);
    __global const float *xr = x + (size_t)row * stride;
    float ss = 0.0f;
    for (int i = lid; i < n; i += L) ss += xr[i] * xr[i];
    const float scale = rsqrt(group_sum(ss, scratch) / n + eps);
    for (int i = lid; i < n; i += L) out[(size_t)row * stride + i] = xr[i] * scale * g[i];
}

// y += x, elementwise (the residual add where it is not fused into a projection)
__kernel void add(__global const float *x, __global float *y, const int n) {
    const int i = get_global_id(0);
    if (i < n) y[i] += x[i];
}

// out[i] = silu(a[i]) * b[i]
__kernel void swiglu(__global const float *a, __global const float *b, __global float *out, const int n) {
    const int i = get_global_id(0);
    if (i < n) out[i] = a[i] / (1.0f + exp(-a[i])) * b[i];
}

// Rotate adjacent pairs (x[2i], x[2i+1]) of every head by pos * theta^(-2i/head_dim) (llama2.c's and
// llama.cpp's rotation), then append k and v at `pos` to this layer's cache. rope holds (cos, sin) of
// those angles, [seq_len][head_dim / 2], made on the host once: sin, cos and pow are calls that cost
// more than everything else here.
// qkv = [q (n_heads*head_dim) | k (kv_dim) | v (kv_dim)]; q is rotated in place.
// One work-item per pair: q_dim/2 for q, then kv_dim/2 for k and v together.
__kernel void rope_store(__global float *qkv, __global float *k_cache, __global float *v_cache,
                         __global const int *state, __global const float *rope, const int q_dim,
                         const int kv_dim, const int head_dim, const int cache_offset) {
    const int i = get_global_id(0), pos = state[0];
    const int is_q = i < q_dim / 2;
    const int j = is_q ? 2 * i : 2 * i - q_dim;          // element index within q or k
    if (!is_q && j >= kv_dim) return;
    __global const float *cs = rope + (size_t)pos * head_dim + (j % head_dim);
    const float c = cs[0], s = cs[1];
    __global float *v = qkv + (is_q ? j : q_dim + j);
    const float a = v[0], b = v[1];
    if (is_q) {
        v[0] = a * c - b * s;
        v[1] = a * s + b * c;
    } else {
        __global float *kc = k_cache + cache_offset + (size_t)pos * kv_dim + j;
        __global float *vc = v_cache + cache_offset + (size_t)pos * kv_dim + j;
        kc[0] = a * c - b * s;
        kc[1] = a * s + b * c;
        vc[0] = v[kv_dim];
        vc[1] = v[kv_dim + 1];
    }
}

// Attention of one token: one work-group per query head h, over cache positions 0..pos.
// Query head h reads key/value head h / (n_heads / n_kv_heads) (grouped-query attention).
// att is scratch [n_heads][seq_len] for the scores.
__kernel void attention(__global const float *q, __global const float *k_cache, __global const float *v_cache,
                        __global float *att, __global float *out, __global const int *state,
                        const int n_heads, const int n_kv_heads, const int head_dim, const int seq_len,
                        const int cache_offset, __local float *scratch) {
    const int h = get_group_id(0), lid = get_local_id(0), L = get_local_size(0), pos = state[0];
    const int kv_dim = n_kv_heads * head_dim;
    const int kvh = h / (n_heads / n_kv_heads);
    __global const float *qh = q + h * head_dim;
    __global const float *kh = k_cache + cache_offset + kvh * head_dim;
    __global const float *vh = v_cache + cache_offset + kvh * head_dim;
    __global float *a = att + (size_t)h * seq_len;
    const float scale = rsqrt((float)head_dim);

    float m = -INFINITY;
    for (int t = lid; t <= pos; t += L) {
        float s = 0.0f;
        for (int d = 0; d < head_dim; d++) s += qh[d] * kh[(size_t)t * kv_dim + d];
        a[t] = s * scale;
        m = fmax(m, a[t]);
    }
    m = group_max(m, scratch);
    float sum = 0.0f;
    for (int t = lid; t <= pos; t += L) {
        a[t] = exp(a[t] - m);
        sum += a[t];
    }
    sum = group_sum(sum, scratch);   // its barriers also publish a[] to the whole group
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int d = lid; d < head_dim; d += L) {
        float o = 0.0f;
        for (int t = 0; t <= pos; t++) o += a[t] * vh[(size_t)t * kv_dim + d];
        out[h * head_dim + d] = o / sum;
    }
}

// Greedy sampling on the device, one work-group: the first index of the largest logit becomes
// tokens[pos + 1] (unless that slot still holds a prompt token), then pos advances.
__kernel void argmax_next(__global const float *logits, __global int *tokens, __global int *state, const int n,
                          __local float *best, __local int *best_i) {
    const int lid = get_local_id(0), L = get_local_size(0);
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = lid; i < n; i += L)
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

// Advance past a token whose successor is already known (prompt tokens, host-sampled tokens).
__kernel void advance(__global int *state) {
    state[0] += 1;
}
