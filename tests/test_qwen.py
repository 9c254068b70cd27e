"""Qwen2.5-Coder-0.5B-Instruct Q4_K_M (architecture qwen2: Q/K/V biases, NEOX RoPE, base 1e6; tensors Q5_0, Q8_0,
Q4_K, Q6_K; byte-level BPE with the qwen2 pre-tokenizer; ChatML) on the device against the float32 oracles in
shared/models/qwen2.5-coder-0.5b: a NumPy forward over the same weights dequantized by gguf-py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dpllama.generate import Sampler, generate
from dpllama.llm import LLM
from dpllama.loaders import load_tokenizer, load_weights
from dpllama.model.llama import Llama
from tests.helpers import qwen_gguf_path, shared_models

# Every type loads losslessly (docs/ARCHITECTURE.md, weight formats), so the device differs from the oracle only
# by its arithmetic: the input of each quantized matrix rounded to 16-bit steps per group (matrix.cl), and float32
# sums in another order. Measured max |difference| on the first-step logits: 6.5e-4 (chat) and 1.1e-3 (raw) on
# logits up to ~22 (llama.cpp, with 8-bit activations: 0.27 and 0.35, the oracle's README says). 1e-2 still
# catches any real error: adjacent-pair RoPE instead of NEOX moves them by up to 12, a missing bias by units.
ORACLE_ATOL = 1e-2
CONTEXT = 256


@pytest.fixture(scope="module")
def oracle():
    d = shared_models("qwen2.5-coder-0.5b")
    data = json.loads((d / "fp32_greedy.json").read_text())
    return data, {c["name"]: c for c in data["cases"]}, d


@pytest.fixture(scope="module")
def llm(queue):
    path = qwen_gguf_path()
    weights = load_weights(path)
    return LLM(Llama(weights, queue, max_seq=CONTEXT), load_tokenizer(weights, None, path), path)


def test_the_model_as_its_readme_describes_it(llm, oracle):
    c, tok = llm.model.config, llm.tokenizer
    assert (c.arch, c.n_layers, c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.rope_theta) == \
        ("qwen2", 24, 896, 4864, 14, 2, 1e6)
    assert c.rope_neox and c.qkv_bias and c.vocab_size == oracle[0]["vocab_size"]
    assert tok.eos_ids == set(oracle[0]["eog_token_ids"])       # llama.cpp's end-of-generation set


@pytest.mark.parametrize("name", ["chat_sort_vs_sorted", "raw_quicksort"])
def test_prompt_as_the_oracle_tokenizes_it(llm, oracle, name):
    case = oracle[1][name]
    if case["kind"] == "chat":
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": case["user_message"]}])
        assert text == case["prompt"]
    assert llm.encode(case["prompt"], parse_special=True) == case["prompt_token_ids"]


@pytest.mark.parametrize("name", ["chat_sort_vs_sorted", "raw_quicksort"])
def test_first_logits_match_fp32_oracle(llm, oracle, name):
    case, d = oracle[1][name], oracle[2]
    ids = case["prompt_token_ids"]
    llm.model.start(ids)
    llm.model.feed(len(ids))                # batched prefill
    got = llm.model.read_logits()
    assert np.abs(got - np.load(d / case["logits0_file"])).max() < ORACLE_ATOL


@pytest.mark.parametrize("name", ["chat_sort_vs_sorted", "raw_quicksort"])
def test_greedy_matches_the_stable_prefix(llm, oracle, name):
    """Within the oracle's stable prefix (every top-1 / top-2 margin >= 0.05, far above the logits' error)
    greedy decoding on the device gives the oracle's tokens exactly."""
    case = oracle[1][name]
    n = case["stable_prefix_tokens"]
    got = list(generate(llm.model, case["prompt_token_ids"], n, Sampler(temperature=0), llm.tokenizer.eos_ids))
    assert got == case["output_token_ids"][:n]
    assert llm.tokenizer.decode(got) == case["stable_prefix_text"]
