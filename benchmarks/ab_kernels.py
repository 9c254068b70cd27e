"""Two versions of dpllama's kernels (or two device configs) against each other in one process: steps of batched
greedy decode, alternating between them in short bursts, so the machine's drift (20% from minute to minute on a
2-vCPU VM, more than most changes being judged) hits both alike, and the result is the median of the bursts' ratios.

    cp -r dpllama/cl_kernels /tmp/before            # the kernels as they are; then edit dpllama/cl_kernels
    python benchmarks/ab_kernels.py /tmp/before dpllama/cl_kernels                 # 8 sequences decoding
    python benchmarks/ab_kernels.py /tmp/before dpllama/cl_kernels --sequences 1   # one sequence's decode
    python benchmarks/ab_kernels.py /tmp/before dpllama/cl_kernels --prompt 256    # prompt processing
    python benchmarks/ab_kernels.py dpllama/cl_kernels dpllama/cl_kernels --config-b my.yaml   # two configs

Each side is its own queue and model (a queue keeps its programs by file name and defines, so one queue would run
side A's programs for both), built from its kernel directory. The Python side (layouts, launches) is shared, so a
change there is measured by two checkouts' benchmarks/compare.py runs instead. Sequences start from 128-token
prompts and decode as long as the bursts last (16 rounds of 10 steps each per side by default: positions 130 to
~450). With --prompt N a burst is instead one N-token prompt's prefill from position 0, and the two sides' logits
after it are compared (a change meant to keep the same sums must show them identical). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dpllama.commands.bench import random_prompt
from dpllama.generate import Batcher, Sampler, generate
from dpllama.hub import resolve_model
from dpllama.loaders import load_weights
from dpllama.model.llama import Llama
from dpllama.runtime import open_queue, program


def side(weights, kernels: Path, config: str | None, sequences: int, context: int):
    """A model on its own queue built from `kernels`, its sequences past their prompts: (Batcher, generations, queue)."""
    program.KERNEL_DIR = kernels
    q = open_queue(None, config)
    model = Llama(weights, q, max_seq=context, slots=sequences)
    rng = np.random.default_rng(0)
    gens = []
    for s in range(sequences):
        model.select(s)
        gens.append(generate(model, random_prompt(model, 128, rng), context, Sampler(temperature=0)))
    batcher = Batcher(model)
    while not all(g.prompted for g in gens):
        batcher.step(gens)
    for _ in range(3):      # the decode passes' first launches (where PoCL compiles) before any timing
        batcher.step(gens)
    q.wait()
    return batcher, gens, q


def prompt_side(weights, kernels: Path, config: str | None, n: int):
    """A model on its own queue built from `kernels`, for prefills of n tokens: (model, prompt)."""
    program.KERNEL_DIR = kernels
    model = Llama(weights, open_queue(None, config), max_seq=n)
    prompt = random_prompt(model, n, np.random.default_rng(0))
    prefill(model, prompt)      # the prefill passes' first launches (where PoCL compiles) before any timing
    return model, prompt


def prefill(model, prompt: list[int]) -> np.ndarray:
    model.start(prompt)
    model.feed(len(prompt))
    return model.read_logits()


def compare_prompts(args, weights) -> int:
    sides = [prompt_side(weights, k.resolve(), c, args.prompt)
             for k, c in ((args.kernels_a, args.config_a), (args.kernels_b, args.config_b))]
    ms: list[list[float]] = [[], []]
    logits = [None, None]
    for _ in range(args.rounds):
        for i, (model, prompt) in enumerate(sides):
            t = time.perf_counter()
            logits[i] = prefill(model, prompt)
            ms[i].append((time.perf_counter() - t) * 1e3)
    ratios = [b / a for a, b in zip(*ms)]
    diff = float(np.abs(logits[0] - logits[1]).max())
    print(f"prompts of {args.prompt} tokens, {args.rounds} a side")
    print(f"A {statistics.median(ms[0]):.1f} ms/prompt, B {statistics.median(ms[1]):.1f} ms/prompt; "
          f"B/A median {statistics.median(ratios):.3f} (prompts {min(ratios):.3f}-{max(ratios):.3f}; below 1: B faster)")
    print("last logits: " + ("identical" if diff == 0 else f"differ by up to {diff:.3g}"))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kernels_a", type=Path, help="side A's kernel directory (a copy of dpllama/cl_kernels)")
    p.add_argument("kernels_b", type=Path, help="side B's kernel directory")
    p.add_argument("-m", "--model", default="smollm2-135m", help="dpllama's model name or a model file")
    p.add_argument("--config-a", help="side A's device config (default: the shipped one for the device)")
    p.add_argument("--config-b", help="side B's device config")
    p.add_argument("--sequences", type=int, default=8, help="sequences decoding in each step (default 8)")
    p.add_argument("--rounds", type=int, default=16, help="bursts per side (default 16)")
    p.add_argument("--steps", type=int, default=10, help="steps per burst (default 10)")
    p.add_argument("--prompt", type=int, default=0, metavar="N",
                   help="time prefills of an N-token prompt instead of decode steps")
    p.add_argument("--context", type=int, default=0, metavar="N",
                   help="the models' context, where longer than the steps need: the same positions in a larger cache")
    args = p.parse_args()
    weights = load_weights(resolve_model(args.model))
    if args.prompt:
        return compare_prompts(args, weights)
    context = 128 + 8 + args.rounds * args.steps + 8
    sides = [side(weights, k.resolve(), c, args.sequences, max(context, args.context))
             for k, c in ((args.kernels_a, args.config_a), (args.kernels_b, args.config_b))]
    ms: list[list[float]] = [[], []]
    for _ in range(args.rounds):
        for i, (batcher, gens, q) in enumerate(sides):
            t = time.perf_counter()
            for _ in range(args.steps):
                batcher.step(gens)
            q.wait()
            ms[i].append((time.perf_counter() - t) / args.steps * 1e3)
    ratios = [b / a for a, b in zip(*ms)]
    print(f"{args.sequences} sequence(s), {args.rounds} bursts of {args.steps} steps a side, positions 130-{context - 8}")
    print(f"A {statistics.median(ms[0]):.3f} ms/step, B {statistics.median(ms[1]):.3f} ms/step; "
          f"B/A median {statistics.median(ratios):.3f} (bursts {min(ratios):.3f}-{max(ratios):.3f}; below 1: B faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
