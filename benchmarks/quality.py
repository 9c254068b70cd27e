"""The numbers of docs/QUALITY.md: perplexity and KL divergence of SmolLM2-135M in dpllama's formats over WikiText-2,
in llama-perplexity's protocol (dpllama/perplexity.py).

    PYTHONPATH=. python benchmarks/quality.py                 # 16 chunks of 512 (about 15 minutes on 2 cores)
    PYTHONPATH=. python benchmarks/quality.py --chunks 4 --json
    PYTHONPATH=. python benchmarks/quality.py --model qwen2.5-coder-0.5b   # the file as shipped against its f32
    PYTHONPATH=. python benchmarks/quality.py --shipped-only  # the reference and the file as shipped only

The reference of the KL divergence is the shipped Q4_1 file's own weights dequantized to float32 and run with float32
weights and activations (dpllama's f32 kernels): there is no float32 SmolLM2 GGUF here, so every other row is the
Q4_1 model requantized, and the KL measures what each format loses against the weights it was made from, not
against the original bf16 model. The float32 reference is the computation of the oracle in
shared/models/smollm2/perplexity_wikitext2.json, whose per-chunk values are printed beside it. Each model goes
through the same code as `dpllama perplexity` (chunk_distributions); the int4 variants are `dpllama quantize`'s
(dpllama.quantize.quantize, the table kept in 8 bits as its default); "q8" puts every matrix in q8 group 32, which
the command does not offer. The file as shipped is also run with `--activation-bits 8` (llama.cpp's numerics). Not
part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dpllama.hub import resolve_model
from dpllama.loaders import load_tokenizer
from dpllama.model.gguf import load_gguf
from dpllama.model.llama import Llama
from dpllama.model.quant import quantize_q8
from dpllama.model.weights import MATRICES, Tensor, Weights
from dpllama.perplexity import Base, BaseWriter, KLStatistics, chunk_distributions, ppl_estimate
from dpllama.quantize import quantize
from dpllama.runtime import open_queue

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
ORACLE = SHARED / "models" / "smollm2" / "perplexity_wikitext2.json"
EXACT_KL_CHUNKS = 2     # chunks whose reference distributions are kept in float32, to check the base file's KL


def every_matrix(w: Weights, convert) -> Weights:
    """`w` with every matrix converted (a tied table stays one)."""
    tok = convert(w.tok_embeddings)
    layers = [replace(L, **{m: convert(getattr(L, m)) for m in MATRICES}) for L in w.layers]
    return Weights(w.config, tok, layers, w.norm, tok if w.tied else convert(w.output), w.meta)


def variants(w: Weights, requantized: bool):
    """(name, weights, activation bits) of every row, the reference first; built one at a time (the f32 one holds
    650 MB for SmolLM2, 2 GB for Qwen2.5-0.5B). `requantized`: SmolLM2's rows in dpllama's other formats too."""
    shipped = Path(w.meta["path"]).name
    yield f"f32 reference ({shipped} dequantized)", every_matrix(w, lambda t: Tensor.f32(t.dequantize())), 16
    yield f"{shipped} as shipped", w, 16
    yield f"{shipped} as shipped, --activation-bits 8", w, 8
    if not requantized:
        return
    yield ("q8 g32, every matrix", every_matrix(w, lambda t: t if t.kind == "q8" else quantize_q8(t.dequantize(), 32)),
           16)
    for group in (32, 64, 128):
        for symmetric in (True, False):
            if (group, symmetric) != (32, False):   # g32 asym is Q4_1's own layout: carried over bit for bit
                yield f"int4 g{group} {'sym' if symmetric else 'asym'}", quantize(w, group, symmetric), 16


def exact_kl(ref_log_p: np.ndarray, dist) -> np.ndarray:
    """KL(reference || model) per row, over the whole vocabulary from float32 log-probabilities, in float64."""
    return (np.exp(ref_log_p.astype(np.float64)) * (ref_log_p - dist.log_p_all())).sum(axis=1)


def score(model, tokens, n_ctx: int, chunks: int, writer: BaseWriter | None, base: Base | None,
          ref_log_p: list) -> dict:
    """One model over the chunks: the reference (`writer` saves it, and its first chunks' distributions go into
    `ref_log_p`), or a model against the `base`."""
    nll, parts, kl_exact = [], [], []
    start = time.perf_counter()
    for i, (dist, targets) in enumerate(chunk_distributions(model, tokens, n_ctx, chunks, None)):
        nll.append(dist.nll(targets))
        if writer is not None:
            writer.add(dist, targets)
            if i < EXACT_KL_CHUNKS:
                ref_log_p.append(dist.log_p_all().astype(np.float32))
        else:
            parts.append(KLStatistics.of(base.records[i], dist, targets))
            if i < EXACT_KL_CHUNKS:
                kl_exact.append(exact_kl(ref_log_p[i], dist))
    seconds = time.perf_counter() - start
    row = {"weight_mb": model.weight_bytes / 1e6, "ppl": ppl_estimate(np.concatenate(nll)),
           "chunk_ppl": [float(np.exp(n.mean())) for n in nll], "tok_s": chunks * (n_ctx - 1) / seconds}
    if parts:
        row["kl"] = KLStatistics.join(parts).summary()
        row["kl_exact_first_chunks"] = float(np.concatenate(kl_exact).mean())
        row["kl_base_first_chunks"] = float(np.concatenate([p.kld for p in parts[:EXACT_KL_CHUNKS]]).mean())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("-c", type=int, default=512, dest="n_ctx")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default="smollm2-135m", help="a known model or a GGUF (only SmolLM2 is requantized)")
    ap.add_argument("--shipped-only", action="store_true", help="the reference and the file as shipped only")
    args = ap.parse_args()
    path = resolve_model(args.model)
    w = load_gguf(path)
    tokens = np.asarray(load_tokenizer(w, None, path).encode(TEXT.read_bytes().decode("utf-8")), np.int32)
    q = open_queue(out_of_order=False)
    rows, ref_log_p, base = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "f32.kld"
        for name, weights, bits in variants(w, args.model == "smollm2-135m" and not args.shipped_only):
            print(f"quality: {name} ...", file=sys.stderr, flush=True)
            model = Llama(weights, q, max_seq=args.n_ctx, activation_bits=bits)
            if base is None:
                with open(base_path, "wb") as f:
                    writer = BaseWriter(f, args.n_ctx, w.config.vocab_size, tokens, args.chunks)
                    row = score(model, tokens, args.n_ctx, args.chunks, writer, None, ref_log_p)
                base = Base.read(base_path)
            else:
                row = score(model, tokens, args.n_ctx, args.chunks, None, base, ref_log_p)
            rows.append({"model": name, **row})
            del model, weights
    result = {"chunks": args.chunks, "n_ctx": args.n_ctx, "tokens": int(tokens.size), "rows": rows,
              "oracle": json.loads(ORACLE.read_text()) if ORACLE.is_file() and args.model == "smollm2-135m" else None}
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


def table(r: dict) -> str:
    lines = [f"{r['chunks']} chunks of {r['n_ctx']}, {r['chunks'] * (r['n_ctx'] // 2 - 1)} scored tokens", "",
             "| model | weights MB | PPL | PPL(Q)/PPL(ref) | mean KL | same top | tok/s |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        ppl, pm = row["ppl"]
        kl = row.get("kl")
        cells = ([f"{kl['PPL(Q)/PPL(base)'][0]:.4f} ± {kl['PPL(Q)/PPL(base)'][1]:.4f}",
                  f"{kl['KLD'][0]:.5f} ± {kl['KLD'][1]:.5f}",
                  f"{100 * kl['Same top p'][0]:.2f} ± {100 * kl['Same top p'][1]:.2f} %"]
                 if kl else ["1", "0", "100 %"])
        lines.append(f"| {row['model']} | {row['weight_mb']:.1f} | {ppl:.4f} ± {pm:.4f} | " + " | ".join(cells)
                     + f" | {row['tok_s']:.0f} |")
    lines += ["", f"mean KL from the base file against the exact KL, first {EXACT_KL_CHUNKS} chunks:"]
    lines += [f"  {row['model']}: {row['kl_base_first_chunks']:.7f} vs {row['kl_exact_first_chunks']:.7f}"
              for row in r["rows"] if "kl" in row]
    if r["oracle"]:
        o = r["oracle"]
        lines += ["", "first 4 chunks: dpllama f32 | oracle fp32 | dpllama Q4_1 | dpllama Q4_1 8-bit activations | "
                      "llama.cpp Q4_1"]
        for i in range(min(4, r["chunks"])):
            lines.append(f"  [{i + 1}] {r['rows'][0]['chunk_ppl'][i]:.4f} | {o['fp32']['chunk_ppl'][i]:.4f} | "
                         f"{r['rows'][1]['chunk_ppl'][i]:.4f} | {r['rows'][2]['chunk_ppl'][i]:.4f} | "
                         f"{o['llamacpp']['chunk_ppl'][i]:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
