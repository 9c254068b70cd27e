"""OpenCL programs from the package's cl_kernels/*.cl, with a persistent binary cache.

A kernel file `#include "name"`s the headers beside it. The host resolves those includes (`source`) and hands
the compiler one text, rather than passing `-I <kernel dir>`: PoCL (3.0 and 3.1) splits its build options at
every space, quoted or not, so an -I fails wherever dpllama is installed under a path with a space.

Compiles cost seconds, so binaries are kept on disk under $DPLLAMA_HOME/kernels (default
~/.cache/dpllama/kernels), keyed by the device, its driver version, the source text (every included file's with
it) and the build options: a second process loads the binary and skips the compiler. PoCL is the exception: it
keeps every build in a kernel cache of its own (POCL_CACHE_DIR), keyed the same way, where a second build of the
same source takes ~0.03 s; and asking it for a program's binary compiles every kernel of the program for any
work-group size (matrix.cl: 3.4 s, against 0.5 s for the build), kernels that the launches then compile again
for their own work-group sizes. So with PoCL's cache on, dpllama's file holds only a note that the driver built
the program (what `build_all`'s progress line and `stats` go by) and the source goes to PoCL every time.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from pathlib import Path

import pyopencl as cl

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.paths import dpllama_home
from dpllama.signals import signals_held

# package data: the same lookup in a source checkout and in an installed wheel; only read as text (no
# directory path goes to the compiler), so any importlib.resources loader serves
KERNEL_DIR = importlib.resources.files("dpllama") / "cl_kernels"
INCLUDE = re.compile(r'\s*#\s*include\s*"([^"]+)"')     # a line `source` replaces by that file of KERNEL_DIR

stats = {"compiled": 0, "loaded": 0}   # observable cache behaviour, for tests and `bench`


class KernelRef:
    """A kernel by name in a built program; `create()` gives a fresh cl.Kernel with its own arguments."""
    __slots__ = ("program", "name")

    def __init__(self, program: cl.Program, name: str):
        self.program = program
        self.name = name

    def create(self) -> cl.Kernel:
        return cl.Kernel(self.program, self.name)


class Program:
    """A built program; kernels are attributes: `prog.rmsnorm` is a KernelRef."""

    def __init__(self, cl_program: cl.Program, file: str):
        self.cl_program = cl_program
        self.file = file
        self.names = set(cl_program.get_info(cl.program_info.KERNEL_NAMES).split(";")) - {""}

    def arg_names(self, name: str) -> tuple[str, ...]:
        """A kernel's argument names, as its source gives them (the program built with -cl-kernel-arg-info)."""
        k = cl.Kernel(self.cl_program, name)
        return tuple(k.get_arg_info(i, cl.kernel_arg_info.NAME) for i in range(k.num_args))

    def __getattr__(self, name: str) -> KernelRef:
        if name.startswith("_") or name not in self.names:
            raise AttributeError(f"{self.file} has no kernel {name!r} (has: {', '.join(sorted(self.names))})")
        return KernelRef(self.cl_program, name)


def source(file: str) -> str:
    """The text of kernel file `file` as the compiler gets it: each `#include "name"` replaced by that file of
    KERNEL_DIR, itself resolved, the first time the program includes it and by nothing after (as #pragma once
    does, so headers need no include guards). #line directives keep compiler messages pointing at the right
    line of the right file."""
    return "\n".join(_resolved_lines(file, set(), "")) + "\n"


def _resolved_lines(file: str, included: set, by: str) -> list[str]:
    path = KERNEL_DIR / file
    if not path.is_file():
        raise DpllamaError(f"{path}: kernel file not found" + (f" (included by {by})" if by else ""))
    included.add(file)
    out = [f'#line 1 "{file}"']
    for n, line in enumerate(path.read_text().splitlines(), 1):
        header = INCLUDE.match(line)
        if header is None:
            out.append(line)
        elif header[1] in included:
            out.append("")
        else:
            out += [*_resolved_lines(header[1], included, file), f'#line {n + 1} "{file}"']
    return out


def cache_path(device, file: str, options: list[str] | tuple = ()) -> Path:
    """Where the binary of cl_kernels/`file` built for `device` with `options` is kept: the key hashes the
    text the compiler gets, so editing any file the program includes rebuilds it."""
    key = hashlib.sha256("\0".join((device.cache_key(), cl.VERSION_TEXT, " ".join(options), source(file))).encode())
    return dpllama_home() / "kernels" / f"{Path(file).stem}-{key.hexdigest()[:32]}.bin"


def driver_caches(device) -> bool:
    """Whether the driver keeps its builds in a persistent cache of its own: PoCL, unless POCL_KERNEL_CACHE=0."""
    return "Portable Computing Language" in device.platform and os.environ.get("POCL_KERNEL_CACHE", "1") != "0"


DRIVER_NOTE = b"built by this driver, which keeps the build in its own kernel cache\n"


def build(context: cl.Context, device, file: str, options: list[str] | tuple = ()) -> Program:
    """Build cl_kernels/`file` for `device` (a runtime Device), from the disk cache when possible."""
    opts = " ".join(options)
    cached = cache_path(device, file, options)
    if driver_caches(device):   # the build comes from the driver's own cache if it is there; dpllama's notes it
        known = cached.is_file() and cached.read_bytes() == DRIVER_NOTE
        prg = _compile(context, device, file, opts)
        stats["loaded" if known else "compiled"] += 1
        if not known:
            _store(cached, DRIVER_NOTE)
        return Program(prg, file)
    if cached.is_file():
        try:
            prg = cl.Program(context, [device.cl_device], [cached.read_bytes()]).build(opts)
            stats["loaded"] += 1
            return Program(prg, file)
        except cl.Error:
            cached.unlink(missing_ok=True)   # stale or foreign binary: rebuild below
    prg = _compile(context, device, file, opts)
    stats["compiled"] += 1
    _store(cached, prg.get_info(cl.program_info.BINARIES)[0])
    return Program(prg, file)


def _compile(context: cl.Context, device, file: str, opts: str) -> cl.Program:
    try:
        with signals_held():
            return cl.Program(context, source(file)).build(opts, cache_dir=False)
    except cl.RuntimeError as e:     # its text carries the compiler's log
        raise DpllamaError(f"{KERNEL_DIR / file}: build failed on {device} with options {opts!r}:\n{e}") from None


def _store(path: Path, binary: bytes) -> None:
    """Write atomically, so a concurrent or interrupted process never sees half a binary."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_bytes(binary)
    except OSError:     # a read-only or full cache only costs a recompile next time
        pass
