"""The Python API: a model and its tokenizer on a device, and text in, text out.

    import dpllama
    llm = dpllama.load("stories260K.bin", tokenizer="tok512.bin")
    for piece in llm.generate("Once upon a time", steps=64, temperature=0):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dpllama.constrain import Grammar, JsonMode, grammar
from dpllama.errors import DpllamaError
from dpllama.generate import Sampler, check_reach, check_sampler, check_steps, generate, new_tokens, whole
from dpllama.hub import resolve_model
from dpllama.loaders import load_tokenizer, load_weights
from dpllama.model.kv_cache import position_step
from dpllama.model.layout import Geometry
from dpllama.model.llama import Llama, floats_per_position, pass_rows
from dpllama.model.weights import ModelConfig, check_activation_bits, check_kv_cache
from dpllama.runtime import Queue, open_queue
from dpllama.tokenizer import StreamDecoder, Tokenizer


def text_decoder(tok: Tokenizer, prev: int) -> StreamDecoder:
    """New tokens to text after `prev`, each piece through the tokenizer's piece_filter (llama2.c tokenizers print
    each piece like run.c: a lone control byte is dropped)."""
    return StreamDecoder(tok, prev=prev, piece_filter=tok.piece_filter)


class TextStream:
    """The pieces of text of a generation, the prompt's first when `echo_prompt` (as far as `steps` positions
    reach), as `text_decoder` spells them; `stats` holds its timings. A stop token is not printed. With a `json`
    grammar, the new text is one JSON document it admits (dpllama.constrain), cut short only where the steps run
    out."""

    def __init__(self, llm: "LLM", prompt_ids: list[int], steps: int, sampler: Sampler, echo_prompt: bool,
                 json: Grammar | None = None):
        steps = min(steps, llm.model.seq_len)
        self.generation = generate(llm.model, prompt_ids, new_tokens(steps, len(prompt_ids)), sampler,
                                   llm.tokenizer.eos_ids, json=JsonMode(llm.tokenizer, json) if json else None)
        self.stats = self.generation.stats
        self._pieces = self._run(llm.tokenizer, prompt_ids, steps + 1 if echo_prompt else 0)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:      # an iterator, as generate's annotation says: next(llm.generate(...))
        return next(self._pieces)

    def _run(self, tok: Tokenizer, prompt: list[int], echo: int) -> Iterator[str]:
        """The first `echo` prompt tokens, then the new ones."""
        dec = text_decoder(tok, prev=prompt[0] if echo else prompt[-1])
        if echo:
            if prompt[0] != tok.bos_id:
                yield tok.decode(prompt[:1])
            for t in prompt[1:echo]:
                yield dec.push(t)
        for t in self.generation:
            yield dec.push(t)
        yield dec.flush()


class LLM:
    def __init__(self, model: Llama, tokenizer: Tokenizer, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):   # None, bytes, a list of ids (stream takes those) raised TypeErrors inside
            raise DpllamaError(f"the prompt must be a str, found {type(text).__name__}")
        ids = self.tokenizer.encode(text, parse_special=parse_special)
        if not ids:     # a model needs one token to start from
            if self.tokenizer.bos_id is None:
                raise DpllamaError(f"{self.path}: the prompt is empty and the model has no BOS token to start from")
            ids = [self.tokenizer.bos_id]
        return ids

    def stream(self, prompt_ids: list[int], steps: int, sampler: Sampler, echo_prompt: bool = True,
               json: bool | dict = False) -> TextStream:
        """Text as it is generated over `steps` positions, prompt included (llama2.c's -n), the prompt first
        when `echo_prompt`; with `json` True, the new text is one JSON object, and with a JSON schema (a dict) one
        that the schema admits (dpllama.constrain; a schema it cannot hold the text to raises SchemaError)."""
        ids = list(prompt_ids) if isinstance(prompt_ids, (list, tuple, range, np.ndarray)) else None
        if ids is None or not all(whole(t) for t in ids):
            raise DpllamaError(f"the prompt must be a list of token ids (whole numbers), found {prompt_ids!r:.60}")
        check_reach(min(check_steps(steps), self.model.seq_len), len(ids))
        if not isinstance(json, (bool, dict)):
            raise DpllamaError(f"json must be True, False or a JSON schema (a dict), found {json!r:.60}")
        return TextStream(self, [int(t) for t in ids], steps, check_sampler(sampler), echo_prompt,
                          grammar(json if isinstance(json, dict) else None) if json is not False else None)

    def generate(self, prompt: str, steps: int = 256, temperature: float = 1.0, top_p: float = 0.9,
                 top_k: int = 0, repeat_penalty: float = 1.0, seed: int = 0, echo_prompt: bool = True,
                 json: bool | dict = False) -> Iterator[str]:
        """Stream the continuation of `prompt` (echoed first unless echo_prompt=False) over `steps`
        positions, prompt included, as llama2.c's -n; temperature 0 is greedy. With `json` the continuation is
        one JSON object (JSON mode: every token drawn continues it, and the generation ends as it closes), and with
        a JSON schema for `json` (a dict) one that the schema admits, cut short only where the steps run out. Bad
        arguments raise DpllamaError here, not when the stream is read."""
        sampler = Sampler(temperature, top_p, top_k, repeat_penalty, seed=seed)
        return self.stream(self.encode(prompt), steps, sampler, echo_prompt, json)


def _per_position(c: ModelConfig, q: Queue, n: int, slots: int, chunk: int | None, kv_cache: str) -> tuple[int, ...]:
    """Floats that each position of a context of n tokens costs in Llama's buffers that grow with it
    (floats_per_position) under q's config."""
    geo = Geometry.of(q.config)
    return floats_per_position(c, pass_rows(geo.prefill_chunk, slots, chunk, n), slots, kv_cache,
                               geo.attention_span if geo.attention == 1 else 0)


def context_cap(c: ModelConfig, q: Queue, n: int, slots: int = 1, chunk: int | None = None,
                kv_cache: str = "f16") -> tuple[int, str]:
    """The most tokens of context each of `slots` sequences can have on q's device, sized before anything is
    allocated: Llama's buffers that grow with the context (KV cache, the attention scores of a pass of `chunk` rows,
    RoPE table, tokens, the sums of attention's spans) together in one maximum allocation, and each under 2^31
    elements, as the kernels index them with int; and what n tokens of it need, said for a message."""
    per_pos, geo = _per_position(c, q, n, slots, chunk, kv_cache), Geometry.of(q.config)
    step = position_step(geo.attention_positions, geo.key_block)     # Llama's KVCache pads the context to it
    cap = min(q.max_alloc // (4 * sum(per_pos)), (2**31 - 1) // max(per_pos)) // step * step    # 0: not even a step
    return cap, (f"{n * sum(per_pos) * 4 / 2**20:.0f} MiB of KV cache and scratch, more than {q.device} holds in one "
                 f"allocation ({q.max_alloc / 2**20:.0f} MiB) of under 2^31 floats")


# What a context nobody asked for (no --ctx) may take, every slot's together: the model's whole context otherwise,
# 40,960 tokens of Qwen3-0.6B's took 6 GB (its KV cache and a pass's attention scores) for a chat of a few thousand.
# llama.cpp allocates 4,096 tokens unless told; this keeps the model's where it is small (SmolLM2's 8,192 take
# 0.3 GB, Qwen2.5-0.5B's 32,768 1.4 GB) and cuts it, in steps of 1,024 tokens, where it is not.
DEFAULT_CONTEXT_BYTES = 2 << 30


def fit_context(c: ModelConfig, q: Queue, max_seq: int | None = None, slots: int = 1, chunk: int | None = None,
                kv_cache: str = "f16") -> int:
    """The context of each of `slots` sequences: `max_seq` (--ctx), else the model's, at most DEFAULT_CONTEXT_BYTES'
    worth; clamped (with a line on stderr, as llama.cpp clamps n_ctx) to what the device holds (context_cap)."""
    n = min(max_seq or c.seq_len, c.seq_len)
    cap, need = context_cap(c, q, n, slots, chunk, kv_cache)
    what = f"--ctx {n}" if n == max_seq else f"the model's context of {n} tokens"
    if cap == 0:    # --parallel 999999: its passes' scratch alone is more than the device holds
        raise DpllamaError(f"{what} for {slots} sequence(s) needs {need}, and so would the shortest context")
    if not max_seq:
        per_pos = 4 * sum(_per_position(c, q, n, slots, chunk, kv_cache))
        budget = max(DEFAULT_CONTEXT_BYTES // per_pos // 1024 * 1024, 1024)
        if budget < min(n, cap):
            print(f"dpllama: {what} needs {n * per_pos / 2**20:.0f} MiB of KV cache and scratch: using {budget} "
                  f"tokens (--ctx N for more)", file=sys.stderr)
            return budget
    if n > cap:
        print(f"dpllama: {what} needs {need}: using {cap} tokens", file=sys.stderr)
    return min(n, cap)


def load(model: str, tokenizer: str | None = None, device: str | None = None, config: str | None = None,
         max_seq: int | None = None, slots: int = 1, chunk: int | None = None,
         check: Callable[[ModelConfig], None] | None = None, activation_bits: int = 16, kv_cache: str = "f16") -> LLM:
    """Load a model (path or known name) and its tokenizer onto a device (selector or YAML config), with
    `slots` sequences (`Llama.select`), passes of up to `chunk` rows, `activation_bits` and `kv_cache` (Llama).
    Each one's context is `max_seq` tokens, else the model's, at most what the device holds (`fit_context`).
    `check(config)` runs once the model's shape is known, before anything goes to the device (a command's limits
    that depend on the model)."""
    # before any work, as the CLI checks --ctx; a bool is an int to Python, and 0 slots failed in the driver
    for name, value, optional in (("max_seq", max_seq, True), ("slots", slots, False), ("chunk", chunk, True)):
        if not (value is None and optional or whole(value) and value >= 1):
            raise DpllamaError(f"{name} must be a whole number of at least 1, found {value!r}")
    check_activation_bits(activation_bits)
    check_kv_cache(kv_cache)
    path = resolve_model(model)
    weights = load_weights(path)
    if check:
        check(weights.config)
    tok = load_tokenizer(weights, tokenizer, path)
    q = open_queue(device, config)
    return LLM(Llama(weights, q, fit_context(weights.config, q, max_seq, slots, chunk, kv_cache), slots, chunk,
                     activation_bits, kv_cache), tok, path)
