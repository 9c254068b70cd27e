// The weight formats, their device layout, and the read of one weight (weight_at: the embedding row lookups
// of matrix.cl and sampling.cl, which are built per format).
//
// Build with one weight format (docs/ARCHITECTURE.md, "Weight formats" and "Device layout"):
//   -DW_F32                    w = float weight
//   -DW_Q8   -DGROUP=g         w = s * q,        q int8, 4 per uint32 (stored as q + 128), s per group
//   -DW_INT4 -DGROUP=g         w = s * (q - 8),  q 4-bit, 8 per uint32 along the input dimension, s per group
//   -DW_INT5 -DGROUP=g         w = s * (q - 16), q 5-bit: int4's nibbles plus a word of fifth bits per 32 columns
//   -DASYM (any)               w = s * q + m,    m per group
//   -DSCALES_F32               s and m are float (q8 always; int4 and int5 from GGUF's K-quants), else fp16 bits
// and -DTILE_ROWS (the config's work_group.tile_rows: 2, 4, 8 or 16): the rows of one tile, computed together as the lanes of a vector.
//
// Device layout: rows are padded to a multiple of TILE_ROWS and cut into tiles of TILE_ROWS rows; inside a tile the
// TILE_ROWS values of one column (one packed word for int4) lie side by side, so a tile is one contiguous
// stream and a TILE_ROWS-wide vector load fetches that column for all TILE_ROWS rows:
//   f32 floatV w[tiles][cols_p]   q8 uintV w[tiles][cols_p / 4]   int4 uintV w[tiles][cols_p / 8]
//   int5 uintV w[tiles][cols_p / 32][5]: per 32 columns int4's 4 words, then the fifth bits, that of column
//        8j + 2b + p (j, b < 4, p < 2) at bit 8b + 2j + p (the order matrix.cl's block_dot wants)
//   scales / mins: floatV (SCALES_F32) or ushortV fp16 bits [tiles][cols_p / GROUP]
// cols_p is a multiple of 8 and of GROUP (int5: GROUP a multiple of 32); activations are zero-padded to it.

#define WEIGHT_ARGS __global const void *w_, __global const void *s_, __global const void *m_

#if defined(W_Q8) && !defined(SCALES_F32)
#error "q8 scales are float: build it with -DSCALES_F32"
#endif
#if defined(W_INT5) && GROUP % 32
#error "int5 groups are whole multiples of 32 columns (a word of fifth bits spans 32)"
#endif
// scale (or min) i of s_ (or m_), as float
#if defined(SCALES_F32)
#define SCALE_AT(p, i) ((__global const float *)(p))[i]
#else
#define SCALE_AT(p, i) vload_half(i, (__global const half *)(p))
#endif

// Weight (r, c), for the embedding lookup
inline float weight_at(WEIGHT_ARGS, const int r, const int c, const int cols_p) {
    const size_t t = r / TILE_ROWS, lane = r % TILE_ROWS;
#if defined(W_F32)
    return ((__global const float *)w_)[(t * cols_p + c) * TILE_ROWS + lane];
#else
#if defined(W_Q8)
    const int k = c % 8, slot = (k & 1) | ((k & 4) >> 1) | ((k & 2) << 1);    // its byte among the 8 (matrix.cl)
    const uint u = ((__global const uint *)w_)[(t * (cols_p / 4) + c / 8 * 2 + slot / 4) * TILE_ROWS + lane];
    const float q = (float)((int)((u >> (8 * (slot % 4))) & 255u) - 128);
#elif defined(W_INT5)
    __global const uint *w = (__global const uint *)w_ + (t * (cols_p / 32) + c / 32) * 5 * TILE_ROWS + lane;
    const int k = c % 32, bit = 8 * (k / 2 % 4) + 2 * (k / 8) + k % 2;        // its fifth bit (the layout above)
    const float q = (float)(((w[k / 8 * TILE_ROWS] >> (4 * (k % 8))) & 15u) | (((w[4 * TILE_ROWS] >> bit) & 1u) << 4));
#else
    const uint u = ((__global const uint *)w_)[(t * (cols_p / 8) + c / 8) * TILE_ROWS + lane];
    const float q = (float)((u >> (4 * (c % 8))) & 15u);
#endif
    const size_t g = (t * (cols_p / GROUP) + c / GROUP) * TILE_ROWS + lane;
    const float s = SCALE_AT(s_, g);
#if defined(ASYM)
    return s * q + SCALE_AT(m_, g);
#elif defined(W_Q8)
    return s * q;
#elif defined(W_INT5)
    return s * (q - 16.0f);
#else
    return s * (q - 8.0f);
#endif
#endif
}
