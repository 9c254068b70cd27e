"""`dpllama tune -m MODEL`: search the work-group sizes of the current device and write the best config.

A coordinate search: starting from the device's config, each key in SEARCH is tried at each of its
values with the others held, on the model the user will run, and the fastest value is kept (decode
keys by decode tok/s, prefill keys by prompt tok/s). Every candidate runs the same kernels the
correctness tests cover, so tuning changes speed, never results.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

from dpllama.commands.devices import config_output, config_path, write_config
from dpllama.commands.options import add_device, add_model
from dpllama.generate import Sampler, generate
from dpllama.hub import resolve_model
from dpllama.loaders import load_weights
from dpllama.model.llama import Llama
from dpllama.runtime import DeviceConfig, open_queue

# (work_group key, candidates, phase it speeds up)
SEARCH = [
    ("tile_rows", (4, 8, 16), "decode"),
    ("decode_tiles", (1, 2, 4, 8), "decode"),
    ("matrix_groups", (1, 2, 4), "decode"),
    ("gemv", (1, 16, 64), "decode"),
    ("attention", (1, 16, 64), "decode"),
    ("prefill_tokens", (4, 8, 16), "prefill"),
    ("prefill_tiles", (1, 4, 16), "prefill"),
    ("prefill_chunk", (32, 64, 128), "prefill"),
    ("decode_prefetch", (128, 256, 512), "decode"),
    ("prefill_prefetch", (128, 512), "prefill"),
]
PROMPT = 128        # prefill measure: tokens per pass
MIN_SECONDS = 0.4   # each measurement repeats its phase for at least this long


def measure(model: Llama, phase: str) -> float:
    """tok/s of one phase, run as `generate` runs it: after an untimed warm-up (PoCL finishes compiling a
    kernel at its first launch), the best of three runs of at least MIN_SECONDS each. Prefill: a PROMPT-token
    prompt and its first token; decode: tokens after the first, from a short prompt on."""
    greedy = Sampler(temperature=0)

    def run() -> float:
        tokens, spent = 0, 0.0
        while spent < MIN_SECONDS:
            if phase == "prefill":
                gen = generate(model, list(range(3, 3 + PROMPT)), 1, greedy)
                for _ in gen:
                    pass
                tokens, spent = tokens + PROMPT, spent + gen.stats.first_token - gen.stats.start
            else:
                n = 0
                gen = generate(model, list(range(3, 11)), model.seq_len, greedy)
                for n, _ in enumerate(gen):
                    if time.perf_counter() - gen.stats.first_token >= MIN_SECONDS:
                        break
                tokens, spent = tokens + n, spent + time.perf_counter() - gen.stats.first_token
        return tokens / spent
    run()
    return max(run() for _ in range(3))


def tune(model_path: str, device: str | None, config: str | None, out: str, say=print,
         tokenizer: str | None = None) -> dict:
    path = resolve_model(model_path)
    weights = load_weights(path)
    q = open_queue(device, config)
    # before minutes of tuning; the tokenizer counts as an input though tune reads none
    target = config_output(out, (path, tokenizer, config_path(q.config)))
    base: DeviceConfig = q.config
    limit = q.device.cl_device.max_work_group_size
    wg = q.config.values["work_group"]
    found = {}
    for key, candidates, phase in SEARCH:
        scores = {}
        for v in candidates:
            if key in ("gemv", "attention") and v > limit:
                continue
            wg[key] = v
            scores[v] = measure(Llama(weights, q, max_seq=2 * PROMPT), phase)
            say(f"{key} = {v}: {phase} {scores[v]:.1f} tok/s")
        wg[key] = max(scores, key=scores.get)
        found[key] = {"value": wg[key], "phase": phase, "tok_s": scores}
    note = "".join(f"# tuned on {path.name}: work_group.{k} = {r['value']} ({r['phase']} {r['tok_s'][r['value']]:.1f} tok/s)\n"
                   for k, r in found.items())
    written = write_config(target, q.device, DeviceConfig(copy.deepcopy(q.config.values), base.path),
                           origin=f"dpllama tune -m {model_path}", note=note)
    say(f"wrote {written}")
    return found


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--write-config", metavar="PATH", required=True, help="where to write the tuned config")
    add_device(p, ctx=False, config_help="config to start from (default: $DPLLAMA_CONFIG, else the device's "
                                         "shipped one)")


def run(args: argparse.Namespace) -> int:
    tune(args.model, args.device, args.config, args.write_config,
         say=lambda s: print(f"dpllama tune: {s}", file=sys.stderr, flush=True), tokenizer=args.tokenizer)
    return 0
