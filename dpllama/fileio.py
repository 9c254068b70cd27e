"""Writing files so that nobody ever sees half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from dpllama.errors import DpllamaError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds, so a crash
    or an error never leaves a half-written file where a good one is expected. The file gets the
    permissions a plain open() would give it (mkstemp's are private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path: str | os.PathLike, inputs=()) -> Path:
    """`path`, once it is sure that atomic_output can put a file there, so that a command fails before its
    work, not after it: not a folder or a device; not one of `inputs` (paths or None), nor a link to one, which
    the output would replace; its folder exists and takes a new file (tried: os.access says yes to root on
    /sys, /proc and read-only file systems)."""
    path = Path(path)
    # os.path's tests, not Path's: they answer False where Path's raise (a folder that may not be listed)
    if os.path.isdir(path):
        raise DpllamaError(f"{path}: is a folder: give the output file's name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise DpllamaError(f"{path}: not a regular file: give another output")
    for source in inputs:
        if source is not None and os.path.exists(path) and os.path.exists(source) and os.path.samefile(source, path):
            raise DpllamaError(f"{path}: is the input {source}: writing the output there would destroy it")
    if not os.path.isdir(path.parent):
        raise DpllamaError(f"{path}: output folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DpllamaError(f"{path}: cannot write in {path.parent}: {e.strerror}") from None
    return path
