// Greedy sampling on the device: argmax_embed, the step between two forward passes of a sequence, and
// argmax_rows, a batch's. argmax_embed embeds the token it picks, so it reads the embedding table, and the
// program is built with that table's weight format (weights.h).

#include "weights.h"

// The argmax of n logits by one work-group: the first index of the largest, for every work-item. Logits that
// are not all finite (a NaN anywhere, an infinity at the top, all -inf) give -1 instead, for the host to
// report: a NaN compares false with everything, so it would otherwise give some index silently, or none at
// all (with fewer than 16 logits: an index far out of range, and a read past the embedding table). A
// work-item that saw a NaN bids +inf at index -1, which wins every comparison of the tree. Each work-item
// scans a contiguous run of 16-float vectors, keeping per lane the largest value and the first vector that
// held it (vector compares and selects: PoCL makes fmax a call and does not vectorize a scalar scan);
// work-item 0 also takes the n % 16 tail; a tree joins them.
inline int argmax_of(__global const float *logits, const int n, __local float *best, __local int *best_i) {
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
    return best[0] > -INFINITY && best[0] < INFINITY ? best_i[0] : -1;
}

// Greedy sampling on the device, by one work-group: the argmax of the logits becomes tokens[pos + 1] (unless
// that slot still holds a prompt token), then pos advances; every work-item gets tokens[pos + 1], the token
// to embed next (-1: logits that are not all finite).
inline int argmax_next(__global const float *logits, __global int *tokens, __global int *state, const int n,
                       __local float *best, __local int *best_i) {
    const int pos = state[0];
    const int chosen = argmax_of(logits, n, best, best_i);
    const int next = pos + 1 >= state[1] ? chosen : tokens[pos + 1];
    barrier(CLK_GLOBAL_MEM_FENCE);      // every work-item has read state[0] before work-item 0 moves it
    if (get_local_id(0) == 0) {
        tokens[pos + 1] = next;
        state[0] = pos + 1;
    }
    return next;
}

// Greedy decoding's step between two forward passes, one work-group (argmax_next above), which
// also embeds the token it leaves at tokens[pos + 1] into x, so the next pass starts without an embed
// launch. The weight arguments are the embedding table's.
__kernel void argmax_embed(__global const float *logits, __global int *tokens, __global int *state, const int n,
                           WEIGHT_ARGS, __global float *x, const int cols, const int cols_p,
                           __local float *best, __local int *best_i) {
    const int r = max(argmax_next(logits, tokens, state, n, best, best_i), 0);   // -1: the host stops
    for (int c = get_local_id(0); c < cols; c += get_local_size(0))
        x[c] = weight_at(w_, s_, m_, r, c, cols_p);
}

// A batch's greedy rows (Llama.enqueue_batch): chosen[r] = the argmax of logits row r (n floats, rows `stride` apart,
// a multiple of 16: argmax_of reads float16 vectors; -1 where they are not all finite), a work-group per row. The
// next batch's embed reads the tokens it feeds from chosen, on the device.
__kernel void argmax_rows(__global const float *logits, const int n, const int stride, __global int *chosen,
                          __local float *best, __local int *best_i) {
    const int r = get_group_id(1), i = argmax_of(logits + (size_t)r * stride, n, best, best_i);
    if (get_local_id(0) == 0) chosen[r] = i;
}
