"""Host-side model description: hyperparameters and weight tensors in their storage formats.

Every loader (llama2.c .bin, GGUF, dpllama's own quantized GGUF) produces a `Weights`; the device
model (`dpllama.model.llama`) uploads it as is, and the NumPy reference (`dpllama.model.reference`)
dequantizes it. Storage formats of a weight matrix W[rows=out, cols=in] (y = W @ x):

- ``f32``:  data float32[rows, cols]
- ``q8``:   data int8[rows, cols_p], scales float32[rows, cols_p // group];
  symmetric:  w = scale * q
  asymmetric: w = scale * q + min, mins float32[rows, cols_p // group] (GGUF's Q5_1 and Q5_K)
- ``int4``: data uint32[rows, cols_p // 8], eight 4-bit values per word along the input dimension,
  element 8*j + k in bits 4k..4k+3 of word j (low nibble first); scales float16[rows, cols_p // group],
  or float32 where float16 would round them (GGUF's K-quants: d * sub-block scale);
  symmetric:  w = scale * (q - 8)
  asymmetric: w = scale * q + min, mins [rows, cols_p // group] of the scales' type
- ``int5``: data uint32[rows, cols_p // 32 * 5]: per 32 inputs, int4's four words of nibbles (the low 4 bits
  of each value), then one word of their fifth bits, element 32*b + i at bit i of word 5*b + 4 (GGUF's
  Q5_0, Q5_1 and Q5_K, bit for bit); groups are multiples of 32; scales and mins as int4's;
  symmetric:  w = scale * (q - 16)
  asymmetric: w = scale * q + min

cols_p is cols rounded up to a multiple of the group size; the padding holds zero weights
(q = 0 for q8, q = 8 or 16 symmetric, q = 0 with min = 0 asymmetric in a padded-only group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.formats import round_up

# float32's least normal and largest numbers: the device's arithmetic, and the numbers a value read as float64 (a
# GGUF key, a flag) must lie between to mean the same there
F32_TINY, F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
F32_RANGE = f"({F32_TINY:.4g} to {F32_MAX:.4g})"     # said where a value is out of it


def positive_f32(x: float) -> bool:
    """A positive float32 that is normal and finite (NaN is not)."""
    return F32_TINY <= x <= F32_MAX


@dataclass
class ModelConfig:
    dim: int            # residual stream width
    hidden_dim: int     # feed-forward width
    n_layers: int
    n_heads: int        # query heads
    n_kv_heads: int     # key/value heads (grouped-query attention when < n_heads)
    vocab_size: int
    seq_len: int        # context length
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # What the architectures add to llama2.c's Llama (docs/ARCHITECTURE.md, "Architectures"):
    arch: str = "llama"             # GGUF's general.architecture, written back by dpllama quantize
    rope_neox: bool = False         # RoPE turns (x[i], x[i + head_dim/2]) (qwen2), not (x[2i], x[2i+1])
    qkv_bias: bool = False          # Q, K and V projections add a bias (Layer.bq, bk, bv)
    qk_norm: bool = False           # each head of q and k is RMS-normalized before RoPE (qwen3: Layer.q_norm, k_norm)
    key_length: int = 0             # a head's width where it is not dim / n_heads (GGUF's attention.key_length)
    # RoPE frequency i divided by factor i (Llama 3.1's "llama3" scaling, llama.cpp's rope_freqs.weight; linear
    # scaling's and YaRN's too)
    rope_freq_factors: tuple[float, ...] | None = None
    rope_mscale: float = 1.0        # RoPE's cos and sin multiplied by it (YaRN's 1 + 0.1 ln factor; attn_factor)
    # LongRoPE (Phi-3's): the factors for a context longer than rope_long_from tokens, rope_freq_factors' for the
    # shorter, as llama.cpp chooses between rope_factors_long and rope_factors_short by the context it runs with
    rope_long_factors: tuple[float, ...] | None = None
    rope_long_from: int = 0

    def rope_factors(self, context: int) -> tuple[float, ...] | None:
        """The RoPE frequencies' divisors for a context of `context` tokens."""
        long = self.rope_long_factors is not None and context > self.rope_long_from
        return self.rope_long_factors if long else self.rope_freq_factors

    @property
    def head_dim(self) -> int:
        return self.key_length or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.head_dim * self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads


def rope_angles(positions, head_dim: int, theta: float, freq_factors=None) -> np.ndarray:
    """RoPE's angles pos * theta^(-2i / head_dim) / freq_factors[i] for each position and pair i,
    float32[positions, head_dim / 2], in float32 arithmetic as llama2.c's run.c computes them (the factors, 1 when
    None, as ggml's rope divides by them): the device's table, the reference's rotation and a llama2.c file's
    freq_cis tables all come from here."""
    j = np.arange(0, head_dim, 2, dtype=np.float32)
    inv_freq = np.float32(1) / np.power(np.float32(theta), j / np.float32(head_dim))
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, np.float32)
    return np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context_length: int) -> tuple[float, ...]:
    """Llama 3.1's RoPE scaling as per-frequency divisors, as llama.cpp's convert_hf_to_gguf.py turns it into
    rope_freqs.weight: frequencies whose wavelength is below original_context_length / high_freq_factor keep
    theirs, those above original_context_length / low_freq_factor are slowed by `factor`, those between
    are blended smoothly."""
    freqs = 1.0 / np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    low_wavelen, high_wavelen = original_context_length / low_freq_factor, original_context_length / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(float(factor))
        else:
            smooth = (original_context_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(np.float32(f)) for f in factors)     # as the float32 tensor stores them


def yarn_rope(head_dim: int, theta: float, factor: float, original_context_length: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0) -> tuple[tuple[float, ...], float]:
    """YaRN's scaling (llama.cpp's rope_yarn with its default ext_factor 1; Qwen's long contexts) as per-frequency
    divisors and a magnitude: pair i's angle is the interpolated one (its frequency divided by `factor`) blended into
    the original by a ramp, which is 1 (the original) for the pairs below the correction dim of beta_fast rotations
    over the original context and 0 (interpolated) above that of beta_slow; cos and sin are multiplied by
    1 + 0.1 ln(factor). Returns (the divisors, that magnitude)."""
    def corr_dim(beta: float) -> float:
        return head_dim * math.log(original_context_length / (beta * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(0, math.floor(corr_dim(beta_fast))), min(head_dim - 1, math.ceil(corr_dim(beta_slow)))
    factors = []
    for i in range(head_dim // 2):
        ramp = 1 - min(1.0, max(0.0, (i - low) / max(0.001, high - low)))
        factors.append(1 / ((1 - ramp) / factor + ramp))
    mscale = 1 + 0.1 * math.log(factor) if factor > 1 else 1.0
    return tuple(float(np.float32(f)) for f in factors), float(np.float32(mscale))


def layer_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every `Layer` field the model has, in field order: (rows, cols) for matrices, (n,) for norms
    and biases (the biases only where c.qkv_bias, the heads' norms only where c.qk_norm)."""
    shapes = {"attn_norm": (c.dim,), "wq": (c.q_dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim),
              "wo": (c.dim, c.q_dim), "ffn_norm": (c.dim,), "w1": (c.hidden_dim, c.dim),
              "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim)}
    if c.qkv_bias:
        shapes |= {"bq": (c.q_dim,), "bk": (c.kv_dim,), "bv": (c.kv_dim,)}
    if c.qk_norm:
        shapes |= {"q_norm": (c.head_dim,), "k_norm": (c.head_dim,)}
    return shapes


def check_config(c: ModelConfig, source: str, names: dict[str, str] | None = None) -> None:
    """Raise DpllamaError (message starting with `source`, the file) unless `c` can describe a Llama model.
    `names` maps ModelConfig fields to the file's own names for them, for the messages."""
    def name(f: str) -> str:
        return (names or {}).get(f, f)

    def bad(what: str) -> DpllamaError:
        return DpllamaError(f"{source}: impossible model: {what}")

    for f in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
        if getattr(c, f) <= 0:
            raise bad(f"{name(f)} must be positive, found {getattr(c, f)}")
    if c.key_length < 0:
        raise bad(f"{name('key_length')} must be positive, found {c.key_length}")
    if not c.key_length and c.dim % c.n_heads:
        raise bad(f"{name('dim')} {c.dim} is not a multiple of {name('n_heads')} {c.n_heads}")
    if c.n_heads % c.n_kv_heads:
        raise bad(f"{name('n_heads')} {c.n_heads} is not a multiple of {name('n_kv_heads')} {c.n_kv_heads}")
    if c.head_dim % 2:
        raise bad(f"head_dim {c.head_dim} is odd (RoPE rotates pairs)")
    # RoPE's tables are float32: a base or factor outside its normal numbers would be 0 or infinite there
    if not positive_f32(c.rope_theta):
        raise bad(f"{name('rope_theta')} must be a positive float32 {F32_RANGE}, found {c.rope_theta}")
    if not 0 < c.norm_eps < 1:      # NaN fails too
        raise bad(f"{name('norm_eps')} must be between 0 and 1, found {c.norm_eps}")
    if not positive_f32(c.rope_mscale):
        raise bad(f"{name('rope_mscale')} must be a positive float32 {F32_RANGE}, found {c.rope_mscale}")
    for field in ("rope_freq_factors", "rope_long_factors"):
        factors = getattr(c, field)
        if factors is None:
            continue
        if len(factors) != c.head_dim // 2:
            raise bad(f"{name(field)} holds {len(factors)} factors, expected head_dim / 2 = {c.head_dim // 2}")
        wrong = next((f for f in factors if not positive_f32(f)), None)
        if wrong is not None:
            raise bad(f"{name(field)} must be positive float32s {F32_RANGE}, found {wrong}")


# the symmetric kinds' offset: w = scale * (q - OFFSET)
OFFSET = {"int4": 8, "int5": 16}


def unpack_levels(kind: str, data: np.ndarray) -> np.ndarray:
    """int4 or int5 data (the layouts above), uint32[rows, n] -> the values q, uint8[rows, cols_p]."""
    rows = data.shape[0]
    if kind == "int5":
        words = data.reshape(rows, -1, 5)
        high = (words[:, :, 4:] >> np.arange(32, dtype=np.uint32)) & 1        # [rows, blocks, 32]
        return unpack_levels("int4", words[:, :, :4].reshape(rows, -1)) | (high.astype(np.uint8).reshape(rows, -1) << 4)
    shifts = np.arange(8, dtype=np.uint32) * 4
    return ((data[:, :, None] >> shifts) & 0xF).astype(np.uint8).reshape(rows, -1)


@dataclass
class Tensor:
    """One weight matrix [rows, cols] in one of the formats above: f32, q8, int4 or int5."""
    kind: str
    rows: int
    cols: int
    data: np.ndarray
    scales: np.ndarray | None = None
    mins: np.ndarray | None = None      # asymmetric only
    group: int = 0                      # 0 for f32

    @property
    def cols_padded(self) -> int:
        return self.cols if self.kind == "f32" else round_up(self.cols, self.group)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scales, self.mins) if a is not None)

    def levels(self) -> np.ndarray:
        """An int4 or int5 tensor's values q, uint8[rows, cols_p] (before the - 8 or - 16 of the symmetric kind)."""
        return unpack_levels(self.kind, self.data)

    @staticmethod
    def f32(w: np.ndarray) -> "Tensor":
        w = np.ascontiguousarray(w, dtype=np.float32)
        return Tensor("f32", w.shape[0], w.shape[1], w)

    def take_rows(self, index: np.ndarray | slice) -> "Tensor":
        """The matrix of rows `index` of this one, in that order, in the same format (every array of a
        Tensor is row-major: a row's weights, scales and mins are row r of each); a slice's are views (a fused
        matrix's parts: Phi-3's attn_qkv, its ffn_up of gate and up)."""
        take = lambda a: None if a is None else np.ascontiguousarray(a[index])    # noqa: E731
        data = take(self.data)
        return Tensor(self.kind, data.shape[0], self.cols, data, take(self.scales), take(self.mins), self.group)

    def dequantize(self) -> np.ndarray:
        """float32[rows, cols]: the reference values the kernels must reproduce."""
        if self.kind == "f32":
            return self.data
        g = self.group
        if self.kind == "q8":
            q = self.data.astype(np.float32).reshape(self.rows, -1, g)
        elif self.kind in OFFSET:
            q = self.levels().reshape(self.rows, -1, g).astype(np.float32)
            if self.mins is None:
                q -= OFFSET[self.kind]
        else:
            raise ValueError(f"unknown tensor kind {self.kind!r}")
        w = self.scales.astype(np.float32)[:, :, None] * q
        if self.mins is not None:
            w += self.mins.astype(np.float32)[:, :, None]
        return np.ascontiguousarray(w.reshape(self.rows, -1)[:, :self.cols], dtype=np.float32)


# Largest weight magnitude a loader accepts. Real checkpoints stay below ~1e3 (fp16 ones cannot pass 65504);
# 3e38 is what a corrupted file holds. Below 2^32, a dot product of width n <= 2^24 over an RMS-normalised
# input (|x_i| <= sqrt(n) * max |norm weight| < 2^44) stays below n * 2^32 * 2^44 = 2^100, far from
# float32's 2^128, so no single projection of the model can overflow.
MAX_WEIGHT = 2.0 ** 32
# the stored floats of each kind, with the share of MAX_WEIGHT each may take: q8 w = s q (+ m), |q| <= 128, so
# |s| < 2^-8 and |m| < 2^-1; int4 w = s (q - 8) or s q + m, q <= 15, so |s| < 2^-5 and |m| < 2^-1 keep |w| below
# the bound; int5's q <= 31 takes |s| < 2^-6
_FLOATS = {"f32": (("weight", "data", 1),), "q8": (("scale", "scales", 256), ("min", "mins", 2)),
           "int4": (("scale", "scales", 32), ("min", "mins", 2)), "int5": (("scale", "scales", 64), ("min", "mins", 2))}


ACTIVATION_BITS = (16, 8)


# the KV cache's value types (llama.cpp's --cache-type-k/v names): fp16 by default, float32 for float32 math end to end
KV_TYPES = {"f16": np.float16, "f32": np.float32}


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_TYPES:
        raise DpllamaError(f"kv_cache must be one of {', '.join(KV_TYPES)}, found {kv_cache!r}")


def check_activation_bits(activation_bits: int) -> None:
    if activation_bits not in ACTIVATION_BITS:
        raise DpllamaError(f"activation bits must be one of {', '.join(map(str, ACTIVATION_BITS))}, "
                           f"found {activation_bits}")


def x_steps(kind: str, activation_bits: int = 16) -> int:
    """The steps per max|x| to which the matrix kernels round the input of a `kind` matrix, group by group
    (matrix.cl's header): 0 for float32 weights (not rounded), bytes (127) for int4 and int5 under
    `activation_bits` 8 (llama.cpp's numerics), else 16 bits (32767)."""
    check_activation_bits(activation_bits)
    return 0 if kind == "f32" else 127 if activation_bits == 8 and kind in ("int4", "int5") else 32767


def _within(a: np.ndarray, bound: float) -> bool:
    """Every |a| < bound: no NaN, no infinity (NaN fails every comparison)."""
    if a.dtype == np.float16:   # numpy's float16 min/max convert value by value, 50x slower than this:
        # IEEE magnitudes order as their bits with the sign cleared, NaNs above infinity
        return float(np.uint16((a.view(np.uint16) & 0x7FFF).max()).view(np.float16)) < bound
    return -bound < float(a.min()) <= float(a.max()) < bound


def check_values(source: str, name: str, t: Tensor | np.ndarray) -> None:
    """Raise DpllamaError unless every weight of `t` (a Tensor, or a norm vector) is finite and below
    MAX_WEIGHT in magnitude, checked on its stored floats (f32 weights, quantized scales and mins).
    Vectorised, one or two passes an array: measured 4 ms of SmolLM2-135M Q4_1's ~250 ms load (int4 scales and
    mins, the q8 embedding's scales, f32 norms), 0.2 ms of stories260K's 0.4 ms (all f32)."""
    parts = [(what, getattr(t, field), share) for what, field, share in _FLOATS[t.kind]] \
        if isinstance(t, Tensor) else [("weight", t, 1)]
    for what, a, share in parts:
        bound = MAX_WEIGHT / share
        if a is None or not a.size or _within(a, bound):
            continue
        at = np.unravel_index(np.argmax(~(np.abs(a.astype(np.float32)) < bound)), a.shape)
        raise DpllamaError(f"{source}: tensor {name} has {what} {float(a[at]):g} at {list(map(int, at))}: "
                           f"expected finite values below {bound:g} in magnitude")


# the weight matrices of a Layer, in the order of its fields (llama2.c's file order, quantize's report order)
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class Layer:
    attn_norm: np.ndarray   # float32[dim]
    wq: Tensor              # [n_heads * head_dim, dim]
    wk: Tensor              # [kv_dim, dim]
    wv: Tensor              # [kv_dim, dim]
    wo: Tensor              # [dim, n_heads * head_dim]
    ffn_norm: np.ndarray    # float32[dim]
    w1: Tensor              # gate [hidden_dim, dim]
    w2: Tensor              # down [dim, hidden_dim]
    w3: Tensor              # up   [hidden_dim, dim]
    bq: np.ndarray | None = None    # float32[n_heads * head_dim], added to q before RoPE (ModelConfig.qkv_bias)
    bk: np.ndarray | None = None    # float32[kv_dim]
    bv: np.ndarray | None = None    # float32[kv_dim]
    q_norm: np.ndarray | None = None    # float32[head_dim], each head of q RMS-normalized by it (ModelConfig.qk_norm)
    k_norm: np.ndarray | None = None    # float32[head_dim], each head of k's


@dataclass
class Weights:
    config: ModelConfig
    tok_embeddings: Tensor          # [vocab, dim], any format (matrix.cl's embed decodes every format)
    layers: list[Layer]
    norm: np.ndarray                # float32[dim], final RMSNorm
    output: Tensor                  # [vocab, dim]; `is tok_embeddings` when tied
    meta: dict = field(default_factory=dict)   # source file facts (format, tokenizer, chat template...)

    @property
    def tied(self) -> bool:
        return self.output is self.tok_embeddings

    def matrices(self):
        """(name, Tensor) for every weight matrix, in file order."""
        yield "tok_embeddings", self.tok_embeddings
        for i, layer in enumerate(self.layers):
            for name in MATRICES:
                yield f"layers.{i}.{name}", getattr(layer, name)
        if not self.tied:
            yield "output", self.output
