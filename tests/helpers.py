"""Shared test helpers: random models, writers for test files, and lookups of the (optional) real models."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from dpllama import cli
from dpllama.formats import round_up
from dpllama.loaders import load_weights
from dpllama.formats.gguf import add_field
from dpllama.model.gguf import BIASES, FUSED, add_hyperparameters, layer_tensor_name, rope_tensors
from dpllama.model.llama2c import write_llama2c
from dpllama.model.quant import GGUF_REPACK
from dpllama.model.weights import Layer, ModelConfig, Tensor, Weights, layer_shapes

T = GGMLQuantizationType
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
    return cached_model("smollm2-135m", "DPLLAMA_SMOLLM2_GGUF", "smollm2")


def cached_model(name: str, env_var: str, oracles: str) -> Path:
    """A known model's file: $env_var, else the model cache, pulled there when shared/models/`oracles` (the data
    to test it against) is present; else skip."""
    env = os.environ.get(env_var)
    if env:
        if not Path(env).is_file():
            pytest.skip(f"{env_var}={env} is not a file")
        return Path(env)
    from dpllama.errors import DpllamaError
    from dpllama.hub import cached_path, pull
    path = cached_path(name)
    if not path.is_file():
        shared_models(oracles)
        try:
            pull(name, progress=lambda s: None)
        except DpllamaError as e:
            pytest.skip(f"{name} not in the cache and could not be pulled: {e}")
    return path


def qwen_gguf_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (shared/models/qwen2.5-coder-0.5b/README.md says how it is assembled):
    $DPLLAMA_QWEN_GGUF, else the model cache, fetched there as `dpllama pull qwen2.5-coder-0.5b` does when the
    oracles in shared/ are present to test it against; skip the test when it cannot be had."""
    return cached_model("qwen2.5-coder-0.5b", "DPLLAMA_QWEN_GGUF", "qwen2.5-coder-0.5b")


# real tensors of each quantized type in qwen_gguf_path()'s file (its README lists them)
QWEN_TENSORS = {T.Q5_0: "blk.0.attn_q.weight", T.Q8_0: "blk.0.attn_v.weight", T.Q6_K: "blk.0.ffn_down.weight",
                T.Q4_K: "blk.2.ffn_down.weight"}


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


# GGUF's quantized types: the byte offsets of each block's fp16 scales (d, and dmin or m), and the largest
# |level x sub-block scale| they multiply, so that random blocks hold weights of order 1
GGUF_SCALES = {T.Q4_0: ((0,), 8), T.Q4_1: ((0, 2), 15), T.Q5_0: ((0,), 16), T.Q5_1: ((0, 2), 31),
               T.Q8_0: ((0,), 127), T.Q2_K: ((80, 82), 3 * 15), T.Q3_K: ((108,), 4 * 32),
               T.Q4_K: ((0, 2), 15 * 63), T.Q5_K: ((0, 2), 31 * 63), T.Q6_K: ((208,), 32 * 128),
               T.IQ4_NL: ((0,), 127), T.IQ4_XS: ((0,), 32 * 127)}


def random_gguf_blocks(rng, ggml_type: GGMLQuantizationType, rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
    """uint8[rows, bytes of a row]: GGUF blocks of random bytes (any bytes are valid levels, high bits and
    sub-block scales and mins) except the fp16 block scales, of random sign and magnitude (0.5..1) * scale / their
    top, so weights reach about `scale` (a type not in GGUF_SCALES, one dpllama does not read: all random)."""
    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    offsets, top = GGUF_SCALES.get(ggml_type, ((), 1))
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for o in offsets:
        d = rng.uniform(0.5, 1, (rows, cols // block)) * rng.choice([-1, 1], (rows, cols // block)) * scale / top
        raw[:, :, o:o + 2] = d.astype(np.float16)[:, :, None].view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_tensor(rng, ggml_type: GGMLQuantizationType, rows: int, cols: int) -> Tensor:
    """A matrix as a GGUF tensor of `ggml_type` loads, from random blocks. Where cols is not a multiple of the
    type's block, the blocks are cut after the group that holds the last column; the columns from cols to the
    group's end keep random weights, which the kernels multiply by x's zero padding."""
    cols_b = round_up(cols, GGML_QUANT_SIZES[ggml_type][0])
    t = GGUF_REPACK[ggml_type](random_gguf_blocks(rng, ggml_type, rows, cols_b), rows, cols_b)
    cols_p = round_up(cols, t.group)

    def cut(a, n):
        return None if a is None else np.ascontiguousarray(a[:, :n])
    # every format's data holds a row's columns in order, at a fixed width per column (q8 1, int4 1/8, int5 5/32)
    return Tensor(t.kind, rows, cols, cut(t.data, t.data.shape[1] * cols_p // cols_b),
                  cut(t.scales, cols_p // t.group), cut(t.mins, cols_p // t.group), t.group)


# a model shape every GGUF type fits (rows of 256 and 512: whole K-quant blocks) and a type for each of its
# tensors, every type dpllama reads among them, mixed as llama.cpp's _S/_M files mix them: fused matrices
# (Q, K, V; gate and up) of different formats; blk.2 as an IQ4_XS file (IQ4_XS, IQ4_NL, K-quants)
EVERY_TYPE_SHAPE = dict(dim=256, hidden=512, n_layers=3, n_heads=4, n_kv_heads=2, vocab=97, seq_len=32)
EVERY_TYPE = {"token_embd.weight": T.Q5_0, "output.weight": T.Q6_K,
              "blk.0.attn_q.weight": T.Q2_K, "blk.0.attn_k.weight": T.Q3_K, "blk.0.attn_v.weight": T.Q4_K,
              "blk.0.attn_output.weight": T.Q5_K, "blk.0.ffn_gate.weight": T.Q5_1, "blk.0.ffn_down.weight": T.Q6_K,
              "blk.0.ffn_up.weight": T.Q4_0, "blk.1.attn_q.weight": T.Q8_0, "blk.1.attn_k.weight": T.Q4_1,
              "blk.1.attn_v.weight": T.Q6_K, "blk.1.attn_output.weight": T.F16, "blk.1.ffn_gate.weight": T.Q4_K,
              "blk.1.ffn_up.weight": T.Q4_K, "blk.1.ffn_down.weight": T.BF16, "blk.1.attn_norm.weight": T.F16,
              "blk.2.attn_q.weight": T.IQ4_XS, "blk.2.attn_k.weight": T.IQ4_NL, "blk.2.attn_v.weight": T.Q5_K,
              "blk.2.attn_output.weight": T.IQ4_XS, "blk.2.ffn_gate.weight": T.IQ4_XS,
              "blk.2.ffn_up.weight": T.IQ4_XS, "blk.2.ffn_down.weight": T.IQ4_NL}


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


def gguf_data(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """`array` quantized to `ggml_type` with gguf.quants, or random blocks of that type as large as its values
    where gguf-py does not quantize to it (the K-quants, IQ4_NL, IQ4_XS; the array's shape only)."""
    array = np.asarray(array, np.float32)
    try:
        return quantize(array, ggml_type)
    except NotImplementedError:
        return random_gguf_blocks(np.random.default_rng(array.size), ggml_type, *array.shape,
                                  scale=float(np.abs(array).max()))


def write_test_gguf(path, weights: Weights, types=None, arch=None, drop=(), extra=None, fields=None,
                    tokenizer=None) -> dict:
    """Write f32 `weights` as a llama.cpp-style GGUF of architecture `arch` (default the config's) with
    TOKENIZER_FIELDS, or with `tokenizer`'s {key: value} instead. `types` maps GGUF tensor names to their type
    (default F32), as gguf_data writes it; `drop` names tensors to leave out, `extra` adds {name: float32
    array}, `fields` adds metadata {key: value}. Returns {name: (type, the array written)}."""
    c, types = weights.config, types or {}
    arrays = {"token_embd.weight": weights.tok_embeddings.dequantize(), "output_norm.weight": weights.norm}
    if not weights.tied:
        arrays["output.weight"] = weights.output.dequantize()
    arrays.update(rope_tensors(c))
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
        data = gguf_data(array, ggml_type)
        w.add_tensor(name, data, raw_dtype=ggml_type)
        written[name] = (ggml_type, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


# SmolLM2's float32 oracle (../shared/models/smollm2) against dpllama's logits, device or NumPy reference:
# the oracle is a float32 NumPy forward over the same dequantized weights, with float32 activations and KV cache.
# The device rounds the input of every int4 matrix to 16-bit steps per group of 32 (matrix.cl's header); in a group
# that holds one of SmolLM2's residual outliers (near 2600) a step is ~0.08, so logits move: measured max abs
# difference 0.0037 (raw) and 0.0032 (chat) on logits of magnitude ~20 (4e-5 with float32 activations;
# llama.cpp's 8-bit activations: 0.2-0.3, says the oracle's README). The fp16 KV cache (attention.h) moves them
# further: dpllama's NumPy reference with it is 0.0076 (raw) and 0.011 (chat, 37 positions) from the oracle. 2e-2
# still catches any real error (a wrong weight or RoPE convention moves logits by whole units).
ORACLE_ATOL = 2e-2


# A tiny Qwen3 as llama.cpp reads it: heads of 32 where dim / n_heads is 16 (attention.key_length), GQA 2:1, each
# head of q and k RMS-normalized before NEOX RoPE, a byte-level BPE vocabulary of 264 tokens; f32 weights, so that
# llama.cpp's logits for it (tests/oracles/, made by make_llamacpp.py) differ from dpllama's only by float rounding
# and the fp16 of their KV caches
QWEN3_TINY = dict(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=264, seq_len=64, shared=False, seed=7,
                  arch="qwen3", rope_neox=True, qk_norm=True, rope_theta=1e6, key_length=32)
ORACLES = Path(__file__).parent / "oracles"
# the tiny models whose llama.cpp logits tests/oracles/ holds: random_weights' arguments and GGUF metadata of their own
LLAMA_CPP_MODELS = {
    "qwen3_tiny": (QWEN3_TINY, {}),
    # YaRN over an original context of 16 (Qwen's long-context scaling): the ramp of head_dim 32 at base 1e6 keeps
    # pair 0, blends pair 1 and slows the rest 4x, and cos and sin grow 1 + 0.1 ln 4
    "qwen3_tiny_yarn": (QWEN3_TINY, {"qwen3.rope.scaling.type": "yarn", "qwen3.rope.scaling.factor": 4.0,
                                     "qwen3.rope.scaling.original_context_length": 16}),
    # a llama (adjacent RoPE pairs, no heads' norms) with a scaling factor and no type: llama.cpp's default, linear,
    # every frequency halved
    "llama_tiny_linear": (dict(QWEN3_TINY, arch="llama", rope_neox=False, qk_norm=False, key_length=0, seed=8,
                               rope_theta=10000.0), {"llama.rope.scaling.factor": 2.0}),
    # a Phi-3 as llama.cpp converts Phi-3.5-mini: NEOX RoPE, Q, K and V in one attn_qkv, gate and up in one ffn_up,
    # LongRoPE over an original context of 16 (tiny_qwen3 adds them): its context of 64 takes the long factors
    "phi3_tiny": (dict(QWEN3_TINY, arch="phi3", rope_neox=True, qk_norm=False, key_length=0, seed=9,
                       rope_theta=10000.0), {}),
}
# phi3_tiny's LongRoPE divisors (head_dim 16: 8 pairs) and magnitude, as Phi-3.5-mini's config gives them
PHI3_ROPE = dict(rope_freq_factors=tuple(np.linspace(1.0, 1.5, 8).tolist()),
                 rope_long_factors=tuple(np.geomspace(1.0, 16.0, 8).tolist()), rope_long_from=16, rope_mscale=1.2)


# Qwen3's chat template as far as thinking goes: ChatML, and a reply that thinks first unless the template's extra
# variable enable_thinking is false (--chat-template-kwargs, a request's chat_template_kwargs), its tail verbatim
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}")
NO_THINKING = "<think>\n\n</think>\n\n"   # what it adds to the reply's start with enable_thinking false


def tiny_qwen3(path, chat_template: str | None = None, name: str = "qwen3_tiny", extra: dict | None = None,
               drop=(), fields: dict | None = None) -> Weights:
    """Write LLAMA_CPP_MODELS[name] (QWEN3_TINY unless told) to `path` as a GGUF, with `chat_template` if given
    (and write_test_gguf's `extra` tensors, less those in `drop`, and metadata `fields` over the model's);
    returns the weights written."""
    from tests.test_tokenizer import gpt2_fields
    shape, model_fields = LLAMA_CPP_MODELS[name]
    fields = {**model_fields, **(fields or {})}
    w = random_weights(**shape)
    extra, drop = dict(extra or {}), set(drop)
    if shape["arch"] == "phi3":     # its LongRoPE, and its fused matrices as llama.cpp's converter writes them
        w.config = replace(w.config, **PHI3_ROPE)
        for i, layer in enumerate(w.layers):
            for fused, members in FUSED.items():
                extra.setdefault(f"blk.{i}.{fused}.weight",
                                 np.concatenate([getattr(layer, f).dequantize() for f in members]))
                drop.update({layer_tensor_name(i, f) for f in members} - set(extra))   # ffn_up: [gate; up] here
    template = {"tokenizer.chat_template": chat_template} if chat_template else {}
    write_test_gguf(path, w, tokenizer=gpt2_fields(**{"tokenizer.ggml.pre": "qwen2"}, **template), fields=fields,
                    extra=extra, drop=drop)
    return w
