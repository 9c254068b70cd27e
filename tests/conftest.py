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


@pytest.fixture(scope="session", autouse=True)
def one_compute_unit():
    """Every device reports one compute unit to the tests in this process, so that decode's fused QKV-attention
    launch, which needs a KV head per compute unit (Llama.fused_attention), runs where a test's config asks for it
    whatever the host's core count (the test models have 2 to 6 KV heads).
    test_forward.py::test_fused_attention_needs_a_kv_head_per_compute_unit checks the rule itself; commands run in
    subprocesses see the real count."""
    from dpllama.runtime.device import Device
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Device, "compute_units", property(lambda self: 1))
        yield
