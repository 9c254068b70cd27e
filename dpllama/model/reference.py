"""NumPy reference forward pass: llama2.c run.c's math in float32, one token at a time.

It is the oracle the device kernels are tested against, so it favours being obviously right over being
fast: weights are dequantized once to float32, activations stay float32, except that a quantized (q8, int4, int5)
matrix multiplies its input rounded per group to 16-bit steps (int4 and int5 to 8-bit ones with activation_bits 8),
as the kernels do (matrix.cl's header), and the KV cache holds keys and values rounded to fp16, as the device's does
(attention.h; float32 with kv_cache="f32"), attention's math on them float32.
"""
from __future__ import annotations

import numpy as np

from dpllama.model.quant import widen
from dpllama.model.weights import KV_TYPES, Tensor, Weights, layer_shapes, rope_angles, x_steps

f32 = np.float32


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """run.c: x * weight / sqrt(mean(x^2) + eps)."""
    return weight * (x * (f32(1) / np.sqrt(np.dot(x, x) / f32(x.size) + f32(eps))))


def round_to_steps(x: np.ndarray, group: int, steps: int) -> np.ndarray:
    """x with each group of `group` elements rounded to a multiple of max|x over the group| / steps: what the
    quantized kernels multiply (they take x as integers, 16-bit or bytes, and one scale per group)."""
    xg = np.pad(x, (0, -x.size % group)).reshape(-1, group)
    top = np.abs(xg).max(axis=1, keepdims=True)
    inv = np.divide(f32(steps), top, out=np.zeros_like(top), where=top > 0)
    return (np.rint(xg * inv) * (top / f32(steps))).ravel()[:x.size]


class Matrix:
    """W as float32 [rows, cols]; `w @ x` is what the device computes for it."""

    def __init__(self, t: Tensor, activation_bits: int = 16):
        self.w = t.dequantize()
        self.group, self.steps = t.group, x_steps(t.kind, activation_bits)    # quantized: x rounded per group

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        return self.w @ (round_to_steps(x, self.group, self.steps) if self.steps else x)


class Reference:
    def __init__(self, weights: Weights, activation_bits: int = 16, kv_cache: str = "f16"):
        """`activation_bits` and `kv_cache`: the device's (Llama's), which decide how quantized matrices' inputs are
        rounded and what the KV cache holds."""
        c = self.config = weights.config
        self.output = Matrix(weights.tok_embeddings if weights.tied else weights.output,   # [vocab, dim]
                             activation_bits)
        self.tok_embeddings = self.output.w if weights.tied else weights.tok_embeddings.dequantize()  # [vocab, dim]
        self.norm = np.asarray(weights.norm, f32)                       # [dim]
        # per layer: {attn_norm [dim], wq [q_dim, dim], wk / wv [kv_dim, dim], wo [dim, q_dim], ffn_norm [dim],
        #             w1 / w3 [hidden_dim, dim], w2 [dim, hidden_dim], with qkv_bias bq [q_dim], bk / bv [kv_dim],
        #             with qk_norm q_norm / k_norm [head_dim]}
        # The device multiplies Q, K and V in one matrix, and gate and up in another, each in the one format that
        # holds its parts (quant.widen): their inputs are rounded as that format's are, so here too.
        def matrices(layer) -> dict[str, Tensor]:
            fused = widen([layer.wq, layer.wk, layer.wv]) + widen([layer.w1, layer.w3])
            return dict(zip(("wq", "wk", "wv", "w1", "w3"), fused))
        self.layers = [{name: (Matrix(fused.get(name, getattr(layer, name)), activation_bits) if len(shape) == 2
                               else np.asarray(getattr(layer, name), f32))
                        for name, shape in layer_shapes(c).items()}
                       for layer in weights.layers for fused in [matrices(layer)]]
        # np.zeros maps pages lazily, so a long context costs memory only as far as it is used
        self.key_cache = np.zeros((c.n_layers, c.seq_len, c.kv_dim), KV_TYPES[kv_cache])     # [layer, pos, kv_dim]
        self.value_cache = np.zeros((c.n_layers, c.seq_len, c.kv_dim), KV_TYPES[kv_cache])   # [layer, pos, kv_dim]

    def rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        """Rotate the pairs of every head of x [n * head_dim] by RoPE's angle i at pos: ADJACENT pairs
        (x[2i], x[2i+1]) (run.c's rotation), or with config.rope_neox the HALVES' pairs (x[i], x[i + head_dim/2])
        (GPT-NeoX's, Hugging Face's rotate_half), cos and sin times the config's rope_mscale."""
        c = self.config
        angle = rope_angles([pos], c.head_dim, c.rope_theta, c.rope_factors(c.seq_len))[0]
        cos, sin = np.cos(angle) * f32(c.rope_mscale), np.sin(angle) * f32(c.rope_mscale)
        heads = x.reshape(-1, c.head_dim)
        pair = -2 if c.rope_neox else -1        # the axis that holds a pair's two elements
        pairs = heads.reshape(-1, 2, angle.size) if c.rope_neox else heads.reshape(-1, angle.size, 2)
        a, b = np.moveaxis(pairs, pair, 0)
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=pair).reshape(x.shape)

    def heads_norm(self, x: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        """x [n * head_dim] with each head RMS-normalized by `weight` [head_dim] (qwen3's q and k); x without one."""
        if weight is None:
            return x
        hd = self.config.head_dim
        return np.concatenate([rmsnorm(h, weight, self.config.norm_eps) for h in x.reshape(-1, hd)])

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Feed `token` at position `pos` -> float32 logits [vocab]. Positions 0..pos-1 must have been fed
        since the last pos 0: feeding pos 0 starts a new sequence (attention reads only the cache up to pos)."""
        c = self.config
        hd, group = c.head_dim, c.n_heads // c.n_kv_heads
        x = self.tok_embeddings[token].copy()                            # [dim] residual stream
        for l, w in enumerate(self.layers):
            xb = rmsnorm(x, w["attn_norm"], c.norm_eps)
            # biases (qwen2) are added, and each head normalized (qwen3), before RoPE
            q = self.rope(self.heads_norm(w["wq"] @ xb + w.get("bq", 0), w.get("q_norm")), pos)        # [q_dim]
            self.key_cache[l, pos] = self.rope(self.heads_norm(w["wk"] @ xb + w.get("bk", 0), w.get("k_norm")),
                                               pos)                                                       # [kv_dim]
            self.value_cache[l, pos] = w["wv"] @ xb + w.get("bv", 0)                   # [kv_dim]
            # grouped-query attention: query head h reads kv head h // group
            qh = q.reshape(c.n_kv_heads, group, hd)                       # [kv_head, group, hd]
            keys = self.key_cache[l, :pos + 1].reshape(pos + 1, c.n_kv_heads, hd).transpose(1, 2, 0)
            values = self.value_cache[l, :pos + 1].reshape(pos + 1, c.n_kv_heads, hd).transpose(1, 0, 2)
            keys, values = keys.astype(f32), values.astype(f32)           # fp16 -> float32, exactly
            scores = (qh @ keys) / np.sqrt(f32(hd))                       # [kv_head, group, pos + 1]
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            att = (scores / scores.sum(axis=-1, keepdims=True)) @ values  # [kv_head, group, hd]
            x += w["wo"] @ att.reshape(c.q_dim)
            xb = rmsnorm(x, w["ffn_norm"], c.norm_eps)
            gate = w["w1"] @ xb                                           # [hidden_dim]
            x += w["w2"] @ (gate / (f32(1) + np.exp(-gate)) * (w["w3"] @ xb))   # silu(w1 x) * w3 x
        return self.output @ rmsnorm(x, self.norm, c.norm_eps)
