"""The device layer: model code talks to this, never to pyopencl.

    import numpy as np
    from dpllama.runtime import open_queue

    n = 1000
    q = open_queue()                    # the best device; or a selector ("gpu", "gpu:1"), a config, $DPLLAMA_DEVICE
    x = q.buffer(host=np.ones(n, np.float32))
    y = q.buffer(host=np.zeros(n, np.float32))
    prog = q.program("check.cl")        # dpllama/cl_kernels/check.cl, built for the device (cached on disk)
    q.submit(prog.axpy, (n,), None, x.read(), y.read_write(), np.float32(2), np.int32(n))     # y = 2 x + y
    print(y.get())                      # blocks until the kernel that wrote y is done: [2. 2. 2. ... 2. 2. 2.]

(tests/test_runtime.py runs this example as it stands.)
"""
from __future__ import annotations

import os
import signal
import threading

# PyOpenCL's native module aborts the whole process (nanobind: "Critical error") when a KeyboardInterrupt lands
# while it initialises (tests/test_interrupts.py hit it 0.12 s into `dpllama quantize`), so a Ctrl-C during the
# import is held and delivered again right after it, to whatever handler was there. A Python-level handler, not
# a thread signal mask: the signal may go to any thread (NumPy's BLAS threads).
_held: list = []
_handler = (signal.signal(signal.SIGINT, lambda *_: _held.append(1))
            if threading.current_thread() is threading.main_thread() else None)
try:
    import pyopencl  # noqa: F401
finally:
    if _handler is not None:
        signal.signal(signal.SIGINT, _handler)
if _held:
    signal.raise_signal(signal.SIGINT)

from dpllama.runtime.config import (DeviceConfig, config_device, defaults, load_config,
                                    shipped_config_for)
from dpllama.runtime.device import Device, Probe, choose, list_devices, select_device
from dpllama.runtime.program import stats as build_stats
from dpllama.runtime.queue import Accessor, Buffer, Command, Event, Local, Queue
from pyopencl import Error as OpenCLError       # what a driver call raises, for callers to catch

__all__ = ["Accessor", "Buffer", "Command", "Device", "DeviceConfig", "Event", "Local", "OpenCLError", "Probe", "Queue",
           "build_stats", "choose", "choose_device", "config_device", "defaults", "list_devices",
           "load_config", "open_queue", "select_device", "shipped_config_for"]


def choose_device(selector: str | None = None, config: str | None = None, devices: list[Device] | None = None
                  ) -> tuple[Device, dict[int, str], DeviceConfig]:
    """The device, why each device was or was not chosen, and the config that applies: the device from
    `selector`, else the config's `match`, else $DPLLAMA_DEVICE, else the best device; the config from `config`,
    else $DPLLAMA_CONFIG, else the shipped config that matches the device."""
    config = config or os.environ.get("DPLLAMA_CONFIG")
    if config:
        cfg = load_config(config)
        device, reasons = select_device(selector, devices) if selector else config_device(cfg, devices)
    else:
        device, reasons = select_device(selector, devices)
        cfg = shipped_config_for(device)
    return device, reasons, cfg


def open_queue(selector: str | None = None, config: str | None = None, profiling: bool | None = None,
               out_of_order: bool | None = None) -> Queue:
    """A queue on the device `choose_device` picks, set up by its config."""
    device, _, cfg = choose_device(selector, config)
    return Queue(device, cfg, out_of_order=out_of_order, profiling=profiling)
