"""GGUF models: llama.cpp's files (architecture "llama") and dpllama's own quantized container.

The header is parsed here rather than with gguf.GGUFReader: that reader builds NumPy views for every
string of the vocabulary and takes ~2.5 s on SmolLM2-135M's header alone; this parser takes ~0.1 s.
Tensor data is never copied by the parser: each tensor is a uint8 view into the memory map.

dpllama container (written by `write_dpllama_gguf`, version FORMAT_VERSION): a normal llama GGUF
(general.architecture = "llama", the standard llama.* hyperparameters and tokenizer.* keys, the standard
tensor names), so GGUF tools can inspect it, plus the key `dpllama.format` (uint32, the container version).
f32 matrices and all norms are plain F32 `<name>.weight` tensors. A quantized matrix `<name>` [rows, cols]
(e.g. blk.0.attn_q) with group g and cols_p = cols rounded up to a multiple of g is stored as
  - key `dpllama.kind.<name>` (string "q8" or "int4") and key `dpllama.group.<name>` (uint32 g)
  - q8:   `<name>.qweight` I8 [rows, cols_p], `<name>.scales` F32 [rows, cols_p / g]
  - int4: `<name>.qweight` I32 [rows, cols_p / 8] (the uint32 words of `Tensor.data`, bit for bit: GGUF
          has no unsigned 32-bit type), `<name>.scales` F16 [rows, cols_p / g], and, asymmetric only,
          `<name>.mins` F16 [rows, cols_p / g]
exactly the arrays of `dpllama.model.weights.Tensor`, so loading is a view, not a conversion.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.model.llama2c import map_file
from dpllama.model.quant import q8_0_from_gguf, repack_q4_0, repack_q4_1
from dpllama.model.weights import (Layer, ModelConfig, Tensor, Weights, check_config, check_values,
                                   layer_shapes)

FORMAT_KEY = "dpllama.format"
FORMAT_VERSION = 1
GGUF_ALIGNMENT = 32     # default of general.alignment
# Layer field -> GGUF tensor name inside blk.N
GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                    "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                    "w3": "ffn_up"}
T = GGMLQuantizationType
# struct codes of GGUF's scalar metadata types
_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
           GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
           GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
           GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
# llama.cpp tensor types we convert, -> Tensor [rows, cols]
_CONVERT = {
    T.F32: lambda raw, rows, cols: Tensor.f32(raw.view("<f4").reshape(rows, cols)),
    T.F16: lambda raw, rows, cols: Tensor.f32(raw.view("<f2").reshape(rows, cols)),
    T.BF16: lambda raw, rows, cols: Tensor.f32((raw.view("<u2").astype(np.uint32) << 16).view("<f4")
                                               .reshape(rows, cols)),
    T.Q8_0: q8_0_from_gguf,
    T.Q4_0: repack_q4_0,
    T.Q4_1: repack_q4_1,
}
# container array types -> NumPy dtype of the view
_CONTAINER_DTYPES = {T.F32: "<f4", T.F16: "<f2", T.I8: "i1", T.I32: "<u4"}


@dataclass
class RawTensor:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]      # NumPy order, (rows, cols): GGUF lists dimensions innermost first
    data: np.ndarray            # uint8 bytes, a view into the memory map


@dataclass
class GGUFFile:
    fields: dict            # metadata key -> Python value (str, int, float, bool, or a list of those)
    tensors: dict           # name -> RawTensor


# GGUF value types by the Python kind they parse to, for the metadata checks
V = GGUFValueType
_KINDS = {**dict.fromkeys((V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64), "int"),
          V.FLOAT32: "float", V.FLOAT64: "float", V.BOOL: "bool", V.STRING: "str"}
# The kinds of the metadata dpllama reads ("[int]": an array of ints), as llama.cpp writes them: another
# type is refused at parse time rather than failing later in an int() or a comparison. Keys that may vary
# per layer may be arrays (`_config` refuses those by name); "*" ends a prefix.
_INT_OR_PER_LAYER = ("int", "[int]")
KEY_KINDS = {
    "general.architecture": ("str",), "general.alignment": ("int",),
    **dict.fromkeys([f"llama.{k}" for k in ("vocab_size", "context_length", "embedding_length", "block_count",
                                            "rope.dimension_count", "attention.key_length",
                                            "attention.value_length")], ("int",)),
    **dict.fromkeys([f"llama.{k}" for k in ("feed_forward_length", "attention.head_count",
                                            "attention.head_count_kv")], _INT_OR_PER_LAYER),
    "llama.rope.freq_base": ("float",), "llama.attention.layer_norm_rms_epsilon": ("float",),
    "llama.rope.scaling.type": ("str",),
    FORMAT_KEY: ("int",), "dpllama.kind.*": ("str",), "dpllama.group.*": ("int",),
    "tokenizer.ggml.model": ("str",), "tokenizer.ggml.pre": ("str",), "tokenizer.ggml.tokens": ("[str]",),
    "tokenizer.ggml.scores": ("[float]",), "tokenizer.ggml.token_type": ("[int]",),
    "tokenizer.ggml.merges": ("[str]",), "tokenizer.chat_template": ("str",),
    **dict.fromkeys([f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "unknown", "eot", "eom")], ("int",)),
    **dict.fromkeys([f"tokenizer.ggml.{k}" for k in ("add_bos_token", "add_space_prefix")], ("bool",)),
}
GGML_MAX_DIMS = 4


class _Cursor:
    """Little-endian reads from the mapped file; reading past its end means the file is truncated."""

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def skip_to(self, end: int, what: str) -> int:
        if end > len(self.buf):
            raise DpllamaError(f"{self.path}: truncated GGUF file: {what} needs {end} bytes, found {len(self.buf)}")
        start, self.pos = self.pos, end
        return start

    def unpack(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        return struct.unpack_from(fmt, self.buf, self.skip_to(self.pos + struct.calcsize(fmt), "header"))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        start = self.skip_to(self.pos + n, "header")
        return self.buf[start:self.pos].decode("utf-8")

    def value(self, vtype: int) -> tuple:
        """-> (value, its kind: a _KINDS value, or one in brackets for an array)."""
        if vtype == V.ARRAY:
            item, n = self.unpack("IQ")
            if item == V.STRING:
                return [self.string() for _ in range(n)], "[str]"
            if item not in _SCALAR:
                raise ValueError(f"unsupported metadata array item type {item}")
            dtype = np.dtype("<" + _SCALAR[item])
            start = self.skip_to(self.pos + n * dtype.itemsize, "header")
            return np.frombuffer(self.buf, dtype, n, start).tolist(), f"[{_KINDS[item]}]"
        if vtype == V.STRING:
            return self.string(), "str"
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.unpack(_SCALAR[vtype])[0], _KINDS[vtype]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table, checked: the metadata dpllama reads has its kinds
    (KEY_KINDS), tensors have 1 to 4 dimensions of a known type that fit its blocks, and lie aligned,
    inside the file and apart. Tensor data stays memory-mapped."""
    path = Path(path)
    buf = map_file(path)
    if buf[:4] != b"GGUF":
        raise DpllamaError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    cur = _Cursor(path, buf)
    cur.pos = 4
    try:
        (version,) = cur.unpack("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (expected 2 or 3)")
        n_tensors, n_fields = cur.unpack("QQ")
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            if key in fields:
                raise DpllamaError(f"{path}: metadata {key} is listed twice")
            fields[key], kind = cur.value(cur.unpack("I")[0])
            expected = KEY_KINDS.get(key) or KEY_KINDS.get(".".join(key.split(".")[:2]) + ".*")
            if expected and kind not in expected:
                raise DpllamaError(f"{path}: metadata {key} holds {kind}, expected {' or '.join(expected)}")
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            (n_dims,) = cur.unpack("I")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise DpllamaError(f"{path}: tensor {name} has {n_dims} dimensions, expected 1 to {GGML_MAX_DIMS}")
            dims = cur.unpack(f"{n_dims}Q")
            infos.append((name, dims, *cur.unpack("IQ")))
        alignment = fields.get("general.alignment", GGUF_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise DpllamaError(f"{path}: general.alignment is {alignment}, expected a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        tensors, spans = {}, []
        for name, dims, type_code, offset in infos:
            if type_code not in GGML_QUANT_SIZES:
                raise DpllamaError(f"{path}: tensor {name} has unknown type {type_code}")
            ggml_type = GGMLQuantizationType(type_code)
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            if dims[0] % block:
                raise DpllamaError(f"{path}: tensor {name} has dimensions {list(dims)}: expected the first a "
                                   f"multiple of {ggml_type.name}'s block of {block}")
            if offset % alignment:
                raise DpllamaError(f"{path}: tensor {name} is at offset {offset}, expected a multiple of "
                                   f"general.alignment {alignment}")
            if name in tensors:
                raise DpllamaError(f"{path}: tensor {name} is listed twice")
            nbytes = math.prod(dims) // block * block_bytes
            cur.pos = data_start + offset
            start = cur.skip_to(cur.pos + nbytes, f"tensor {name}")
            tensors[name] = RawTensor(name, ggml_type, tuple(reversed(dims)),
                                      np.frombuffer(buf, np.uint8, nbytes, start))
            spans.append((start, cur.pos, name))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise DpllamaError(f"{path}: corrupted GGUF file: {e}") from e
    spans.sort()
    for (_, end, name), (start, _, next_name) in zip(spans, spans[1:]):
        if end > start:
            raise DpllamaError(f"{path}: tensor {name} overlaps {next_name}: it ends at byte {end}, expected at "
                               f"most {start}, where {next_name} starts")
    return GGUFFile(fields, tensors)


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
    """Load a llama GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) or a dpllama container, memory-mapped.
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

    def array(name: str, ggml_type: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
        t = raw(name, shape)
        if t.type != ggml_type:
            raise DpllamaError(f"{path}: tensor {name} has type {t.type.name}, expected {ggml_type.name}")
        return t.data.view(_CONTAINER_DTYPES[ggml_type]).reshape(shape)

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
        cols_p = -(-cols // group) * group
        groups = (rows, cols_p // group)
        if kind == "q8":
            t = Tensor("q8", rows, cols, array(f"{base}.qweight", T.I8, (rows, cols_p)),
                       scales=array(f"{base}.scales", T.F32, groups), group=group)
        else:
            mins = array(f"{base}.mins", T.F16, groups) if f"{base}.mins" in tensors else None
            t = Tensor("int4", rows, cols, array(f"{base}.qweight", T.I32, (rows, cols_p // 8)),
                       scales=array(f"{base}.scales", T.F16, groups), mins=mins, group=group)
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


def _add_field(w: GGUFWriter, key: str, value) -> None:
    """A plain dict has lost GGUF's value types; use those llama.cpp writes for tokenizer keys: token ids
    UINT32, token_type an INT32 array, scores a FLOAT32 array."""
    item_types = {str: GGUFValueType.STRING, bool: GGUFValueType.BOOL, int: GGUFValueType.INT32,
                  float: GGUFValueType.FLOAT32}
    if isinstance(value, list):
        if value:   # GGUF cannot store an empty array
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=item_types[type(value[0])])
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_key_value(key, value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_key_value(key, value, GGUFValueType.STRING)


def _add_matrix(w: GGUFWriter, base: str, t: Tensor) -> None:
    if t.kind == "f32":
        w.add_tensor(f"{base}.weight", np.ascontiguousarray(t.data, np.float32))
        return
    w.add_string(f"dpllama.kind.{base}", t.kind)
    w.add_uint32(f"dpllama.group.{base}", t.group)
    int4 = t.kind == "int4"
    w.add_tensor(f"{base}.qweight", np.ascontiguousarray(t.data).view(np.int32) if int4 else t.data)
    w.add_tensor(f"{base}.scales", np.ascontiguousarray(t.scales, np.float16 if int4 else np.float32))
    if t.mins is not None:
        w.add_tensor(f"{base}.mins", np.ascontiguousarray(t.mins, np.float16))


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
    with atomic_output(path) as tmp:
        w = GGUFWriter(tmp, "llama")
        try:
            w.add_uint32(FORMAT_KEY, FORMAT_VERSION)
            add_hyperparameters(w, c)
            for key, value in tokenizer_fields.items():
                _add_field(w, key, value)
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
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
