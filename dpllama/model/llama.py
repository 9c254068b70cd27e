"""The Llama forward pass on an OpenCL device, through dpllama.runtime.

Everything lives on the device: weights (in their storage format, never expanded to float), the KV
cache, the activations, the token sequence and the position. A forward pass over T tokens (T = 1 to
decode, up to `chunk` prompt tokens in prefill) is a fixed list of bound kernel launches (`Command`s),
recorded once per T and replayed; kernels read the position from the `state` buffer, so nothing is
re-bound and only a sampled id crosses to the host.

A forward pass, per layer (5 launches, each over all T tokens):
    q, k, v = [Wq; Wk; Wv] rmsnorm(x, attn_norm)   gemv_norm_rope_kv (RMSNorm fused; biases (qwen2), RoPE and k, v
              q, k = rope(q, k); cache[pos] = k, v                    written to the KV cache in the same pass)
    o    = attention(q, cache[0..pos])              attention         (causal; a work-group per head and token)
    x   += Wo o                                     gemv_add          (residual fused)
    h    = silu(W1 n) * (W3 n), n = rmsnorm(x)      gemv_norm_swiglu  (W1/W3 row blocks alternate)
    x   += W2 h                                     gemv_add
then logits = Wcls rmsnorm(x[last], norm) (gemv_norm), and the next token drawn on the device (choose_embed: the
argmax, or a sample at a temperature with top-k and top-p; it also embeds the token for the next pass). The all-rows
pass (`feed_rows`, for perplexity) is the same pass with the LM head over every row of x, into a [chunk, vocab]
buffer made on its first use. On CPU configs the layers are one launch (matrix.cl's layers, fuse.layer_max_units:
its work-groups claim the five steps' tasks and wait for each other between steps; their weights in one buffer, as
many layers as one allocation holds), or a launch a layer, up to its first matrix in another format than Wqkv's,
where the formats vary; without it, decode on CPU configs fuses the first two launches of a layer into one
(qkv_attention, a work-group per KV head).

A batch (`enqueue_batch`, what the server runs) is the same pass over the rows of several sequences at once: each
row has its own position and KV cache slot, from a table {pos, slot} per row that the host writes before the pass,
so each weight is read and decoded once for every running sequence (a decode step of each, prompt chunks of
others). The rows whose logits are wanted (each sequence's last) are gathered to the front and go through the
LM head together; their logits are read back and sampled on the host, or, for sequences whose sampler the device
can draw for (greedy, or a temperature with top-k and top-p), their tokens are drawn on the device (choose_rows) and
only they come back. The next batch can feed such a token from the device (its embed reads it there), so the host
enqueues batch n + 1 before it reads batch n's tokens, as single-sequence decoding does (dpllama.generate.Batcher).

The rooms around it: layout.py packs weights into the device layout and holds the launch geometry,
kernels.py binds each kernel's arguments (one launcher per kernel), kv_cache.py owns the KV cache's layout and
each sequence's tokens and position. This file is the forward pass and the token loop's primitives.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.model import kernels
from dpllama.model.kv_cache import KVCache, Sequence, cache_defines, zeros
from dpllama.formats import round_up
from dpllama.model.layout import Arena, DeviceTensor, Geometry, fuse_rows, pow2_divisor, upload_array
from dpllama.model.weights import Layer, Tensor, Weights, check_activation_bits, check_kv_cache, rope_angles
from dpllama.runtime import Buffer, Queue


def not_finite(pos: int) -> str:
    return (f"the logits at position {pos} are not finite (NaN or infinity): the model's weights or its "
            f"activations overflowed float32")


def rope_table(seq_len: int, head_dim: int, theta: float, freq_factors=None, mscale: float = 1.0) -> np.ndarray:
    """(cos, sin) of RoPE's angle for every position and pair, times mscale, float32[seq, hd/2, 2] (rope_angles'
    scaling in)."""
    angle = rope_angles(np.arange(seq_len), head_dim, theta, freq_factors)
    return np.ascontiguousarray(np.stack([np.cos(angle), np.sin(angle)], axis=-1) * np.float32(mscale), np.float32)


def neox_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """The order of Q or K rows that makes NEOX RoPE's pairs (i, i + head_dim/2) of each head adjacent
    (2i, 2i+1), for store_qkv's one rotation. q and k come out permuted alike within each head, which leaves
    every q.k, so attention, as NEOX's; it is what llama.cpp's converter does to Llama's Hugging Face weights."""
    half = np.arange(head_dim).reshape(2, head_dim // 2).T.ravel()        # 0, h/2, 1, h/2 + 1, ...
    return (np.arange(n_heads)[:, None] * head_dim + half).ravel()


def pass_rows(prefill_chunk: int, slots: int, chunk: int | None, seq_len: int) -> int:
    """Rows of a forward pass: `chunk` (else the config's prefill_chunk), at most the context, and at least a
    decode step of every slot, so that a batch never leaves a decoding sequence out."""
    return max(slots, min(chunk or prefill_chunk, seq_len))


def span_floats(c, chunk: int) -> int:
    """Floats of one span's sums for every head of the rows whose spans attention splits (att_parts: a head's sums,
    then its largest score and sum, padded to HD_VEC; of up to SPLIT_ROWS rows of a pass of `chunk`)."""
    return min(chunk, kernels.SPLIT_ROWS) * c.n_heads * (c.head_dim + pow2_divisor(c.head_dim))


def floats_per_position(c, chunk: int, slots: int = 1, kv_cache: str = "f16", span: int = 0) -> tuple[int, ...]:
    """Floats that each position of the context costs in Llama's buffers that grow with it: the KV cache of
    every slot, the attention scores of a pass of `chunk` rows (att), the RoPE table (rope), each slot's
    tokens and, with attention in spans of `span` positions (work-groups of one work-item; 0: none), the spans'
    sums (att_parts, rounded up)."""
    return (slots * KVCache.floats_per_position(c.n_layers, c.kv_dim, kv_cache), chunk * c.n_heads, c.head_dim, slots,
            -(-span_floats(c, chunk) // span) if span else 0)


# the most tokens a draw's penalties look back over on the device (a batch's window buffer holds this many a row)
PENALTY_WINDOW = 256


@dataclass
class Part:
    """A batch's rows of one sequence (Llama.batch): the tokens at positions pos, pos + 1, ... of its slot. An id
    -1 - i stands for the token that the batch before chose on the device for its i-th part that wanted logits
    (a part with a draw, fed without the host reading it first)."""
    slot: int
    pos: int
    tokens: list[int]
    logits: bool            # whether the logits after the last token are wanted
    draw: tuple | None = None   # with logits: the device draws the next token by these (Sampler.draw: temperature,
    #                             top-p, coin, top-k, the penalties and their window's length) and only it comes back;
    #                             None: the logits do
    history: tuple[int, ...] = ()   # with a penalized draw: the sequence's tokens before the last one fed here, at
    #                                 least the window's length less one of them


class Pending:
    """A batch enqueued (Llama.enqueue_batch), its results on their way to the host."""

    def __init__(self, results: list, uploads: list):
        self._results = results     # per part that wants logits: (array, event, drawn on the device)
        self._uploads = uploads     # the batch's table copies: kept until done (dropping one waits for it)

    def wait(self) -> list:
        """For each part that wanted logits, in order: the token the device drew (int; -1 for logits that are
        not all finite) for a part with a draw, the logits (float32 [vocab]) for the others."""
        out = []
        for array, event, drawn in self._results:
            event.wait()
            out.append(int(array[0]) if drawn else array)
        self._uploads = []
        return out


@dataclass
class DeviceLayer:
    wqkv: DeviceTensor                      # [q_dim + 2 kv_dim, dim]: Wq, Wk, Wv stacked
    wo: DeviceTensor                        # [dim, q_dim]
    w13: DeviceTensor                       # [2 hidden, dim]: blocks of W1 rows and W3 rows alternating
    w2: DeviceTensor                        # [dim, hidden]
    qkv_attention: tuple[str, ...] | None   # defines of decode's QKV launch with attention, None if not fused
    layer: dict[int, tuple[tuple[str, ...], int]]   # tokens per group -> matrix.cl's layers: its defines and phases
    attn_norm: Buffer | None = None         # [dim]
    ffn_norm: Buffer | None = None          # [dim]
    qkv_bias: Buffer | None = None          # [q_dim + 2 kv_dim]: bq, bk, bv stacked (4 unused bytes without)
    qk_norms: Buffer | None = None          # [2 head_dim]: q_norm, k_norm (4 unused bytes without)
    group: int = -1                         # with the layer launch: the buffer it shares with other layers
    row: int = -1                           # (Llama.layer_buffers) and its row in that buffer's table of parts


class Llama:
    def __init__(self, weights: Weights, q: Queue, max_seq: int | None = None, slots: int = 1,
                 chunk: int | None = None, activation_bits: int = 16, kv_cache: str = "f16"):
        """The model on `q`'s device, laid out and launched as `q`'s config asks, for `slots` sequences with a
        context of `max_seq` tokens each (at most the model's), and forward passes of up to `chunk` rows (a
        prompt chunk, a batch; the config's prefill_chunk unless given). `activation_bits` 8: int4 and int5
        matrices take their input as bytes (llama.cpp's numerics, faster, further from float32 math) instead of
        16-bit integers (matrix.cl's header). `kv_cache` "f32" keeps keys and values in float32 instead of fp16
        (attention.h: twice the bytes, float32 math end to end). The primitives act on the selected sequence
        (`select`), the first one until another is selected."""
        check_activation_bits(activation_bits)
        check_kv_cache(kv_cache)
        self.config = c = weights.config
        self.activation_bits = activation_bits
        self.q = q
        self.geometry = geo = Geometry.of(q.config)
        self.seq_len = min(max_seq or c.seq_len, c.seq_len)
        self.chunk = pass_rows(geo.prefill_chunk, slots, chunk, self.seq_len)
        kv_defines = cache_defines(kv_cache, geo.key_block)        # attention.h: the cache's value type and layout
        # work-groups of one work-item take the query heads of a key/value head together (attention.h's attend_heads)
        # in spans of attention_span positions, which the layer launch may split between work-groups (attention.h)
        gqa = (f"GQA={c.n_heads // c.n_kv_heads}", f"ATT_SPAN={geo.attention_span}") if geo.attention == 1 else ()
        self.attention_defines = (f"ATTENTION_POSITIONS={geo.attention_positions}", f"HD_VEC={pow2_divisor(c.head_dim)}",
                                  *gqa, *kv_defines)
        dim, q_dim = c.dim, c.q_dim
        # decode's attention inside the QKV launch (qkv_attention, a work-group per KV head): where the config asks
        # for it for this many KV heads and there are as many as compute units (fewer would leave some idle through
        # the QKV projection), work-groups are single work-items (CPUs), and a head's rows are whole tiles
        min_kv = q.config["fuse"]["attention_min_kv_heads"]
        # (not with heads' norms: their kernel comes between QKV and attention)
        self.fused_attention = (bool(min_kv) and c.n_kv_heads >= max(min_kv, q.device.compute_units)
                                and geo.gemv == 1 and geo.attention == 1 and c.head_dim % geo.tile_rows == 0
                                and not c.qk_norm)
        groups = {t.group for _, t in weights.matrices() if t.group}
        # activation rows are padded like weight columns (zeros), and to 16 floats for vector access
        pad = lambda n: max(round_up(n, m) for m in [16, *groups])  # noqa: E731
        # a row of query holds q, and with heads' norms k too until they are turned (matrix.cl's QK_NORM)
        self.dim_p, self.q_p, self.hidden_p = pad(dim), pad(q_dim + c.kv_dim * c.qk_norm), pad(c.hidden_dim)

        def upload(t: Tensor, name: str, defines: tuple[str, ...] = (), arena: Arena | None = None) -> DeviceTensor:
            return DeviceTensor(q, t, name, geo, defines, activation_bits, arena)

        def norm_weight(w: np.ndarray) -> np.ndarray:
            return np.pad(w.astype(np.float32), (0, self.dim_p - dim))

        # ---- weights, as stored (llama2.c run.c order) ----
        self.tok_embeddings = upload(weights.tok_embeddings, "tok_embeddings")   # [vocab, dim]
        self.qkv_defines = (("QKV_BIAS",) * c.qkv_bias + ("QK_NORM",) * c.qk_norm) + kv_defines
        # layers in one launch (matrix.cl's layers) on CPU configs: then runs of layers share a buffer (each its
        # arrays in an Arena), as many as one allocation holds
        self.layer_launch = (q.device.compute_units <= q.config["fuse"]["layer_max_units"] and geo.gemv == 1
                             and geo.attention == 1)
        self.layers: list[DeviceLayer] = []
        self.layer_buffers: list[tuple[Buffer, Buffer]] = []     # per run of layers: their arrays, the table of parts
        run: list[tuple[DeviceLayer, Arena, list[int]]] = []     # layers whose arrays wait for their shared buffer
        for i, L in enumerate(weights.layers):
            arena = Arena(q) if self.layer_launch else None
            wq, wk, wv, bias, norms = self._qkv(L)
            wqkv = upload(fuse_rows([wq, wk, wv]), f"layers.{i}.wqkv", self.qkv_defines, arena)
            wo, w2 = upload(L.wo, f"layers.{i}.wo", arena=arena), upload(L.w2, f"layers.{i}.w2", arena=arena)
            w13 = upload(fuse_rows([L.w1, L.w3], geo.tile_rows // 2), f"layers.{i}.w13", arena=arena)
            layer = self._layer_defines(wqkv, wo, w13, w2)
            D = DeviceLayer(wqkv=wqkv, wo=wo, w13=w13, w2=w2, layer=layer,
                            # decode's launches are the layer's own where it is one launch
                            qkv_attention=None if 1 in layer else self._qkv_attention_defines(wqkv))
            vectors = ((norm_weight(L.attn_norm), f"layers.{i}.attn_norm"),
                       (norm_weight(L.ffn_norm), f"layers.{i}.ffn_norm"),
                       (bias, f"layers.{i}.qkv_bias" if bias is not None else f"layers.{i}.qkv_bias-unused"),
                       (norms, f"layers.{i}.qk_norms" if norms is not None else f"layers.{i}.qk_norms-unused"))
            if arena is None:
                D.attn_norm, D.ffn_norm, D.qkv_bias, D.qk_norms = (upload_array(q, a, n) for a, n in vectors)
            else:
                handles = [arena.add(a, n) for a, n in vectors]
                if run and Arena.size([r for _, r, _ in run] + [arena]) > q.max_alloc:
                    self._upload_layers(run)
                    run = []
                run.append((D, arena, handles))
            self.layers.append(D)
        if run:
            self._upload_layers(run)
        self.norm = q.buffer(host=norm_weight(weights.norm), name="norm")          # [dim]
        self.output = self.tok_embeddings if weights.tied else upload(weights.output, "output")  # [vocab, dim]

        # ---- programs: every variant this model uses, compiled once per device (progress on stderr) ----
        matrices = [self.tok_embeddings, self.output] + [t for L in self.layers for t in (L.wqkv, L.wo, L.w13, L.w2)]
        q.build_all([("attention.cl", self.attention_defines), ("state.cl", ()),
                     ("sampling.cl", kernels.draw_defines(self.tok_embeddings))]
                    + [("matrix.cl", d) for t in matrices for d in t.defines.values()]
                    + [("matrix.cl", L.qkv_attention) for L in self.layers if L.qkv_attention]
                    + [("matrix.cl", d) for L in self.layers for d, _ in L.layer.values()])
        self.attention_prog = q.program("attention.cl", *self.attention_defines)
        self.state_prog = q.program("state.cl")

        # ---- state: activations for up to `chunk` tokens (decode uses row 0), KV cache, the sequences ----
        n = self.chunk
        self.x = zeros(q, n * self.dim_p, "x")                   # residual stream [chunk, dim]
        self.query = zeros(q, n * self.q_p, "query")             # [chunk, q_dim] (k and v go to the cache)
        self.att_out = zeros(q, n * self.q_p, "att_out")         # attention output [chunk, q_dim]
        self.h = zeros(q, n * self.hidden_p, "h")                # SwiGLU output [chunk, hidden]
        self.cache = KVCache(q, c.n_layers, c.kv_dim, self.seq_len, geo.attention_positions, slots, kv_cache,
                             geo.key_block)
        self.att = zeros(q, n * c.n_heads * self.cache.seq_p, "att")   # attention scores [chunk, n_heads, seq]
        # matrix.cl's layers: its phases' task counters, per layer of a launch (zeros between launches); the sums of
        # the spans of the rows that it or attention.cl splits (passes of up to SPLIT_ROWS rows: attend_span), and
        # attention.cl's counts of a row's spans done (zeros between launches)
        self.layer_counters = zeros(q, 32 * kernels.LAYER_PHASES * c.n_layers + 16, "layer_counters", np.int32)
        spans = kernels.cache_spans(geo, self.cache.seq_p)
        split = geo.attention == 1 and spans > 1
        self.att_parts = zeros(q, span_floats(c, n) * spans if split else 1, "att_parts")
        self.att_folds = zeros(q, min(n, kernels.SPLIT_ROWS) * c.n_kv_heads if split else 1, "att_folds", np.int32)
        self.rope = q.buffer(host=rope_table(self.seq_len, c.head_dim, c.rope_theta, c.rope_factors(self.seq_len),
                                             c.rope_mscale), name="rope")  # [seq, hd/2, 2]
        self.sequences = [Sequence(q, self.seq_len, c.vocab_size, slot) for slot in range(slots)]
        self.seq = self.sequences[0]
        self.lock = threading.Lock()    # held by a generation's steps (dpllama.generate.Generation), threads' too
        self.row_ids = q.buffer(host=np.arange(n, dtype=np.int32), name="row_ids")   # 0, 1, ..., chunk - 1
        # a batch's rows: their token ids (embed reads them from batch_start's 0), {pos, slot} per row, and
        # those whose logits are wanted
        self.batch_tokens = zeros(q, n, "batch_tokens", np.int32)
        self.batch_start = zeros(q, 1, "batch_start", np.int32)
        self.batch_rows = zeros(q, 2 * n, "batch_rows", np.int32)
        self.batch_wanted = zeros(q, n, "batch_wanted", np.int32)
        # a row per part (one part per slot), rows 16 floats aligned: choose_rows reads them as float16 vectors
        self.vocab_p = round_up(c.vocab_size, 16)
        self.batch_logits = zeros(q, slots * self.vocab_p, "batch_logits")
        self.batch_draws = zeros(q, kernels.DRAW_PARAMS * slots, "batch_draws")   # each row's draw_params
        self.batch_chosen = zeros(q, slots, "batch_chosen", np.int32)          # the token drawn from each row
        self.batch_fed = zeros(q, n, "batch_fed", np.int32)         # the token each row of a pass embedded (embed's)
        # per row that wants logits, the window of tokens its draw's penalties count (sampling.cl's penalize)
        self.batch_window = zeros(q, slots * PENALTY_WINDOW, "batch_window", np.int32)
        self.chosen_rows = 0            # rows of batch_chosen that the latest batch filled (what its next may feed)
        self.choose_rows_commands: dict[int, object] = {}   # m -> _choose_rows_command(m)
        self.draw_cand = zeros(q, 2 * slots * self.vocab_p, "draw_cand")      # a sampled draw's candidates, per row
        self.batch_commands: dict[int, list] = {}       # T -> _batch_commands(T)
        self.head_commands: dict[int, list] = {}        # m -> _head_commands(m)

        # each sequence's passes are bound to its own buffers and cache slot, so they are recorded per slot
        self.commands: dict[tuple[int, bool, int], list] = {}   # (T, every row, slot) -> the pass over T tokens
        self.row_logits: Buffer | None = None        # [chunk, vocab]: the all-rows pass's, made on its first use
        self.advance_commands: dict[tuple[int, int], object] = {}
        self.step_draw = zeros(q, kernels.DRAW_PARAMS, "step_draw")    # a sequence's next token's (next_chosen)
        self.step_draw_upload = None                     # its copy in flight (dropping it would wait for it)
        self.choose_commands = [kernels.choose_embed(q, self.tok_embeddings, s.logits, s.tokens, s.state,
                                                     self.step_draw, self.x, c.vocab_size, self.draw_cand)
                                for s in self.sequences]
        self.forward_commands(1)

    def _qkv(self, L: Layer) -> tuple[Tensor, Tensor, Tensor, np.ndarray | None, np.ndarray | None]:
        """Wq, Wk, Wv, the stacked biases and the stacked heads' norms (None without) in the rows' device order:
        NEOX RoPE's Q and K rows in neox_rows' order."""
        c = self.config
        wq, wk, bq, bk, nq, nk = L.wq, L.wk, L.bq, L.bk, L.q_norm, L.k_norm
        if c.rope_neox:
            rq, rk = neox_rows(c.n_heads, c.head_dim), neox_rows(c.n_kv_heads, c.head_dim)
            wq, wk = wq.take_rows(rq), wk.take_rows(rk)
            bq, bk = (bq[rq], bk[rk]) if c.qkv_bias else (bq, bk)
            nq, nk = (nq[rq[:c.head_dim]], nk[rk[:c.head_dim]]) if c.qk_norm else (nq, nk)
        bias = np.concatenate([bq, bk, L.bv]).astype(np.float32) if c.qkv_bias else None
        norms = np.concatenate([nq, nk]).astype(np.float32) if c.qk_norm else None
        return wq, wk, L.wv, bias, norms

    def _upload_layers(self, run: list[tuple[DeviceLayer, Arena, list[int]]]) -> None:
        """One buffer for a run of layers' arrays and the table of where each layer's start (matrix.cl's layers
        takes both: a row of 16 byte offsets a layer, its LAYER_PARTS), and each array as a sub-buffer of it for
        the other kernels."""
        first = len(self.layers) - len(run)
        weights = Arena.upload([arena for _, arena, _ in run], f"layers.{first}-{first + len(run) - 1}")
        parts = []
        for D, arena, handles in run:
            tensors = (D.wqkv, D.wo, D.w13, D.w2)
            for t in tensors:
                t.place(arena)
            D.attn_norm, D.ffn_norm, D.qkv_bias, D.qk_norms = (arena.region(h) for h in handles)
            D.group, D.row = len(self.layer_buffers), len(parts)
            parts.append([arena.offset(h) for h in [*(h for t in tensors for h in t.handles), *handles]])
        self.layer_buffers.append((weights, self.q.buffer(host=np.array(parts, np.uint32), name="layer_parts")))

    def _layer_defines(self, wqkv: DeviceTensor, wo: DeviceTensor, w13: DeviceTensor,
                       w2: DeviceTensor) -> dict[int, tuple[tuple[str, ...], int]]:
        """For each number of tokens per group: the defines of a layer's launch of matrix.cl's layers, and how many of
        the layer's phases it runs (QKV, attention, Wo, SwiGLU, W2: at least the first two, and on while the matrices
        share Wqkv's program, format and geometry, their input rows prepared once, X_ONCE). Where the config asks for
        it and work-groups are single work-items (CPUs)."""
        geo = self.geometry
        if not self.layer_launch:
            return {}
        out = {}
        for n in geo.token_counts():
            qkv = wqkv.defines[n]
            if "X_ONCE" not in qkv:
                continue
            phases = 2
            for t in (wo, w13, w2):
                if t.defines[n] + self.qkv_defines != qkv:
                    break
                phases += 1
            out[n] = (tuple(dict.fromkeys((*qkv, *self.attention_defines, "LAYER"))), phases)
        return out

    def _qkv_attention_defines(self, wqkv: DeviceTensor) -> tuple[str, ...] | None:
        if not self.fused_attention:
            return None
        # wqkv's decode program's, and attention's: they hold GQA (work-groups of one work-item) and, as the QKV ones,
        # the cache's type
        return tuple(dict.fromkeys((*wqkv.defines[1], *self.attention_defines, "SOLO")))

    def select(self, slot: int) -> None:
        """Make the sequence of `slot` the one the primitives act on. Activations are shared: a caller switching
        sequences lets each one's enqueued work finish its pass first (as the primitives do: a pass is enqueued
        whole, and the queue orders the next one after it)."""
        self.seq = self.sequences[slot]

    @property
    def logits(self) -> Buffer:
        """The selected sequence's logits, of the last token it fed."""
        return self.seq.logits

    @property
    def pos(self) -> int:
        """The current position: the token there has been chosen; the logits are those of the one before."""
        return self.seq.pos

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the embedding row aside)."""
        return sum(t.nbytes for L in self.layers for t in (L.wqkv, L.wo, L.w13, L.w2)) + self.output.nbytes

    def forward_commands(self, T: int, every_row: bool = False) -> list:
        """The launches of one forward pass over tokens[pos .. pos + T), recorded on first use; the first
        embeds the tokens (skipped after choose_embed, which embeds the token it draws). The logits are
        the last token's (`logits`), or with `every_row` those of all T tokens (`row_logits`, row t at t * vocab)."""
        key = (T, every_row, self.seq.slot)
        if key in self.commands:
            return self.commands[key]
        q, seq = self.q, self.seq
        cmds = self._layer_commands(T, seq.tokens, seq.state, seq.state, seq.slot, 0)
        if every_row:
            cmds.append(self._lm_head(T, self._row_logits()))
        else:
            if T > 1:   # only the last token's logits are wanted: its residual row moves to row 0
                cmds.append(kernels.gather_rows(q, self.state_prog, self.x, self.row_ids, T - 1, 1, self.dim_p))
            cmds.append(self._lm_head(1, seq.logits))
        self.commands[key] = cmds
        return cmds

    def _layer_commands(self, T: int, tokens: Buffer, start: Buffer, state: Buffer, slot: int,
                        slot_stride: int) -> list:
        """The launches that take T rows from their token ids (tokens[start[0] ..]) through every layer, into x:
        the rows of one sequence (its tokens, its state {pos, n_prompt} as start and state, its slot;
        slot_stride 0) or of a batch (the batch's ids from 0, its table of {pos, slot} per row, slot 0 and the
        cache's slot stride; attention.h's ROW_POS)."""
        c, q, geo, cache = self.config, self.q, self.geometry, self.cache
        q_dim, kv_dim, eps = c.q_dim, c.kv_dim, np.float32(c.norm_eps)
        cmds = [kernels.embed(q, self.tok_embeddings, T, tokens, start, self.batch_chosen, self.x, self.dim_p,
                              self.batch_fed)]
        i = 0
        while i < len(self.layers):
            L, offset, count = self.layers[i], cache.offset(i, slot), 1
            kv = dict(k_cache=cache.k.read_write(), v_cache=cache.v.read_write(), state=state.read(),
                      rope=self.rope.read(), **kernels.ints(q_dim=q_dim, kv_dim=kv_dim, head_dim=c.head_dim,
                                                            seq_p=cache.seq_p, cache_offset=offset,
                                                            slot_stride=slot_stride))
            x, g, query = self.x.read(), L.attn_norm.read(), self.query.write()
            fused = L.layer.get(geo.tokens(T))      # the layer's first phases in one launch
            if fused:
                defines, phases = fused
                # and the layers after it that share its buffer and program, where each runs all five phases
                while (phases == 5 and i + count < len(self.layers) and self.layers[i + count].group == L.group
                       and self.layers[i + count].layer.get(geo.tokens(T)) == fused):
                    count += 1
                weights, parts = self.layer_buffers[L.group]
                cmds.append(kernels.layers(
                    q, q.program("matrix.cl", *defines), weights, parts, L.row, count, L, T, phases,
                    self.x.read_write(), self.query.read_write(), self.att.read_write(), self.att_parts.read_write(),
                    self.att_out.read_write(),
                    self.h.read_write(), self.dim_p, self.q_p, self.hidden_p, eps,
                    dict(kv, **kernels.ints(cache_stride=cache.offset(1) - cache.offset(0))), c.n_heads,
                    self.layer_counters.read_write()))
            elif T == 1 and L.qkv_attention:
                cmds.append(kernels.qkv_attention(
                    q, q.program("matrix.cl", *L.qkv_attention), L.wqkv, c.n_kv_heads, x, g, query, eps,
                    dict(kv, bias=L.qkv_bias.read()),
                    self.att.read_write(), self.att_out.write(), c.n_heads, self.dim_p, self.q_p))
            else:
                cmds.append(kernels.gemv(q, "gemv_norm_rope_kv", L.wqkv, T, x, query, self.dim_p, self.q_p, g=g,
                                         eps=eps, bias=L.qkv_bias.read(), **kv))
                if c.qk_norm:
                    cmds.append(kernels.norm_rope_heads(q, L.wqkv.program(geo.tokens(T)), c.n_heads + c.n_kv_heads, T,
                                                        self.query.read_write(), self.q_p, L.qk_norms.read(), eps,
                                                        dict(kv, bias=L.qkv_bias.read())))
                cmds += [
                    kernels.attention(q, self.attention_prog, geo, T, self.query.read(), cache.k.read(), cache.v.read(),
                                      self.att.read_write(), self.att_out.write(), state.read(), c.n_heads,
                                      c.n_kv_heads, c.head_dim, cache.seq_p, self.q_p, offset, slot_stride,
                                      self.att_parts.read_write(), self.att_folds.read_write()),
                ]
            cmds += [   # the phases after those the layer's launch ran (after QKV and attention without it)
                kernels.gemv(q, "gemv_add", L.wo, T, self.att_out.read(), self.x.read_write(), self.q_p, self.dim_p),
                kernels.gemv(q, "gemv_norm_swiglu", L.w13, T, self.x.read(), self.h.write(), self.dim_p,
                             self.hidden_p, g=L.ffn_norm.read(), eps=eps),
                kernels.gemv(q, "gemv_add", L.w2, T, self.h.read(), self.x.read_write(), self.hidden_p, self.dim_p),
            ][fused[1] - 2 if fused else 0:]
            i += count
        return cmds

    def _lm_head(self, rows: int, logits: Buffer, stride: int | None = None):
        """logits[r] = Wcls rmsnorm(x[r], norm) for the first `rows` rows of x, `stride` floats apart (the vocabulary's
        size unless given)."""
        c = self.config
        return kernels.gemv(self.q, "gemv_norm", self.output, rows, self.x.read(), logits.write(), self.dim_p,
                            stride or c.vocab_size, g=self.norm.read(), eps=np.float32(c.norm_eps))

    def _row_logits(self) -> Buffer:
        """[chunk, vocab], for the all-rows passes (perplexity); made on first use."""
        if self.row_logits is None:
            self.row_logits = zeros(self.q, self.chunk * self.config.vocab_size, "row_logits")
        return self.row_logits

    def _check_ids(self, ids, where: str = "") -> None:
        """The embedding kernels read the row of each id unchecked: one past the table reads far outside it."""
        bad = next((int(t) for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise DpllamaError(f"token id {bad} {where}is not in the model's vocabulary of {self.config.vocab_size}")

    # ---- batches: rows of several sequences in one pass (the server's engine drives them) ----
    def batch(self, parts: list[Part]) -> np.ndarray:
        """One forward pass over the tokens of several sequences (enqueue_batch), waited for: float32 [m, vocab],
        the logits after the last token of each of the m parts that want them (none with a draw), in order."""
        logits = self.enqueue_batch(parts).wait()
        return np.stack(logits) if logits else np.empty((0, self.config.vocab_size), np.float32)

    def enqueue_batch(self, parts: list[Part]) -> Pending:
        """Enqueue one forward pass over the tokens of several sequences, each in its own slot at its own positions
        (a decode step of each, prompt chunks of some): every weight is read and decoded once for all of them.
        At most `chunk` tokens in all. The parts that want logits get them back, or for parts with a draw the token
        the device draws (choose_rows: their argmax, or a sample); a part of the next batch may feed that token from
        there (Part), so the host can enqueue the next batch before it has read this one's tokens. The sequences'
        single-sequence state (their device tokens and position, `select`, `pos`) is neither read nor moved: a
        sequence is driven by batches or by the primitives, not both."""
        T = sum(len(p.tokens) for p in parts)
        if not 0 < T <= self.chunk:
            raise ValueError(f"a batch holds 1 to {self.chunk} tokens, found {T}")
        if len({p.slot for p in parts}) < len(parts):
            raise ValueError("a batch holds one part per slot")
        P = self.padded_rows(T)
        rows, ids, wanted = np.empty((P, 2), np.int32), np.zeros(P, np.int32), []
        rows[T:] = (-1, 0)      # padding rows: position -1 (attention.h), token 0
        r = 0
        for p in parts:
            n = len(p.tokens)
            if not (0 <= p.pos and p.pos + n <= self.seq_len and 0 <= p.slot < len(self.sequences)):
                raise DpllamaError(f"batch part at position {p.pos}, {n} tokens, slot {p.slot}: past the context "
                                   f"of {self.seq_len} tokens or the {len(self.sequences)} slots")
            rows[r:r + n] = np.stack([np.arange(p.pos, p.pos + n), np.full(n, p.slot)], axis=1)
            ids[r:r + n] = p.tokens
            r += n
            if p.logits:
                wanted.append(r - 1)
        self._check_ids(ids[ids >= 0])
        if (ids < -self.chosen_rows).any():
            raise ValueError(f"a batch feeds chosen tokens -1 .. -{self.chosen_rows} (the batch before chose "
                             f"{self.chosen_rows}), found {int(ids.min())}")
        uploads = [self.batch_tokens.set_async(ids), self.batch_rows.set_async(rows.ravel())]
        self.q.replay(self._batch_commands(P))
        m, vocab = len(wanted), self.config.vocab_size
        draws = [p.draw for p in parts if p.logits]
        drawn = [d is not None for d in draws]
        self.chosen_rows = m if any(drawn) else 0
        if not m:
            return Pending([], uploads)
        head = self._head_commands(m)
        if wanted != list(range(m)):          # else the rows are in place already (a batch of decode steps)
            uploads.append(self.batch_wanted.set_async(np.array(wanted, np.int32)))
        else:
            head = head[1:]
        self.q.replay(head)
        if any(drawn):
            windows = [self._window(p, r) for p, r in zip((p for p in parts if p.logits), wanted)]
            uploads.append(self.batch_draws.set_async(np.array([self.draw_params(d, len(w))
                                                               for d, w in zip(draws, windows)], np.float32)))
            if any(windows):
                table = np.zeros((m, PENALTY_WINDOW), np.int32)
                for i, w in enumerate(windows):
                    table[i, :len(w)] = w
                uploads.append(self.batch_window.set_async(table.ravel()))
            self.q.enqueue(self._choose_rows_command(m))
            chosen, copied = self.batch_chosen.get_async(np.int32, 0, m)
            results = [(chosen[i:i + 1], copied, True) if d else
                       (*self.batch_logits.get_async(np.float32, i * self.vocab_p, vocab), False)
                       for i, d in enumerate(drawn)]
        else:                                   # every row's logits, in one copy
            logits, copied = self.batch_logits.get_async(np.float32, 0, m * self.vocab_p)
            results = [(row[:vocab], copied, False) for row in logits.reshape(m, self.vocab_p)]
        return Pending(results, uploads)

    def padded_rows(self, T: int) -> int:
        """The rows a batch of T rows runs as. Up to decode_rows, T: decode's kernels take a row per work-group.
        Past them the matrix kernels take rows in groups (Geometry.tokens: 2, 4, ... prefill_tokens) and compute a
        group's every row whatever T is, so T is rounded up to whole groups (at most `chunk`) and the rest are
        padding rows, which skip the KV cache and attention. A batch's launches are then recorded for at most
        chunk / prefill_tokens sizes and a few small ones, not for every size the prompts' pieces make."""
        tokens = self.geometry.tokens(T)
        return T if tokens == 1 else min(round_up(T, tokens), self.chunk)

    def prepare_batches(self, sequences: int) -> None:
        """Record, ahead of use, the launches of every batch of decode steps of up to `sequences` sequences, and of
        a full pass (`chunk` rows, the prompts' usual). A pass's launches are recorded the first time a batch of
        its size runs, ~25 ms of host time for SmolLM2's 151 (most of it PyOpenCL making kernel objects), which
        a server would otherwise spend in its first steps at each new number of running requests, on the cores
        the device needs."""
        for n in range(1, min(sequences, self.chunk) + 1):
            self._batch_commands(self.padded_rows(n))
            self._head_commands(n)
            self._choose_rows_command(n)
        self._batch_commands(self.chunk)

    def _batch_commands(self, T: int) -> list:
        """The layers over a batch of T rows (padded_rows)."""
        if T not in self.batch_commands:
            self.batch_commands[T] = self._layer_commands(T, self.batch_tokens, self.batch_start, self.batch_rows,
                                                          0, self.cache.slot_stride)
        return self.batch_commands[T]

    def _head_commands(self, m: int) -> list:
        """The gather and LM head of m of a batch's rows."""
        if m not in self.head_commands:
            self.head_commands[m] = [
                kernels.gather_rows(self.q, self.state_prog, self.x, self.batch_wanted, 0, m, self.dim_p),
                self._lm_head(m, self.batch_logits, self.vocab_p)]
        return self.head_commands[m]

    def _choose_rows_command(self, m: int):
        """The tokens drawn from m rows of batch_logits by batch_draws, into batch_chosen."""
        if m not in self.choose_rows_commands:
            self.choose_rows_commands[m] = kernels.choose_rows(self.q, self.tok_embeddings, self.batch_logits, m,
                                                               self.config.vocab_size, self.vocab_p, self.batch_draws,
                                                               self.batch_window, PENALTY_WINDOW, self.batch_fed,
                                                               self.batch_chosen, self.draw_cand)
        return self.choose_rows_commands[m]

    @staticmethod
    def _window(part: Part, row: int) -> list[int]:
        """The tokens a part's draw penalizes (sampling.cl's penalize): the latest of its history and the token its
        last row feeds, as -1 - row where the device chose it (embed resolves it into batch_fed); [] without a
        penalty."""
        n = part.draw[7] if part.draw is not None else 0
        if not n:
            return []
        last = part.tokens[-1]
        known = list(part.history[max(len(part.history) - (n - 1), 0):]) if n > 1 else []
        return known + [last if last >= 0 else -1 - row]

    def draw_params(self, draw: tuple | None, window: int | None = None) -> tuple[float, ...]:
        """sampling.cl's kernels.DRAW_PARAMS draw parameters of a row: {temperature, top_p, coin, (1 - top_p) /
        (vocab - 1) (the top-p cutoff's, as Sampler.sample computes it), top_k, repeat penalty, presence penalty,
        frequency penalty, the penalties' window} (the window: `window` tokens, else the draw's, which choose_embed
        cuts to the sequence's), or a negative temperature for a row the host draws."""
        if draw is None:
            return -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0
        temperature, top_p, coin, top_k, repeat, presence, frequency, last_n = draw
        return (temperature, top_p, coin, (1.0 - top_p) / max(self.config.vocab_size - 1, 1),
                float(min(top_k, self.config.vocab_size)),      # a float32 holds it exactly (vocabularies < 2^24)
                repeat, presence, frequency, float(last_n if window is None else window))

    def _advance(self, n: int) -> None:
        key = (n, self.seq.slot)
        if key not in self.advance_commands:
            self.advance_commands[key] = kernels.advance(self.q, self.state_prog, self.seq.state, n)
        self.q.enqueue(self.advance_commands[key])
        self.seq.pos += n

    # ---- the token loop's primitives (dpllama.generate drives them) ----
    def start(self, prompt: list[int], keep: int = 0) -> None:
        """Make `prompt` (at least one token) the known tokens and go to position `keep`: the KV
        cache of the first `keep` positions is reused, so they must hold the same tokens as before."""
        if not prompt:
            raise DpllamaError("the prompt must hold at least one token (e.g. BOS)")
        if len(prompt) > self.seq_len:
            raise DpllamaError(f"prompt of {len(prompt)} tokens does not fit the context of {self.seq_len}")
        self._check_ids(prompt, "in the prompt ")
        if not 0 <= keep < len(prompt):
            raise ValueError(f"keep={keep} must leave at least one of {len(prompt)} prompt tokens to feed")
        self.seq.reset(prompt, keep)

    def feed(self, n: int = 1, embedded: bool = False) -> None:
        """Enqueue the forward pass of the n known tokens from the current position, in chunks; the
        logits are those of the last one, whose position is then the current one. `embedded`: x already
        holds the first token's embedding (choose_embed's)."""
        self._feed(n, embedded, None)

    def feed_rows(self, n: int) -> np.ndarray:
        """`feed` with the logits of every one of the n tokens, float32 [n, vocab] (row t: those after the token
        at pos + t), read back chunk by chunk: what perplexity scores."""
        rows = np.empty((n, self.config.vocab_size), np.float32)
        self._feed(n, False, rows)
        return rows

    def _feed(self, n: int, embedded: bool, rows: np.ndarray | None) -> None:
        if self.pos + n > self.seq_len:
            raise DpllamaError(f"position {self.pos + n - 1} is past the context of {self.seq_len} tokens")
        done = 0
        while done < n:
            T = min(n - done, self.chunk)
            cmds = self.forward_commands(T, every_row=rows is not None)
            self.q.replay(cmds[1:] if embedded else cmds)     # cmds[0]: embed
            embedded = False
            if rows is not None:
                rows[done:done + T] = self.row_logits.get(count=T * self.config.vocab_size).reshape(T, -1)
                bad = ~np.isfinite(rows[done:done + T]).all(axis=1)
                if bad.any():
                    raise DpllamaError(not_finite(self.pos + int(bad.argmax())))
            done += T
            step = T if done < n else T - 1
            if step:
                self._advance(step)

    def step(self) -> None:
        """Enqueue the forward pass of the token at the current position (logits only)."""
        self.feed(1)

    def next_chosen(self, draw: tuple = (0.0, 0.0, 0.0, 0, 1.0, 0.0, 0.0, 0), ahead: bool = False) -> int:
        """The next token drawn on the device by `draw` (Sampler.draw; the default: the argmax) into tokens[pos+1];
        returns that token (4 bytes back to the host). With `ahead`, the forward pass of that token is enqueued
        behind the copy of the token, so the host has the token as soon as it is drawn and enqueues the next step
        while the device runs this one (a stop token then costs one pass nobody reads). A sampled draw leaves the
        logits as probabilities."""
        self.step_draw_upload = self.step_draw.set_async(np.array(self.draw_params(draw), np.float32))
        self.q.enqueue(self.choose_commands[self.seq.slot])
        self.seq.pos += 1
        token, copied = self.seq.tokens.get_async(np.int32, self.pos, 1)
        if ahead:
            self.feed(1, embedded=True)
        copied.wait()
        if token[0] < 0:        # draw_of's mark for logits that are not all finite
            raise DpllamaError(not_finite(self.pos))
        return int(token[0])

    def next_given(self, token: int | None = None) -> None:
        """Move on to a token the host knows: the prompt's next one (None) or a host-sampled one."""
        if token is not None:
            self.seq.tokens.set(np.array([token], np.int32), offset=self.pos + 1)
        self._advance(1)

    def read_logits(self) -> np.ndarray:
        logits = self.logits.get()
        if not np.isfinite(logits).all():
            raise DpllamaError(not_finite(self.pos))
        return logits
