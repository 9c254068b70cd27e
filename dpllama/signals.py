"""Signals held off while an OpenCL compiler runs.

PoCL compiles with clang in the process itself, and LLVM installs its own SIGINT and SIGTERM handler for the
compile: it deletes the files the compile is writing, then passes the signal on. So a Ctrl-C that lands
mid-compile, in any thread, fails that compile and clang prints "1 error generated." before dpllama's one line
(tests/test_interrupts.py). Hence: the threads that libraries start (NumPy's BLAS at import, the drivers' own at
device enumeration) start inside `signals_held()` and inherit a mask that never takes these signals, and the main
thread holds them while it compiles. A signal that arrives meanwhile stays pending and reaches the main thread,
and dpllama's handler, once the compile is over: a Ctrl-C waits for up to one compile, about a second.
Measured with `generate` on stories260K from empty caches, SIGINT at random points of its first 2 s, both cores
kept busy by two other processes: 4 of 55 runs printed the line before this, 0 of 100 after.

`presses_noted()` is the other way round: for the chat's reply loop, a Ctrl-C noted for the loop to act on at its
next token, instead of a KeyboardInterrupt raised wherever the main thread happens to be.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

HELD = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_held():
    """SIGINT and SIGTERM blocked in this thread (and in the threads it starts meanwhile) for the block; only the
    main thread's mask is touched (another's signals are Python's business only in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextmanager
def presses_noted(signum=signal.SIGINT):
    """For the block, `signum` (Ctrl-C) appends to the list yielded instead of raising: code that polls the list
    stops at a point of its choosing. A KeyboardInterrupt can land between any two bytecodes, inside the runtime
    between a launch and the host's record of it (a position not advanced, a pass half enqueued), and a chat
    stopped that way once died with SIGSEGV on its way out (CI, tests/test_cli.py)."""
    pressed: list[int] = []
    previous = signal.signal(signum, lambda *_: pressed.append(1))
    try:
        yield pressed
    finally:
        signal.signal(signum, previous)
