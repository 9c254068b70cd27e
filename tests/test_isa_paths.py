"""Every CPU kernel path and every other OpenCL driver this host can run, each built and checked as a user
with that CPU or driver would get it.

The device's compiler picks matrix.cl's path from the instruction-set macros it predefines, and the probe picks
the matching CPU config. PoCL 3.1 and later can be told to target an older CPU than the host
(POCL_KERNELLIB_NAME: avx2 is Haswell, sse2 is a plain x86-64 CPU), so an AVX-512 host also builds and runs the
real AVX2 and portable code. In a subprocess per path: the probe must report that path, the forward pass of a
random model in every weight format (and one with a tensor of every GGUF type) must match the NumPy reference
(tests/test_forward.py), tiny models' logits llama.cpp's (a Qwen3, YaRN, linear RoPE scaling), and no build may
print a compiler warning (PyOpenCL's CompilerWarning is an error there). A path the host's driver cannot target (the
pip PoCL 3.0, a GPU) skips with that reason. The AVX-512 VNNI path runs only where the compiler
targets VNNI; test_kernels.py's test_gemv_isa_fallbacks covers the others below it on such a host, and where no
driver here targets VNNI, clang compiles it for a VNNI CPU (test_vnni_path_compiles).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dpllama.runtime import program, select_device
from tests.helpers import LLAMA_CPP_MODELS

TARGETS = {"avx2": "avx2", "portable": "sse2"}     # kernel path -> PoCL kernel library that targets it
# every CPU device's kernel path: with the pip PoCL beside Debian's on a CPU that both know (Zen 3), the pip one
# (avx2) outranks Debian's told to target sse2 (portable), so the path is chosen by isa=, not by ranking
PROBE = ("from dpllama.runtime import list_devices; "
         "print(' '.join(d.kernel_path for d in list_devices() if d.type == 'cpu'))")


def env_for(lib: str, tmp_path, path: str = "") -> dict:
    return dict(os.environ, POCL_KERNELLIB_NAME=lib, DPLLAMA_DEVICE=f"cpu,isa={path}" if path else "cpu",
                DPLLAMA_HOME=os.environ.get("DPLLAMA_HOME", str(tmp_path)))


@pytest.mark.parametrize("path", TARGETS)
def test_kernel_path(repo_root, tmp_path, path):
    if select_device()[0].type != "cpu":
        pytest.skip("the device dpllama uses here is not a CPU")
    env = env_for(TARGETS[path], tmp_path)
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=repo_root, env=env,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    if not any(p.startswith(path) for p in probe.stdout.split()):   # avx2-vnni too: AVX-VNNI in inline assembly
        pytest.skip(f"no OpenCL driver here targets the {path} path with POCL_KERNELLIB_NAME="
                    f"{TARGETS[path]} (its CPU devices: {probe.stdout.strip()}; PoCL 3.1 or later does)")
    env = env_for(TARGETS[path], tmp_path, path)
    # 8-bit activations where they have instructions of their own (pmaddubsw on ymm); the portable path's are the
    # plain OpenCL C that test_kernels.py's generic fallback checks, and its builds are the suite's slowest
    bytes_test = ["tests/test_forward.py::test_8_bit_activations_match_reference"] if path == "avx2" else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-W", "error::pyopencl.CompilerWarning",
                          "tests/test_forward.py::test_logits_match_reference",
                          "tests/test_forward.py::test_greedy_and_given_tokens_mixed",
                          "tests/test_forward.py::test_every_gguf_type_matches_reference",
                          *(f"tests/test_forward.py::test_matches_llama_cpp[shipped-{m}]" for m in LLAMA_CPP_MODELS),
                          *bytes_test],
                         capture_output=True, text=True, cwd=repo_root, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_every_other_driver(repo_root, tmp_path):
    """The suite runs on the device dpllama picks; every other device that can compile (the pip PoCL beside
    Debian's, where this CPU is one its LLVM knows) gets a bounded subset: a quantized forward pass against
    the reference and the stories260K oracle."""
    from dpllama.runtime import list_devices
    chosen = select_device()[0]
    others = [d for d in list_devices() if d.index != chosen.index]
    usable = [d for d in others if not d.probe().error]
    if not usable:
        pytest.skip("no other usable OpenCL device here" + "".join(
            f"; {d} cannot compile: {d.probe().error}" for d in others))
    for d in usable:
        env = dict(os.environ, DPLLAMA_DEVICE=str(d.index), DPLLAMA_HOME=os.environ.get("DPLLAMA_HOME", str(tmp_path)))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              "tests/test_forward.py::test_logits_match_reference[int4-mixed-g32-tied-prefill]",
                              "tests/test_cli.py::test_generate_matches_llama2c_byte_for_byte"],
                             capture_output=True, text=True, cwd=repo_root, env=env, timeout=900)
        assert run.returncode == 0, f"{d}: " + run.stdout[-3000:] + run.stderr[-2000:]


# (defines, the VNNI instruction its multiply-adds must become): 16-bit activations pair with vpdpwssd, bytes
# (int4 and int5 under --activation-bits 8) with vpdpbusd
VNNI_BUILDS = [(("W_Q8", "GROUP=32", "SCALES_F32"), "vpdpwssd"), (("W_INT4", "GROUP=32"), "vpdpwssd"),
               (("W_INT4", "GROUP=32", "X_BYTES"), "vpdpbusd"), (("W_INT5", "GROUP=64", "ASYM", "SCALES_F32"), "vpdpwssd"),
               (("W_INT5", "GROUP=64", "ASYM", "SCALES_F32", "X_BYTES"), "vpdpbusd")]


# -march, the defines the probe would add, and how the VNNI instruction must appear in the IR ({} its name): clang's
# builtin where the compiler targets VNNI (AVX-512 VNNI on zmm; AVX-VNNI on ymm for TILE_ROWS 16's two halves), inline
# assembly where the probe found VNNI that the compiler does not target (skylake-avx512: PoCL 3.1 on Zen 4 and 5;
# haswell: an AVX2 target on a CPU with AVX-VNNI; znver3: the pip PoCL 3.0 on Zen 4, AVX-512 VNNI's EVEX form on ymm)
VNNI_TARGETS = {"icelake-server": ((), "llvm.x86.avx512.{}.512"), "skylake-avx512": (("VNNI_ASM",), 'asm "{} '),
                "alderlake": ((), "llvm.x86.avx512.{}.256"), "haswell": (("AVXVNNI_ASM",), 'asm "{{vex}} {} '),
                "znver3": (("AVXVNNI_ASM", "VNNI_EVEX"), 'asm "{} ')}


@pytest.mark.parametrize("defines,instruction", VNNI_BUILDS, ids=["-".join(d) for d, _ in VNNI_BUILDS])
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("march", list(VNNI_TARGETS))
def test_vnni_path_compiles(tmp_path, defines, instruction, tokens, march):
    """matrix.cl as a driver gets it (program.source), compiled by clang to LLVM IR for each VNNI_TARGETS target: it
    must build and multiply with the VNNI instruction only, as a builtin or in inline assembly. The builtin paths are
    only compiled here, not run: that needs a driver that targets VNNI; test_kernels.py runs the inline ones where
    the CPU has them."""
    clang = shutil.which("clang-15") or shutil.which("clang")
    if clang is None:
        pytest.skip("no clang here to compile the VNNI path with (Debian's PoCL brings clang-15)")
    src = tmp_path / "matrix.cl"
    src.write_text(program.source("matrix.cl"))
    out = tmp_path / "matrix.ll"
    # -fgnu89-inline: the helpers are plain `inline`, which C99 rules would leave without a body to look into
    r = subprocess.run([clang, "-x", "cl", "-cl-std=CL1.2", "-Xclang", "-finclude-default-header", "-fgnu89-inline",
                        "-target", "x86_64-unknown-linux-gnu", f"-march={march}", "-O1", "-emit-llvm", "-S",
                        *(f"-D{d}" for d in defines), *(f"-D{d}" for d in VNNI_TARGETS[march][0]),
                        "-DTILE_ROWS=16", "-DTILES=4", f"-DTOKENS={tokens}",
                        "-o", str(out), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-3000:]
    ir = out.read_text()
    assert VNNI_TARGETS[march][1].format(instruction) in ir and "pmadd" not in ir
