"""Every kernel of matrix.cl, attention.cl, sampling.cl and state.cl against a NumPy reference, over awkward
shapes.

The references are computed in float64 from the exact float32 inputs (for quantized formats: from
`Tensor.dequantize()`, the values the kernels must reproduce, not the unquantized matrix), so the tolerances
below only have to cover the kernels' own float32 rounding; each says why it is what it is.

Weights go through the library's own layout and binding code (`DeviceTensor`, `fuse_rows`, the launcher
`kernels.gemv`, `rope_table`), exactly as `Llama` uses them, so these tests follow the device layout wherever it goes; the
activations, caches and outputs are laid out here, with gaps between rows that the kernels must neither read
(NaN there) nor write (a sentinel there).

Compile cost: on PoCL (2 cores) a matrix.cl program costs ~2.3 s to build, an attention.cl one ~1.1 s, and each
(kernel, local size) ~0.15 s more at its first launch, after which all is cached on disk; so the grids are kept focused: 42 matrix.cl programs (decode and prefill
for 14 formats in the CPU geometry, 7 in two others) and 4 attention.cl programs.
"""
from __future__ import annotations

import dataclasses

import shutil
import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from dpllama.formats import round_up
from dpllama.generate import Sampler, XorShift
from dpllama.model import kernels
from dpllama.model.kv_cache import cache_defines, keys_by_channel
from dpllama.model.layout import DeviceTensor, Geometry, fuse_rows, pow2_divisor
from dpllama.model.llama import rope_table
from dpllama.model.quant import quantize_int4, quantize_q8, widen
from dpllama.model.weights import Tensor, x_steps
from dpllama.runtime import Local, program
from dpllama.runtime.device import host_cpu_flags
from dpllama.runtime.queue import Queue
from dpllama.formats.gguf import read_gguf
from dpllama.model.quant import GGUF_REPACK
from tests.helpers import QWEN_TENSORS, gguf_tensor, qwen_gguf_path

# ---- tolerances ----
# float32 sums: in any summation order, the rounding error of a sum is at most (the longest chain of additions)
# x 2^-24 times the sum of the magnitudes of its terms, whatever their signs. A gemv work-item sums its blocks
# serially (with L = 1 all cols_p terms), a tree of log2(L) levels joins the work-items, and the scale products
# add a few roundings: gemv_rtol(cols_p) bounds that, whatever order a device sums in. (Measured errors are a
# few % of it: rounding errors mostly cancel.) The kernel sums s*sum(q x) of the stored values (q8: q + 128,
# int4 and int5: q) and (-128 s, -8 s, -16 s or m)*sum(x) separately and adds them, so the magnitude includes
# (128|s|, 8|s| or 16|s|, + |m|) |x| per element.
def gemv_rtol(cols_p: int) -> float:
    return (cols_p + 16) * 2.0 ** -24


GEMV_ATOL = 1e-6        # results that cancel to ~0 still carry the rounding of their terms' scale
# RMSNorm: a sum of n positive squares has relative error <= n 2^-24 (n <= 640 -> 3.8e-5 with L = 1, far less
# in a tree), halved by the square root, plus rsqrt's 2 ulp and two products.
NORM_RTOL = 2e-5
# silu: OpenCL's exp is within 3 ulp; one division and two products on top. Far negative gates give results
# below float32's normal range (1.2e-38), which underflow or flush to zero.
SWIGLU_RTOL = 2e-6
SWIGLU_ATOL = 1e-37
# RoPE: the (cos, sin) table is made on the host in float32 as run.c does (rope_table): freq = 1/theta^(j/hd)
# rounds a few times and pos*freq once, so the angle is off by up to ~pos * 4 ulp (2.4e-7 rad per position at
# freq 1); 2e-6 per position leaves room. The error of a rotated pair is that angle error times the pair's
# length, plus the rounding of the rotation itself.
ROPE_ANGLE_ATOL_PER_POS = 2e-6
ROPE_RTOL = 1e-6
# the KV cache holds fp16, rounded to nearest: half an ulp, 2^-11 relative for normal values, 2^-25 at most below
F16_RTOL, F16_ATOL = 2.0 ** -11, 2.0 ** -25
# attention: each score is a float32 dot of head_dim terms (<= 64 -> 64 x 6e-8 of sum |q k| worst case);
# exp turns a score error into the same relative error of its weight; the weighted sum of values adds
# pos + 1 roundings. Relative to max |v|: 2e-5 covers the worst case of the shapes below.
ATT_ATOL_REL = 2e-5
# embedding rows are decoded, not summed: exact except that s*q + m may become one fma (-cl-mad-enable).
EMBED_RTOL = 1e-6
EPS = 1e-5

# ---- weight formats ----
FORMATS = {
    "f32": lambda w: Tensor.f32(w),
    "q8g32": lambda w: quantize_q8(w, 32),
    "q8g64": lambda w: quantize_q8(w, 64),
    "int4g32": lambda w: quantize_int4(w, 32, symmetric=True),
    "int4g64": lambda w: quantize_int4(w, 64, symmetric=True),
    "int4g128": lambda w: quantize_int4(w, 128, symmetric=True),
    "int4asym32": lambda w: quantize_int4(w, 32, symmetric=False),
    "int4asym64": lambda w: quantize_int4(w, 64, symmetric=False),
    "int4asym128": lambda w: quantize_int4(w, 128, symmetric=False),
}


def gguf_format(ggml_type):
    """A weight format as a GGUF type loads (random blocks of w's shape; the seed from w)."""
    return lambda w: gguf_tensor(np.random.default_rng(zlib.crc32(w.tobytes())), ggml_type, *w.shape)


def int5_group(fmt, group: int):
    """int5 of a larger group than GGUF's 32 (which no loader makes, and the kernels take): fmt's tensor with
    one scale (and min) per `group` columns, its values whatever those make."""
    def make(w):
        t = fmt(w)
        every = lambda a: None if a is None else np.ascontiguousarray(a[:, ::group // t.group])   # noqa: E731
        data = np.pad(t.data, ((0, 0), (0, round_up(t.cols, group) // 32 * 5 - t.data.shape[1])))
        return Tensor("int5", t.rows, t.cols, data, every(t.scales), every(t.mins), group)
    return make


# the formats GGUF's other types load as (dpllama/model/quant.py): q8 group 16 (Q6_K), int5 symmetric (Q5_0)
# and asymmetric (Q5_1; Q5_K with float32 scales), int4 with float32 scales: asymmetric group 32 (Q4_K),
# symmetric (Q3_K) and asymmetric (Q2_K) group 16; q8 asymmetric, which fused matrices of Q5_1 and Q8_0 meet in
# (quant.widen); int5 in a group of 64
FORMATS |= {"q8g16-q6k": gguf_format(GT.Q6_K), "int5g32-q50": gguf_format(GT.Q5_0),
            "int5asym32-q51": gguf_format(GT.Q5_1), "int5asym32f-q5k": gguf_format(GT.Q5_K),
            "int4asym32f-q4k": gguf_format(GT.Q4_K), "int4g16f-q3k": gguf_format(GT.Q3_K),
            "int4asym16f-q2k": gguf_format(GT.Q2_K),
            "q8asym32-q51": lambda w: widen([gguf_format(GT.Q5_1)(w), quantize_q8(w, 32)])[0],
            "int5g64": int5_group(gguf_format(GT.Q5_0), 64)}
# (rows, cols): rows not a multiple of any tile height (37: several tiles of 16), cols not a multiple of the
# groups (or of 8), a single column, and 520 columns = 65 blocks of 8, one more than the largest work-group,
# so work-items loop over blocks
SHAPES = [(13, 172), (7, 200), (5, 64), (3, 1), (9, 8), (37, 520)]
# Launch geometries: (tile_rows, gemv work-items per tile, decode_tiles, prefill_tokens, prefill_tiles,
# matrix_groups), and T for prefill. A DeviceTensor builds the decode and the prefill program of its geometry, and
# both are tested: T = 1 runs the decode program, T > 1 the prefill one, as kernels.gemv chooses. The prefill T is
# not a multiple of the tokens per work-group (a partial token group), and the row counts of SHAPES leave the last
# tile group partial. With gemv 1, matrix_groups work-groups per compute unit (1 here: tests/conftest.py), spread
# over the groups of input rows, split the tiles, up to decode_tiles (prefill_tiles) at a time, each preparing its
# rows once: in "cpu", 37 rows are 3 tiles of 16 for 2 groups in decode (1 group a row group in prefill); "solo"
# decodes 3 rows at once (decode_rows), 2 groups each, and its prefill has 2 row groups of 3 groups each (37 rows:
# 5 tiles of 8, split 1-2-2, runs of up to 2).
def geometry(tile_rows, gemv, decode_tiles, prefill_tokens, prefill_tiles, matrix_groups=2, decode_rows=1,
             reduce=64, key_block=0) -> Geometry:
    return Geometry(gemv=gemv, tile_rows=tile_rows, reduce=reduce, attention=1, attention_positions=16,
                    decode_tiles=decode_tiles, prefill_tokens=prefill_tokens, prefill_tiles=prefill_tiles,
                    prefill_chunk=64, matrix_groups=matrix_groups, decode_rows=decode_rows, key_block=key_block)


GEOMETRIES = {
    "cpu": (geometry(16, 1, 1, 8, 16, key_block=16), 19),   # dpllama/configs/cpu.yaml
    "gpu": (geometry(4, 64, 1, 4, 1), 6),     # the GPU configs: work-items split the columns, a tree joins them
    "odd": (geometry(8, 8, 3, 3, 2), 5),      # several tiles per work-group and a tree
    "solo": (geometry(8, 1, 2, 3, 2, 6, 3), 5),  # gemv 1: runs of 2 tiles split by 2 or 3 work-groups, 3 rows
}
# which formats run in which geometry: every format in the CPU one; a few, one per code path, in the others
# (each (format, geometry) costs two program builds and their kernels' first launches, ~1 s on PoCL from a cold cache)
GEOMETRY_FORMATS = {"cpu": list(FORMATS), "gpu": ["q8g32", "int4g32", "int4asym128", "q8asym32-q51", "int4g16f-q3k",
                                                  "int5g32-q50", "int5asym32f-q5k"],
                    "odd": ["f32", "int4asym64", "int5asym32-q51"], "solo": ["f32", "q8g32", "int4asym64", "int5g32-q50"]}
# and with 8-bit activations (matrix.cl's X_BYTES: int4 and int5 only): a format per group size and kind in the CPU
# geometry (group 16: a flush after 2 words; 64 and 128: several per block), one of each kind in the others
X8_FORMATS = {"cpu": ["int4g32", "int4asym128", "int4g16f-q3k", "int5g32-q50", "int5asym32f-q5k", "int5g64"],
              "gpu": ["int4g32", "int5g32-q50"], "odd": ["int4asym64"], "solo": ["int4asym64"]}
# and a batch of a few rows (Geometry.tokens: groups of 2 rows, and of 4 with a padding row), a format per kernel code
# path in the CPU geometry, two in the GPU one
FEW_ROWS = {"rows2": 2, "rows3": 3}
FEW_FORMATS = ["f32", "q8g32", "int4g32", "int4asym128", "int4g16f-q3k", "int5g32-q50"]
GEMV_PARAMS = [(fmt, geo, mode) for geo, fmts in GEOMETRY_FORMATS.items() for fmt in fmts
               for mode in ("decode", "prefill")] + [
              (fmt, geo, mode) for geo, fmts in X8_FORMATS.items() for fmt in fmts
              for mode in ("decode-x8", "prefill-x8")] + [
              (fmt, "cpu", mode) for fmt in FEW_FORMATS for mode in FEW_ROWS] + [("int4g32", "cpu", "rows2-x8")] + [
              (fmt, "gpu", "rows2") for fmt in ("q8g32", "int4g32")]
GEMV_KERNELS = ["gemv_add", "gemv_norm", "gemv_norm_swiglu"]


@pytest.fixture(scope="module")
def q(queue):
    return queue


def attention_program(q, pos_vec: int = 16, hd_vec: int = 8, gqa: int | None = None, key_block: int = 0,
                      span: int = 512):
    return q.program("attention.cl", f"ATTENTION_POSITIONS={pos_vec}", f"HD_VEC={hd_vec}",
                     *([f"GQA={gqa}", f"ATT_SPAN={span}"] if gqa else []), *cache_defines("f16", key_block))


def f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def error_scale(t: Tensor, x: np.ndarray) -> np.ndarray:
    """Per row, the sum of magnitudes of the terms the kernel adds for W x (see gemv_rtol)."""
    mag = np.abs(t.dequantize()).astype(np.float64)
    if t.kind != "f32":     # the offset of the stored values (q8: q + 128, int4: q - 8 or 0, int5: q - 16 or 0) and the min
        per_group = {"q8": 128, "int4": 8, "int5": 16}[t.kind] * np.abs(t.scales.astype(np.float64))
        if t.mins is not None:
            per_group = per_group + np.abs(t.mins.astype(np.float64))
        mag = mag + np.repeat(per_group, t.group, axis=1)[:, :t.cols]
    return mag @ np.abs(x.astype(np.float64))


def x_rounding(t: Tensor, X: np.ndarray, activation_bits: int = 16) -> np.ndarray | float:
    """Quantized kernels multiply W by x rounded per group to steps of max|x over the group| / 32767 (16 bits), or
    / 127 for int4 and int5 with 8-bit activations (matrix.cl's header), each element moved by up to half a step:
    per token and row, |W| times half steps."""
    steps = x_steps(t.kind, activation_bits)
    if not steps:
        return 0.0
    T, cols = X.shape
    a = np.pad(np.abs(X.astype(np.float64)), ((0, 0), (0, -cols % t.group))).reshape(T, -1, t.group)
    half_step = np.repeat(a.max(axis=2) / (2 * steps), t.group, axis=1)[:, :cols]
    return half_step @ np.abs(t.dequantize().astype(np.float64)).T


def rows_with_gaps(rows: np.ndarray, stride: int, gap_value) -> np.ndarray:
    """[n, k] -> float32[n * stride]: each row at a multiple of `stride`, `gap_value` between them."""
    out = np.full((rows.shape[0], stride), gap_value, np.float32)
    out[:, :rows.shape[1]] = rows
    return out.ravel()


def check_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = ~(np.abs(got - want) <= tol)      # NaN (an unwritten output) counts as bad
    if bad.any():
        i = np.flatnonzero(bad)
        raise AssertionError(f"{what}: {bad.sum()}/{bad.size} outside tolerance; first at {i[:8].tolist()}: "
                             f"got {got.flat[i[:4]].tolist()} expected {want.flat[i[:4]].tolist()} "
                             f"tol {np.broadcast_to(tol, want.shape).flat[i[:4]].tolist()}")


# ---------------------------------------------------------------- matrix.cl

def run_gemv(q, kernel: str, t: Tensor, geometry: str, X: np.ndarray, g=None, Y0=None,
             activation_bits: int = 16) -> np.ndarray:
    """Upload `t` and launch `kernel` over the rows of X [T, cols], bound by the model's launcher; returns
    Y [T, n_out] (n_out = t.rows, or t.rows / 2 for gemv_norm_swiglu). Rows of x and y lie apart with gaps:
    NaN in x's (they must not be read), a sentinel in y's (they must not be written)."""
    T = X.shape[0]
    dt = DeviceTensor(q, t, "w", GEOMETRIES[geometry][0], activation_bits=activation_bits)
    n_out = t.rows // 2 if kernel == "gemv_norm_swiglu" else t.rows
    x_stride, y_stride = dt.cols_p + 16, n_out + 5
    xp = np.zeros((T, dt.cols_p), np.float32)
    xp[:, :t.cols] = X                                    # zero padding up to cols_p, as the contract says
    xb = q.buffer(host=rows_with_gaps(xp, x_stride, np.nan))
    sentinel = np.float32(-4242.0)
    y0 = Y0 if Y0 is not None else np.full((T, n_out), np.nan, np.float32)
    yb = q.buffer(host=rows_with_gaps(y0, y_stride, sentinel))
    norm = {} if g is None else dict(g=q.buffer(host=np.pad(f32(g), (0, dt.cols_p - t.cols))).read(),
                                     eps=np.float32(EPS))
    y = yb.read_write() if kernel == "gemv_add" else yb.write()
    q.enqueue(kernels.gemv(q, kernel, dt, T, xb.read(), y, x_stride, y_stride, **norm))
    y = yb.get().reshape(T, y_stride)
    assert (y[:, n_out:] == sentinel).all(), f"{kernel} wrote between the rows of y"
    return y[:, :n_out]


@pytest.mark.parametrize("kernel", GEMV_KERNELS)
@pytest.mark.parametrize("fmt,geometry,mode", GEMV_PARAMS, ids=["-".join(p) for p in GEMV_PARAMS])
def test_gemv_kernels(q, fmt, geometry, mode, kernel):
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {geometry} {mode} {kernel}".encode()))
    T = (GEOMETRIES[geometry][0].decode_rows if mode.startswith("decode") else FEW_ROWS.get(mode.split("-")[0])
         or GEOMETRIES[geometry][-1])
    bits = 8 if mode.endswith("x8") else 16
    for rows, cols in SHAPES:
        what = f"{kernel} {fmt} {geometry} {GEOMETRIES[geometry]} T={T} {bits}-bit x [{rows}x{cols}]"
        t = FORMATS[fmt](rng.standard_normal((rows, cols)).astype(np.float32))
        rtol = gemv_rtol(t.cols_padded if t.kind != "f32" else round_up(cols, 8))
        X = rng.standard_normal((T, cols)).astype(np.float32)
        if kernel == "gemv_add":
            Y0 = rng.standard_normal((T, rows)).astype(np.float32)
            got = run_gemv(q, kernel, t, geometry, X, Y0=Y0, activation_bits=bits)
            want = X.astype(np.float64) @ t.dequantize().astype(np.float64).T + Y0
            tol = rtol * (error_scale(t, np.abs(X).T).T + np.abs(Y0)) + x_rounding(t, X, bits) + GEMV_ATOL
            check_close(got, want, tol, what)
            continue
        g = (1 + 0.5 * rng.standard_normal(cols)).astype(np.float32)
        X64 = X.astype(np.float64)
        XN = X64 * g / np.sqrt(np.mean(X64 ** 2, axis=1, keepdims=True) + EPS)   # mean over the real cols

        def normed(t):
            a = XN @ t.dequantize().astype(np.float64).T
            return a, rtol * error_scale(t, np.abs(XN).T).T + x_rounding(t, XN, bits) + GEMV_ATOL + NORM_RTOL * np.abs(a)
        if kernel == "gemv_norm":
            got = run_gemv(q, kernel, t, geometry, X, g=g, activation_bits=bits)
            check_close(got, *normed(t), what)
            continue
        # gemv_norm_swiglu: t is the gate (w1), up (w3) has the same shape, fused as Llama fuses them
        up_t = FORMATS[fmt](rng.standard_normal((rows, cols)).astype(np.float32))
        fused = fuse_rows([t, up_t], GEOMETRIES[geometry][0].tile_rows // 2)
        got = run_gemv(q, kernel, fused, geometry, X, g=g, activation_bits=bits)
        (gate, tol_g), (up, tol_u) = normed(t), normed(up_t)
        sig = 1 / (1 + np.exp(-gate))
        want = gate * sig * up
        dsilu = np.abs(sig * (1 + gate * (1 - sig)))      # |d silu / d gate| <= 1.1
        tol = dsilu * np.abs(up) * tol_g + np.abs(gate * sig) * tol_u + SWIGLU_RTOL * np.abs(want) + SWIGLU_ATOL
        check_close(got[:, :rows], want, tol, what)
        # the zero rows that pad the last tile give silu(0) * 0, into the activation's zero padding
        assert not got[:, rows:].any(), f"{what}: padding outputs {got[:, rows:]} must be 0"


@pytest.mark.parametrize("fmt", ["q8g32", "int4asym32", "int5asym32f-q5k"])
def test_prefetch_distance_changes_no_result(q, monkeypatch, fmt):
    """work_group.decode_prefetch and prefill_prefetch (matrix.cl's PREFETCH_COLS, tuned per CPU) only say how far
    ahead the weights are prefetched: every distance, none included, gives the same results bit for bit, in decode
    and prefill, and each program is built with its phase's distance."""
    rng = np.random.default_rng(zlib.crc32(fmt.encode()))
    rows, cols = SHAPES[-1]
    t = FORMATS[fmt](rng.standard_normal((rows, cols)).astype(np.float32))
    base, prefill_T = GEOMETRIES["cpu"]
    got = {}
    for decode, prefill in ((0, 0), (128, 512), (512, 128), (1024, 1024)):
        geo = dataclasses.replace(base, decode_prefetch=decode, prefill_prefetch=prefill)
        monkeypatch.setitem(GEOMETRIES, "cpu", (geo, prefill_T))
        dt = DeviceTensor(q, t, "w", geo)
        assert all(f"PREFETCH_COLS={decode if n == 1 else prefill}" in d for n, d in dt.defines.items())
        for T in (1, prefill_T):
            X = rng.standard_normal((T, cols)).astype(np.float32) if (decode, prefill) == (0, 0) else got[T, "x"]
            got[T, "x"] = X
            y = run_gemv(q, "gemv_add", t, "cpu", X, Y0=np.zeros((T, rows), np.float32))
            if (T, "y") in got:
                assert np.array_equal(y, got[T, "y"]), f"{fmt} T={T}: prefetch {decode}/{prefill} changed the sums"
            got[T, "y"] = y


# matrix.cl picks x86 instructions by the macros the compiler defines for the target (VNNI, AVX-512 F16C,
# AVX2 pmaddwd) and plain OpenCL C otherwise. This host takes the first paths; the others, which AVX2-only
# CPUs and GPUs take, are built here by #undef-ing those macros at the top of a copy of the kernels.
ISA_FALLBACKS = {"avx512-no-vnni": ["__AVX512VNNI__", "VNNI_ASM"],
                 "avx2": ["__AVX512VNNI__", "__AVX512F__", "__AVX512BW__", "__AVXVNNI__"],
                 "generic": ["__AVX512VNNI__", "__AVX512F__", "__AVX512BW__", "__AVX2__"]}


@pytest.mark.parametrize("fmt", ["q8g32", "int4asym32", "int4asym16f-q2k", "int5g32-q50", "int5asym32f-q5k",
                                 "int4asym32-x8", "int5asym32f-q5k-x8"])      # -x8: with 8-bit activations
@pytest.mark.parametrize("isa", list(ISA_FALLBACKS))
def test_gemv_isa_fallbacks(q, tmp_path, monkeypatch, isa, fmt):
    kernels = tmp_path / "cl_kernels"
    shutil.copytree(program.KERNEL_DIR, kernels)
    matrix = kernels / "matrix.cl"
    matrix.write_text("".join(f"#undef {m}\n" for m in ISA_FALLBACKS[isa]) + matrix.read_text())
    monkeypatch.setattr(program, "KERNEL_DIR", kernels)
    fq = Queue(q.device, q.config, out_of_order=False)
    rng = np.random.default_rng(zlib.crc32(f"{isa} {fmt}".encode()))
    rows, cols = SHAPES[-1]
    bits = 8 if fmt.endswith("-x8") else 16
    t = FORMATS[fmt.removesuffix("-x8")](rng.standard_normal((rows, cols)).astype(np.float32))
    for T in (1, GEOMETRIES["cpu"][-1]):                  # the decode and the prefill program
        X = rng.standard_normal((T, cols)).astype(np.float32)
        Y0 = rng.standard_normal((T, rows)).astype(np.float32)
        got = run_gemv(fq, "gemv_add", t, "cpu", X, Y0=Y0, activation_bits=bits)
        want = X.astype(np.float64) @ t.dequantize().astype(np.float64).T + Y0
        tol = (gemv_rtol(t.cols_padded) * (error_scale(t, np.abs(X).T).T + np.abs(Y0)) + x_rounding(t, X, bits)
               + GEMV_ATOL)
        check_close(got, want, tol, f"gemv_add {fmt} without {ISA_FALLBACKS[isa]} T={T}")


# The inline-assembly VNNI paths against the paths they replace, as prefixes of matrix.cl: (the CPU flags they need,
# the VNNI side's, the plain side's). zmm: what the probe sets on an AVX-512 target (VNNI_ASM), against pmaddwd on zmm;
# ymm: the AVX2 path's, AVX-VNNI (AVXVNNI_ASM), against pmaddwd on two ymm, built here by #undef-ing AVX-512; ymm-evex:
# the AVX2 path's on CPUs with AVX-512 VNNI instead (AVXVNNI_ASM and VNNI_EVEX).
AVX2_ONLY = "".join(f"#undef {m}\n" for m in ("__AVX512VNNI__", "__AVX512F__", "__AVX512BW__", "__AVXVNNI__", "VNNI_ASM",
                                               "AVXVNNI_ASM", "VNNI_EVEX"))
VNNI_ASM_SIDES = {"zmm": ({"avx512_vnni"}, "", "#undef VNNI_ASM\n"),
                  "ymm": ({"avx_vnni"}, AVX2_ONLY + "#define AVXVNNI_ASM\n", AVX2_ONLY),
                  "ymm-evex": ({"avx512_vnni", "avx512vl"}, AVX2_ONLY + "#define AVXVNNI_ASM\n#define VNNI_EVEX\n",
                               AVX2_ONLY)}


@pytest.mark.parametrize("fmt", ["q8g32", "int4asym32", "int5asym32f-q5k", "int4asym32-x8", "int5g32-q50-x8"])
@pytest.mark.parametrize("flavor", list(VNNI_ASM_SIDES))
def test_vnni_asm_sums_as_pmaddwd_does(q, tmp_path, monkeypatch, flavor, fmt):
    """On a CPU whose VNNI the compiler does not target, matrix.cl multiplies through inline assembly (the probe's
    VNNI_ASM or AVXVNNI_ASM, dpllama/runtime/device.py): vpdpwssd (vpdpbusd for 8-bit activations) must give the
    pmaddwd path's (pmaddubsw's) results bit for bit, in decode and prefill, so a model's output does not depend on
    which path the CPU takes."""
    flags, vnni, plain = VNNI_ASM_SIDES[flavor]
    probe = q.device.probe()
    if not (probe.vnni_asm and flags <= host_cpu_flags()) or (flavor == "zmm" and probe.defines != ("VNNI_ASM",)):
        pytest.skip(f"no {flavor} VNNI through inline assembly here (the CPU lacks {' or '.join(sorted(flags))}, or the "
                    "compiler targets VNNI itself, or not the instruction set of this flavor's path)")
    dirs = []
    for side, prefix in (("vnni", vnni), ("plain", plain)):
        dirs.append(tmp_path / side)
        shutil.copytree(program.KERNEL_DIR, dirs[-1])
        (dirs[-1] / "matrix.cl").write_text(prefix + (dirs[-1] / "matrix.cl").read_text())
    rng = np.random.default_rng(zlib.crc32(f"{flavor} {fmt}".encode()))
    rows, cols = SHAPES[-1]
    t = FORMATS[fmt.removesuffix("-x8")](rng.standard_normal((rows, cols)).astype(np.float32))
    bits = 8 if fmt.endswith("-x8") else 16
    for T in (1, GEOMETRIES["cpu"][-1]):
        X = rng.standard_normal((T, cols)).astype(np.float32)
        Y0 = rng.standard_normal((T, rows)).astype(np.float32)
        got = []
        for d in dirs:
            monkeypatch.setattr(program, "KERNEL_DIR", d)
            got.append(run_gemv(Queue(q.device, q.config, out_of_order=False), "gemv_add", t, "cpu", X, Y0=Y0,
                                activation_bits=bits))
        assert np.array_equal(*got), f"{flavor} {fmt} T={T}: VNNI and pmaddwd differ by {np.abs(got[0] - got[1]).max()}"


def test_gemv_where_the_rows_do_not_fit_local_memory(q, monkeypatch):
    """Where a work-group's input rows would take more than half the device's local memory, CPU geometries fall back
    to a work-group per run of tiles, each preparing its input per block (matrix.cl without X_ONCE): still W x."""
    monkeypatch.setattr(type(q.device), "local_mem_size", property(lambda self: 1024))
    rng = np.random.default_rng(7)
    rows, cols = SHAPES[-1]                       # 520 columns: 2 KiB a row, more than half of 1 KiB
    t = FORMATS["int4asym32"](rng.standard_normal((rows, cols)).astype(np.float32))
    dt = DeviceTensor(q, t, "w", GEOMETRIES["cpu"][0])
    assert not any(dt.once.values()) and not any("X_ONCE" in d for d in dt.defines.values())
    for T in (1, GEOMETRIES["cpu"][-1]):
        X = rng.standard_normal((T, cols)).astype(np.float32)
        Y0 = rng.standard_normal((T, rows)).astype(np.float32)
        got = run_gemv(q, "gemv_add", t, "cpu", X, Y0=Y0)
        want = X.astype(np.float64) @ t.dequantize().astype(np.float64).T + Y0
        tol = gemv_rtol(t.cols_padded) * (error_scale(t, np.abs(X).T).T + np.abs(Y0)) + x_rounding(t, X) + GEMV_ATOL
        check_close(got, want, tol, f"gemv_add without X_ONCE T={T}")


def test_gemv_real_q4_k_m_tensors(q):
    """Qwen2.5-Coder-0.5B Q4_K_M's tensors of each quantized type (Q5_0, Q8_0, Q6_K, Q4_K), decode and prefill,
    against the NumPy product with gguf's dequantization (test_loaders checks that the repack equals it)."""
    g = read_gguf(qwen_gguf_path())
    rng = np.random.default_rng(5)
    for ggml_type, name in QWEN_TENSORS.items():
        raw = g.tensors[name]
        t = GGUF_REPACK[ggml_type](raw.data, *raw.shape)
        for T in (1, GEOMETRIES["cpu"][-1]):
            X = rng.standard_normal((T, t.cols)).astype(np.float32)
            Y0 = np.zeros((T, t.rows), np.float32)
            got = run_gemv(q, "gemv_add", t, "cpu", X, Y0=Y0)
            want = X.astype(np.float64) @ t.dequantize().astype(np.float64).T
            tol = gemv_rtol(t.cols_padded) * error_scale(t, np.abs(X).T).T + x_rounding(t, X) + GEMV_ATOL
            check_close(got, want, tol, f"gemv_add {name} ({ggml_type.name}) T={T}")


EMBED_PARAMS = [(fmt, geo) for geo in ("cpu", "gpu") for fmt in GEOMETRY_FORMATS[geo]]


@pytest.mark.parametrize("fmt,geometry", EMBED_PARAMS, ids=["-".join(p) for p in EMBED_PARAMS])
def test_embed(q, fmt, geometry):
    """Rows of the table by token id; an id -1 - i takes chosen[i] (a batch's token chosen on the device by the
    batch before), and a chosen -1 (logits that were not finite) row 0; fed gets the ids of the rows embedded."""
    geo = GEOMETRIES[geometry][0]
    rng = np.random.default_rng(7)
    vocab, T, pos = 23, 5, 2                      # vocab not a multiple of the tile height
    tokens = np.array([9, 9, 5, -2, vocab - 1, -1, 0, 11], np.int32)
    chosen = np.array([-1, 17], np.int32)
    rows = [5, 17, vocab - 1, 0, 0]               # tokens[pos:pos + T] with chosen's in
    for cols in (172, 200, 64, 1, 8, 520):
        t = FORMATS[fmt](rng.standard_normal((vocab, cols)).astype(np.float32))
        dt = DeviceTensor(q, t, "emb", geo)
        stride = dt.cols_p + 16
        xb = q.buffer(host=np.zeros(T * stride, np.float32))
        fb = q.buffer(host=np.full(T + 1, -9, np.int32))
        q.enqueue(kernels.embed(q, dt, T, q.buffer(host=tokens), q.buffer(host=np.array([pos, 1], np.int32)),
                                q.buffer(host=chosen), xb, stride, fb))
        np.testing.assert_array_equal(fb.get(np.int32), rows + [-9])
        x = xb.get().reshape(T, stride)
        want = t.dequantize()[rows]
        np.testing.assert_allclose(x[:, :cols], want, rtol=EMBED_RTOL, atol=EMBED_RTOL * np.abs(want).max(),
                                   err_msg=f"embed {fmt} tile_rows={geo.tile_rows} cols={cols}")
        assert not x[:, cols:].any(), f"embed {fmt} cols={cols}: the padding of x must stay zero"


# ---------------------------------------------------------------- attention.cl, sampling.cl, state.cl

def rope_reference(x: np.ndarray, pos: int, head_dim: int, theta: float) -> np.ndarray:
    """Rotate (x[j], x[j+1]), j even, by pos * theta^(-(j % head_dim) / head_dim), in float64."""
    x = x.astype(np.float64)
    j = np.arange(0, x.size, 2)
    angle = pos * float(theta) ** (-(j % head_dim) / head_dim)
    c, s = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[0::2] = x[0::2] * c - x[1::2] * s
    out[1::2] = x[0::2] * s + x[1::2] * c
    return out


ROPE_SHAPES = [(6, 2, 8), (4, 4, 64), (1, 1, 8), (3, 1, 6)]   # (n_heads, n_kv_heads, head_dim)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("geometry", ["cpu", "gpu"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("pos", [0, 1, 37])
@pytest.mark.parametrize("theta", [10000.0, 100000.0])
@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", ROPE_SHAPES)
def test_gemv_norm_rope_kv(q, n_heads, n_kv_heads, head_dim, theta, pos, T, geometry, bias):
    """T tokens at positions pos..pos+T-1 through the fused QKV projection: q rotated into y, k rotated
    and v stored as they are into layer 1 of 2 of the caches (keys in the geometry's blocks of positions, values
    [seq_p][kv_dim], attention.h). The weight is the identity, so the projection is rmsnorm(x) (covered with real
    weights by test_gemv_kernels) and every difference is the rotation's or the storing's. With `bias` the
    QKV_BIAS build adds a bias to every row before the rotation; without, its bias argument is never read
    (NaN there)."""
    rng = np.random.default_rng(pos + n_heads + T)
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    rows = q_dim + 2 * kv_dim
    seq_p = 48
    offset = kv_dim * seq_p                       # the second layer's part of the caches
    geo = GEOMETRIES[geometry][0]
    dt = DeviceTensor(q, Tensor.f32(np.eye(rows, dtype=np.float32)), "wqkv", geo,
                      (("QKV_BIAS",) if bias else ()) + cache_defines("f16", geo.key_block))
    B = rng.standard_normal(rows).astype(np.float32) if bias else np.full(rows, np.nan, np.float32)
    X = rng.standard_normal((T, rows)).astype(np.float32)
    x_stride, y_stride = dt.cols_p + 16, q_dim + 5
    xp = np.zeros((T, dt.cols_p), np.float32)
    xp[:, :rows] = X
    sentinel = np.float32(-99)
    xb = q.buffer(host=rows_with_gaps(xp, x_stride, np.nan))
    yb = q.buffer(host=np.full(T * y_stride, sentinel, np.float32))
    cache0 = np.full(2 * kv_dim * seq_p, sentinel, np.float16)       # fp16 (attention.h)
    kb, vb = q.buffer(host=cache0), q.buffer(host=cache0)
    q.enqueue(kernels.gemv(q, "gemv_norm_rope_kv", dt, T, xb.read(), yb.write(), x_stride, y_stride,
                           g=q.buffer(host=np.ones(dt.cols_p, np.float32)).read(), eps=np.float32(EPS),
                           bias=q.buffer(host=B).read(), k_cache=kb.read_write(), v_cache=vb.read_write(),
                           state=q.buffer(host=np.array([pos, 1], np.int32)).read(),
                           rope=q.buffer(host=rope_table(seq_p, head_dim, theta)).read(),
                           **kernels.ints(q_dim=q_dim, kv_dim=kv_dim, head_dim=head_dim, seq_p=seq_p,
                                          cache_offset=offset, slot_stride=0)))
    Y = yb.get().reshape(T, y_stride)
    assert (Y[:, q_dim:] == sentinel).all(), "wrote beyond q in y"
    K = keys_by_channel(kb.get(np.float16)[offset:], kv_dim, geo.key_block).astype(np.float32)
    V = vb.get(np.float16)[offset:].reshape(seq_p, kv_dim).astype(np.float32)
    for n in range(T):
        p = pos + n
        what = (f"rope {geometry} heads={n_heads}/{n_kv_heads} hd={head_dim} theta={theta} token {n} at pos {p}"
                f"{' with bias' if bias else ''}")
        x = X[n].astype(np.float64)
        normed = x / np.sqrt(np.mean(x * x) + EPS)
        biased = normed + B if bias else normed
        # the roundings scale with the magnitudes of the terms (the bias's and the projection's), even where
        # they cancel; with the bias the add's rounding is within ROPE_RTOL's share
        mag = np.abs(normed) + np.abs(B) if bias else np.abs(normed)
        for name, got, rows_of in (("q", Y[n, :q_dim], slice(0, q_dim)), ("k", K[:, p], slice(q_dim, q_dim + kv_dim))):
            part, m = biased[rows_of], mag[rows_of]
            want = rope_reference(part, p, head_dim, theta)
            pair_len = np.repeat(np.hypot(part[0::2], part[1::2]), 2)
            pair_mag = np.repeat(np.hypot(m[0::2], m[1::2]), 2)
            tol = ROPE_ANGLE_ATOL_PER_POS * p * pair_len + (ROPE_RTOL + NORM_RTOL) * pair_mag + 1e-7
            if name == "k":                                 # then rounded to fp16 in the cache
                tol += F16_RTOL * (np.abs(want) + tol) + F16_ATOL
            check_close(got, want, tol, f"{what}: {name}")
        v_tol = NORM_RTOL * mag[q_dim + kv_dim:] + 1e-7
        check_close(V[p], biased[q_dim + kv_dim:], v_tol + F16_RTOL * (np.abs(biased[q_dim + kv_dim:]) + v_tol) + F16_ATOL,
                    f"{what}: v must be stored as it is, in fp16")
    written = np.zeros(seq_p, bool)
    written[pos:pos + T] = True
    assert (K[:, ~written] == sentinel).all() and (V[~written] == sentinel).all(), \
        "gemv_norm_rope_kv wrote other positions of the cache"
    assert (kb.get(np.float16)[:offset] == sentinel).all() and (vb.get(np.float16)[:offset] == sentinel).all(), \
        "gemv_norm_rope_kv wrote another layer's cache"


@pytest.mark.parametrize("geometry", ["cpu", "gpu"])
def test_gemv_norm_rope_kv_skips_padding_rows(q, geometry):
    """A batch's rows through the fused QKV projection, placed by a table of {pos, slot} (two slots of two layers):
    each real row's k and v land at its position in its slot's layer 1, and a padding row (position -1,
    Llama.padded_rows) writes neither the cache nor its q row."""
    n_heads, n_kv_heads, head_dim, seq_p = 2, 1, 8, 16
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    rows = q_dim + 2 * kv_dim
    where = [(4, 0), (-1, 0), (7, 1)]
    T = len(where)
    geo = GEOMETRIES[geometry][0]
    dt = DeviceTensor(q, Tensor.f32(np.eye(rows, dtype=np.float32)), "wqkv", geo, cache_defines("f16", geo.key_block))
    X = np.random.default_rng(3).standard_normal((T, rows)).astype(np.float32)
    xp = np.zeros((T, dt.cols_p), np.float32)
    xp[:, :rows] = X
    sentinel = np.float32(-99)
    yb = q.buffer(host=np.full(T * q_dim, sentinel, np.float32))
    cache0 = np.full(2 * 2 * kv_dim * seq_p, sentinel, np.float16)    # [slot][layer][...]
    kb, vb = q.buffer(host=cache0), q.buffer(host=cache0)
    q.enqueue(kernels.gemv(q, "gemv_norm_rope_kv", dt, T, q.buffer(host=xp).read(), yb.write(), dt.cols_p, q_dim,
                           g=q.buffer(host=np.ones(dt.cols_p, np.float32)).read(), eps=np.float32(EPS),
                           bias=q.buffer(host=np.full(rows, np.nan, np.float32)).read(), k_cache=kb.read_write(),
                           v_cache=vb.read_write(), state=q.buffer(host=np.array(where, np.int32).ravel()).read(),
                           rope=q.buffer(host=rope_table(seq_p, head_dim, 10000.0)).read(),
                           **kernels.ints(q_dim=q_dim, kv_dim=kv_dim, head_dim=head_dim, seq_p=seq_p,
                                          cache_offset=kv_dim * seq_p, slot_stride=2 * kv_dim * seq_p)))
    Y = yb.get().reshape(T, q_dim)
    assert (Y[1] == sentinel).all() and (Y[[0, 2]] != sentinel).all()
    K = np.stack([keys_by_channel(layer, kv_dim, geo.key_block)
                  for layer in kb.get(np.float16).reshape(4, kv_dim * seq_p)]).reshape(2, 2, kv_dim, seq_p)
    V = vb.get(np.float16).reshape(2, 2, seq_p, kv_dim)
    k_written = {(s, layer, p) for s, layer, _, p in zip(*np.nonzero(K != sentinel))}
    v_written = {(s, layer, p) for s, layer, p, _ in zip(*np.nonzero(V != sentinel))}
    assert k_written == v_written == {(0, 1, 4), (1, 1, 7)}, (k_written, v_written)


ATT_SHAPES = [(1, 1, 8), (2, 2, 64), (4, 2, 8), (6, 2, 8), (12, 4, 64), (3, 1, 6)]   # (n_heads, n_kv, hd)
# (positions per vector, work-items per group, grouped, key block): grouped builds with GQA, a work-group of one
# work-item per key/value head (attend_heads: CPUs), the others a work-group per query head (attend); the keys in
# blocks of 16 positions (KEY_BLOCK, the CPU configs') or in one (0, the GPU configs'), each kernel both ways, and
# with 4 positions a vector 4 of them to a block. Each (ATTENTION_POSITIONS, HD_VEC) pair is a build, so
# ATTENTION_POSITIONS 4 runs with head_dim 8 only (HD_VEC 8)
ATT_GEOMETRIES = [(16, 1, True, 16), (4, 1, True, 0), (16, 1, False, 16), (16, 64, False, 0), (4, 16, False, 16)]


ATT_PARAMS = [(*shape, *geometry) for shape in ATT_SHAPES for geometry in ATT_GEOMETRIES
              if geometry[0] == 16 or shape[2] == 8]


@pytest.mark.parametrize("rows", ["sequence", "table", "padded"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("pos", [0, 5, 100])
@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,pos_vec,local,grouped,key_block", ATT_PARAMS)
def test_attention(q, n_heads, n_kv_heads, head_dim, pos_vec, local, grouped, key_block, pos, T, rows):
    """T query tokens attending causally over layer 1 of 2 of the caches; GQA: query head h reads kv head
    h // (n_heads / n_kv_heads). Rows of one sequence (state {pos, n_prompt}): token n at position pos + n (a
    prefill chunk when T > 1), in the one slot. Rows of a batch (state a table of {pos, slot} per row,
    attention.h's ROW_POS): row n at position pos + 3n of slot n % 2, each reading only its own slot; "padded":
    the batch's last row is padding (position -1, Llama.padded_rows), whose output row is left as it was. Grouped
    builds take the positions in spans of 32 (attention.h), so a row at 100 folds 4: with the CPU configs' key blocks
    in a work-group per span (attention.cl's split launch, whose counts must end at 0 again), else in turn."""
    rng = np.random.default_rng(pos * 7 + n_heads + local + T)
    seq_p = 112                                   # a multiple of every ATTENTION_POSITIONS, > 100 + 3 * 3
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    qkv_stride, out_stride = q_dim + 2 * kv_dim + 16, round_up(q_dim, 16) + 16    # out rows: vector stores
    offset = kv_dim * seq_p
    slots, slot_stride = (1, 0) if rows == "sequence" else (2, 2 * kv_dim * seq_p)
    where = [(pos + n, 0) for n in range(T)] if rows == "sequence" else [(pos + 3 * n, n % 2) for n in range(T)]
    if rows == "padded":
        where[-1] = (-1, 0)
    state = np.array([pos, 1] if rows == "sequence" else [v for w in where for v in w], np.int32)
    Q = (2 * rng.standard_normal((T, q_dim))).astype(np.float32)        # peaky enough for softmax to matter
    qkv = np.zeros((T, q_dim + 2 * kv_dim), np.float32)
    qkv[:, :q_dim] = Q
    kcache = rng.standard_normal(slots * 2 * kv_dim * seq_p).astype(np.float16)   # [slot][layer][keys' layout]
    vcache = rng.standard_normal(slots * 2 * seq_p * kv_dim).astype(np.float16)   # [slot][layer][seq_p][kv_dim]
    sentinel = np.float32(-77)
    out0 = np.full((T, q_dim), np.nan, np.float32)
    out0[[n for n, (p, _) in enumerate(where) if p < 0]] = 5.0     # a padding row's: to stay as it is
    outb = q.buffer(host=rows_with_gaps(out0, out_stride, sentinel))
    span, hd_vec = 32, pow2_divisor(head_dim)
    spans = -(-seq_p // span) if grouped and key_block else 1        # work-groups per key/value head and row
    prog = attention_program(q, pos_vec, hd_vec, n_heads // n_kv_heads if grouped else None, key_block, span)
    folds = q.buffer(host=np.zeros(T * n_kv_heads, np.int32))
    q.submit(prog.attention, (n_kv_heads * spans if grouped else n_heads * local, T), (local, 1),
             q.buffer(host=rows_with_gaps(qkv, qkv_stride, np.nan)).read(),
             q.buffer(host=kcache).read(), q.buffer(host=vcache).read(), q.buffer(T * n_heads * seq_p * 4).read_write(),
             outb.write(), q.buffer(host=state).read(), np.int32(n_heads),
             np.int32(n_kv_heads), np.int32(head_dim), np.int32(seq_p), np.int32(qkv_stride), np.int32(out_stride),
             np.int32(offset), np.int32(slot_stride), Local(local * 4),
             q.buffer(T * n_heads * -(-seq_p // span) * (head_dim + hd_vec) * 4).read_write(), folds.read_write())
    out = outb.get().reshape(T, out_stride)
    assert (folds.get() == 0).all(), "the split launch left its counts of spans done"
    assert (out[:, q_dim:] == sentinel).all(), "attention wrote between the rows of out"

    group = n_heads // n_kv_heads
    want = np.empty((T, q_dim))
    for n, (p, slot) in enumerate(where):
        if p < 0:
            continue
        layer = slot * 2 * kv_dim * seq_p + offset
        K = keys_by_channel(kcache[layer:layer + kv_dim * seq_p], kv_dim, key_block).astype(np.float64)
        V = vcache[layer:layer + kv_dim * seq_p].reshape(seq_p, kv_dim).astype(np.float64)
        for h in range(n_heads):
            kv = slice((h // group) * head_dim, (h // group + 1) * head_dim)
            s = Q[n, h * head_dim:(h + 1) * head_dim].astype(np.float64) @ K[kv, :p + 1] / np.sqrt(head_dim)
            w = np.exp(s - s.max())
            want[n, h * head_dim:(h + 1) * head_dim] = (w / w.sum()) @ V[:p + 1, kv]
    real = [n for n, (p, _) in enumerate(where) if p >= 0]
    assert (out[[n for n in range(T) if n not in real], :q_dim] == 5.0).all(), "attention wrote a padding row"
    check_close(out[real, :q_dim], want[real], ATT_ATOL_REL * np.abs(vcache).max(),
                f"attention heads={n_heads}/{n_kv_heads} hd={head_dim} pos={pos} T={T} {rows} "
                f"ATTENTION_POSITIONS={pos_vec} L={local}{' grouped' if grouped else ''}")


# attention.h reads the fp16 cache with AVX-512's conversion, with F16C's (AVX2 CPUs) or with vload_half (GPUs, other
# CPUs); the last two are built here as test_gemv_isa_fallbacks builds matrix.cl's. The shapes take every vector
# width: 16 and 4 positions, 64 (16 at a time), 8 and 6 (2 at a time) head dimensions.
ATTENTION_ISA_FALLBACKS = {"f16c": ["__AVX512F__"], "vload_half": ["__AVX512F__", "__F16C__"]}


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,pos_vec,local,grouped,key_block",
                         [(2, 2, 64, 16, 1, True, 16), (6, 2, 8, 4, 16, False, 0), (3, 1, 6, 16, 1, True, 16)])
@pytest.mark.parametrize("isa", list(ATTENTION_ISA_FALLBACKS))
def test_attention_isa_fallbacks(q, tmp_path, monkeypatch, isa, n_heads, n_kv_heads, head_dim, pos_vec, local,
                                 grouped, key_block):
    kernels = tmp_path / "cl_kernels"
    shutil.copytree(program.KERNEL_DIR, kernels)
    source = kernels / "attention.cl"
    source.write_text("".join(f"#undef {m}\n" for m in ATTENTION_ISA_FALLBACKS[isa]) + source.read_text())
    monkeypatch.setattr(program, "KERNEL_DIR", kernels)
    test_attention(Queue(q.device, q.config, out_of_order=False), n_heads, n_kv_heads, head_dim, pos_vec, local,
                   grouped, key_block, pos=37, T=4, rows="table")


@pytest.mark.parametrize("geometry", ["cpu", "solo"])
@pytest.mark.parametrize("isa", list(ATTENTION_ISA_FALLBACKS))
def test_gemv_norm_rope_kv_isa_fallbacks(q, tmp_path, monkeypatch, isa, geometry):
    """matrix.cl's store_qkv converts a tile to the cache's fp16 with AVX-512's instruction (the tests above, on an
    AVX-512 machine), with F16C's (AVX2 CPUs; tiles of 16 rows and of 8: the "solo" geometry) or value by value
    with vstore_half_rte (other CPUs): each the same rounding."""
    kernels = tmp_path / "cl_kernels"
    shutil.copytree(program.KERNEL_DIR, kernels)
    source = kernels / "matrix.cl"
    source.write_text("".join(f"#undef {m}\n" for m in ATTENTION_ISA_FALLBACKS[isa]) + source.read_text())
    monkeypatch.setattr(program, "KERNEL_DIR", kernels)
    test_gemv_norm_rope_kv(Queue(q.device, q.config, out_of_order=False), 4, 4, 64, 10000.0, pos=37, T=3,
                           geometry=geometry, bias=True)


def draw_geometry(local: int) -> Geometry:
    """A geometry whose draws (sampling.cl) take work-groups of `local` work-items: 1 as the CPU configs' (single
    work-items, built with SOLO), more as the GPU configs' (the config's reduce)."""
    return geometry(16, 1 if local == 1 else 64, 4, 8, 16, reduce=local)


@pytest.mark.parametrize("fmt", ["q8g32", "int4g32", "int4asym128", "q8asym32-q51", "int5g32-q50"])
@pytest.mark.parametrize("local", [1, 64, 256])
@pytest.mark.parametrize("n", [1, 5, 97, 1000, 4096])
def test_choose_embed_greedy(q, n, local, fmt):
    """Greedy sampling (a draw of temperature 0): the first index of the largest logit goes to tokens[pos + 1]
    unless that slot holds a prompt token, pos advances, and the row of the token now at pos + 1 is embedded into x
    (a q8 table, an int4 symmetric and an asymmetric one: `quantize --keep-8bit none` makes the tied classifier int4).
    Logits with a NaN, an infinity at the top or nothing above -inf give -1 and embed row 0 (issue 11: they
    gave index 0x7fffffff with fewer than 16 logits, and a read far past the table)."""
    rng = np.random.default_rng(n + local)
    cols = 40                                   # padded to a whole group (64 or 128): x[cols:] must stay as it is
    table = FORMATS[fmt](rng.standard_normal((max(n, 110), cols)).astype(np.float32))
    emb = DeviceTensor(q, table, "emb", draw_geometry(local))
    assert kernels.draw_items(emb.geometry) == local
    for trial in range(10):
        logits = rng.standard_normal(n).astype(np.float32)
        if trial == 1:
            logits[rng.integers(0, n, max(1, n // 3))] = -np.inf
        if trial >= 2 and n > 1:               # a tie for the maximum at 2..4 indices
            ties = rng.choice(n, size=min(n, trial), replace=False)
            logits[ties] = logits.max() + 1
        if trial == 5 and n >= 65:             # the smaller index in a later work-item, the larger in item 0,
            logits[:] = 0                      # and 5 and 21 share a vector lane (5 comes first)
            logits[[64, 21, 5]] = 1
        if trial == 6:                         # not all finite: -1 (the host reports it), and row 0 embedded
            logits[rng.integers(0, n)] = np.nan
        if trial == 7:
            logits[:] = np.nan
        if trial == 8:
            logits[:] = -np.inf
        if trial == 9:
            logits[rng.integers(0, n)] = np.inf
        expected = int(np.flatnonzero(logits == logits.max())[0]) if np.isfinite(logits).all() else -1
        pos, n_prompt = 3, 5 if trial == 1 else 2   # trial 1: pos + 1 < n_prompt, a prompt token's slot
        tokens0 = np.arange(100, 110, dtype=np.int32)
        tb = q.buffer(host=tokens0)
        sb = q.buffer(host=np.array([pos, n_prompt], np.int32))
        xb = q.buffer(host=np.full(emb.cols_p, 7.0, np.float32))
        q.enqueue(kernels.choose_embed(q, emb, q.buffer(host=logits), tb, sb,
                                       q.buffer(host=np.zeros(kernels.DRAW_PARAMS, np.float32)), xb, n,
                                       q.buffer(2 * round_up(n, 16) * 4)))
        want_tokens = tokens0.copy()
        if pos + 1 >= n_prompt:
            want_tokens[pos + 1] = expected
        what = f"n={n} L={local} trial {trial}"
        np.testing.assert_array_equal(tb.get(np.int32), want_tokens, err_msg=what)
        np.testing.assert_array_equal(sb.get(np.int32), [pos + 1, n_prompt])
        x = xb.get()
        np.testing.assert_allclose(x[:cols], table.dequantize()[max(want_tokens[pos + 1], 0)], rtol=EMBED_RTOL,
                                   err_msg=what)
        assert (x[cols:] == 7.0).all(), what


def no_windows(q) -> tuple:
    """choose_rows' penalty arguments for rows without penalties (a window of 0 tokens each): window, W, fed."""
    return q.buffer(host=np.zeros(1, np.int32)), 1, q.buffer(host=np.zeros(1, np.int32))


@pytest.mark.parametrize("local", [1, 64])
@pytest.mark.parametrize("n", [5, 97, 1000])
def test_choose_rows_greedy(q, n, local):
    """A batch's greedy rows: chosen[r] = the first index of the largest logit of row r, rows 16-float aligned
    (round_up(n, 16) apart) with garbage between; -1 for a NaN anywhere or an infinity at the top, as
    test_choose_embed_greedy's (-inf below a finite top is a masked logit, not an error). A row the host draws
    (a negative temperature) is left as it was: its chosen entry and its logits."""
    rng = np.random.default_rng(n + local)
    stride = (n + 15) // 16 * 16
    logits = rng.standard_normal((9, stride)).astype(np.float32)
    logits[:, n:] = 1e30                        # past each row's end: never taken
    logits[1, rng.integers(0, n, max(1, n // 3))] = -np.inf
    logits[2, rng.choice(n, size=min(n, 3), replace=False)] = logits[2, :n].max() + 1    # a tie
    logits[3, rng.integers(0, n)] = np.nan
    logits[4, :n] = np.nan
    logits[5, :n] = -np.inf
    logits[6, rng.integers(0, n)] = np.inf
    logits[7, :n] = 0.0
    logits[8, n - 1] = 9.0                      # the last logit (in the n % 16 tail where there is one)
    emb = DeviceTensor(q, FORMATS["q8g32"](rng.standard_normal((8, 32)).astype(np.float32)), "emb",
                       draw_geometry(local))
    for m in (1, 9):
        cb = q.buffer(host=np.full(9, 77, np.int32))
        draws = np.zeros((9, kernels.DRAW_PARAMS), np.float32)
        draws[7, 0] = -1.0                      # the host's row
        lb = q.buffer(host=logits)
        q.enqueue(kernels.choose_rows(q, emb, lb, m, n, stride, q.buffer(host=draws), *no_windows(q), cb,
                                      q.buffer(2 * 9 * stride * 4)))
        want = [int(np.flatnonzero(r == r.max())[0]) if np.isfinite(r.max()) else -1 for r in logits[:m, :n]]
        want = [77 if r == 7 else w for r, w in enumerate(want)]
        np.testing.assert_array_equal(cb.get(np.int32), want + [77] * (9 - m), err_msg=f"n={n} L={local} m={m}")
        np.testing.assert_array_equal(lb.get().reshape(9, stride), logits, err_msg="a greedy draw changed its logits")


def reference_draw(logits: np.ndarray, temperature: float, top_p: float, coin: float, slack: float,
                   top_k: int = 0) -> set[int]:
    """The tokens a sampled draw (sampling.cl, dpllama.generate.Sampler.sample) may give: in float64, the softmax
    at the temperature; with 0 < top_k < n the top_k most likely tokens (ties: lower index first), with 0 < top_p < 1
    the candidates (of them) p >= min((1 - top_p) / (n - 1), max p), in descending order (ties: lower index first),
    cut after the first whose running sum passes top_p; with neither every token in index order. The coin takes the
    first whose running sum passes coin x their total. Every boundary that lies within `slack` of what it is
    compared with may go either way (the device sums in float32, in its own order). The top k's edge is not one of
    them: the device compares single values, each within (2 max|x| + 8) 2^-24 of its own (slack's share for one
    value), and the k-th and the next are asserted to be equal or further apart than that."""
    x = (logits.astype(np.float64) - logits.max()) / temperature
    p = np.exp(x) / np.exp(x).sum()
    n = p.size
    ranked = np.lexsort((np.arange(n), -p))
    kept = np.arange(n)
    if 0 < top_k < n:
        kth, nxt = p[ranked[top_k - 1]], p[ranked[top_k]]
        assert kth == nxt or kth - nxt > (2 * np.abs(x).max() + 8) * 2.0 ** -24 * kth, "a top-k edge within rounding"
        kept = ranked[:top_k]
    if 0.0 < top_p < 1.0:
        cand = np.intersect1d(kept, np.flatnonzero(p >= min((1.0 - top_p) / max(n - 1, 1), p.max()) * (1 - slack)))
        order = cand[np.lexsort((cand, -p[cand]))]
    elif 0 < top_k < n:
        order = kept
    else:
        order = np.arange(n)
    cum = np.cumsum(p[order])
    if 0.0 < top_p < 1.0:       # the nucleus may end at any candidate whose running sum is within slack of top_p
        # (or at the last, where the top k's sum does not pass it)
        ends = range(min(int(np.searchsorted(cum, top_p - slack, side="right")), len(order) - 1),
                     min(int(np.searchsorted(cum, top_p + slack, side="right")), len(order) - 1) + 1)
    else:
        ends = [len(order) - 1]
    ok = set()
    for end in ends:
        u = coin * cum[end]
        below = np.concatenate([[0.0], cum[:end]])          # each one's running sum before it
        ok |= {int(order[j]) for j in range(end + 1) if below[j] - slack <= u <= cum[j] + slack}
        if u >= cum[end] - slack:                           # a coin past the total by rounding takes the last
            ok.add(int(order[end]))
    return ok


@pytest.mark.parametrize("local", [1, 64])
@pytest.mark.parametrize("n", [5, 97, 1000, 4101])
def test_choose_rows_sampled(q, n, local):
    """A batch's sampled rows: the token drawn at a temperature, with top-k and top-p or without, by a coin, against
    the float64 draw (reference_draw), rows of peaked, flat and tied logits (a flat row's candidates are all n; the
    top k of flat and tied ones are the first of the ties).
    The device's float32 values and sums differ from exact ones by at most (n / local + log2(local) + 2 max|x| + 8)
    units of 2^-24 of the total: each exp's argument x = (l - max) / T is two roundings (an ulp of x: |x| 2^-23 of
    e = exp(x)), exp itself a few ulps, each work-item's run summed in order, a tree of local of them. So a
    boundary within that of its comparison may go either way; every other draw is the reference's. The row is left
    as exp((l - max) / T), each value within that too."""
    rng = np.random.default_rng(n * 3 + local)
    stride = (n + 15) // 16 * 16
    emb = DeviceTensor(q, FORMATS["q8g32"](rng.standard_normal((8, 32)).astype(np.float32)), "emb",
                       draw_geometry(local))
    rows = [3 * rng.standard_normal(n), 8 * rng.standard_normal(n), np.zeros(n), rng.standard_normal(n)]
    rows[3][rng.choice(n, size=min(n, 4), replace=False)] = rows[3].max() + 2     # a tie at the top
    cases = [(r, t, p, k, c) for r in range(len(rows))
             for t, p, k in [(1.0, 0.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 0), (0.5, 0.999, 0), (1.0, 0.0, 3),
                             (0.8, 0.0, 40), (0.9, 0.95, 2), (1.1, 0.9, 40), (0.6, 0.999, n - 1), (1.0, 0.0, n)]
             for c in (rng.random(), 0.0, 1.0 - 2.0 ** -24)]
    logits = np.zeros((len(cases), stride), np.float32)
    draws = np.zeros((len(cases), kernels.DRAW_PARAMS), np.float32)
    for i, (r, t, p, k, c) in enumerate(cases):
        logits[i, :n] = rows[r]
        draws[i, :5] = (t, p, c, (1.0 - p) / max(n - 1, 1), k)
    cb = q.buffer(host=np.full(len(cases), -7, np.int32))
    lb = q.buffer(host=logits)
    q.enqueue(kernels.choose_rows(q, emb, lb, len(cases), n, stride, q.buffer(host=draws), *no_windows(q), cb,
                                  q.buffer(2 * len(cases) * stride * 4)))
    got = cb.get(np.int32)
    left = lb.get().reshape(len(cases), stride)[:, :n]
    for i, (r, t, p, k, c) in enumerate(cases):
        x = (logits[i, :n].astype(np.float64) - logits[i, :n].max()) / t
        slack = (n / local + np.log2(local) + 2 * np.abs(x).max() + 8) * 2.0 ** -24
        ok = reference_draw(logits[i, :n], t, p, c, slack, k)
        assert int(got[i]) in ok, (f"n={n} L={local} row {r} T={t} top_p={p} top_k={k} coin={c}: drew {got[i]}, "
                                   f"not in {sorted(ok)[:8]}")
        # (below float32's normal range, 2^-126, its values keep only absolute precision)
        np.testing.assert_allclose(left[i], np.exp(x), rtol=slack, atol=2.0 ** -126,
                                   err_msg="the row is left as exp((l - max) / T)")



# the last two overflow float32 (a logit of 4 divided by 1e-38, -4 times 1e38): held to the finite floats
PENALTIES = [(1.1, 0.0, 0.0), (1.3, 0.5, 0.25), (1.0, -0.7, 0.0), (0.8, 0.0, 1.5), (1.0, 0.0, -0.3),
             (1e-38, 0.5, 0.0), (1e38, 0.0, 0.25)]


@pytest.mark.parametrize("local", [1, 64])
@pytest.mark.parametrize("n", [5, 97, 1000])
def test_penalties_on_device_are_the_hosts(q, n, local):
    """The penalties (sampling.cl's penalize: repetition, presence, frequency) on the device give the host's
    Sampler.penalize bit for bit, in a batch's rows (choose_rows: each row's own window, with repeats, tokens at the
    row's ends and -1 - i entries taken from the pass's fed tokens) and in a sequence's step (choose_embed: the window
    the sequence's latest tokens, cut to its length at the start). A greedy row is left as the penalized logits, and
    its token is their argmax."""
    rng = np.random.default_rng(n * 7 + local)
    stride = round_up(n, 16)
    emb = DeviceTensor(q, FORMATS["q8g32"](rng.standard_normal((n, 32)).astype(np.float32)), "emb", draw_geometry(local))
    fed = rng.integers(0, n, 12).astype(np.int32)
    m, W = len(PENALTIES) * 2, 40
    logits = (4 * rng.standard_normal((m, stride))).astype(np.float32)
    logits[:, :n][rng.random((m, n)) < 0.3] *= -1.0
    window = np.zeros((m, W), np.int32)
    draws = np.zeros((m, kernels.DRAW_PARAMS), np.float32)
    histories = []
    for i in range(m):
        w = [1, 7, W][i % 3] if n > 5 else [1, 3, W][i % 3]
        ids = rng.integers(0, min(n, 6) if i % 2 else n, w)         # odd rows: many repeats
        ids[0], ids[-1] = 0, n - 1
        marks = rng.random(w) < 0.2                                 # a fed row's token, resolved on the device
        window[i, :w] = np.where(marks, -1 - np.arange(w) % len(fed), ids)
        histories.append([int(fed[(-1 - e)]) if e < 0 else int(e) for e in window[i, :w]])
        draws[i, 5:] = (*PENALTIES[i // 2], w)
    lb = q.buffer(host=logits)
    cb = q.buffer(host=np.full(m, -7, np.int32))
    q.enqueue(kernels.choose_rows(q, emb, lb, m, n, stride, q.buffer(host=draws), q.buffer(host=window), W,
                                  q.buffer(host=fed), cb, q.buffer(2 * m * stride * 4)))
    left, got = lb.get().reshape(m, stride)[:, :n], cb.get(np.int32)
    for i, history in enumerate(histories):
        rp, pp, fp = PENALTIES[i // 2]
        want = Sampler(temperature=0, repeat_penalty=rp, presence_penalty=pp, frequency_penalty=fp,
                       repeat_last_n=len(history)).penalize(logits[i, :n], history)
        assert not np.array_equal(want, logits[i, :n]), "the case must change the logits"
        np.testing.assert_array_equal(left[i], want, err_msg=f"n={n} L={local} row {i}: penalized logits")
        assert got[i] == int(np.argmax(want)), f"n={n} L={local} row {i}"
    # a sequence's step: the window is tokens[pos - w + 1 .. pos], w the parameter's, at most pos + 1
    for pos, w in ((9, 4), (2, 40)):
        tokens = rng.integers(0, n, 16).astype(np.int32)
        row = logits[0, :n].copy()
        draw = np.zeros(kernels.DRAW_PARAMS, np.float32)
        draw[5:] = (1.3, 0.5, 0.25, w)
        lb, tb = q.buffer(host=row), q.buffer(host=tokens)
        q.enqueue(kernels.choose_embed(q, emb, lb, tb, q.buffer(host=np.array([pos, 0], np.int32)),
                                       q.buffer(host=draw), q.buffer(emb.cols_p * 4), n, q.buffer(2 * stride * 4)))
        want = Sampler(temperature=0, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                       repeat_last_n=w).penalize(row, list(tokens[:pos + 1]))
        np.testing.assert_array_equal(lb.get(), want, err_msg=f"choose_embed pos={pos} w={w}")
        assert tb.get(np.int32)[pos + 1] == int(np.argmax(want))


@pytest.mark.parametrize("n", [5, 97, 4101])
def test_host_draw_is_the_devices_twin(n):
    """The host's draw (Sampler.pick, for what the device cannot draw: penalties, kept logits) against the same float64
    reference as the device's (reference_draw): top-k and top-p, ties, the draw's order. Its float32 sums run over up
    to n values in order: a slack of (n + 2 max|x| + 8) units of 2^-24, the device's at one work-item."""
    rng = np.random.default_rng(n)
    rows = [3 * rng.standard_normal(n), np.zeros(n), rng.standard_normal(n)]
    rows[2][rng.choice(n, size=min(n, 4), replace=False)] = rows[2].max() + 2     # a tie at the top
    for r, row in enumerate(rows):
        logits = row.astype(np.float32)
        for t, p, k in [(1.0, 0.0, 0), (0.7, 0.9, 0), (1.0, 0.0, 3), (0.8, 0.0, 40), (0.9, 0.95, 2), (1.1, 0.9, 40)]:
            for seed in range(3):
                sampler = Sampler(temperature=t, top_p=p, top_k=k, seed=seed)
                coin = XorShift(seed).f32()         # the coin pick draws first
                x = (logits.astype(np.float64) - logits.max()) / t
                slack = (n + 2 * np.abs(x).max() + 8) * 2.0 ** -24
                ok = reference_draw(logits, t, p, coin, slack, k)
                got = sampler.pick(logits, [])
                assert got in ok, (f"n={n} row {r} T={t} top_p={p} top_k={k} coin={coin}: drew {got}, "
                                   f"not in {sorted(ok)[:8]}")

def test_advance(q):
    prog = q.program("state.cl")
    sb = q.buffer(host=np.array([7, 3], np.int32))
    for n in (1, 1, 5):
        q.submit(prog.advance, (1,), None, sb.read_write(), np.int32(n))
    np.testing.assert_array_equal(sb.get(np.int32), [14, 3])
