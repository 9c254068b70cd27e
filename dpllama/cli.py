"""The `dpllama` command: a table of subcommands, the parsing of their arguments, and how the process ends.

Each subcommand is a module of dpllama/commands with `add_arguments(parser)` and `run(args)`; only the
chosen command's module is imported, so `dpllama --help` and light commands (`tokenize`, `pull`) never load
pyopencl or NumPy.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from dpllama import __version__
from dpllama.errors import DpllamaError
from dpllama.fileio import remove_live
from dpllama.signals import signals_held

# name -> help; the command is dpllama.commands.<name>
COMMANDS = {
    "devices": "list OpenCL devices, show which one dpllama uses and why, check it works",
    "generate": "continue a prompt, streaming tokens (llama2.c's run flags)",
    "chat": "chat with a model in its chat template",
    "tokenize": "print the token ids of a text",
    "quantize": "quantize a model to int4 (dpllama GGUF)",
    "pull": "download a model into the cache: a known name (--list) or hf:OWNER/REPO/FILE.gguf",
    "perplexity": "perplexity over a text as llama.cpp's llama-perplexity, and KL divergence against a reference",
    "bench": "measure prompt processing and decode speed",
    "tune": "search work-group sizes on this device and write the fastest config",
    "serve": "serve a model over HTTP with OpenAI's API (chat, completions, streaming)",
}


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command `argv` names (its first word that is not an option)."""
    p = argparse.ArgumentParser(prog="dpllama", description="Llama-family LLM inference on any OpenCL device.")
    p.add_argument("--version", action="version", version=f"dpllama {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            command = importlib.import_module(f"dpllama.commands.{name}")
            command.add_arguments(sp)
            sp.set_defaults(run=command.run, command_parser=sp)
    return p


def terminated(signum, frame):
    """SIGTERM (kill's default) unwinds like Ctrl-C, so that temporaries are removed and child processes
    (pull's pip) killed on the way out, instead of Python's default of dying on the spot."""
    sys.exit(128 + signum)


def interrupted(signum, frame):
    """Ctrl-C: one line and exit 130, at once. A KeyboardInterrupt would land wherever Python happens to be:
    inside a native module's initialisation (PyOpenCL's then aborts the process), in a finalizer (Python prints
    "Exception ignored" and carries on), in argparse's imports. Nothing needs unwinding: files are written whole
    or not at all, this process's temporaries are removed here (fileio.LIVE), and pull's pip dies with dpllama."""
    remove_live()
    os.write(2, b"\ndpllama: interrupted\n")
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    """Run the command in `argv` (default: the process's own arguments) and return its exit status. Ctrl-C is
    `interrupted` (chat takes it back, to stop a reply). Called as the program (`argv` None), it ignores Ctrl-C
    once the command is over: its work is done, and it would otherwise land in the interpreter's teardown."""
    signal.signal(signal.SIGTERM, terminated)
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        words = sys.argv[1:] if argv is None else argv
        # the threads the command's imports start (NumPy's BLAS) never take SIGINT or SIGTERM (dpllama/signals.py)
        with signals_held():
            p = parser(words)
        args, unknown = p.parse_known_args(words)
        if unknown:     # with the subcommand's usage, not the top level's, which does not show its options
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.run(args)
    except DpllamaError as e:
        print(f"dpllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # chat's, at its start or end
        print("\ndpllama: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN if argv is None else previous)


if __name__ == "__main__":
    sys.exit(main())
