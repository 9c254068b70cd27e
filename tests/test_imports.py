"""The import rules of docs/ARCHITECTURE.md ("Rooms and imports"): a module imports from its own room and the
rooms its row allows, imports inside functions included; only the runtime imports pyopencl; and the commands
that need no device (tokenize, pull) load no OpenCL."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dpllama.model.gguf import write_dpllama_gguf
from helpers import llama2c_dir, random_weights

PACKAGE = Path(__file__).resolve().parents[1] / "dpllama"

# room -> its modules; an entry holds a module and, for a package, everything in it. The root package's own
# module is "dpllama.__init__". Moving a module to another package means editing its entry here.
ROOMS = {
    "base": ("dpllama.errors", "dpllama.fileio", "dpllama.paths", "dpllama.signals"),
    "formats": ("dpllama.formats",),
    "runtime": ("dpllama.runtime",),
    "tokenizer": ("dpllama.tokenizer",),
    "hub": ("dpllama.hub",),
    "model": ("dpllama.model",),
    "library": ("dpllama.__init__", "dpllama.generate", "dpllama.constrain", "dpllama.pattern", "dpllama.llm",
                "dpllama.loaders", "dpllama.chat", "dpllama.quantize", "dpllama.perplexity"),
    "serve": ("dpllama.serve",),
    "commands": ("dpllama.cli", "dpllama.commands"),
    "pyopencl": ("pyopencl",),      # not dpllama's, but a room of its own: only the runtime may enter it
    # the server's libraries: only the server's room enters them, so that no other command loads them
    "web": ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "ray"),
}
# room -> the other rooms it may import from, bottom to top
MAY_IMPORT = {
    "base": set(),
    "formats": {"base"},
    "runtime": {"base", "pyopencl"},
    "tokenizer": {"base", "formats"},
    "hub": {"base"},
    "model": {"base", "formats", "runtime"},
    "library": {"base", "formats", "runtime", "tokenizer", "hub", "model"},
    "serve": {"base", "formats", "runtime", "tokenizer", "hub", "model", "library", "web"},
    "commands": {"base", "formats", "runtime", "tokenizer", "hub", "model", "library", "serve"},
}


def room_of(module: str) -> str | None:
    """The room of the longest entry that holds `module`; None for a module outside every room."""
    held = [(len(entry), room) for room, entries in ROOMS.items() for entry in entries
            if module == entry or module.startswith(entry + ".")]
    return max(held)[1] if held else None


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent.joinpath(*name.split(".")) / "__init__.py").is_file()


def is_module(name: str) -> bool:
    return is_package(name) or PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py").is_file()


def target(name: str) -> str:
    """The module an import of `name` runs: a package's is its __init__."""
    return f"{name}.__init__" if is_package(name) else name


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file at `path`, at any depth, functions included: `from P import N`
    imports module P.N when there is one, else P itself."""
    package = module_name(path).split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, target(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) + 1 - node.level] + [node.module or ""] if node.level
                            else [node.module]).strip(".")
            found += [(node.lineno, target(f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base))
                      for a in node.names]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        room = room_of(module)
        if room is None:
            out.append(f"{module}: in no room: add it to ROOMS in tests/test_imports.py and docs/ARCHITECTURE.md")
            continue
        for line, name in imported(path):
            other = room_of(name)
            if other is not None and other != room and other not in MAY_IMPORT[room]:
                out.append(f"{module} (line {line}): imports {name}: {room} may not import {other}")
    return out


def test_every_module_keeps_to_its_rooms_imports():
    found = violations()
    assert not found, "imports against docs/ARCHITECTURE.md's rules:\n" + "\n".join(found)


def test_a_forbidden_import_is_named(monkeypatch, tmp_path):
    """The check itself: a tokenizer module that imports the model is reported, with its line."""
    (tmp_path / "dpllama" / "tokenizer").mkdir(parents=True)
    (tmp_path / "dpllama" / "tokenizer" / "bad.py").write_text("def f():\n    from dpllama.model import gguf\n")
    (tmp_path / "dpllama" / "model").mkdir()
    (tmp_path / "dpllama" / "model" / "gguf.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "dpllama")
    assert violations() == ["dpllama.tokenizer.bad (line 2): imports dpllama.model.gguf: tokenizer may not import "
                            "model"]


def opencl_loaded(*args: str) -> list[str]:
    """The pyopencl modules `dpllama ARGS` imports (python -X importtime lists every import on stderr)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpllama.cli", *args], capture_output=True,
                       text=True, cwd=PACKAGE.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stderr.splitlines() if line.split("|")[-1].strip().startswith("pyopencl")]


@pytest.mark.parametrize("model", ["gguf", "llama2c"])
def test_tokenize_loads_no_opencl(tmp_path, model):
    if model == "gguf":     # a SentencePiece-style vocabulary that spells "hello"
        tokens = ["<unk>", "<s>", "</s>", "\u2581", "h", "e", "l", "o"]
        write_dpllama_gguf(tmp_path / "m.gguf", random_weights(vocab=len(tokens)),
                           {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens})
        args = ("-m", str(tmp_path / "m.gguf"))
    else:
        args = ("-z", str(llama2c_dir() / "tok512.bin"))
    assert opencl_loaded("tokenize", *args, "hello") == []


def test_pull_loads_no_opencl():
    assert opencl_loaded("pull", "--help") == []
