"""Loaders (llama2.c, GGUF, dpllama container) and the quantization formats they produce."""
from __future__ import annotations

import dataclasses
import re
import struct

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from dpllama.errors import DpllamaError
from dpllama.formats import round_up
from dpllama.formats.gguf import read_gguf
from dpllama.formats.llama2c import MAGIC
from dpllama.model.gguf import load_gguf, write_dpllama_gguf
from dpllama.model.llama2c import load_llama2c, write_llama2c
from dpllama.model.quant import GGUF_REPACK, quantize_int4, quantize_q8, widen
from dpllama.model.weights import Tensor, Weights
from tests.helpers import (EVERY_TYPE, EVERY_TYPE_SHAPE, QWEN_TENSORS, TOKENIZER_FIELDS, gguf_tensor, llama2c_dir,
                           qwen_gguf_path, random_gguf_blocks, random_llama2c, random_weights, smollm2_gguf_path,
                           write_test_gguf)

RNG = np.random.default_rng(1)


def assert_same_matrices(a, b):
    """Every matrix of Weights `a` and `b` stored identically (kind, group, arrays)."""
    for (name, x), (_, y) in zip(a.matrices(), b.matrices(), strict=True):
        assert (x.kind, x.rows, x.cols, x.group) == (y.kind, y.rows, y.cols, y.group), name
        for field in ("data", "scales", "mins"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None) and (u is None or np.array_equal(u, v)), f"{name}.{field}"


def gguf_config(c):
    """`c` as GGUF stores it: norm_eps is a float32 there."""
    return dataclasses.replace(c, norm_eps=float(np.float32(c.norm_eps)))


def assert_same_norms(a, b):
    assert np.array_equal(a.norm, b.norm)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert np.array_equal(x.attn_norm, y.attn_norm) and np.array_equal(x.ffn_norm, y.ffn_norm)


# ---------------------------------------------------------------- quantization formats

# GGUF type -> the device format it loads as: kind, group, asymmetric, scale type (docs/ARCHITECTURE.md's table)
DEVICE_FORMAT = {T.Q4_0: ("int4", 32, False, np.float16), T.Q4_1: ("int4", 32, True, np.float16),
                 T.Q5_0: ("int5", 32, False, np.float16), T.Q5_1: ("int5", 32, True, np.float16),
                 T.Q8_0: ("q8", 32, False, np.float32), T.Q2_K: ("int4", 16, True, np.float32),
                 T.Q3_K: ("int4", 16, False, np.float32), T.Q4_K: ("int4", 32, True, np.float32),
                 T.Q5_K: ("int5", 32, True, np.float32), T.Q6_K: ("q8", 16, False, np.float32),
                 T.IQ4_NL: ("q8", 32, False, np.float32), T.IQ4_XS: ("q8", 32, False, np.float32)}
# the types gguf-py can also quantize (real blocks from real values, besides random bytes)
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def format_of(t):
    return t.kind, t.group, t.mins is not None, t.scales.dtype.type


def test_every_gguf_type_has_a_device_format():
    assert set(GGUF_REPACK) == set(DEVICE_FORMAT)


@pytest.mark.parametrize("ggml_type", list(DEVICE_FORMAT), ids=lambda t: t.name)
def test_gguf_blocks_repack_losslessly(ggml_type):
    """Every type's blocks, random bytes with valid fp16 scales (every level, high bit and sub-block scale
    pattern), and for the types gguf-py quantizes, blocks of real values with an all-zero block: the loaded
    Tensor dequantizes to exactly gguf's NumPy dequantization."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    rows, cols = 6, 3 * max(block, 32)
    sources = [random_gguf_blocks(RNG, ggml_type, rows, cols)]
    if ggml_type in QUANTIZABLE:
        w = RNG.standard_normal((rows, cols)).astype(np.float32)
        w[1, 32:64] = 0
        sources.append(quantize(w, ggml_type))
    for blocks in sources:
        t = GGUF_REPACK[ggml_type](blocks, rows, cols)
        assert format_of(t) == DEVICE_FORMAT[ggml_type]
        assert t.data.shape == (rows, {"int4": cols // 8, "int5": cols // 32 * 5, "q8": cols}[t.kind])
        assert np.array_equal(t.dequantize(), dequantize(blocks, ggml_type))


def iq4_extreme_blocks(ggml_type) -> np.ndarray:
    """uint8[8, bytes of 256 weights] of `ggml_type` (IQ4_NL or IQ4_XS): its nibbles every byte 0..255 (every
    pair of levels), IQ4_XS's sub-block scales ls 0..63 (block r: 8r .. 8r + 7), the fp16 d of the blocks in turn
    0, -0, the smallest subnormal, -1.5, inf (times ls - 32 = 0: NaN), 65504, NaN, -inf."""
    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    raw = np.zeros((8, 256 // block, nbytes), np.uint8)
    d = np.array([0, -0.0, 2 ** -24, -1.5, np.inf, 65504, np.nan, -np.inf], np.float16)
    raw[:, :, 0:2] = np.resize(d, raw.shape[:2])[:, :, None].view(np.uint8)
    qs = raw[:, :, 2:] if ggml_type == T.IQ4_NL else raw[:, :, 8:]
    qs[:] = np.resize(np.arange(256, dtype=np.uint8), qs.shape)
    if ggml_type == T.IQ4_XS:           # low 4 bits two a byte, then high 2 bits in a uint16, sub-block j at bit 2j
        ls = np.arange(64, dtype=np.uint16).reshape(8, 1, 8)
        raw[:, :, 4:8] = (ls[:, :, 0::2] & 15) | ((ls[:, :, 1::2] & 15) << 4)
        high = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=2, dtype=np.uint16)
        raw[:, :, 2:4] = high.astype("<u2")[:, :, None].view(np.uint8)
    return raw.reshape(8, -1)


@pytest.mark.parametrize("ggml_type", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_iq4_extreme_blocks_repack_bit_for_bit(ggml_type):
    """IQ4's every level and every sub-block scale, with zero, negative, huge and non-finite d: the loaded Tensor's
    values are gguf's bit for bit (d (ls - 32) in float32 before the level, as gguf multiplies; NaN for NaN)."""
    blocks = iq4_extreme_blocks(ggml_type)
    with np.errstate(invalid="ignore"):
        got, want = GGUF_REPACK[ggml_type](blocks, 8, 256).dequantize(), dequantize(blocks, ggml_type)
    assert np.isnan(want).any() and np.isinf(want).any()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_real_q4_k_m_tensors_repack_losslessly():
    """Qwen2.5-Coder-0.5B Q4_K_M's tensors of each quantized type it holds (the file's architecture is another
    matter: the tensors are read through the format's parser alone)."""
    g = read_gguf(qwen_gguf_path())
    for ggml_type, name in QWEN_TENSORS.items():
        raw = g.tensors[name]
        assert raw.type == ggml_type, name
        t = GGUF_REPACK[ggml_type](raw.data, *raw.shape)
        assert format_of(t) == DEVICE_FORMAT[ggml_type], name
        assert np.array_equal(t.dequantize(), dequantize(raw.data.reshape(raw.shape[0], -1), ggml_type)), name


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.IQ4_XS], ids=lambda t: t.name)
@pytest.mark.filterwarnings("error")     # the refusal is the one line, no NumPy warning on the way
def test_k_quant_block_scales_are_checked(ggml_type):
    """A K-quant's (and IQ4_XS's) fp16 d is multiplied into its float32 scales: a NaN or infinity there is a
    one-line error."""
    from dpllama.model.weights import check_values
    blocks = random_gguf_blocks(RNG, ggml_type, 2, 256)
    blocks[1, 0:2] = np.array([np.inf], np.float16).view(np.uint8)
    blocks[1, 4] = 1                    # the first sub-block's scale sc = 1 (Q4_K), ls - 32 != 0 (IQ4_XS): not NaN
    blocks[1, 5] = 0                    # Q4_K's second sub-block's scale 0: inf times 0, NaN (after the inf)
    with pytest.raises(DpllamaError, match=r"^f: tensor w has scale -?inf at \[1, 0\]: expected finite values"):
        check_values("f", "w", GGUF_REPACK[ggml_type](blocks, 2, 256))


# pairs of formats that fused matrices (Q, K, V; gate and up) may meet in, and the format `widen` gives both
WIDEN = [((T.Q4_0, T.Q4_1), ("int4", 32, True, np.float16)), ((T.Q4_0, T.Q4_K), ("int4", 32, True, np.float32)),
         ((T.Q4_K, T.Q2_K), ("int4", 16, True, np.float32)), ((T.Q3_K, T.Q4_0), ("int4", 16, False, np.float32)),
         ((T.Q5_0, T.Q6_K), ("q8", 16, False, np.float32)), ((T.Q8_0, T.Q5_1), ("q8", 32, True, np.float32)),
         ((T.Q4_0, T.Q8_0), ("q8", 32, False, np.float32)), ((T.Q3_K, T.Q5_K), ("q8", 16, True, np.float32)),
         ((T.Q4_1, T.F16), ("f32", 0, False, None)),
         # int5 meets 4 bits in int5 (group 32), 8 bits or groups of 16 in q8: Qwen2.5-Coder Q4_K_M's attn_v is
         # Q8_0 in half the layers, beside Q5_0 attn_q and attn_k
         ((T.Q5_0, T.Q4_0), ("int5", 32, False, np.float16)), ((T.Q5_0, T.Q4_1), ("int5", 32, True, np.float16)),
         ((T.Q5_1, T.Q4_K), ("int5", 32, True, np.float32)), ((T.Q5_0, T.Q5_K), ("int5", 32, True, np.float32)),
         ((T.Q5_0, T.Q8_0), ("q8", 32, False, np.float32)), ((T.Q5_1, T.Q2_K), ("q8", 16, True, np.float32)),
         # IQ4_NL and IQ4_XS load as q8 g32: the 8-bit rules
         ((T.IQ4_XS, T.IQ4_NL), ("q8", 32, False, np.float32)), ((T.IQ4_XS, T.Q4_K), ("q8", 32, True, np.float32)),
         ((T.IQ4_NL, T.Q5_0), ("q8", 32, False, np.float32)), ((T.IQ4_XS, T.Q6_K), ("q8", 16, False, np.float32))]


@pytest.mark.parametrize("types, want", WIDEN, ids=lambda v: "-".join(t.name for t in v) if isinstance(v[0], T) else "")
def test_widen_is_lossless(types, want):
    tensors = [Tensor.f32(RNG.standard_normal((5, 256))) if t == T.F16 else gguf_tensor(RNG, t, 5, 256)
               for t in types]
    for before, after in zip(tensors, widen(tensors), strict=True):
        got = (after.kind, after.group, after.mins is not None, None if after.scales is None else after.scales.dtype)
        assert got == want
        assert np.array_equal(after.dequantize(), before.dequantize())


def int4_test_matrix(source: str) -> np.ndarray:
    """[rows, 172] (not a multiple of any group size): random with an offset row and an all-zero row,
    or stories260K's real layers.0.w2 [64, 172] with an all-zero row put in."""
    if source == "random":
        w = RNG.standard_normal((7, 172)).astype(np.float32) * 0.05
        w[2] += 3.0                         # an offset row: large min, small range
    else:
        w = np.array(load_llama2c(llama2c_dir() / "stories260K.bin").layers[0].w2.data, np.float32)
    w[3] = 0                                # an all-zero row dequantizes to exact zeros
    return w


@pytest.mark.parametrize("source", ["random", "stories260K"])
@pytest.mark.parametrize("group", [32, 64, 128, 24])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_int4_error_bounds_and_padding(group, symmetric, source):
    w = int4_test_matrix(source)
    rows, cols = w.shape
    t = quantize_int4(w, group, symmetric)
    cols_p = round_up(cols, group)
    assert t.data.shape == (rows, cols_p // 8) and t.data.dtype == np.uint32
    assert t.scales.shape == (rows, cols_p // group) and t.scales.dtype == np.float16
    assert (t.mins is None) == symmetric
    err = np.abs(t.dequantize() - w)
    assert not err[3].any()
    q = ((t.data[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 0xF).reshape(rows, cols_p)
    s = np.repeat(np.abs(t.scales.astype(np.float32)), group, axis=1)
    eps = 1e-6 * (np.abs(w) + 1)            # float32 arithmetic
    if symmetric:
        assert (q[:, cols:] == 8).all()     # padding holds exact zeros
        assert (err <= s[:, :cols] + eps).all()           # clamped opposite-sign values: <= |scale|
        inner = (q[:, :cols] > 0) & (q[:, :cols] < 15)    # the rest: <= |scale| / 2
        assert (err[inner] <= s[:, :cols][inner] / 2 + eps[inner]).all()
    else:
        padded = np.concatenate([w, np.zeros((rows, cols_p - cols), np.float32)], axis=1)
        lo = padded.reshape(rows, -1, group).min(axis=2)
        hi = padded.reshape(rows, -1, group).max(axis=2)
        bound = np.repeat(t.scales.astype(np.float32) / 2 + 2.0 ** -11 * (np.abs(lo) + hi - lo), group, axis=1)
        assert (err <= bound[:, :cols] + eps).all()


def test_quantize_q8_error_bound():
    w = RNG.standard_normal((5, 172)).astype(np.float32)
    t = quantize_q8(w, 32)
    assert t.data.shape == (5, 192) and t.scales.dtype == np.float32 and not t.data[:, 172:].any()
    s = np.repeat(t.scales, 32, axis=1)[:, :172]
    assert (np.abs(t.dequantize() - w) <= s / 2 * (1 + 1e-6)).all()


def test_quantize_rejects_bad_groups():
    with pytest.raises(DpllamaError, match="int4 group size must be a positive multiple of 8, found 12"):
        quantize_int4(np.zeros((2, 24), np.float32), 12)
    with pytest.raises(DpllamaError, match="q8 group size must be positive, found 0"):
        quantize_q8(np.zeros((2, 24), np.float32), 0)


# ---------------------------------------------------------------- llama2.c

@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_round_trip(tmp_path, version, shared):
    path = tmp_path / "model.bin"
    w = random_llama2c(path, version=version, shared=shared, seed=version)
    got = load_llama2c(path)
    assert got.config == w.config and got.tied == shared
    assert got.meta == {"format": "llama2c", "version": version, "path": str(path)}
    assert_same_norms(got, w)
    if version < 2:
        assert_same_matrices(got, w)
        assert not got.layers[1].w2.data.flags.owndata      # a view into the memory map, not a copy
    else:   # default group: largest power of two <= 64 dividing dim 32 and hidden 48
        for (name, q), (_, f) in zip(got.matrices(), w.matrices(), strict=True):
            expected = quantize_q8(f.data, 16)
            assert q.kind == "q8" and q.group == 16, name
            assert np.array_equal(q.data, expected.data) and np.array_equal(q.scales, expected.scales), name


def test_llama2c_v2_rewrite_keeps_q8_as_is(tmp_path):
    random_llama2c(tmp_path / "a.bin", version=2, group_size=8)
    write_llama2c(tmp_path / "b.bin", load_llama2c(tmp_path / "a.bin"), version=2, group_size=8)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_llama2c_stories260k(tmp_path):
    w = load_llama2c(llama2c_dir() / "stories260K.bin")
    c = w.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert w.tied and w.layers[0].wk.data.shape == (32, 64) and w.layers[4].w2.data.shape == (64, 172)
    write_llama2c(tmp_path / "v1.bin", w, version=1)
    assert_same_matrices(load_llama2c(tmp_path / "v1.bin"), w)
    with pytest.raises(DpllamaError, match=r"layers\.0\.w2 rows of 172 are not a multiple of the Q8_0 group "
                                           r"size 64"):
        write_llama2c(tmp_path / "v2.bin", w, version=2, group_size=64)
    assert list(tmp_path.iterdir()) == [tmp_path / "v1.bin"]      # nothing half-written left behind


def _legacy_header(dim=32, hidden=48, layers=2, heads=4, kv_heads=2, vocab=40, seq_len=16) -> bytes:
    return struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len)


@pytest.mark.parametrize("header, message", [
    (_legacy_header(dim=30), "dim 30 is not a multiple of n_heads 4"),
    (_legacy_header(kv_heads=3), "n_heads 4 is not a multiple of n_kv_heads 3"),
    (_legacy_header(dim=12, heads=4), "head_dim 3 is odd"),
    (_legacy_header(layers=0), "n_layers must be positive, found 0"),
    (_legacy_header(vocab=0), "vocab_size must be positive, found 0"),
    (struct.pack("<Ii", MAGIC, 3) + bytes(248), "unknown llama2.c checkpoint version 3 (expected 1 or 2)"),
    (b"GGUF" + bytes(60), "this is a GGUF file, not a llama2.c checkpoint"),
    (_legacy_header()[:10], "truncated llama2.c checkpoint: expected at least 28 bytes, found 10"),
    (b"", "truncated llama2.c checkpoint: expected at least 4 bytes, found 0"),
    (struct.pack("<Ii", MAGIC, 1) + _legacy_header()[:20], "expected at least 256 bytes, found 28"),
])
def test_llama2c_bad_headers(tmp_path, header, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(header)
    with pytest.raises(DpllamaError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        load_llama2c(path)


@pytest.mark.parametrize("load", [load_llama2c, load_gguf])
def test_missing_file(tmp_path, load):
    with pytest.raises(DpllamaError, match=f"^{tmp_path / 'nope.bin'}: cannot read: No such file or directory$"):
        load(tmp_path / "nope.bin")


def test_llama2c_size_mismatch(tmp_path):
    path = tmp_path / "m.bin"
    random_llama2c(path, version=1)
    good = path.read_bytes()
    path.write_bytes(good[:-4])
    with pytest.raises(DpllamaError, match=f"^{path}: truncated llama2.c checkpoint \\(version 1\\): expected "
                                           f"{len(good)} bytes from its header, found {len(good) - 4}$"):
        load_llama2c(path)
    path.write_bytes(good + bytes(8))
    with pytest.raises(DpllamaError, match=f"^{path}: llama2.c checkpoint \\(version 1\\) has 8 trailing bytes: "
                                           f"expected {len(good)} bytes from its header, found {len(good) + 8}$"):
        load_llama2c(path)


def test_llama2c_v2_group_must_divide_rows(tmp_path):
    # upstream export.py only checks that the group divides each tensor's size; here hidden_dim 48 % 32 != 0
    dim, hidden, layers, heads, kv_heads, vocab, seq_len, group = 32, 48, 1, 4, 2, 40, 16, 32
    numel = vocab * dim + layers * (2 * dim * dim + 2 * (dim // 2) * dim + 3 * hidden * dim)
    header = struct.pack("<Ii7iBi", MAGIC, 2, dim, hidden, layers, heads, kv_heads, vocab, seq_len, 1, group)
    path = tmp_path / "v2.bin"
    path.write_bytes(header.ljust(256, b"\0") + bytes(4 * (2 * layers + 1) * dim + numel + 4 * numel // group))
    with pytest.raises(DpllamaError, match=r"layers\.0\.w2 rows of 48 are not a multiple of the Q8_0 group size 32"):
        load_llama2c(path)


# ---------------------------------------------------------------- GGUF

GGUF_SHAPE = dict(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, seq_len=32)
MIXED_TYPES = {"token_embd.weight": T.Q8_0, "output.weight": T.F16, "blk.0.attn_q.weight": T.Q4_0,
               "blk.0.attn_k.weight": T.Q4_1, "blk.0.attn_v.weight": T.F16, "blk.0.attn_output.weight": T.BF16,
               "blk.0.ffn_gate.weight": T.Q4_1, "blk.0.ffn_down.weight": T.Q4_0, "blk.0.ffn_up.weight": T.Q8_0,
               "blk.1.ffn_down.weight": T.Q4_1, "blk.1.attn_norm.weight": T.F16}


@pytest.mark.parametrize("shape, types", [(GGUF_SHAPE, MIXED_TYPES), (EVERY_TYPE_SHAPE, EVERY_TYPE)],
                         ids=["legacy-types", "every-type"])
def test_gguf_mixed_types(tmp_path, shape, types):
    path = tmp_path / "m.gguf"
    src = random_weights(shared=False, **shape)
    written = write_test_gguf(path, src, types)
    w = load_gguf(path)
    assert w.config == gguf_config(src.config) and not w.tied
    assert w.meta["format"] == "gguf" and w.meta["tokenizer_fields"] == TOKENIZER_FIELDS
    assert w.meta["chat_template"] == TOKENIZER_FIELDS["tokenizer.chat_template"]
    names = {"tok_embeddings": "token_embd", "output": "output"}
    names.update({f"layers.{i}.{f}": f"blk.{i}.{g}" for i in range(shape["n_layers"])
                  for f, g in [("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output"),
                               ("w1", "ffn_gate"), ("w2", "ffn_down"), ("w3", "ffn_up")]})
    for name, t in w.matrices():
        ggml_type, data = written[names[name] + ".weight"]
        assert t.kind == DEVICE_FORMAT.get(ggml_type, ("f32",))[0], name
        assert np.array_equal(t.dequantize(), dequantize(data, ggml_type)), name
    assert np.array_equal(w.layers[1].attn_norm, src.layers[1].attn_norm.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1])
def test_gguf_tied_and_q4_embedding(tmp_path, ggml_type):
    """A Q4 table, tied, stays int4 (repacked losslessly, as any matrix), not widened to float32."""
    path = tmp_path / "t.gguf"
    src = random_weights(shared=True, **GGUF_SHAPE)
    written = write_test_gguf(path, src, {"token_embd.weight": ggml_type})
    w = load_gguf(path)
    t = w.tok_embeddings
    assert w.tied and (t.kind, t.group, t.mins is not None) == ("int4", 32, ggml_type == T.Q4_1)
    assert np.array_equal(t.dequantize(), dequantize(written["token_embd.weight"][1], ggml_type))


def test_gguf_header_parser_matches_gguf_reader(tmp_path):
    path = tmp_path / "m.gguf"
    write_test_gguf(path, random_weights(**GGUF_SHAPE), MIXED_TYPES)
    ours, theirs = read_gguf(path), GGUFReader(path)
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type and mine.shape == tuple(reversed(t.shape.tolist()))
        assert mine.data.tobytes() == t.data.tobytes()


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="gpt2"), "unsupported GGUF architecture 'gpt2' \\(supported: llama, qwen2, qwen3, phi3\\)"),
    (dict(types={"blk.1.attn_q.weight": T.MXFP4}),
     "tensor blk.1.attn_q.weight has type MXFP4, which dpllama does not support \\(supported: F32, F16, BF16, "
     "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS\\)"),
    (dict(drop={"blk.1.ffn_up.weight"}), "missing tensor blk.1.ffn_up.weight"),
    (dict(extra={"blk.1.attn_output.bias": np.ones(64, np.float32)}),
     "unexpected tensor blk.1.attn_output.bias \\(1 in all\\): a model feature dpllama does not implement"),
    (dict(extra={"rope_freqs.weight": np.ones(5, np.float32)}),
     "tensor rope_freqs.weight has shape \\[5\\], expected \\[8\\]"),
    (dict(extra={"blk.0.attn_q.weight": np.ones((64, 32), np.float32)}),
     "tensor blk.0.attn_q.weight has shape \\[64, 32\\], expected \\[64, 64\\]"),
])
def test_gguf_errors(tmp_path, kwargs, message):
    path = tmp_path / "bad.gguf"
    write_test_gguf(path, random_weights(**GGUF_SHAPE), **kwargs)
    with pytest.raises(DpllamaError, match=f"^{path}: {message}$"):
        load_gguf(path)


@pytest.mark.parametrize("arch", [dict(arch="qwen2", rope_neox=True, qkv_bias=True),
                                  dict(key_length=64),      # its header has no head width but dim / n_heads
                                  dict(rope_mscale=1.5)])   # nor a RoPE magnitude
def test_llama2c_cannot_hold_other_architectures(tmp_path, arch):
    w = random_weights(**GGUF_SHAPE, **arch)
    with pytest.raises(DpllamaError, match=f"m.bin: a llama2.c checkpoint cannot hold this {w.config.arch} model's "
                                           "NEOX RoPE, biases, heads' norms or width, or RoPE scaling: write a GGUF$"):
        write_llama2c(tmp_path / "m.bin", w)
    assert not (tmp_path / "m.bin").exists()


def test_gguf_corrupted(tmp_path):
    path = tmp_path / "c.gguf"
    write_test_gguf(path, random_weights(**GGUF_SHAPE))
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(DpllamaError, match=f"^{path}: truncated GGUF file: tensor .* needs \\d+ bytes, "
                                           f"found {len(good) // 2}$"):
        load_gguf(path)
    path.write_bytes(good[:300])
    with pytest.raises(DpllamaError, match=f"^{path}: truncated GGUF file: header needs"):
        load_gguf(path)
    path.write_bytes(b"GGML" + good[4:])
    with pytest.raises(DpllamaError, match=f"^{path}: not a GGUF file \\(starts with b'GGML', expected b'GGUF'\\)$"):
        load_gguf(path)
    path.write_bytes(good[:24] + struct.pack("<Q", 1 << 40) + good[32:])     # first key's length
    with pytest.raises(DpllamaError, match=f"^{path}: truncated GGUF file"):
        load_gguf(path)
    path.write_bytes(good[:4] + struct.pack("<I", 7) + good[8:])
    with pytest.raises(DpllamaError, match=f"^{path}: corrupted GGUF file: GGUF version 7 \\(expected 2 or 3\\)$"):
        load_gguf(path)


def _quantized_mix(src):
    """`src` with matrices in every storage format, group and padding the container must keep."""
    layers = []
    for i, layer in enumerate(src.layers):
        layers.append(dataclasses.replace(
            layer, wq=quantize_int4(layer.wq.data, 32, True), wk=quantize_int4(layer.wk.data, 64, False),
            wv=quantize_q8(layer.wv.data, 32), w1=quantize_int4(layer.w1.data, 128, False),
            w2=quantize_int4(layer.w2.data, 64, i == 0), w3=quantize_q8(layer.w3.data, 24)))
    emb = quantize_q8(src.tok_embeddings.data, 32)
    return Weights(src.config, emb, layers, src.norm, quantize_int4(src.output.data, 32, False))


def test_dpllama_container_round_trip(tmp_path):
    path = tmp_path / "q.gguf"
    w = _quantized_mix(random_weights(shared=False, **GGUF_SHAPE))
    write_dpllama_gguf(path, w, TOKENIZER_FIELDS)
    got = load_gguf(path)
    assert got.config == gguf_config(w.config) and not got.tied and got.meta["format"] == "dpllama-gguf"
    assert got.meta["tokenizer_fields"] == TOKENIZER_FIELDS
    assert_same_matrices(got, w)
    assert_same_norms(got, w)
    # still a standard llama GGUF to other tools, with llama.cpp's metadata types
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.embedding_length"].contents() == 64
    std = tmp_path / "std.gguf"
    write_test_gguf(std, random_weights(**GGUF_SHAPE))
    std_fields = GGUFReader(std).fields
    for key in TOKENIZER_FIELDS:
        assert reader.fields[key].types == std_fields[key].types, key


def test_dpllama_container_keeps_every_gguf_format(tmp_path):
    """Matrices as every GGUF type loads them (q8 asymmetric and group 16, int4 with float32 scales) are written
    into the container and load back as they were, bit for bit."""
    src = tmp_path / "every.gguf"
    write_test_gguf(src, random_weights(shared=False, **EVERY_TYPE_SHAPE), EVERY_TYPE)
    w = load_gguf(src)
    write_dpllama_gguf(tmp_path / "q.gguf", w, TOKENIZER_FIELDS)
    assert_same_matrices(load_gguf(tmp_path / "q.gguf"), w)


def test_dpllama_container_tied(tmp_path):
    path = tmp_path / "t.gguf"
    src = random_weights(shared=True, **GGUF_SHAPE)
    emb = quantize_q8(src.tok_embeddings.data)
    w = Weights(src.config, emb, src.layers, src.norm, emb)
    write_dpllama_gguf(path, w, {})
    got = load_gguf(path)
    assert got.tied and got.meta["tokenizer_fields"] == {} and got.meta["chat_template"] is None
    assert_same_matrices(got, w)


def test_smollm2_gguf(tmp_path):
    path = smollm2_gguf_path()
    w = load_gguf(path)
    c = w.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == \
        (576, 1536, 30, 9, 3, 49152, 8192)
    assert (c.rope_theta, round(c.norm_eps, 9)) == (100000.0, 1e-5) and w.tied
    kinds = [t.kind for _, t in w.matrices()]
    assert kinds.count("int4") == 210 and kinds[0] == "q8"
    assert all(t.mins is not None for _, t in w.matrices() if t.kind == "int4")
    assert w.meta["tokenizer_fields"]["tokenizer.ggml.model"] == "gpt2"
    assert len(w.meta["tokenizer_fields"]["tokenizer.ggml.tokens"]) == 49152
    assert w.meta["chat_template"].startswith("{% for message in messages %}")
    raw = read_gguf(path).tensors["blk.3.ffn_down.weight"]
    assert np.array_equal(w.layers[3].w2.dequantize(), dequantize(raw.data.reshape(576, -1), T.Q4_1))
    out = tmp_path / "smollm2.dpllama.gguf"
    write_dpllama_gguf(out, w, w.meta["tokenizer_fields"])
    again = load_gguf(out)
    assert again.meta["tokenizer_fields"] == w.meta["tokenizer_fields"]
    assert_same_matrices(again, w)
