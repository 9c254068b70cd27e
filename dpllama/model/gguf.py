"""Weights from and to GGUF files (read and written by `dpllama.formats.gguf`): llama.cpp's models
(architectures "llama", "qwen2", "qwen3" and "phi3", ARCHITECTURES) and dpllama's own quantized container.

dpllama container (written by `write_dpllama_gguf`, version FORMAT_VERSION): a normal GGUF of the model's
architecture (general.architecture, the standard <arch>.* hyperparameters and tokenizer.* keys, the standard
tensor names), so GGUF tools can inspect it, plus the key `dpllama.format` (uint32, the container version).
f32 matrices, all norms and biases and rope_freqs.weight are plain F32 tensors, as llama.cpp names them.
A quantized matrix `<name>` [rows, cols]
(e.g. blk.0.attn_q) with group g and cols_p = cols rounded up to a multiple of g is stored as
  - key `dpllama.kind.<name>` (string "q8", "int4" or "int5") and key `dpllama.group.<name>` (uint32 g)
  - q8:   `<name>.qweight` I8 [rows, cols_p], `<name>.scales` F32 [rows, cols_p / g]
  - int4: `<name>.qweight` I32 [rows, cols_p / 8] (the uint32 words of `Tensor.data`, bit for bit: GGUF
          has no unsigned 32-bit type), `<name>.scales` F16 (or F32, as a GGUF K-quant loads) [rows, cols_p / g]
  - int5: as int4, with `<name>.qweight` I32 [rows, cols_p / 32 * 5] (g a multiple of 32)
  - asymmetric only, `<name>.mins` [rows, cols_p / g] of the scales' type
exactly the arrays of `dpllama.model.weights.Tensor`, so loading is a view, not a conversion.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from dpllama.errors import DpllamaError
from dpllama.formats import round_up
from dpllama.formats.gguf import FORMAT_KEY, FORMAT_VERSION, RawTensor, add_field, read_gguf, write_gguf
from dpllama.model.quant import GGUF_REPACK
from dpllama.model.weights import (F32_RANGE, Layer, ModelConfig, Tensor, Weights, check_config, check_values,
                                   layer_shapes, llama3_rope_factors, positive_f32, yarn_rope)

# Layer field -> GGUF tensor name inside blk.N, less its suffix (layer_tensor_name adds it)
GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                    "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                    "w3": "ffn_up", "bq": "attn_q", "bk": "attn_k", "bv": "attn_v", "q_norm": "attn_q_norm",
                    "k_norm": "attn_k_norm"}
BIASES = ("bq", "bk", "bv")
# general.architecture -> what it changes in ModelConfig (docs/ARCHITECTURE.md, "Architectures"). qwen2 is
# llama with Q/K/V biases and NEOX RoPE; llama.cpp's llama takes Q/K/V biases too where a file has them. qwen3
# is qwen2 without the biases, with each head of q and k RMS-normalized before RoPE. phi3 is llama with NEOX RoPE,
# its Q, K and V in one matrix and its gate and up in another (FUSED), and LongRoPE (rope_factors_long/short).
ARCHITECTURES = {"llama": dict(rope_neox=False), "qwen2": dict(rope_neox=True, qkv_bias=True),
                 "qwen3": dict(rope_neox=True, qk_norm=True), "phi3": dict(rope_neox=True)}
# a fused matrix of a block -> the Layer fields whose rows it stacks, in order: Phi-3's, as llama.cpp reads them
# (a file may also hold them apart, as dpllama's container writes them)
FUSED = {"attn_qkv": ("wq", "wk", "wv"), "ffn_up": ("w1", "w3")}
ROPE_LONG, ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"    # LongRoPE's divisors
# the metadata of Llama 3.1's RoPE scaling (rope.scaling.type "llama3"), llama3_rope_factors' parameters in order
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
ROPE_FREQS = "rope_freqs.weight"    # llama.cpp's per-frequency RoPE divisors (Llama 3.1's scaling)
T = GGMLQuantizationType
# llama.cpp tensor types we convert, -> Tensor [rows, cols]; the quantized ones repacked, losslessly
_CONVERT = {
    T.F32: lambda raw, rows, cols: Tensor.f32(raw.view("<f4").reshape(rows, cols)),
    T.F16: lambda raw, rows, cols: Tensor.f32(raw.view("<f2").reshape(rows, cols)),
    T.BF16: lambda raw, rows, cols: Tensor.f32((raw.view("<u2").astype(np.uint32) << 16).view("<f4")
                                               .reshape(rows, cols)),
} | GGUF_REPACK
# quantized container kinds -> the multiple their group must be, and their qweight's width for cols_p columns
_QUANTIZED = {"q8": (1, lambda cols_p: cols_p), "int4": (8, lambda cols_p: cols_p // 8),
              "int5": (32, lambda cols_p: cols_p // 32 * 5)}
# container array types -> NumPy dtype of the view
_CONTAINER_DTYPES = {T.F32: "<f4", T.F16: "<f2", T.I8: "i1", T.I32: "<u4"}
# ModelConfig field -> the GGUF key it comes from, for messages
_CONFIG_KEYS = {"dim": "embedding_length", "hidden_dim": "feed_forward_length", "n_layers": "block_count",
                "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv",
                "key_length": "attention.key_length",
                "seq_len": "context_length", "rope_theta": "rope.freq_base",
                "norm_eps": "attention.layer_norm_rms_epsilon"}


def _config(path: Path, fields: dict, vocab_size: int, arch: str, qkv_bias: bool) -> ModelConfig:
    def get(key: str, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise DpllamaError(f"{path}: missing GGUF metadata {arch}.{key}")
        if isinstance(value, list):
            raise DpllamaError(f"{path}: {arch}.{key} varies per layer, which dpllama does not support")
        return value

    n_heads, dim = get("attention.head_count"), get("embedding_length")
    # a head's width: dim / n_heads unless attention.key_length says otherwise (Qwen3 0.6B and 4B, Mistral Nemo)
    key_length = get("attention.key_length", 0)
    c = ModelConfig(dim=dim, hidden_dim=get("feed_forward_length"),
                    n_layers=get("block_count"), n_heads=n_heads,
                    n_kv_heads=get("attention.head_count_kv", n_heads), vocab_size=vocab_size,
                    seq_len=get("context_length"), rope_theta=get("rope.freq_base", 10000.0),
                    norm_eps=get("attention.layer_norm_rms_epsilon"), arch=arch,
                    key_length=0 if key_length * n_heads == dim else key_length,
                    **{"qkv_bias": qkv_bias, **ARCHITECTURES[arch]})
    check_config(c, f"{path}: GGUF metadata", {f: f"{arch}.{k}" for f, k in _CONFIG_KEYS.items()}
                 | {"vocab_size": "the rows of token_embd"})
    # Variants of the architecture this engine does not implement: refuse rather than compute garbage.
    for key in ("rope.dimension_count", "attention.value_length"):
        if (value := get(key, c.head_dim)) != c.head_dim:
            raise DpllamaError(f"{path}: {arch}.{key} is {value}, expected head_dim {c.head_dim} "
                               f"(other values are not supported)")
    if (n := get("vocab_size", vocab_size)) != vocab_size:
        raise DpllamaError(f"{path}: {arch}.vocab_size is {n}, expected {vocab_size}, the rows of token_embd")
    if (experts := get("expert_count", 0)) > 0:     # Mixtral: a llama whose FFN is a mixture of experts
        raise DpllamaError(f"{path}: {arch}.expert_count is {experts}: mixture-of-experts models are not supported")
    # RoPE scaling as llama.cpp reads it for these architectures: a type (linear when none is given), a factor
    # (rope.scale_linear, its older name; 0 or 1: none), and attn_factor, which multiplies cos and sin whatever the
    # type; "llama3" with its parameters is dpllama's reading of Llama 3.1's Hugging Face config
    scaling = get("rope.scaling.type", "linear")
    factor = get("rope.scaling.factor", get("rope.scale_linear", 0.0))
    if scaling in ("llama3", "linear", "yarn") and factor not in (0, 1) and not positive_f32(factor):
        # it divides float32 frequencies, as check_config's factors (NaN fails too)
        raise DpllamaError(f"{path}: {arch}.rope.scaling.factor must be a positive float32 {F32_RANGE}, found "
                           f"{factor}")
    if scaling == "llama3":     # Llama 3.1's scaling given as its parameters rather than as rope_freqs.weight
        params = [get(f"rope.scaling.{k}") for k in LLAMA3_SCALING]
        factor, low, high, original = params
        if not (factor > 0 and 0 < low < high and original > 0):      # NaN fails too
            raise DpllamaError(f"{path}: {arch}.rope.scaling.{{{','.join(LLAMA3_SCALING)}}} are {params}: expected "
                               f"factor > 0, 0 < low_freq_factor < high_freq_factor, original_context_length > 0")
        c.rope_freq_factors = llama3_rope_factors(c.head_dim, c.rope_theta, *params)
    elif scaling == "linear" and factor not in (0, 1):
        c.rope_freq_factors = (float(np.float32(factor)),) * (c.head_dim // 2)
    elif scaling == "yarn" and factor not in (0, 1):
        original = original_context(path, fields, arch, c.seq_len)
        c.rope_freq_factors, c.rope_mscale = yarn_rope(c.head_dim, c.rope_theta, factor, original)
    elif scaling not in ("none", "linear", "yarn", "longrope"):     # longrope's factors are tensors: load_gguf's
        raise DpllamaError(f"{path}: {arch}.rope.scaling.type is {scaling!r}, expected 'none', 'linear', 'yarn', "
                           f"'llama3' or 'longrope' (other RoPE scalings are not supported)")
    attn_factor = get("rope.scaling.attn_factor", 1.0)
    if not positive_f32(attn_factor):
        raise DpllamaError(f"{path}: {arch}.rope.scaling.attn_factor must be a positive float32 {F32_RANGE}, found "
                           f"{attn_factor}")
    c.rope_mscale = float(np.float32(c.rope_mscale * attn_factor))
    return c


def original_context(path: Path, fields: dict, arch: str, default: int) -> int:
    """rope.scaling.original_context_length, the context a scaling (YaRN's, LongRoPE's) was trained for."""
    original = fields.get(f"{arch}.rope.scaling.original_context_length", default)
    if not original > 0:
        raise DpllamaError(f"{path}: {arch}.rope.scaling.original_context_length must be positive, found {original}")
    return original


def layer_tensor_name(i: int, field: str) -> str:
    """The GGUF tensor of Layer field `field` in block i, as llama.cpp names it."""
    return f"blk.{i}.{GGUF_LAYER_NAMES[field]}.{'bias' if field in BIASES else 'weight'}"


def load_gguf(path: str | os.PathLike) -> Weights:
    """Load a llama GGUF (tensors of the types in _CONVERT, mixed as llama.cpp's _S/_M files mix them) or a
    dpllama container, memory-mapped.
    meta: format ("gguf" / "dpllama-gguf"), path, tokenizer_fields (every tokenizer.* key), chat_template."""
    path = Path(path)
    gguf = read_gguf(path)
    fields, tensors = gguf.fields, gguf.tensors
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise DpllamaError(f"{path}: unsupported GGUF architecture {arch!r} (supported: "
                           f"{', '.join(ARCHITECTURES)})")
    container = fields.get(FORMAT_KEY)
    if container not in (None, FORMAT_VERSION):
        raise DpllamaError(f"{path}: dpllama container version {container!r} is not supported "
                           f"(expected {FORMAT_VERSION})")
    unused = set(tensors)

    def data_name(base: str) -> str:
        return f"{base}.qweight" if f"dpllama.kind.{base}" in fields else f"{base}.weight"

    def raw(name: str, shape: tuple[int, ...]) -> RawTensor:
        t = tensors.get(name)
        if t is None:
            raise DpllamaError(f"{path}: missing tensor {name}")
        if t.shape != shape:
            raise DpllamaError(f"{path}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        unused.discard(name)
        return t

    def array(name: str, ggml_types: tuple[GGMLQuantizationType, ...], shape: tuple[int, int]) -> np.ndarray:
        t = raw(name, shape)
        if t.type not in ggml_types:
            raise DpllamaError(f"{path}: tensor {name} has type {t.type.name}, expected "
                               f"{' or '.join(k.name for k in ggml_types)}")
        return t.data.view(_CONTAINER_DTYPES[t.type]).reshape(shape)

    def convert(name: str, rows: int, cols: int, shape: tuple[int, ...]) -> Tensor:
        t = raw(name, shape)
        if t.type not in _CONVERT:
            raise DpllamaError(f"{path}: tensor {name} has type {t.type.name}, which dpllama does not support "
                               f"(supported: {', '.join(k.name for k in _CONVERT)})")
        converted = _CONVERT[t.type](t.data, rows, cols)
        check_values(str(path), name, converted)
        return converted

    def matrix(base: str, rows: int, cols: int) -> Tensor:
        kind = fields.get(f"dpllama.kind.{base}")
        if kind is None:
            return convert(f"{base}.weight", rows, cols, (rows, cols))
        group = fields.get(f"dpllama.group.{base}", 0)
        if kind not in _QUANTIZED or group <= 0 or group % _QUANTIZED[kind][0]:
            raise DpllamaError(f"{path}: bad dpllama layout for {base}: kind {kind!r}, group {group}")
        cols_p = round_up(cols, group)
        groups = (rows, cols_p // group)
        data = array(f"{base}.qweight", (T.I8,) if kind == "q8" else (T.I32,),
                     (rows, _QUANTIZED[kind][1](cols_p)))
        scales = array(f"{base}.scales", (T.F32,) if kind == "q8" else (T.F16, T.F32), groups)
        scale_type = T.F32 if scales.dtype == np.float32 else T.F16
        mins = array(f"{base}.mins", (scale_type,), groups) if f"{base}.mins" in tensors else None
        t = Tensor(kind, rows, cols, data, scales=scales, mins=mins, group=group)
        check_values(str(path), base, t)
        return t

    def vector(name: str, n: int) -> np.ndarray:
        return convert(name, 1, n, (n,)).dequantize()[0]

    def fused(i: int) -> dict[str, Tensor]:
        """Block i's matrices that the file fuses (FUSED), split into their Layer fields' rows: attn_qkv where the
        block has no attn_q, ffn_up where it has no ffn_gate (Phi-3's fused up is [gate; up])."""
        shapes, parts = layer_shapes(c), {}
        for name, members in FUSED.items():
            apart = GGUF_LAYER_NAMES[members[0]]
            if arch != "phi3" or f"blk.{i}.{apart}.weight" in tensors or f"dpllama.kind.blk.{i}.{apart}" in fields:
                continue
            rows = [shapes[f][0] for f in members]
            whole = matrix(f"blk.{i}.{name}", sum(rows), c.dim)
            starts = np.cumsum([0] + rows)
            parts.update({f: whole.take_rows(slice(a, b)) for f, a, b in zip(members, starts, starts[1:])})
        return parts

    def layer(i: int) -> Layer:
        parts = fused(i)
        for field, shape in layer_shapes(c).items():
            if field not in parts:
                parts[field] = (vector(layer_tensor_name(i, field), *shape) if len(shape) == 1
                                else matrix(f"blk.{i}.{GGUF_LAYER_NAMES[field]}", *shape))
        return Layer(**parts)

    embd = tensors.get(data_name("token_embd"))
    if embd is None:
        raise DpllamaError(f"{path}: missing tensor {data_name('token_embd')}")
    c = _config(path, fields, embd.shape[0], arch, "blk.0.attn_q.bias" in tensors)
    if ROPE_FREQS in tensors:
        if c.rope_freq_factors is not None:
            raise DpllamaError(f"{path}: RoPE scaling given twice, by {ROPE_FREQS} and by {arch}.rope.scaling.type: "
                               f"expected one")
        c.rope_freq_factors = tuple(vector(ROPE_FREQS, c.head_dim // 2).tolist())
        check_config(c, str(path), {"rope_freq_factors": ROPE_FREQS})
    if ROPE_LONG in tensors or ROPE_SHORT in tensors:     # LongRoPE: llama.cpp's choice by the context it runs with
        if c.rope_freq_factors is not None:
            raise DpllamaError(f"{path}: RoPE scaling given twice, by {ROPE_LONG} and by {ROPE_FREQS} or "
                               f"{arch}.rope.scaling.type: expected one")
        c.rope_freq_factors = tuple(vector(ROPE_SHORT, c.head_dim // 2).tolist())
        c.rope_long_factors = tuple(vector(ROPE_LONG, c.head_dim // 2).tolist())
        c.rope_long_from = original_context(path, fields, arch, c.seq_len)
        check_config(c, str(path), {"rope_freq_factors": ROPE_SHORT, "rope_long_factors": ROPE_LONG})
    elif fields.get(f"{arch}.rope.scaling.type") == "longrope":
        raise DpllamaError(f"{path}: {arch}.rope.scaling.type is 'longrope', whose factors are the tensors "
                           f"{ROPE_LONG} and {ROPE_SHORT}: missing")
    tok_embeddings = matrix("token_embd", c.vocab_size, c.dim)            # [vocab, dim], kept as stored
    # no output.weight: the classifier is tied to the embedding table
    tied = "output.weight" not in tensors and "dpllama.kind.output" not in fields
    output = tok_embeddings if tied else matrix("output", c.vocab_size, c.dim)   # [vocab, dim]
    norm = vector("output_norm.weight", c.dim)                                        # [dim]
    layers = [layer(i) for i in range(c.n_layers)]
    if unused:
        raise DpllamaError(f"{path}: unexpected tensor {sorted(unused)[0]} ({len(unused)} in all): a model "
                           f"feature dpllama does not implement")
    tokenizer_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    return Weights(c, tok_embeddings, layers, norm, output,
                   meta={"format": "gguf" if container is None else "dpllama-gguf", "path": str(path),
                         "tokenizer_fields": tokenizer_fields,
                         "chat_template": tokenizer_fields.get("tokenizer.chat_template")})


def _add_matrix(w: GGUFWriter, base: str, t: Tensor) -> None:
    if t.kind == "f32":
        w.add_tensor(f"{base}.weight", np.ascontiguousarray(t.data, np.float32))
        return
    w.add_string(f"dpllama.kind.{base}", t.kind)
    w.add_uint32(f"dpllama.group.{base}", t.group)
    w.add_tensor(f"{base}.qweight", t.data if t.kind == "q8" else np.ascontiguousarray(t.data).view(np.int32))
    w.add_tensor(f"{base}.scales", np.ascontiguousarray(t.scales))        # in their type: loading is a view
    if t.mins is not None:
        w.add_tensor(f"{base}.mins", np.ascontiguousarray(t.mins))


def add_hyperparameters(w: GGUFWriter, c: ModelConfig) -> None:
    """The <arch>.* keys llama.cpp reads a model's shape from (w's architecture: c.arch's, from write_gguf);
    a RoPE scaling is the tensor ROPE_FREQS, which the caller writes, and its magnitude attn_factor."""
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    if c.key_length:
        w.add_key_length(c.key_length)
        w.add_value_length(c.key_length)
    w.add_rope_freq_base(c.rope_theta)
    if c.rope_mscale != 1:      # YaRN's magnitude, its frequencies being the caller's ROPE_FREQS
        w.add_rope_scaling_attn_factors(c.rope_mscale)
    if c.rope_long_factors is not None:
        w.add_rope_scaling_orig_ctx_len(c.rope_long_from)
    w.add_layer_norm_rms_eps(c.norm_eps)


def rope_tensors(c: ModelConfig) -> dict[str, np.ndarray]:
    """The tensors a RoPE scaling is written as, as llama.cpp reads them: ROPE_FREQS, or LongRoPE's two."""
    def f32(factors) -> np.ndarray:
        return np.asarray(factors if factors is not None else np.ones(c.head_dim // 2), np.float32)
    if c.rope_long_factors is not None:
        return {ROPE_SHORT: f32(c.rope_freq_factors), ROPE_LONG: f32(c.rope_long_factors)}
    return {} if c.rope_freq_factors is None else {ROPE_FREQS: f32(c.rope_freq_factors)}


def write_dpllama_gguf(path: str | os.PathLike, weights: Weights, tokenizer_fields: dict) -> None:
    """Write `weights` in dpllama's GGUF container (module docstring), atomically, with the tokenizer.*
    fields (as in `load_gguf`'s meta["tokenizer_fields"]) so that the one file is the whole model."""
    c = weights.config
    with write_gguf(path, c.arch) as w:
        w.add_uint32(FORMAT_KEY, FORMAT_VERSION)
        add_hyperparameters(w, c)
        for key, value in tokenizer_fields.items():
            add_field(w, key, value)
        _add_matrix(w, "token_embd", weights.tok_embeddings)
        w.add_tensor("output_norm.weight", np.asarray(weights.norm, np.float32))
        for name, factors in rope_tensors(c).items():
            w.add_tensor(name, factors)
        if not weights.tied:
            _add_matrix(w, "output", weights.output)
        for i, layer in enumerate(weights.layers):
            for field, shape in layer_shapes(c).items():
                value = getattr(layer, field)
                if len(shape) == 1:
                    w.add_tensor(layer_tensor_name(i, field), np.asarray(value, np.float32))
                else:
                    _add_matrix(w, f"blk.{i}.{GGUF_LAYER_NAMES[field]}", value)
