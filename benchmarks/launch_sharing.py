"""How a CPU driver shares short kernels between its threads: what limits a batched decode step on PoCL.

    PYTHONPATH=. python benchmarks/launch_sharing.py [--device cpu] [--launches 150] [--rounds 5]

A chain of launches on one in-order queue, as a forward pass is (SmolLM2's step of 8 rows: 151 launches of 10 to
100 us of one thread's work each), of a kernel that only spins (check.cl's slow_add), at several amounts of work
per launch split into 4 or 16 work-groups. Each amount is timed with the driver's every thread and, for PoCL,
again in a process limited to one thread (POCL_MAX_PTHREAD_COUNT=1); the speedup is their ratio. Two threads
ideally halve the time; on PoCL 3.1 a launch of under ~20 us gets nothing from the second one, whose worker
sleeps between kernels and wakes too late (docs/PERFORMANCE.md, "Serving"). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from dpllama.runtime import open_queue

WORK_US = (10, 20, 40, 80, 160)     # one thread's work per launch
GROUPS = (4, 16)


def chain_times(device: str | None, launches: int, rounds: int) -> dict[str, float]:
    """Microseconds per launch, median over `rounds` chains, for every (work, groups): {"work/groups": us}."""
    q = open_queue(device)
    prog = q.program("check.cl")
    x, y = q.buffer(host=np.zeros(16, np.float32)), q.buffer(host=np.zeros(16, np.float32))

    def per_launch(groups: int, spin: int) -> float:
        cmd = q.command(prog.slow_add, (groups,), (1,), x.read(), y.write(), np.float32(1), np.int32(groups),
                        np.int32(spin))
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            q.replay([cmd] * launches)
            q.wait()
            times.append((time.perf_counter() - t) / launches * 1e6)
        return statistics.median(times)

    per_launch(1, 1000)                                     # compiled and warm
    spins_per_us = 200_000 / per_launch(1, 200_000)        # one work-group alone: one thread's pace
    return {f"{w}/{g}": per_launch(g, max(1, round(spins_per_us * w / g))) for w in WORK_US for g in GROUPS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device")
    ap.add_argument("--launches", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)     # the one-thread child's output
    args = ap.parse_args()
    times = chain_times(args.device, args.launches, args.rounds)
    if args.json:
        print(json.dumps(times))
        return 0
    q = open_queue(args.device)
    one = None
    if "Portable Computing Language" in q.device.platform:
        child = subprocess.run([sys.executable, __file__, "--json", "--launches", str(args.launches), "--rounds",
                                str(args.rounds)] + (["--device", args.device] if args.device else []),
                               capture_output=True, text=True, env={**os.environ, "POCL_MAX_PTHREAD_COUNT": "1"})
        one = json.loads(child.stdout) if child.returncode == 0 else None
    print(f"{q.device} ({q.device.compute_units} compute units), chains of {args.launches} launches")
    print("work a launch | work-groups | all threads us/launch" + (" | one thread | speedup" if one else ""))
    for key, us in times.items():
        w, g = key.split("/")
        extra = f" | {one[key]:6.1f} | {one[key] / us:4.2f}x" if one else ""
        print(f"{w:>10} us | {g:>11} | {us:8.1f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
