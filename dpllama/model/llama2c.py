"""Weights from and to llama2.c checkpoints (Karpathy's export.py): the header is `dpllama.formats.llama2c`'s;
here the tensors after it, listed in file order by `_layout`. Matrices are row-major [out, in].
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.formats import map_file
from dpllama.formats.llama2c import DIMS, Header, pack_header, read_header
from dpllama.model.quant import quantize_q8
from dpllama.model.weights import (MATRICES, Layer, ModelConfig, Tensor, Weights, check_config, check_values,
                                   layer_shapes, rope_angles)



def _layout(c: ModelConfig, version: int, shared: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, storage) of every array after the header, in file order. Names are Weights.matrices()
    names plus "norm", "layers.N.attn_norm" / "ffn_norm" and version 0's unused RoPE tables. Storage:
    "f32"; "q8" = int8[numel] then float32 scales [numel / group], one tensor (one layer) at a time."""
    shapes = layer_shapes(c)
    mat = "q8" if version == 2 else "f32"

    def per_layer(names, storage):   # name-major: every layer's wq, then every layer's wk, ...
        return [(f"layers.{i}.{n}", shapes[n], storage) for n in names for i in range(c.n_layers)]

    embedding = [("tok_embeddings", (c.vocab_size, c.dim), mat)]
    classifier = [] if shared else [("output", (c.vocab_size, c.dim), mat)]
    final_norm = [("norm", (c.dim,), "f32")]
    if version == 0:
        rope = (c.seq_len * c.head_dim // 2,)      # [seq_len, head_dim / 2], flattened: never a matrix
        return (embedding + per_layer(["attn_norm"], "f32") + per_layer(MATRICES[:4], "f32")
                + per_layer(["ffn_norm"], "f32") + per_layer(MATRICES[4:], "f32") + final_norm
                + [("freq_cis_real", rope, "f32"), ("freq_cis_imag", rope, "f32")] + classifier)
    return (per_layer(["attn_norm", "ffn_norm"], "f32") + final_norm + embedding
            + per_layer(MATRICES, mat) + classifier)


def _nbytes(shape: tuple[int, ...], storage: str, group: int) -> int:
    n = math.prod(shape)
    return 4 * n if storage == "f32" else n + 4 * (n // group)


def _read_header(path: Path, buf) -> tuple[Header, ModelConfig]:
    h = read_header(path, buf)
    config = ModelConfig(**h.dims)
    check_config(config, f"{path}: llama2.c header")
    return h, config


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A llama2.c checkpoint's config, from its header alone (for its tokenizer's vocabulary)."""
    path = Path(path)
    return _read_header(path, map_file(path))[1]


def load_llama2c(path: str | os.PathLike) -> Weights:
    """Memory-map a llama2.c checkpoint. f32 tensors are views into the map; nothing is read twice."""
    path = Path(path)
    buf = map_file(path)
    size = len(buf)
    h, c = _read_header(path, buf)
    version, shared, group, offset = h.version, h.shared, h.group, h.size
    # sized from one layer's layout: the whole one of a header that claims 2^31 layers would never be built
    expected = offset + sum(_nbytes(shape, storage, group) * (c.n_layers if name.startswith("layers.") else 1)
                            for name, shape, storage in _layout(dataclasses.replace(c, n_layers=1), version, shared))
    if size < expected:
        raise DpllamaError(f"{path}: truncated llama2.c checkpoint (version {version}): expected {expected} "
                           f"bytes from its header, found {size}")
    if size > expected:
        raise DpllamaError(f"{path}: llama2.c checkpoint (version {version}) has {size - expected} trailing "
                           f"bytes: expected {expected} bytes from its header, found {size}")
    layout = _layout(c, version, shared)

    arrays: dict[str, np.ndarray | Tensor] = {}
    for name, shape, storage in layout:
        n = math.prod(shape)
        if storage == "f32":
            a = np.frombuffer(buf, "<f4", n, offset).reshape(shape)
            arrays[name] = Tensor.f32(a) if len(shape) == 2 else a
        else:
            rows, cols = shape
            if cols % group:    # the file groups the flattened tensor; our q8 groups each row
                raise DpllamaError(f"{path}: {name} rows of {cols} are not a multiple of the Q8_0 group size "
                                   f"{group}")
            q = np.frombuffer(buf, np.int8, n, offset).reshape(rows, cols)
            scales = np.frombuffer(buf, "<f4", n // group, offset + n).reshape(rows, cols // group)
            arrays[name] = Tensor("q8", rows, cols, q, scales=scales, group=group)
        if not name.startswith("freq_cis"):     # version 0's RoPE tables go unused
            check_values(str(path), name, arrays[name])
        offset += _nbytes(shape, storage, group)

    layers = [Layer(**{f: arrays[f"layers.{i}.{f}"] for f in layer_shapes(c)}) for i in range(c.n_layers)]
    emb = arrays["tok_embeddings"]
    return Weights(c, emb, layers, arrays["norm"], emb if shared else arrays["output"],
                   meta={"format": "llama2c", "version": version, "path": str(path)})


def _default_group(c: ModelConfig) -> int:
    """Largest power of two <= 64 dividing every row length. Upstream export.py halves 64 until it divides
    dim only, which gives a broken file for stories260K (hidden_dim 172)."""
    group = 64
    while c.dim % group or c.hidden_dim % group:
        group //= 2
    return group


def _rope_tables(c: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Version 0's freq_cis_real / freq_cis_imag [seq_len, head_dim / 2]. run.c skips them; written with
    their true values for older readers that use them."""
    angles = rope_angles(np.arange(c.seq_len), c.head_dim, c.rope_theta)
    return np.cos(angles), np.sin(angles)


def write_llama2c(path: str | os.PathLike, weights: Weights, version: int = 0,
                  group_size: int | None = None) -> None:
    """Write `weights` as a llama2.c checkpoint, atomically. Versions 0 and 1 store float32 (every tensor
    dequantized); version 2 stores Q8_0 with `group_size` (default: the largest power of two <= 64 that
    divides dim and hidden_dim), reusing q8 tensors of that group as they are."""
    c = weights.config
    if version not in (0, 1, 2):
        raise DpllamaError(f"{path}: llama2.c checkpoint version must be 0, 1 or 2, found {version}")
    if (c.rope_neox, c.qkv_bias, c.qk_norm, c.key_length, c.rope_freq_factors, c.rope_long_factors,
            c.rope_mscale) != (False, False, False, 0, None, None, 1.0):
        raise DpllamaError(f"{path}: a llama2.c checkpoint cannot hold this {c.arch} model's NEOX RoPE, biases, "
                           f"heads' norms or width, or RoPE scaling: write a GGUF")
    group = (group_size or _default_group(c)) if version == 2 else 0
    shared = weights.tied
    arrays: dict[str, np.ndarray | Tensor] = dict(weights.matrices())
    arrays["norm"] = weights.norm
    for i, layer in enumerate(weights.layers):
        arrays[f"layers.{i}.attn_norm"], arrays[f"layers.{i}.ffn_norm"] = layer.attn_norm, layer.ffn_norm
    arrays["freq_cis_real"], arrays["freq_cis_imag"] = _rope_tables(c)

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(pack_header(Header(version, {k: getattr(c, k) for k in DIMS}, shared, group)))
        for name, shape, storage in _layout(c, version, shared):
            a = arrays[name]
            if storage == "f32":
                np.ascontiguousarray(a.dequantize() if isinstance(a, Tensor) else a, "<f4").tofile(f)
                continue
            if a.cols % group:
                raise DpllamaError(f"{path}: {name} rows of {a.cols} are not a multiple of the Q8_0 group size "
                                   f"{group}")
            t = a if a.kind == "q8" and a.group == group else quantize_q8(a.dequantize(), group)
            t.data.astype(np.int8).tofile(f)
            t.scales.astype("<f4").tofile(f)
