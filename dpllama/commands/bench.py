"""`dpllama bench -m MODEL`: prompt processing and decode speed, measured the way users run models.

Reports prompt-processing tok/s (`--prompt` tokens, 512 by default), decode tok/s over `--gen`
tokens (128), ms per token, GB/s of weight bytes read per decoded token, kernel launches per token,
first-token latency, the time from nothing to a first token with every kernel cache empty (load, build and
the kernels' first launches: a cold start), and model load + build time with the caches filled (cached).
`--repeat N` gives the median and the spread; `--profile` adds kernel time by kernel from profiling events,
for decode. `--batch 1,8` adds batched decoding (the server's engine):
B sequences of `--prompt` tokens each, decoding together in one forward pass per step, and their aggregate
tok/s against B = 1 of the same kind in the same run. Speed is only ever compared within one run: the
machine is noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from dpllama.commands.options import add_activation_bits, add_device, add_model
from dpllama.errors import DpllamaError
from dpllama.generate import Batcher, Sampler, generate
from dpllama.hub import resolve_model
from dpllama.loaders import load_weights
from dpllama.llm import context_cap
from dpllama.model.llama import Llama
from dpllama.runtime import build_stats, open_queue


def check_fits(c, q, max_seq: int, slots: int, kv_cache: str) -> None:
    """That `slots` sequences of max_seq tokens fit the model's context and the device (llm.context_cap), before
    Llama allocates them: it would shrink the context, and bench's runs need theirs whole."""
    if max_seq > c.seq_len:
        raise DpllamaError(f"--prompt + --gen: {max_seq} tokens, more than the model's context of {c.seq_len}")
    cap, need = context_cap(c, q, max_seq, slots, kv_cache=kv_cache)
    if max_seq > cap:
        raise DpllamaError(f"{slots} sequences (--batch) of {max_seq} tokens (--prompt + --gen) need {need}")


def _load(path, device, config, max_seq, activation_bits=16, profiling=False, slots=1, kv_cache="f16"):
    t = time.perf_counter()
    weights = load_weights(path)
    q = open_queue(device, config, profiling=profiling)
    check_fits(weights.config, q, max_seq, slots, kv_cache)
    model = Llama(weights, q, max_seq=max_seq, slots=slots, activation_bits=activation_bits, kv_cache=kv_cache)
    model.q.wait()
    return model, time.perf_counter() - t


def _first_token(path, device, config, max_seq, activation_bits, kv_cache) -> float:
    """Seconds from nothing to a first generated token: load, build, and the first launches of prefill's and decode's
    kernels (where a driver such as PoCL compiles each kernel for its work-group size)."""
    t = time.perf_counter()
    model, _ = _load(path, device, config, max_seq, activation_bits, kv_cache=kv_cache)
    # a prefill pass, then decode steps: a token more than a pass, and room for two decode steps where the
    # context (--prompt + --gen) is shorter
    prompt = list(range(3, 3 + min(model.geometry.prefill_tokens + 1, model.seq_len - 1)))
    list(generate(model, prompt, 2, Sampler(temperature=0)))
    return time.perf_counter() - t


def _cold_start_s(path, device, config, max_seq, activation_bits, kv_cache) -> float:
    """_first_token in a fresh process with every kernel cache empty: dpllama's ($DPLLAMA_HOME) and the OpenCL
    driver's own (PoCL's POCL_CACHE_DIR), which a process reads once."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DPLLAMA_HOME=tmp, POCL_CACHE_DIR=tmp)
        code = ("import sys, json; from dpllama.commands.bench import _first_token; "
                "from dpllama.errors import DpllamaError\n"
                "try: print(json.dumps(_first_token(sys.argv[1], *json.loads(sys.argv[2]))))\n"
                "except DpllamaError as e: sys.exit(str(e))")     # its message alone as the last line
        r = subprocess.run([sys.executable, "-c", code, str(path),
                            json.dumps([device, config, max_seq, activation_bits, kv_cache])],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise DpllamaError(f"cold start of {path} failed: {r.stderr.strip().splitlines()[-1]}")
        return float(r.stdout)


def random_prompt(model, n: int, rng: np.random.Generator) -> list[int]:
    return [int(t) for t in rng.integers(3, model.config.vocab_size, n)]


def run_once(model, prompt: list[int], n_gen: int) -> dict:
    """The prompt in batched prefill, then greedy decoding of n_gen tokens, as `generate` runs them: speeds
    and launches."""
    gen = generate(model, prompt, n_gen, Sampler(temperature=0))
    for i, _ in enumerate(gen):
        if i == 0:                          # the first token: the prompt's, with one decode step enqueued
            if model.q.profiling:
                model.q.profile()           # the kernel profile is the decode's
            decode_launches = model.q.launches
    st = gen.stats
    decode_s = (st.end - st.first_token) / (n_gen - 1)
    return {
        "prompt_tok_s": st.prompt_tok_s,
        "decode_tok_s": st.decode_tok_s,
        "ms_per_token": decode_s * 1e3,
        "weight_gb_s": model.weight_bytes / decode_s / 1e9,
        "first_token_ms": (st.first_token - st.start) * 1e3,
        # each token after the first: its argmax, and the pass that feeds it (enqueued ahead, without the
        # embedding: the first such pass went out with the first token, the last token's never does)
        "launches_per_token": (model.q.launches - decode_launches + len(model.forward_commands(1)) - 1) / (n_gen - 1),
    }


def run_batched(model, prompts: list[list[int]], n_gen: int) -> dict:
    """len(prompts) greedy sequences in slots 0, 1, ... through batched passes (a Batcher, as the server's engine
    runs them): once every prompt is in, n_gen - 1 steps of one pass for all, timed."""
    gens = []
    for slot, prompt in enumerate(prompts):
        model.select(slot)
        gens.append(generate(model, prompt, n_gen, Sampler(temperature=0)))
    batcher = Batcher(model)
    while not all(g.prompted for g in gens):    # the prompts, a pass's worth at a time, and each one's first token
        batcher.step(gens)
    model.q.wait()      # the prompts' last pass is still running: timed, it would count as decode steps
    t, steps = time.perf_counter(), 0
    while True:
        batcher.step(gens)
        if batcher.idle:
            break
        steps += 1
    step_s = (time.perf_counter() - t) / steps
    return {"decode_tok_s": len(prompts) / step_s, "ms_per_step": step_s * 1e3}


def bench(model_path: str, device=None, config=None, n_prompt=512, n_gen=128, repeat=1, profile=False,
          progress=True, batch: tuple[int, ...] = (), activation_bits: int = 16, kv_cache: str = "f16") -> dict:
    path = resolve_model(model_path)
    say = (lambda s: print(f"dpllama bench: {s}", file=sys.stderr, flush=True)) if progress else (lambda s: None)
    max_seq = n_prompt + n_gen
    say("load, build and a first token, empty kernel caches ...")
    cold = _cold_start_s(path, device, config, max_seq, activation_bits, kv_cache)
    say("load + build, cached ...")
    model, cached = _load(path, device, config, max_seq, activation_bits, profiling=profile, slots=max(batch, default=1),
                          kv_cache=kv_cache)
    runs = []
    rng = np.random.default_rng(0)
    run_once(model, random_prompt(model, 8, rng), 4)   # warm-up: first launches of every kernel
    model.q.profile()   # drop the warm-up's profiling events
    for i in range(repeat):
        say(f"run {i + 1}/{repeat}: {n_prompt} prompt tokens, {n_gen} generated ...")
        runs.append(run_once(model, random_prompt(model, n_prompt, rng), n_gen))
    c = model.config
    result = {
        "model": str(path), "device": str(model.q.device), "config": model.q.config.path,
        "activation_bits": activation_bits, "kv_cache": kv_cache,
        "shape": {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                  "n_kv_heads": c.n_kv_heads, "vocab_size": c.vocab_size},
        "weight_bytes_per_token": model.weight_bytes, "prompt_tokens": n_prompt, "generated_tokens": n_gen,
        "repeat": repeat, "first_token_cold_s": cold, "load_cached_s": cached,
        "kernel_builds": dict(build_stats),
    }
    for key in runs[0]:
        values = [r[key] for r in runs]
        result[key] = statistics.median(values)
        result[key + "_spread"] = (max(values) - min(values)) if len(values) > 1 else 0.0
    if profile:
        prof = model.q.profile()
        total = sum(p["ns"] for p in prof.values()) or 1
        result["profile"] = {k: {"calls": p["calls"], "ms": p["ns"] / 1e6, "share": p["ns"] / total}
                             for k, p in sorted(prof.items(), key=lambda kv: -kv[1]["ns"])}
    if batch:
        result["batched"] = {}
        for b in batch:
            say(f"batched: {b} sequences of {n_prompt} prompt tokens, {n_gen} generated each ...")
            # warm-up: the first pass of each size records its launches and has PoCL compile the kernels for its
            # work sizes (~0.3 s for one sequence), which timed would pass for slower steps
            run_batched(model, [random_prompt(model, 8, rng) for _ in range(b)], 4)
            result["batched"][b] = run_batched(model, [random_prompt(model, n_prompt, rng) for _ in range(b)], n_gen)
        first = result["batched"][batch[0]]["decode_tok_s"]
        for r in result["batched"].values():
            r["vs_first"] = r["decode_tok_s"] / first     # aggregate tok/s against the first B's, same run
    return result


def format_text(r: dict) -> str:
    lines = [f"model    {r['model']}", f"device   {r['device']}  (config {r['config']})",
             f"weights  {r['weight_bytes_per_token'] / 1e6:.1f} MB read per token, "
             f"{r['activation_bits']}-bit activations into int4/int5 matrices, {r['kv_cache']} KV cache"]
    spread = lambda k: f" ± {r[k + '_spread'] / 2:.2f}" if r["repeat"] > 1 else ""  # noqa: E731
    lines += [
        f"prompt   {r['prompt_tok_s']:8.2f} tok/s{spread('prompt_tok_s')}  ({r['prompt_tokens']} tokens)",
        f"decode   {r['decode_tok_s']:8.2f} tok/s{spread('decode_tok_s')}  {r['ms_per_token']:.2f} ms/token, "
        f"{r['weight_gb_s']:.2f} GB/s of weights, {r['launches_per_token']:.0f} launches/token",
        f"first token after the prompt: {r['first_token_ms']:.0f} ms",
        f"cold start (empty kernel caches) to a first token: {r['first_token_cold_s']:.2f} s; "
        f"load + build cached: {r['load_cached_s']:.2f} s",
    ]
    for name, p in r.get("profile", {}).items():
        lines.append(f"  {name:<20} {p['calls']:>7} calls {p['ms']:10.1f} ms  {100 * p['share']:5.1f}%")
    for b, p in r.get("batched", {}).items():
        lines.append(f"batched  {b:>3} sequences: {p['decode_tok_s']:8.2f} tok/s in all ({p['vs_first']:.2f}x), "
                     f"{p['ms_per_step']:.2f} ms per step")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the median and the spread are reported")
    p.add_argument("--profile", action="store_true", help="kernel time by kernel, from profiling events")
    p.add_argument("--batch", default="", metavar="B,B,...",
                   help="also batched decoding of B sequences at once for each B (e.g. 1,8,16), as the server runs them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_device(p, ctx=False)
    add_activation_bits(p)


def run(args: argparse.Namespace) -> int:
    if args.prompt < 1 or args.gen < 2 or args.repeat < 1:
        raise DpllamaError(f"need --prompt >= 1, --gen >= 2, --repeat >= 1; found {args.prompt}, {args.gen}, "
                           f"{args.repeat}")
    try:
        batch = tuple(int(b) for b in args.batch.split(",")) if args.batch else ()
    except ValueError:
        batch = (0,)
    if any(b < 1 for b in batch):
        raise DpllamaError(f"--batch takes sequence counts >= 1 separated by commas (e.g. 1,8), found {args.batch!r}")
    r = bench(args.model, args.device, args.config, args.prompt, args.gen, args.repeat, args.profile,
              progress=not args.quiet, batch=batch, activation_bits=args.activation_bits, kv_cache=args.cache_type)
    print(json.dumps(r, indent=2) if args.json else format_text(r))
    return 0
