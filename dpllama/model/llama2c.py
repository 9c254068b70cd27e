"""llama2.c checkpoints (Karpathy's export.py): legacy version 0, version 1 (fp32) and version 2 (Q8_0).

All little-endian. Version 0 header: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len), a negative vocab_size meaning an unshared classifier. Versions 1 and 2: uint32 magic
"ak42", int32 version, the same 7 int32 (vocab_size positive), uint8 shared_classifier, version 2 an int32
group size (unaligned, at byte 37), zero padding to 256 bytes. The tensors that follow are listed, in
file order, by `_layout`; matrices are row-major [out, in].
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.model.quant import quantize_q8
from dpllama.model.weights import (MATRICES, Layer, ModelConfig, Tensor, Weights, check_config, check_values,
                                   layer_shapes)

MAGIC = 0x616B3432      # "ak42" read as a little-endian uint32
HEADER_BYTES = 256      # versions 1 and 2
LEGACY_HEADER = struct.Struct("<7i")


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


def _read_header(path: Path, buf) -> tuple[int, ModelConfig, bool, int, int]:
    """-> (version, config, shared classifier, group size (version 2, else 0), header bytes)."""
    def need(n: int) -> None:
        if len(buf) < n:
            raise DpllamaError(f"{path}: truncated llama2.c checkpoint: expected at least {n} bytes, "
                               f"found {len(buf)}")

    need(4)
    if buf[:4] == b"GGUF":
        raise DpllamaError(f"{path}: this is a GGUF file, not a llama2.c checkpoint")
    need(LEGACY_HEADER.size)
    if struct.unpack_from("<I", buf, 0)[0] == MAGIC:
        version = struct.unpack_from("<i", buf, 4)[0]
        if version not in (1, 2):
            raise DpllamaError(f"{path}: unknown llama2.c checkpoint version {version} (expected 1 or 2)")
        need(HEADER_BYTES)
        params = LEGACY_HEADER.unpack_from(buf, 8)
        shared = buf[36]
        if shared not in (0, 1):
            raise DpllamaError(f"{path}: bad shared_classifier flag {shared} (expected 0 or 1)")
        group = struct.unpack_from("<i", buf, 37)[0] if version == 2 else 0
        if version == 2 and group <= 0:
            raise DpllamaError(f"{path}: bad group size {group} (expected a positive int)")
        header = HEADER_BYTES
    else:
        version, params, group, header = 0, LEGACY_HEADER.unpack_from(buf, 0), 0, LEGACY_HEADER.size
        shared = params[5] > 0          # legacy: negative vocab_size = unshared classifier
        params = params[:5] + (abs(params[5]),) + params[6:]
    config = ModelConfig(*params)
    check_config(config, f"{path}: llama2.c header")
    return version, config, bool(shared), group, header


def map_file(path: Path):
    """The whole file, memory-mapped read-only (b"" when empty: an empty file cannot be mapped)."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except OSError as e:
        raise DpllamaError(f"{path}: cannot read: {e.strerror}") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A llama2.c checkpoint's config, from its header alone (for its tokenizer's vocabulary)."""
    path = Path(path)
    return _read_header(path, map_file(path))[1]


def load_llama2c(path: str | os.PathLike) -> Weights:
    """Memory-map a llama2.c checkpoint. f32 tensors are views into the map; nothing is read twice."""
    path = Path(path)
    buf = map_file(path)
    size = len(buf)
    version, c, shared, group, offset = _read_header(path, buf)
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
    f32 = np.float32     # float32 throughout, as export.py computes them in torch
    inv_freq = f32(1) / f32(c.rope_theta) ** (np.arange(0, c.head_dim, 2, dtype=f32) / f32(c.head_dim))
    angles = np.outer(np.arange(c.seq_len, dtype=f32), inv_freq)
    return np.cos(angles), np.sin(angles)


def write_llama2c(path: str | os.PathLike, weights: Weights, version: int = 0,
                  group_size: int | None = None) -> None:
    """Write `weights` as a llama2.c checkpoint, atomically. Versions 0 and 1 store float32 (every tensor
    dequantized); version 2 stores Q8_0 with `group_size` (default: the largest power of two <= 64 that
    divides dim and hidden_dim), reusing q8 tensors of that group as they are."""
    c = weights.config
    if version not in (0, 1, 2):
        raise DpllamaError(f"{path}: llama2.c checkpoint version must be 0, 1 or 2, found {version}")
    group = (group_size or _default_group(c)) if version == 2 else 0
    shared = weights.tied
    arrays: dict[str, np.ndarray | Tensor] = dict(weights.matrices())
    arrays["norm"] = weights.norm
    for i, layer in enumerate(weights.layers):
        arrays[f"layers.{i}.attn_norm"], arrays[f"layers.{i}.ffn_norm"] = layer.attn_norm, layer.ffn_norm
    arrays["freq_cis_real"], arrays["freq_cis_imag"] = _rope_tables(c)

    params = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len)
    if version == 0:
        header = LEGACY_HEADER.pack(*params[:5], c.vocab_size if shared else -c.vocab_size, c.seq_len)
    else:
        header = struct.pack("<Ii7iB", MAGIC, version, *params, shared)
        header += struct.pack("<i", group) if version == 2 else b""
        header = header.ljust(HEADER_BYTES, b"\0")

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
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
