// Drawing the next token on the device: choose_embed, the step between two forward passes of a sequence, and
// choose_rows, a batch's; greedy (the argmax) or sampled (a temperature with top-k and top-p). choose_embed embeds the
// token it draws, so it reads the embedding table, and the program is built with that table's weight format
// (weights.h).

#include "common.h"
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
    group_barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = L / 2; h > 0; h >>= 1) {
        if (lid < h && (best[lid + h] > best[lid] || (best[lid + h] == best[lid] && best_i[lid + h] < best_i[lid]))) {
            best[lid] = best[lid + h];
            best_i[lid] = best_i[lid + h];
        }
        group_barrier(CLK_LOCAL_MEM_FENCE);
    }
    return best[0] > -INFINITY && best[0] < INFINITY ? best_i[0] : -1;
}

// ---- penalties ----
// llama.cpp's repetition, presence and frequency penalties (dpllama.generate.Sampler.penalize, the twin): over a
// window of the w latest tokens, in order, each token's logit at its first occurrence is divided by the repetition
// penalty rp where positive (multiplied where not), and the presence penalty pp is subtracted; at every occurrence
// the frequency penalty fp is. In float32, one rounding per operation as the host's (the product is stored before
// the subtraction, so that -cl-mad-enable cannot fuse the two into one rounding), the quotient or product held to
// the finite floats: a penalty of 1e-38 makes a logit of 4 overflow, and the infinity the draw's NaN. The window's
// ids: a token, or -1 - r for the token embed resolved for row r of the pass (`fed`: a batch's row fed from the
// batch before, which the host has not read yet). `mark` (an int per token of the row, scratch: a draw's candidates' space) gets each token's
// first position in the window, written before it is read, so it needs no clearing. In work-item 0 (a window of
// at most a few hundred tokens), then a barrier for the work-group.
#define WINDOW_ID(ids, i, fed) ((ids)[i] >= 0 ? (ids)[i] : (fed)[-1 - (ids)[i]])
inline void penalize(__global float *logits, const int n, __global const int *ids, const int w,
                     __global const int *fed, const float rp, const float pp, const float fp, __global int *mark) {
    if (get_local_id(0) == 0 && w > 0) {
        for (int i = w - 1; i >= 0; i--) {
            const int t = WINDOW_ID(ids, i, fed);
            if (t >= 0 && t < n) mark[t] = i;
        }
        for (int i = 0; i < w; i++) {
            const int t = WINDOW_ID(ids, i, fed);
            if (t < 0 || t >= n) continue;
            float v = logits[t];
            if (mark[t] == i) {
                volatile float scaled = v > 0.0f ? fmin(v / rp, FLT_MAX) : fmax(v * rp, -FLT_MAX);
                v = scaled - pp;
            }
            logits[t] = v - fp;
        }
    }
    group_barrier(CLK_GLOBAL_MEM_FENCE);
}

// ---- a sampled draw ----
// A sampled row's draw is run.c's sample_topp (dpllama.generate.Sampler.sample, its NumPy twin) with a top-k, by the
// row's DRAW_PARAMS draw parameters {temperature T, top_p, coin, tail = (1 - top_p) / (n - 1), top_k, and the
// penalties', which `penalize` applies before: rp, pp, fp, and the window's length}
// (Llama.draw_params; a greedy row's T is 0: the argmax; a row the host samples has a negative T and is left as it
// is). Without top-k (0) and top-p (0) every token is a candidate, in index order. Otherwise the candidates are in
// descending order of probability (ties: the lower index first): with top-k the top_k first tokens in that order,
// with top-p those (of them) whose probability is at least the cutoff min(tail, max p), and the nucleus is their
// shortest run whose sum passes top_p. The coin takes the first candidate whose running sum passes coin x the total
// (of the nucleus). The row becomes e_i = exp((l_i - max) / T) in place, and the sums and targets are in its units
// (Z = sum e: p_i = e_i / Z). The candidates are never sorted: where a descending running sum passes a target is
// found by bisection on the values' bits (a non-negative float's bits order as the float does), ~30 sums over the
// candidates, then a walk in index order among those of that one value. The candidates are first copied, in index
// order, into `cand` (values, then indices), so that the sums run over them only: a few hundred to a few thousand
// of a language model's vocabulary at the usual temperatures. A top-k's k-th largest value is found the same way, by
// bisection on counts: each work-item's over its share, whose largest bounds the candidates from below (so that a
// top-k without top-p copies out a few times k of them, not the row), then over the candidates, which are cut to the
// top k in place. The sums are float32 in the device's order (16 at a time, the work-group's tree for Z), not the
// host's cumulative sums: a coin within float rounding of a boundary may fall on the other side of it.

// exp of 16 floats: the vector library's, in pieces on x86 where a float16 argument would be wider than the
// registers (AVX, AVX2: float8s; SSE: float4s; else "changes the ABI", a compiler warning on every build). Not on
// GPUs: Oclgrind's uninitialized-value check crashes on such a join (attention.h's LOAD_HALFS says the same).
#if defined(__AVX512F__) || !defined(__SSE2__)
#define EXP16(v) exp(v)
#elif defined(__AVX__)
#define EXP16(v) (float16)(exp((v).lo), exp((v).hi))
#else
#define EXP16(v) (float16)(exp((v).lo.lo), exp((v).lo.hi), exp((v).hi.lo), exp((v).hi.hi))
#endif
#define DRAW_PARAMS 9       // floats of a row's draw parameters (Llama.draw_params)
#define SUM16(v) (((v).s0 + (v).s1) + ((v).s2 + (v).s3) + ((v).s4 + (v).s5) + ((v).s6 + (v).s7) + \
                  ((v).s8 + (v).s9) + ((v).sa + (v).sb) + ((v).sc + (v).sd) + ((v).se + (v).sf))

// this work-item's contiguous share [i0, i1) of c items, starting at a multiple of 16 (whole float16 vectors)
#define SHARE16(c, i0, i1) const int per_##i0 = 16 * ((((c) + 15) / 16 + (int)get_local_size(0) - 1) / \
    (int)get_local_size(0)), i0 = min((int)get_local_id(0) * per_##i0, (c)), i1 = min(i0 + per_##i0, (c))
// the sum of the values ip[i], i0 <= i < i1 (i0 a multiple of 16, ip 64-byte aligned), whose value p and key k
// (float16 and uint16 16 at a time, then float and uint) make `take` true
#define SUM_WHERE(ip, i0, i1, take) ({ \
    float16 acc16_ = 0.0f; int i_ = (i0); \
    for (; i_ + 16 <= (i1); i_ += 16) { \
        const float16 p = ((__global const float16 *)(ip))[i_ / 16]; const uint16 k = as_uint16(p); \
        acc16_ += as_float16(as_int16(p) & (take)); } \
    float acc_ = SUM16(acc16_); \
    for (; i_ < (i1); i_++) { \
        const float p = (ip)[i_]; const uint k = as_uint(p); \
        if ((take) & 1) acc_ += p; } \
    acc_; })

// how many of the c values ip[i] (ip 64-byte aligned) have a key (bits) of at least `least`
inline int count_from(__global const float *ip, const int c, const uint least) {
    int16 n16 = 0;
    int i = 0;
    for (; i + 16 <= c; i += 16)
        n16 -= as_uint16(((__global const float16 *)ip)[i / 16]) >= (uint16)(least);     // true is -1
    int n = n16.s0 + n16.s1 + n16.s2 + n16.s3 + n16.s4 + n16.s5 + n16.s6 + n16.s7 + n16.s8 + n16.s9 + n16.sa +
            n16.sb + n16.sc + n16.sd + n16.se + n16.sf;
    for (; i < c; i++) n += as_uint(ip[i]) >= least;
    return n;
}

// K, the largest key that k of the c values ip[i] reach (0 < k <= c; ip 64-byte aligned), by bisection between
// `low` and `top`, the smallest and the largest key; *above: how many of them exceed it.
inline uint kth_key(__global const float *ip, const int c, const int k, const uint low, const uint top, int *above) {
    uint lo = low, hi = top + 1;     // count(key >= lo) >= k > count(key >= hi)
    *above = 0;
    while (hi - lo > 1) {
        const uint mid = lo + (hi - lo) / 2;
        const int g = count_from(ip, c, mid);
        if (g >= k) lo = mid;
        else { hi = mid; *above = g; }
    }
    return lo;
}

// The c candidates (values cp, indices ci, in index order; k < c) cut in place to their top k: those above K
// (kth_key) and the first of those at K (ties: the lower index first); returns K.
inline uint top_k_of(__global float *cp, __global int *ci, const int c, const int k, const uint low, const uint top) {
    int above;
    const uint K = kth_key(cp, c, k, low, top, &above);
    for (int i = 0, o = 0, at = k - above; i < c; i++) {
        const uint key = as_uint(cp[i]);
        if (key > K || (key == K && at-- > 0)) {
            cp[o] = cp[i];
            ci[o++] = ci[i];
        }
    }
    return K;
}

// The searches run in one work-item (the candidates are few, and a barrier in them would cost PoCL's compiler
// minutes). The first of the c items (values ip, indices ii, in index order; ii 0: item i is token i) whose key is
// `key` (any key with all_keys) at which acc + their running sum in index order passes `target`: its token, -1 if
// none; *at: the running sum through it (or the whole).
inline int walk(__global const float *ip, __global const int *ii, const int c, float acc, const float target,
                const uint key, const int all_keys, float *at) {
    int i = 0;
    for (; i + 16 <= c; i += 16) {       // 16 at a time up to the vector where the sum passes, then one by one
        const float s = all_keys ? SUM_WHERE(ip, i, i + 16, k == k) : SUM_WHERE(ip, i, i + 16, k == key);
        if (acc + s > target) break;
        acc += s;
    }
    for (; i < c; i++)
        if (all_keys || as_uint(ip[i]) == key) {
            acc += ip[i];
            if (acc > target) {
                *at = acc;
                return ii ? ii[i] : i;
            }
        }
    *at = acc;
    return -1;
}

// The first of the c items in descending order of value (ties: the lower index first) at which their running sum
// passes `target`: its token, -1 if their whole sum does not; *at: the running sum through it (or the whole), *key_at:
// its key. K = the largest key whose items and those above it sum past the target, by bisection between `low` and
// `top`, the smallest and the largest key; the items above K sum to `above`; the walk among those of key K ends it.
inline int first_past(__global const float *ip, __global const int *ii, const int c, const float target,
                      const uint low, const uint top, uint *key_at, float *at) {
    const float total = SUM_WHERE(ip, 0, c, k == k);
    if (!(total > target)) {
        *at = total;
        return -1;
    }
    uint lo = low, hi = top + 1;     // sum(key >= lo) > target >= sum(key >= hi)
    float above = 0.0f;
    while (hi - lo > 1) {
        const uint mid = lo + (hi - lo) / 2;
        const float g = SUM_WHERE(ip, 0, c, k >= mid);
        if (g > target) lo = mid;
        else { hi = mid; above = g; }
    }
    *key_at = lo;
    return walk(ip, ii, c, above, target, lo, 0, at);
}

// The nucleus's draw from the c candidates (values cp, indices ci, in index order), in one work-item: through the
// first candidate in descending order whose running sum passes nucleus (top_p Z; none: all of them), the first
// whose running sum passes the coin's share of theirs.
inline int nucleus_draw(__global const float *cp, __global const int *ci, const int c, const float nucleus,
                        const float coin, const uint low, const uint top) {
    uint last_key, key;
    float kept, at;
    const int last = first_past(cp, ci, c, nucleus, low, top, &last_key, &kept);
    const int t = first_past(cp, ci, c, coin * kept, low, top, &key, &at);
    if (last >= 0)      // a coin past the nucleus by rounding takes its last candidate, as the host's sums do
        return t < 0 || key < last_key || (key == last_key && t > last) ? last : t;
    if (t >= 0)
        return t;
    // every candidate is in the nucleus and the coin passed their sum by rounding: the last of them in descending
    // order (the least likely; of equals, the highest index)
    uint least = 0xffffffffu;
    int out = -1;
    for (int i = 0; i < c; i++)
        if (as_uint(cp[i]) <= least) {
            least = as_uint(cp[i]);
            out = ci[i];
        }
    return out;
}

// The draw of one row (see above): its token, -1 for logits that are not all finite. Every work-item gets it.
// The work-group takes the row's exponentials and their sum, and copies out the candidates; work-item 0 searches.
inline int draw_of(__global float *logits, const int n, __global const float *draw, __global float *cand,
                   __local float *red, __local int *redi) {
    const int best = argmax_of(logits, n, red, redi);
    const float T = draw[0], top_p = draw[1], coin = draw[2], tail = draw[3];
    const int top_k = (int)draw[4];
    if (best < 0 || T == 0.0f) return best;
    const float m = logits[best];
    group_barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);   // every work-item has it and argmax_of's result
    SHARE16(n, i0, i1);                                           // before the row is overwritten
    float16 zs = 0.0f;
    int i = i0;
    for (; i + 16 <= i1; i += 16) {
        __global float16 *l = (__global float16 *)(logits + i);
        const float16 e = EXP16((*l - m) / T);
        *l = e;
        zs += e;
    }
    float z = SUM16(zs);
    for (; i < i1; i++) {
        logits[i] = exp((logits[i] - m) / T);
        z += logits[i];
    }
    z = group_sum(z, red);          // its barriers also publish the row to the work-group
    group_barrier(CLK_GLOBAL_MEM_FENCE);
    const int lid = get_local_id(0), L = get_local_size(0);
    const int nucleus = top_p > 0.0f && top_p < 1.0f, ranked = top_k > 0 && top_k < n;
    // with top-k, a floor under its k-th largest value: each work-item's own k-th largest (none where its share holds
    // fewer), the work-group's largest of them. At least k tokens reach it, so the top k are among those that do,
    // and few others do: at most k - 1 a work-item besides the work-item's whose it is. (With one work-item, the
    // row's k-th largest itself.)
    int above;
    redi[lid] = ranked && i1 - i0 >= top_k ? (int)kth_key(logits + i0, i1 - i0, top_k, 0, as_uint(1.0f), &above) : 0;
    group_barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = L / 2; h > 0; h >>= 1) {       // keys of non-negative floats: below 2^31, compared as ints
        if (lid < h) redi[lid] = max(redi[lid], redi[lid + h]);
        group_barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float floor_k = as_float(redi[0]);
    group_barrier(CLK_LOCAL_MEM_FENCE);
    // the candidates, in index order, into cand: each work-item's after the work-items' before (none without top-p
    // or top-k: every work-item passes the barriers, which PoCL's compiler does not take in a branch)
    const float cutoff = nucleus ? max(min(tail * z, 1.0f), floor_k)    // tail: (1 - top_p) / (n - 1), from the host
                                 : ranked ? floor_k : INFINITY;
    __global float *cp = cand;
    __global int *ci = (__global int *)(cand + (n + 15) / 16 * 16);
    int k = 0;
    for (int j = i0; j < i1; j++) k += logits[j] >= cutoff;
    redi[lid] = k;
    group_barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0)
        for (int j = 0, sum = 0; j <= L; j++) {
            const int kj = j < L ? redi[j] : 0;
            redi[j] = sum;
            sum += kj;
        }
    group_barrier(CLK_LOCAL_MEM_FENCE);
    int o = redi[lid];
    for (int j = i0; j < i1; j++)
        if (logits[j] >= cutoff) {
            cp[o] = logits[j];
            ci[o++] = j;
        }
    group_barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    if (lid == 0) {
        // the candidates' keys lie between the cutoff's and 1's (the largest: exp(0))
        uint low = as_uint(cutoff);
        int c = redi[L], t;
        if (ranked && top_k < c) {      // cut to the top k
            low = top_k_of(cp, ci, c, top_k, low, as_uint(1.0f));
            c = top_k;
        }
        if (nucleus || ranked)          // in descending order (without top-p: the nucleus is all of them)
            t = nucleus_draw(cp, ci, c, nucleus ? top_p * z : INFINITY, coin, low, as_uint(1.0f));
        else {                          // every token, in index order
            float at;
            t = walk(logits, 0, n, 0.0f, coin * z, 0, 1, &at);
            t = t < 0 ? n - 1 : t;
        }
        redi[0] = t;
    }
    group_barrier(CLK_LOCAL_MEM_FENCE);
    const int t = redi[0];
    group_barrier(CLK_LOCAL_MEM_FENCE);
    return t;
}

// A token chosen on the device becomes tokens[pos + 1] (unless that slot still holds a prompt token), then pos
// advances; every work-item gets tokens[pos + 1], the token to embed next (-1: logits that are not all finite).
inline int chosen_next(const int chosen, __global int *tokens, __global int *state) {
    const int pos = state[0];
    const int next = pos + 1 >= state[1] ? chosen : tokens[pos + 1];
    group_barrier(CLK_GLOBAL_MEM_FENCE);    // every work-item has read state[0] before work-item 0 moves it
    if (get_local_id(0) == 0) {
        tokens[pos + 1] = next;
        state[0] = pos + 1;
    }
    return next;
}

// Decoding's step between two forward passes of a sequence, one work-group: the token drawn from the logits
// (draw_of: greedy or sampled, by draw's parameters, after the penalties over the window of the sequence's latest
// tokens, tokens[pos - w + 1 .. pos], w at most the parameter's) goes to tokens[pos + 1] (chosen_next), and its
// embedding row into x, so the next pass starts without an embed launch. The weight arguments are the embedding
// table's.
__kernel void choose_embed(__global float *logits, __global int *tokens, __global int *state, const int n,
                           __global const float *draw, WEIGHT_ARGS, __global float *x, const int cols,
                           const int cols_p, __global float *cand, __local float *best, __local int *best_i) {
    const int pos = state[0], w = min((int)draw[8], pos + 1);
    penalize(logits, n, tokens + pos + 1 - w, w, tokens, draw[5], draw[6], draw[7], (__global int *)cand);
    const int t = draw_of(logits, n, draw, cand, best, best_i);
    const int r = max(chosen_next(t, tokens, state), 0);     // -1: the host stops
    for (int c = get_local_id(0); c < cols; c += get_local_size(0))
        x[c] = weight_at(w_, s_, m_, r, c, cols_p);
}

// A batch's rows whose tokens the device chooses (Llama.enqueue_batch): chosen[r] = the token drawn from logits row
// r (n floats, rows `stride` apart, a multiple of 16: argmax_of reads float16 vectors; -1 where they are not all
// finite) by its draw parameters draws[DRAW_PARAMS r ..], after the penalties over its window (window[W r ..], ids as
// `penalize` takes them, `fed` the pass's rows' tokens as embed resolved them), a work-group per row (cand: 2 stride
// floats a row); rows the host samples (a negative temperature) are skipped. The next batch's embed reads the tokens
// it feeds from chosen.
__kernel void choose_rows(__global float *logits, const int n, const int stride, __global const float *draws,
                          __global const int *window, const int W, __global const int *fed, __global int *chosen,
                          __global float *cand, __local float *best, __local int *best_i) {
    const int r = get_group_id(1);
    __global const float *draw = draws + DRAW_PARAMS * r;
    if (draw[0] < 0.0f) return;
    penalize(logits + (size_t)r * stride, n, window + (size_t)W * r, (int)draw[8], fed, draw[5], draw[6], draw[7],
             (__global int *)(cand + (size_t)2 * r * stride));
    const int t = draw_of(logits + (size_t)r * stride, n, draw, cand + (size_t)2 * r * stride, best, best_i);
    if (get_local_id(0) == 0) chosen[r] = t;
}
