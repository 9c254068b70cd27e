"""The KV cache and the sequences it holds.

The cache keeps, for each of `slots` sequences and each layer, the keys and values of up to `seq_len`
positions. Per slot and layer (the layout the attention kernels read and the QKV kernels write, attention.h):
    keys   [seq_p / B][kv_dim][B]   in blocks of B = key_block positions (the config's work_group.key_block; 0,
                                    the GPU configs': one block, [kv_dim][seq_p]); in a block each channel's
                                    positions side by side: one vector load gives a channel of attention_positions
                                    positions
    values [seq_p][kv_dim]          each position's channels side by side
with seq_p = seq_len rounded up to key_block and attention_positions, each value fp16 (attention.h says why;
float32 with kv_cache="f32"). `keys_by_channel` reads the keys' layout in NumPy. Kernels take
the start of a slot's layer as `cache_offset` (`KVCache.offset`); a batched pass, whose rows belong to several
slots, takes slot 0's and the `slot_stride`.

A Sequence is one sequence's place in the engine: its cache slot, its tokens on the device, its position, and
the logits of the last token it fed (its own, so that a pass enqueued ahead for one sequence survives another's
pass in between). Kernels read the position from the sequence's `state` buffer {pos, n_prompt}, so that a recorded
forward pass replays without re-binding; `pos` is the host's copy, moved in step with it.
"""
from __future__ import annotations

import numpy as np

from dpllama.formats import round_up
from dpllama.model.weights import KV_TYPES
from dpllama.runtime import Queue


def zeros(q: Queue, n: int, name: str, dtype=np.float32):
    return q.buffer(host=np.zeros(n, dtype), name=name)


def cache_defines(kv_cache: str = "f16", key_block: int = 0) -> tuple[str, ...]:
    """The defines of the programs that read or write the cache (attention.h): its value type and its keys' blocks."""
    return (("KV_F32",) if kv_cache == "f32" else ()) + ((f"KEY_BLOCK={key_block}",) if key_block else ())


def position_step(positions: int, key_block: int = 0) -> int:
    """The cache holds a multiple of this many positions (seq_p): whole score vectors and whole key blocks
    (key_block is 0 or a multiple of positions, config validation says)."""
    return max(positions, key_block)


def keys_by_channel(keys: np.ndarray, kv_dim: int, key_block: int = 0) -> np.ndarray:
    """A layer's keys as the cache holds them (flat, kv_dim * seq_p values) -> [kv_dim][seq_p]."""
    seq_p = keys.size // kv_dim
    b = key_block or seq_p
    return keys.reshape(seq_p // b, kv_dim, b).transpose(1, 0, 2).reshape(kv_dim, seq_p)


class KVCache:
    def __init__(self, q: Queue, n_layers: int, kv_dim: int, seq_len: int, positions: int, slots: int = 1,
                 kv_cache: str = "f16", key_block: int = 0):
        self.n_layers, self.kv_dim, self.slots = n_layers, kv_dim, slots
        self.seq_p = round_up(seq_len, position_step(positions, key_block))
        n = slots * n_layers * kv_dim * self.seq_p
        self.k = zeros(q, n, "k_cache", KV_TYPES[kv_cache])     # [slot][layer][seq_p / key_block][kv_dim][key_block]
        self.v = zeros(q, n, "v_cache", KV_TYPES[kv_cache])     # [slot][layer][seq_p][kv_dim]

    def offset(self, layer: int, slot: int = 0) -> int:
        """Where a slot's layer starts, in values, in both k and v."""
        return slot * self.slot_stride + layer * self.kv_dim * self.seq_p

    @property
    def slot_stride(self) -> int:
        """Values from a layer of one slot to the same layer of the next (a batched pass's kernels add
        slot * slot_stride to slot 0's offset)."""
        return self.n_layers * self.kv_dim * self.seq_p

    @staticmethod
    def floats_per_position(n_layers: int, kv_dim: int, kv_cache: str = "f16") -> int:
        """What each position of one slot costs, in the bytes of as many floats: keys and values of every layer."""
        return 2 * n_layers * kv_dim * np.dtype(KV_TYPES[kv_cache]).itemsize // 4


class Sequence:
    def __init__(self, q: Queue, seq_len: int, vocab_size: int, slot: int = 0):
        self.slot = slot
        self.tokens = zeros(q, seq_len + 1, "tokens", np.int32)     # the sequence [seq_len + 1]
        self.state = zeros(q, 2, "state", np.int32)                 # {pos, n_prompt}
        self.logits = zeros(q, vocab_size, "logits")                # [vocab], of the last token fed
        self.pos = 0
        self.owner = None       # the generation that started it last (dpllama.generate.Generation)

    def reset(self, tokens: list[int], pos: int) -> None:
        """Make `tokens` the known tokens, and `pos` the position."""
        self.tokens.set(np.asarray(tokens, np.int32))
        self.state.set(np.array([pos, len(tokens)], np.int32))
        self.pos = pos
