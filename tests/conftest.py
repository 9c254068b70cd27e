"""Fixtures shared by every test: the repository root and one in-order queue for the whole session
(opening a context and building programs is the slow part, so tests share them)."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def queue():
    """An in-order queue on the device dpllama would pick ($DPLLAMA_DEVICE, else the best one)."""
    from dpllama.runtime import open_queue
    return open_queue(out_of_order=False)
