"""The NumPy reference forward pass against upstream oracles (run.c for llama2.c, an fp32 NumPy pass for
SmolLM2). Passing also validates the loaders: a misread tensor cannot reproduce 124 greedy tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dpllama.model.gguf import load_gguf
from dpllama.model.llama2c import load_llama2c, write_llama2c
from dpllama.model.reference import Reference
from tests.helpers import ORACLE_ATOL, llama2c_dir, random_weights, shared_models, smollm2_gguf_path

STORIES_PROMPT_LEN = 5      # BOS + " Once upon a time"


def greedy(ref: Reference, prompt: list[int], n: int) -> list[int]:
    """Feed `prompt`, then `n` argmax tokens; returns prompt + generated."""
    ids = list(prompt)
    for pos in range(len(prompt) + n - 1):
        logits = ref.forward(ids[pos], pos)
        if pos + 1 >= len(prompt):
            ids.append(int(logits.argmax()))
    return ids


@pytest.fixture(scope="module")
def stories_ids() -> list[int]:
    return [int(t) for t in (llama2c_dir() / "reference_stories260K_greedy_ids.txt").read_text().split()]


def test_stories260k_greedy_matches_run_c(stories_ids):
    ref = Reference(load_llama2c(llama2c_dir() / "stories260K.bin"))
    n = len(stories_ids) - STORIES_PROMPT_LEN
    assert greedy(ref, stories_ids[:STORIES_PROMPT_LEN], n) == stories_ids


def test_stories260k_q8_v2_greedy(tmp_path, stories_ids):
    # Q8_0 weights (float activations) still give run.c's tokens. Group 4 divides dim 64 and hidden 172
    # (README: upstream's default of 64 does not)
    write_llama2c(tmp_path / "q8.bin", load_llama2c(llama2c_dir() / "stories260K.bin"), version=2, group_size=4)
    ref = Reference(load_llama2c(tmp_path / "q8.bin"))
    assert greedy(ref, stories_ids[:STORIES_PROMPT_LEN], len(stories_ids) - STORIES_PROMPT_LEN) == stories_ids


@pytest.fixture(scope="module")
def smollm2():
    return Reference(load_gguf(smollm2_gguf_path()))


@pytest.mark.parametrize("case", ["raw_once_upon_a_time", "chat_capital_of_france"])
def test_smollm2_logits_and_greedy(smollm2, case):
    oracle = shared_models("smollm2")
    cases = {c["name"]: c for c in json.loads((oracle / "fp32_greedy.json").read_text())["cases"]}
    prompt, expected = cases[case]["prompt_token_ids"], cases[case]["output_token_ids"]
    for pos, token in enumerate(prompt):     # pos 0 starts a new sequence: the module's Reference is reused
        logits = smollm2.forward(token, pos)
    want = np.load(oracle / f"fp32_{case}_logits0.npy")
    assert np.abs(logits - want).max() < ORACLE_ATOL    # int16 rounding of int4 inputs, fp16 KV: test_smollm2.py
    assert greedy(smollm2, prompt, 8)[len(prompt):] == expected[:8]


@pytest.mark.parametrize("neox", [False, True])
def test_rope_pairs(neox):
    """The reference's RoPE in Hugging Face's words, in float64: NEOX is q cos + rotate_half(q) sin with the
    angles repeated over both halves of a head; adjacent pairs (llama2.c, llama.cpp's llama) are the same on
    each head's even and odd elements. float32 angles (pos x freq, one rounding each: 4 ulp of 37 rad) and
    products leave ~1e-5 of the pairs' length."""
    w = random_weights(dim=32, n_heads=2, n_kv_heads=1, rope_neox=neox, rope_theta=1e6,
                       rope_freq_factors=(1.0, 1.5, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0))
    ref, x, pos = Reference(w), np.random.default_rng(0).standard_normal(32).astype(np.float32), 37
    inv_freq = 1e6 ** (-np.arange(0, 16, 2) / 16) / np.array(w.config.rope_freq_factors)
    angle = pos * inv_freq
    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
    heads = x.astype(np.float64).reshape(2, 16)
    if not neox:        # adjacent pairs: the same rotation, the pair's elements at 2i and 2i + 1
        heads = np.concatenate([heads[:, 0::2], heads[:, 1::2]], axis=1)
    rotate_half = np.concatenate([-heads[:, 8:], heads[:, :8]], axis=1)
    want = heads * cos + rotate_half * sin
    if not neox:
        want = np.stack([want[:, :8], want[:, 8:]], axis=-1).reshape(2, 16)
    np.testing.assert_allclose(ref.rope(x, pos), want.ravel(), rtol=0, atol=1e-5 * np.abs(x).max() * 2)
