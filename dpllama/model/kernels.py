"""Launchers: one per kernel the model runs, binding its arguments by the names the kernel gives them.

Each Signature lists a kernel's arguments in the kernel's order, under the kernel's own names; a launcher
passes them by name, so the order lives in one place on each side, and tests/test_launchers.py compares
every Signature with the argument names the compiled kernel reports: a kernel whose arguments change fails
that test, not a run. Each launcher also owns its launch geometry (global and local sizes, local memory).
"""
from __future__ import annotations

import os

import numpy as np

from dpllama.formats import round_up
from dpllama.model.layout import DeviceTensor, Geometry
from dpllama.runtime import Command, Local, Queue


class Signature:
    def __init__(self, name: str, args: str):
        self.name = name
        self.args = tuple(args.split())

    def bind(self, q: Queue, program, global_size, local_size, **args) -> Command:
        """A Command of this kernel from `program`, with `args` given by name, every one of them."""
        if set(args) != set(self.args):
            raise TypeError(f"{self.name}: missing {sorted(set(self.args) - set(args))}, "
                            f"unexpected {sorted(set(args) - set(self.args))}")
        return q.command(getattr(program, self.name), global_size, local_size, *(args[a] for a in self.args))


# argument groups the matrix kernels share (their macros WEIGHT_ARGS, GEMV_ARGS, QKV_ARGS, GEMV_SCRATCH)
WEIGHT = "w_ s_ m_"
GEMV = "rows cols cols_p T x_stride y_stride"
QKV = "bias k_cache v_cache state rope q_dim kv_dim head_dim seq_p cache_offset slot_stride"
SCRATCH = "scratch scratch_ss row"

SIGNATURES = {s.name: s for s in (
    Signature("embed", f"{WEIGHT} tokens state chosen x cols cols_p x_stride fed"),
    Signature("gemv_add", f"{WEIGHT} x y {GEMV} {SCRATCH}"),
    Signature("gemv_norm", f"{WEIGHT} x g y {GEMV} eps {SCRATCH}"),
    Signature("gemv_norm_swiglu", f"{WEIGHT} x g y {GEMV} eps {SCRATCH}"),
    Signature("gemv_norm_rope_kv", f"{WEIGHT} x g y {GEMV} eps {QKV} {SCRATCH}"),
    Signature("norm_rope_heads", f"y y_stride norms eps {QKV}"),
    Signature("qkv_attention", f"{WEIGHT} x g y {GEMV} eps {QKV} att att_out n_heads out_stride {SCRATCH} "
                               f"att_scratch"),
    Signature("layers", "weights parts first count x query att att_parts att_out h T dim hidden dim_p q_p hidden_p "
                        "cp_qkv cp_o cp_f cp_d eps k_cache v_cache state rope q_dim kv_dim head_dim seq_p cache_offset "
                        f"cache_stride slot_stride n_heads shares phases counters {SCRATCH}"),
    Signature("choose_embed", f"logits tokens state n draw {WEIGHT} x cols cols_p cand best best_i"),
    Signature("choose_rows", "logits n stride draws window W fed chosen cand best best_i"),
    Signature("attention", "query k_cache v_cache att out state n_heads n_kv_heads head_dim seq_p q_stride "
                           "out_stride cache_offset slot_stride scratch parts folds"),
    Signature("gather_rows", "x rows first count n"),
    Signature("advance", "state n"),
)}


# matrix.cl's layers: the phases of a layer whose tasks it counts (its LAYER_PHASES), 32 counters each
LAYER_PHASES = 7

# the rows of the passes whose attention gives a long row's spans work-groups of their own (split_spans; matrix.cl's
# KV_AHEAD_ROWS, the layer launch's own limit for it)
SPLIT_ROWS = 16


def ints(**values) -> dict:
    """Sizes as the kernels take them (int)."""
    return {k: np.int32(v) for k, v in values.items()}


def embed(q: Queue, emb: DeviceTensor, T: int, tokens, state, chosen, x, x_stride: int, fed) -> Command:
    """x[n] = the embedding row of tokens[pos + n], n < T; an id -1 - i takes chosen[i] (a batch's rows fed from the
    batch before, choose_rows); fed[n] = the token row n embeds."""
    return SIGNATURES["embed"].bind(q, emb.program(1), (64, T), (64, 1), **emb.args(), tokens=tokens.read(),
                                    state=state.read(), chosen=chosen.read(), x=x.write(),
                                    **ints(cols=emb.cols, cols_p=emb.cols_p, x_stride=x_stride), fed=fed.write())


def gemv(q: Queue, kernel: str, t: DeviceTensor, T: int, x, y, x_stride: int, y_stride: int, **extra) -> Command:
    """One matrix kernel over T input rows: y (=, += for gemv_add) t times x, by row tiles; `extra` holds what
    the fused kernels take besides (g and eps, the KV cache arguments)."""
    geo = t.geometry
    tokens = geo.tokens(T)
    tiles, L = geo.tiles(tokens), geo.gemv
    once = t.once[tokens]
    row_groups = round_up(T, tokens) // tokens
    if once:    # matrix_groups work-groups per compute unit in all, each taking a share of its input rows' tiles
        groups = min(-(-t.rows // geo.tile_rows), -(-geo.matrix_groups * q.device.compute_units // row_groups))
    else:       # a work-group per `tiles` tiles
        groups = round_up(t.rows, geo.tile_rows * tiles) // (geo.tile_rows * tiles)
    return SIGNATURES[kernel].bind(
        q, t.program(tokens), (groups * L, row_groups), (L, 1), **t.args(), x=x, y=y,
        **ints(rows=t.rows, cols=t.cols, cols_p=t.cols_p, T=T, x_stride=x_stride, y_stride=y_stride), **extra,
        scratch=Local(geo.tile_rows * tiles * tokens * L * 4), scratch_ss=Local(tokens * L * 4),
        row=Local(t.row_bytes(tokens) if once else 4))


def norm_rope_heads(q: Queue, program, heads: int, T: int, y, y_stride: int, norms, eps, cache: dict) -> Command:
    """After gemv_norm_rope_kv built with QK_NORM: each of the `heads` heads of q and k of T rows RMS-normalized by
    `norms`, then turned by RoPE, q in y and k into the cache (`cache`: the KV cache and position arguments)."""
    return SIGNATURES["norm_rope_heads"].bind(q, program, (heads, T), None, y=y, y_stride=np.int32(y_stride),
                                              norms=norms, eps=eps, **cache)


def qkv_attention(q: Queue, program, t: DeviceTensor, n_kv_heads: int, x, g, y, eps: float, cache: dict,
                  att, att_out, n_heads: int, x_stride: int, q_stride: int) -> Command:
    """Decode's QKV projection with attention in the same launch, a single work-item per KV head (its scratch
    goes unused: built with SOLO)."""
    return SIGNATURES["qkv_attention"].bind(
        q, program, (n_kv_heads, 1), (1, 1), **t.args(), x=x, g=g, y=y,
        **ints(rows=t.rows, cols=t.cols, cols_p=t.cols_p, T=1, x_stride=x_stride, y_stride=q_stride),
        eps=np.float32(eps), **cache, att=att, att_out=att_out, **ints(n_heads=n_heads, out_stride=q_stride),
        scratch=Local(4), scratch_ss=Local(4), row=Local(t.row_bytes(1) if t.once[1] else 4), att_scratch=Local(4))


def layers(q: Queue, program, weights, parts, first: int, count: int, L, T: int, phases: int, x, query, att,
           att_parts, att_out, h, dim_p: int, q_p: int, hidden_p: int, eps, cache: dict, n_heads: int,
           counters) -> Command:
    """Layers first .. first + count - 1 of a pass over T rows in one launch, the first `phases` phases of each
    (matrix.cl's layers, a work-group per compute unit, at most one per CPU this process may run on: the device is
    this host's CPU, and work-groups that share a CPU would wait out each other's time slices at every phase's end):
    their arrays in `weights` where the rows of `parts` say, L the first one's DeviceLayer (its shapes and
    programs those of all), `cache` the KV cache and position arguments with the first one's cache_offset."""
    units = min(q.device.compute_units, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count() or 1)
    tensors = (L.wqkv, L.wo, L.w13, L.w2)
    used, tokens = tensors[:phases - 1], L.wqkv.geometry.tokens(T)      # the matrices its phases multiply by
    # a phase's tasks: its groups of rows, each in shares of the matrix's tiles, a few tasks per work-group in all, so
    # that the work-groups end each phase together (a group of rows is prepared by each work-group that takes a share)
    groups = -(-T // tokens)
    shares = min(-(-4 * units // groups), min(-(-t.rows // L.wqkv.geometry.tile_rows) for t in used))
    return SIGNATURES["layers"].bind(
        q, program, (units, 1), (1, 1), weights=weights.read(), parts=parts.read(), x=x, query=query, att=att,
        att_parts=att_parts, att_out=att_out, h=h,
        **ints(first=first, count=count, T=T, dim=L.wo.rows, hidden=L.w2.cols, dim_p=dim_p, q_p=q_p,
               hidden_p=hidden_p, cp_qkv=L.wqkv.cols_p, cp_o=L.wo.cols_p, cp_f=L.w13.cols_p, cp_d=L.w2.cols_p,
               n_heads=n_heads, shares=shares, phases=phases),
        eps=eps, **cache, counters=counters,
        scratch=Local(4), scratch_ss=Local(4), row=Local(max(t.row_bytes(tokens) for t in used)))


def cache_spans(geo: Geometry, seq_p: int) -> int:
    """Spans of attention_span positions in a cache of seq_p positions (attention.h's PART_SPANS)."""
    return -(-seq_p // geo.attention_span)


def split_spans(q: Queue, geo: Geometry, T: int, seq_p: int) -> int:
    """Work-groups per key/value head and row of attention.cl's kernel: one per span of the cache (attention.h) in
    passes of up to SPLIT_ROWS rows on a CPU (work-groups of one work-item, whose atomics order the spans' sums
    before their fold), so that a long row's spans share the cores; else 1, a row's spans in turn."""
    split = geo.attention == 1 and T <= SPLIT_ROWS and q.device.type == "cpu"
    return cache_spans(geo, seq_p) if split else 1


def attention(q: Queue, program, geo: Geometry, T: int, query, k_cache, v_cache, att, out, state, n_heads: int,
              n_kv_heads: int, head_dim: int, seq_p: int, q_stride: int, cache_offset: int, slot_stride: int, parts,
              folds) -> Command:
    """Causal attention of T query rows over the cache, a work-group per head and token, or with work-groups of one
    work-item (geo.attention 1, a program built with GQA) per key/value head and token, or per key/value head, span
    and token (split_spans; parts and folds: the spans' sums and counts), rows placed as attention.h's ROW_POS says:
    a sequence's with slot_stride 0, a batch's by their table."""
    A = geo.attention
    groups = n_kv_heads * split_spans(q, geo, T, seq_p) if A == 1 else n_heads * A
    return SIGNATURES["attention"].bind(
        q, program, (groups, T), (A, 1), query=query, k_cache=k_cache, v_cache=v_cache, att=att, out=out,
        state=state, **ints(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, seq_p=seq_p,
                            q_stride=q_stride, out_stride=q_stride, cache_offset=cache_offset,
                            slot_stride=slot_stride),
        scratch=Local(A * 4), parts=parts, folds=folds)


DRAW_PARAMS = 9     # floats of a row's draw parameters (Llama.draw_params; sampling.cl's DRAW_PARAMS)


def draw_items(geo: Geometry) -> int:
    """Work-items of a draw's work-group (sampling.cl): one where the config's work-groups are single work-items
    (CPUs: the program is built with SOLO, its barriers compile away), else the config's reduce."""
    return 1 if geo.gemv == 1 else geo.reduce


def draw_defines(emb: DeviceTensor) -> tuple[str, ...]:
    """sampling.cl's defines: the embedding table's format (choose_embed embeds), and SOLO for single work-items."""
    return (*emb.defines[1], *(("SOLO",) if draw_items(emb.geometry) == 1 else ()))


def choose_embed(q: Queue, emb: DeviceTensor, logits, tokens, state, draw, x, vocab_size: int, cand) -> Command:
    """Decoding's step on the device by one work-group: the token drawn from the logits by `draw`'s parameters
    (greedy or sampled: sampling.cl) becomes the next token, whose embedding row goes into x for the pass after.
    A sampled draw leaves the row as exp((l - max) / T) and uses cand (2 round_up(vocab_size, 16) floats)."""
    R = draw_items(emb.geometry)
    return SIGNATURES["choose_embed"].bind(
        q, q.program("sampling.cl", *draw_defines(emb)), (R,), (R,), logits=logits.read_write(),
        tokens=tokens.read_write(), state=state.read_write(), n=np.int32(vocab_size), draw=draw.read(), **emb.args(),
        x=x.write(), **ints(cols=emb.cols, cols_p=emb.cols_p), cand=cand.read_write(), best=Local(R * 4),
        best_i=Local((R + 1) * 4))     # best_i[R]: the candidates' count


def choose_rows(q: Queue, emb: DeviceTensor, logits, m: int, vocab_size: int, stride: int, draws, window, W: int,
                fed, chosen, cand) -> Command:
    """chosen[r] = the token drawn from logits row r by draws[DRAW_PARAMS r ..] (greedy or sampled, after the
    penalties over window[W r ..], whose ids -1 - i are fed[i]; -1: not all finite; skipped: a negative temperature),
    r < m, a work-group per row; the rows are `stride` floats apart, a multiple of 16 (they are read as 16-float
    vectors), and cand holds 2 stride floats a row."""
    R = draw_items(emb.geometry)
    return SIGNATURES["choose_rows"].bind(
        q, q.program("sampling.cl", *draw_defines(emb)), (R, m), (R, 1), logits=logits.read_write(),
        **ints(n=vocab_size, stride=stride), draws=draws.read(), window=window.read(), W=np.int32(W),
        fed=fed.read(), chosen=chosen.write(), cand=cand.read_write(), best=Local(R * 4), best_i=Local((R + 1) * 4))


def gather_rows(q: Queue, program, x, rows, first: int, count: int, n: int) -> Command:
    """x[i] = x[rows[first + i]], i < count (rows of n floats; the rows increasing)."""
    return SIGNATURES["gather_rows"].bind(q, program, (64,), None, x=x.read_write(), rows=rows.read(),
                                          **ints(first=first, count=count, n=n))


def advance(q: Queue, program, state, n: int) -> Command:
    """The position moves on n tokens."""
    return SIGNATURES["advance"].bind(q, program, (1,), None, state=state.read_write(), n=np.int32(n))
