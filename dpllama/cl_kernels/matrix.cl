// Matrix-vector products over one weight format, and the embedding row lookup.
//
// Build with one weight format and -DTILE_ROWS (weights.h: the formats and their device layout), and
// -DTOKENS=n: the input vectors one work-group takes (1 to decode; more in prefill, so that every
// weight loaded and decoded serves n tokens), and -DTILES=k: the tiles one work-group takes at a time
// (-DX_ONCE, CPUs: a work-group takes an equal share of the tiles, k at a time, preparing its input once for all).
//
// A work-group computes TILES tiles; its L threads split the columns (L = 1 on CPUs, where the TILE_ROWS lanes
// are the SIMD lanes; L = 32..64 on GPUs) and a tree reduction joins them. The hot loop uses plain
// loads and arithmetic only: PoCL does not inline vload*/vload_half, and a call stops vectorization.
// For asymmetric formats the block sum of x is shared by all rows: sum_k (s*q_k + m) x_k = s * sum q_k x_k + m * sum x_k.
//
// Quantized kernels take x as 16-bit integers: each block of x is scaled by 32767 / max|x| and rounded (which
// moves each value by at most max|x| / 65534, far below the weights' own quantization error), and an int
// holds the pair (x[8j+k], x[8j+k+4]), k < 4, of each 8 columns: the two weights that one shift and one mask
// of a packed word leave in the low and high 16-bit halves of a lane. For int4 those are nibbles k and k+4 of
// word j; q8 word 2j+h (h < 2) holds columns (8j+2h, 8j+2h+1, 8j+2h+4, 8j+2h+5) as bytes q + 128, so that
// bytes 0 and 2 are pair 2h and bytes 1 and 3 pair 2h+1 (DeviceTensor packs them). So sum q_k x_k is integer
// multiply-adds of 16-bit pairs, which x86 does for 32 weights in one instruction (VNNI vpdpwssd; pmaddwd and
// an add on AVX2), where float math spends a conversion and an FMA per weight, and for int4 a shift and a
// mask on top (measured: int4 2-3x faster). The offsets (q - 8, q - 16, q + 128) go into the block sum of x.
//
// Built with -DX_BYTES (int4 and int5 only: `--activation-bits 8`), they take x as bytes instead, llama.cpp's
// numerics: each block scaled by 127 / max|x| and rounded (each value moved by at most max|x| / 254), an int
// holding 4 bytes of x, those of the columns whose weights one mask of a packed word leaves in the 4 bytes of a
// lane: word j's even nibbles (u & 0x0f0f0f0f: columns 8j, 8j + 2, 8j + 4, 8j + 6) and its odd ones
// ((u >> 4) & 0x0f0f0f0f). Unsigned-by-signed byte multiply-adds then take 64 weights an instruction (pmaddubsw,
// its 16-bit pair sums added up over a few words before pmaddwd by 1 widens them; VNNI's vpdpbusd in one),
// and half the multiply-adds of the 16-bit pairs: prompts ran 1.2-1.3x faster on AVX2 and AVX-512 without VNNI. The
// cost is fidelity: SmolLM2's first logits move by up to 1.0 from float32 math's instead of 0.004
// (docs/PERFORMANCE.md, docs/QUALITY.md), so 16 bits stay the default.

// int5 adds a word of fifth bits to int4's four words of nibbles per 32 columns, which DeviceTensor permutes
// so that the bit of column 8j + 2b + p (b < 4, p < 2) sits at bit 8b + 2j + p: shifted by 2j + p - 4, it
// lands at bit 4 of byte b. One bit-select per word j then joins the even nibbles (u & 0x0f0f0f0f: column
// 8j + 2b in byte b) and the odd ones ((u >> 4) & 0x0f0f0f0f) with their fifth bits into two words of 5-bit
// values in bytes, whose bytes 0 and 2 (and 1 and 3, after a shift by 8) are pairs (k, k + 4): mask 0x001f001f
// leaves them in a lane's halves, as int4's mask leaves its nibbles. Per word: 4 shifts (the plane twice, u
// once, a byte once more), 2 bit-selects (one vpternlogd each on AVX-512) and 4 masks, against int4's 3 shifts
// and 4 masks. q8 decodes with fewer operations but reads 8 bits a weight where int5 reads 5, which is what a
// decode step, streaming its weights from memory, waits on (docs/PERFORMANCE.md).

#include "common.h"
#include "weights.h"
#include "attention.h"      // qkv_attention's attend

#define floatV CAT(float, TILE_ROWS)
#define uintV CAT(uint, TILE_ROWS)
#define ushortV CAT(ushort, TILE_ROWS)

// LANES: the rows block_dot multiplies at once (its vectors: floatL, ...). A whole tile, but for AVX2 without AVX-512
// at 8 tokens: there a 16-row tile is two ymm registers, so 8 tokens' integer sums alone take all 16 of them, and
// clang's code for a block's 256 multiply-adds spilled to and reloaded from the stack ~400 times. A work-group then
// goes over a tile twice, its rows 0-7 and then 8-15 (HALVES), each pass's sums in 8 registers; the second pass
// finds the tile's weights in L1. The same products and sums in the same order: the results are bit for bit the
// same (8-row steps 1.11x, prompts 1.15-1.34x on a Zen 3; 4 tokens spill less and ran slower in halves).
#if defined(X_ONCE) && !defined(W_F32) && TILE_ROWS == 16 && TOKENS >= 8 && defined(__AVX2__) && !defined(__AVX512F__)
#define LANES 8
#else
#define LANES TILE_ROWS
#endif
#define HALVES (TILE_ROWS / LANES)
#define floatL CAT(float, LANES)
#define uintL CAT(uint, LANES)
#define ushortL CAT(ushort, LANES)
#define as_floatL CAT(as_float, LANES)
#define as_uintL CAT(as_uint, LANES)
#define intL CAT(int, LANES)
#define as_intL CAT(as_int, LANES)

#if !defined(W_F32)
typedef short shorts32 __attribute__((ext_vector_type(32)));    // a zmm of 16-bit lanes (OpenCL has no short32)
typedef char chars64 __attribute__((ext_vector_type(64)));      // a zmm of bytes
typedef char chars32 __attribute__((ext_vector_type(32)));      // a ymm of bytes
#if defined(X_BYTES) && !defined(W_INT4) && !defined(W_INT5)
#error "X_BYTES is for int4 and int5 weights: q8's take 16-bit x"
#endif
// A VNNI instruction (vpdpwssd, vpdpbusd) written in inline assembly, for CPUs that have it where the compiler does not
// target it (the runtime's probe defines VNNI_ASM or AVXVNNI_ASM): acc += the sums of m's and p's products, p one int
// for every lane. On a zmm p comes broadcast from memory by the instruction ({1to16}); on a ymm, from a register, in
// AVX-VNNI's VEX form, or with -DVNNI_EVEX in AVX-512 VNNI's EVEX form (with AVX-512 VL: CPUs with AVX-512 VNNI and
// not AVX-VNNI, whose compiler targets AVX2, as the pip PoCL 3.0 does AMD Zen 4: 8-row batch steps 1.09x).
#define VNNI_ZMM(insn, acc, m, p) ({ int16 a_ = (acc); \
    __asm__(insn " %2%{1to16%}, %1, %0" : "+v"(a_) : "v"(as_int16(m)), "m"(p)); a_; })
#if defined(VNNI_EVEX)
#define YMM_FORM ""
#else
#define YMM_FORM "%{vex%} "
#endif
#define VNNI_YMM(insn, acc, m, p) ({ int8 a_ = (acc); \
    __asm__(YMM_FORM insn " %2, %1, %0" : "+x"(a_) : "x"(m), "x"((int8)(p))); a_; })
// f(acc, m, p) on ymm halves: once for 8 lanes, on .lo and .hi for 16 (AVX2's two registers)
#if LANES == 8
#define ON_YMM(f, acc, m, p) f((acc), as_int8(m), (p))
#else
#define ON_YMM(f, acc, m, p) ((int16)(f((acc).lo, as_int8((m).lo), (p)), f((acc).hi, as_int8((m).hi), (p))))
#endif
#if !defined(X_BYTES)
#define X_MAX 32767.0f      // x as 16-bit pairs (the header)
#define X_PER_INT 2
// acc + lo(m) * lo(p) + hi(m) * hi(p) in every 32-bit lane, the halves taken as signed 16-bit integers;
// p, one int, is the same pair for all lanes. x86's instructions where the compiler targets them (clang's
// builtins, under the macros it defines for the target: vpdpwssd with VNNI, vpmaddwd and an add on zmm with
// AVX-512 BW, on two ymm with AVX2, vpdpwssd on them with AVX-VNNI), or VNNI in inline assembly where the runtime's
// probe found the CPU has it and the compiler does not target it (VNNI_ASM, AVXVNNI_ASM); plain integer arithmetic
// anywhere else.
#if LANES == 16 && defined(__AVX512VNNI__)
#define MADD(acc, m, p) __builtin_ia32_vpdpwssd512((acc), as_int16(m), (int16)(p))
#elif LANES == 16 && defined(__AVX512BW__) && defined(VNNI_ASM)
// the same instruction in inline assembly (VNNI_ZMM; -DVNNI_ASM: the runtime's probe, dpllama/runtime/device.py):
// the same sums, bit for bit, as the pmaddwd path below, in half the instructions (prompts 1.14x, decode 1.05x)
#define MADD(acc, m, p) VNNI_ZMM("vpdpwssd", (acc), (m), (p))
#elif LANES == 16 && defined(__AVX512BW__)
#define MADD(acc, m, p) ((acc) + __builtin_ia32_pmaddwd512(__builtin_astype((m), shorts32), \
                                                           __builtin_astype((int16)(p), shorts32)))
#elif (LANES == 8 || LANES == 16) && defined(__AVX2__)
// on ymm (LANES 16: two): AVX-VNNI's vpdpwssd where the compiler targets it, or in inline assembly where the probe
// found the CPU has it (-DAVXVNNI_ASM: Intel since Alder Lake, AMD Zen 5; with -DVNNI_EVEX, AVX-512 VNNI's form: AMD
// Zen 4, Intel since Ice Lake), else vpmaddwd and an add
#if defined(__AVXVNNI__)
#define MADD_Y(acc, m, p) __builtin_ia32_vpdpwssd256((acc), (m), (int8)(p))
#elif defined(AVXVNNI_ASM)
#define MADD_Y(acc, m, p) VNNI_YMM("vpdpwssd", (acc), (m), (p))
#else
#define MADD_Y(acc, m, p) ((acc) + __builtin_ia32_pmaddwd256(as_short16(m), as_short16((int8)(p))))
#endif
#define MADD(acc, m, p) ON_YMM(MADD_Y, acc, m, p)
#else
#define MADD(acc, m, p) ((acc) + (as_intL(m) & 0xffff) * (((p) << 16) >> 16) + (as_intL(m) >> 16) * ((p) >> 16))
#endif
#else
#define X_MAX 127.0f        // x as bytes (the header)
#define X_PER_INT 4
// Sums of 4 byte products per 32-bit lane: w's bytes unsigned (weights 0..31), p's signed (x, |x| <= 127; p,
// one int, is the same 4 bytes for all lanes). DOT4(d, w, p) adds them into d, of type DOTS; WIDEN(d) gives
// d's lanes as intL. x86 adds pmaddubsw's 16-bit pair sums into 16-bit lanes, which hold DOT_WORDS words' worth
// (int4: 8 x 2 x 15 x 127 = 30480; int5: 4 x 2 x 31 x 127 = 31496) before WIDEN's pmaddwd by 1 must take them;
// VNNI's vpdpbusd and plain arithmetic sum into 32-bit lanes at once.
#if LANES == 16 && defined(__AVX512VNNI__)
#define DOTS int16
#define DOT4(d, w, p) __builtin_ia32_vpdpbusd512((d), as_int16(w), (int16)(p))
#define WIDEN(d) (d)
#elif LANES == 16 && defined(__AVX512BW__) && defined(VNNI_ASM)
#define DOTS int16          // as above, through inline assembly (MADD's VNNI_ASM)
#define DOT4(d, w, p) VNNI_ZMM("vpdpbusd", (d), (w), (p))
#define WIDEN(d) (d)
#elif LANES == 16 && defined(__AVX512BW__)
#define DOTS shorts32
#define DOT4(d, w, p) ((d) + __builtin_ia32_pmaddubsw512(__builtin_astype((w), chars64), \
                                                         __builtin_astype((int16)(p), chars64)))
#define WIDEN(d) __builtin_ia32_pmaddwd512((d), (shorts32)(1))
#elif (LANES == 8 || LANES == 16) && (defined(__AVXVNNI__) || defined(AVXVNNI_ASM))
// AVX-VNNI's vpdpbusd on ymm, as MADD_Y's vpdpwssd
#if defined(__AVXVNNI__)
#define DOT4_Y(d, w, p) __builtin_ia32_vpdpbusd256((d), (w), (int8)(p))
#else
#define DOT4_Y(d, w, p) VNNI_YMM("vpdpbusd", (d), (w), (p))
#endif
#define DOTS intL
#define DOT4(d, w, p) ON_YMM(DOT4_Y, d, w, p)
#define WIDEN(d) (d)
#elif LANES == 8 && defined(__AVX2__)
#define DOTS short16
#define DOT4(d, w, p) ((d) + __builtin_ia32_pmaddubsw256(__builtin_astype((w), chars32), \
                                                         __builtin_astype((int8)(p), chars32)))
#define WIDEN(d) __builtin_ia32_pmaddwd256((d), (short16)(1))
#elif LANES == 16 && defined(__AVX2__)
#define DOTS shorts32       // two ymm
#define HALF16(v, i) __builtin_shufflevector((v), (v), 16 * (i) + 0, 16 * (i) + 1, 16 * (i) + 2, 16 * (i) + 3, \
    16 * (i) + 4, 16 * (i) + 5, 16 * (i) + 6, 16 * (i) + 7, 16 * (i) + 8, 16 * (i) + 9, 16 * (i) + 10, \
    16 * (i) + 11, 16 * (i) + 12, 16 * (i) + 13, 16 * (i) + 14, 16 * (i) + 15)
#define DOT4(d, w, p) ((d) + __builtin_shufflevector( \
    __builtin_ia32_pmaddubsw256(__builtin_astype((w).lo, chars32), __builtin_astype((int8)(p), chars32)), \
    __builtin_ia32_pmaddubsw256(__builtin_astype((w).hi, chars32), __builtin_astype((int8)(p), chars32)), \
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31))
#define WIDEN(d) ((int16)(__builtin_ia32_pmaddwd256(HALF16((d), 0), (short16)(1)), \
                          __builtin_ia32_pmaddwd256(HALF16((d), 1), (short16)(1))))
#else
#define DOTS intL
#define DOT4(d, w, p) ((d) + as_intL((w) & 0xff) * (((p) << 24) >> 24) + as_intL(((w) >> 8) & 0xff) * (((p) << 16) >> 24) \
                           + as_intL(((w) >> 16) & 0xff) * (((p) << 8) >> 24) + as_intL((w) >> 24) * ((p) >> 24))
#define WIDEN(d) (d)
#endif
#if defined(W_INT5)
#define DOT_WORDS 2
#else
#define DOT_WORDS 4
#endif
#endif
// The weight stream of a tile, `words` vectors a block from w, prefetched -DPREFETCH_COLS columns ahead (whole blocks;
// the config's work_group.decode_prefetch and prefill_prefetch: how far ahead pays depends on the CPU's memory), one
// prefetch per 64-byte line, where the compiler targets x86 (clang's builtin; a prefetch never faults, so those
// past a tile's end are harmless). The hardware prefetchers alone left the decode loop waiting on memory:
// measured from memory, 14-33% less time per matrix with it (docs/PERFORMANCE.md), and int5 gained nothing on
// q8 in Qwen2.5-Coder-0.5B's decode without it.
#if !defined(PREFETCH_COLS)
#define PREFETCH_COLS 128
#endif
#if defined(__SSE2__) && PREFETCH_COLS > 0
#define PREFETCH_AHEAD(w, words) \
    for (int i_ = 0; i_ < (words); i_ += (TILE_ROWS >= 16 ? 1 : 16 / TILE_ROWS)) \
        __builtin_prefetch((__global const char *)((w) + (words) * (PREFETCH_COLS / BLOCK) + i_))
#else
#define PREFETCH_AHEAD(w, words)
#endif
// independent accumulators per token: one chain of dependent multiply-adds would wait on each one's latency
// (bytes: a word's even columns take one, its odd ones the other)
#define CHAINS (TOKENS >= 4 ? 1 : X_PER_INT == 4 ? 2 : 4)
// pairs of weights a packed word yields, and the mask that leaves one pair in a lane's 16-bit halves (int5:
// of the words of 5-bit bytes it makes, see the header)
#if defined(W_Q8)
#define PAIRS 2
#define PAIR_MASK 0x00ff00ffu
#elif defined(W_INT5)
#define PAIRS 4
#define PAIR_MASK 0x001f001fu
#else
#define PAIRS 4
#define PAIR_MASK 0x000f000fu
#endif
// the stored values' offset, taken off through the block sum of x: q8's bytes are q + 128; symmetric int4 and
// int5 are s (q - 8) and s (q - 16); asymmetric ones add m sum(x) instead
#if defined(W_Q8)
#define Q_OFFSET 128.0f
#elif defined(W_INT5) && !defined(ASYM)
#define Q_OFFSET 16.0f
#elif !defined(ASYM)
#define Q_OFFSET 8.0f
#endif
#endif

#if !defined(W_F32) && !defined(W_Q8) && !defined(W_INT4) && !defined(W_INT5)
#error "build matrix.cl with one of -DW_F32, -DW_Q8, -DW_INT4, -DW_INT5"
#endif

#if defined(W_F32)
#define BLOCK 8                 // columns a thread takes at a time: one scale group, or 8 floats
#define XQ_BLOCK 0              // float weights take x as floats (xin), no xq
#else
#define BLOCK GROUP
#define XQ_BLOCK (BLOCK / X_PER_INT)    // ints of xq a block
#endif

// Helpers that take or return vectors are macros, not functions: a vector wider than the target's registers
// passed by value (float16 on AVX2, float8 on SSE) makes clang warn that it "changes the ABI", on every
// build. Library calls on such vectors (convert_uint16, exp(float16)) do the same, so none appear here.

// LANES fp16 bits -> floats: one F16C instruction per 16 (AVX-512) or 8 values (F16C on AVX2), else integer
// operations (those handle normal numbers; subnormal scales flush to zero). The widening is clang's
// __builtin_convertvector, which compiles inline, where convert_uintV is a library call.
#if LANES == 16 && defined(__AVX512F__)
#define HALF_BITS_TO_FLOAT(h) __builtin_ia32_vcvtph2ps512_mask(as_short16(h), (float16)(0.0f), (ushort)0xffff, 4)
#elif LANES == 16 && defined(__F16C__)
#define HALF_BITS_TO_FLOAT(h) (float16)(__builtin_ia32_vcvtph2ps256(as_short8((h).lo)), \
                                        __builtin_ia32_vcvtph2ps256(as_short8((h).hi)))
#elif LANES == 8 && defined(__F16C__)
#define HALF_BITS_TO_FLOAT(h) __builtin_ia32_vcvtph2ps256(as_short8(h))
#else
#define HALF_EXP(u) (((u) >> 10) & 0x1f)
#define HALF_BITS_TO_FLOAT(h) half_bits_from_uint(__builtin_convertvector((h), uintL))
#define half_bits_from_uint(u) as_floatL((((u) & 0x8000) << 16) | \
    ((((HALF_EXP(u) + 112) << 23) | (((u) & 0x3ff) << 13)) & as_uintL(HALF_EXP(u) != 0)))  // not select(): a call in PoCL
#endif

// the LANES scales (or mins) of group g of a tile's half h, as floats
#if defined(SCALES_F32)
#define TILE_SCALES(p, g, h) (((__global const floatL *)(p))[HALVES * (g) + (h)])
#else
#define TILE_SCALES(p, g, h) HALF_BITS_TO_FLOAT(((__global const ushortL *)(p))[HALVES * (g) + (h)])
#endif

#define SUM8(v) (((v).s0 + (v).s1) + ((v).s2 + (v).s3) + ((v).s4 + (v).s5) + ((v).s6 + (v).s7))
// v >> n, or v << -n for n < 0 (n a constant once the loops are unrolled)
#define SHIFT_RIGHT(v, n) ((n) >= 0 ? (v) >> (uint)(n) : (v) << (uint)(-(n)))

// the address space of block_dot's prepared input: X_ONCE work-groups read it where they prepared it (local memory)
#if defined(X_ONCE)
#define X_SPACE __local
#else
#define X_SPACE __private
#endif
// acc[n] += the LANES rows of tile t's half h (rows LANES h to LANES h + LANES - 1) dotted with block b of token n's
// input (n < TOKENS): xin[n][BLOCK] as floats,
// or for q8, int4 and int5 xq[n][BLOCK / X_PER_INT] its 16-bit pairs (or bytes) and their scale dx[n]; sx[n] = sum of that block of token
// n's input (as rounded). Each weight is loaded and decoded once for all tokens.
// (always_inline and the unrolled loops keep the accumulators in registers: PoCL's compiler left them on the stack)
__attribute__((always_inline)) inline void block_dot(WEIGHT_ARGS, const int t, const int b, const int h, const int cols_p,
                      X_SPACE const float *xin, X_SPACE const int *xq, X_SPACE const float *dx,
                      X_SPACE const float *sx, __private floatL *acc) {
// the block's vector i of the tile (wt, uintV), that is of half h: lanes LANES h to LANES h + LANES - 1
#define W_AT(wt, i) (((__global const uintL *)(wt))[HALVES * (i) + h])
#if defined(W_F32)
    __global const floatV *w = (__global const floatV *)w_ + (size_t)t * cols_p + BLOCK * b;
    for (int k = 0; k < BLOCK; k++) {
        const floatL wk = as_floatL(W_AT(w, k));
        for (int n = 0; n < TOKENS; n++) acc[n] += wk * xin[n * BLOCK + k];
    }
#else
    intL part[TOKENS * CHAINS];
#pragma unroll
    for (int i = 0; i < TOKENS * CHAINS; i++) part[i] = 0;
#if defined(__x86_64__)
    // xq made opaque to the compiler, so that the multiply-adds address x by xq's register and a constant
    // (`vpdpwssd 0x40(%r12){1to16}`) where it folded the block's offset in as an index register (`0x40(%rax,%r11,4)`),
    // which Intel cores split into two uops: SmolLM2's 256-token prompts 1.035-1.04x, 8-row batch steps 1.00-1.03x
    // faster (benchmarks/ab_kernels.py both ways round, the family-6 model-167 Xeon), the same sums
    __asm__("" : "+r"(xq));
#endif
#if X_PER_INT == 2
    // pair k of the block, its two weights in the halves of every lane of m, into every token's sums
#define PAIR_MADD(k, m) _Pragma("unroll") for (int n = 0; n < TOKENS; n++) \
        part[n * CHAINS + (k) % CHAINS] = MADD(part[n * CHAINS + (k) % CHAINS], (m), xq[n * (BLOCK / 2) + (k)])
    // int5 word j of 32 columns i, as its even and odd columns in bytes: pairs (k, k + 4) in a lane's halves
#define INT5_WORD(i, j, even, odd) _Pragma("unroll") for (int h = 0; h < PAIRS; h++) \
        PAIR_MADD(16 * (i) + 4 * (j) + h, ((h & 1 ? (odd) : (even)) >> (uint)(8 * (h / 2))) & PAIR_MASK)
#else
    // words of 4 weights in bytes, each word's even columns and its odd ones (see the header), into 16-bit (x86)
    // sums per token and chain, taken into the 32-bit ones every DOT_WORDS words
    DOTS dots[TOKENS * CHAINS];
#pragma unroll
    for (int i = 0; i < TOKENS * CHAINS; i++) dots[i] = 0;
    // quad k of the block (columns 8 (k / 2) + 2 i + k % 2, i < 4), its weights in the bytes of every lane of v
#define QUAD_DOT(k, v) _Pragma("unroll") for (int n = 0; n < TOKENS; n++) \
        dots[n * CHAINS + (k) % CHAINS] = DOT4(dots[n * CHAINS + (k) % CHAINS], (v), xq[n * (BLOCK / 4) + (k)])
#define WIDEN_DOTS() _Pragma("unroll") for (int i = 0; i < TOKENS * CHAINS; i++) { part[i] += WIDEN(dots[i]); dots[i] = 0; }
#define INT5_WORD(i, j, even, odd) QUAD_DOT(8 * (i) + 2 * (j), (even)); QUAD_DOT(8 * (i) + 2 * (j) + 1, (odd)); \
        if ((j) % DOT_WORDS == DOT_WORDS - 1) WIDEN_DOTS()
#endif
#if defined(W_INT5)
    // 5 words per 32 columns: 4 of nibbles, then the fifth bits (see the header)
    __global const uintV *w = (__global const uintV *)w_ + (size_t)t * (cols_p / 32 * 5) + (BLOCK / 32 * 5) * b;
    if (h == 0) PREFETCH_AHEAD(w, BLOCK / 32 * 5);
#pragma unroll
    for (int i = 0; i < BLOCK / 32; i++) {
        const uintL high = W_AT(w, 5 * i + 4);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const uintL u = W_AT(w, 5 * i + j);
            // columns 8j + 2b (even) and 8j + 2b + 1 (odd) as 5-bit values in byte b: nibbles and fifth bits
            const uintL even = (u & 0x0f0f0f0fu) | (SHIFT_RIGHT(high, 2 * j - 4) & 0x10101010u);
            const uintL odd = ((u >> 4) & 0x0f0f0f0fu) | (SHIFT_RIGHT(high, 2 * j - 3) & 0x10101010u);
            INT5_WORD(i, j, even, odd);
        }
    }
#elif X_PER_INT == 2
    // a packed word holds PAIRS pairs of the block (q8: 2 of bytes, int4: 4 of nibbles; see the header)
    __global const uintV *w = (__global const uintV *)w_ + (size_t)t * (cols_p / (2 * PAIRS)) + (BLOCK / (2 * PAIRS)) * b;
    if (h == 0) PREFETCH_AHEAD(w, BLOCK / (2 * PAIRS));
#pragma unroll
    for (int j = 0; j < BLOCK / (2 * PAIRS); j++) {
        const uintL u = W_AT(w, j);
#pragma unroll
        for (int h = 0; h < PAIRS; h++)
            PAIR_MADD(PAIRS * j + h, (u >> (uint)(16 / PAIRS * h)) & PAIR_MASK);
    }
#else
    __global const uintV *w = (__global const uintV *)w_ + (size_t)t * (cols_p / 8) + (BLOCK / 8) * b;
    if (h == 0) PREFETCH_AHEAD(w, BLOCK / 8);
#pragma unroll
    for (int j = 0; j < BLOCK / 8; j++) {
        const uintL u = W_AT(w, j);
        QUAD_DOT(2 * j, u & 0x0f0f0f0fu);
        QUAD_DOT(2 * j + 1, (u >> 4) & 0x0f0f0f0fu);
        if (j % DOT_WORDS == DOT_WORDS - 1 || j == BLOCK / 8 - 1) WIDEN_DOTS();
    }
#endif
#undef PAIR_MADD
#undef QUAD_DOT
#undef WIDEN_DOTS
#undef INT5_WORD
    const size_t g = (size_t)t * (cols_p / GROUP) + b;
    const floatL s = TILE_SCALES(s_, g, h);
#if defined(ASYM)
    const floatL m = TILE_SCALES(m_, g, h);
#endif
    // unrolled, so that the accumulators stay in registers; each token's update in 4 vector operations (a
    // conversion, a multiply and two multiply-adds, -cl-mad-enable's FMAs), which at 8 tokens take a fifth of a
    // block's time beside its 128 VNNI multiply-adds (the min's term into acc first: acc += s * qx + m * sx left
    // an add more)
#pragma unroll
    for (int n = 0; n < TOKENS; n++) {
        intL q = part[n * CHAINS];
#pragma unroll
        for (int c = 1; c < CHAINS; c++) q += part[n * CHAINS + c];
        const floatL qx = __builtin_convertvector(q, floatL) * dx[n];     // sum_k q_k x_k (inline, unlike convert_floatV)
#if defined(Q_OFFSET) && defined(ASYM)
        acc[n] = s * (qx - Q_OFFSET * sx[n]) + (m * sx[n] + acc[n]);
#elif defined(Q_OFFSET)
        acc[n] = s * (qx - Q_OFFSET * sx[n]) + acc[n];
#else
        acc[n] = s * qx + (m * sx[n] + acc[n]);
#endif
    }
#endif
#undef W_AT
}

// Block b of one input row (xr, BLOCK floats; zeros unless `live`) as the kernels take it: xin = the block, times
// g's (gb) when `norm`; for quantized weights xq = its 16-bit pairs (or bytes), dx = their scale, sx = the sum
// of the block as rounded. Returns the block's sum of squares (RMSNorm's).
inline float prepare_block(__global const float8 *xr, __global const float8 *gb, const int live, const int norm,
                           __private float *xin, __private int *xq, __private float *dx, __private float *sx) {
    float8 sq = 0.0f;                 // 8 lanes at a time: this is per-row-group scalar work otherwise
    for (int c = 0; c < BLOCK / 8; c++) {
        const float8 v = live ? xr[c] : (float8)(0.0f);
        sq += v * v;
        *(__private float8 *)(xin + 8 * c) = norm ? v * gb[c] : v;
    }
#if !defined(W_F32)
    // max |x| and rounding with plain arithmetic: fabs, fmax and convert_*_rte are calls in PoCL
    uint8 amax = 0;
    for (int c = 0; c < BLOCK / 8; c++) {
        const uint8 a = as_uint8(*(__private float8 *)(xin + 8 * c)) & 0x7fffffffu;
        amax = a > amax ? a : amax;         // non-negative floats order as their bits do
    }
    amax.lo = amax.lo > amax.hi ? amax.lo : amax.hi;
    amax.lo.lo = amax.lo.lo > amax.lo.hi ? amax.lo.lo : amax.lo.hi;
    const float top = as_float(max(amax.s0, amax.s1));
    *dx = top / X_MAX;
    const float inv = top > 0.0f ? X_MAX / top : 0.0f;
    int8 vsum = 0;
    for (int c = 0; c < BLOCK / 8; c++) {
        // + 1.5 * 2^23 leaves round-to-nearest(v) in the low mantissa bits, for |v| < 2^22
        const int8 v = as_int8(*(__private float8 *)(xin + 8 * c) * inv + 12582912.0f) - 0x4b400000;
#if X_PER_INT == 2
        *(__private int4 *)(xq + 4 * c) = (v.lo & 0xffff) | (v.hi << 16);
#else
        const int8 sb = (v & 0xff) << (int8)(0, 0, 8, 8, 16, 16, 24, 24);    // columns 2i and 2i + 1 to byte i
        *(__private int2 *)(xq + 2 * c) = (int2)(sb.s0 | sb.s2 | sb.s4 | sb.s6, sb.s1 | sb.s3 | sb.s5 | sb.s7);
#endif
        vsum += v;
    }
    // the block sum that the offsets and mins need: of the rounded block, so that the kernel
    // computes W times the rounded x exactly
    vsum.lo += vsum.hi;
    vsum.lo.lo += vsum.lo.hi;
    *sx = (float)(vsum.s0 + vsum.s1) * *dx;
#endif
    return SUM8(sq);
}

// CPUs (-DX_ONCE: work-groups of one work-item): a work-group prepares its TOKENS input rows once, into `row`
// (local memory), and then takes its share of the matrix's tiles (FOR_TILES), so that a few work-groups per core
// split a launch evenly. Preparing a block of x for every TILES tiles, as GPUs do, had each of a decode launch's
// work-groups redo it: a third of gemv_add's time on AVX2 (perf annotate). The rows' xq ints come first, block b's
// at row + b * TOKENS * XQ_BLOCK (XQ_BLOCK each, tile_rows' layout); then, as floats, per block b at
// ROW_F(row, cols_p) + b * ROW_F_BLOCK their dx and then their sx (float weights: the rows' xin), and after the
// blocks the rows' sums of squares. At most TOKENS * (cols_p + 1) ints (BLOCK >= 8).
#if defined(X_ONCE)
#if defined(W_F32)
#define ROW_F_BLOCK (TOKENS * BLOCK)
#else
#define ROW_F_BLOCK (2 * TOKENS)
#endif
#define ROW_Q(row, b) ((row) + (b) * TOKENS * XQ_BLOCK)      // block b's xq ints
#define ROW_F(row, cols_p) ((__local float *)ROW_Q(row, (cols_p) / BLOCK))
#define ROW_SS(cols_p) ((cols_p) / BLOCK * ROW_F_BLOCK)
inline void prepare_rows(__global const float *x, const int x_stride, const int live_rows, __global const float *g,
                         const int norm, const int cols_p, __local int *row) {
    __local float *row_f = ROW_F(row, cols_p);
    float ss[TOKENS];
    for (int n = 0; n < TOKENS; n++) ss[n] = 0.0f;
    for (int b = 0; b < cols_p / BLOCK; b++) {
        __local int *q = ROW_Q(row, b);
        __local float *f = row_f + b * ROW_F_BLOCK;
        for (int n = 0; n < TOKENS; n++) {
            float8 xin8[BLOCK / 8];
            __private float *xin = (__private float *)xin8;
            int4 xq4[XQ_BLOCK / 4 + 1];       // (float weights take no xq)
            __private int *xq = (__private int *)xq4;
            float dx, sx;
            ss[n] += prepare_block((__global const float8 *)(x + (size_t)n * x_stride + BLOCK * b),
                                   (__global const float8 *)(g + BLOCK * b), n < live_rows, norm, xin, xq, &dx, &sx);
#if defined(W_F32)
            for (int i = 0; i < BLOCK; i++) f[n * BLOCK + i] = xin[i];
#else
            for (int i = 0; i < XQ_BLOCK; i++) q[n * XQ_BLOCK + i] = xq[i];
            f[n] = dx;
            f[TOKENS + n] = sx;
#endif
        }
    }
    for (int n = 0; n < TOKENS; n++) row_f[ROW_SS(cols_p) + n] = ss[n];
}
// the rows of x this work-group's input is (from get_group_id(1) * TOKENS; those < T are live), prepared (in a
// kernel taking GEMV_ARGS and GEMV_SCRATCH, whose T, x_stride, cols_p and row it uses)
#define PREPARE_ROW(x, g, norm) prepare_rows((x) + (size_t)get_group_id(1) * TOKENS * x_stride, x_stride, \
                                             T - (int)get_group_id(1) * TOKENS, (g), (norm), cols_p, row)
#else
#define PREPARE_ROW(x, g, norm)
#endif

// The shared body: for the `tiles` (<= TILES) tiles from t0 (a run of the work-group's: FOR_TILES)
// and the TOKENS input rows from tok0 = get_group_id(1) * TOKENS (those < T; x's rows are x_stride
// apart), acc[tt * TOKENS + n] = tile t0 + tt times row tok0 + n of x, or of x * g / rms(x) when
// `norm` (RMSNorm fused into the projection after it). Preparing a block of x is scalar work, so a
// work-group shares it among TILES * TILE_ROWS rows (X_ONCE: takes it from `row`, prepared once for all its
// runs). The get_local_size(0) work-items of a group split the columns (GPUs; 1 on CPUs). The result is valid
// in work-item 0. X_ONCE: the `ahead` lines of 64 bytes from `fetch` are prefetched into L2 on the way, a few per
// block (the layer launch's keys and values for the next layer's attention, matrix_phase; 0 for none).
inline void tile_rows(WEIGHT_ARGS, __global const float *x, __global const float *g, const int norm,
                      const int t0, const int tiles, const int cols, const int cols_p, const int T,
                      const int x_stride, const float eps, __local floatV *scratch, __local float *scratch_ss,
                      __local const int *row, __private floatV *acc, __global const char *fetch, const int ahead) {
    float ss[TOKENS];
#if defined(X_ONCE)
    // tile by tile, each one's TOKENS sums in registers over the blocks, the input read where it was prepared
    __local const float *row_f = ROW_F(row, cols_p);
    for (int n = 0; n < TOKENS; n++) ss[n] = row_f[ROW_SS(cols_p) + n];
    // the lines to fetch numbered on over the tiles' halves' blocks, from values that do not change in the loop: with
    // a counter carried through it, prompts (which fetch nothing) ran ~1.5% slower, with these ~1% (noise)
    const int blocks = cols_p / BLOCK, per_block = (ahead + tiles * HALVES * blocks - 1) / (tiles * HALVES * blocks);
    for (int tt = 0; tt < tiles; tt++)
        for (int h = 0; h < HALVES; h++) {      // the tile's halves one after the other (LANES)
            floatL a[TOKENS];       // in registers: every loop over it unrolled
#pragma unroll
            for (int n = 0; n < TOKENS; n++) a[n] = 0.0f;
            const int first = (tt * HALVES + h) * blocks * per_block;
            for (int b = 0; b < blocks; b++) {
#if defined(__SSE2__)
                for (int i = first + b * per_block; i < min(first + (b + 1) * per_block, ahead); i++)
                    __builtin_prefetch(fetch + 64 * (size_t)i, 0, 2);  // prefetcht1: into L2, not the L1 the loop uses
#endif
                __local const float *f = row_f + b * ROW_F_BLOCK;
                block_dot(w_, s_, m_, t0 + tt, b, h, cols_p, f, ROW_Q(row, b), f, f + TOKENS, a);
            }
#pragma unroll
            for (int n = 0; n < TOKENS; n++) ((__private floatL *)&acc[tt * TOKENS + n])[h] = a[n];
        }
#else
    const int lid = get_local_id(0), L = get_local_size(0);
    const int tok0 = get_group_id(1) * TOKENS;
    float sx[TOKENS], dx[TOKENS];
    float8 xin8[TOKENS * BLOCK / 8];        // float8-aligned storage for the prepared blocks
    __private float *xin = (__private float *)xin8;
#if !defined(W_F32)
    int4 xq4[(TOKENS * BLOCK / X_PER_INT + 3) / 4];    // the blocks as 16-bit pairs or bytes (quantized weights)
    __private int *xq = (__private int *)xq4;
#else
    __private int *xq = 0;      // float weights take xin
#endif
    for (int n = 0; n < TOKENS; n++) ss[n] = 0.0f;
    for (int i = 0; i < TILES * TOKENS; i++) acc[i] = 0.0f;
    for (int b = lid; b < cols_p / BLOCK; b += L) {
        for (int n = 0; n < TOKENS; n++)    // this block of every token's input, prepared once for all rows
            ss[n] += prepare_block((__global const float8 *)(x + (size_t)(tok0 + n) * x_stride + BLOCK * b),
                                   (__global const float8 *)(g + BLOCK * b), tok0 + n < T, norm,
                                   xin + n * BLOCK, xq + n * XQ_BLOCK, dx + n, sx + n);
        // in decode a constant trip count, so that unrolled the accumulators can live in registers (in
        // prefill TILES x TOKENS accumulators could not, and unrolling them all swamps the compiler)
#if TOKENS == 1
#pragma unroll
#endif
        for (int tt = 0; tt < TILES; tt++)
            if (tt < tiles) block_dot(w_, s_, m_, t0 + tt, b, 0, cols_p, xin, xq, dx, sx, acc + tt * TOKENS);
    }
#endif
#if !defined(SOLO) && !defined(X_ONCE)
    if (L > 1) {
        for (int i = 0; i < TILES * TOKENS; i++) scratch[i * L + lid] = acc[i];
        for (int n = 0; n < TOKENS; n++) scratch_ss[n * L + lid] = ss[n];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int h = L / 2; h > 0; h >>= 1) {
            if (lid < h) {
                for (int i = 0; i < TILES * TOKENS; i++) scratch[i * L + lid] += scratch[i * L + lid + h];
                for (int n = 0; n < TOKENS; n++) scratch_ss[n * L + lid] += scratch_ss[n * L + lid + h];
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        for (int i = 0; i < TILES * TOKENS; i++) acc[i] = scratch[i * L];
        for (int n = 0; n < TOKENS; n++) ss[n] = scratch_ss[n * L];
    }
#endif
    if (norm)
        for (int i = 0; i < tiles * TOKENS; i++) acc[i] *= rsqrt(ss[i % TOKENS] / cols + eps);
}

// y[tok0 + n][row] (=, or += when `add`) the work-group's values, n < TOKENS, tok0 + n < T
inline void store_rows(__global float *y, __private const floatV *acc, const int t0, const int tiles, const int rows,
                       const int tok0, const int T, const int y_stride, const int add) {
    if (get_local_id(0) != 0) return;
    for (int tt = 0; tt < tiles; tt++)
        for (int n = 0; n < TOKENS && tok0 + n < T; n++) {
            __global float *yr = y + (size_t)(tok0 + n) * y_stride;
            const int first = (t0 + tt) * TILE_ROWS;
            if (first + TILE_ROWS <= rows && y_stride % TILE_ROWS == 0) {    // a whole tile, aligned: a vector
                __global floatV *yv = (__global floatV *)(yr + first);
                *yv = add ? *yv + acc[tt * TOKENS + n] : acc[tt * TOKENS + n];
                continue;
            }
            for (int i = 0; i < TILE_ROWS && first + i < rows; i++) {
                const float v = ((const float *)&acc[tt * TOKENS + n])[i];
                yr[first + i] = add ? yr[first + i] + v : v;
            }
        }
}

// Every kernel works on T input vectors (rows of x, x_stride apart), writing rows of y y_stride apart:
// T = 1 in a decode step, a chunk of the prompt in prefill.
// Global size (ceil(tiles / TILES) * L, ceil(T / TOKENS)), local (L, 1).
#define GEMV_ARGS const int rows, const int cols, const int cols_p, const int T, const int x_stride, \
                  const int y_stride
#define GEMV_SCRATCH __local floatV *scratch, __local float *scratch_ss, __local int *row
// The work-group's tiles of a matrix of `rows` rows, up to TILES at a time: the first of them (t0) and how many.
// On CPUs (X_ONCE) work-group i of n takes the i-th n-th of the tiles, else the TILES from TILES times its index
// (the matrix's last group may have fewer).
#define ROW_TILES(rows) (((rows) + TILE_ROWS - 1) / TILE_ROWS)
#if defined(X_ONCE)
#define FOR_TILES(rows, t0, tiles) \
    for (int t0 = get_group_id(0) * ROW_TILES(rows) / get_num_groups(0), \
             end_ = (get_group_id(0) + 1) * ROW_TILES(rows) / get_num_groups(0), tiles = min(TILES, end_ - t0); \
         t0 < end_; t0 += TILES, tiles = min(TILES, end_ - t0))
#else
#define FOR_TILES(rows, t0, tiles) \
    for (int t0 = get_group_id(0) * TILES, tiles = min(TILES, ROW_TILES(rows) - t0), once_ = 1; once_; once_ = 0)
#endif

// y += W x: a projection that feeds the residual stream adds itself in
__kernel void gemv_add(WEIGHT_ARGS, __global const float *x, __global float *y, GEMV_ARGS, GEMV_SCRATCH) {
    PREPARE_ROW(x, x, 0);
    FOR_TILES(rows, t0, tiles) {
        floatV acc[TILES * TOKENS];
        tile_rows(w_, s_, m_, x, x, 0, t0, tiles, cols, cols_p, T, x_stride, 0.0f, scratch, scratch_ss, row, acc,
                  0, 0);
        store_rows(y, acc, t0, tiles, rows, get_group_id(1) * TOKENS, T, y_stride, 1);
    }
}

// y = W rmsnorm(x, g): RMSNorm fused into the projection after it (QKV, LM head)
__kernel void gemv_norm(WEIGHT_ARGS, __global const float *x, __global const float *g, __global float *y,
                        GEMV_ARGS, const float eps, GEMV_SCRATCH) {
    PREPARE_ROW(x, g, 1);
    FOR_TILES(rows, t0, tiles) {
        floatV acc[TILES * TOKENS];
        tile_rows(w_, s_, m_, x, g, 1, t0, tiles, cols, cols_p, T, x_stride, eps, scratch, scratch_ss, row, acc,
                  0, 0);
        store_rows(y, acc, t0, tiles, rows, get_group_id(1) * TOKENS, T, y_stride, 0);
    }
}

// y = silu(gate) * up with [gate; up] = W rmsnorm(x, g): RMSNorm, both FFN projections and SwiGLU in
// one launch. Each tile holds TILE_ROWS/2 gate rows, then the TILE_ROWS/2 up rows of the same outputs; rows counts
// both, so there are rows / 2 outputs. SiLU takes a tile's gates as one vector (the halves of its accumulator):
// lane by lane, the inlined scalar exp and the division's latency took a quarter of the launch.
#if TILE_ROWS == 16
#define floatHalfV float8
#elif TILE_ROWS == 8
#define floatHalfV float4
#elif TILE_ROWS == 4
#define floatHalfV float2
#else
#define floatHalfV float
#endif
#if TILE_ROWS == 16 && !defined(__AVX__) && (defined(__SSE2__) || defined(__ARM_NEON))
#define EXP_HALF(v) (float8)(exp((v).lo), exp((v).hi))    // a float8 argument "changes the ABI" without AVX
#else
#define EXP_HALF(v) exp(v)
#endif
// silu(gate) * up of `tiles` tiles from t0 (work-item 0's acc) into y's rows from tok0
inline void store_swiglu(__private const floatV *acc, const int t0, const int tiles, const int rows, const int tok0,
                         const int T, __global float *y, const int y_stride) {
    for (int tt = 0; tt < tiles; tt++) {
        const int first = (t0 + tt) * (TILE_ROWS / 2);
        for (int n = 0; n < TOKENS && tok0 + n < T; n++) {
            const floatHalfV gate = acc[tt * TOKENS + n].lo, up = acc[tt * TOKENS + n].hi;
            const floatHalfV out = gate / (1.0f + EXP_HALF(-gate)) * up;
            if (first + TILE_ROWS / 2 <= rows / 2 && y_stride % (TILE_ROWS / 2) == 0)     // aligned: a vector
                *(__global floatHalfV *)(y + (size_t)(tok0 + n) * y_stride + first) = out;
            else
                for (int i = 0; i < TILE_ROWS / 2 && first + i < rows / 2; i++)
                    y[(size_t)(tok0 + n) * y_stride + first + i] = ((const float *)&out)[i];
        }
    }
}

__kernel void gemv_norm_swiglu(WEIGHT_ARGS, __global const float *x, __global const float *g, __global float *y,
                               GEMV_ARGS, const float eps, GEMV_SCRATCH) {
    PREPARE_ROW(x, g, 1);
    FOR_TILES(rows, t0, tiles) {
        floatV acc[TILES * TOKENS];
        tile_rows(w_, s_, m_, x, g, 1, t0, tiles, cols, cols_p, T, x_stride, eps, scratch, scratch_ss, row, acc,
                  0, 0);
        if (get_local_id(0) == 0)
            store_swiglu(acc, t0, tiles, rows, get_group_id(1) * TOKENS, T, y, y_stride);
    }
}

// [q; k; v] = [Wq; Wk; Wv] rmsnorm(x, g) (+ [bq; bk; bv] when built with -DQKV_BIAS: qwen2's biases, added
// before RoPE; llama's build neither reads nor adds them), then RoPE on q and k at each row's position
// (attention.h's ROW_POS: pos + n in a sequence's pass, the table's in a batch): adjacent pairs (x[2i], x[2i+1])
// of every head turned by pair i's angle, llama2.c's and llama.cpp's rotation; rope holds (cos, sin) of the angles [seq][head_dim / 2], made on the host with any frequency
// scaling. NEOX RoPE's pairs (x[i], x[i + head_dim/2]) become adjacent by the host's order of the Q and K rows,
// so this one rotation serves both). q goes to y; k and v go straight into this layer's KV cache (layout in
// attention.h): QKV, RoPE and the cache append in one launch. TILE_ROWS is even and tiles start at multiples
// of TILE_ROWS, so a pair never straddles two tiles.
#define QKV_ARGS __global const float *bias, __global kv_t *k_cache, __global kv_t *v_cache, \
                 __global const int *state, __global const float *rope, const int q_dim, const int kv_dim, \
                 const int head_dim, const int seq_p, const int cache_offset, const int slot_stride
#define QKV_VALUES bias, k_cache, v_cache, state, rope, q_dim, kv_dim, head_dim, seq_p, cache_offset, slot_stride

// RoPE in vector form: lanes 2i and 2i + 1 of a tile swapped (PAIR_SWAP), so that out = v * c + PAIR_SWAP(v) * s
// with c = (cos_i, cos_i) and s = (-sin_i, sin_i) per pair turns every pair at once. The table holds a position's
// (cos_i, sin_i) side by side, so c is the even lanes of a tile of it doubled (EVENS) and s its odd ones (ODDS) times
// PAIR_SIGNS. (clang's builtin, inline, where OpenCL's shuffle is a library call in PoCL.)
#if TILE_ROWS == 16
#define PAIR_SWAP(v) __builtin_shufflevector((v), (v), 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#define EVENS(v) __builtin_shufflevector((v), (v), 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14)
#define ODDS(v) __builtin_shufflevector((v), (v), 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15)
#define PAIR_SIGNS (float16)(-1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f, \
                             -1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f)
#elif TILE_ROWS == 8
#define PAIR_SWAP(v) __builtin_shufflevector((v), (v), 1, 0, 3, 2, 5, 4, 7, 6)
#define EVENS(v) __builtin_shufflevector((v), (v), 0, 0, 2, 2, 4, 4, 6, 6)
#define ODDS(v) __builtin_shufflevector((v), (v), 1, 1, 3, 3, 5, 5, 7, 7)
#define PAIR_SIGNS (float8)(-1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f)
#elif TILE_ROWS == 4
#define PAIR_SWAP(v) __builtin_shufflevector((v), (v), 1, 0, 3, 2)
#define EVENS(v) __builtin_shufflevector((v), (v), 0, 0, 2, 2)
#define ODDS(v) __builtin_shufflevector((v), (v), 1, 1, 3, 3)
#define PAIR_SIGNS (float4)(-1.0f, 1.0f, -1.0f, 1.0f)
#else
#define PAIR_SWAP(v) __builtin_shufflevector((v), (v), 1, 0)
#define EVENS(v) __builtin_shufflevector((v), (v), 0, 0)
#define ODDS(v) __builtin_shufflevector((v), (v), 1, 1)
#define PAIR_SIGNS (float2)(-1.0f, 1.0f)
#endif
// A tile of floats as the bits of fp16 values rounded to nearest even (vstore_half_rte's rounding), in one or two
// conversion instructions where the compiler targets AVX-512 or F16C; elsewhere store_qkv converts each value with
// vstore_half_rte, which PoCL compiles to ~30 integer operations a value (with the scalar rotation before, 13-16%
// of a prompt pass's QKV launch).
#if !defined(KV_F32) && TILE_ROWS == 16 && defined(__AVX512F__)
#define HALF_BITS(v) as_ushort16(__builtin_ia32_vcvtps2ph512_mask((v), 0, (short16)(0), (ushort)0xffff))
#elif !defined(KV_F32) && TILE_ROWS == 16 && defined(__F16C__)
#define HALF_BITS(v) (ushort16)(as_ushort8(__builtin_ia32_vcvtps2ph256((v).lo, 0)), \
                                as_ushort8(__builtin_ia32_vcvtps2ph256((v).hi, 0)))
#elif !defined(KV_F32) && TILE_ROWS == 8 && defined(__F16C__)
#define HALF_BITS(v) as_ushort8(__builtin_ia32_vcvtps2ph256((v), 0))
#endif

// Built with QK_NORM (qwen3), each head of q and k is RMS-normalized before RoPE. A head's square sum needs all its
// rows, which the QKV tasks share out by tiles, so store_qkv leaves q and k in y unturned (y's rows then hold
// q_dim + kv_dim) and norm_rope_head turns them, a head at a time, after the QKV launch or phase.
#if defined(QK_NORM)
#define Y_ROWS (q_dim + kv_dim)     // rows store_qkv puts in y
#define TURN 0                      // whether store_qkv turns q and k
#else
#define Y_ROWS q_dim
#define TURN 1
#endif

// Rotate and store the rows of `tiles` tiles from t0 (work-item 0's acc) as q, k or v: a tile of a token at a time,
// its rotation and its conversion to the cache's fp16 in vector form, its stores a lane at a time. Where head_dim is
// a multiple of TILE_ROWS, a whole tile lies in one head of q or k (a vector of the table turns it) or in v; else
// (small test models) a tile may hold rows of q, k and v and of several heads, and c and s are made lane by lane.
inline void store_qkv(__private const floatV *acc, const int t0, const int tiles, const int rows, const int tok0,
                      const int T, __global float *y, const int y_stride, QKV_ARGS) {
    for (int tt = 0; tt < tiles; tt++) {
        const int first = (t0 + tt) * TILE_ROWS;
        for (int n = 0; n < TOKENS && tok0 + n < T; n++) {
            const int pos = ROW_POS(state, tok0 + n, slot_stride);
            if (pos < 0) continue;      // a batch's padding row (attention.h): no place in the cache
            const size_t layer = ROW_CACHE(state, tok0 + n, slot_stride, cache_offset);
            const int whole = head_dim % TILE_ROWS == 0 && first + TILE_ROWS <= rows;
            floatV v = acc[tt * TOKENS + n], c = 1.0f, s = 0.0f;     // v's rows keep c = 1, s = 0: no turn
#if defined(QKV_BIAS)
            if (whole)
                v += *(__global const floatV *)(bias + first);
            else
                for (int i = 0; i < TILE_ROWS && first + i < rows; i++) ((float *)&v)[i] += bias[first + i];
#endif
            if (TURN && whole && first < q_dim + kv_dim) {   // q or k: the pairs' angles at this position
                const floatV cs = *(__global const floatV *)(rope + (size_t)pos * head_dim +
                                                              (first < q_dim ? first : first - q_dim) % head_dim);
                c = EVENS(cs);
                s = ODDS(cs) * PAIR_SIGNS;
            } else if (TURN && !whole) {
                for (int i = 0; i < TILE_ROWS && first + i < rows; i += 2) {
                    const int r = first + i;
                    if (r < q_dim + kv_dim) {                   // q or k: pair i / 2's angle at this position
                        __global const float *cs = rope + (size_t)pos * head_dim + (r < q_dim ? r : r - q_dim) % head_dim;
                        ((float *)&c)[i] = ((float *)&c)[i + 1] = cs[0];
                        ((float *)&s)[i] = -cs[1];
                        ((float *)&s)[i + 1] = cs[1];
                    }
                }
            }
            const floatV out = v * c + PAIR_SWAP(v) * s;
#if defined(HALF_BITS)
            const ushortV bits = HALF_BITS(out);
#endif
            for (int i = 0; i < TILE_ROWS && first + i < rows; i++) {
                const int r = first + i;
                const float o = ((const float *)&out)[i];
                __global kv_t *to;
                if (r < Y_ROWS) {
                    y[(size_t)(tok0 + n) * y_stride + r] = o;
                    continue;
                } else if (r < q_dim + kv_dim) {
                    to = KEY_AT(k_cache, layer, kv_dim, seq_p, r - q_dim, pos);
                } else {
                    to = VALUE_AT(v_cache, layer, kv_dim, r - q_dim - kv_dim, pos);
                }
#if defined(HALF_BITS)
                *(__global ushort *)to = ((const ushort *)&bits)[i];
#else
                KV_STORE(o, 0, to);
#endif
            }
        }
    }
}

#if defined(QK_NORM)
// x = TILE_ROWS floats from p: at once where `whole` (p then aligned for it), else lane by lane, the lanes from `left`
// on 0 (through a pointer: a float16 return value "changes the ABI" without AVX-512, a warning on every build)
inline void load_lanes(floatV *x, __global const float *p, const int left, const int whole) {
    if (whole) {
        *x = *(__global const floatV *)p;
        return;
    }
    *x = 0.0f;
    for (int l = 0; l < TILE_ROWS && l < left; l++) ((float *)x)[l] = p[l];
}

// Head `head` of row n's q (head < n_heads) or k (the rest), left in y by store_qkv: RMS-normalized by norms (q's
// [head_dim], then k's, in the rows' device order, as Wq's and Wk's rows), then turned by RoPE as store_qkv turns
// a tile; q stays in y, k goes to the KV cache. A tile of lanes at a time, in vector form where heads are whole tiles
// (the rows of y, the table's and the norms' then start at multiples of a tile); a pair never straddles two tiles.
inline void norm_rope_head(const int head, const int n, __global float *y, const int y_stride,
                           __global const float *norms, const float eps, QKV_ARGS) {
    const int pos = ROW_POS(state, n, slot_stride), first = head * head_dim, is_k = first >= q_dim;
    const int whole = head_dim % TILE_ROWS == 0;
    if (pos < 0) return;        // a batch's padding row
    __global float *v = y + (size_t)n * y_stride + first;
    __global const float *w = norms + (is_k ? head_dim : 0), *cs = rope + (size_t)pos * head_dim;
    floatV squares = 0.0f, x, wi, t;
    for (int i = 0; i < head_dim; i += TILE_ROWS) {
        load_lanes(&x, v + i, head_dim - i, whole);
        squares += x * x;
    }
    float ss = 0.0f;
    for (int l = 0; l < TILE_ROWS; l++) ss += ((float *)&squares)[l];
    const float scale = 1.0f / sqrt(ss / head_dim + eps);
    const size_t layer = ROW_CACHE(state, n, slot_stride, cache_offset);
    for (int i = 0; i < head_dim; i += TILE_ROWS) {
        load_lanes(&x, v + i, head_dim - i, whole);
        load_lanes(&wi, w + i, head_dim - i, whole);
        load_lanes(&t, cs + i, head_dim - i, whole);
        const floatV a = x * scale * wi, out = a * EVENS(t) + PAIR_SWAP(a) * (ODDS(t) * PAIR_SIGNS);
#if defined(HALF_BITS)
        const ushortV bits = HALF_BITS(out);
#endif
        if (!is_k && whole) {
            *(__global floatV *)(v + i) = out;
            continue;
        }
        for (int l = 0; l < TILE_ROWS && i + l < head_dim; l++) {
            const float o = ((const float *)&out)[l];
            if (!is_k) {
                v[i + l] = o;
                continue;
            }
            __global kv_t *to = KEY_AT(k_cache, layer, kv_dim, seq_p, first - q_dim + i + l, pos);
#if defined(HALF_BITS)
            *(__global ushort *)to = ((const ushort *)&bits)[l];
#else
            KV_STORE(o, 0, to);
#endif
        }
    }
}

// global (n_heads + n_kv_heads, T): after gemv_norm_rope_kv, each head of each row's q and k (norm_rope_head)
__kernel void norm_rope_heads(__global float *y, const int y_stride, __global const float *norms, const float eps,
                              QKV_ARGS) {
    norm_rope_head(get_global_id(0), get_global_id(1), y, y_stride, norms, eps, QKV_VALUES);
}
#endif

__kernel void gemv_norm_rope_kv(WEIGHT_ARGS, __global const float *x, __global const float *g, __global float *y,
                                GEMV_ARGS, const float eps, QKV_ARGS, GEMV_SCRATCH) {
    PREPARE_ROW(x, g, 1);
    FOR_TILES(rows, t0, tiles) {
        floatV acc[TILES * TOKENS];
        tile_rows(w_, s_, m_, x, g, 1, t0, tiles, cols, cols_p, T, x_stride, eps, scratch, scratch_ss, row, acc,
                  0, 0);
        if (get_local_id(0) == 0)
            store_qkv(acc, t0, tiles, rows, get_group_id(1) * TOKENS, T, y, y_stride, bias, k_cache, v_cache, state,
                      rope, q_dim, kv_dim, head_dim, seq_p, cache_offset, slot_stride);
    }
}

#if defined(ATTENTION_POSITIONS) && defined(SOLO)
// One decode step's QKV and attention in one launch (TOKENS = 1; built with ATTENTION_POSITIONS and HD_VEC, GQA = query
// heads per KV head, head_dim a multiple of TILE_ROWS): work-group j takes KV head j's rows of the stacked
// [Wq; Wk; Wv], its GQA query heads' q, its k and its v (three runs of tiles, TILES at a time), stores
// them as gemv_norm_rope_kv does, then attends for those query heads (attention.h's attend_heads, as the attention
// kernel's CPU build does: the same float operations for a row either way). It saves a
// launch per layer, which dominates small models' steps; with fewer KV heads than cores it would idle
// some. Work-groups of one work-item only (CPU configs): where several share a tile's columns (GPUs),
// barriers would sit between the parts, and PoCL's compiler ran for minutes on that build, so it could
// not be tested here.
__kernel void qkv_attention(WEIGHT_ARGS, __global const float *x, __global const float *g, __global float *y,
                            GEMV_ARGS, const float eps, QKV_ARGS, __global float *att, __global float *att_out,
                            const int n_heads, const int out_stride, GEMV_SCRATCH, __local float *att_scratch) {
    const int j = get_group_id(0), ht = head_dim / TILE_ROWS;
    PREPARE_ROW(x, g, 1);
    for (int part = 0; part < 3; part++) {      // q of the GQA heads, k, v
        const int first = part == 0 ? j * GQA * ht : (q_dim + (part - 1) * kv_dim) / TILE_ROWS + j * ht;
        const int end = first + (part == 0 ? GQA * ht : ht);
        for (int t0 = first; t0 < end; t0 += TILES) {
            floatV acc[TILES];
            tile_rows(w_, s_, m_, x, g, 1, t0, min(TILES, end - t0), cols, cols_p, T, x_stride, eps, scratch,
                      scratch_ss, row, acc, 0, 0);
            store_qkv(acc, t0, min(TILES, end - t0), rows, 0, T, y, y_stride, bias, k_cache, v_cache, state, rope,
                      q_dim, kv_dim, head_dim, seq_p, cache_offset, slot_stride);
        }
    }
    attend_heads(j, 0, y, k_cache, v_cache, att, att_out, state, n_heads, kv_dim / head_dim, head_dim,
                 seq_p, y_stride, out_stride, cache_offset, slot_stride);
}
#endif

#if defined(LAYER) && defined(X_ONCE) && defined(GQA)
// Layers of a pass in one launch, where the other kernels take five a layer (four with qkv_attention): a launch's
// start and end cost a 2-core CPU's OpenCL driver ~10-20 us of idle cores each (the next command is made ready, a
// sleeping worker thread wakes), as much as a decode step's smaller launches compute. Built with a matrix program's
// defines and attention's (GQA: work-groups of one work-item, CPUs); launched as a work-group per core. A layer's
// phases run in order: QKV (with RoPE and the KV cache's append), attention, Wo, SwiGLU, W2, the first `phases` of
// them (2 to 5: up to the first matrix whose format differs from Wqkv's; the rest run as their own kernels, and the
// launch then takes one layer). A phase is a list of tasks (a group of TOKENS rows and a share of a matrix's tiles;
// attention's KV heads and rows), which the work-groups claim one at a time (atomic_inc on `counters`; attention's
// from a queue per work-group first where the keys and values were fetched ahead, below), and a work-group goes
// on to the next phase, or the next layer's first, once every task of this one is done.
// It waits only for tasks that another work-group has claimed, so it never waits on one that has not started: where
// the driver runs the work-groups one after the other on one thread (PoCL does when its other thread is busy), the
// first does every task and the others find none left. Each task computes what the separate kernels compute, with
// the same functions: the results are the same, bit for bit. A task's stores are visible to another work-group
// once it sees the task counted done: the CPU drivers' threads share coherent memory, and their OpenCL 1.2 atomics
// are sequentially consistent (PoCL's are LLVM's seq_cst), which keeps both the processor and the compiler from
// moving the stores past the count or the reads after it before it. GPUs promise neither within a launch, so only
// the CPU configs (work-groups of one work-item) build this.
// counters: per layer of the launch and phase, the tasks claimed and the tasks done, on cache lines of their own,
// then the work-groups out; zeros between launches (the last work-group out leaves them so)
#define LAYER_PHASES 7
#define FOLD_PHASE 5        // attention's spans folded (layer_phases), after its own tasks
#define NORM_PHASE 6        // with QK_NORM, q's and k's heads normalized and turned, between QKV and attention
#define CLAIMED(c, p) ((c) + 32 * (p))      // attention's: one a work-group, CLAIMED(c, 1) + g (see layer_phases)
#define DONE(c, p) ((c) + 32 * (p) + 16)
#define LAYER_COUNTERS (32 * LAYER_PHASES)
#define LEFT(c, layers) ((c) + LAYER_COUNTERS * (layers))
#if defined(__SSE2__)
#define SPIN_PAUSE() __builtin_ia32_pause()
#else
#define SPIN_PAUSE()
#endif
// attention.h's ATT_VALUES in a layer launch: q and attention's output rows q_p apart
#define LAYER_ATT_VALUES query, k_cache, v_cache, att, att_out, state, n_heads, n_kv_heads, head_dim, seq_p, q_p, q_p, \
    cache_offset, slot_stride
#define SCRATCH_VALUES scratch, scratch_ss, row
#define STORE_ADD 0
#define STORE_SWIGLU 1
#define STORE_QKV 2
// a layer's arrays in the launch's weights buffer, in the order of `parts`' rows (the host's Llama._upload_layers):
// Wqkv's data, scales and mins, then Wo's, [W1; W3]'s and W2's, then attn_norm, ffn_norm, the QKV biases and the
// heads' norms (QK_NORM)
#define LAYER_PARTS 16

// wait for every one of phase p's `total` tasks to be done: the count read atomically, and between two such reads
// with plain loads, which leave the cache line shared among the waiting cores (an atomic read takes it from the
// others); a work-group that finds its phase done at once (as under a driver that runs one after the other) reads
// the counters only atomically
inline void phase_end(__global volatile int *c, const int p, const int total) {
    while (atomic_add(DONE(c, p), 0) < total)
        while (*DONE(c, p) < total) SPIN_PAUSE();
    mem_fence(CLK_GLOBAL_MEM_FENCE);
}

// Batch steps of a few sequences (2 to KV_AHEAD_ROWS rows, each its own slot) spend a quarter of their time in
// attention, half of that waiting for keys and values from memory (SmolLM2, 8 rows at positions 130-216: every row
// reading one slot's cache instead, the same bytes but from cache, ran steps 1.1-1.2x faster), while the matrices'
// loops leave the memory idle. So the [W1; W3] phase, the longest, fetches the next layer's keys and values into L2
// a few lines a block (tile_rows' `fetch`), each work-group those of the rows whose attention it then takes first
// (layer_phases): 8-row steps 1.06-1.07x faster, 16-row 1.04-1.05x (benchmarks/ab_kernels.py both ways round,
// prompts and one sequence unchanged). Each row's
// cache is two runs of memory (attention.h: keys blocks 0 .. pos / KEY_BLOCK, values positions 0 .. pos), fetched
// in `parts` slices, the work-group's k-th tile run taking slice k (all rows' first slices first). Where the
// lines went to whichever core's tile came first, or came in bursts before the tiles, steps ran no faster or
// 1.04-1.07x slower. Passes of more rows (prompts, whose rows share their slot's cache) fetch nothing, nor builds
// whose keys are not in blocks.
#if !defined(KV_AHEAD_ROWS)
#define KV_AHEAD_ROWS 16
#endif
#if defined(KEY_BLOCK)
#define KV_AHEAD(T) ((T) > 1 && (T) <= KV_AHEAD_ROWS)
#else
#define KV_AHEAD(T) 0
#endif
#define QUEUES min((int)get_num_groups(0), 16)     // attention's queues: CLAIMED(c, 1) + g, before DONE(c, 1)
// the first of the `ahead` lines to fetch for this work-group's k-th tile run of `calls`, of the KV cache at
// layer offset `next`
inline __global const char *kv_slice(const int k, const int calls, const int T, __global const kv_t *k_cache,
                                     __global const kv_t *v_cache, __global const int *state, const int kv_dim,
                                     const long next, const int slot_stride, int *ahead) {
    const int G = QUEUES, g = get_group_id(0), runs = g < G ? 2 * ((T - g + G - 1) / G) : 0;
    *ahead = 0;
    if (runs == 0) return 0;
    const int parts = max(1, calls / runs), run = k % runs, part = k / runs, n = g + G * (run / 2);
    if (part >= parts) return 0;
    const int pos = ROW_POS(state, n, slot_stride);
    if (pos < 0) return 0;
    const size_t layer = ROW_CACHE(state, n, slot_stride, next);
    const size_t bytes = run % 2 ? (size_t)(pos + 1) * kv_dim * sizeof(kv_t)
                                 : (size_t)(pos / KEY_BLOCK + 1) * kv_dim * KEY_BLOCK * sizeof(kv_t);
    const size_t from = bytes * part / parts & ~(size_t)63, to = bytes * (part + 1) / parts;
    *ahead = (int)((to - from + 63) / 64);
    return (__global const char *)(run % 2 ? v_cache + layer : k_cache + layer) + from;
}

// phase p: y (=, +=, or silu(gate) * up, or q and the cache: `store`) W x, or W rmsnorm(x, g) when `norm`: a task
// per group of TOKENS input rows and share of the tiles (`shares` a group), group by group; a work-group prepares a
// group's input rows when its first task there comes. With `next` >= 0 (a layer's offset in the KV cache) its tile
// runs fetch that layer's keys and values ahead (above).
inline void matrix_phase(WEIGHT_ARGS, const int p, const int shares, __global volatile int *c,
                         __global const float *x, const int x_stride, __global const float *g, const int norm,
                         __global float *y, const int y_stride, const int rows, const int cols, const int cols_p,
                         const int T, const float eps, const int store, QKV_ARGS, const long next, GEMV_SCRATCH) {
    const int tasks = (T + TOKENS - 1) / TOKENS * shares;
    const int calls = ROW_TILES(rows) / TILES * ((T + TOKENS - 1) / TOKENS) / QUEUES;     // tile runs, about
    int prepared = -1;      // the group of rows in `row`
    int done = 0;           // this work-group's tile runs so far
    for (int task; (task = atomic_inc(CLAIMED(c, p))) < tasks; atomic_inc(DONE(c, p))) {
        const int tok0 = task / shares * TOKENS, share = task % shares;
        if (prepared != tok0)
            prepare_rows(x + (size_t)tok0 * x_stride, x_stride, T - tok0, g, norm, cols_p, row);
        prepared = tok0;
        for (int t0 = share * ROW_TILES(rows) / shares, end = (share + 1) * ROW_TILES(rows) / shares; t0 < end;
             t0 += TILES) {
            const int tiles = min(TILES, end - t0);
            floatV acc[TILES * TOKENS];
            int ahead = 0;
            __global const char *fetch = next >= 0 ? kv_slice(done++, calls, T, k_cache, v_cache, state, kv_dim, next,
                                                              slot_stride, &ahead) : 0;
            tile_rows(w_, s_, m_, x, g, norm, t0, tiles, cols, cols_p, T, x_stride, eps, scratch, scratch_ss, row, acc,
                      fetch, ahead);
            if (store == STORE_QKV)
                store_qkv(acc, t0, tiles, rows, tok0, T, y, y_stride, QKV_VALUES);
            else if (store == STORE_SWIGLU)
                store_swiglu(acc, t0, tiles, rows, tok0, T, y, y_stride);
            else
                store_rows(y, acc, t0, tiles, rows, tok0, T, y_stride, 1);
        }
    }
    phase_end(c, p, tasks);
}

// One layer's phases: its matrices wq_.. [Wq; Wk; Wv] (q_dim + 2 kv_dim rows), wo_.. Wo (dim rows, q_dim columns),
// wf_.. [W1; W3] in blocks (2 hidden rows), wd_.. W2 (dim rows, hidden columns); cp_*: their padded columns.
// Activations: x [T][dim_p], query and att_out [T][q_p], h [T][hidden_p], att attention's scratch and att_parts the
// sums of the spans it splits (attention.h's attend_span; passes of up to KV_AHEAD_ROWS rows); the KV cache and
// the rows' positions as for gemv_norm_rope_kv and attention. `next`: the next layer's offset in the KV cache, whose
// keys and values [W1; W3] fetches ahead, or -1. Where they are fetched (KV_AHEAD), work-group g takes the attention
// of rows g, g + G, g + 2G, ... (G work-groups), whose keys and values it fetched, before the others' left.
inline void layer_phases(__global const void *wq_, __global const void *sq_, __global const void *mq_,
                         __global const void *wo_, __global const void *so_, __global const void *mo_,
                         __global const void *wf_, __global const void *sf_, __global const void *mf_,
                         __global const void *wd_, __global const void *sd_, __global const void *md_,
                         __global float *x, __global const float *attn_norm, __global const float *ffn_norm,
                         __global const float *qk_norms, __global float *query, __global float *att,
                         __global float *att_parts, __global float *att_out, __global float *h, const int T,
                         const int dim, const int hidden, const int dim_p, const int q_p, const int hidden_p,
                         const int cp_qkv, const int cp_o, const int cp_f, const int cp_d,
                         const float eps, QKV_ARGS, const int n_heads, const int shares, const int phases,
                         __global volatile int *c, const long next, GEMV_SCRATCH) {
    const int n_kv_heads = kv_dim / head_dim, G = KV_AHEAD(T) ? QUEUES : 1;
    matrix_phase(wq_, sq_, mq_, 0, shares, c, x, dim_p, attn_norm, 1, query, q_p, q_dim + 2 * kv_dim, dim, cp_qkv, T,
                 eps, STORE_QKV, QKV_VALUES, -1, SCRATCH_VALUES);
#if defined(QK_NORM)
    // a task per row and key/value head: its GQA query heads and its key head
    for (int task; (task = atomic_inc(CLAIMED(c, NORM_PHASE))) < T * n_kv_heads; atomic_inc(DONE(c, NORM_PHASE))) {
        const int n = task / n_kv_heads, j = task % n_kv_heads;
        for (int head = j * GQA; head < (j + 1) * GQA; head++)
            norm_rope_head(head, n, query, q_p, qk_norms, eps, QKV_VALUES);
        norm_rope_head(n_heads + j, n, query, q_p, qk_norms, eps, QKV_VALUES);
    }
    phase_end(c, NORM_PHASE, T * n_kv_heads);
#endif
    if (KV_AHEAD(T) || T == 1) {
        // a task per key/value head and row, or per span of a row of several (attention.h's attend_span: the cores
        // share a long row's heads), whose spans are then folded (fold_spans: phase FOLD_PHASE); queue g takes rows
        // g, g + G, ..., the tasks of a row in a run
        int spans[KV_AHEAD_ROWS], tasks = 0, split = 0;    // each row's spans (T <= KV_AHEAD_ROWS here)
        for (int n = 0; n < T; n++) {
            spans[n] = ROW_SPANS(ROW_POS(state, n, slot_stride));
            tasks += n_kv_heads * spans[n];
            split |= spans[n] > 1;
        }
        for (int i = 0; i < G; i++) {   // queue g: rows g, g + G, ...; this work-group's first (one queue: all rows)
            const int g = (get_group_id(0) + i) % G;
            int queued = 0;
            for (int n = g; n < T; n += G) queued += n_kv_heads * spans[n];
            for (int task; (task = atomic_inc(CLAIMED(c, 1) + g)) < queued; atomic_inc(DONE(c, 1))) {
                int n = g;
                for (; task >= n_kv_heads * spans[n]; n += G) task -= n_kv_heads * spans[n];
                if (spans[n] == 1)
                    attend_heads(task % n_kv_heads, n, LAYER_ATT_VALUES);
                else
                    attend_span(task % n_kv_heads, n, task / n_kv_heads, att_parts, LAYER_ATT_VALUES);
            }
        }
        phase_end(c, 1, tasks);
        if (split) {
            for (int task; (task = atomic_inc(CLAIMED(c, FOLD_PHASE))) < n_kv_heads * T;
                 atomic_inc(DONE(c, FOLD_PHASE)))
                if (spans[task / n_kv_heads] > 1)
                    fold_spans(task % n_kv_heads, task / n_kv_heads, att_parts, LAYER_ATT_VALUES);
            phase_end(c, FOLD_PHASE, n_kv_heads * T);
        }
    } else {    // blocks of ATT_ROWS rows (attention.h's attend_rows), the last (the furthest positions) first
        const int blocks = (T + ATT_ROWS - 1) / ATT_ROWS, tasks = n_kv_heads * blocks;
        for (int task; (task = atomic_inc(CLAIMED(c, 1))) < tasks; atomic_inc(DONE(c, 1))) {
            const int n0 = (blocks - 1 - task / n_kv_heads) * ATT_ROWS;
            attend_rows(task % n_kv_heads, n0, min(ATT_ROWS, T - n0), LAYER_ATT_VALUES);
        }
        phase_end(c, 1, tasks);
    }
    if (phases > 2)
        matrix_phase(wo_, so_, mo_, 2, shares, c, att_out, q_p, attn_norm, 0, x, dim_p, dim, q_dim, cp_o, T, eps,
                     STORE_ADD, QKV_VALUES, -1, SCRATCH_VALUES);
    if (phases > 3)
        matrix_phase(wf_, sf_, mf_, 3, shares, c, x, dim_p, ffn_norm, 1, h, hidden_p, 2 * hidden, dim, cp_f, T, eps,
                     STORE_SWIGLU, QKV_VALUES, KV_AHEAD(T) ? next : -1, SCRATCH_VALUES);
    if (phases > 4)
        matrix_phase(wd_, sd_, md_, 4, shares, c, h, hidden_p, ffn_norm, 0, x, dim_p, dim, hidden, cp_d, T, eps,
                     STORE_ADD, QKV_VALUES, -1, SCRATCH_VALUES);
}

// Layers first .. first + count - 1 of the weights buffer `weights` (their arrays where `parts` says, a row of
// LAYER_PARTS byte offsets a layer), each in turn: layer l's KV cache starts cache_stride values after layer l - 1's.
// More than one layer only where each runs all five phases.
__kernel void layers(__global const char *weights, __global const uint *parts, const int first, const int count,
                     __global float *x, __global float *query, __global float *att, __global float *att_parts,
                     __global float *att_out, __global float *h, const int T, const int dim, const int hidden,
                     const int dim_p, const int q_p, const int hidden_p, const int cp_qkv, const int cp_o, const int cp_f, const int cp_d,
                     const float eps, __global kv_t *k_cache, __global kv_t *v_cache, __global const int *state,
                     __global const float *rope, const int q_dim, const int kv_dim, const int head_dim,
                     const int seq_p, const int cache_offset, const int cache_stride, const int slot_stride,
                     const int n_heads, const int shares, const int phases, __global volatile int *counters,
                     GEMV_SCRATCH) {
    for (int l = 0; l < count; l++) {
        __global const uint *o = parts + (size_t)(first + l) * LAYER_PARTS;
#define PART(k) (weights + o[k])
        layer_phases(PART(0), PART(1), PART(2), PART(3), PART(4), PART(5), PART(6), PART(7), PART(8), PART(9),
                     PART(10), PART(11), x, (__global const float *)PART(12), (__global const float *)PART(13),
                     (__global const float *)PART(15), query,
                     att, att_parts, att_out, h, T, dim, hidden, dim_p, q_p, hidden_p, cp_qkv, cp_o, cp_f, cp_d, eps,
                     (__global const float *)PART(14), k_cache, v_cache, state, rope, q_dim, kv_dim, head_dim, seq_p,
                     cache_offset + l * cache_stride, slot_stride, n_heads, shares, phases,
                     counters + LAYER_COUNTERS * l, l + 1 < count ? cache_offset + (l + 1) * (long)cache_stride : -1,
                     scratch, scratch_ss, row);
#undef PART
    }
    if (atomic_inc(LEFT(counters, count)) == get_num_groups(0) - 1) {     // the last one out: every other has left
        for (int i = 0; i < LAYER_COUNTERS * count; i += 16)   // each phase's CLAIMED and DONE
            atomic_xchg(counters + i, 0);
        for (int l = 0; l < count && KV_AHEAD(T); l++)         // attention's queues past the first
            for (int g = 1; g < QUEUES; g++) atomic_xchg(CLAIMED(counters + LAYER_COUNTERS * l, 1) + g, 0);
        atomic_xchg(LEFT(counters, count), 0);
    }
}
#endif

// x[n] = row tokens[pos + n] of the embedding table, dequantized (state = {pos, ...}), and fed[n] = that token;
// global (any, T). In a batch, an id -1 - i stands for chosen[i], the token the batch before chose on the device for
// its i-th row (sampling.cl's choose_rows; -1 there, logits that were not finite, embeds row 0: the host reports
// them); fed keeps it for this batch's draws, whose penalties count it (choose_rows overwrites chosen).
__kernel void embed(WEIGHT_ARGS, __global const int *tokens, __global const int *state,
                    __global const int *chosen, __global float *x, const int cols, const int cols_p,
                    const int x_stride, __global int *fed) {
    const int n = get_global_id(1), id = tokens[state[0] + n], r = id >= 0 ? id : max(chosen[-1 - id], 0);
    if (get_global_id(0) == 0) fed[n] = r;
    for (int c = get_global_id(0); c < cols; c += get_global_size(0))
        x[(size_t)n * x_stride + c] = weight_at(w_, s_, m_, r, c, cols_p);
}
