"""Weights from and to GGUF files (read and written by `dpllama.formats.gguf`): llama.cpp's models
(architecture "llama") and dpllama's own quantized container.

dpllama container (written by `write_dpllama_gguf`, version FORMAT_VERSION): a normal llama GGUF
(general.architecture = "llama", the standard llama.* hyperparameters and tokenizer.* keys, the standard
tensor names), so GGUF tools can inspect it, plus the key `dpllama.format` (uint32, the container version).
f32 matrices and all norms are plain F32 `<name>.weight` tensors. A quantized matrix `<name>` [rows, cols]
(e.g. blk.0.attn_q) with group g and cols_p = cols rounded up to a multiple of g is stored as
  - key `dpllama.kind.<name>` (string "q8" or "int4") and key `dpllama.group.<name>` (uint32 g)
  - q8:   `<name>.qweight` I8 [rows, cols_p], `<name>.scales` F32 [rows, cols_p / g]
  - int4: `<name>.qweight` I32 [rows, cols_p / 8] (the uint32 words of `Tensor.data`, bit for bit: GGUF
          has no unsigned 32-bit type), `<name>.scales` F16 (or F32, as a GGUF K-quant loads) [rows, cols_p / g]
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
from dpllama.model.weights import (Layer, ModelConfig, Tensor, Weights, check_config, check_values,
                                   layer_shapes)

# Layer field -> GGUF tensor name inside blk.N
GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                    "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                    "w3": "ffn_up"}
T = GGMLQuantizationType
# llama.cpp tensor types we convert, -> Tensor [rows, cols]; the quantized ones repacked, losslessly
_CONVERT = {
    T.F32: lambda raw, rows, cols: Tensor.f32(raw.view("<f4").reshape(rows, cols)),
    T.F16: lambda raw, rows, cols: Tensor.f32(raw.view("<f2").reshape(rows, cols)),
    T.BF16: lambda raw, rows, cols: Tensor.f32((raw.view("<u2").astype(np.uint32) << 16).view("<f4")
                                               .reshape(rows, cols)),
} | GGUF_REPACK
# container array types -> NumPy dtype of the view
_CONTAINER_DTYPES = {T.F32: "<f4", T.F16: "<f2", T.I8: "i1", T.I32: "<u4"}
# ModelConfig field -> the GGUF key it comes from, for messages
_CONFIG_KEYS = {"dim": "embedding_length", "hidden_dim": "feed_forward_length", "n_layers": "block_count",
                "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv",
                "seq_len": "context_length", "rope_theta": "rope.freq_base",
                "norm_eps": "attention.layer_norm_rms_epsilon"}


def _config(path: Path, fields: dict, vocab_size: int) -> ModelConfig:
    def get(key: str, default=None):
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise DpllamaError(f"{path}: missing GGUF metadata llama.{key}")
        if isinstance(value, list):
            raise DpllamaError(f"{path}: llama.{key} varies per layer, which dpllama does not support")
        return value

    n_heads = get("attention.head_count")
    c = ModelConfig(dim=get("embedding_length"), hidden_dim=get("feed_forward_length"),
                    n_layers=get("block_count"), n_heads=n_heads,
                    n_kv_heads=get("attention.head_count_kv", n_heads), vocab_size=vocab_size,
                    seq_len=get("context_length"), rope_theta=get("rope.freq_base", 10000.0),
                    norm_eps=get("attention.layer_norm_rms_epsilon"))
    check_config(c, f"{path}: GGUF metadata", {f: f"llama.{k}" for f, k in _CONFIG_KEYS.items()}
                 | {"vocab_size": "the rows of token_embd"})
    # Variants of the architecture this engine does not implement: refuse rather than compute garbage.
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if (value := get(key, c.head_dim)) != c.head_dim:
            raise DpllamaError(f"{path}: llama.{key} is {value}, expected head_dim {c.head_dim} "
                               f"(other values are not supported)")
    if (n := get("vocab_size", vocab_size)) != vocab_size:
        raise DpllamaError(f"{path}: llama.vocab_size is {n}, expected {vocab_size}, the rows of token_embd")
    if (scaling := get("rope.scaling.type", "none")) != "none":
        raise DpllamaError(f"{path}: RoPE scaling {scaling!r} is not supported")
    return c


def load_gguf(path: str | os.PathLike) -> Weights:
    """Load a llama GGUF (tensors of the types in _CONVERT, mixed as llama.cpp's _S/_M files mix them) or a
    dpllama container, memory-mapped.
    meta: format ("gguf" / "dpllama-gguf"), path, tokenizer_fields (every tokenizer.* key), chat_template."""
    path = Path(path)
    gguf = read_gguf(path)
    fields, tensors = gguf.fields, gguf.tensors
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise DpllamaError(f"{path}: unsupported GGUF architecture {arch!r} (expected 'llama')")
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
        if kind not in ("q8", "int4") or group <= 0 or (kind == "int4" and group % 8):
            raise DpllamaError(f"{path}: bad dpllama layout for {base}: kind {kind!r}, group {group}")
        cols_p = round_up(cols, group)
        groups = (rows, cols_p // group)
        data = array(f"{base}.qweight", (T.I8,), (rows, cols_p)) if kind == "q8" else \
            array(f"{base}.qweight", (T.I32,), (rows, cols_p // 8))
        scales = array(f"{base}.scales", (T.F32,) if kind == "q8" else (T.F16, T.F32), groups)
        scale_type = T.F32 if scales.dtype == np.float32 else T.F16
        mins = array(f"{base}.mins", (scale_type,), groups) if f"{base}.mins" in tensors else None
        t = Tensor(kind, rows, cols, data, scales=scales, mins=mins, group=group)
        check_values(str(path), base, t)
        return t

    def vector(base: str, n: int) -> np.ndarray:
        return convert(f"{base}.weight", 1, n, (n,)).dequantize()[0]

    def layer(i: int) -> Layer:
        parts = {}
        for field, shape in layer_shapes(c).items():
            base = f"blk.{i}.{GGUF_LAYER_NAMES[field]}"
            parts[field] = vector(base, *shape) if len(shape) == 1 else matrix(base, *shape)
        return Layer(**parts)

    embd = tensors.get(data_name("token_embd"))
    if embd is None:
        raise DpllamaError(f"{path}: missing tensor {data_name('token_embd')}")
    c = _config(path, fields, embd.shape[0])
    tok_embeddings = matrix("token_embd", c.vocab_size, c.dim)            # [vocab, dim], kept as stored
    # no output.weight: the classifier is tied to the embedding table
    tied = "output.weight" not in tensors and "dpllama.kind.output" not in fields
    output = tok_embeddings if tied else matrix("output", c.vocab_size, c.dim)   # [vocab, dim]
    norm = vector("output_norm", c.dim)                                          # [dim]
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
    w.add_tensor(f"{base}.qweight", np.ascontiguousarray(t.data).view(np.int32) if t.kind == "int4" else t.data)
    w.add_tensor(f"{base}.scales", np.ascontiguousarray(t.scales))        # in their type: loading is a view
    if t.mins is not None:
        w.add_tensor(f"{base}.mins", np.ascontiguousarray(t.mins))


def add_hyperparameters(w: GGUFWriter, c: ModelConfig) -> None:
    """The llama.* keys llama.cpp reads a model's shape from."""
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)


def write_dpllama_gguf(path: str | os.PathLike, weights: Weights, tokenizer_fields: dict) -> None:
    """Write `weights` in dpllama's GGUF container (module docstring), atomically, with the tokenizer.*
    fields (as in `load_gguf`'s meta["tokenizer_fields"]) so that the one file is the whole model."""
    c = weights.config
    with write_gguf(path) as w:
        w.add_uint32(FORMAT_KEY, FORMAT_VERSION)
        add_hyperparameters(w, c)
        for key, value in tokenizer_fields.items():
            add_field(w, key, value)
        _add_matrix(w, "token_embd", weights.tok_embeddings)
        w.add_tensor("output_norm.weight", np.asarray(weights.norm, np.float32))
        if not weights.tied:
            _add_matrix(w, "output", weights.output)
        for i, layer in enumerate(weights.layers):
            for field, shape in layer_shapes(c).items():
                base, value = f"blk.{i}.{GGUF_LAYER_NAMES[field]}", getattr(layer, field)
                if len(shape) == 1:
                    w.add_tensor(f"{base}.weight", np.asarray(value, np.float32))
                else:
                    _add_matrix(w, base, value)
