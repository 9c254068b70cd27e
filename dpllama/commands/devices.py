"""`dpllama devices`: every OpenCL device with the facts to choose by, the one dpllama would use and
why the others were passed over, the config that applies; optionally a written config and a check run.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpllama.commands.options import add_device
from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output, check_output
from dpllama.runtime import (Device, DeviceConfig, Local, OpenCLError, build_stats, choose_device, list_devices,
                             open_queue, select_device, shipped_config_for)
from dpllama.runtime.config import dump_config

CHECK_N = 1 << 16       # axpy length: big enough to use every compute unit, small enough to be instant


@dataclass
class Survey:
    devices: list[Device]
    chosen: Device | None       # None when no device's compiler works
    reasons: dict[int, str]     # device index -> "selected: ..." / "not selected: ..."
    config: DeviceConfig | None     # the config that applies to `chosen`
    error: str = ""             # why there is no device to use


def survey(selector: str | None = None, config: str | None = None) -> Survey:
    """The choice open_queue() makes (runtime.choose_device), with every device listed."""
    devices = list_devices()
    if all(d.probe().error for d in devices):      # listed all the same, with the compilers' complaints
        try:
            select_device(selector, devices)
        except DpllamaError as e:
            return Survey(devices, None, {d.index: "not usable: see kernels" for d in devices}, None, str(e))
    return Survey(devices, *choose_device(selector, config, devices))


def config_path(cfg: DeviceConfig) -> str | None:
    return None if cfg.path == "<defaults>" else cfg.path


def size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def device_config(s: Survey, dev: Device) -> str | None:
    if dev is not s.chosen and dev.probe().error:
        return None
    return config_path(s.config if dev is s.chosen else shipped_config_for(dev))


def kernels(dev: Device) -> str:
    """The kernel path and why (the compiler's macros), or why the device cannot build kernels at all."""
    p = dev.probe()
    return f"unusable: its compiler fails on a one-line kernel: {p.error}" if p.error else p.why


def render(s: Survey) -> str:
    lines, platform = [], None
    for dev in s.devices:
        f = dev.facts()
        if (f["platform"], f["platform_version"]) != platform:
            platform = f["platform"], f["platform_version"]
            lines += [""] * bool(lines) + [f"Platform: {f['platform']} ({f['platform_version']})"]
        mark = "*" if dev is s.chosen else " "
        rows = [
            ("selector", f"{f['selector']} or {f['index']}"),
            ("type, vendor", f"{f['type']}, {f['vendor']}"),
            ("driver", f"{f['driver']} ({f['opencl']})"),
            ("compute", f"{f['compute_units']} units at {f['clock_mhz']} MHz, "
                        f"work-groups up to {f['max_work_group_size']}"),
            ("memory", f"{size(f['global_mem_bytes'])} global, {size(f['max_alloc_bytes'])} max allocation, "
                       f"{size(f['local_mem_bytes'])} local"),
            ("features", f"fp16 {yes_no(f['fp16'])}, int8 dot {yes_no(f['int8_dot'])}, "
                         f"subgroups {yes_no(f['subgroups'])}, out-of-order queue {yes_no(f['out_of_order_queue'])}"),
            ("kernels", kernels(dev)),
            ("config", "none: it cannot build kernels" if dev.probe().error
                       else device_config(s, dev) or "built-in defaults (no shipped config matches)"),
        ]
        lines += [f" {mark} device {f['index']}: {f['name']}", f"     {s.reasons[dev.index]}"]
        lines += [f"     {k:<13} {v}" for k, v in rows]
    lines += [""]
    if s.chosen is None:
        return "\n".join(lines + [f"dpllama: error: {s.error}"])
    lines += [f"dpllama uses device {s.chosen.index}: {s.chosen} with config "
              f"{config_path(s.config) or 'built-in defaults'}.",
              "Choose another with --device SELECTOR or $DPLLAMA_DEVICE (cpu, gpu, gpu:1, 2, "
              "platform=NAME, vendor=NAME, name~TEXT, isa=avx2)."]
    return "\n".join(lines)


def as_dict(s: Survey) -> dict:
    devices = [{**dev.facts(), "selected": dev is s.chosen, "reason": s.reasons[dev.index],
                "kernel_path": None if dev.probe().error else dev.kernel_path, "isa_macros": list(dev.probe().macros),
                "vnni_asm": dev.probe().vnni_asm, "compiler_error": dev.probe().error,
                "config": device_config(s, dev)} for dev in s.devices]
    return {"devices": devices, "selected": s.chosen and s.chosen.index,
            "config": s.config and config_path(s.config), **({"error": s.error} if s.error else {})}


def substring(text: str) -> str:
    """A match value for `text`: matching is by substring, and a comma would split the selector
    ("Advanced Micro Devices, Inc." -> "Advanced Micro Devices")."""
    return text.split(",")[0].strip()


def config_output(path: str, inputs=()) -> Path:
    """Where write_config is to write `path`, checked before the work that makes the config (tune's takes minutes):
    its folder exists, and it can take the file without replacing one of `inputs` (check_output)."""
    if not Path(path).parent.is_dir():
        raise DpllamaError(f"{path}: cannot write config: folder {Path(path).parent} does not exist")
    return check_output(path, inputs)


def write_config(target: Path, dev: Device, cfg: DeviceConfig, origin: str = "dpllama devices --write-config",
                 note: str = "") -> Path:
    """`cfg` with `match` naming exactly `dev`, written atomically to `target` (config_output's): a reader never sees
    half a file."""
    values = copy.deepcopy(cfg.values)
    values["match"] = {"type": dev.type, "platform": substring(dev.platform),
                       "vendor": substring(dev.cl_device.vendor), "name": substring(dev.name)}
    text = (f"# dpllama device config for {dev}, written by `{origin}`\n"
            f"# from {config_path(cfg) or 'the built-in defaults'}; docs/CONFIG.md explains every key.\n"
            + note + dump_config(values))
    try:
        with atomic_output(target) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise DpllamaError(f"{target}: cannot write config: {e.strerror}") from None
    return target


def verify(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        i = int(np.argmax(bad))
        raise DpllamaError(f"check failed: {name}: {int(bad.sum())} of {want.size} values wrong, "
                           f"first at index {i}: expected {want[i]:.6g}, got {got[i]:.6g}")


def check(selector: str | None = None, config: str | None = None) -> dict:
    """axpy, then group_sums over axpy's output (a read-after-write edge), on the selected device
    through the runtime, compared with NumPy. Raises DpllamaError on a wrong answer."""
    q = open_queue(selector, config, profiling=True)
    compiled = build_stats["compiled"]
    t = time.perf_counter()
    prog = q.program("check.cl")
    build_s = time.perf_counter() - t
    wg = q.config.work_group("reduce")    # the reduction size this device's config asks for
    rng = np.random.default_rng(0)
    x = rng.standard_normal(CHECK_N, dtype=np.float32)
    y = rng.standard_normal(CHECK_N, dtype=np.float32)
    a = np.float32(2.5)
    groups = CHECK_N // wg
    try:
        xb, yb, sums = q.buffer(host=x, name="x"), q.buffer(host=y, name="y"), q.buffer(4 * groups, name="sums")
        axpy = q.submit(prog.axpy, (CHECK_N,), None, xb.read(), yb.read_write(), a, np.int32(CHECK_N))
        reduce = q.submit(prog.group_sums, (groups * wg,), (wg,), yb.read(), sums.write(), Local(4 * wg))
        want = a * x + y
        verify("axpy", yb.get(), want, rtol=1e-5, atol=1e-5)
        verify("group_sums", sums.get(), want.reshape(groups, wg).sum(axis=1, dtype=np.float64),
               rtol=1e-4, atol=1e-4)
        times = {"axpy_ms": axpy.duration_ns / 1e6, "group_sums_ms": reduce.duration_ns / 1e6,
                 "read_gb_s": read_bandwidth_gb_s(q)}
    except OpenCLError as e:
        raise DpllamaError(f"check failed on {q.device}: {e}") from None
    return {"passed": True, "device": str(q.device), "floats": CHECK_N, "work_group": wg,
            "build": "compiled" if build_stats["compiled"] > compiled else "loaded from cache",
            "build_s": build_s, **times}


def read_bandwidth_gb_s(q, nbytes: int = 1 << 27, slices: int = 256, repeat: int = 5) -> float:
    """The device's streaming read bandwidth: the best of `repeat` runs of a kernel that sums a buffer
    far larger than any cache (the roofline for a decode step, which reads every weight once)."""
    prog = q.program("check.cl")
    n16 = nbytes // (64 * slices)
    x = q.buffer(host=np.ones(slices * n16 * 16, np.float32), name="stream")
    out = q.buffer(4 * slices, name="sums")
    best = float("inf")
    for _ in range(repeat):
        q.wait()
        t = time.perf_counter()
        q.submit(prog.read_sum, (slices,), None, x.read(), out.write(), np.int32(n16))
        q.wait()
        best = min(best, time.perf_counter() - t)
    verify("read_sum", out.get(), np.full(slices, 16.0 * n16, np.float32), rtol=0, atol=0)
    return slices * n16 * 64 / best / 1e9


def check_line(r: dict) -> str:
    return (f"check passed: axpy on {r['floats']} floats {r['axpy_ms']:.3f} ms, group_sums in work-groups "
            f"of {r['work_group']} {r['group_sums_ms']:.3f} ms, read bandwidth {r['read_gb_s']:.1f} GB/s, "
            f"check.cl {r['build']} in {r['build_s']:.2f} s, on {r['device']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device(p, ctx=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--write-config", metavar="PATH",
                   help="write a YAML config for the selected device, to edit and pass as --config")
    p.add_argument("--check", action="store_true",
                   help="run small kernels on the selected device and compare with NumPy")


def run(args: argparse.Namespace) -> int:
    return devices(args.device, args.config, as_json=args.json, write_path=args.write_config, run_check=args.check)


def devices(selector: str | None = None, config: str | None = None, as_json: bool = False,
            write_path: str | None = None, run_check: bool = False) -> int:
    """The listing, then the check, then the written config: a config is written only for a device
    that passed the check when both are asked for."""
    s = survey(selector, config)
    # before the check: a config cannot replace the one it comes from
    target = write_path and config_output(write_path, (s.config and config_path(s.config),))
    out = as_dict(s)
    if not as_json:
        print(render(s), flush=True)    # the listing shows even when the check below fails
    if s.chosen is None:
        if as_json:
            print(json.dumps(out, indent=2))
        return 1
    if run_check:
        out["check"] = check(selector, config)
        if not as_json:
            print(check_line(out["check"]))
    if write_path:
        out["written_config"] = str(write_config(target, s.chosen, s.config))
        if not as_json:
            print(f"wrote {out['written_config']}")
    if as_json:
        print(json.dumps(out, indent=2))
    return 0
