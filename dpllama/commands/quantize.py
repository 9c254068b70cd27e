"""`dpllama quantize IN OUT`: a model in int4 (dpllama.quantize), written as dpllama's GGUF with a report."""
from __future__ import annotations

import argparse
import sys

from dpllama import hub
from dpllama.errors import DpllamaError
from dpllama.fileio import check_output
from dpllama.loaders import load_weights
from dpllama.model.gguf import write_dpllama_gguf
from dpllama.model.weights import Tensor, Weights
from dpllama.quantize import EIGHT_BIT_CHOICES, quantize
from dpllama.tokenizer import Llama2cTokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="llama2.c .bin or GGUF (or a known model name)")
    p.add_argument("output", help="dpllama GGUF to write")
    p.add_argument("-z", "--tokenizer", help="llama2.c tokenizer.bin to store in the output (llama2.c inputs)")
    p.add_argument("--group", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--scheme", default="asym", help="asym (scale and min per group, default) or sym (scale only)")
    p.add_argument("--keep-8bit", default="tok_embeddings,output", metavar="NAMES",
                   help="tensors kept in 8 bits: tok_embeddings, output, both comma-separated "
                        "(default), or none; a tied model's one table stays in 8 bits if either is named")


def run(args: argparse.Namespace) -> int:
    keep = () if args.keep_8bit in ("", "none") else tuple(n.strip() for n in args.keep_8bit.split(","))
    quantize_file(args.input, args.output, args.tokenizer, args.group, args.scheme, keep)
    return 0


def quantize_file(src: str, dst: str, tokenizer: str | None = None, group: int = 32, scheme: str = "asym",
                  eight_bit: tuple[str, ...] = EIGHT_BIT_CHOICES, out=sys.stdout) -> Weights:
    """Load, quantize with a report, write `dst` atomically."""
    if scheme not in ("sym", "asym"):
        raise DpllamaError(f"--scheme must be sym or asym, found {scheme!r}")
    # before any work, a known model's download included (its input is then the cached file)
    dst_path = check_output(dst, (hub.cached_path(src) if src in hub.MODELS else src, tokenizer))
    src_path = hub.resolve_model(src)
    weights = load_weights(src_path)
    fields = weights.meta.get("tokenizer_fields")
    if not fields:
        if tokenizer is None:
            raise DpllamaError(f"{src}: a llama2.c checkpoint carries no tokenizer: pass -z TOKENIZER.bin "
                               "so the quantized file is complete")
        fields = Llama2cTokenizer(tokenizer, weights.config.vocab_size).gguf_fields()

    def report(name: str, t: Tensor, err: float) -> None:
        fmt = t.kind if t.kind == "f32" else f"{t.kind} g{t.group}" + (" asym" if t.mins is not None else "")
        out.write(f"\r{name:<24} {t.rows:>6} x {t.cols:<6} {fmt:<14} rel. RMSE {err:.5f}\n")

    q = quantize(weights, group, scheme == "sym", eight_bit, report, progress=True)
    write_dpllama_gguf(dst_path, q, fields)
    size = dst_path.stat().st_size
    out.write(f"overall rel. RMSE {q.meta['rel_rmse']:.5f}; wrote {dst} ({size / 2**20:.1f} MiB, "
              f"from {src_path.stat().st_size / 2**20:.1f} MiB)\n")
    return q
