// Matrix-vector products over one weight format, and the embedding row lookup.
//
// Build with exactly one weight format (docs/ARCHITECTURE.md, "Weight formats"):
//   -DW_F32              w: float[rows][cols_p]
//   -DW_Q8  -DGROUP=g    w: char[rows][cols_p],  s: float[rows][cols_p/g]       w = s*q
//   -DW_INT4 -DGROUP=g   w: uint[rows][cols_p/8], s: half[rows][cols_p/g]       w = s*(q-8)
//   -DW_INT4 -DASYM -DGROUP=g                      m: half[rows][cols_p/g]       w = s*q + m
// and -DROWS=R, the output rows one work-group computes. cols_p is a multiple of 8 (and of GROUP);
// activation vectors are padded with zeros to cols_p, so the padding contributes nothing.
// Every kernel takes the three weight buffers (w, s, m); formats without scales or mins get a dummy.
//
// A work-group of L threads owns R rows. Thread t walks the row in 8-wide chunks t, t+L, ...: it
// loads x once per chunk and reuses it for all R rows, which is what makes a row-block cheaper
// than R separate dot products. For int4 the chunk sum of x is shared by the R rows too:
//   sum_k (s*q_k + m) x_k = s * sum_k q_k x_k + m * sum_k x_k.

#define WEIGHT_ARGS __global const void *w_, __global const void *s_, __global const void *m_

// dot of one 8-wide chunk c of row r with x8; sx = sum of x8
inline float chunk_dot(WEIGHT_ARGS, const int r, const int c, const int cols_p, const float8 x8, const float sx) {
#if defined(W_F32)
    return dot(vload8(0, (__global const float *)w_ + (size_t)r * cols_p + 8 * c).lo, x8.lo)
         + dot(vload8(0, (__global const float *)w_ + (size_t)r * cols_p + 8 * c).hi, x8.hi);
#elif defined(W_Q8)
    const float8 q = convert_float8(vload8(0, (__global const char *)w_ + (size_t)r * cols_p + 8 * c));
    const float s = ((__global const float *)s_)[(size_t)r * (cols_p / GROUP) + (8 * c) / GROUP];
    return s * (dot(q.lo, x8.lo) + dot(q.hi, x8.hi));
#elif defined(W_INT4)
    const uint u = ((__global const uint *)w_)[(size_t)r * (cols_p / 8) + c];
    const float8 q = (float8)((float)(u & 15), (float)((u >> 4) & 15), (float)((u >> 8) & 15),
                              (float)((u >> 12) & 15), (float)((u >> 16) & 15), (float)((u >> 20) & 15),
                              (float)((u >> 24) & 15), (float)(u >> 28));
    const size_t g = (size_t)r * (cols_p / GROUP) + (8 * c) / GROUP;
    const float s = vload_half(g, (__global const half *)s_);
    const float qx = dot(q.lo, x8.lo) + dot(q.hi, x8.hi);
#if defined(ASYM)
    return s * qx + vload_half(g, (__global const half *)m_) * sx;
#else
    return s * (qx - 8.0f * sx);
#endif
#else
#error "build gemv.cl with one of -DW_F32, -DW_Q8, -DW_INT4"
#endif
}

// The shared body. NORM: x is RMS-normalised on the fly (x * g / rms(x)), so an RMSNorm needs no
// launch of its own. Returns, in thread t < R, the dot product of row first+t (else 0).
inline float gemv_rows(WEIGHT_ARGS, __global const float *x, __global const float *g, const int norm,
                       const int rows, const int cols, const int cols_p, const float eps, __local float *scratch) {
    const int lid = get_local_id(0), L = get_local_size(0);
    const int first = get_group_id(0) * ROWS;
    float acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;
    float ss = 0.0f;
    for (int c = lid; c < cols_p / 8; c += L) {
        float8 x8 = vload8(c, x);
        if (norm) {
            ss += dot(x8.lo, x8.lo) + dot(x8.hi, x8.hi);
            x8 *= vload8(c, g);
        }
        const float sx = dot(x8.lo, (float4)(1.0f)) + dot(x8.hi, (float4)(1.0f));
        for (int r = 0; r < ROWS; r++)
            if (first + r < rows) acc[r] += chunk_dot(w_, s_, m_, first + r, c, cols_p, x8, sx);
    }
    // one tree reduction for all R rows and the sum of squares: scratch is [(R+1)][L]
    for (int r = 0; r < ROWS; r++) scratch[r * L + lid] = acc[r];
    scratch[ROWS * L + lid] = ss;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = L / 2; h > 0; h >>= 1) {
        if (lid < h)
            for (int r = 0; r <= ROWS; r++) scratch[r * L + lid] += scratch[r * L + lid + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float scale = norm ? rsqrt(scratch[ROWS * L] / cols + eps) : 1.0f;
    return lid < ROWS ? scratch[lid * L] * scale : 0.0f;
}

// y = W x
__kernel void gemv(WEIGHT_ARGS, __global const float *x, __global float *y, const int rows, const int cols,
                   const int cols_p, __local float *scratch) {
    const float v = gemv_rows(w_, s_, m_, x, x, 0, rows, cols, cols_p, 0.0f, scratch);
    const int r = get_group_id(0) * ROWS + get_local_id(0);
    if (get_local_id(0) < ROWS && r < rows) y[r] = v;
}

// y += W x: a projection that feeds the residual stream adds itself in
__kernel void gemv_add(WEIGHT_ARGS, __global const float *x, __global float *y, const int rows, const int cols,
                       const int cols_p, __local float *scratch) {
    const float v = gemv_rows(w_, s_, m_, x, x, 0, rows, cols, cols_p, 0.0f, scratch);
    const int r = get_group_id(0) * ROWS + get_local_id(0);
    if (get_local_id(0) < ROWS && r < rows) y[r] += v;
}

// y = W rmsnorm(x, g): RMSNorm fused into the projection after it (QKV, LM head)
__kernel void gemv_norm(WEIGHT_ARGS, __global const float *x, __global const float *g, __global float *y,
                        const int rows, const int cols, const int cols_p, const float eps, __local float *scratch) {
    const float v = gemv_rows(w_, s_, m_, x, g, 1, rows, cols, cols_p, eps, scratch);
    const int r = get_group_id(0) * ROWS + get_local_id(0);
    if (get_local_id(0) < ROWS && r < rows) y[r] = v;
}

// y[i] = silu(a[2i]) * a[2i+1] with a = W rmsnorm(x, g), W's rows interleaving gate (w1) and up (w3):
// RMSNorm, both FFN projections and SwiGLU in one launch. ROWS must be even.
__kernel void gemv_norm_swiglu(WEIGHT_ARGS, __global const float *x, __global const float *g, __global float *y,
                               const int rows, const int cols, const int cols_p, const float eps,
                               __local float *scratch) {
    const float v = gemv_rows(w_, s_, m_, x, g, 1, rows, cols, cols_p, eps, scratch);
    const int lid = get_local_id(0), r = get_group_id(0) * ROWS + lid;
    barrier(CLK_LOCAL_MEM_FENCE);          // everyone is done reading the reduction
    if (lid < ROWS) scratch[lid] = v;      // the R row values side by side
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < ROWS / 2 && r + lid < rows) {
        const float gate = scratch[2 * lid], up = scratch[2 * lid + 1];
        y[(get_group_id(0) * ROWS) / 2 + lid] = gate / (1.0f + exp(-gate)) * up;
    }
}

// x = row tokens[pos] of the embedding table, dequantized (state = {pos, ...}). Element k of a chunk
// is its dot product with the k-th unit vector, so every format decodes through chunk_dot alone.
__kernel void embed(WEIGHT_ARGS, __global const int *tokens, __global const int *state, __global float *x,
                    const int cols, const int cols_p) {
    const int r = tokens[state[0]];
    for (int c = get_global_id(0); c < cols_p / 8; c += get_global_size(0))
        for (int k = 0; k < 8 && 8 * c + k < cols; k++) {
            float8 unit = (float8)(0.0f);
            ((float *)&unit)[k] = 1.0f;
            x[8 * c + k] = chunk_dot(w_, s_, m_, r, c, cols_p, unit, 1.0f);
        }
}
