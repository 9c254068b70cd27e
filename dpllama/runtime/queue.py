"""SYCL-style asynchronous execution on PyOpenCL: queues, buffers with accessors, events.

Each submission declares how it uses every buffer (`buf.read()`, `buf.write()`, `buf.read_write()`).
Each Buffer remembers the event of its last writer and the events of the readers since then, so
the queue derives the wait list of a submission itself:

    read  after write  -> wait for the last writer
    write after read   -> wait for every reader since the last write
    write after write  -> wait for the last writer

On an out-of-order queue that is what orders the work, and independent kernels may overlap; on an
in-order queue the device orders it anyway, so nothing is tracked: a decode step enqueues ~150 commands,
and the bookkeeping cost more host time per command than the launch itself. Host accessors
(`Buffer.get`, `Buffer.set`) block only until the work they depend on is done.
"""
from __future__ import annotations

import atexit
import sys
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import pyopencl as cl

from dpllama.errors import DpllamaError
from dpllama.runtime.config import DeviceConfig, defaults
from dpllama.runtime.device import Device
from dpllama.runtime import program
from dpllama.runtime.program import KernelRef, Program
from dpllama.signals import signals_held

READ, WRITE, READ_WRITE = 1, 2, 3
MAX_READERS = 64    # reader events kept per buffer before they are folded into one marker


class Event:
    """A submitted command; `duration_ns` needs a profiling queue."""
    __slots__ = ("cl_event", "name")

    def __init__(self, cl_event: cl.Event, name: str = ""):
        self.cl_event = cl_event
        self.name = name

    def wait(self) -> "Event":
        self.cl_event.wait()
        return self

    @property
    def duration_ns(self) -> int:
        self.cl_event.wait()
        return self.cl_event.profile.end - self.cl_event.profile.start


@dataclass(frozen=True)
class Accessor:
    buffer: "Buffer"
    mode: int


@dataclass(frozen=True)
class Local:
    """Work-group local memory of `nbytes`, passed as a kernel argument."""
    nbytes: int


class Buffer:
    """Device memory plus the dependency state that orders work on it."""

    def __init__(self, queue: "Queue", nbytes: int = 0, host: np.ndarray | None = None, name: str = ""):
        self.queue = queue
        self.name = name
        flags = cl.mem_flags.READ_WRITE
        if host is not None:
            host = np.ascontiguousarray(host)
            nbytes = host.nbytes
            flags |= cl.mem_flags.COPY_HOST_PTR
        self.nbytes = nbytes
        self.cl_buffer = cl.Buffer(queue.context, flags, size=max(nbytes, 1), hostbuf=host)
        self.last_write: cl.Event | None = None
        self.reads: list[cl.Event] = []

    def region(self, offset: int, nbytes: int, name: str = "") -> "Buffer":
        """`nbytes` of this buffer from byte `offset` (a multiple of Queue.align) as a buffer of its own (an OpenCL
        sub-buffer), for data written once before any kernel reads it (weights): the two share memory, not the
        dependency state that orders work on it."""
        sub = Buffer.__new__(Buffer)
        sub.queue, sub.name, sub.nbytes = self.queue, name, nbytes
        sub.cl_buffer = self.cl_buffer.get_sub_region(offset, max(nbytes, 1))
        sub.last_write, sub.reads = None, []
        return sub

    def read(self) -> Accessor:
        return Accessor(self, READ)

    def write(self) -> Accessor:
        return Accessor(self, WRITE)

    def read_write(self) -> Accessor:
        return Accessor(self, READ_WRITE)

    def _deps(self, mode: int) -> list[cl.Event]:
        deps = [self.last_write] if self.last_write is not None else []
        return deps + self.reads if mode & WRITE else deps

    def _record(self, mode: int, event: cl.Event) -> None:
        if not self.queue.out_of_order:
            return
        if mode & WRITE:
            self.last_write, self.reads = event, []
        else:
            self.reads.append(event)
            if len(self.reads) > MAX_READERS:   # weights are read every token and never written
                self.reads = [cl.enqueue_marker(self.queue.cl_queue, wait_for=self.reads)]

    def get(self, dtype=np.float32, offset: int = 0, count: int | None = None) -> np.ndarray:
        """Host accessor for reading `count` elements from element `offset`: blocks until the last
        writer is done, then copies."""
        out, done = self.get_async(dtype, offset, count)
        done.wait()
        return out

    def get_async(self, dtype=np.float32, offset: int = 0, count: int | None = None) -> tuple[np.ndarray, Event]:
        """`get` without the wait: the array is filled once the event is done, so work enqueued after
        this copy can run on while the host waits for just the copy."""
        size = np.dtype(dtype).itemsize
        if count is None:
            count = self.nbytes // size - offset
        out = np.empty(count, dtype)
        ev = cl.enqueue_copy(self.queue.cl_queue, out, self.cl_buffer, src_offset=offset * size,
                             wait_for=self._deps(READ) or None, is_blocking=False)
        self._record(READ, ev)
        return out, Event(ev, f"get {self.name}")

    def set(self, host: np.ndarray, offset: int = 0) -> Event:
        """Host accessor for writing `host` at element `offset`: waits for earlier users of the
        buffer, then copies."""
        return self.set_async(host, offset).wait()   # the host array may be reused by the caller at once

    def set_async(self, host: np.ndarray, offset: int = 0) -> Event:
        """`set` without the wait: the copy runs after the work enqueued before it that uses the buffer, and the
        host goes on. The event keeps `host` alive until the copy is done (the caller must not change it) and
        must be kept until then: dropping it waits for the copy (PyOpenCL's NannyEvent)."""
        host = np.ascontiguousarray(host)
        start = offset * host.itemsize
        if start + host.nbytes > self.nbytes:
            raise ValueError(f"buffer {self.name!r}: {host.nbytes} bytes at {start} do not fit in {self.nbytes}")
        ev = cl.enqueue_copy(self.queue.cl_queue, self.cl_buffer, host, dst_offset=start,
                             wait_for=self._deps(WRITE) or None, is_blocking=False)
        self._record(WRITE, ev)
        return Event(ev, f"set {self.name}")


@dataclass
class Command:
    """One kernel launch with its arguments bound, ready to enqueue again and again."""
    kernel: cl.Kernel
    global_size: tuple
    local_size: tuple | None
    accessors: list[Accessor] = field(default_factory=list)
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.kernel.function_name    # a driver query: once, not at every launch

    def launch(self, cl_queue, wait):
        """The first launch, where a driver may compile the kernel for its work-group size (PoCL does, in this
        thread: dpllama/signals.py); every later one goes straight to the driver (_launch)."""
        with signals_held():
            ev = self._launch(cl_queue, wait)
        self.launch = self._launch
        return ev

    def _launch(self, cl_queue, wait):
        return cl.enqueue_nd_range_kernel(cl_queue, self.kernel, self.global_size, self.local_size, wait_for=wait)


_queues: "weakref.WeakSet[Queue]" = weakref.WeakSet()     # every live Queue, for _drain


@atexit.register
def _drain() -> None:
    """Wait for every live queue's commands before the interpreter shuts down. Generation leaves a pass in flight
    (decode enqueues the next token's pass before it reads this one's token), and a process that exits with
    kernels running has the driver's worker threads execute them while the C runtime tears the driver down. A chat
    stopped by Ctrl-C died once with SIGSEGV on its way out (CI, not reproduced in 500 runs here); this takes that
    suspect away for the cost of the pass in flight."""
    for q in list(_queues):
        try:
            q.wait()
        except cl.Error:        # a device that failed has nothing left to run
            pass


class Queue:
    """A command queue on one device, set up by its device config; out-of-order only where the device has it."""

    def __init__(self, device: Device, config: DeviceConfig | None = None, out_of_order: bool | None = None,
                 profiling: bool | None = None):
        """A queue as `config` (default: the built-in defaults) sets it up: its mode, the build options of its
        programs, the largest allocation; `out_of_order` and `profiling` override the config's `queue` keys."""
        self.device = device
        self.config = config = config or DeviceConfig(defaults())
        out_of_order = config["queue"]["out_of_order"] if out_of_order is None else out_of_order
        profiling = config["queue"]["profiling"] if profiling is None else profiling
        self.build_options = list(config["build_options"]) + [f"-D{d}" for d in device.probe().defines]
        self.programs: dict[str, Program] = {}
        self.context = cl.Context([device.cl_device])
        self.out_of_order = out_of_order and device.out_of_order
        props = 0
        if self.out_of_order:
            props |= cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
        if profiling:
            props |= cl.command_queue_properties.PROFILING_ENABLE
        self.profiling = profiling
        self.cl_queue = cl.CommandQueue(self.context, device.cl_device, properties=props)
        self.events: list[Event] = []       # every kernel event, kept only when profiling
        self.launches = 0
        _queues.add(self)

    def program(self, file: str, *defines: str) -> Program:
        """cl_kernels/`file` built for this device with the config's options plus `-D` defines."""
        opts = self._options(defines)
        key = self._key(file, opts)
        if key not in self.programs:
            self.programs[key] = program.build(self.context, self.device, file, opts)
        return self.programs[key]

    def build_all(self, specs: list[tuple[str, tuple[str, ...]]]) -> None:
        """Build (file, defines) programs ahead of use. Those not in the disk cache compile (seconds each on
        a CPU, once per device and driver), with progress on stderr: a live percentage on a terminal, a line
        before and a line after elsewhere."""
        specs = list(dict.fromkeys(specs))
        todo = [(f, d) for f, d in specs if self._key(f, self._options(d)) not in self.programs
                and not program.cache_path(self.device, f, self._options(d)).is_file()]
        live = sys.stderr.isatty()
        head = (f"dpllama: compiling {len(todo)} kernel programs for {self.device.name} (the first run with this "
                f"device and driver only; cached after)")
        t0 = time.perf_counter()
        for i, (file, defines) in enumerate(todo):
            if live or i == 0:
                print(f"\r{head}: {100 * i // len(todo)}%" if live else head, end="" if live else "\n",
                      file=sys.stderr, flush=True)
            self.program(file, *defines)
        if todo:
            print(f"\r{head}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for file, defines in specs:
            self.program(file, *defines)

    def _options(self, defines) -> list[str]:
        return self.build_options + [f"-D{d}" for d in defines]

    @staticmethod
    def _key(file: str, options: list[str]) -> str:
        return file + " " + " ".join(options)

    @property
    def max_alloc(self) -> int:
        """The largest buffer to allocate: the config's memory.max_alloc_mb, else the driver's limit."""
        mb = self.config["memory"]["max_alloc_mb"]
        return mb << 20 if mb else self.device.cl_device.max_mem_alloc_size

    @property
    def align(self) -> int:
        """The alignment, in bytes, of a sub-buffer's offset in its buffer (Buffer.region)."""
        return self.device.cl_device.mem_base_addr_align // 8

    def buffer(self, nbytes: int = 0, host: np.ndarray | None = None, name: str = "") -> Buffer:
        size = host.nbytes if host is not None else nbytes
        if size > self.max_alloc:
            raise DpllamaError(f"buffer {name or '(unnamed)'} needs {size / 2**20:.1f} MiB, more than the "
                               f"{self.max_alloc / 2**20:.0f} MiB one allocation may take on {self.device} "
                               f"(memory.max_alloc_mb, or the driver's limit); a smaller context (--ctx) "
                               f"shrinks the KV cache")
        return Buffer(self, nbytes, host, name)

    def command(self, kernel: "KernelRef", global_size, local_size, *args) -> Command:
        """Bind arguments once: Accessors become buffers, Local becomes local memory, numbers stay."""
        k = kernel.create()     # a kernel object of its own, so its bound arguments stay put
        self._check_fits(k, local_size, sum(a.nbytes for a in args if isinstance(a, Local)))
        accessors = []
        for i, a in enumerate(args):
            if isinstance(a, Accessor):
                accessors.append(a)
                k.set_arg(i, a.buffer.cl_buffer)
            elif isinstance(a, Local):
                k.set_arg(i, cl.LocalMemory(a.nbytes))
            else:
                k.set_arg(i, a)
        return Command(k, tuple(global_size), tuple(local_size) if local_size else None, accessors)

    def _check_fits(self, k: cl.Kernel, local_size, local_bytes: int) -> None:
        """A launch's work-group and local memory against the device's and the kernel's limits, before it ever
        runs: past them a driver fails the launch (INVALID_WORK_GROUP_SIZE), or PoCL's CPU device overruns its
        local memory and crashes. The sizes come from the config, so the message names it."""
        d = self.device.cl_device
        items = int(np.prod(local_size)) if local_size else 1
        limit = min(d.max_work_group_size, k.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, d))
        local = local_bytes + k.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, d)
        problems = ([f"work-groups of {items} work-items (this kernel allows at most {limit})"] * (items > limit)
                    + [f"{local} bytes of local memory (the device has {d.local_mem_size})"]
                    * (local > d.local_mem_size))
        if problems:
            raise DpllamaError(f"{self.config.path}: kernel {k.function_name} would need {' and '.join(problems)} "
                               f"on {self.device}: lower the work_group sizes (docs/CONFIG.md)")

    def enqueue(self, cmd: Command) -> Event:
        """Launch a bound command with the wait list its accessors imply."""
        if self.out_of_order:
            ev = cmd.launch(self.cl_queue, [e for a in cmd.accessors for e in a.buffer._deps(a.mode)] or None)
            for a in cmd.accessors:
                a.buffer._record(a.mode, ev)
        else:
            ev = cmd.launch(self.cl_queue, None)
        self.launches += 1
        event = Event(ev, cmd.name)
        if self.profiling:
            self.events.append(event)
        return event

    def replay(self, cmds: list) -> None:
        """Enqueue recorded commands (a forward pass) in order. On an in-order queue without profiling
        no events are kept or wrapped: the host's time per launch is what a small model's step waits on."""
        if self.out_of_order or self.profiling:
            for cmd in cmds:
                self.enqueue(cmd)
            return
        for cmd in cmds:
            cmd.launch(self.cl_queue, None)
        self.launches += len(cmds)

    def submit(self, kernel, global_size, local_size, *args) -> Event:
        """Like a SYCL `queue.submit` + `parallel_for`: bind the arguments and launch."""
        return self.enqueue(self.command(kernel, global_size, local_size, *args))

    def wait(self) -> None:
        self.cl_queue.finish()

    def profile(self) -> dict[str, dict]:
        """Kernel time by kernel name from the profiling events collected so far; clears them."""
        out: dict[str, dict] = {}
        for e in self.events:
            p = out.setdefault(e.name, {"calls": 0, "ns": 0})
            p["calls"] += 1
            p["ns"] += e.duration_ns
        self.events = []
        return out
