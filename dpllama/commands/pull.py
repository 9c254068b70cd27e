"""`dpllama pull NAME`: download a known model into the cache."""
from __future__ import annotations

import argparse
import sys

from dpllama.hub import MODELS, pull


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help=f"a known model: {', '.join(MODELS)}")


def run(args: argparse.Namespace) -> int:
    print(pull(args.name, progress=lambda s: print(f"dpllama: {s}", file=sys.stderr)))
    return 0
