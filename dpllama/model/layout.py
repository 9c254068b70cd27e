"""The device layout of the weights: how a matrix is packed for the matrix kernels, and the geometry of
their launches.

A matrix goes up in its storage format (f32, q8, int4 or int5 with per-group scales and mins), cut into tiles
of `tile_rows` rows; inside a tile the `tile_rows` values of one column (one packed word for int4) lie side by
side, so that one vector load fetches that column for the whole tile (cl_kernels/weights.h says the
same from the kernel's side). Several matrices with the same input become one (`fuse_rows`),
so that one launch computes them all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpllama.formats import round_up
from dpllama.model.quant import widen
from dpllama.model.weights import Tensor, x_steps
from dpllama.runtime import Buffer, DeviceConfig, Queue


def pow2_divisor(n: int, limit: int = 16) -> int:
    """The largest power of two <= limit that divides n (a vector width for n elements)."""
    v = 1
    while v < limit and n % (2 * v) == 0:
        v *= 2
    return v


@dataclass(frozen=True)
class Geometry:
    """The launch geometry a device config's `work_group` section asks for; each field is the YAML key of the
    same name (docs/CONFIG.md), and the kernels' define of the same name in capitals where they take one."""
    gemv: int                   # work-items splitting one row tile's columns
    tile_rows: int              # rows per tile: the vector lanes of a matrix kernel's work-item
    reduce: int                 # work-items of single work-group reductions (the greedy argmax)
    attention: int              # work-items per head and token in attention
    attention_positions: int    # key positions per score vector
    decode_tiles: int           # row tiles per work-group when decoding
    prefill_tokens: int         # prompt tokens per work-group in prefill
    prefill_tiles: int          # row tiles per work-group in prefill
    prefill_chunk: int          # prompt tokens per forward pass
    decode_rows: int = 1        # passes of up to this many rows run decode's kernels (a work-group per row)
    matrix_groups: int = 2      # gemv 1: a matrix launch's work-groups per compute unit (over its groups of input rows)
    key_block: int = 0          # the KV cache's keys in blocks of this many positions (0: one block; attention.h)
    attention_span: int = 512   # attention 1: a row's positions in spans of this many (attention.h's ATT_SPAN)
    decode_prefetch: int = 128  # columns ahead that decode's matrix kernels prefetch a tile's weights (x86)
    prefill_prefetch: int = 512  # the same in passes of several rows (matrix.cl's PREFETCH_COLS)

    @classmethod
    def of(cls, config: DeviceConfig) -> "Geometry":
        return cls(**config["work_group"])

    def tokens(self, T: int) -> int:
        """Input rows per work-group (a group of rows, which shares each weight's decoding) for a pass over T rows:
        1 for up to decode_rows rows (decode's kernels, a work-group per row); past them the smallest power of two
        that holds T, up to prefill_tokens. So a batch of a few rows (a server's few decode steps) decodes each
        weight once for all of them and computes few padding rows."""
        if T <= max(1, self.decode_rows):
            return 1
        n = 2
        while n < T and n < self.prefill_tokens:
            n *= 2
        return min(n, self.prefill_tokens)

    def token_counts(self) -> list[int]:
        """Every value tokens() takes: the matrix programs built for each model."""
        return sorted({self.tokens(T) for T in range(1, self.prefill_tokens + 1)} | {self.prefill_tokens})

    def tiles(self, tokens: int) -> int:
        """Row tiles per work-group for `tokens` tokens per work-group."""
        return self.decode_tiles if tokens == 1 else self.prefill_tiles

    def prefetch(self, tokens: int) -> int:
        """Columns ahead that the matrix kernels prefetch weights with `tokens` tokens per work-group."""
        return self.decode_prefetch if tokens == 1 else self.prefill_prefetch


def fuse_rows(tensors: list[Tensor], block: int = 0) -> Tensor:
    """One matrix from several with the same columns, so one launch computes them all: stacked, or
    with `block`, alternating blocks of `block` rows of each (each padded with zero rows to whole
    blocks; gemv_norm_swiglu wants a block of gate rows, then the up rows of the same outputs).
    Mixed formats (a GGUF's _M and _S files mix them per tensor) meet in the narrowest one that holds each
    exactly (`widen`)."""
    tensors = widen(tensors)

    def join(arrays):
        if not block:
            return np.concatenate(arrays)
        padded = np.stack([_pad_rows(a, block) for a in arrays])          # [n, rows_p, ...]
        n, rows_p = padded.shape[:2]
        blocks = padded.reshape(n, rows_p // block, block, *padded.shape[2:]).swapaxes(0, 1)
        return blocks.reshape(n * rows_p, *padded.shape[2:])
    t0 = tensors[0]
    rows = sum(t.rows for t in tensors) if not block else len(tensors) * round_up(t0.rows, block)
    return Tensor(t0.kind, rows, t0.cols, join([t.data for t in tensors]),
                  None if t0.scales is None else join([t.scales for t in tensors]),
                  None if t0.mins is None else join([t.mins for t in tensors]), t0.group)


def _pad_rows(a: np.ndarray, multiple: int) -> np.ndarray:
    pad = -a.shape[0] % multiple
    return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a


def tile(a: np.ndarray, tile_rows: int) -> np.ndarray:
    """[rows, n] -> tiles of `tile_rows` rows, inside a tile the values of each column side by side."""
    a = _pad_rows(a, tile_rows)
    return np.ascontiguousarray(a.reshape(-1, tile_rows, a.shape[1]).swapaxes(1, 2))


# q8 columns in the order the matrix kernels read them: of each 8, word 0 takes 0 1 4 5 and word 1 takes 2 3 6 7
Q8_ORDER = np.array([0, 1, 4, 5, 2, 3, 6, 7])


def q8_words(q: np.ndarray) -> np.ndarray:
    """int8 [rows, cols_p] -> uint32 [rows, cols_p / 4]: 4 columns a word, as bytes q + 128 (the kernels' header)."""
    rows, cols_p = q.shape
    b = q.reshape(rows, cols_p // 8, 8)[:, :, Q8_ORDER].view(np.uint8) ^ np.uint8(0x80)
    return np.ascontiguousarray(b).reshape(rows, cols_p).view("<u4")


def int5_words(data: np.ndarray) -> np.ndarray:
    """An int5 Tensor's data, uint32[rows, cols_p / 32 * 5] -> the same with every word of fifth bits permuted
    as the matrix kernels read it (weights.h): the bit of column 8j + 2b + p (j, b < 4, p < 2) of the 32 moves
    from bit 8j + 2b + p to bit 8b + 2j + p, which swaps the 2-bit fields j and b of the bit index (two
    delta swaps: index bit 4 with bit 2, then bit 3 with bit 1)."""
    words = data.reshape(data.shape[0], -1, 5).copy()
    h = words[:, :, 4]
    for shift, mask in ((12, 0x0000F0F0), (6, 0x00CC00CC)):     # the bits whose index has bit a = 0, bit b = 1
        d = ((h >> np.uint32(shift)) ^ h) & np.uint32(mask)
        h ^= d ^ (d << np.uint32(shift))
    words[:, :, 4] = h
    return words.reshape(data.shape)


def weight_defines(t: Tensor, geometry: Geometry, tokens: int, activation_bits: int = 16,
                   once: bool = False) -> tuple[str, ...]:
    """The matrix program's defines for `t`'s format, the input's width and a launch geometry with `tokens` tokens
    per work-group; `once`: work-groups of one work-item, each preparing its input rows once (X_ONCE)."""
    fmt = ("W_F32",) if t.kind == "f32" else (
        (f"W_{t.kind.upper()}", f"GROUP={t.group}") + (("ASYM",) if t.mins is not None else ())
        + (("SCALES_F32",) if t.scales.dtype == np.float32 else ())
        + (("X_BYTES",) if x_steps(t.kind, activation_bits) == 127 else ()))
    return fmt + (f"TILE_ROWS={geometry.tile_rows}", f"TILES={geometry.tiles(tokens)}", f"TOKENS={tokens}",
                  f"PREFETCH_COLS={geometry.prefetch(tokens)}") + (("X_ONCE",) if once else ())


def upload_array(q: Queue, a: np.ndarray | None, name: str) -> Buffer:
    """`a` in a buffer of its own, or for None 4 bytes nothing reads (a kernel argument that must be a buffer)."""
    return q.buffer(host=a, name=name) if a is not None else q.buffer(4, name=name)


class Arena:
    """A layer's arrays (its matrices' parts, norms and biases) on their way into a buffer that a run of layers
    shares (`upload`), which matrix.cl's `layers` kernel takes whole, with a table of where each array starts. Each
    array starts at an offset aligned for a sub-buffer (Queue.align), so the other kernels take it as a buffer of
    its own (`region`)."""

    def __init__(self, q: Queue):
        self.q = q
        self.entries: list[tuple[int, int, str]] = []       # each array's offset in the arena, size and name
        self.arrays: list[np.ndarray | None] = []           # the arrays, until uploaded
        self.nbytes = 0
        self.base = 0                                       # where the arena starts in the shared buffer, once
        self.regions: list[Buffer] = []                     # uploaded, and each array's sub-buffer of it

    def add(self, a: np.ndarray | None, name: str) -> int:
        """Place `a` (None: 4 bytes nothing reads, for a kernel argument that must be a buffer); its handle."""
        offset, size = round_up(self.nbytes, self.q.align), 4 if a is None else a.nbytes
        self.entries.append((offset, size, name))
        self.arrays.append(a)
        self.nbytes = offset + size
        return len(self.entries) - 1

    def offset(self, handle: int) -> int:
        """Where the array starts in the shared buffer, in bytes."""
        return self.base + self.entries[handle][0]

    def region(self, handle: int) -> Buffer:
        """The array as a buffer of its own (a sub-buffer of the shared one)."""
        return self.regions[handle]

    @staticmethod
    def size(arenas: list[Arena]) -> int:
        """The bytes of the buffer that `upload` makes for `arenas`, each where the one before ends, aligned."""
        end = 0
        for arena in arenas:
            end = round_up(end, arena.q.align) + arena.nbytes
        return end

    @staticmethod
    def upload(arenas: list[Arena], name: str) -> Buffer:
        """One buffer holding every array of `arenas`, in order, and each array's sub-buffer."""
        q, end = arenas[0].q, 0
        for arena in arenas:
            arena.base = round_up(end, q.align)
            end = arena.base + arena.nbytes
        # copied in whole as the buffer is made: arrays written into it one by one (clEnqueueWriteBuffer at their
        # offsets) were taken for uninitialized by Oclgrind where kernels read them through the whole buffer
        host = np.zeros(end, np.uint8)
        for arena in arenas:
            for (offset, size, _), a in zip(arena.entries, arena.arrays):
                if a is not None:
                    start = arena.base + offset
                    host[start:start + size] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            arena.arrays = []
        buffer = q.buffer(host=host, name=name)
        for arena in arenas:
            arena.regions = [buffer.region(arena.base + offset, size, n) for offset, size, n in arena.entries]
        return buffer


class DeviceTensor:
    """A weight matrix on the device in the tiled layout, and the defines of the programs that read it, by
    tokens per work-group (Geometry.tokens: 1 to decode, up to `prefill_tokens` in prefill and batches)."""

    def __init__(self, q: Queue, t: Tensor, name: str, geometry: Geometry, defines: tuple[str, ...] = (),
                 activation_bits: int = 16, arena: Arena | None = None):
        """`defines`: the programs' own besides the format's and geometry's (QKV_BIAS for a biased Wqkv);
        `activation_bits`: 8 has int4 and int5 programs take x as bytes (matrix.cl's X_BYTES); `arena`: its arrays
        go there, and its buffers come once the arena is uploaded (`place`), not now."""
        if t.kind == "q8" and t.group % 8:
            # the kernels read a q8 group as whole 8-column blocks; a smaller group (llama2.c v2 files of widths
            # not a multiple of 8: stories260K's is 4) goes up as float32, the same values in 4x the memory
            t = Tensor.f32(t.dequantize())
        data = t.data
        cols_p = round_up(t.cols, 8) if t.kind == "f32" else t.cols_padded
        if t.kind == "f32" and cols_p != t.cols:      # kernels read 8-wide blocks
            data = np.zeros((t.rows, cols_p), np.float32)
            data[:, :t.cols] = t.data
        if t.kind == "q8":
            data = q8_words(data)
        elif t.kind == "int5":
            data = int5_words(data)
        self.rows, self.cols, self.cols_p = t.rows, t.cols, cols_p
        self.nbytes = t.nbytes
        self.geometry = geometry
        g = geometry.tile_rows
        parts = [(f"{name}.{part}" if a is not None else f"{name}.{part}-unused",
                  tile(a.view(np.uint16) if a.dtype == np.float16 else a, g) if a is not None else None)
                 for part, a in (("data", data), ("scales", t.scales), ("mins", t.mins))]
        if arena is None:
            self.buffers = [upload_array(q, a, n) for n, a in parts]
        else:
            self.handles = [arena.add(a, n) for n, a in parts]      # data, scales, mins
        self.q = q
        # Where work-groups are single work-items (CPUs), a launch has matrix_groups of them per compute unit (spread
        # over its groups of input rows), each preparing its rows once into local memory and taking an equal share
        # of the tiles (matrix.cl's X_ONCE), if those rows fit in half the local memory; else a work-group per
        # `tiles` tiles
        self.once = {n: geometry.gemv == 1 and self.row_bytes(n) <= q.device.local_mem_size // 2
                     for n in geometry.token_counts()}
        self.defines = {n: weight_defines(t, geometry, n, activation_bits, self.once[n]) + defines
                        for n in geometry.token_counts()}

    def place(self, arena: Arena) -> None:
        """Take its buffers from `arena`, uploaded."""
        self.buffers = [arena.region(h) for h in self.handles]

    def row_bytes(self, tokens: int) -> int:
        """Local memory for the `tokens` input rows an X_ONCE work-group prepares (at most cols_p + 1 ints a row)."""
        return tokens * (self.cols_p + 1) * 4

    def program(self, tokens: int):
        """The matrix program for `tokens` tokens per work-group (Llama builds them all at once, with progress)."""
        return self.q.program("matrix.cl", *self.defines[tokens])

    def args(self) -> dict:
        """The weight's arguments, by the kernels' names for them."""
        return dict(zip(("w_", "s_", "m_"), (b.read() for b in self.buffers)))
