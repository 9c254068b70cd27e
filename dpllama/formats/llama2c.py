"""llama2.c checkpoints (Karpathy's export.py) as a file format: legacy version 0, version 1 (fp32) and
version 2 (Q8_0). This module reads and writes the header; `dpllama.model.llama2c` lays out the tensors that
follow it (named and shaped as `Weights`' arrays).

All little-endian. Version 0 header: 7 int32 (DIMS: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len), a negative vocab_size meaning an unshared classifier. Versions 1 and 2: uint32 magic
"ak42", int32 version, the same 7 int32 (vocab_size positive), uint8 shared_classifier, version 2 an int32
group size (unaligned, at byte 37), zero padding to 256 bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from dpllama.errors import DpllamaError
from dpllama.formats import GGUF_MAGIC

MAGIC = 0x616B3432      # "ak42" read as a little-endian uint32
HEADER_BYTES = 256      # versions 1 and 2
LEGACY_HEADER = struct.Struct("<7i")
DIMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")    # in header order


@dataclass(frozen=True)
class Header:
    version: int            # 0, 1 or 2
    dims: dict              # DIMS -> int, vocab_size positive (ModelConfig's first fields)
    shared: bool            # the classifier is the embedding table
    group: int              # Q8_0 group size (version 2), else 0

    @property
    def size(self) -> int:
        """Bytes: where the tensors start."""
        return HEADER_BYTES if self.version else LEGACY_HEADER.size


def read_header(path: Path, buf) -> Header:
    """The header of the mapped checkpoint `buf`, its version, flag and group checked (not its dims)."""
    def need(n: int) -> None:
        if len(buf) < n:
            raise DpllamaError(f"{path}: truncated llama2.c checkpoint: expected at least {n} bytes, "
                               f"found {len(buf)}")

    need(4)
    if buf[:4] == GGUF_MAGIC:
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
    else:
        version, params, group = 0, LEGACY_HEADER.unpack_from(buf, 0), 0
        shared = params[5] > 0          # legacy: negative vocab_size = unshared classifier
        params = params[:5] + (abs(params[5]),) + params[6:]
    return Header(version, dict(zip(DIMS, params)), bool(shared), group)


def pack_header(h: Header) -> bytes:
    """The bytes of `h`, `h.size` of them."""
    params = [h.dims[k] for k in DIMS]
    if h.version == 0:
        params[5] = params[5] if h.shared else -params[5]
        return LEGACY_HEADER.pack(*params)
    header = struct.pack("<Ii7iB", MAGIC, h.version, *params, h.shared)
    header += struct.pack("<i", h.group) if h.version == 2 else b""
    return header.ljust(HEADER_BYTES, b"\0")
