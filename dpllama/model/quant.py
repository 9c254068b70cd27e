"""Weight quantization into dpllama's storage formats (see `dpllama.model.weights`), lossless conversion of
GGUF's quantized blocks into them (`GGUF_REPACK`), and lossless conversion between the formats (`widen`).
All NumPy, vectorized over whole tensors.

GGUF type -> Tensor (docs/ARCHITECTURE.md, "Weight formats", has the table and the reasons):
  Q4_0 int4 symmetric g32 fp16 scales      Q4_1 int4 asymmetric g32 fp16
  Q5_0 int5 symmetric g32 fp16 scales      Q5_1 int5 asymmetric g32 fp16
  Q5_K int5 asymmetric g32 float32 scales and mins
  Q8_0 q8 g32      Q6_K q8 g16
  Q4_K int4 asymmetric g32 float32 scales and mins               Q3_K int4 symmetric g16 float32 scales
  Q2_K int4 asymmetric g16 float32 scales and mins
  IQ4_NL q8 g32    IQ4_XS q8 g32 (their 16 levels are a table, not evenly spaced: the values are the q8)
Every one is exact: the K-quants' two-level scales (fp16 d times a 4-, 6- or 8-bit sub-block scale: up to 19
significant bits) are multiplied out in float32, which holds the product exactly, as gguf's own dequantization
computes it; float16 (11 bits) would round them.
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dpllama.errors import DpllamaError
from dpllama.model.weights import OFFSET, Tensor



def _grouped(w: np.ndarray, group: int) -> np.ndarray:
    """float32[rows, cols] -> float32[rows, cols_p // group, group], zero-padded to whole groups."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    pad = -cols % group
    if pad:
        w = np.concatenate([w, np.zeros((rows, pad), np.float32)], axis=1)
    return w.reshape(rows, -1, group)


def _safe(scale: np.ndarray) -> np.ndarray:
    # An all-zero group has scale 0; dividing by 1 instead gives q = 0 (q = 8 symmetric int4): exact zeros.
    return np.where(scale == 0, np.float32(1), scale)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8[rows, n] values 0..15 (n % 8 == 0) -> uint32[rows, n // 8], element 8j+k in bits 4k..4k+3
    of word j. Two nibbles per byte, low first, read as little-endian words gives exactly that order."""
    q = q.astype(np.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return np.ascontiguousarray(packed).view("<u4")


def _pack_int5(q: np.ndarray) -> np.ndarray:
    """uint8[rows, n] values 0..31 (n % 32 == 0) -> uint32[rows, n // 32 * 5]: per 32 values their low 4 bits
    as _pack_nibbles packs them (4 words), then their fifth bits, value i at bit i (weights.py's int5)."""
    rows = q.shape[0]
    nibbles = _pack_nibbles(q & 15).reshape(rows, -1, 4)
    high = np.packbits((q >> 4).reshape(rows, -1, 32), axis=-1, bitorder="little").view("<u4")   # [rows, n/32, 1]
    return np.ascontiguousarray(np.concatenate([nibbles, high], axis=2).reshape(rows, -1))


def quantize_q8(w: np.ndarray, group: int = 32) -> Tensor:
    """Symmetric 8-bit: scale = absmax / 127 per group, float32 scales; |w - w'| <= scale / 2."""
    if group <= 0:
        raise DpllamaError(f"q8 group size must be positive, found {group}")
    rows, cols = w.shape
    g = _grouped(w, group)
    scale = np.abs(g).max(axis=2) / np.float32(127)                     # float32[rows, groups]
    q = np.rint(g / _safe(scale)[:, :, None]).clip(-127, 127).astype(np.int8)
    return Tensor("q8", rows, cols, q.reshape(rows, -1), scales=scale, group=group)


def quantize_int4(w: np.ndarray, group: int = 32, symmetric: bool = True) -> Tensor:
    """4-bit weights with float16 scales (and mins) per group of `group` inputs.

    symmetric:  like GGUF Q4_0, scale = m / -8 with m the group's value of largest magnitude, so all
                16 levels are used (q = 0 is m itself); measured ~11% lower RMS error than absmax / 7.
                |w - w'| <= |scale| / 2, except opposite-sign values beyond 7.5 |scale|, which clamp
                at q = 15: error <= |scale| (+ float16 rounding of the scale).
    asymmetric: like GGUF Q4_1, min = group min, scale = (max - min) / 15;
                |w - w'| <= scale / 2 + 2^-11 (|min| + max - min) (the last term: float16 rounding).
    q is computed from the float16-rounded scale and min, so dequantize() is exactly what was chosen.
    """
    if group <= 0 or group % 8:
        raise DpllamaError(f"int4 group size must be a positive multiple of 8, found {group}")
    rows, cols = w.shape
    g = _grouped(w, group)
    if symmetric:
        idx = np.abs(g).argmax(axis=2)[:, :, None]
        scale = (np.take_along_axis(g, idx, axis=2)[:, :, 0] / np.float32(-8)).astype(np.float16)
        s = _safe(scale.astype(np.float32))[:, :, None]
        q = np.rint(g / s) + 8
        mins = None
    else:
        lo, hi = g.min(axis=2), g.max(axis=2)
        scale = ((hi - lo) / np.float32(15)).astype(np.float16)
        mins = lo.astype(np.float16)
        s = _safe(scale.astype(np.float32))[:, :, None]
        q = np.rint((g - mins.astype(np.float32)[:, :, None]) / s)
    data = _pack_nibbles(q.clip(0, 15).reshape(rows, -1))
    return Tensor("int4", rows, cols, data, scales=scale, mins=mins, group=group)


def _blocks(raw: np.ndarray, rows: int, cols: int, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """GGUF block bytes -> uint8[rows, cols // block, block_bytes] (formats.gguf has checked the sizes)."""
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if cols % block:
        raise DpllamaError(f"GGUF {ggml_type.name} row length {cols} is not a multiple of its block of {block}")
    return np.asarray(raw, dtype=np.uint8).reshape(rows, cols // block, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of every block: float16[rows, n_blocks]."""
    return np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view("<f2")[:, :, 0]


def _f32(blocks: np.ndarray, offset: int) -> np.ndarray:
    return _f16(blocks, offset).astype(np.float32)


def _planes(b: np.ndarray, shifts, mask: int) -> np.ndarray:
    """uint8[..., n] -> uint8[..., len(shifts), n]: the bit field (b >> shift) & mask of every byte, per
    shift. GGUF stores a block's low bits of consecutive runs of weights this way (bit plane, then byte)."""
    return (b[..., None, :] >> np.array(shifts, np.uint8)[:, None]) & np.uint8(mask)


def _flat(a: np.ndarray) -> np.ndarray:
    """[rows, n_blocks, ...] -> [rows, n_blocks * ...]: the blocks' values in row order."""
    return a.reshape(a.shape[0], -1)


def _times(d: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Block scale d [rows, n_blocks] times its sub-block values [rows, n_blocks, k], in float32 as gguf
    computes it (exact: at most 11 + 8 significant bits) -> [rows, n_blocks * k]. A d of inf times a sub-block
    value of 0 is NaN, quietly: check_values names the tensor, where NumPy's warning would add lines to the error."""
    with np.errstate(invalid="ignore"):
        return _flat(d[:, :, None] * sub.astype(np.float32))


def _fields(b: np.ndarray, bits: int) -> np.ndarray:
    """uint8[rows, n, k] -> uint8[rows, n, k * 8 // bits]: every byte's `bits`-wide fields, low first, byte
    after byte (an array of small fields packed in little-endian order: IQ4_XS's sub-block scales)."""
    fields = _planes(b, range(0, 8, bits), (1 << bits) - 1)            # [rows, n, fields a byte, k]
    return fields.swapaxes(-1, -2).reshape(*b.shape[:-1], -1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins of 8 sub-blocks -> uint8[rows, n_blocks, 8] each:
    sub-block j < 4 in the low 6 bits of bytes j (scale) and j + 4 (min); j >= 4 has its low 4 bits in byte
    j + 4 (scale low, min high nibble) and its high 2 bits in the top bits of bytes j - 4 and j."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-1)
    return sc, mn


def _int4(q: np.ndarray, rows: int, cols: int, group: int, scales: np.ndarray, mins=None) -> Tensor:
    return Tensor("int4", rows, cols, _pack_nibbles(q), scales=scales, mins=mins, group=group)


def _int5(q: np.ndarray, rows: int, cols: int, group: int, scales: np.ndarray, mins=None) -> Tensor:
    return Tensor("int5", rows, cols, _pack_int5(q), scales=scales, mins=mins, group=group)


def _q8(q: np.ndarray, rows: int, cols: int, group: int, scales: np.ndarray, mins=None) -> Tensor:
    return Tensor("q8", rows, cols, np.ascontiguousarray(q, np.int8), scales=scales, mins=mins, group=group)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """uint8[rows, n, 16]: 32 weights, element i in the low nibble of byte i, i + 16 in its high nibble
    (Q4_0, Q4_1, Q5_0, Q5_1) -> uint8[rows, n * 32] in element order."""
    return _flat(_planes(qs, (0, 4), 0xF))


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1's 4 bytes of fifth bits, element i at bit i of the little-endian word -> [rows, n * 32]."""
    return _flat(np.unpackbits(qh, axis=-1, bitorder="little"))


def repack_q4_0(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q4_0 (18 bytes / 32: fp16 d, 16 bytes of nibbles; w = d (q - 8)) -> int4 symmetric g32, fp16 scales."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q4_0)
    return _int4(_nibbles_32(b[:, :, 2:]), rows, cols, 32, _f16(b, 0))


def repack_q4_1(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q4_1 (20 bytes / 32: fp16 d, fp16 m, 16 bytes of nibbles; w = d q + m) -> int4 asymmetric g32, fp16."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q4_1)
    return _int4(_nibbles_32(b[:, :, 4:]), rows, cols, 32, _f16(b, 0), _f16(b, 2))


def repack_q5_0(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q5_0 (22 bytes / 32: fp16 d, 4 bytes of fifth bits, 16 of nibbles; w = d (q - 16)) -> int5 symmetric g32,
    fp16 scales."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q5_0)
    q = _nibbles_32(b[:, :, 6:]) | (_high_bits_32(b[:, :, 2:6]) << 4)
    return _int5(q, rows, cols, 32, _f16(b, 0))


def repack_q5_1(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q5_1 (24 bytes / 32: fp16 d, fp16 m, fifth bits, nibbles; w = d q + m) -> int5 asymmetric g32, fp16."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q5_1)
    q = _nibbles_32(b[:, :, 8:]) | (_high_bits_32(b[:, :, 4:8]) << 4)
    return _int5(q, rows, cols, 32, _f16(b, 0), _f16(b, 2))


def repack_q8_0(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q8_0 (34 bytes / 32: fp16 d, 32 int8; w = d q) -> q8 g32."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q8_0)
    return _q8(_flat(b[:, :, 2:].view(np.int8)), rows, cols, 32, _f32(b, 0))


def repack_q2_k(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q2_K (84 bytes / 256: 16 bytes of 4-bit sub-block scale and min, 64 bytes of 2-bit q, fp16 d, fp16 dmin;
    w = d sc q - dmin m per 16) -> int4 asymmetric g16, float32 scales and mins."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q2_K)
    sc = b[:, :, 0:16]
    q = _flat(_planes(b[:, :, 16:80].reshape(rows, -1, 2, 32), (0, 2, 4, 6), 3))
    return _int4(q, rows, cols, 16, _times(_f32(b, 80), sc & 15), -_times(_f32(b, 82), sc >> 4))


def repack_q3_k(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q3_K (110 bytes / 256: 32 bytes of high bits, 64 of 2-bit low bits, 12 of 6-bit sub-block scales,
    fp16 d; w = d (sc - 32) q per 16, q = low - 4 where the high bit is clear, in -4..3) -> int4 symmetric g16
    (q + 8), float32 scales."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q3_K)
    high = _flat(_planes(b[:, :, 0:32], range(8), 1))
    low = _flat(_planes(b[:, :, 32:96].reshape(rows, -1, 2, 32), (0, 2, 4, 6), 3))
    s = b[:, :, 96:108]
    sc = _flat(_planes(s[:, :, :8], (0, 4), 15)) | (_flat(_planes(s[:, :, 8:], (0, 2, 4, 6), 3)) << 4)
    sc = sc.reshape(rows, -1, 16).astype(np.int8) - 32
    return _int4(low + 4 * high + 4, rows, cols, 16, _times(_f32(b, 108), sc))


def repack_q4_k(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q4_K (144 bytes / 256: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 of nibbles,
    each run of 64 weights as 32 bytes, low nibbles first; w = d sc q - dmin m per 32) -> int4 asymmetric g32,
    float32 scales and mins."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q4_K)
    sc, mn = _scale_min_k4(b[:, :, 4:16])
    q = _flat(_planes(b[:, :, 16:].reshape(rows, -1, 4, 32), (0, 4), 0xF))
    return _int4(q, rows, cols, 32, _times(_f32(b, 0), sc), -_times(_f32(b, 2), mn))


def repack_q5_k(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q5_K (176 bytes / 256: Q4_K's fields, with 32 bytes of fifth bits (sub-block j at bit j) before the
    nibbles; w = d sc q - dmin m per 32, q < 32) -> int5 asymmetric g32, float32 scales and mins."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q5_K)
    sc, mn = _scale_min_k4(b[:, :, 4:16])
    low = _flat(_planes(b[:, :, 48:].reshape(rows, -1, 4, 32), (0, 4), 0xF))
    q = low | (_flat(_planes(b[:, :, 16:48], range(8), 1)) << 4)
    return _int5(q, rows, cols, 32, _times(_f32(b, 0), sc), -_times(_f32(b, 2), mn))


def repack_q6_k(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """Q6_K (210 bytes / 256: 128 bytes of low nibbles, 64 of high 2-bits, 16 int8 sub-block scales, fp16 d;
    each half of 128 weights as 64 bytes of nibbles and 32 of 2-bits; w = d sc (q - 32) per 16) -> q8 g16."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.Q6_K)
    low = _flat(_planes(b[:, :, :128].reshape(rows, -1, 2, 64), (0, 4), 0xF))
    high = _flat(_planes(b[:, :, 128:192].reshape(rows, -1, 2, 32), (0, 2, 4, 6), 3))
    q = (low | (high << 4)).astype(np.int8) - 32
    return _q8(q, rows, cols, 16, _times(_f32(b, 208), b[:, :, 192:208].view(np.int8)))


# llama.cpp's kvalues_iq4nl: the weights of IQ4_NL and IQ4_XS are d times these, indexed by their nibbles.
# All fit int8, so q8 holds them exactly; the int4 kernels would need them decoded through the table in the
# kernel (their arithmetic is linear in q), which is not done: these types cost 9 bits a weight on the device.
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def repack_iq4_nl(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """IQ4_NL (18 bytes / 32: fp16 d, 16 bytes of nibbles in Q4_0's order; w = d IQ4_VALUES[q]) -> q8 g32."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.IQ4_NL)
    return _q8(IQ4_VALUES[_nibbles_32(b[:, :, 2:])], rows, cols, 32, _f32(b, 0))


def repack_iq4_xs(raw: np.ndarray, rows: int, cols: int) -> Tensor:
    """IQ4_XS (136 bytes / 256: fp16 d, uint16 of the 8 sub-block scales' high 2 bits, 4 bytes of their low 4
    bits, 128 bytes of nibbles, 16 a sub-block in Q4_0's order; w = (d (ls - 32)) IQ4_VALUES[q] per 32, ls
    6-bit) -> q8 g32, float32 scales (d (ls - 32), as gguf computes it, exact: 11 + 6 significant bits)."""
    b = _blocks(raw, rows, cols, GGMLQuantizationType.IQ4_XS)
    ls = _fields(b[:, :, 4:8], 4) | (_fields(b[:, :, 2:4], 2) << 4)
    q = IQ4_VALUES[_nibbles_32(b[:, :, 8:].reshape(rows, -1, 16))]
    return _q8(q, rows, cols, 32, _times(_f32(b, 0), ls.astype(np.int8) - 32))


T = GGMLQuantizationType
# GGUF's quantized types -> their lossless repack
GGUF_REPACK = {T.Q4_0: repack_q4_0, T.Q4_1: repack_q4_1, T.Q5_0: repack_q5_0, T.Q5_1: repack_q5_1,
               T.Q8_0: repack_q8_0, T.Q2_K: repack_q2_k, T.Q3_K: repack_q3_k, T.Q4_K: repack_q4_k,
               T.Q5_K: repack_q5_k, T.Q6_K: repack_q6_k, T.IQ4_NL: repack_iq4_nl, T.IQ4_XS: repack_iq4_xs}


def widen(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors in one format, the narrowest that holds each exactly (so fuse_rows can stack them): f32 if
    any is f32 or the groups share no multiple of 8; else groups split to their greatest common divisor
    (each scale repeated), int4 if all are int4, int5 if all are int4 or int5 and that group is a multiple of
    32 (int5's words of fifth bits span 32 inputs), else q8 (4- and 5-bit values fit in 8); asymmetric if any
    is (min = 0, or -8 s / -16 s for symmetric int4 / int5: exact), float32 scales unless all are fp16 and the
    kind is not q8 (whose kernels take float32 only)."""
    if len({(t.kind, t.group, t.mins is not None, t.scales.dtype if t.group else None) for t in tensors}) == 1:
        return tensors
    group = math.gcd(*(t.group for t in tensors))
    if any(t.kind == "f32" for t in tensors) or group % 8:
        return [Tensor.f32(t.dequantize()) for t in tensors]
    kinds = {t.kind for t in tensors}
    kind = "int4" if kinds == {"int4"} else "int5" if kinds <= {"int4", "int5"} and group % 32 == 0 else "q8"
    asym = any(t.mins is not None for t in tensors)
    dtype = np.float16 if kind != "q8" and all(t.scales.dtype == np.float16 for t in tensors) else np.float32

    def one(t: Tensor) -> Tensor:
        q = t.data if t.kind == "q8" else t.levels()
        scales = t.scales.astype(dtype)
        mins = None if t.mins is None else t.mins.astype(dtype)
        if t.kind in OFFSET and t.mins is None:             # s (q - offset)
            if kind == "q8":
                q = q.astype(np.int8) - OFFSET[t.kind]      # as a q8 value
            elif asym:
                mins = -OFFSET[t.kind] * scales             # = s q + (-offset s)
            else:
                q = q + (OFFSET[kind] - OFFSET[t.kind])     # int4's q - 8 as int5's (q + 8) - 16
        if asym and mins is None:
            mins = np.zeros_like(scales)
        k = t.group // group                                # each group splits into k
        data = q.astype(np.int8) if kind == "q8" else _pack_int5(q) if kind == "int5" else _pack_nibbles(q)
        return Tensor(kind, t.rows, t.cols, data, np.repeat(scales, k, axis=1),
                      None if mins is None else np.repeat(mins, k, axis=1), group)
    return [one(t) for t in tensors]
