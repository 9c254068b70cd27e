"""Where dpllama keeps what it downloads and builds: $DPLLAMA_HOME (default ~/.cache/dpllama), holding
models/ (known models, `dpllama.hub`) and kernels/ (kernel binaries and device probes, the runtime)."""
from __future__ import annotations

import os
from pathlib import Path


def dpllama_home() -> Path:
    return Path(os.environ.get("DPLLAMA_HOME") or Path.home() / ".cache" / "dpllama")


def models_dir() -> Path:
    return dpllama_home() / "models"
