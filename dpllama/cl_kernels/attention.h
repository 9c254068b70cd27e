// The attention body (attend) and the KV cache layout it reads, shared by attention.cl's kernel and matrix.cl's
// qkv_attention. The layout's addresses serve every program; attend only those built with -DATTENTION_POSITIONS and
// -DHD_VEC (its vector widths).

#include "common.h"

// KV cache layout, per layer: values [seq_p][kv_dim] (each position's channels side by side); keys in blocks of
// KEY_BLOCK positions, [seq_p / KEY_BLOCK][kv_dim][KEY_BLOCK] (in a block, each channel's positions side by side, so
// one vector load gives a channel of ATTENTION_POSITIONS positions, which divides KEY_BLOCK). Built without
// -DKEY_BLOCK (the GPU configs) a block is the whole sequence: keys [kv_dim][seq_p], each work-item's run of
// positions next to the next one's. The CPU configs' blocks of 16 (work_group.key_block) keep what attend_heads reads
// for a run of positions in one stretch of memory (head_dim x 16 keys, 2 KB for fp16 and head_dim 64), which a
// prefetch can fetch ahead, where a channel's whole row put them in head_dim stretches seq_p apart, which the hardware
// prefetchers did not follow; and a new position's keys fill kv_dim / 2 cache lines, not kv_dim (stores that each
// missed the cache: 5% of an 8-row batch step's time). SmolLM2, 8-row batch steps over positions 128-428: 1.11-1.28x
// faster on the avx512 path, 1.07-1.10x on avx2; one sequence's decode over 128-728: 1.06x. seq_p is seq_len rounded
// up to KEY_BLOCK (and to ATTENTION_POSITIONS). matrix.cl's gemv_norm_rope_kv fills the cache. A layer's part
// starts at cache_offset (the host's KVCache.offset, dpllama/model/kv_cache.py, with the NumPy twin of this layout);
// within it, KEY_AT and VALUE_AT give the key and the value of channel c at position p, and KEY_STRIDE the distance
// from a key to the next channel's at the same position. Keys and values are fp16 (llama.cpp's default cache type):
// attention reads the whole cache of every layer at each step, so at long contexts its bytes, not the weights',
// set a decode step's pace; half of them read in half the time (SmolLM2 after 512 tokens: decode 4-8% and prompts
// 10% faster), and a slot's context costs half the memory. They are stored rounded to nearest (vstore_half_rte) and
// read by LOAD_HALFS below; -DKV_F32 builds a float32 cache instead (KV_LOAD, KV_STORE):
#if defined(KEY_BLOCK)
#define KEY_STRIDE(seq_p) KEY_BLOCK
#define KEY_AT(k_cache, cache_offset, kv_dim, seq_p, c, p) ((k_cache) + (cache_offset) + \
    (size_t)((p) / KEY_BLOCK) * (kv_dim) * KEY_BLOCK + (size_t)(c) * KEY_BLOCK + (p) % KEY_BLOCK)
#else
#define KEY_STRIDE(seq_p) (seq_p)
#define KEY_AT(k_cache, cache_offset, kv_dim, seq_p, c, p) ((k_cache) + (cache_offset) + (size_t)(c) * (seq_p) + (p))
#endif
#define VALUE_AT(v_cache, cache_offset, kv_dim, c, p) ((v_cache) + (cache_offset) + (size_t)(p) * (kv_dim) + (c))

// Where row n of a forward pass sits. A pass over one sequence (slot_stride = 0) gets that sequence's state
// {pos, n_prompt}: its row n is at position pos + n, in the slot whose layer starts at cache_offset. A batched pass
// (the host's Llama.batch: rows of several sequences, each at its own position) gets a table of {pos, slot} per
// row, and cache_offset is then slot 0's layer: slot s's starts slot_stride floats further per slot. A batch's
// padding rows (Llama.padded_rows: the matrix kernels compute whole groups of rows anyway) have position -1: they
// neither write the cache nor attend.
#define ROW_POS(state, n, slot_stride) ((slot_stride) ? (state)[2 * (n)] : (state)[0] + (n))
#define ROW_CACHE(state, n, slot_stride, cache_offset) \
    ((size_t)(cache_offset) + ((slot_stride) ? (size_t)(state)[2 * (n) + 1] * (size_t)(slot_stride) : 0))

// n fp16 values at p as a floatn (n = 2, 4, 8 or 16, a literal or a macro of one; p aligned to n halves): one
// conversion instruction per 8 or 16 where the compiler targets F16C or AVX-512, vload_halfn elsewhere (GPUs
// convert natively; PoCL makes it a call). x86 without AVX joins vload_half4s: a wider vload_half returns a
// vector wider than SSE's registers, which "changes the ABI" (a warning on every build). (Oclgrind 21.10's
// uninitialized-value check crashes on such a join, so targets without those macros keep the wide vload_half.)
#if defined(__AVX512F__)
#define LOAD_HALFS_16(p) __builtin_ia32_vcvtph2ps512_mask(as_short16(*(__global const ushort16 *)(p)), (float16)(0.0f), \
                                                        (ushort)0xffff, 4)
#elif defined(__F16C__) || defined(__SSE2__)
#define LOAD_HALFS_16(p) (float16)(LOAD_HALFS_8(p), LOAD_HALFS_8((p) + 8))
#else
#define LOAD_HALFS_16(p) vload_half16(0, p)
#endif
#if defined(__F16C__)
#define LOAD_HALFS_8(p) __builtin_ia32_vcvtph2ps256(as_short8(*(__global const ushort8 *)(p)))
#define LOAD_HALFS_4(p) __builtin_ia32_vcvtph2ps(as_short8((ushort8)(*(__global const ushort4 *)(p), (ushort4)(0))))
#elif defined(__SSE2__) && !defined(__AVX__)
#define LOAD_HALFS_8(p) (float8)(vload_half4(0, p), vload_half4(0, (p) + 4))
#define LOAD_HALFS_4(p) vload_half4(0, p)
#else
#define LOAD_HALFS_8(p) vload_half8(0, p)
#define LOAD_HALFS_4(p) vload_half4(0, p)
#endif
#define LOAD_HALFS_2(p) vload_half2(0, p)
#define LOAD_HALFS(p, n) CAT(LOAD_HALFS_, n)(p)

// The cache's values: fp16, or float32 where built with -DKV_F32 (Llama's kv_cache="f32": float32 math end to end,
// what the tests that check the other kernels against NumPy's float32 math run). KV_LOAD(p, n): n values at p as a
// floatn; KV_STORE(v, i, p): value v into p[i].
#if defined(KV_F32)
#define kv_t float
#define KV_LOAD(p, n) (*(__global const CAT(float, n) *)(p))
#define KV_STORE(v, i, p) ((p)[i] = (v))
#else
#define kv_t half
#define KV_LOAD(p, n) LOAD_HALFS(p, n)
#define KV_STORE(v, i, p) vstore_half_rte((v), (i), (p))
#endif

#if defined(ATTENTION_POSITIONS)
#define floatP CAT(float, ATTENTION_POSITIONS)  // a run of positions (2, 4, 8 or 16)
#define KV_LOAD_P(p) KV_LOAD(p, ATTENTION_POSITIONS)
#define KV_LOAD_H(p) KV_LOAD(p, HD_VEC)
#define floatH CAT(float, HD_VEC)       // a run of head dimensions (-DHD_VEC divides head_dim)
// exp of a run of positions: on AVX and AVX2 a float16 goes to the library's exp in halves, as a float16
// passed by value there "changes the ABI" (a compiler warning on every build; see matrix.cl)
#if ATTENTION_POSITIONS == 16 && defined(__AVX__) && !defined(__AVX512F__)
#define EXP_P(v) (float16)(exp((v).lo), exp((v).hi))
#else
#define EXP_P(v) exp(v)
#endif


// Attention for query head h of row n (a row of query, q_stride apart), at its position (ROW_POS), over its
// slot's cache positions 0..pos (causal), by the whole work-group, in float32 (from an fp16 cache too). Query head
// h reads key/value head h / (n_heads / n_kv_heads) (grouped-query attention). att is scratch [T][n_heads][seq_p] for the scores.
// The L threads of a group split the positions for the scores and the head dimensions for the weighted
// sum of values; scratch holds L floats.
inline void attend(const int h, const int n, __global const float *query, __global const kv_t *k_cache,
                   __global const kv_t *v_cache, __global float *att, __global float *out,
                   __global const int *state, const int n_heads, const int n_kv_heads, const int head_dim,
                   const int seq_p, const int q_stride, const int out_stride, const int cache_offset,
                   const int slot_stride, __local float *scratch) {
    const int lid = get_local_id(0), L = get_local_size(0);
    const int pos = ROW_POS(state, n, slot_stride), kv_dim = n_kv_heads * head_dim, kvh = h / (n_heads / n_kv_heads);
    if (pos < 0) return;    // a padding row: the whole work-group returns, before any barrier
    const size_t layer = ROW_CACHE(state, n, slot_stride, cache_offset);
    __global const float *q = query + (size_t)n * q_stride + h * head_dim;
    __global const kv_t *vh = VALUE_AT(v_cache, layer, kv_dim, kvh * head_dim, 0);
    __global float *a = att + ((size_t)n * n_heads + h) * seq_p;
    const size_t ks = KEY_STRIDE(seq_p);
    const float scale = rsqrt((float)head_dim);

    // vector running max and sum, reduced once at the end: fmax and a per-lane scalar loop cost calls and
    // scalar work in every iteration on PoCL
    floatP mv = -INFINITY;
    for (int t0 = lid * ATTENTION_POSITIONS; t0 <= pos; t0 += L * ATTENTION_POSITIONS) {
        // four independent chains of FMAs (one would wait on each one's latency); head_dim is even (RoPE pairs)
        floatP s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        __global const kv_t *kt = KEY_AT(k_cache, layer, kv_dim, seq_p, kvh * head_dim, t0);
        int d = 0;
        for (; d + 4 <= head_dim; d += 4) {
            s0 += q[d] * KV_LOAD_P(kt + d * ks);
            s1 += q[d + 1] * KV_LOAD_P(kt + (d + 1) * ks);
            s2 += q[d + 2] * KV_LOAD_P(kt + (d + 2) * ks);
            s3 += q[d + 3] * KV_LOAD_P(kt + (d + 3) * ks);
        }
        for (; d < head_dim; d += 2) {
            s0 += q[d] * KV_LOAD_P(kt + d * ks);
            s1 += q[d + 1] * KV_LOAD_P(kt + (d + 1) * ks);
        }
        floatP s = ((s0 + s1) + (s2 + s3)) * scale;
        if (t0 + ATTENTION_POSITIONS > pos + 1)                                 // the vector runs past the causal edge
            for (int i = pos + 1 - t0; i < ATTENTION_POSITIONS; i++) ((float *)&s)[i] = -INFINITY;
        *(__global floatP *)(a + t0) = s;
        mv = s > mv ? s : mv;
    }
    float m = -INFINITY;
    for (int i = 0; i < ATTENTION_POSITIONS; i++) m = m > ((float *)&mv)[i] ? m : ((float *)&mv)[i];
    m = group_max(m, scratch);
    floatP sv = 0.0f;
    for (int t0 = lid * ATTENTION_POSITIONS; t0 <= pos; t0 += L * ATTENTION_POSITIONS) {
        const floatP e = EXP_P(*(__global floatP *)(a + t0) - m);
        *(__global floatP *)(a + t0) = e;
        sv += e;
    }
    float sum = 0.0f;
    for (int i = 0; i < ATTENTION_POSITIONS; i++) sum += ((float *)&sv)[i];
    sum = group_sum(sum, scratch);   // its barriers also publish a[] to the whole group
    group_barrier(CLK_GLOBAL_MEM_FENCE);
    for (int d0 = lid * HD_VEC; d0 < head_dim; d0 += L * HD_VEC) {
        floatH o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;    // four chains, as for the scores
        __global const kv_t *vd = vh + d0;
        int t = 0;
        for (; t + 4 <= pos + 1; t += 4) {
            o0 += a[t] * KV_LOAD_H(vd + (size_t)t * kv_dim);
            o1 += a[t + 1] * KV_LOAD_H(vd + (size_t)(t + 1) * kv_dim);
            o2 += a[t + 2] * KV_LOAD_H(vd + (size_t)(t + 2) * kv_dim);
            o3 += a[t + 3] * KV_LOAD_H(vd + (size_t)(t + 3) * kv_dim);
        }
        for (; t <= pos; t++) o0 += a[t] * KV_LOAD_H(vd + (size_t)t * kv_dim);
        *(__global floatH *)(out + (size_t)n * out_stride + h * head_dim + d0) = ((o0 + o1) + (o2 + o3)) / sum;
    }
}

#if defined(GQA)
#define ATT_CHAINS (GQA == 1 ? 4 : 2)

// Spans: a row's positions are taken ATT_SPAN at a time (-DATT_SPAN, the config's work_group.attention_span; a multiple
// of ATTENTION_POSITIONS and of 4, so of ATT_CHAINS), each span's softmax with its own largest score m and sum l, and
// the spans folded in order into the row's, as flash-decoding does: the sums so far scaled by exp(M - M') and the
// span's by exp(m - M'), M' the larger of the largest scores (fold_span, FOLD), the weighted values divided by the sum
// once at the end (normalize). So the layer launch can give a long row's spans to different work-groups (matrix.cl's
// layer_phases, attend_span and fold_spans) where a task per key/value head left cores idle (SmolLM2's 3 heads on 2
// cores: one waits a third of the time). Every path folds the spans in the same order with the same functions, so a row
// gets the same bits in one task or in several; a row of one span (positions below ATT_SPAN) gets what it got before
// spans, og / sum.
#if !defined(ATT_SPAN)
#define ATT_SPAN 512
#endif
#define ROW_SPANS(pos) (max((pos), 0) / ATT_SPAN + 1)

// The parts of attend_heads and attend_rows, so that a row gets the same float operations in either:
// score_run: a row's scores for its GQA query heads (at q) at positions t0 .. t0 + ATTENTION_POSITIONS - 1 (keys at
// kt), into its score rows (a, seq_p apart), past the causal edge pos -INFINITY, and their running maxima mv
inline void score_run(const int t0, const int pos, __global const kv_t *kt, const size_t ks, const int head_dim,
                      const int seq_p, const float scale, __global const float *q, __global float *a, floatP *mv) {
    floatP s[ATT_CHAINS * GQA];
#pragma unroll
    for (int i = 0; i < ATT_CHAINS * GQA; i++) s[i] = 0.0f;
    // q and the keys by pointers that step with d: indexed by d, each multiply-add's address took 32-bit
    // arithmetic and a sign extension, integer work beside every FMA
    const size_t qh = head_dim;
    int d = 0;
    for (; d + ATT_CHAINS <= head_dim; d += ATT_CHAINS, q += ATT_CHAINS, kt += ATT_CHAINS * ks) {
#pragma unroll
        for (int c = 0; c < ATT_CHAINS; c++) {
            const floatP k = KV_LOAD_P(kt + c * ks);
#pragma unroll
            for (int g = 0; g < GQA; g++) s[ATT_CHAINS * g + c] += q[g * qh + c] * k;
        }
    }
    for (; d < head_dim; d += 2, q += 2, kt += 2 * ks) {     // head_dim is even (RoPE pairs): 4 chains leave a pair
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const floatP k = KV_LOAD_P(kt + c * ks);
#pragma unroll
            for (int g = 0; g < GQA; g++) s[ATT_CHAINS * g + c] += q[g * qh + c] * k;
        }
    }
#pragma unroll
    for (int g = 0; g < GQA; g++) {
#if ATT_CHAINS == 4
        floatP sg = ((s[4 * g] + s[4 * g + 1]) + (s[4 * g + 2] + s[4 * g + 3])) * scale;
#else
        floatP sg = (s[2 * g] + s[2 * g + 1]) * scale;
#endif
        if (t0 + ATTENTION_POSITIONS > pos + 1)                             // the vector runs past the causal edge
            for (int i = pos + 1 - t0; i < ATTENTION_POSITIONS; i++) ((float *)&sg)[i] = -INFINITY;
        *(__global floatP *)(a + (size_t)g * seq_p + t0) = sg;
        mv[g] = sg > mv[g] ? sg : mv[g];
    }
}

// softmax_span: each head's softmax weights in place of its scores at positions from..last (a span's), their largest
// score m (of the running maxima mv) and their sum l
inline void softmax_span(const int from, const int last, const int seq_p, __global float *a, const floatP *mv,
                         float *m, float *l) {
    for (int g = 0; g < GQA; g++) {
        float top = -INFINITY;
        for (int i = 0; i < ATTENTION_POSITIONS; i++) top = top > ((float *)&mv[g])[i] ? top : ((float *)&mv[g])[i];
        __global float *ag = a + (size_t)g * seq_p;
        floatP sv = 0.0f;
        for (int t0 = from; t0 <= last; t0 += ATTENTION_POSITIONS) {
            const floatP e = EXP_P(*(__global floatP *)(ag + t0) - top);
            *(__global floatP *)(ag + t0) = e;
            sv += e;
        }
        m[g] = top;
        l[g] = 0.0f;
        for (int i = 0; i < ATTENTION_POSITIONS; i++) l[g] += ((float *)&sv)[i];
    }
}

// fold_span: span s's (m, l) into the row's running (M, L), each head's, and the weights that the values' sums so far
// (alpha) and the span's (beta) take in FOLD; the first span's are the row's
inline void fold_span(const int s, const float *m, const float *l, float *M, float *L, float *alpha, float *beta) {
    for (int g = 0; g < GQA; g++) {
        alpha[g] = 0.0f;
        beta[g] = 1.0f;
        if (s == 0) {
            M[g] = m[g];
            L[g] = l[g];
            continue;
        }
        const float top = M[g] > m[g] ? M[g] : m[g];
        alpha[g] = exp(M[g] - top);
        beta[g] = exp(m[g] - top);
        L[g] = L[g] * alpha[g] + l[g] * beta[g];
        M[g] = top;
    }
}
// span s's sums of weighted values (sums) folded into the row's so far (o)
#define FOLD(s, o, sums, alpha, beta) ((s) == 0 ? (sums) : (o) * (alpha) + (sums) * (beta))

// value_run: a row's weighted values of positions t .. end - 1 (a multiple of ATT_CHAINS of them; values at vd, the
// head dimensions d0 .. d0 + HD_VEC - 1 of its key/value head) added to its sums o, ATT_CHAINS chains over the
// positions; with `fetch`, each position's values 32 positions on prefetched (builds whose keys are not in blocks,
// where the scores' pass has not fetched them; vh: the head's values at dimension 0)
inline void value_run(int t, const int end, __global const kv_t *vd, __global const kv_t *vh, const int kv_dim,
                      const int head_dim, const int seq_p, __global const float *a, floatH *o, const int fetch) {
    for (; t < end; t += ATT_CHAINS) {
#if defined(__SSE2__) && !defined(KEY_BLOCK)
        // SmolLM2 over 130-450 positions, in-process A/B: 8-row batch steps and one sequence's decode 1.01-1.04x
        if (fetch)
            for (int c = 0; c < ATT_CHAINS; c++)
                for (int i = 0; i < head_dim; i += 64 / sizeof(kv_t))
                    __builtin_prefetch((__global const char *)(vh + (size_t)(t + c + 32) * kv_dim + i));
#endif
#pragma unroll
        for (int c = 0; c < ATT_CHAINS; c++) {
            const floatH v = KV_LOAD_H(vd + (size_t)(t + c) * kv_dim);
#pragma unroll
            for (int g = 0; g < GQA; g++) o[ATT_CHAINS * g + c] += a[(size_t)g * seq_p + t + c] * v;
        }
    }
}

// value_end: a row's values after its last whole run of ATT_CHAINS positions in the span (whole) up to last, into the
// first chain, then the chains' sums, folded as span s into dst (its GQA heads' dimensions d0 .., heads dst_stride
// apart)
inline void value_end(const int whole, const int last, __global const kv_t *vd, const int kv_dim, const int seq_p,
                      __global const float *a, floatH *o, const int s, const float *alpha, const float *beta,
                      __global float *dst, const int dst_stride) {
    for (int t = whole; t <= last; t++) {
        const floatH v = KV_LOAD_H(vd + (size_t)t * kv_dim);
#pragma unroll
        for (int g = 0; g < GQA; g++) o[ATT_CHAINS * g] += a[(size_t)g * seq_p + t] * v;
    }
#pragma unroll
    for (int g = 0; g < GQA; g++) {
#if ATT_CHAINS == 4
        const floatH og = (o[4 * g] + o[4 * g + 1]) + (o[4 * g + 2] + o[4 * g + 3]);
#else
        const floatH og = o[2 * g] + o[2 * g + 1];
#endif
        __global floatH *d = (__global floatH *)(dst + (size_t)g * dst_stride);
        *d = FOLD(s, *d, og, alpha[g], beta[g]);
    }
}

// normalize: a row's folded sums of weighted values (its GQA heads' at out) over the softmax's sums L
inline void normalize(__global float *out, const int head_dim, const float *L) {
    for (int g = 0; g < GQA; g++)
        for (int d0 = 0; d0 < head_dim; d0 += HD_VEC) {
            __global floatH *o = (__global floatH *)(out + (size_t)g * head_dim + d0);
            *o = *o / L[g];
        }
}

#if defined(KEY_BLOCK) && defined(__SSE2__)
// at a key block's first position t0, the head's keys two blocks on, a prefetch per 64-byte line (clang's builtin;
// one never faults, so those past the cache's end are harmless): about half of the blocks' gain (the layout's
// comment above); and those positions' values, so that the weighted sums find them in cache (8-row batch steps
// 1.03x, one sequence's decode the same)
#define FETCH_BLOCK(kt, vh, t0, kv_dim, head_dim) do { \
        if ((t0) % KEY_BLOCK) break; \
        for (int i_ = 0; i_ < (head_dim) * KEY_BLOCK; i_ += 64 / sizeof(kv_t)) \
            __builtin_prefetch((__global const char *)((kt) + (size_t)2 * (kv_dim) * KEY_BLOCK + i_)); \
        for (int c_ = 0; c_ < KEY_BLOCK; c_++) \
            for (int i_ = 0; i_ < (head_dim); i_ += 64 / sizeof(kv_t)) \
                __builtin_prefetch((__global const char *)((vh) + (size_t)((t0) + 2 * KEY_BLOCK + c_) * (kv_dim) + \
                                                           i_)); \
    } while (0)
#else
#define FETCH_BLOCK(kt, vh, t0, kv_dim, head_dim) do {} while (0)
#endif

// The arguments every attention body takes, in this order
#define ATT_PARAMS __global const float *query, __global const kv_t *k_cache, __global const kv_t *v_cache, \
    __global float *att, __global float *out, __global const int *state, const int n_heads, const int n_kv_heads, \
    const int head_dim, const int seq_p, const int q_stride, const int out_stride, const int cache_offset, \
    const int slot_stride
#define ATT_VALUES query, k_cache, v_cache, att, out, state, n_heads, n_kv_heads, head_dim, seq_p, q_stride, \
    out_stride, cache_offset, slot_stride

// span_sums: span s of row n for the GQA query heads of key/value head j: its scores, its softmax (m and l, each
// head's), and its weighted values folded as span `fold` into dst (the heads' dimensions, heads dst_stride apart) with
// the row's running (M, L)
inline void span_sums(const int j, const int n, const int s, const int fold, __global float *dst, const int dst_stride,
                      float *M, float *L, float *m, float *l, ATT_PARAMS) {
    const int pos = ROW_POS(state, n, slot_stride), kv_dim = n_kv_heads * head_dim;
    const size_t layer = ROW_CACHE(state, n, slot_stride, cache_offset);
    __global const float *q = query + (size_t)n * q_stride + j * GQA * head_dim;    // the heads' q, side by side
    __global const kv_t *vh = VALUE_AT(v_cache, layer, kv_dim, j * head_dim, 0);
    __global float *a = att + ((size_t)n * n_heads + j * GQA) * seq_p;              // the heads' score rows
    const size_t ks = KEY_STRIDE(seq_p);
    const float scale = rsqrt((float)head_dim);
    const int from = s * ATT_SPAN, last = min(pos, from + ATT_SPAN - 1);

    floatP mv[GQA];     // running maxima as vectors, reduced once at the end (as attend's)
#pragma unroll
    for (int g = 0; g < GQA; g++) mv[g] = -INFINITY;
    for (int t0 = from; t0 <= last; t0 += ATTENTION_POSITIONS) {
        __global const kv_t *kt = KEY_AT(k_cache, layer, kv_dim, seq_p, j * head_dim, t0);
        FETCH_BLOCK(kt, vh, t0, kv_dim, head_dim);
        score_run(t0, pos, kt, ks, head_dim, seq_p, scale, q, a, mv);
    }
    softmax_span(from, last, seq_p, a, mv, m, l);
    float alpha[GQA], beta[GQA];
    fold_span(fold, m, l, M, L, alpha, beta);
    const int whole = min(from + ATT_SPAN, (pos + 1) / ATT_CHAINS * ATT_CHAINS);  // the span's whole runs' end
    for (int d0 = 0; d0 < head_dim; d0 += HD_VEC) {
        floatH o[ATT_CHAINS * GQA];
#pragma unroll
        for (int i = 0; i < ATT_CHAINS * GQA; i++) o[i] = 0.0f;
        value_run(from, whole, vh + d0, vh, kv_dim, head_dim, seq_p, a, o, d0 == 0);
        value_end(whole, last, vh + d0, kv_dim, seq_p, a, o, fold, alpha, beta, dst + d0, dst_stride);
    }
}

// Attention for the GQA query heads j * GQA .. j * GQA + GQA - 1 of row n, those that read key/value head j, by one
// work-item (work-groups of one, CPUs: attention.cl's kernel, matrix.cl's qkv_attention and layer launch), its spans
// in turn: each key and value vector loaded serves all GQA heads, where attend, a head at a time, loads them GQA times
// (SmolLM2 after 512 tokens: a decode step 5.35 -> 5.05 ms). Each head's sums run in ATT_CHAINS independent chains (an
// FMA waits on the one before in its chain), over the head dimensions for the scores, over the positions for the
// values; one head gets 4 chains, several share the latency with 2 each. Every kernel takes these functions, so a
// row's attention is the same float operations whichever kernel runs it: a sequence alone (decode's fused launch)
// and beside others (a batch's attention launch) get the same bits.
inline void attend_heads(const int j, const int n, ATT_PARAMS) {
    const int pos = ROW_POS(state, n, slot_stride);
    if (pos < 0) return;    // a padding row
    __global float *o = out + (size_t)n * out_stride + j * GQA * head_dim;
    float M[GQA], L[GQA], m[GQA], l[GQA];
    for (int s = 0; s < ROW_SPANS(pos); s++) span_sums(j, n, s, s, o, head_dim, M, L, m, l, ATT_VALUES);
    normalize(o, head_dim, L);
}

// A row's spans apart (the layer launch's tasks, a span each, then one to fold them): span s's sums, m and l in its
// part of `parts`, [rows][n_heads][spans][head_dim + HD_VEC] floats (a head's sums of weighted values, then m and l;
// spans: seq_p's), which fold_spans folds as attend_heads does, to the same bits
#define PART_SPANS(seq_p) (((seq_p) + ATT_SPAN - 1) / ATT_SPAN)
#define SPAN_PART(parts, n, h, s) \
    ((parts) + (((size_t)(n) * n_heads + (h)) * PART_SPANS(seq_p) + (s)) * (head_dim + HD_VEC))
inline void attend_span(const int j, const int n, const int s, __global float *parts, ATT_PARAMS) {
    __global float *p = SPAN_PART(parts, n, j * GQA, s);
    const int stride = PART_SPANS(seq_p) * (head_dim + HD_VEC);      // to the next head's part
    float M[GQA], L[GQA], m[GQA], l[GQA];
    span_sums(j, n, s, 0, p, stride, M, L, m, l, ATT_VALUES);
    for (int g = 0; g < GQA; g++) {
        p[(size_t)g * stride + head_dim] = m[g];
        p[(size_t)g * stride + head_dim + 1] = l[g];
    }
}

inline void fold_spans(const int j, const int n, __global const float *parts, ATT_PARAMS) {
    const int pos = ROW_POS(state, n, slot_stride), stride = PART_SPANS(seq_p) * (head_dim + HD_VEC);
    __global float *o = out + (size_t)n * out_stride + j * GQA * head_dim;
    float M[GQA], L[GQA], alpha[GQA], beta[GQA];
    for (int s = 0; s < ROW_SPANS(pos); s++) {
        __global const float *p = SPAN_PART(parts, n, j * GQA, s);
        float m[GQA], l[GQA];
        for (int g = 0; g < GQA; g++) {
            m[g] = p[(size_t)g * stride + head_dim];
            l[g] = p[(size_t)g * stride + head_dim + 1];
        }
        fold_span(s, m, l, M, L, alpha, beta);
        for (int g = 0; g < GQA; g++)
            for (int d0 = 0; d0 < head_dim; d0 += HD_VEC) {
                __global floatH *d = (__global floatH *)(o + (size_t)g * head_dim + d0);
                *d = FOLD(s, *d, *(__global const floatH *)(p + (size_t)g * stride + d0), alpha[g], beta[g]);
            }
    }
    normalize(o, head_dim, L);
}

// Attention for rows n0 .. n0 + rows - 1 (rows <= ATT_ROWS) and key/value head j: what attend_heads computes for
// each row, with the same functions, so the same bits whichever rows share a block; but the rows take each run of
// keys and of values in turn while it is in L1, where attend_heads has each row stream its slot's cache from L2 or
// L3. A prompt's rows share their slot's cache, so a block reads it once, not once a row: a cache of 7,000
// positions is 0.9 MB of keys and 0.9 MB of values a key/value head (SmolLM2). Rows of other slots (a server's
// batch) are served the same way, each from its own cache. The keys' vectors run ATTENTION_POSITIONS positions at
// a time; the values VALUE_RUN (a multiple of ATT_CHAINS) at a time, each row's sums kept in `o` between runs; the
// spans in turn, each row's folded as attend_heads folds them.
#if !defined(ATT_ROWS)
#define ATT_ROWS 8
#endif
#define VALUE_RUN 64
inline void attend_rows(const int j, const int n0, const int rows, ATT_PARAMS) {
    const int kv_dim = n_kv_heads * head_dim;
    const size_t ks = KEY_STRIDE(seq_p), a_row = (size_t)n_heads * seq_p;
    const float scale = rsqrt((float)head_dim);
    __global const float *q = query + (size_t)n0 * q_stride + j * GQA * head_dim;     // row r's: + r * q_stride
    __global float *a = att + ((size_t)n0 * n_heads + j * GQA) * seq_p;                // row r's: + r * a_row
    __global float *o_rows = out + (size_t)n0 * out_stride + j * GQA * head_dim;       // row r's: + r * out_stride
    int pos[ATT_ROWS];          // each row's position
    size_t layer[ATT_ROWS];
    int last = -1, far = 0;     // the rows' furthest position (padding rows: -1), and a row there
    for (int r = 0; r < rows; r++) {
        pos[r] = ROW_POS(state, n0 + r, slot_stride);
        layer[r] = ROW_CACHE(state, n0 + r, slot_stride, cache_offset);
        if (pos[r] > last) last = pos[r], far = r;
    }
    float M[ATT_ROWS * GQA], L[ATT_ROWS * GQA];     // each row's running largest scores and sums (fold_span)
    for (int s = 0; s * ATT_SPAN <= last; s++) {
        const int from = s * ATT_SPAN, to = min(last, from + ATT_SPAN - 1);
        int end[ATT_ROWS], whole[ATT_ROWS];     // each row's last position in the span, and its whole runs' end
        for (int r = 0; r < rows; r++) {
            end[r] = min(pos[r], to);
            whole[r] = min(from + ATT_SPAN, (pos[r] + 1) / ATT_CHAINS * ATT_CHAINS);
        }
        floatP mv[ATT_ROWS * GQA];
        for (int i = 0; i < rows * GQA; i++) mv[i] = -INFINITY;
        for (int t0 = from; t0 <= to; t0 += ATTENTION_POSITIONS) {
            // the furthest row's cache: a prompt's rows share it
            FETCH_BLOCK(KEY_AT(k_cache, layer[far], kv_dim, seq_p, j * head_dim, t0),
                        VALUE_AT(v_cache, layer[far], kv_dim, j * head_dim, 0), t0, kv_dim, head_dim);
            for (int r = 0; r < rows; r++)
                if (t0 <= pos[r])
                    score_run(t0, pos[r], KEY_AT(k_cache, layer[r], kv_dim, seq_p, j * head_dim, t0), ks, head_dim,
                              seq_p, scale, q + (size_t)r * q_stride, a + r * a_row, mv + r * GQA);
        }
        float alpha[ATT_ROWS * GQA], beta[ATT_ROWS * GQA];
        for (int r = 0; r < rows; r++)
            if (pos[r] >= from) {
                float m[GQA], l[GQA];
                softmax_span(from, end[r], seq_p, a + r * a_row, mv + r * GQA, m, l);
                fold_span(s, m, l, M + r * GQA, L + r * GQA, alpha + r * GQA, beta + r * GQA);
            }
        for (int d0 = 0; d0 < head_dim; d0 += HD_VEC) {
            floatH o[ATT_ROWS * ATT_CHAINS * GQA];
            for (int i = 0; i < rows * ATT_CHAINS * GQA; i++) o[i] = 0.0f;
            for (int t1 = from; t1 <= to; t1 += VALUE_RUN)
                for (int r = 0; r < rows; r++) {
                    if (t1 >= whole[r]) continue;
                    __global const kv_t *vh = VALUE_AT(v_cache, layer[r], kv_dim, j * head_dim, 0);
                    floatH run[ATT_CHAINS * GQA];       // the row's sums, in registers for the run
#pragma unroll
                    for (int i = 0; i < ATT_CHAINS * GQA; i++) run[i] = o[r * ATT_CHAINS * GQA + i];
                    value_run(t1, min(t1 + VALUE_RUN, whole[r]), vh + d0, vh, kv_dim, head_dim, seq_p, a + r * a_row,
                              run, 0);
#pragma unroll
                    for (int i = 0; i < ATT_CHAINS * GQA; i++) o[r * ATT_CHAINS * GQA + i] = run[i];
                }
            for (int r = 0; r < rows; r++)
                if (pos[r] >= from)
                    value_end(whole[r], end[r], VALUE_AT(v_cache, layer[r], kv_dim, j * head_dim + d0, 0), kv_dim,
                              seq_p, a + r * a_row, o + r * ATT_CHAINS * GQA, s, alpha + r * GQA, beta + r * GQA,
                              o_rows + (size_t)r * out_stride + d0, head_dim);
        }
    }
    for (int r = 0; r < rows; r++)
        if (pos[r] >= 0) normalize(o_rows + (size_t)r * out_stride, head_dim, L + r * GQA);
}
#endif
#endif
