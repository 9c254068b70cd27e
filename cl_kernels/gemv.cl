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
// A work-group of L threads owns R rows. Thread t walks the row in blocks t, t+L, ... of one scale
// group: it loads that piece of x once and reuses it for all R rows, which is what makes a row-block
// cheaper than R separate dot products. For int4 the block sum of x is shared by the R rows too:
//   sum_k (s*q_k + m) x_k = s * sum_k q_k x_k + m * sum_k x_k.

#define WEIGHT_ARGS __global const void *w_, __global const void *s_, __global const void *m_

#if defined(W_F32)
#define BLOCK 8             // columns a thread takes at a time: one scale group, or 8 floats
#else
#define BLOCK GROUP
#endif

// dot of block b of row r with the block of x at xb; sx = sum of that block of x
inline float block_dot(WEIGHT_ARGS, const int r, const int b, const int cols_p, __private const float *xb,
                       const float sx) {
#if defined(W_F32)
    __global const float *w = (__global const float *)w_ + (size_t)r * cols_p + BLOCK * b;
    float acc = 0.0f;
    for (int k = 0; k < BLOCK; k++) acc += w[k] * xb[k];
    return acc;
#elif defined(W_Q8)
    __global const char *w = (__global const char *)w_ + (size_t)r * cols_p + BLOCK * b;
    float acc = 0.0f;
    for (int k = 0; k < BLOCK; k++) acc += (float)w[k] * xb[k];
    return ((__global const float *)s_)[(size_t)r * (cols_p / GROUP) + b] * acc;
#elif defined(W_INT4)
    __global const uint *w = (__global const uint *)w_ + (size_t)r * (cols_p / 8) + (BLOCK / 8) * b;
    float qx = 0.0f;
    for (int j = 0; j < BLOCK / 8; j++) {
        const uint u = w[j];
        for (int k = 0; k < 8; k++) qx += (float)((u >> (4 * k)) & 15) * xb[8 * j + k];
    }
    const size_t g = (size_t)r * (cols_p / GROUP) + b;
    const float s = vload_half(g, (__global const half *)s_);
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
    float ss = 0.0f, xb[BLOCK];
    for (int b = lid; b < cols_p / BLOCK; b += L) {
        float sx = 0.0f;
        for (int k = 0; k < BLOCK; k++) {       // this block of x, loaded once for all R rows
            const float v = x[BLOCK * b + k];
            ss += v * v;
            xb[k] = norm ? v * g[BLOCK * b + k] : v;
            sx += xb[k];
        }
        for (int r = 0; r < ROWS; r++)
            if (first + r < rows) acc[r] += block_dot(w_, s_, m_, first + r, b, cols_p, xb, sx);
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

// x = row tokens[pos] of the embedding table, dequantized (state = {pos, ...}). Element k of a block
// is its dot product with the k-th unit vector, so every format decodes through block_dot alone.
__kernel void embed(WEIGHT_ARGS, __global const int *tokens, __global const int *state, __global float *x,
                    const int cols, const int cols_p) {
    const int r = tokens[state[0]];
    float unit[BLOCK];
    for (int k = 0; k < BLOCK; k++) unit[k] = 0.0f;
    for (int b = get_global_id(0); b < cols_p / BLOCK; b += get_global_size(0))
        for (int k = 0; k < BLOCK && BLOCK * b + k < cols; k++) {
            unit[k] = 1.0f;
            x[BLOCK * b + k] = block_dot(w_, s_, m_, r, b, cols_p, unit, 1.0f);
            unit[k] = 0.0f;
        }
}
