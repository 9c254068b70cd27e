"""Device discovery and selection: every OpenCL device, the facts a user chooses by, and why one wins.

Selector strings (comma-separated terms, all must hold):
    cpu | gpu | accelerator      device type
    gpu:1                        the second device of that type (in listing order)
    3                            the fourth device overall
    platform=NVIDIA              platform name contains (case-insensitive)
    vendor=Intel                 device vendor contains
    name~Arc                     device name contains
    isa=avx2                     kernel path contains (avx512-vnni, avx512, avx2-vnni, avx2, portable:
                                 Device.kernel_path)
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyopencl as cl

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.paths import dpllama_home
from dpllama.signals import signals_held

NO_PLATFORM_HELP = (
    "no OpenCL platform found: install one, e.g. PoCL's CPU driver with "
    "`pip install 'dpllama[pocl]'` (package pocl-binary-distribution), or your GPU vendor's OpenCL ICD "
    "(NVIDIA driver, intel-opencl-icd, ROCm's rocm-opencl-runtime)")

# What the device's compiler predefines for its target: matrix.cl takes its instruction-set path from these
ISA_MACROS = ("__AVX512VNNI__", "__AVX512BW__", "__AVX512F__", "__AVXVNNI__", "__AVX2__", "__FMA__", "__F16C__",
              "__AVX__", "__SSE4_1__")
PROBE_SOURCE = ("__kernel void isa(__global int *flags) {\n"
                + "".join(f"#ifdef {m}\n    flags[{i}] = 1;\n#endif\n" for i, m in enumerate(ISA_MACROS)) + "}\n")


class AsmPath(NamedTuple):
    """A CPU can have VNNI (integer dot products: vpdpwssd, vpdpbusd) that its driver's compiler does not target: PoCL
    3.1's LLVM 15 builds for AMD Zen 4 and Zen 5 as skylake-avx512, the pip PoCL 3.0's LLVM 14 for Zen 4 as znver3
    (AVX2). There matrix.cl reaches it through inline assembly, once `probe` has run the instruction and got its sums
    right (probe_vnni_asm): for the AVX-512 path, AVX-512 VNNI on a zmm (-DVNNI_ASM); for the AVX2 path, on a ymm,
    AVX-VNNI's VEX form (-DAVXVNNI_ASM; Intel since Alder Lake, AMD Zen 5) or else AVX-512 VNNI's EVEX form, which
    needs AVX-512 VL too (-DAVXVNNI_ASM -DVNNI_EVEX; AMD Zen 4, Intel since Ice Lake)."""
    compiler_macro: str         # defined where the compiler targets the instruction itself (no assembly needed)
    cpu_flags: tuple[str, ...]  # the host CPU's flags for it (/proc/cpuinfo; a tuple: its repr keys the probe's cache)
    defines: tuple[str, ...]    # what matrix.cl is built with to use the assembly
    probe: str                  # the kernel that runs it once


def ymm_probe(form: str) -> str:
    """The probe of vpdpwssd on a ymm in `form`: "%{vex%} " (AVX-VNNI) or "" (the EVEX form: AVX-512 VNNI + VL)."""
    return ("__kernel void vnni(__global int16 *v) {\n    int8 acc = v[0].lo;\n    const int8 pair = v[1].s0;\n"
            f'    __asm__("{form}vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(v[2].lo), "x"(pair));\n'
            "    v[3] = (int16)(acc, acc);\n}\n")


# per path, by the macro of the target that takes it: the alternatives in order, the first the CPU has
VNNI_ASM_PATHS = {
    "__AVX512BW__": (AsmPath("__AVX512VNNI__", ("avx512_vnni",), ("VNNI_ASM",), """__kernel void vnni(__global int16 *v) {
    int16 acc = v[0];
    const int pair = v[1].s0;
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(v[2]), "m"(pair));
    v[3] = acc;
}
"""),),
    "__AVX2__": (AsmPath("__AVXVNNI__", ("avx_vnni",), ("AVXVNNI_ASM",), ymm_probe("%{vex%} ")),
                 AsmPath("__AVXVNNI__", ("avx512_vnni", "avx512vl"), ("AVXVNNI_ASM", "VNNI_EVEX"),
                         ymm_probe(""))),
}
VNNI_FLAGS = frozenset().union(*(path.cpu_flags for paths in VNNI_ASM_PATHS.values() for path in paths))


@dataclass(frozen=True)
class Probe:
    """What a one-line kernel built and run on a device showed: whether its compiler works at all (PoCL 3.0's
    LLVM 14 stops at "unknown target CPU 'generic'" on CPUs newer than itself, e.g. AMD Zen 5), and the
    instruction-set macros of its target, which choose matrix.cl's path and the CPU config."""
    error: str = ""                     # the compiler's or driver's complaint; "" when the kernel ran
    macros: tuple[str, ...] = ()        # those of ISA_MACROS the compiler defined
    vnni_asm: bool = False              # the CPU ran its path's VNNI_ASM_PATHS probe: VNNI the compiler lacks

    @property
    def kernel_path(self) -> str:
        """matrix.cl's integer path: vpdpwssd on zmm (AVX-512 VNNI, from the compiler or through inline
        assembly), AVX-512 without it, vpdpwssd on ymm (AVX-VNNI, likewise), pmaddwd (AVX2), or plain OpenCL C
        (any other CPU, every GPU)."""
        m = set(self.macros)
        if "__AVX512F__" in m:
            return "avx512-vnni" if "__AVX512VNNI__" in m or self.vnni_asm else "avx512"
        if "__AVX2__" in m:
            return "avx2-vnni" if "__AVXVNNI__" in m or self.vnni_asm else "avx2"
        return "portable"

    @property
    def asm_path(self) -> AsmPath | None:
        """VNNI_ASM_PATHS' first alternative for the path the compiler targets whose flags the host CPU has (None: not
        x86 with AVX2, or a CPU without VNNI)."""
        paths = next((VNNI_ASM_PATHS[m] for m in VNNI_ASM_PATHS if m in self.macros), ())
        return next((path for path in paths if host_cpu_flags().issuperset(path.cpu_flags)), None)

    @property
    def defines(self) -> tuple[str, ...]:
        """What every program for the device is built with besides its config's options: VNNI_ASM or AVXVNNI_ASM
        (and VNNI_EVEX) where the CPU's VNNI is reached through inline assembly."""
        return self.asm_path.defines if self.vnni_asm else ()

    @property
    def why(self) -> str:
        shown = ", ".join(self.macros) or "none of " + ", ".join(ISA_MACROS[:4])
        asm = (f"; the CPU's {' and '.join(self.asm_path.cpu_flags)}, which it does not target, through inline "
               "assembly" if self.vnni_asm else "")
        if self.kernel_path.startswith("avx2") and {"avx512f", "avx512bw"} <= host_cpu_flags():
            asm += "; the CPU has AVX-512 too, which it does not target (Debian's and Ubuntu's PoCL do)"
        return f"{self.kernel_path} (the compiler defines {shown}{asm})"


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags as Linux lists them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()


def probe_vnni_asm(ctx, queue, source: str) -> bool:
    """Whether a VNNI_ASM_PATHS probe builds and sums right on the device. Run only where the host CPU, which a CPU
    driver's kernels run on, lists the instruction's flag: elsewhere it would stop the process (SIGILL)."""
    v = np.zeros((4, 16), np.int32)
    v[0], v[1, 0] = 5, 3 << 16 | 2          # acc; the pair (2, 3) as 16-bit halves
    v[2] = 7 << 16 | 5                      # the pair (5, 7) in every lane
    buf = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=v)
    try:
        with signals_held():
            cl.Program(ctx, source).build(cache_dir=False).vnni(queue, (1,), None, buf)
        cl.enqueue_copy(queue, v, buf)
        queue.finish()
    except cl.Error:        # a driver without inline assembly (an emulator, another compiler)
        return False
    return bool((v[3] == 5 + 2 * 5 + 3 * 7).all())


def run_probe(cl_device) -> Probe:
    """Build and run PROBE_SOURCE on a device (a fraction of a second; Device.probe caches the result)."""
    try:
        ctx = cl.Context([cl_device])
        queue = cl.CommandQueue(ctx)
        flags = np.zeros(len(ISA_MACROS), np.int32)
        buf = cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=flags)
        with signals_held():    # the build, and the launch, where PoCL compiles the kernel for its work-group size
            prg = cl.Program(ctx, PROBE_SOURCE).build(cache_dir=False)
            prg.isa(queue, (1,), None, buf)
        cl.enqueue_copy(queue, flags, buf)
        queue.finish()
    except cl.Error as e:
        lines = [ln.strip() for ln in str(e).splitlines()]
        return Probe(error=next((ln for ln in lines if ln.startswith("error:")), lines[0] if lines else repr(e)))
    probe = Probe(macros=tuple(m for m, f in zip(ISA_MACROS, flags) if f))
    path = probe.asm_path       # only one whose flags the host CPU lists: elsewhere the instruction is SIGILL
    if (path and path.compiler_macro not in probe.macros and cl_device.type & cl.device_type.CPU
            and probe_vnni_asm(ctx, queue, path.probe)):
        return Probe(macros=probe.macros, vnni_asm=True)
    return probe


TYPE_NAMES = {cl.device_type.GPU: "gpu", cl.device_type.CPU: "cpu", cl.device_type.ACCELERATOR: "accelerator"}
TYPE_RANK = {"gpu": 0, "accelerator": 1, "cpu": 2, "other": 3}
KERNEL_PATHS = ("portable", "avx2", "avx2-vnni", "avx512", "avx512-vnni")     # Probe.kernel_path, narrowest first


@dataclass
class Device:
    """One OpenCL device and the facts `dpllama devices` shows."""
    index: int                  # position in the listing of all devices
    type_index: int             # position among devices of the same type
    cl_device: cl.Device
    probed: Probe | None = None     # set by probe()

    def probe(self) -> Probe:
        """Whether the device's compiler works and which instruction sets it targets: measured once per
        device and driver, then read from $DPLLAMA_HOME/kernels (the key holds the driver version, the device
        name, which for PoCL names the compiler's target CPU, and the host CPU's VNNI flags, so that a home
        shared with a machine without them never hands this one's VNNI_ASM over)."""
        if self.probed is None:
            vnni = sorted(host_cpu_flags() & VNNI_FLAGS)
            key = "\0".join((self.cache_key(), PROBE_SOURCE, repr(VNNI_ASM_PATHS), *vnni))
            key = hashlib.sha256(key.encode()).hexdigest()[:32]
            path = dpllama_home() / "kernels" / f"probe-{key}.json"
            try:        # only a working compiler's macros are stored
                stored = json.loads(path.read_text())
                self.probed = Probe(macros=tuple(stored["macros"]), vnni_asm=stored["vnni_asm"] is True)
            except (OSError, ValueError, TypeError, KeyError):
                self.probed = run_probe(self.cl_device)
                if self.probed.error:      # not stored: it may be passing (out of memory, a busy GPU)
                    return self.probed
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_output(path) as tmp:
                        tmp.write_text(json.dumps({"macros": self.probed.macros,
                                                   "vnni_asm": self.probed.vnni_asm}))
                except OSError:     # a read-only cache only costs another probe next time
                    pass
        return self.probed

    @property
    def kernel_path(self) -> str:
        return self.probe().kernel_path

    @property
    def platform(self) -> str:
        return self.cl_device.platform.name.strip()

    @property
    def compute_units(self) -> int:
        return self.cl_device.max_compute_units

    @property
    def local_mem_size(self) -> int:
        return self.cl_device.local_mem_size

    @property
    def name(self) -> str:
        return self.cl_device.name.strip()

    @property
    def type(self) -> str:
        t = self.cl_device.type
        return next((n for bit, n in TYPE_NAMES.items() if t & bit), "other")

    @property
    def extensions(self) -> set[str]:
        return set(self.cl_device.extensions.split())

    def has_extension(self, *names: str) -> bool:
        return bool(self.extensions.intersection(names))

    @property
    def out_of_order(self) -> bool:
        props = self.cl_device.get_info(cl.device_info.QUEUE_PROPERTIES)
        return bool(props & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE)

    def facts(self) -> dict:
        d = self.cl_device
        return {
            "index": self.index,
            "selector": f"{self.type}:{self.type_index}",
            "platform": self.platform,
            "platform_version": d.platform.version.strip(),
            "name": self.name,
            "type": self.type,
            "vendor": d.vendor.strip(),
            "driver": d.driver_version.strip(),
            "opencl": d.version.strip(),
            "compute_units": self.compute_units,
            "clock_mhz": d.max_clock_frequency,
            "global_mem_bytes": d.global_mem_size,
            "local_mem_bytes": d.local_mem_size,
            "max_alloc_bytes": d.max_mem_alloc_size,
            "max_work_group_size": d.max_work_group_size,
            "fp16": self.has_extension("cl_khr_fp16"),
            "int8_dot": self.has_extension("cl_khr_integer_dot_product"),
            "subgroups": self.has_extension("cl_khr_subgroups", "cl_intel_subgroups"),
            "out_of_order_queue": self.out_of_order,
        }

    def cache_key(self) -> str:
        """What a compiled binary depends on besides source and options."""
        d = self.cl_device
        return "|".join((self.platform, d.platform.version, self.name, d.driver_version, d.version))

    def __str__(self) -> str:
        return f"{self.name} ({self.platform}, {self.type}:{self.type_index})"


def list_devices() -> list[Device]:
    """Every device of every platform, in a stable order. Raises DpllamaError when there is none."""
    with signals_held():    # the drivers start their threads here: they inherit this thread's blocked signals
        try:
            platforms = cl.get_platforms()
        except cl.Error:   # PLATFORM_NOT_FOUND_KHR from the ICD loader
            platforms = []
        per_platform = []
        for p in platforms:
            try:
                per_platform.append(p.get_devices())
            except cl.Error:
                continue
    devices: list[Device] = []
    per_type: dict[str, int] = {}
    for cl_devices in per_platform:
        for d in cl_devices:
            dev = Device(len(devices), 0, d)
            dev.type_index = per_type.get(dev.type, 0)
            per_type[dev.type] = dev.type_index + 1
            devices.append(dev)
    if not devices:
        raise DpllamaError(NO_PLATFORM_HELP)
    return devices


def _term_matches(term: str, dev: Device) -> bool:
    term = term.strip()
    for sep in ("=", "~"):
        if sep in term:
            key, value = (s.strip() for s in term.split(sep, 1))
            haystack = {"platform": lambda: dev.platform, "vendor": lambda: dev.cl_device.vendor,
                        "name": lambda: dev.name, "isa": lambda: dev.kernel_path}.get(key)
            if haystack is None or (sep == "~" and key != "name"):
                raise DpllamaError(f"device selector term {term!r}: unknown key {key!r} "
                                   "(expected platform=, vendor=, isa= or name~)")
            return value.lower() in haystack().lower()
    if term.isdigit():
        return dev.index == int(term)
    kind, _, idx = term.partition(":")
    if kind not in TYPE_RANK or kind == "other" or (idx and not idx.isdigit()):
        raise DpllamaError(f"device selector term {term!r}: expected cpu, gpu or accelerator "
                           "(optionally :N), a device number, platform=, vendor= or name~")
    return dev.type == kind and (not idx or dev.type_index == int(idx))


def matches(selector: str, dev: Device) -> bool:
    return all(_term_matches(t, dev) for t in selector.split(",") if t.strip())


def _score(dev: Device) -> tuple:
    """Higher is better: GPUs first, then discrete over integrated, then raw size."""
    d = dev.cl_device
    return (-TYPE_RANK[dev.type], not d.host_unified_memory, d.max_compute_units * d.max_clock_frequency,
            d.global_mem_size, -dev.index)


def choose(devices: list[Device], selector: str | None = None, source: str = "selector"
           ) -> tuple[Device, dict[int, str]]:
    """The device to use and, for every device, the reason it was chosen or passed over."""
    if selector:
        candidates = [d for d in devices if matches(selector, d)]
        if not candidates:
            found = "; ".join(f"{d.index}: {d}" for d in devices)
            raise DpllamaError(f"{source} {selector!r} matches no OpenCL device (found: {found})")
    else:
        candidates = devices
    # the best whose compiler works: probing (once per device and driver, then cached) stops at the first
    ranked = sorted(candidates, key=_score, reverse=True)
    best = next((d for d in ranked if not d.probe().error), None)
    if best is None:
        raise DpllamaError(_unusable(ranked))
    if best.type == "cpu":
        # the same CPU through two drivers (the pip PoCL and the distribution's, say, whose compilers target
        # AVX2 and AVX-512 on AMD Zen 4): the one whose compiler uses more of it, whatever the drivers' order
        twins = [d for d in ranked if _score(d)[:3] == _score(best)[:3] and not d.probe().error]
        best = max(twins, key=lambda d: KERNEL_PATHS.index(d.kernel_path))
    reasons = {}
    for d in devices:
        if d is best:
            why = f"matches {source} {selector!r}" if selector else _why_best(d, devices)
            reasons[d.index] = "selected: " + why
        elif d not in candidates:
            reasons[d.index] = f"not selected: does not match {source} {selector!r}"
        elif d.probed is not None and d.probed.error:
            reasons[d.index] = f"not selected: its compiler fails on a one-line kernel ({d.probed.error})"
        elif TYPE_RANK[d.type] > TYPE_RANK[best.type]:
            reasons[d.index] = f"not selected: a {best.type} is preferred over a {d.type}"
        elif d.probed is not None and d.kernel_path != best.kernel_path and _score(d)[:3] == _score(best)[:3]:
            reasons[d.index] = (f"not selected: {best.name}'s compiler targets more of this CPU ({best.kernel_path} "
                                f"kernels, here {d.kernel_path})")
        else:
            reasons[d.index] = f"not selected: {best.name} ranks higher (discrete first, then compute units x clock)"
    return best, reasons


def _unusable(devices: list[Device]) -> str:
    broken = "; ".join(f"{d.index}: {d} ({d.cl_device.driver_version}) fails on a one-line kernel: {d.probed.error}"
                       for d in devices)
    hint = ""
    if any("unknown target CPU" in d.probed.error for d in devices):
        hint = (" (that PoCL's LLVM does not know this CPU; a newer PoCL does: `apt-get install pocl-opencl-icd` "
                "on Debian or Ubuntu, which dpllama finds through /etc/OpenCL/vendors)")
    return f"no usable OpenCL device: {broken}{hint}"


def _why_best(best: Device, devices: list[Device]) -> str:
    if len(devices) == 1:
        return "the only OpenCL device"
    if best.type == "cpu":
        return "no GPU or accelerator present; the CPU device is the default"
    return f"best {best.type}: {best.cl_device.max_compute_units} compute units at {best.cl_device.max_clock_frequency} MHz"


def select_device(selector: str | None = None, devices: list[Device] | None = None
                  ) -> tuple[Device, dict[int, str]]:
    """Pick by explicit selector, else $DPLLAMA_DEVICE, else the best device."""
    devices = devices if devices is not None else list_devices()
    if selector:
        return choose(devices, selector, "selector")
    env = os.environ.get("DPLLAMA_DEVICE")
    if env:
        return choose(devices, env, "DPLLAMA_DEVICE")
    return choose(devices)
