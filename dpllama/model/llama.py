"""The Llama forward pass on an OpenCL device, through dpllama.runtime.

Everything lives on the device: weights (in their storage format, never expanded to float), the KV
cache, the activations, the token sequence and the position. A forward pass over T tokens (T = 1 to
decode, up to `chunk` prompt tokens in prefill) is a fixed list of bound kernel launches (`Command`s),
recorded once per T and replayed; kernels read the position from the `state` buffer, so nothing is
re-bound and only a sampled id crosses to the host.

A forward pass, per layer (5 launches, each over all T tokens):
    q, k, v = [Wq; Wk; Wv] rmsnorm(x, attn_norm)   gemv_norm_rope_kv (RMSNorm fused; RoPE applied and k, v
              q, k = rope(q, k); cache[pos] = k, v                    written to the KV cache in the same pass)
    o    = attention(q, cache[0..pos])              attention         (causal; a work-group per head and token)
    x   += Wo o                                     gemv_add          (residual fused)
    h    = silu(W1 n) * (W3 n), n = rmsnorm(x)      gemv_norm_swiglu  (W1/W3 row blocks alternate)
    x   += W2 h                                     gemv_add
then logits = Wcls rmsnorm(x[last], norm) (gemv_norm), and greedy sampling on the device (argmax_embed, which
also embeds the chosen token for the next pass). Decode on CPU configs fuses the first two launches of a
layer into one (qkv_attention, a work-group per KV head).
"""
from __future__ import annotations

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.model.weights import Tensor, Weights
from dpllama.runtime import Local, Queue, open_queue


def fuse_rows(tensors: list[Tensor], block: int = 0) -> Tensor:
    """One matrix from several with the same columns, so one launch computes them all: stacked, or
    with `block`, alternating blocks of `block` rows of each (each padded with zero rows to whole
    blocks; gemv_norm_swiglu wants a block of gate rows, then the up rows of the same outputs).
    Mixed formats meet in the most general one they share."""
    kinds = {(t.kind, t.group, t.mins is not None) for t in tensors}
    if len(kinds) > 1:
        if {k for k, _, _ in kinds} == {"int4"} and len({g for _, g, _ in kinds}) == 1:
            tensors = [_int4_asym(t) for t in tensors]     # symmetric is asymmetric with min = -8 s
        else:
            tensors = [Tensor.f32(t.dequantize()) for t in tensors]

    def join(arrays):
        if not block:
            return np.concatenate(arrays)
        padded = np.stack([_pad_rows(a, block) for a in arrays])          # [n, rows_p, ...]
        n, rows_p = padded.shape[:2]
        blocks = padded.reshape(n, rows_p // block, block, *padded.shape[2:]).swapaxes(0, 1)
        return blocks.reshape(n * rows_p, *padded.shape[2:])
    t0 = tensors[0]
    rows = sum(t.rows for t in tensors) if not block else len(tensors) * -(-t0.rows // block) * block
    return Tensor(t0.kind, rows, t0.cols, join([t.data for t in tensors]),
                  None if t0.scales is None else join([t.scales for t in tensors]),
                  None if t0.mins is None else join([t.mins for t in tensors]), t0.group)


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
    pad = -a.shape[0] % multiple
    return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a


def tile(a: np.ndarray, rows_per_tile: int) -> np.ndarray:
    """[rows, n] -> the device layout: tiles of V rows, inside a tile the V values of each column
    side by side (weights.h's header)."""
    a = _pad_rows(a, rows_per_tile)
    return np.ascontiguousarray(a.reshape(-1, rows_per_tile, a.shape[1]).swapaxes(1, 2))


# q8 columns in the order matrix.cl reads them: of each 8, word 0 takes 0 1 4 5 and word 1 takes 2 3 6 7
Q8_ORDER = np.array([0, 1, 4, 5, 2, 3, 6, 7])


def q8_words(q: np.ndarray) -> np.ndarray:
    """int8 [rows, cols_p] -> uint32 [rows, cols_p / 4]: 4 columns a word, as bytes q + 128 (matrix.cl's header)."""
    rows, cols_p = q.shape
    b = q.reshape(rows, cols_p // 8, 8)[:, :, Q8_ORDER].view(np.uint8) ^ np.uint8(0x80)
    return np.ascontiguousarray(b).reshape(rows, cols_p).view("<u4")


def rope_table(seq_len: int, head_dim: int, theta: float) -> np.ndarray:
    """(cos, sin) of pos * theta^(-2i/head_dim) for every position and pair, float32[seq, hd/2, 2],
    in float32 arithmetic as llama2.c's run.c computes it."""
    j = np.arange(0, head_dim, 2, dtype=np.float32)
    freq = np.float32(1.0) / np.power(np.float32(theta), j / np.float32(head_dim))
    angle = np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]
    return np.ascontiguousarray(np.stack([np.cos(angle), np.sin(angle)], axis=-1), np.float32)


def _int4_asym(t: Tensor) -> Tensor:
    if t.mins is not None:
        return t
    return Tensor("int4", t.rows, t.cols, t.data, t.scales, (-8 * t.scales.astype(np.float32)).astype(np.float16), t.group)


def _build_defines(t: Tensor, rows_per_tile: int, tiles: int, tokens: int) -> tuple[str, ...]:
    fmt = {"f32": ("W_F32",), "q8": ("W_Q8", f"GROUP={t.group}"),
           "int4": ("W_INT4", f"GROUP={t.group}") + (("ASYM",) if t.mins is not None else ())}[t.kind]
    return fmt + (f"ROWS={rows_per_tile}", f"TILES={tiles}", f"TOKENS={tokens}")


def _pow2_divisor(n: int, limit: int = 16) -> int:
    """The largest power of two <= limit that divides n (a vector width for n elements)."""
    v = 1
    while v < limit and n % (2 * v) == 0:
        v *= 2
    return v


def floats_per_position(c, cfg) -> tuple[int, ...]:
    """Floats that each position of the context costs in Llama's buffers that grow with it: the KV cache
    (k_cache, v_cache), a prefill chunk's attention scores (att), the RoPE table (rope) and the tokens."""
    return (2 * c.n_layers * c.kv_dim, cfg.work_group("prefill_chunk") * c.n_heads, c.head_dim, 1)


class DeviceTensor:
    """A weight matrix on the device in weights.h's tiled layout, and the programs that read its format,
    by tokens per work-group: 1 to decode, `prefill_tokens` in prefill; `tiles` maps each to the row
    tiles a work-group takes."""

    def __init__(self, q: Queue, t: Tensor, name: str, rows_per_tile: int, tiles: dict[int, int]):
        if t.kind == "q8" and t.group % 8:
            # matrix.cl reads a q8 group as whole 8-column blocks; a smaller group (llama2.c v2 files of widths
            # not a multiple of 8: stories260K's is 4) goes up as float32, the same values in 4x the memory
            t = Tensor.f32(t.dequantize())
        data = t.data
        cols_p = -(-t.cols // 8) * 8 if t.kind == "f32" else t.cols_padded
        if t.kind == "f32" and cols_p != t.cols:      # kernels read 8-wide blocks
            data = np.zeros((t.rows, cols_p), np.float32)
            data[:, :t.cols] = t.data
        if t.kind == "q8":
            data = q8_words(data)
        self.rows, self.cols, self.cols_p = t.rows, t.cols, cols_p
        self.nbytes = t.nbytes
        self.buffers = [q.buffer(host=tile(a.view(np.uint16) if a.dtype == np.float16 else a, rows_per_tile),
                                 name=f"{name}.{part}") if a is not None
                        else q.buffer(4, name=f"{name}.{part}-unused")
                        for part, a in (("data", data), ("scales", t.scales), ("mins", t.mins))]
        self.tiles = tiles
        self.q = q
        self.defines = {n: _build_defines(t, rows_per_tile, k, n) for n, k in self.tiles.items()}

    @property
    def programs(self) -> dict:
        """tokens per work-group -> the program (Llama builds them all at once, with progress)."""
        return {n: self.q.program("matrix.cl", *d) for n, d in self.defines.items()}

    def args(self):
        return [b.read() for b in self.buffers]


def matrix_args(t: DeviceTensor, T: int, io: list, strides: tuple, eps=None, extra=()) -> list:
    """The arguments matrix.cl's matrix kernels share, up to their local scratch: the weight, io (x, (norm
    weight), y as the kernel takes them), the shape, T, the strides of x and y, eps, and `extra`, the
    arguments a fused kernel takes after eps."""
    return [*t.args(), *io, np.int32(t.rows), np.int32(t.cols), np.int32(t.cols_p), np.int32(T),
            np.int32(strides[0]), np.int32(strides[1]), *([] if eps is None else [np.float32(eps)]), *extra]


class Llama:
    def __init__(self, weights: Weights, queue: Queue | None = None, max_seq: int | None = None):
        self.weights = weights
        self.config = c = weights.config
        self.q = q = queue or open_queue()
        self.seq_len = min(max_seq or c.seq_len, c.seq_len)
        cfg = q.config
        self.gemv_local = cfg.work_group("gemv")
        self.rows_per_tile = cfg.work_group("rows_per_group")
        self.prefill_tokens = cfg.work_group("prefill_tokens")
        # tokens per work-group -> row tiles per work-group, for decode and for prefill
        self.tiles = {1: cfg.work_group("decode_tiles"), self.prefill_tokens: cfg.work_group("prefill_tiles")}
        self.chunk = max(1, min(cfg.work_group("prefill_chunk"), self.seq_len))
        self.att_local = cfg.work_group("attention")
        pos_vec = cfg.work_group("attention_positions")     # the config checked these values
        self.seq_p = -(-self.seq_len // pos_vec) * pos_vec
        self.attention_defines = (f"POS_VEC={pos_vec}", f"HD_VEC={_pow2_divisor(c.head_dim)}")
        dim, kv_dim, q_dim = c.dim, c.kv_dim, c.n_heads * c.head_dim
        # decode's attention inside the QKV launch (matrix.cl's qkv_attention): where the config asks for it
        # for this many KV heads, work-groups are single work-items (CPUs), and a head's rows are whole tiles
        min_kv = cfg["fuse"]["attention_min_kv_heads"]
        self.fused_attention = (bool(min_kv) and c.n_kv_heads >= min_kv and self.gemv_local == 1
                                and c.head_dim % self.rows_per_tile == 0)
        groups = {t.group for _, t in weights.matrices() if t.group}
        # activation rows are padded like weight columns (zeros), and to 16 floats for vector access
        pad = lambda n: max(-(-n // m) * m for m in [16, *groups])  # noqa: E731
        self.dim_p, self.q_p, self.hidden_p = pad(dim), pad(q_dim), pad(c.hidden_dim)

        def upload(t: Tensor, name: str) -> DeviceTensor:
            return DeviceTensor(q, t, name, self.rows_per_tile, self.tiles)

        def norm_weight(w: np.ndarray):
            return q.buffer(host=np.pad(w.astype(np.float32), (0, self.dim_p - dim)))

        def zeros(n: int, name: str, dtype=np.float32):
            return q.buffer(host=np.zeros(n, dtype), name=name)

        # ---- weights, as stored (llama2.c run.c order) ----
        self.tok_embeddings = upload(weights.tok_embeddings, "tok_embeddings")   # [vocab, dim]
        self.layers = []
        for i, L in enumerate(weights.layers):
            wqkv = fuse_rows([L.wq, L.wk, L.wv])
            self.layers.append(dict(
                attn_norm=norm_weight(L.attn_norm),                                # [dim]
                wqkv=upload(wqkv, f"layers.{i}.wqkv"),                             # [q_dim + 2 kv_dim, dim]
                qkv_attention=self._qkv_attention_defines(wqkv),
                wo=upload(L.wo, f"layers.{i}.wo"),                                 # [dim, q_dim]
                ffn_norm=norm_weight(L.ffn_norm),                                  # [dim]
                w13=upload(fuse_rows([L.w1, L.w3], self.rows_per_tile // 2), f"layers.{i}.w13"),  # [2 hidden, dim]
                w2=upload(L.w2, f"layers.{i}.w2"),                                 # [dim, hidden]
            ))
        self.norm = norm_weight(weights.norm)                                      # [dim]
        self.output = self.tok_embeddings if weights.tied else upload(weights.output, "output")  # [vocab, dim]

        # ---- programs: every variant this model uses, compiled once per device (progress on stderr) ----
        matrices = [self.tok_embeddings, self.output] + [L[k] for L in self.layers for k in ("wqkv", "wo", "w13", "w2")]
        q.build_all([("attention.cl", self.attention_defines), ("state.cl", ()),
                     ("sampling.cl", self.tok_embeddings.defines[1])]
                    + [("matrix.cl", d) for t in matrices for d in t.defines.values()]
                    + [("matrix.cl", L["qkv_attention"]) for L in self.layers if L["qkv_attention"]])
        self.attention_prog = q.program("attention.cl", *self.attention_defines)
        self.state_prog = q.program("state.cl")

        # ---- state: activations for up to `chunk` tokens (decode uses row 0), KV cache, tokens, position ----
        n = self.chunk
        self.x = zeros(n * self.dim_p, "x")                      # residual stream [chunk, dim]
        self.query = zeros(n * self.q_p, "query")                # [chunk, q_dim] (k and v go to the cache)
        self.att_out = zeros(n * self.q_p, "att_out")            # attention output [chunk, q_dim]
        self.h = zeros(n * self.hidden_p, "h")                   # SwiGLU output [chunk, hidden]
        self.logits = zeros(c.vocab_size, "logits")              # [vocab], of the last token fed
        self.att = zeros(n * c.n_heads * self.seq_p, "att")      # attention scores [chunk, n_heads, seq]
        self.k_cache = zeros(c.n_layers * kv_dim * self.seq_p, "k_cache")   # [layer, kv_dim, seq]
        self.v_cache = zeros(c.n_layers * self.seq_p * kv_dim, "v_cache")   # [layer, seq, kv_dim]
        self.rope = q.buffer(host=rope_table(self.seq_len, c.head_dim, c.rope_theta), name="rope")  # [seq, hd/2, 2]
        self.tokens = zeros(self.seq_len + 1, "tokens", np.int32)           # the sequence [seq + 1]
        self.state = zeros(2, "state", np.int32)                            # {pos, n_prompt}

        self.commands: dict[int, list] = {}          # T -> the forward pass over T tokens
        self.advance_commands: dict[int, object] = {}
        R = cfg.work_group("norm")      # the reduction size the device's config asks for
        emb = self.tok_embeddings
        argmax_embed = q.program("sampling.cl", *emb.defines[1]).argmax_embed
        self.argmax_command = q.command(argmax_embed, (R,), (R,), self.logits.read(),
                                        self.tokens.read_write(), self.state.read_write(), np.int32(c.vocab_size),
                                        *emb.args(), self.x.write(), np.int32(c.dim), np.int32(emb.cols_p),
                                        Local(R * 4), Local(R * 4))
        self.embedded = False           # x already holds the current token's row (argmax_embed wrote it)
        self.forward_commands(1)
        self.pos = 0

    def _qkv_attention_defines(self, wqkv: Tensor) -> tuple[str, ...] | None:
        """matrix.cl's defines for qkv_attention over [Wq; Wk; Wv] (None when not fused), its tiles decode's."""
        if not self.fused_attention:
            return None
        c = self.config
        return (*_build_defines(wqkv, self.rows_per_tile, self.tiles[1], 1), *self.attention_defines,
                f"GQA={c.n_heads // c.n_kv_heads}", "SOLO")

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the embedding row aside)."""
        per_layer = sum(t.nbytes for L in self.layers for t in (L["wqkv"], L["wo"], L["w13"], L["w2"]))
        return per_layer + self.output.nbytes

    def _gemv(self, kernel: str, t: DeviceTensor, T: int, io: list, strides: tuple, eps=None, extra=()):
        """Bind one matrix launch over T input rows (arguments as matrix_args)."""
        tokens = 1 if T == 1 else self.prefill_tokens
        tiles = t.tiles[tokens]
        L = self.gemv_local
        groups = -(-t.rows // (self.rows_per_tile * tiles))
        return self.q.command(getattr(t.programs[tokens], kernel), (groups * L, -(-T // tokens)), (L, 1),
                              *matrix_args(t, T, io, strides, eps, extra),
                              Local(self.rows_per_tile * tiles * tokens * L * 4), Local(tokens * L * 4))

    def forward_commands(self, T: int) -> list:
        """The launches of one forward pass over tokens[pos .. pos + T), recorded on first use."""
        if T in self.commands:
            return self.commands[T]
        c, q, ap, sp = self.config, self.q, self.attention_prog, self.state_prog
        q_dim, kv_dim = c.n_heads * c.head_dim, c.kv_dim
        eps = c.norm_eps
        A = self.att_local
        emb = self.tok_embeddings
        cmds = [q.command(emb.programs[1].embed, (64, T), (64, 1), *emb.args(), self.tokens.read(),
                          self.state.read(), self.x.write(), np.int32(c.dim), np.int32(emb.cols_p),
                          np.int32(self.dim_p))]
        for i, L in enumerate(self.layers):
            off = np.int32(i * self.seq_p * kv_dim)
            qkv_io = [self.x.read(), L["attn_norm"].read(), self.query.write()]
            cache = (self.k_cache.read_write(), self.v_cache.read_write(), self.state.read(), self.rope.read(),
                     np.int32(q_dim), np.int32(kv_dim), np.int32(c.head_dim), np.int32(self.seq_p), off)
            if T == 1 and self.fused_attention:
                attention = (self.att.read_write(), self.att_out.write(), np.int32(c.n_heads), np.int32(self.q_p))
                fused = q.program("matrix.cl", *L["qkv_attention"]).qkv_attention
                cmds.append(q.command(fused, (c.n_kv_heads, 1), (1, 1),
                                      *matrix_args(L["wqkv"], 1, qkv_io, (self.dim_p, self.q_p), eps,
                                                         cache + attention),
                                      Local(4), Local(4), Local(4)))   # SOLO: the scratch goes unused
            else:
                cmds += [
                    self._gemv("gemv_norm_rope_kv", L["wqkv"], T, qkv_io, (self.dim_p, self.q_p), eps, cache),
                    q.command(ap.attention, (c.n_heads * A, T), (A, 1), self.query.read(), self.k_cache.read(),
                              self.v_cache.read(), self.att.read_write(), self.att_out.write(), self.state.read(),
                              np.int32(c.n_heads), np.int32(c.n_kv_heads), np.int32(c.head_dim),
                              np.int32(self.seq_p), np.int32(self.q_p), np.int32(self.q_p), off, Local(A * 4)),
                ]
            cmds += [
                self._gemv("gemv_add", L["wo"], T, [self.att_out.read(), self.x.read_write()], (self.q_p, self.dim_p)),
                self._gemv("gemv_norm_swiglu", L["w13"], T, [self.x.read(), L["ffn_norm"].read(), self.h.write()],
                           (self.dim_p, self.hidden_p), eps),
                self._gemv("gemv_add", L["w2"], T, [self.h.read(), self.x.read_write()], (self.hidden_p, self.dim_p)),
            ]
        if T > 1:   # only the last token's logits are wanted: its residual row moves to row 0
            cmds.append(q.command(sp.move_row, (64,), None, self.x.read_write(), np.int32(T - 1), np.int32(self.dim_p)))
        cmds.append(self._gemv("gemv_norm", self.output, 1, [self.x.read(), self.norm.read(), self.logits.write()],
                               (self.dim_p, 0), eps))
        self.commands[T] = cmds
        return cmds

    def _advance(self, n: int) -> None:
        if n not in self.advance_commands:
            self.advance_commands[n] = self.q.command(self.state_prog.advance, (1,), None,
                                                      self.state.read_write(), np.int32(n))
        self.q.enqueue(self.advance_commands[n])
        self.pos += n

    # ---- the token loop's primitives ----
    def start(self, prompt: list[int], keep: int = 0) -> None:
        """Make `prompt` (at least one token) the known tokens and go to position `keep`: the KV
        cache of the first `keep` positions is reused, so they must hold the same tokens as before."""
        if not prompt:
            raise DpllamaError("the prompt must hold at least one token (e.g. BOS)")
        if len(prompt) > self.seq_len:
            raise DpllamaError(f"prompt of {len(prompt)} tokens does not fit the context of {self.seq_len}")
        # the embedding kernels read the row of each id unchecked: one past the table reads far outside it
        bad = next((t for t in prompt if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise DpllamaError(f"token id {bad} in the prompt is not in the model's vocabulary of "
                               f"{self.config.vocab_size}")
        if not 0 <= keep < len(prompt):
            raise ValueError(f"keep={keep} must leave at least one of {len(prompt)} prompt tokens to feed")
        self.tokens.set(np.asarray(prompt, np.int32))
        self.state.set(np.array([keep, len(prompt)], np.int32))
        self.pos = keep
        self.embedded = False

    def feed(self, n: int = 1) -> None:
        """Enqueue the forward pass of the n known tokens from the current position, in chunks; the
        logits are those of the last one, whose position is then the current one."""
        if self.pos + n > self.seq_len:
            raise DpllamaError(f"position {self.pos + n - 1} is past the context of {self.seq_len} tokens")
        while n > 0:
            T = min(n, self.chunk)
            cmds = self.forward_commands(T)
            self.q.replay(cmds[1:] if self.embedded and T == 1 else cmds)     # cmds[0]: embed
            self.embedded = False
            n -= T
            step = T if n else T - 1
            if step:
                self._advance(step)

    def step(self) -> None:
        """Enqueue the forward pass of the token at the current position (logits only)."""
        self.feed(1)

    def next_greedy(self, ahead: bool = False) -> int:
        """Argmax on the device into tokens[pos+1]; returns that token (4 bytes back to the host). With
        `ahead`, the forward pass of that token (`step`) is enqueued behind the copy of the token, so the
        host has the token as soon as the argmax is done and enqueues the next step while the device runs
        this one (a stop token then costs one pass nobody reads)."""
        self.q.enqueue(self.argmax_command)
        self.pos += 1
        self.embedded = True
        token, copied = self.tokens.get_async(np.int32, self.pos, 1)
        if ahead:
            self.step()
        copied.wait()
        if token[0] < 0:        # argmax_next's mark for logits that are not all finite
            raise DpllamaError(self._not_finite())
        return int(token[0])

    def _not_finite(self) -> str:
        return (f"the logits at position {self.pos} are not finite (NaN or infinity): the model's weights or its "
                f"activations overflowed float32")

    def next_given(self, token: int | None = None) -> None:
        """Move on to a token the host knows: the prompt's next one (None) or a host-sampled one."""
        if token is not None:
            self.tokens.set(np.array([token], np.int32), offset=self.pos + 1)
        self._advance(1)

    def read_logits(self) -> np.ndarray:
        logits = self.logits.get()
        if not np.isfinite(logits).all():
            raise DpllamaError(self._not_finite())
        return logits
