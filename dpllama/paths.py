"""Where dpllama keeps what it downloads and builds: $DPLLAMA_HOME (default ~/.cache/dpllama), holding
models/ (known models, and in models/hf/ split Hugging Face GGUFs merged into one file: `dpllama.hub`) and
kernels/ (kernel binaries and device probes, the runtime). Hugging Face files that come whole stay in
huggingface_hub's own cache ($HF_HOME, default ~/.cache/huggingface)."""
from __future__ import annotations

import os
from pathlib import Path


def dpllama_home() -> Path:
    return Path(os.environ.get("DPLLAMA_HOME") or Path.home() / ".cache" / "dpllama")


def models_dir() -> Path:
    return dpllama_home() / "models"


def hf_dir() -> Path:
    return models_dir() / "hf"
