"""Writing files so that nobody ever sees half of one, and no temporary outlives its writer for long; checking the
files a command reads and writes before it starts."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

from dpllama.errors import DpllamaError

HOST = socket.gethostname()
# .NAME.PID@HOST.XXXXXXXX[.tmp], XXXXXXXX being tempfile's random part
TEMP = re.compile(r"\..+\.(\d+)@(.+)\.[a-z0-9_]{8}(\.tmp)?")
STALE_AFTER = 86400     # seconds; for what liveness cannot tell: another host's, or a PID reused since
LIVE: set[str] = set()  # this process's temporaries now being written: what remove_live removes on Ctrl-C


def remove_live() -> None:
    """Remove this process's temporaries in progress (cli's Ctrl-C handler, which exits without unwinding)."""
    for path in list(LIVE):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(missing_ok=True)


def temp_prefix(name: str) -> str:
    """The start of a temporary's name beside `name`: hidden, and saying which process made it, so that
    remove_stale can tell a dead process's leftover from a concurrent process's work in progress."""
    return f".{name}.{os.getpid()}@{HOST}."


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's
        pass
    return True


def remove_stale(folder: str | os.PathLike) -> None:
    """Remove the temporaries in `folder` left by a writer that died before cleaning up (SIGKILL, a power
    cut): those of a process of this host that is gone, and any not touched for a day. Best effort: what
    cannot be listed or removed stays."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = TEMP.fullmatch(e.name)
        try:
            if m and ((m[2] == HOST and not alive(int(m[1])))
                      or time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_AFTER):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds, so a crash
    or an error never leaves a half-written file where a good one is expected. The file gets the
    permissions a plain open() would give it (mkstemp's are private). A temporary that a killed writer left
    there is removed first."""
    path = Path(path)
    remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    LIVE.add(tmp)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        LIVE.discard(tmp)


def check_output(path: str | os.PathLike, inputs=()) -> Path:
    """`path`, once it is sure that atomic_output can put a file there, so that a command fails before its
    work, not after it: not a folder or a device; not one of `inputs` (paths or None), nor a link to one, which
    the output would replace; its folder exists and takes a new file (tried: os.access says yes to root on
    /sys, /proc and read-only file systems)."""
    if str(path) == "-":
        raise DpllamaError("-: the output goes to a file, not to standard output: give the file's name")
    if str(path).endswith(os.sep):     # Path() would drop the slash and write a file of the folder's name
        raise DpllamaError(f"{path}: names a folder: give the output file's name")
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DpllamaError(f"{path}: cannot write in {path.parent}: {e.strerror}") from None
    return path


def check_input(path: str | os.PathLike) -> None:
    """Refuse an input that is read whole or mapped but is not a regular file: a device has no end (/dev/zero)
    and a FIFO blocks its reader until a writer comes. What cannot be looked at, and a folder, are left to the
    caller's open(), whose error its caller words."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):   # ValueError: a NUL in the name
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DpllamaError(f"{path}: not a regular file")
