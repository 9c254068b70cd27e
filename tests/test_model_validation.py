"""Bad model files are refused at load in one line naming the file, the field or tensor, what was expected and
what was found (GGUF tables and metadata, weights that are not finite or overflow), and a context too long
for the device is clamped with a line on stderr, never a MemoryError."""
from __future__ import annotations

import copy
import dataclasses
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

import dpllama.llm
from dpllama.errors import DpllamaError
from dpllama.llm import fit_context
from dpllama.loaders import load_weights
from dpllama.model.gguf import load_gguf, write_dpllama_gguf
from dpllama.model.llama import Llama
from dpllama.model.llama2c import load_llama2c, write_llama2c
from dpllama.model.quant import quantize_int4
from dpllama.model.weights import MAX_WEIGHT, Weights
from dpllama.runtime.config import dump_config, shipped_config_for
from tests.helpers import TOKENIZER_FIELDS, llama2c_dir, random_weights, write_test_gguf

SHAPE = dict(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=40, seq_len=32)
# the writers here quantize the bad values on purpose, and NumPy warns about them
pytestmark = pytest.mark.filterwarnings("ignore:.* encountered in:RuntimeWarning")
BOUND = re.escape(f"expected finite values below {MAX_WEIGHT:g} in magnitude")


def fails(path, message: str) -> None:
    """Loading `path` raises DpllamaError with exactly `path: message` (a regular expression)."""
    with pytest.raises(DpllamaError, match=f"^{re.escape(str(path))}: {message}$"):
        load_weights(path)


# ---------------------------------------------------------------- weights that are not finite, or overflow

@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (-np.inf, "-inf"), (3e38, "3e\\+38"),
                                          (2.0 ** 32, "4.29497e\\+09")])
@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_weight_out_of_range(tmp_path, value, shown, version):
    w = random_weights(**SHAPE)
    w.layers[1].wq.data[5, 7] = value
    write_llama2c(tmp_path / "m.bin", w, version)
    fails(tmp_path / "m.bin", f"tensor layers.1.wq has weight {shown} at \\[5, 7\\]: {BOUND}")


def test_llama2c_norm_and_q8_scale_out_of_range(tmp_path):
    w = random_weights(**SHAPE)
    w.layers[0].ffn_norm[3] = np.inf
    write_llama2c(tmp_path / "n.bin", w, 1)
    fails(tmp_path / "n.bin", f"tensor layers.0.ffn_norm has weight inf at \\[3\\]: {BOUND}")
    w = random_weights(**SHAPE)
    w.layers[0].w2.data[2, 40] = np.nan         # version 2: the NaN goes into its group's scale
    write_llama2c(tmp_path / "q.bin", w, 2, group_size=32)
    fails(tmp_path / "q.bin", "tensor layers.0.w2 has scale nan at \\[2, 1\\]: "
                              + re.escape(f"expected finite values below {MAX_WEIGHT / 256:g} in magnitude"))


def test_weights_just_below_the_bound_load(tmp_path):
    w = random_weights(**SHAPE)
    w.layers[1].wq.data[5, 7] = -(2.0 ** 31)
    write_llama2c(tmp_path / "m.bin", w, 1)
    assert load_llama2c(tmp_path / "m.bin").layers[1].wq.data[5, 7] == -(2.0 ** 31)


@pytest.mark.parametrize("ggml_type, value, found", [
    (T.F32, np.nan, "weight nan at \\[1, 3\\]"), (T.F32, 3e38, "weight 3e\\+38 at \\[1, 3\\]"),
    (T.F16, 3e38, "weight inf at \\[1, 3\\]"),          # beyond float16: infinity in the file
    (T.BF16, -np.inf, "weight -inf at \\[1, 3\\]"),
    (T.Q8_0, np.nan, "scale nan at \\[1, 0\\]"), (T.Q4_0, np.inf, "scale -inf at \\[1, 0\\]"),
    (T.Q4_1, 3e38, "scale inf at \\[1, 0\\]"), (T.Q8_0, 3e38, "scale inf at \\[1, 0\\]"),
])
def test_gguf_weight_out_of_range(tmp_path, ggml_type, value, found):
    w = random_weights(**SHAPE)
    w.layers[0].w3.data[1, 3] = value
    path = tmp_path / "m.gguf"
    write_test_gguf(path, w, {"blk.0.ffn_up.weight": ggml_type})
    fails(path, f"tensor blk.0.ffn_up.weight has {found}: expected finite values below .*")


def test_gguf_norm_and_container_out_of_range(tmp_path):
    w = random_weights(**SHAPE)
    w.norm[0] = np.nan
    write_test_gguf(tmp_path / "n.gguf", w)
    fails(tmp_path / "n.gguf", f"tensor output_norm.weight has weight nan at \\[0, 0\\]: {BOUND}")
    src = random_weights(**SHAPE)
    bad = src.layers[1].wk.data.copy()
    bad[0, 0] = np.inf
    src.layers[1].wk = quantize_int4(bad, 32, symmetric=False)
    write_dpllama_gguf(tmp_path / "q.gguf", src, TOKENIZER_FIELDS)
    fails(tmp_path / "q.gguf", "tensor blk.1.attn_k has scale inf at \\[0, 0\\]: expected .*")


# ---------------------------------------------------------------- GGUF tables and metadata

def _after(buf: bytes, name: str) -> int:
    """Where the bytes after the GGUF string `name` (a metadata key or a tensor name) start."""
    return buf.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)


def _tensor_info(buf: bytes, name: str) -> tuple[int, int, int]:
    """Positions of tensor `name`'s dims, type and offset in the tensor table."""
    at = _after(buf, name)
    (n_dims,) = struct.unpack_from("<I", buf, at)
    return at + 4, at + 4 + 8 * n_dims, at + 8 + 8 * n_dims


@pytest.fixture
def gguf(tmp_path):
    """(path, bytearray of a good GGUF with a Q8_0 embedding, write(buf)): patch the bytes, write, load."""
    path = tmp_path / "m.gguf"
    write_test_gguf(path, random_weights(**SHAPE), {"token_embd.weight": T.Q8_0})
    return path, bytearray(path.read_bytes()), path.write_bytes


def _set(buf: bytearray, at: int, fmt: str, *values) -> None:
    struct.pack_into("<" + fmt, buf, at, *values)


def test_gguf_tensor_table_checks(gguf):
    path, good, write = gguf
    dims, type_at, offset_at = _tensor_info(good, "blk.0.attn_k.weight")
    (offset,) = struct.unpack_from("<Q", good, offset_at)
    cases = [
        (offset_at, "Q", offset + 4, f"tensor blk.0.attn_k.weight is at offset {offset + 4}, expected a multiple "
                                     f"of general.alignment 32"),
        (offset_at, "Q", 1 << 40, "truncated GGUF file: tensor blk.0.attn_k.weight needs \\d+ bytes, found \\d+"),
        (offset_at, "Q", 0, "tensor token_embd.weight overlaps blk.0.attn_k.weight: it ends at byte \\d+, "
                            "expected at most \\d+, where blk.0.attn_k.weight starts"),
        (type_at, "I", 99, "tensor blk.0.attn_k.weight has unknown type 99"),
        (dims - 4, "I", 5, "tensor blk.0.attn_k.weight has 5 dimensions, expected 1 to 4"),
        (_tensor_info(good, "token_embd.weight")[0], "Q", 48,
         "tensor token_embd.weight has dimensions \\[48, 40\\]: expected the first a multiple of Q8_0's block of 32"),
    ]
    for at, fmt, value, message in cases:
        buf = bytearray(good)
        _set(buf, at, fmt, value)
        write(buf)
        fails(path, message)
    buf = bytearray(good)       # a second tensor of the same name: rename blk.1.attn_k as blk.0.attn_k
    at = _after(buf, "blk.1.attn_k.weight")
    buf[at - len("blk.1.attn_k.weight"):at] = b"blk.0.attn_k.weight"
    write(buf)
    fails(path, "tensor blk.0.attn_k.weight is listed twice")


@pytest.mark.parametrize("key, vtype, message", [
    ("llama.context_length", V.FLOAT32, "metadata llama.context_length holds float, expected int"),
    ("llama.rope.freq_base", V.INT32, "metadata llama.rope.freq_base holds int, expected float"),
    ("tokenizer.ggml.add_bos_token", V.UINT8, "metadata tokenizer.ggml.add_bos_token holds int, expected bool"),
    ("tokenizer.ggml.bos_token_id", V.FLOAT32, "metadata tokenizer.ggml.bos_token_id holds float, expected int"),
])
def test_gguf_metadata_types(gguf, key, vtype, message):
    path, buf, write = gguf
    _set(buf, _after(buf, key), "I", vtype)        # the same size: only the type differs
    write(buf)
    fails(path, message)


def test_gguf_metadata_array_item_type(gguf):
    path, buf, write = gguf
    at = _after(buf, "tokenizer.ggml.token_type")       # ARRAY, then its item type
    _set(buf, at + 4, "I", V.FLOAT32)
    write(buf)
    fails(path, "metadata tokenizer.ggml.token_type holds \\[float\\], expected \\[int\\]")


@pytest.mark.parametrize("key, fmt, value, message", [
    *[("llama.rope.freq_base", "f", v, r"llama.rope.freq_base must be a positive float32 \(1.175e-38 to 3.403e\+38\), "
                                          f"found {shown}")
      for v, shown in [(np.nan, "nan"), (0.0, "0.0"), (np.inf, "inf"), (1e-40, "9.99994610111476e-41")]],
    ("llama.attention.layer_norm_rms_epsilon", "f", 0.0,
     "llama.attention.layer_norm_rms_epsilon must be between 0 and 1, found 0.0"),
    ("llama.attention.layer_norm_rms_epsilon", "f", 1.0,
     "llama.attention.layer_norm_rms_epsilon must be between 0 and 1, found 1.0"),
    ("llama.attention.layer_norm_rms_epsilon", "f", np.nan,
     "llama.attention.layer_norm_rms_epsilon must be between 0 and 1, found nan"),
    ("llama.attention.head_count", "I", 0, "llama.attention.head_count must be positive, found 0"),
    ("llama.attention.head_count", "I", 3,
     "llama.embedding_length 64 is not a multiple of llama.attention.head_count 3"),
    ("llama.attention.head_count_kv", "I", 3,
     "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3"),
    ("llama.context_length", "I", 0, "llama.context_length must be positive, found 0"),
])
def test_gguf_hyperparameters_in_range(gguf, key, fmt, value, message):
    path, buf, write = gguf
    _set(buf, _after(buf, key) + 4, fmt, value)
    write(buf)
    fails(path, f"GGUF metadata: impossible model: {message}")


def test_gguf_vocab_size_matches_the_embedding(gguf):
    path, buf, write = gguf
    _set(buf, _after(buf, "llama.vocab_size") + 4, "I", 41)
    write(buf)
    fails(path, "llama.vocab_size is 41, expected 40, the rows of token_embd")


# ---------------------------------------------------------------- a context too long for the device

@pytest.fixture
def small_alloc(queue, monkeypatch):
    """The session queue, allowing 8 MiB an allocation, and what dpllama.load opens."""
    monkeypatch.setitem(queue.config["memory"], "max_alloc_mb", 8)
    monkeypatch.setattr(dpllama.llm, "open_queue", lambda device, config: queue)
    return queue


def _stories_with_seq_len(path, seq_len: int):
    """stories260K as a version 1 checkpoint whose header claims `seq_len`."""
    write_llama2c(path, load_llama2c(llama2c_dir() / "stories260K.bin"), 1)
    buf = bytearray(path.read_bytes())
    struct.pack_into("<i", buf, 8 + 6 * 4, seq_len)      # after magic, version and 6 of the 7 int32
    path.write_bytes(buf)


def _cap(c, q) -> int:
    """The context 8 MiB holds: KV cache (fp16 keys and values), 64 tokens' attention scores, RoPE table and tokens
    (float32, int32), and with work-groups of one work-item the sums of attention's spans (att_parts: per span, 16
    rows' heads' head_dim sums padded by HD_VEC, the largest power of two up to 16 dividing head_dim)."""
    wg = q.config["work_group"]
    hd_vec = next(v for v in (16, 8, 4, 2, 1) if c.head_dim % v == 0)
    spans = -(-16 * c.n_heads * (c.head_dim + hd_vec) // wg["attention_span"]) if wg["attention"] == 1 else 0
    per_pos = 2 * 2 * c.n_layers * c.kv_dim + 4 * (wg["prefill_chunk"] * c.n_heads + c.head_dim + 1 + spans)
    step = q.config.work_group("attention_positions")
    return (8 << 20) // per_pos // step * step


@pytest.mark.parametrize("seq_len", [1 << 24, (1 << 31) - 1])
def test_llama2c_huge_context_is_clamped(tmp_path, small_alloc, capsys, seq_len):
    path = tmp_path / "s.bin"
    _stories_with_seq_len(path, seq_len)
    llm = dpllama.llm.load(str(path), str(llama2c_dir() / "tok512.bin"))
    cap = _cap(llm.model.config, small_alloc)
    assert llm.model.seq_len == cap
    # the clamp's line alone, less the kernels' compile progress (its lines, and the empty piece its \r leaves) where
    # this test is the first to build them
    err = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("dpllama: compiling ")]
    assert len(err) == 1 and re.fullmatch(f"dpllama: the model's context of {seq_len} tokens needs \\d+ MiB of KV "
                                          f"cache and scratch, more than .* holds in one allocation \\(8 MiB\\) of "
                                          f"under 2\\^31 floats: using {cap} tokens", err[0]), err
    assert "".join(llm.generate("Once upon a time", steps=12, temperature=0)).startswith("Once upon a time, there")
    llm = dpllama.llm.load(str(path), str(llama2c_dir() / "tok512.bin"), max_seq=cap + 1)   # --ctx too
    assert llm.model.seq_len == cap and f"dpllama: --ctx {cap + 1} needs" in capsys.readouterr().err
    llm = dpllama.llm.load(str(path), str(llama2c_dir() / "tok512.bin"), max_seq=100)
    assert llm.model.seq_len == 100 and capsys.readouterr().err == ""


def test_a_long_context_nobody_asked_for_is_cut(queue, capsys, monkeypatch):
    """Without --ctx a context takes at most DEFAULT_CONTEXT_BYTES (here 16 MiB), in steps of 1,024 tokens, with a
    line that says so (Qwen3-0.6B's 40,960 tokens took 6 GB); asked for, the model's whole context is allocated, and
    a context within the budget stays the model's, without a line."""
    monkeypatch.setattr(dpllama.llm, "DEFAULT_CONTEXT_BYTES", 16 << 20)
    src = random_weights(**SHAPE).config
    c = dataclasses.replace(src, seq_len=1 << 20)
    per_pos = 4 * sum(dpllama.llm._per_position(c, queue, c.seq_len, 1, None, "f16"))
    n = fit_context(c, queue)
    assert n % 1024 == 0 and n * per_pos <= 16 << 20 < (n + 1024) * per_pos, (n, per_pos)
    assert capsys.readouterr().err == (f"dpllama: the model's context of {1 << 20} tokens needs "
                                       f"{(1 << 20) * per_pos / 2**20:.0f} MiB of KV cache and scratch: using {n} "
                                       f"tokens (--ctx N for more)\n")
    assert fit_context(c, queue, max_seq=n + 1024) == n + 1024 and capsys.readouterr().err == ""
    assert fit_context(dataclasses.replace(c, seq_len=n), queue) == n and capsys.readouterr().err == ""


def test_gguf_huge_context_is_clamped(tmp_path, small_alloc, capsys):
    src = random_weights(**SHAPE)
    w = Weights(dataclasses.replace(src.config, seq_len=1 << 31), src.tok_embeddings, src.layers, src.norm, src.output)
    write_test_gguf(tmp_path / "m.gguf", w)
    weights = load_gguf(tmp_path / "m.gguf")
    assert weights.config.seq_len == 1 << 31
    model = Llama(weights, small_alloc, max_seq=fit_context(weights.config, small_alloc))
    assert model.seq_len == _cap(weights.config, small_alloc)
    assert "the model's context of 2147483648 tokens" in capsys.readouterr().err


def test_cli_clamps_a_huge_context(tmp_path, queue, repo_root):
    path = tmp_path / "s.bin"
    _stories_with_seq_len(path, 1 << 24)
    values = copy.deepcopy(shipped_config_for(queue.device).values)
    values["memory"]["max_alloc_mb"] = 8
    (tmp_path / "small.yaml").write_text(dump_config(values))
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "generate", "-m", str(path), "-z",
                        str(llama2c_dir() / "tok512.bin"), "-n", "12", "-t", "0", "--config",
                        str(tmp_path / "small.yaml")], capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time, there")
    assert "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "context" in line][0].startswith(
        "dpllama: the model's context of 16777216 tokens needs")
