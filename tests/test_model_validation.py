"""Bad model files are refused at load in one line naming the file, the field or tensor, what was expected and
what was found (GGUF tables and metadata)."""
from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from dpllama.errors import DpllamaError
from dpllama.llm import load_weights
from tests.helpers import random_weights, write_test_gguf

SHAPE = dict(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, seq_len=32)


def fails(path, message: str) -> None:
    """Loading `path` raises DpllamaError with exactly `path: message` (a regular expression)."""
    with pytest.raises(DpllamaError, match=f"^{re.escape(str(path))}: {message}$"):
        load_weights(path)


# ---------------------------------------------------------------- GGUF tables and metadata

def _after(buf: bytes, name: str) -> int:
    """Where the bytes after the GGUF string `name` (a metadata key or a tensor name) start."""
    return buf.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)


def _tensor_info(buf: bytes, name: str) -> tuple[int, int, int]:
    """Positions of tensor `name`'s dims, type and offset in the tensor table."""
    at = _after(buf, name)
    (n_dims,) = struct.unpack_from("<I", buf, at)
    return at + 4, at + 4 + 8 * n_dims, at + 8 + 8 * n_dims


@pytest.fixture
def gguf(tmp_path):
    """(path, bytearray of a good GGUF with a Q8_0 embedding, write(buf)): patch the bytes, write, load."""
    path = tmp_path / "m.gguf"
    write_test_gguf(path, random_weights(**SHAPE), {"token_embd.weight": T.Q8_0})
    return path, bytearray(path.read_bytes()), path.write_bytes


def _set(buf: bytearray, at: int, fmt: str, *values) -> None:
    struct.pack_into("<" + fmt, buf, at, *values)


def test_gguf_tensor_table_checks(gguf):
    path, good, write = gguf
    dims, type_at, offset_at = _tensor_info(good, "blk.0.attn_k.weight")
    (offset,) = struct.unpack_from("<Q", good, offset_at)
    cases = [
        (offset_at, "Q", offset + 4, f"tensor blk.0.attn_k.weight is at offset {offset + 4}, expected a multiple "
                                     f"of general.alignment 32"),
        (offset_at, "Q", 1 << 40, "truncated GGUF file: tensor blk.0.attn_k.weight needs \\d+ bytes, found \\d+"),
        (offset_at, "Q", 0, "tensor token_embd.weight overlaps blk.0.attn_k.weight: it ends at byte \\d+, "
                            "expected at most \\d+, where blk.0.attn_k.weight starts"),
        (type_at, "I", 99, "tensor blk.0.attn_k.weight has unknown type 99"),
        (dims - 4, "I", 5, "tensor blk.0.attn_k.weight has 5 dimensions, expected 1 to 4"),
        (_tensor_info(good, "token_embd.weight")[0], "Q", 48,
         "tensor token_embd.weight has dimensions \\[48, 40\\]: expected the first a multiple of Q8_0's block of 32"),
    ]
    for at, fmt, value, message in cases:
        buf = bytearray(good)
        _set(buf, at, fmt, value)
        write(buf)
        fails(path, message)
    buf = bytearray(good)       # a second tensor of the same name: rename blk.1.attn_k as blk.0.attn_k
    at = _after(buf, "blk.1.attn_k.weight")
    buf[at - len("blk.1.attn_k.weight"):at] = b"blk.0.attn_k.weight"
    write(buf)
    fails(path, "tensor blk.0.attn_k.weight is listed twice")


@pytest.mark.parametrize("key, vtype, message", [
    ("llama.context_length", V.FLOAT32, "metadata llama.context_length holds float, expected int"),
    ("llama.rope.freq_base", V.INT32, "metadata llama.rope.freq_base holds int, expected float"),
    ("tokenizer.ggml.add_bos_token", V.UINT8, "metadata tokenizer.ggml.add_bos_token holds int, expected bool"),
    ("tokenizer.ggml.bos_token_id", V.FLOAT32, "metadata tokenizer.ggml.bos_token_id holds float, expected int"),
])
def test_gguf_metadata_types(gguf, key, vtype, message):
    path, buf, write = gguf
    _set(buf, _after(buf, key), "I", vtype)        # the same size: only the type differs
    write(buf)
    fails(path, message)


def test_gguf_metadata_array_item_type(gguf):
    path, buf, write = gguf
    at = _after(buf, "tokenizer.ggml.token_type")       # ARRAY, then its item type
    _set(buf, at + 4, "I", V.FLOAT32)
    write(buf)
    fails(path, "metadata tokenizer.ggml.token_type holds \\[float\\], expected \\[int\\]")


@pytest.mark.parametrize("key, fmt, value, message", [
    ("llama.rope.freq_base", "f", np.nan, "llama.rope.freq_base must be finite and positive, found nan"),
    ("llama.rope.freq_base", "f", 0.0, "llama.rope.freq_base must be finite and positive, found 0.0"),
    ("llama.rope.freq_base", "f", np.inf, "llama.rope.freq_base must be finite and positive, found inf"),
    ("llama.attention.layer_norm_rms_epsilon", "f", 0.0,
     "llama.attention.layer_norm_rms_epsilon must be between 0 and 1, found 0.0"),
    ("llama.attention.layer_norm_rms_epsilon", "f", 1.0,
     "llama.attention.layer_norm_rms_epsilon must be between 0 and 1, found 1.0"),
    ("llama.attention.layer_norm_rms_epsilon", "f", np.nan,
     "llama.attention.layer_norm_rms_epsilon must be between 0 and 1, found nan"),
    ("llama.attention.head_count", "I", 0, "llama.attention.head_count must be positive, found 0"),
    ("llama.attention.head_count", "I", 3,
     "llama.embedding_length 64 is not a multiple of llama.attention.head_count 3"),
    ("llama.attention.head_count_kv", "I", 3,
     "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3"),
    ("llama.context_length", "I", 0, "llama.context_length must be positive, found 0"),
])
def test_gguf_hyperparameters_in_range(gguf, key, fmt, value, message):
    path, buf, write = gguf
    _set(buf, _after(buf, key) + 4, fmt, value)
    write(buf)
    fails(path, f"GGUF metadata: impossible model: {message}")


def test_gguf_vocab_size_matches_the_embedding(gguf):
    path, buf, write = gguf
    _set(buf, _after(buf, "llama.vocab_size") + 4, "I", 41)
    write(buf)
    fails(path, "llama.vocab_size is 41, expected 40, the rows of token_embd")
