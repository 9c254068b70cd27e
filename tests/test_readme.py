"""The README's Python example runs as written, and every command it shows exists."""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys

from tests.helpers import smollm2_gguf_path


def readme(repo_root) -> str:
    return (repo_root / "README.md").read_text()


def test_python_example_runs(repo_root):
    smollm2_gguf_path()                                  # skip with the reason when the model cannot be had
    code = re.search(r"```python\n(.*?)```", readme(repo_root), re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    text = out.getvalue()
    assert text.startswith("Once upon a time, the city of Nova Haven")      # fp32_greedy.json's continuation
    assert '{\n  "name": "Bob",\n  "age": 30\n}' in text                    # the JSON schema's object
    assert text.rstrip().endswith("The capital of France is Paris.")


def test_every_command_shown_exists(repo_root):
    shown = sorted(set(re.findall(r"^ {4}dpllama (\w+)", readme(repo_root), re.M)))   # indented code lines
    assert {"generate", "chat", "devices", "quantize", "pull", "bench", "tune", "tokenize", "serve"} <= set(shown)
    for command in shown:
        r = subprocess.run([sys.executable, "-m", "dpllama.cli", command, "--help"], capture_output=True,
                           text=True, cwd=repo_root)
        assert r.returncode == 0 and "usage: dpllama " + command in r.stdout, command
