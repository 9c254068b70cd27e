"""`dpllama pull NAME`: download a known model, or a GGUF from Hugging Face (`hf:OWNER/REPO/FILE.gguf`), into the
cache; `dpllama pull --list`: the known models."""
from __future__ import annotations

import argparse

from dpllama.hub import MODELS, listing, pull, to_stderr


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("name", nargs="?", help=f"a known model ({', '.join(MODELS)}) or hf:OWNER/REPO/FILE.gguf "
                                              "(HF_TOKEN for gated repositories)")
    what.add_argument("--list", action="store_true", help="list the known models, their size, sha256 and "
                                                          "whether they are cached")


def run(args: argparse.Namespace) -> int:
    if args.list:
        rows = [("NAME", "SIZE", "SHA256", "CACHED", "SOURCE"), *listing()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return 0
    print(pull(args.name, progress=to_stderr))
    return 0
