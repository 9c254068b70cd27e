"""The model file formats as containers, below both the model and the tokenizers: GGUF (`gguf`) and
llama2.c checkpoints (`llama2c`). Nothing here knows `Weights` or a tokenizer: `dpllama.model` turns these
files into weights and back, `dpllama.tokenizer` reads vocabularies out of them."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

from dpllama.errors import DpllamaError
from dpllama.fileio import check_input

GGUF_MAGIC = b"GGUF"    # a GGUF file's first bytes (a llama2.c checkpoint has none to look for)


def round_up(n: int, multiple: int) -> int:
    """n rounded up to whole multiples: an offset to an alignment, a row to whole groups or tiles."""
    return -(-n // multiple) * multiple


def map_file(path: Path):
    """The whole file, memory-mapped read-only (b"" when empty: an empty file cannot be mapped)."""
    check_input(path)
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except OSError as e:
        raise DpllamaError(f"{path}: cannot read: {e.strerror}") from None
