"""gemv (gemv_add) speed of each device weight format, as each GGUF type loads it: one input row a launch, as in decode.

    PYTHONPATH=. python benchmarks/gemv_formats.py [--device cpu] [--rounds 7] [--launches 50] [--copies 1] [--tokens 1]

Two shapes of Qwen2.5-Coder-0.5B's FFN: [4864 x 896] (gate/up: rows of 896 take no K-quant, so Q5_0 or Q8_0)
and [896 x 4864] (down: Q4_K or Q6_K). Matrices of random blocks (tests/helpers.gguf_tensor; speed does not
depend on the values). The formats are timed in turn, round after round (a shared, noisy machine drifts: each
round sees them all), and each reports its median over the rounds: microseconds per launch, GB/s of the bytes
it stores (data, scales, mins), and its time relative to q8 group 32 (Q8_0) of the same shape. One matrix of a
format stays in the CPU's cache from launch to launch; `--copies N` cycles through N distinct matrices of it
(N x 2.5-5.5 MB), so that with N x 2.5 MB well beyond the last-level cache each launch reads its weights from
memory, as a model's decode step does. `--tokens T` gives each launch T input rows, as the server's batched steps
(T = the running streams) and prompt passes have them: each weight is decoded once for all T, and the table adds
the multiply-adds a second (G MAC/s), which at 8 rows the integer multiply-adds bound rather than the bytes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from gguf import GGMLQuantizationType as GT

from dpllama.model import kernels
from dpllama.model.layout import DeviceTensor, Geometry
from dpllama.runtime import open_queue
from tests.helpers import gguf_tensor

SHAPES = {"4864x896": (4864, 896, [GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1]),
          "896x4864": (896, 4864, [GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q4_K, GT.Q6_K, GT.Q5_K, GT.Q3_K, GT.Q2_K])}


def describe(t) -> str:
    return (f"{t.kind} g{t.group}" + (" asym" if t.mins is not None else "")
            + (" f32-scales" if t.kind != "q8" and t.scales.dtype == np.float32 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--launches", type=int, default=50)
    ap.add_argument("--copies", type=int, default=1, help="distinct matrices per format, launched in turn")
    ap.add_argument("--tokens", type=int, default=1, help="input rows per launch (default 1: decode)")
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error(f"--tokens must be at least 1, not {args.tokens}")
    q = open_queue(args.device, out_of_order=False, profiling=False)
    geo = Geometry.of(q.config)
    print(f"{q.device}, tile_rows {geo.tile_rows}; median of {args.rounds} rounds of {args.launches} launches"
          f" over {args.copies} matrices per format, {args.tokens} input row(s) a launch")
    rng = np.random.default_rng(0)
    for shape, (rows, cols, types) in SHAPES.items():
        cases = []
        for ggml_type in types:
            cmds = []
            for _ in range(args.copies):
                t = gguf_tensor(rng, ggml_type, rows, cols)
                dt = DeviceTensor(q, t, ggml_type.name, geo)
                x = q.buffer(host=rng.standard_normal(dt.cols_p * args.tokens).astype(np.float32))
                y = q.buffer(host=np.zeros(rows * args.tokens, np.float32))
                cmds.append(kernels.gemv(q, "gemv_add", dt, args.tokens, x.read(), y.read_write(), dt.cols_p, rows))
                q.enqueue(cmds[-1])     # built and warm
            q.wait()
            cases.append((ggml_type.name, describe(t), dt.nbytes, cmds, []))
        for _ in range(args.rounds):
            for *_, cmds, times in cases:
                start = time.perf_counter()
                for i in range(args.launches):
                    q.enqueue(cmds[i % len(cmds)])
                q.wait()
                times.append((time.perf_counter() - start) / args.launches)
        base = statistics.median(cases[0][-1])
        print(f"\n[{shape}]  {'type':6} {'device format':22} {'MB':>6} {'us':>8} {'GB/s':>7} {'G MAC/s':>8} "
              f"{'time / Q8_0':>11}")
        for name, fmt, nbytes, _, times in cases:
            s = statistics.median(times)
            print(f"{'':12}{name:6} {fmt:22} {nbytes / 1e6:6.2f} {s * 1e6:8.1f} {nbytes / s / 1e9:7.2f} "
                  f"{rows * cols * args.tokens / s / 1e9:8.1f} {s / base:11.2f}")


if __name__ == "__main__":
    main()
