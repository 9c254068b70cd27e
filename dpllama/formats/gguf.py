"""GGUF, the container: its header parsed and checked, and the writing of one.

The header is parsed here rather than with gguf.GGUFReader: that reader builds NumPy views for every
string of the vocabulary and takes ~2.5 s on SmolLM2-135M's header alone; this parser takes ~0.1 s.
Tensor data is never copied by the parser: each tensor is a uint8 view into the memory map. What the
llama.* keys and tensors mean, and dpllama's own keys (FORMAT_KEY, dpllama.kind.*, dpllama.group.*), is
`dpllama.model.gguf`'s business; the tokenizer.* keys are `dpllama.tokenizer.gguf`'s.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.formats import GGUF_MAGIC, map_file, round_up

FORMAT_KEY = "dpllama.format"   # the version of dpllama's container (dpllama.model.gguf), absent elsewhere
FORMAT_VERSION = 1
GGUF_ALIGNMENT = 32     # default of general.alignment
GGML_MAX_DIMS = 4
# struct codes of GGUF's scalar metadata types
_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
           GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
           GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
           GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


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
_VALUE_KINDS = {**dict.fromkeys((V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64), "int"),
          V.FLOAT32: "float", V.FLOAT64: "float", V.BOOL: "bool", V.STRING: "str"}
# The kinds of the metadata dpllama reads ("[int]": an array of ints), as llama.cpp writes them: another
# type is refused at parse time rather than failing later in an int() or a comparison. Keys that may vary
# per layer may be arrays (dpllama.model.gguf refuses those by name); "*" ends a prefix.
_INT_OR_PER_LAYER = ("int", "[int]")
# the hyperparameters' kinds under any architecture's prefix (<arch>.context_length, ...): whichever architectures
# dpllama.model.gguf takes, their keys are checked alike
_HYPERPARAMETER_KINDS = {
    **dict.fromkeys(("vocab_size", "context_length", "embedding_length", "block_count", "rope.dimension_count",
                     "attention.key_length", "attention.value_length", "expert_count",
                     "rope.scaling.original_context_length"), ("int",)),
    **dict.fromkeys(("feed_forward_length", "attention.head_count", "attention.head_count_kv"), _INT_OR_PER_LAYER),
    **dict.fromkeys(("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor",
                     "rope.scaling.low_freq_factor", "rope.scaling.high_freq_factor", "rope.scale_linear",
                     "rope.scaling.attn_factor"), ("float",)),
    "rope.scaling.type": ("str",),
}
KEY_KINDS = {
    "general.architecture": ("str",), "general.alignment": ("int",),
    FORMAT_KEY: ("int",), "dpllama.kind.*": ("str",), "dpllama.group.*": ("int",),
    "tokenizer.ggml.model": ("str",), "tokenizer.ggml.pre": ("str",), "tokenizer.ggml.tokens": ("[str]",),
    "tokenizer.ggml.scores": ("[float]",), "tokenizer.ggml.token_type": ("[int]",),
    "tokenizer.ggml.merges": ("[str]",), "tokenizer.chat_template": ("str",),
    **dict.fromkeys([f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "unknown", "eot", "eom")], ("int",)),
    **dict.fromkeys([f"tokenizer.ggml.{k}" for k in ("add_bos_token", "add_space_prefix")], ("bool",)),
}


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
        """-> (value, its kind: a _VALUE_KINDS value, or one in brackets for an array)."""
        if vtype == V.ARRAY:
            item, n = self.unpack("IQ")
            if item == V.STRING:
                return [self.string() for _ in range(n)], "[str]"
            if item not in _SCALAR:
                raise ValueError(f"unsupported metadata array item type {item}")
            dtype = np.dtype("<" + _SCALAR[item])
            start = self.skip_to(self.pos + n * dtype.itemsize, "header")
            return np.frombuffer(self.buf, dtype, n, start).tolist(), f"[{_VALUE_KINDS[item]}]"
        if vtype == V.STRING:
            return self.string(), "str"
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.unpack(_SCALAR[vtype])[0], _VALUE_KINDS[vtype]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table, checked: the metadata dpllama reads has its kinds
    (KEY_KINDS), tensors have 1 to 4 dimensions of a known type that fit its blocks, and lie aligned,
    inside the file and apart. Tensor data stays memory-mapped."""
    path = Path(path)
    buf = map_file(path)
    if buf[:4] != GGUF_MAGIC:
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
            expected = KEY_KINDS.get(key) or KEY_KINDS.get(".".join(key.split(".")[:2]) + ".*") or \
                _HYPERPARAMETER_KINDS.get(key.partition(".")[2])
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
        data_start = round_up(cur.pos, alignment)
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


def add_field(w: GGUFWriter, key: str, value) -> None:
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


@contextlib.contextmanager
def write_gguf(path: str | os.PathLike, arch: str = "llama") -> Iterator[GGUFWriter]:
    """A GGUFWriter to add keys and tensors to; the file appears at `path`, whole, when the block ends
    without an exception (atomic_output: never half a file, whatever interrupts the write)."""
    with atomic_output(path) as tmp:
        w = GGUFWriter(tmp, arch)
        try:
            yield w
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
