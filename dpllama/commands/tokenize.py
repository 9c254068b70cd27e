"""`dpllama tokenize`: the token ids of a text (no OpenCL: a tokenizer, or a model's, alone)."""
from __future__ import annotations

import argparse

from dpllama.commands.options import add_model
from dpllama.loaders import tokenizer_only


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, required=False)
    p.add_argument("text", help="the text to encode")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS")
    p.add_argument("--special", action="store_true", help="parse special tokens")
    p.add_argument("--pieces", action="store_true", help="print each id with its piece")


def run(args: argparse.Namespace) -> int:
    tok = tokenizer_only(args.model, args.tokenizer)
    ids = tok.encode(args.text, bos=False if args.no_bos else None, parse_special=args.special)
    if args.pieces:
        for t in ids:
            print(t, repr(tok.token_bytes(t).decode("utf-8", "replace")))
    else:
        print(" ".join(map(str, ids)))
    return 0
