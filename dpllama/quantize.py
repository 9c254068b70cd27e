"""Quantization to int4 (the `dpllama quantize` command is dpllama/commands/quantize.py).

From a llama2.c checkpoint or a GGUF (of any type `dpllama.model.gguf` reads), `dpllama quantize` stores every weight
matrix as int4 (8 per 32-bit word, fp16 scales per group, symmetric or with mins) except those kept in 8 bits (`eight_bit`: the embedding table
and the classifier by default; a tied model's one table is both, kept in 8 bits when either is named),
and writes dpllama's GGUF container with the model config and the tokenizer inside, so the one file is
enough to run. Every kind loads and runs as written (an int4 table too: the device decodes its rows).
int4 tensors whose group and scheme match the request are carried over bit for bit (GGUF Q4_0 / Q4_1, and Q4_K,
with its float32 scales), and so are 8-bit ones kept in 8 bits (Q8_0, Q6_K, IQ4_NL, IQ4_XS: q8 of any group) and
5-bit ones (Q5_0, Q5_1, Q5_K: int5), which 8 bits would only round again.
Prints per-tensor and overall error: RMSE relative to the source weights' RMS.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.model.quant import quantize_int4, quantize_q8
from dpllama.model.weights import MATRICES, Tensor, Weights

GROUPS = (32, 64, 128)
EIGHT_BIT_CHOICES = ("tok_embeddings", "output")


def convert(t: Tensor, bits: int, group: int, symmetric: bool) -> Tensor:
    """t in the requested format; already in it (an int4 of any scale type, a q8 of any group; for 8 bits an
    int5 too, which q8 would re-round rather than widen) means unchanged (lossless)."""
    if bits == 8:
        return t if t.kind in ("q8", "int5") else quantize_q8(t.dequantize(), 32)
    if t.kind == "int4" and t.group == group and (t.mins is None) == symmetric:
        return t
    return quantize_int4(t.dequantize(), group, symmetric)


def relative_rmse(src: Tensor, out: Tensor) -> float:
    a = src.dequantize()
    rms = float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) or 1.0
    return float(np.sqrt(np.mean((out.dequantize().astype(np.float64) - a) ** 2))) / rms


def progress_bar(done: int, total: int, label: str, stream=sys.stderr) -> None:
    width = 30
    n = width * done // total
    stream.write(f"\r[{'#' * n}{'.' * (width - n)}] {done}/{total} {label:<24.24}")
    if done == total:
        stream.write("\n")
    stream.flush()


def quantize(weights: Weights, group: int = 32, symmetric: bool = False,
             eight_bit: tuple[str, ...] = EIGHT_BIT_CHOICES, report=None, progress: bool = False) -> Weights:
    """A new Weights with every matrix converted; `report(name, tensor, rel_rmse)` per tensor, and a
    progress bar on stderr when `progress`."""
    if group not in GROUPS:
        raise DpllamaError(f"group size must be one of {', '.join(map(str, GROUPS))}, found {group}")
    for name in eight_bit:
        if name not in EIGHT_BIT_CHOICES:
            raise DpllamaError(f"--keep-8bit: unknown tensor {name!r} (expected {', '.join(EIGHT_BIT_CHOICES)})")
    total = 1 + len(weights.layers) * len(MATRICES) + (0 if weights.tied else 1)
    done, errors = 0, []

    def conv(name: str, t: Tensor, bits: int) -> Tensor:
        nonlocal done
        out = convert(t, bits, group, symmetric)
        err = relative_rmse(t, out)
        errors.append((t.rows * t.cols, err))
        if report:
            report(name, out, err)
        done += 1
        if progress:
            progress_bar(done, total, name)
        return out

    # a tied table is also the classifier: 8 bits for it when either role asks for them
    emb_bits = 8 if "tok_embeddings" in eight_bit or (weights.tied and "output" in eight_bit) else 4
    tok = conv("tok_embeddings", weights.tok_embeddings, emb_bits)
    layers = []
    for i, L in enumerate(weights.layers):
        layers.append(replace(L, **{m: conv(f"layers.{i}.{m}", getattr(L, m), 4) for m in MATRICES}))
    out = tok if weights.tied else conv("output", weights.output, 8 if "output" in eight_bit else 4)
    n = sum(k for k, _ in errors)
    overall = float(np.sqrt(sum(k * e * e for k, e in errors) / n))
    return Weights(weights.config, tok, layers, weights.norm, out, dict(weights.meta, rel_rmse=overall))
