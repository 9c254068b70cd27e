"""dpllama against llama.cpp on the same GGUF, interleaved in one run, and the stories15M-shape roofline.

    python benchmarks/compare.py                      # SmolLM2-135M Q4_1, 512-token prompt, 128 generated
    python benchmarks/compare.py --rounds 5 --json    # more rounds; machine-readable
    POCL_KERNELLIB_NAME=avx2 python benchmarks/compare.py   # dpllama's AVX2 path on an AVX-512 host (PoCL >= 3.1)
    python benchmarks/compare.py --activation-bits 16,8     # dpllama with 16- and with 8-bit activations, one run

llama.cpp comes from llama-cpp-python (the `bench` extra: `pip install '.[bench]'`, a native build of
several minutes); it runs with the same thread count as the machine's cores. Each round measures
dpllama, then llama.cpp, on the same prompt, so drift on a noisy machine hits both; the ratios are the
result. Then a random model of stories15M's shape (dim 288, hidden 768, 6 layers, 6 heads, vocab 32000,
seq 256) measures dpllama's fp32 and int4 decode (with the tied embedding / classifier in 8 bits,
`dpllama quantize`'s default, and in int4 too, `--keep-8bit none`), in interleaved rounds, against the
machine's streaming read bandwidth, measured in the same run by a kernel that only reads. The int4 models
go the way a user's do: quantized as `dpllama quantize` does, written to its file and loaded back, so the
bytes per token are those of the formats the loader keeps. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dpllama.model.gguf import write_dpllama_gguf
from dpllama.model.llama import Llama
from dpllama.model.weights import Layer, ModelConfig, Tensor, Weights
from dpllama.hub import resolve_model
from dpllama.loaders import load_weights
from dpllama.quantize import EIGHT_BIT_CHOICES, quantize
from dpllama.commands.bench import run_once
from dpllama.commands.devices import read_bandwidth_gb_s
from dpllama.runtime import open_queue

STORIES15M = ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, seq_len=256)


def llamacpp_round(llm, prompt: list[int], n_gen: int) -> dict:
    """The same greedy loop through llama-cpp-python's eval; the last token's logits are read from the
    context (llama-cpp-python keeps them in `scores` only with logits_all, which computes every row)."""
    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = next_token()
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([tok])
        tok = next_token()
    t2 = time.perf_counter()
    return {"prompt_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": (n_gen - 1) / (t2 - t1)}


def random_stories15m(seed: int = 0) -> Weights:
    """A random fp32 model of stories15M's shape, its classifier tied to the embedding table, as stories15M's."""
    c = STORIES15M
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        return Tensor.f32(rng.standard_normal((rows, cols), np.float32) * 0.02)

    tok = mat(c.vocab_size, c.dim)
    layers = [Layer(np.ones(c.dim, np.float32), mat(c.dim, c.dim), mat(c.kv_dim, c.dim), mat(c.kv_dim, c.dim),
                    mat(c.dim, c.dim), np.ones(c.dim, np.float32), mat(c.hidden_dim, c.dim),
                    mat(c.dim, c.hidden_dim), mat(c.hidden_dim, c.dim)) for _ in range(c.n_layers)]
    return Weights(c, tok, layers, np.ones(c.dim, np.float32), tok)


def quantized_file(weights: Weights, eight_bit: tuple[str, ...], path: Path) -> Weights:
    """`weights` as `dpllama quantize` writes them (int4 g32 asym, `eight_bit` kept in 8 bits; no tokenizer:
    nothing here decodes text), loaded back from the file as `dpllama generate` and `bench` load a model."""
    write_dpllama_gguf(path, quantize(weights, 32, symmetric=False, eight_bit=eight_bit), {})
    return load_weights(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a llama GGUF (default: smollm2-135m)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--activation-bits", default="16", metavar="B,B",
                    help="dpllama's --activation-bits, each measured in every round (default 16; 16,8 for both)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is missing: pip install '.[bench]' (a native build of several minutes)")

    path = resolve_model(args.model)
    queue = open_queue()
    weights = load_weights(path)
    # each activation width dpllama runs with, by its name in the results: "dpllama" for the default 16 bits
    name = lambda bits: "dpllama" if bits == 16 else f"dpllama {bits}-bit"    # noqa: E731
    ratio = lambda kind, who: f"{kind}_ratio" + ("" if who == "dpllama" else f" ({who})")  # noqa: E731
    ours_all = {name(b): Llama(weights, queue, max_seq=args.prompt + args.gen, activation_bits=b)
                for b in (int(b) for b in args.activation_bits.split(","))}
    theirs = llama_cpp.Llama(model_path=str(path), n_ctx=args.prompt + args.gen + 8, n_batch=512,
                             n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(17, weights.config.vocab_size, args.prompt)]
    for m in ours_all.values():
        run_once(m, prompt[:16], 4)               # warm-up: first launches, page-ins
    llamacpp_round(theirs, prompt[:16], 4)
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        row = {who: run_once(m, prompt, args.gen) for who, m in ours_all.items()}
        b = row["llama.cpp"] = llamacpp_round(theirs, prompt, args.gen)
        for who in ours_all:
            for kind in ("prompt", "decode"):
                row[ratio(kind, who)] = row[who][f"{kind}_tok_s"] / b[f"{kind}_tok_s"]
        rounds.append(row)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if "ratio" in k}
    for who in (*ours_all, "llama.cpp"):
        for k in ("prompt_tok_s", "decode_tok_s"):
            med[f"{who} {k}"] = statistics.median(r[who][k] for r in rounds)

    print("stories15M shape: fp32 and int4 decode vs streaming bandwidth", file=sys.stderr, flush=True)
    bw = read_bandwidth_gb_s(queue)
    fp32 = random_stories15m()
    with tempfile.TemporaryDirectory() as tmp:     # Llama copies the weights to the device: the files can go
        # "int4": the tied embedding / classifier in 8 bits (`dpllama quantize`'s default); "int4-all": in int4
        # too (`--keep-8bit none`)
        small = {"f32": Llama(fp32, queue),
                 **{kind: Llama(quantized_file(fp32, keep, Path(tmp, f"{kind}.gguf")), queue)
                    for kind, keep in (("int4", EIGHT_BIT_CHOICES), ("int4-all", ()))}}
    for m in small.values():
        run_once(m, [1], 8)                               # warm-up
    tps = {kind: [] for kind in small}
    for _ in range(args.rounds):                          # interleaved: 128 tokens decoded from BOS each
        for kind, m in small.items():
            tps[kind].append(run_once(m, [1], 129)["decode_tok_s"])
    roof = {}
    for kind, m in small.items():
        t = statistics.median(tps[kind])
        roof[kind] = {"decode_tok_s": t, "weight_mb": m.weight_bytes / 1e6,
                      "weight_gb_s": m.weight_bytes * t / 1e9, "of_stream_bw": m.weight_bytes * t / 1e9 / bw}
    result = {"model": str(path), "device": str(queue.device), "kernel_path": queue.device.kernel_path,
              "config": queue.config.path, "threads": args.threads,
              "prompt_tokens": args.prompt, "generated_tokens": args.gen, "rounds": rounds, "median": med,
              "stream_read_gb_s": bw, "stories15m": roof,
              **{f"{kind}_over_fp32_decode": statistics.median(a / b for a, b in zip(tps[kind], tps["f32"]))
                 for kind in ("int4", "int4-all")}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{path.name}, {args.prompt}-token prompt, {args.gen} generated, {args.threads} threads, "
          f"{args.rounds} interleaved rounds (medians); dpllama on {queue.device}, kernel path "
          f"{result['kernel_path']}, config {result['config']}")
    print(f"{'':16} {'prompt tok/s':>13} {'decode tok/s':>13}")
    for who in (*ours_all, "llama.cpp"):
        print(f"{who:16} {med[who + ' prompt_tok_s']:13.1f} {med[who + ' decode_tok_s']:13.1f}")
    for who in ours_all:
        print(f"{'ratio' + who.removeprefix('dpllama'):16} {med[ratio('prompt', who)]:13.2f} "
              f"{med[ratio('decode', who)]:13.2f}")
    print(f"streaming read bandwidth (read-only kernel): {bw:.1f} GB/s")
    for kind, r in roof.items():
        print(f"stories15M {kind:8}: {r['decode_tok_s']:7.1f} tok/s, {r['weight_mb']:.1f} MB/token, "
              f"{r['weight_gb_s']:.1f} GB/s = {100 * r['of_stream_bw']:.0f}% of streaming bandwidth")
    for kind in ("int4", "int4-all"):
        print(f"{kind} / fp32 decode: {result[kind + '_over_fp32_decode']:.2f}x "
              f"(median of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
