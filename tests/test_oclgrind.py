"""The kernels under Oclgrind, a checking OpenCL runtime that reports out-of-bounds reads and writes, data races
and reads of uninitialized memory: stories260K greedy against llama2.c's oracle, and the forward pass of a
random model in the quantized formats against the NumPy reference, in the GPU launch geometry (work-items
sharing a tile, tree reductions, barriers) and in the CPU one (a work-item per tile, the fused attention, the
keys in blocks of positions).
Any report fails the test, but for two of the driver-probing calls every OpenCL program makes (NOISE).

Oclgrind interprets every work-item, so the shapes are small; it rejects -g and needs -cl-opt-disable under
the uninitialized check (it aborts on LLVM's `freeze`), which the configs below give. It is reached through
the ICD loader's OCL_ICD_VENDORS, as it ships no vendors entry. Debian's package: `apt-get install oclgrind`
(.ci/run installs it where it can); without it the tests skip.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import llama2c_dir

ICD = Path("/usr/lib/oclgrind/liboclgrind-rt-icd.so")
CONFIGS = {
    "gpu-geometry": "match: {platform: Oclgrind}\nbuild_options: [-cl-opt-disable]\n"
                    "work_group: {gemv: 16, tile_rows: 4, attention: 16, attention_positions: 4, reduce: 16, "
                    "prefill_chunk: 4}\n",
    "cpu-geometry": "match: {platform: Oclgrind}\nbuild_options: [-cl-opt-disable]\n"
                    "work_group: {gemv: 1, tile_rows: 8, attention: 1, attention_positions: 8, key_block: 16, "
                    "reduce: 16, decode_tiles: 2, prefill_tiles: 4, prefill_chunk: 4, attention_span: 8}\n"
                    "fuse: {attention_min_kv_heads: 1}\n",
    # the same with the layers in one launch (matrix.cl's layers): its work-groups share its task counters, and the
    # spans of rows past position 7 (attention_span 8) are tasks of their own, then folded
    "cpu-layer": "match: {platform: Oclgrind}\nbuild_options: [-cl-opt-disable]\n"
                 "work_group: {gemv: 1, tile_rows: 8, attention: 1, attention_positions: 8, key_block: 16, "
                 "reduce: 16, decode_tiles: 2, prefill_tiles: 4, prefill_chunk: 4, attention_span: 8}\n"
                 "fuse: {layer_max_units: 1024}\n",
}
# Reports from the runtime's own probing that are not dpllama's calls: device queries for parameters an OpenCL
# 1.2 device lacks (PyOpenCL and dpllama's device facts ask for them), and PyOpenCL's kernel-name probing.
NOISE = [("clGetDeviceInfo", "CL_INVALID_VALUE"), ("clCreateKernel", "CL_INVALID_KERNEL_NAME")]


# The first line of an Oclgrind report (its runtime API checks, and the kernel checks' memory, race and barrier
# findings); dpllama's own lines on stderr start "dpllama:" or "prompt:"
HEADLINE = re.compile(r"Oclgrind - |Invalid |Uninitiali[sz]ed |\S+-\S+ data race|Work-group divergence|"
                      r".*(out of bounds|[Uu]naligned|[Aa]ccess violation)")


def reports(stderr: str) -> list[str]:
    """Oclgrind's reports in `stderr` (blocks of a headline and tab-indented details), noise left out."""
    blocks = re.split(r"\n(?=\S)", stderr)
    found = []
    for b in blocks:
        if not re.match(HEADLINE, b):
            continue
        func = re.search(r"Function:\s*(\S+)", b)
        err = re.search(r"Error:\s*(\S+)", b)
        if func and err and (func.group(1), err.group(1)) in NOISE:
            continue
        found.append(b.strip())
    return found


@pytest.fixture(scope="module")
def oclgrind_env(tmp_path_factory):
    if not ICD.is_file():
        pytest.skip(f"Oclgrind is not installed ({ICD} not found; `apt-get install oclgrind`)")
    d = tmp_path_factory.mktemp("oclgrind")
    (d / "vendors").mkdir()
    (d / "vendors" / "oclgrind.icd").write_text(f"{ICD}\n")
    env = dict(os.environ, OCL_ICD_VENDORS=str(d / "vendors"), OCLGRIND_CHECK_API="1", OCLGRIND_DATA_RACES="1",
               OCLGRIND_UNINITIALIZED="1", DPLLAMA_HOME=str(d / "home"))
    env.pop("DPLLAMA_DEVICE", None)
    for name, text in CONFIGS.items():
        (d / f"{name}.yaml").write_text(text)
    return env, d


def test_reports_are_parsed():
    """The filter keeps a kernel's invalid read and drops the probing noise (so a clean run means something)."""
    err = ("Oclgrind - OpenCL runtime error detected\n\tFunction: clGetDeviceInfo\n\tFor argument 'param_name'\n"
           "\tError:    CL_INVALID_VALUE\n\nInvalid read of size 4 at global memory address 0x1000000000040\n"
           "\tKernel: choose_embed\n\tEntity: Global(0,0,0) Local(0,0,0) Group(0,0,0)\n")
    assert [r.splitlines()[0] for r in reports(err)] == ["Invalid read of size 4 at global memory address "
                                                        "0x1000000000040"]


@pytest.mark.parametrize("geometry", CONFIGS)
def test_stories260k_greedy_under_oclgrind(oclgrind_env, repo_root, geometry):
    env, d = oclgrind_env
    m = llama2c_dir()
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "generate", "-m", m / "stories260K.bin", "-z",
                        m / "tok512.bin", "-p", "Once upon a time", "-n", "9", "-t", "0", "--config",
                        d / f"{geometry}.yaml"], capture_output=True, text=True, cwd=repo_root, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Oclgrind" in r.stderr      # the simulator ran (it announced its probing reports)
    assert reports(r.stderr) == []
    oracle = (m / "reference_stories260K_greedy.txt").read_text()
    assert len(r.stdout) > len("Once upon a time") and oracle.startswith(r.stdout.rstrip("\n")), r.stdout


FORWARD_TESTS = {"decode": "test_logits_match_reference[int4-mixed-g32-tied-decode]",
                 "prefill": "test_logits_match_reference[int4-mixed-g32-tied-prefill]",
                 "batched": "test_batched_passes_match_reference[int4-mixed-g32-tied]",    # rows of 3 slots at once
                 # qwen3: store_qkv's q and k left in the query rows, then norm_rope_head's reads and cache stores (its
                 # own kernel, or the layer launch's phase), heads of 12 in rows of 72 + 24; f32 and int4
                 "qwen3": "test_architectures_match_reference[qwen3-prefill]"}


@pytest.mark.parametrize("feeds", FORWARD_TESTS)
@pytest.mark.parametrize("geometry", CONFIGS)
def test_quantized_forward_under_oclgrind(oclgrind_env, repo_root, geometry, feeds):
    """int4 (symmetric and asymmetric, fused), a q8 embedding and tied classifier, against the reference; Qwen3."""
    env, d = oclgrind_env
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",  # -s: reports pass
                        f"tests/test_forward.py::{FORWARD_TESTS[feeds]}"],
                       capture_output=True, text=True, cwd=repo_root, timeout=900,
                       env=dict(env, DPLLAMA_CONFIG=str(d / f"{geometry}.yaml")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Oclgrind" in r.stderr and " passed" in r.stdout
    assert reports(r.stderr) == []


def test_int5_kernels_under_oclgrind(oclgrind_env, repo_root):
    """int5's reads (tests/test_kernels.py): block_dot's five words a block, decode and prefill, in the GPU geometry
    (work-items splitting a tile's blocks) and with several tiles a work-group, and weight_at's (embed); the
    stories260K and int4 models above hold no int5 matrix."""
    env, d = oclgrind_env
    tests = [f"tests/test_kernels.py::test_gemv_kernels[{case}-gemv_add]"
             for case in ("int5g32-q50-gpu-decode", "int5asym32f-q5k-gpu-prefill", "int5asym32-q51-odd-decode")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", *tests,
                        "tests/test_kernels.py::test_embed[int5g32-q50-gpu]"],
                       capture_output=True, text=True, cwd=repo_root, timeout=900,
                       env=dict(env, DPLLAMA_CONFIG=str(d / "gpu-geometry.yaml")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Oclgrind" in r.stderr and "4 passed" in r.stdout
    assert reports(r.stderr) == []


@pytest.mark.parametrize("test", ["test_choose_rows_sampled", "test_penalties_on_device_are_the_hosts"])
@pytest.mark.parametrize("local", [1, 64])
def test_sampled_draws_under_oclgrind(oclgrind_env, repo_root, local, test):
    """The device's draws (sampling.cl, tests/test_kernels.py's test_choose_rows_sampled): the softmax in place, the
    candidates' copy and the searches, and the penalties (test_penalties_on_device_are_the_hosts: the window's ids,
    the fed tokens, the marks in the candidates' space), in one work-item (CPU configs: SOLO) or in a work-group of
    64 (GPU configs: its barriers); a vocabulary of 97, not a whole number of 16-float vectors. One process each:
    Oclgrind 21.10's uninitialized-value check reports the second of two runs of the same draws in one process (each
    alone is clean)."""
    env, d = oclgrind_env
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",
                        f"tests/test_kernels.py::{test}[97-{local}]"],
                       capture_output=True, text=True, cwd=repo_root, timeout=900,
                       env=dict(env, DPLLAMA_CONFIG=str(d / "gpu-geometry.yaml")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Oclgrind" in r.stderr and "1 passed" in r.stdout
    assert reports(r.stderr) == []
