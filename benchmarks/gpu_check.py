"""One command for a machine with a GPU: is dpllama right there, and how fast, as a share of what the GPU reads.

    python benchmarks/gpu_check.py                       # the best device (a GPU where there is one)
    python benchmarks/gpu_check.py --device gpu:1 --out gpu_check.json

Steps, each bounded in time, each result in the JSON written to --out (default gpu_check.json):
1. the device listing and `dpllama devices --check` (small kernels against NumPy, read bandwidth);
2. the kernel and forward-pass tests (tests/test_kernels.py, tests/test_forward.py) on that device;
3. the greedy oracles: stories260K through `dpllama generate`, byte for byte against llama2.c's run.c;
4. `bench` on SmolLM2-135M with kernel profiling, and its weight GB/s as a share of the device's measured read
   bandwidth (the roofline for decode, which reads every weight once per token).
It finishes within --budget seconds (default 480) and exits 1 when a check failed. It runs on a CPU too (that
is how it is tested), where it only says less about GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_pytest(args: list[str], env: dict, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=max(timeout, 1))
        last = (r.stdout.strip().splitlines() or [""])[-1]
        out = {"passed": r.returncode == 0, "summary": last}
        if r.returncode:
            out["tail"] = r.stdout[-2000:] + r.stderr[-1000:]
    except subprocess.TimeoutExpired:
        out = {"passed": False, "summary": f"stopped after {timeout:.0f} s (the budget)"}
    return {**out, "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", help="a device selector (default: the device dpllama picks)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from dpllama.commands import bench, devices
    from dpllama.errors import DpllamaError
    from dpllama.runtime import open_queue

    start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if args.device:
        env["DPLLAMA_DEVICE"] = args.device
    report: dict = {"device_selector": args.device}

    def step(name: str, fn) -> None:
        print(f"gpu_check: {name} ({left():.0f} s left) ...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except DpllamaError as e:
            report[name] = {"passed": False, "error": str(e)}

    step("devices", lambda: devices.as_dict(devices.survey(args.device)))
    step("check", lambda: {"passed": True, **devices.check(args.device)})
    # the shares of the budget leave the bench its minutes; a step that runs out says so and fails
    step("kernel_tests", lambda: run_pytest(["tests/test_kernels.py", "tests/test_forward.py"], env, 0.45 * left()))
    step("greedy_oracles", lambda: run_pytest(["tests/test_cli.py::test_generate_matches_llama2c_byte_for_byte"],
                                              env, 0.2 * left()))

    def speed() -> dict:
        r = bench.bench("smollm2-135m", args.device, None, profile=True, progress=False)
        bw = devices.read_bandwidth_gb_s(open_queue(args.device))
        return {"passed": True, **r, "read_bandwidth_gb_s": bw, "weight_gb_s_share": r["weight_gb_s"] / bw}
    step("bench", speed)

    report["seconds"] = round(time.perf_counter() - start, 1)
    report["passed"] = all(report[k].get("passed", True) for k in ("check", "kernel_tests", "greedy_oracles", "bench"))
    Path(args.out).write_text(json.dumps(report, indent=2))
    b = report["bench"]
    print(f"gpu_check: {'passed' if report['passed'] else 'FAILED'} in {report['seconds']} s, written to {args.out}")
    for k in ("check", "kernel_tests", "greedy_oracles"):
        print(f"  {k:15} {'ok' if report[k].get('passed') else 'FAILED'}  {report[k].get('summary', '')}")
    if b.get("passed"):
        print(f"  bench           decode {b['decode_tok_s']:.1f} tok/s = {b['weight_gb_s']:.1f} GB/s of weights, "
              f"{100 * b['weight_gb_s_share']:.0f}% of the {b['read_bandwidth_gb_s']:.0f} GB/s read bandwidth; "
              f"prompt {b['prompt_tok_s']:.0f} tok/s")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
