"""Shared test helpers: random models, writers for test files, and lookups of the (optional) real models."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from dpllama import cli
from dpllama.loaders import load_weights
from dpllama.formats.gguf import add_field
from dpllama.model.gguf import BIASES, ROPE_FREQS, add_hyperparameters, layer_tensor_name
from dpllama.model.llama2c import write_llama2c
from dpllama.model.weights import Layer, ModelConfig, Tensor, Weights, layer_shapes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_FIELDS = {        # a tiny GGUF tokenizer, one field of each kind llama.cpp writes
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "smollm",
    "tokenizer.ggml.tokens": [f"t{i}" for i in range(8)],
    "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1, 1, 1],
    "tokenizer.ggml.scores": [0.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0, -4.5],
    "tokenizer.ggml.merges": ["t 1", "t 2"],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.add_bos_token": False,
    "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


def shared_models(name: str) -> Path:
    """shared/models/<name>, the read-only oracle data, or skip the test."""
    d = SHARED / "models" / name
    if not d.is_dir():
        pytest.skip(f"oracle data {d} not found (shared/ must sit beside the repository)")
    return d


def llama2c_dir() -> Path:
    return shared_models("llama2c")


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF: $DPLLAMA_SMOLLM2_GGUF, else the model cache ($DPLLAMA_HOME, default
    ~/.cache/dpllama), fetched there as `dpllama pull smollm2-135m` does when the oracles in shared/
    are present to test it against; skip the test when it cannot be had."""
    env = os.environ.get("DPLLAMA_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            pytest.skip(f"DPLLAMA_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    from dpllama.errors import DpllamaError
    from dpllama.hub import cached_path, pull
    path = cached_path("smollm2-135m")
    if not path.is_file():
        shared_models("smollm2")
        try:
            pull("smollm2-135m", progress=lambda s: None)
        except DpllamaError as e:
            pytest.skip(f"SmolLM2 GGUF not in the cache and could not be pulled: {e}")
    return path


def random_weights(dim=32, hidden=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, seq_len=16,
                   shared=True, seed=0, **architecture) -> Weights:
    """A random f32 Llama; `architecture` sets ModelConfig's other fields (arch, rope_neox, qkv_bias, ...).
    Matrices ~ N(0, 1/cols) so every projection keeps unit scale and the logits spread over a few units: argmax
    decisions are not ties. Biases ~ N(0, 1/4): as large as a projection's typical element, so a bias lost,
    or added to the wrong row, shows."""
    c = ModelConfig(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, **architecture)
    rng = np.random.default_rng(seed)

    def matrix(rows, cols):
        return Tensor.f32(rng.normal(0, cols ** -0.5, (rows, cols)))

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def vector(field, n):
        return rng.normal(0, 0.25, n).astype(np.float32) if field in BIASES else norm(n)

    layers = [Layer(**{f: vector(f, *s) if len(s) == 1 else matrix(*s) for f, s in layer_shapes(c).items()})
              for _ in range(n_layers)]
    embedding = Tensor.f32(rng.standard_normal((vocab, dim)))
    return Weights(c, embedding, layers, norm(dim), embedding if shared else matrix(vocab, dim))


def random_llama2c(path, dim=32, hidden=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, seq_len=16,
                   version=0, shared=True, seed=0, group_size=None) -> Weights:
    """Write a random llama2.c checkpoint; returns the f32 weights it was made from."""
    w = random_weights(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, shared, seed)
    write_llama2c(path, w, version, group_size)
    return w


def quantize_cli(src, out, *options) -> Weights:
    """`dpllama quantize SRC OUT OPTIONS` (in this process), then OUT loaded as any model is."""
    assert cli.main(["quantize", str(src), str(out), *map(str, options)]) == 0
    return load_weights(out)


def write_test_gguf(path, weights: Weights, types=None, arch=None, drop=(), extra=None, fields=None,
                    tokenizer=None) -> dict:
    """Write f32 `weights` as a llama.cpp-style GGUF of architecture `arch` (default the config's) with
    TOKENIZER_FIELDS, or with `tokenizer`'s {key: value} instead. `types` maps GGUF tensor names to their type
    (default F32), quantized with gguf.quants; `drop` names tensors to leave out, `extra` adds {name: float32
    array}, `fields` adds metadata {key: value}. Returns {name: (type, the array written)}."""
    c, types = weights.config, types or {}
    arrays = {"token_embd.weight": weights.tok_embeddings.dequantize(), "output_norm.weight": weights.norm}
    if not weights.tied:
        arrays["output.weight"] = weights.output.dequantize()
    if c.rope_freq_factors is not None:
        arrays[ROPE_FREQS] = np.asarray(c.rope_freq_factors, np.float32)
    for i, layer in enumerate(weights.layers):
        for field in layer_shapes(c):
            value = getattr(layer, field)
            arrays[layer_tensor_name(i, field)] = value.dequantize() if isinstance(value, Tensor) else value
    arrays.update(extra or {})
    w = GGUFWriter(path, arch or c.arch)
    add_hyperparameters(w, c)
    for key, value in {**(tokenizer or TOKENIZER_FIELDS), **(fields or {})}.items():
        add_field(w, key, value)
    written = {}
    for name, array in arrays.items():
        if name in drop:
            continue
        ggml_type = types.get(name, GGMLQuantizationType.F32)
        data = quantize(np.asarray(array, np.float32), ggml_type)
        w.add_tensor(name, data, raw_dtype=ggml_type)
        written[name] = (ggml_type, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
