"""OpenCL programs from cl_kernels/*.cl, with a persistent binary cache.

A compile costs about 0.5 s per program on PoCL's CPU device, so binaries are kept on disk under
$DPLLAMA_HOME/kernels (default ~/.cache/dpllama/kernels), keyed by the device, its driver version,
the source text and the build options: a second process loads the binary and skips the compiler.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyopencl as cl

from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output
from dpllama.paths import dpllama_home

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# installed wheels carry the kernels inside the package; a source checkout has them beside it
KERNEL_DIR = next((p for p in (PACKAGE_DIR / "cl_kernels", PACKAGE_DIR.parent / "cl_kernels") if p.is_dir()),
                  PACKAGE_DIR.parent / "cl_kernels")
COMMON = "common.cl"    # helpers prepended to every program

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
    path = KERNEL_DIR / file
    if not path.is_file():
        raise DpllamaError(f"{path}: kernel file not found")
    common = KERNEL_DIR / COMMON
    prefix = common.read_text() + "\n" if common.is_file() and file != COMMON else ""
    # a #line directive keeps compiler messages pointing at the right line of the right file
    return f'{prefix}#line 1 "{file}"\n{path.read_text()}'


def cache_path(device, file: str, options: list[str] | tuple = ()) -> Path:
    """Where the binary of cl_kernels/`file` built for `device` with `options` is kept."""
    key = hashlib.sha256("\0".join((device.cache_key(), cl.VERSION_TEXT, " ".join(options), source(file))).encode())
    return dpllama_home() / "kernels" / f"{Path(file).stem}-{key.hexdigest()[:32]}.bin"


def build(context: cl.Context, device, file: str, options: list[str] | tuple = ()) -> Program:
    """Build cl_kernels/`file` for `device` (a runtime Device), from the disk cache when possible."""
    text = source(file)
    opts = " ".join(options)
    cached = cache_path(device, file, options)
    if cached.is_file():
        try:
            prg = cl.Program(context, [device.cl_device], [cached.read_bytes()]).build(opts)
            stats["loaded"] += 1
            return Program(prg, file)
        except cl.Error:
            cached.unlink(missing_ok=True)   # stale or foreign binary: rebuild below
    try:
        prg = cl.Program(context, text).build(opts, cache_dir=False)
    except cl.RuntimeError as e:     # its text carries the compiler's log
        raise DpllamaError(f"{KERNEL_DIR / file}: build failed on {device} with options {opts!r}:\n{e}") from None
    stats["compiled"] += 1
    _store(cached, prg.get_info(cl.program_info.BINARIES)[0])
    return Program(prg, file)


def _store(path: Path, binary: bytes) -> None:
    """Write atomically, so a concurrent or interrupted process never sees half a binary."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_bytes(binary)
    except OSError:     # a read-only or full cache only costs a recompile next time
        pass
