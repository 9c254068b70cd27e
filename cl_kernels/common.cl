// Helpers shared by every program (prepended by dpllama.runtime.program).

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

// -DSOLO: built for work-groups of one work-item (CPU configs), where there is nothing to share or wait
// for, so the group reductions and barriers compile away. PoCL's compiler splits a kernel at every
// barrier, and on qkv_attention, with barriers inside loops, it ran for minutes.
#if defined(SOLO)
#define group_barrier(flags)
#else
#define group_barrier(flags) barrier(flags)
#endif

// Sum of `v` over the work-group; `scratch` holds get_local_size(0) floats. Every work-item
// gets the total. Ends with a barrier so `scratch` may be reused at once.
inline float group_sum(float v, __local float *scratch) {
#if defined(SOLO)
    return v;
#else
    const int lid = get_local_id(0), n = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {   // local sizes are powers of two
        if (lid < s) scratch[lid] += scratch[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
#endif
}

inline float group_max(float v, __local float *scratch) {
#if defined(SOLO)
    return v;
#else
    const int lid = get_local_id(0), n = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] = fmax(scratch[lid], scratch[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float m = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return m;
#endif
}

// Greedy sampling on the device, by one work-group: the first index of the largest logit becomes
// tokens[pos + 1] (unless that slot still holds a prompt token), then pos advances; every work-item gets
// tokens[pos + 1], the token to embed next. Logits that are not all finite (a NaN anywhere, an infinity at
// the top, all -inf) give -1 instead, for the host to report: a NaN compares false with everything, so it
// would otherwise give some index silently, or none at all (with fewer than 16 logits: an index far out of
// range, and a read past the embedding table). A work-item that saw a NaN bids +inf at index -1, which
// wins every comparison of the tree. Each work-item scans a contiguous run of 16-float vectors,
// keeping per lane the largest value and the first vector that held it (vector compares and selects:
// PoCL makes fmax a call and does not vectorize a scalar scan); work-item 0 also takes the n % 16 tail;
// a tree joins them.
inline int argmax_next(__global const float *logits, __global int *tokens, __global int *state, const int n,
                       __local float *best, __local int *best_i) {
    const int lid = get_local_id(0), L = get_local_size(0);
    const int n16 = n / 16, per = (n16 + L - 1) / L, v0 = min(lid * per, n16), v1 = min(v0 + per, n16);
    __global const float16 *l16 = (__global const float16 *)logits;
    float16 m = -INFINITY;
    int16 at = 0, nan = 0;
    for (int v = v0; v < v1; v++) {
        const float16 a = l16[v];
        const int16 gt = a > m;
        m = gt ? a : m;
        at = gt ? (int16)(v) : at;
        nan |= a != a;
    }
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int lane = 0; lane < 16 && v0 < v1; lane++) {
        const float mv = ((const float *)&m)[lane];
        const int i = ((const int *)&at)[lane] * 16 + lane;
        if (mv > bv || (mv == bv && i < bi)) { bv = mv; bi = i; }
        if (((const int *)&nan)[lane]) { bv = INFINITY; bi = -1; break; }
    }
    for (int i = 16 * n16; i < n && lid == 0; i++) {
        if (logits[i] > bv) { bv = logits[i]; bi = i; }
        if (logits[i] != logits[i]) { bv = INFINITY; bi = -1; }
    }
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
    const int pos = state[0];
    const int finite = best[0] > -INFINITY && best[0] < INFINITY;
    const int next = pos + 1 >= state[1] ? (finite ? best_i[0] : -1) : tokens[pos + 1];
    barrier(CLK_GLOBAL_MEM_FENCE);      // every work-item has read state[0] before work-item 0 moves it
    if (lid == 0) {
        tokens[pos + 1] = next;
        state[0] = pos + 1;
    }
    return next;
}

#if defined(POS_VEC)
#define floatP CAT(float, POS_VEC)      // a run of positions (-DPOS_VEC: 2, 4, 8 or 16)
#define floatH CAT(float, HD_VEC)       // a run of head dimensions (-DHD_VEC divides head_dim)
// exp of a run of positions: on AVX and AVX2 a float16 goes to the library's exp in halves, as a float16
// passed by value there "changes the ABI" (a compiler warning on every build; see gemv.cl)
#if POS_VEC == 16 && defined(__AVX__) && !defined(__AVX512F__)
#define EXP_P(v) (float16)(exp((v).lo), exp((v).hi))
#else
#define EXP_P(v) exp(v)
#endif

// KV cache layout, per layer: keys [kv_dim][seq_p] (each channel's positions side by side, so one
// vector load gives a channel of POS_VEC positions), values [seq_p][kv_dim] (each position's channels
// side by side). seq_p is seq_len rounded up to POS_VEC. gemv.cl's gemv_norm_rope_kv fills it.

// Attention for query head h of token n (a row of query, q_stride apart), at position state[0] + n, over
// cache positions 0..pos (causal), by the whole work-group. Query head h reads key/value head
// h / (n_heads / n_kv_heads) (grouped-query attention). att is scratch [T][n_heads][seq_p] for the scores.
// The L threads of a group split the positions for the scores and the head dimensions for the weighted
// sum of values; scratch holds L floats.
inline void attend(const int h, const int n, __global const float *query, __global const float *k_cache,
                   __global const float *v_cache, __global float *att, __global float *out,
                   __global const int *state, const int n_heads, const int n_kv_heads, const int head_dim,
                   const int seq_p, const int q_stride, const int out_stride, const int cache_offset,
                   __local float *scratch) {
    const int lid = get_local_id(0), L = get_local_size(0);
    const int pos = state[0] + n, kv_dim = n_kv_heads * head_dim, kvh = h / (n_heads / n_kv_heads);
    __global const float *q = query + (size_t)n * q_stride + h * head_dim;
    __global const float *kh = k_cache + cache_offset + (size_t)kvh * head_dim * seq_p;
    __global const float *vh = v_cache + cache_offset + kvh * head_dim;
    __global float *a = att + ((size_t)n * n_heads + h) * seq_p;
    const float scale = rsqrt((float)head_dim);

    // vector running max and sum, reduced once at the end: fmax and a per-lane scalar loop cost calls and
    // scalar work in every iteration on PoCL
    floatP mv = -INFINITY;
    for (int t0 = lid * POS_VEC; t0 <= pos; t0 += L * POS_VEC) {
        // four independent chains of FMAs (one would wait on each one's latency); head_dim is even (RoPE pairs)
        floatP s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        __global const float *kt = kh + t0;
        int d = 0;
        for (; d + 4 <= head_dim; d += 4) {
            s0 += q[d] * *(__global const floatP *)(kt + (size_t)d * seq_p);
            s1 += q[d + 1] * *(__global const floatP *)(kt + (size_t)(d + 1) * seq_p);
            s2 += q[d + 2] * *(__global const floatP *)(kt + (size_t)(d + 2) * seq_p);
            s3 += q[d + 3] * *(__global const floatP *)(kt + (size_t)(d + 3) * seq_p);
        }
        for (; d < head_dim; d += 2) {
            s0 += q[d] * *(__global const floatP *)(kt + (size_t)d * seq_p);
            s1 += q[d + 1] * *(__global const floatP *)(kt + (size_t)(d + 1) * seq_p);
        }
        floatP s = ((s0 + s1) + (s2 + s3)) * scale;
        if (t0 + POS_VEC > pos + 1)                                 // the vector runs past the causal edge
            for (int i = pos + 1 - t0; i < POS_VEC; i++) ((float *)&s)[i] = -INFINITY;
        *(__global floatP *)(a + t0) = s;
        mv = s > mv ? s : mv;
    }
    float m = -INFINITY;
    for (int i = 0; i < POS_VEC; i++) m = m > ((float *)&mv)[i] ? m : ((float *)&mv)[i];
    m = group_max(m, scratch);
    floatP sv = 0.0f;
    for (int t0 = lid * POS_VEC; t0 <= pos; t0 += L * POS_VEC) {
        const floatP e = EXP_P(*(__global floatP *)(a + t0) - m);
        *(__global floatP *)(a + t0) = e;
        sv += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < POS_VEC; i++) sum += ((float *)&sv)[i];
    sum = group_sum(sum, scratch);   // its barriers also publish a[] to the whole group
    group_barrier(CLK_GLOBAL_MEM_FENCE);
    for (int d0 = lid * HD_VEC; d0 < head_dim; d0 += L * HD_VEC) {
        floatH o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;    // four chains, as for the scores
        __global const float *vd = vh + d0;
        int t = 0;
        for (; t + 4 <= pos + 1; t += 4) {
            o0 += a[t] * *(__global const floatH *)(vd + (size_t)t * kv_dim);
            o1 += a[t + 1] * *(__global const floatH *)(vd + (size_t)(t + 1) * kv_dim);
            o2 += a[t + 2] * *(__global const floatH *)(vd + (size_t)(t + 2) * kv_dim);
            o3 += a[t + 3] * *(__global const floatH *)(vd + (size_t)(t + 3) * kv_dim);
        }
        for (; t <= pos; t++) o0 += a[t] * *(__global const floatH *)(vd + (size_t)t * kv_dim);
        *(__global floatH *)(out + (size_t)n * out_stride + h * head_dim + d0) = ((o0 + o1) + (o2 + o3)) / sum;
    }
}
#endif
