"""Fuzzing: every kind of input a user gives (llama2.c and GGUF models, tokenizer.bin, YAML configs, prompts and
the arguments of the API and the CLI), mutated, gives a clean error or a success: never a traceback, a crash, a
hang, a file left behind, or a success on input that is certainly invalid.

Each case is fixed by its seed. Most call the Python API in-process, where a clean error is a DpllamaError of
one line; the CLI cases run `python -m dpllama.cli` and want exit 1 with one `dpllama: error:` line (2 and a
usage line for what argparse refuses). A case marked `bad` is certainly invalid and must fail; the others (a
byte flip inside float weights may leave a valid file) may also succeed. Few cases run a model on the device:
stories260K, or a random model of a few kilobytes. DPLLAMA_FUZZ_REPORT=FILE writes the per-class table of
docs/RELIABILITY.md.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import GGUFValueType as V

import dpllama
from dpllama.constrain import done, grammar
from dpllama.errors import DpllamaError
from dpllama.generate import Sampler, check_steps, generate
from dpllama.loaders import llama2c_model_tokenizer, load_tokenizer, load_weights, tokenizer_only
from dpllama.model.gguf import write_dpllama_gguf
from dpllama.model.llama import Llama
from dpllama.model.llama2c import write_llama2c
from dpllama.quantize import quantize
from dpllama.runtime.config import defaults, load_config
from dpllama.tokenizer import Llama2cTokenizer, StreamDecoder, tokenizer_from_gguf_fields
from tests.helpers import SHARED, TOKENIZER_FIELDS, gguf_data, llama2c_dir, random_weights

# mutated weights make NumPy warn on the way to the refusal
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
REPO_ROOT = Path(__file__).resolve().parents[1]
# the oracle data the cases use (stories260K, tok512): named when the cases are made, read when they run, so
# that without it the tests skip rather than fail to collect
STORIES, TOK512 = (SHARED / "models" / "llama2c" / n for n in ("stories260K.bin", "tok512.bin"))
IN_PROCESS_LIMIT = 60   # seconds; a case beyond it hangs
CLI_LIMIT = 120


@dataclass(frozen=True)
class Case:
    cls: str                    # the input class, a row of the table
    name: str
    bad: bool                   # certainly invalid: must end in an error
    make: Callable              # (folder[, llm]) -> thunk: writes the inputs there, returns what runs them
    device: bool = False        # needs the shared stories260K model on the device
    outputs: tuple = ()         # files a success may leave in the folder


CASES: list[Case] = []
OUTCOMES = ("clean errors", "successes", "tracebacks", "crashes", "hangs", "leftovers", "invalid accepted",
            "bad messages")     # an error of more than one line, or an exit code but 1 (2 from argparse)
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def add(cls: str, name: str, bad: bool, make: Callable, **kw) -> None:
    CASES.append(Case(cls, name, bad, make, **kw))


class Failure(Exception):
    """A case that ended in something other than a clean error or a success; `kind` is an OUTCOMES entry."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Hang(BaseException):     # not an Exception, so that no `except Exception` on the way swallows it
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    def expire(signum, frame):
        raise Hang()
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def outcome(case: Case, folder: Path, *extra) -> str:
    """Run a case: "clean errors" or "successes", else raise Failure."""
    thunk = case.make(folder, *extra)
    before = files(folder)
    try:
        with deadline(IN_PROCESS_LIMIT):
            thunk()
        result = "successes"
    except DpllamaError as e:
        if not str(e) or "\n" in str(e):
            raise Failure("bad messages", f"a DpllamaError message that is not one line: {str(e)!r}") from e
        result = "clean errors"
    except Hang:
        raise Failure("hangs", f"no end after {IN_PROCESS_LIMIT} s") from None
    except Failure:
        raise
    except Exception as e:
        raise Failure("tracebacks", f"{type(e).__name__}: {e}") from e
    left = files(folder) - before - (set(case.outputs) if result == "successes" else set())
    if left:
        raise Failure("leftovers", f"{sorted(left)} after {result}")
    if case.bad and result == "successes":
        raise Failure("invalid accepted", "certainly invalid input accepted")
    return result


@pytest.fixture(scope="module", autouse=True)
def report():
    """The table of outcomes per input class, written to $DPLLAMA_FUZZ_REPORT when set."""
    yield
    path = os.environ.get("DPLLAMA_FUZZ_REPORT")
    if not path:
        return
    rows = ["| input class | cases | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for cls in dict.fromkeys(c.cls for c in CASES):
        t = TALLY[cls]
        rows.append(f"| {cls} | {sum(t.values())} | " + " | ".join(str(t[o]) for o in OUTCOMES) + " |")
    total = sum(TALLY.values(), collections.Counter())
    rows.append(f"| all | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    Path(path).write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def llm():
    return dpllama.load(str(STORIES), str(TOK512), max_seq=64)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)   # CASES fills up below
def test_fuzz(case, tmp_path, request):
    llama2c_dir()
    extra = (request.getfixturevalue("llm"),) if case.device else ()
    try:
        TALLY[case.cls][outcome(case, tmp_path, *extra)] += 1
    except Failure as f:
        TALLY[case.cls][f.kind] += 1
        raise


def test_enough_cases():
    assert len(CASES) >= 400 and len({c.name for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------- shared inputs

PROMPTS = ["", " ", "Once upon a time", "héllo wörld", "日本語のテキスト", "🦙🦙 llama", "\x00\x01\x1b[31m\x7f",
           "\udcff\udc80 bytes", "\ud800 lone \udbff surrogates \udfff", "<s></s><|im_start|>user\n<unk>",
           "\u202e\ufeff\u200b", "\r\n\t\v\f", "<0xFF><0x41>", "a" * 3000]


def random_text(rng: random.Random, n: int) -> str:
    """Characters from ASCII, Latin, CJK, emoji, control characters and surrogates."""
    ranges = [(0x20, 0x7E), (0, 0x1F), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0xD800, 0xDFFF),
              (0xFFF0, 0xFFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def exercise(tok) -> None:
    """Encode and decode text of every kind; ids stay in the vocabulary."""
    for text in PROMPTS[:-1] + [random_text(random.Random(7), 40)]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids), (text, ids)
        tok.decode(ids)
        dec = StreamDecoder(tok)
        for i in ids:
            dec.push(i)
        dec.flush()


def flip(data: bytearray, rng: random.Random, lo: int, hi: int, n: int) -> bytes:
    for _ in range(n):
        data[rng.randrange(lo, hi)] ^= rng.randint(1, 255)
    return bytes(data)


def put(data: bytearray, at: int, fmt: str, value) -> bytes:
    struct.pack_into("<" + fmt, data, at, value)
    return bytes(data)


def written(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------------------------------- llama2.c models

L2C = dict(dim=16, hidden=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab=12, seq_len=8)
HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# a value that keeps the header plausible but disagrees with the body (n_heads 8: another kv_dim)
OTHER = {"dim": 18, "hidden_dim": 25, "n_layers": 3, "n_heads": 8, "n_kv_heads": 3, "vocab_size": 13, "seq_len": 16}


@functools.cache
def l2c_base(version: int, shared: bool = True) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_llama2c(Path(d) / "m.bin", random_weights(**L2C, shared=shared), version)
        return (Path(d) / "m.bin").read_bytes()


def l2c(version: int, mutate: Callable[[bytearray], bytes], shared: bool = True):
    def make(folder):
        p = written(folder, "m.bin", mutate(bytearray(l2c_base(version, shared))))
        return lambda: load_weights(p)
    return make


def f32_region(version: int) -> tuple[int, int]:
    """Bytes of the shared base that hold checked float32 weights: all of version 1; version 0 but its unused
    RoPE tables (last); version 2's norms (first)."""
    c = L2C
    if version == 0:
        return 28, len(l2c_base(0)) - 2 * c["seq_len"] * (c["dim"] // c["n_heads"]) // 2 * 4
    if version == 1:
        return 256, len(l2c_base(1))
    return 256, 256 + 4 * (2 * c["n_layers"] + 1) * c["dim"]


def v2_scales() -> tuple[int, int]:
    """The embedding's Q8_0 scales in the version 2 base (group 8), after the norms and its int8 values."""
    start = f32_region(2)[1] + L2C["vocab"] * L2C["dim"]
    return start, start + 4 * L2C["vocab"] * L2C["dim"] // 8


def l2c_cases():
    rng = random.Random(11)
    for v in (0, 1, 2):
        at = (lambda i: 4 * i) if v == 0 else (lambda i: 8 + 4 * i)
        for i, f in enumerate(HEADER_FIELDS):
            for value in (0, -1, -2**31, 2**31 - 1, OTHER[f]):
                # only the context length of versions 1 and 2 does not size the body
                bad = value <= 0 or not (f == "seq_len" and v > 0)
                add("llama2.c", f"l2c-v{v}-{f}={value}", bad, l2c(v, functools.partial(put, at=at(i), fmt="i",
                                                                                        value=value)))
        size = len(l2c_base(v))
        for cut in sorted({0, 3, at(7) - 1, at(7)} | {rng.randrange(size) for _ in range(4)}):
            add("llama2.c", f"l2c-v{v}-truncate-{cut}", True, l2c(v, lambda d, cut=cut: bytes(d[:cut])))
        for n in (1, 4, 4096):
            add("llama2.c", f"l2c-v{v}-append-{n}", True, l2c(v, lambda d, n=n: bytes(d) + bytes(n)))
        lo, hi = f32_region(v)
        regions = [(lo, hi)] + ([v2_scales()] if v == 2 else [])
        for value in (math.nan, math.inf, -math.inf, 3e38, -2.0**33):
            for k, (lo, hi) in enumerate(regions):
                pos = lo + 4 * rng.randrange((hi - lo) // 4)
                add("llama2.c", f"l2c-v{v}-weight{k}-{value}@{pos}", True,
                    l2c(v, functools.partial(put, at=pos, fmt="f", value=value)))
        for k in range(6):
            s = rng.randrange(1 << 30)
            add("llama2.c", f"l2c-v{v}-flip-{k}", False,
                l2c(v, lambda d, s=s: flip(d, random.Random(s), 0, len(d), 1 + s % 3)))
        add("llama2.c", f"l2c-v{v}-unshared-flip", False,
            l2c(v, lambda d: flip(d, random.Random(v), 0, len(d), 2), shared=False))
    for name, v, pos, fmt, value in [("version0", 1, 4, "i", 0), ("version3", 2, 4, "i", 3),
                                     ("version-1", 1, 4, "i", -1), ("v1-as-v2", 1, 4, "i", 2),
                                     ("v2-as-v1", 2, 4, "i", 1), ("shared2", 1, 36, "B", 2),
                                     ("shared255", 2, 36, "B", 255), ("unshare", 1, 36, "B", 0),
                                     ("group0", 2, 37, "i", 0), ("group-8", 2, 37, "i", -8),
                                     ("group3", 2, 37, "i", 3), ("group4", 2, 37, "i", 4),
                                     ("group-huge", 2, 37, "i", 2**31 - 1)]:
        add("llama2.c", f"l2c-{name}", True, l2c(v, functools.partial(put, at=pos, fmt=fmt, value=value)))
    for k in range(4):     # a magic flipped: read as version 0, which it may even be
        add("llama2.c", f"l2c-magic-{k}", False, l2c(1, lambda d, k=k: flip(d, random.Random(k), 0, 4, 1)))

    def as_str(folder):     # the API takes a path as a string too
        p = written(folder, "m.bin", l2c_base(1))
        return lambda: load_weights(str(p))
    add("llama2.c", "l2c-str-path", False, as_str)


l2c_cases()


# ------------------------------------------------------------------------------------------- GGUF models

G = dict(dim=32, hidden=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab=8, seq_len=16)
# a byte-level BPE vocabulary of the model's 8 tokens ("Ġ" is GPT-2's space), whose merges it holds
VOCAB = ["<|endoftext|>", "h", "i", "hi", "\u0120", "\u0120hi", "!", "<|im_end|>"]
MERGES = ["h i", "\u0120 hi"]
SCALAR = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
          V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
# GGUF tensor -> its type in the base: one of each type the loader converts (the K-quants' 256-weight blocks
# aside; IQ4_XS's fit ffn_down's rows of hidden = 256)
TYPES = {"output.weight": T.F32, "token_embd.weight": T.Q8_0, "output_norm.weight": T.F32,
         "blk.0.attn_norm.weight": T.F32, "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_1,
         "blk.0.attn_v.weight": T.F16, "blk.0.attn_output.weight": T.BF16, "blk.0.ffn_norm.weight": T.F32,
         "blk.0.ffn_gate.weight": T.IQ4_NL, "blk.0.ffn_down.weight": T.IQ4_XS, "blk.0.ffn_up.weight": T.F32}


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gvalue(vtype: int, value) -> bytes:
    if isinstance(value, bytes):     # raw: an encoding of our choosing
        return value
    if vtype == V.STRING:
        return gstr(value)
    if vtype == V.ARRAY:
        item, items = value
        return struct.pack("<IQ", item, len(items)) + b"".join(gvalue(item, x) for x in items)
    return struct.pack("<" + SCALAR[vtype], value)


def gguf_bytes(kvs: list, tensors: list, version: int = 3, counts=None, alignment: int = 32):
    """A GGUF file written by hand, so that any field can lie: kvs [(key, type, value)], tensors
    [{name, dims (GGUF order), type, data, offset (None: the next aligned one)}]. -> (bytes, where each
    tensor's data starts in the file)."""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", version, *(counts or (len(tensors), len(kvs)))))
    for key, vtype, value in kvs:
        head += gstr(key) + struct.pack("<I", vtype) + gvalue(vtype, value)
    offsets, end = [], 0
    for t in tensors:
        off = t["offset"] if t["offset"] is not None else -(-end // alignment) * alignment
        head += gstr(t["name"]) + struct.pack(f"<I{len(t['dims'])}QIQ", len(t["dims"]), *t["dims"], t["type"], off)
        offsets.append(off)
        if off < 1 << 40:
            end = max(end, off + len(t["data"]))
    start = -(-len(head) // alignment) * alignment
    body = bytearray(end)
    for t, off in zip(tensors, offsets):
        if off < 1 << 40:
            body[off:off + len(t["data"])] = t["data"]
    return bytes(head.ljust(start, b"\0") + body), {t["name"]: start + off for t, off in zip(tensors, offsets)}


@functools.cache
def gguf_base() -> tuple[list, list]:
    w = random_weights(**G, shared=False, seed=1)
    arrays = {"output.weight": w.output.data, "token_embd.weight": w.tok_embeddings.data,
              "output_norm.weight": w.norm}
    layer = w.layers[0]
    for field, name in [("attn_norm", "attn_norm"), ("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"),
                        ("wo", "attn_output"), ("ffn_norm", "ffn_norm"), ("w1", "ffn_gate"), ("w2", "ffn_down"),
                        ("w3", "ffn_up")]:
        a = getattr(layer, field)
        arrays[f"blk.0.{name}.weight"] = a if isinstance(a, np.ndarray) else a.data
    tensors = [dict(name=n, dims=list(reversed(a.shape)), type=TYPES[n], offset=None,
                    data=gguf_data(a, TYPES[n]).tobytes()) for n, a in arrays.items()]
    kvs = [("general.architecture", V.STRING, "llama"), ("general.alignment", V.UINT32, 32)]
    kvs += [(f"llama.{k}", V.UINT32, G[g]) for k, g in [
        ("vocab_size", "vocab"), ("context_length", "seq_len"), ("embedding_length", "dim"),
        ("feed_forward_length", "hidden"), ("block_count", "n_layers"), ("attention.head_count", "n_heads"),
        ("attention.head_count_kv", "n_kv_heads")]]
    kvs += [("llama.rope.dimension_count", V.UINT32, G["dim"] // G["n_heads"]),
            ("llama.rope.freq_base", V.FLOAT32, 10000.0), ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 1e-5),
            ("tokenizer.ggml.model", V.STRING, "gpt2"), ("tokenizer.ggml.pre", V.STRING, "smollm"),
            ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, VOCAB)),
            ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [3, 1, 1, 1, 1, 1, 1, 3])),
            ("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [0.0] * 8)),
            ("tokenizer.ggml.merges", V.ARRAY, (V.STRING, MERGES)),
            ("tokenizer.ggml.bos_token_id", V.UINT32, 0), ("tokenizer.ggml.add_bos_token", V.BOOL, True),
            ("tokenizer.chat_template", V.STRING, TOKENIZER_FIELDS["tokenizer.chat_template"])]
    return kvs, tensors


def gguf_tokenizer_fields() -> dict:
    return {k: v[1] if t == V.ARRAY else v for k, t, v in gguf_base()[0] if k.startswith("tokenizer.")}


def load_model_and_tokenizer(p: Path) -> None:
    w = load_weights(p)
    tok = load_tokenizer(w, None, p)
    exercise(tok)
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def gguf(edit: Callable | None = None, mutate: Callable | None = None):
    """A case on the base GGUF: `edit(kvs, tensors)` changes its structure (returns gguf_bytes' keyword
    arguments, or None), `mutate(bytearray, tensor positions)` its bytes."""
    def make(folder):
        kvs, tensors = gguf_base()
        kvs, tensors = list(kvs), [dict(t) for t in tensors]
        data, at = gguf_bytes(kvs, tensors, **((edit(kvs, tensors) if edit else None) or {}))
        p = written(folder, "m.gguf", mutate(bytearray(data), at) if mutate else data)
        return lambda: load_model_and_tokenizer(p)
    return make


def set_kv(key: str, vtype: int, value):
    def edit(kvs, tensors):
        i = next((i for i, kv in enumerate(kvs) if kv[0] == key), len(kvs))
        kvs[i:i + 1] = [] if vtype is None else [(key, vtype, value)]
    return edit


def gguf_metadata_cases():
    u, f = V.UINT32, V.FLOAT32
    per_layer = (V.INT32, [4])
    for key, bad_values, other_values in [
        ("vocab_size", [(u, 0), (u, 9), (V.STRING, "8"), (V.INT32, -8)], []),
        ("context_length", [(u, 0), (V.INT32, -1), (f, 16.0)], [(V.UINT64, 2**31), (u, 1)]),
        ("embedding_length", [(u, 0), (u, 33), (u, 64), (V.INT32, -32), (V.ARRAY, (V.INT32, [32]))], []),
        ("feed_forward_length", [(u, 0), (u, 65), (V.UINT64, 2**63), (V.ARRAY, (V.INT32, [64, 64]))],
         [(V.ARRAY, (V.INT32, [64]))]),
        ("block_count", [(u, 0), (u, 2), (V.UINT64, 2**40), (V.BOOL, True)], []),
        ("attention.head_count", [(u, 0), (u, 3), (u, 8), (u, 32), (V.ARRAY, per_layer)], []),
        ("attention.head_count_kv", [(u, 0), (u, 1), (u, 3), (u, 8), (V.FLOAT64, 2.0)], []),
        ("rope.dimension_count", [(u, 4), (u, 0), (V.STRING, "x")], []),
        # a head's width: odd, then not the tensors' (Wq's rows, and RoPE's), then too large for any
        ("attention.key_length", [(u, 3), (u, 4), (V.UINT64, 2**40), (V.STRING, "8")],
         [(u, G["dim"] // G["n_heads"]), (u, 0)]),
        ("attention.value_length", [(u, 4), (u, 2**31)], [(u, G["dim"] // G["n_heads"])]),
        ("rope.freq_base", [(f, 0.0), (f, -1.0), (f, math.nan), (f, math.inf), (u, 10000),
                            (V.FLOAT64, 1e-300), (V.FLOAT64, 1e300)], [(f, 1e-30)]),    # 0, inf in float32
        ("attention.layer_norm_rms_epsilon", [(f, 0.0), (f, -1e-5), (f, 1.0), (f, math.nan), (f, math.inf)],
         [(V.FLOAT64, 1e-6)]),
    ]:
        for bad, values in ((True, bad_values), (False, other_values)):
            for vtype, value in values:
                name = f"gguf-llama.{key}={value if vtype != V.ARRAY else value[1]}-{vtype.name.lower()}"
                add("GGUF", name, bad, gguf(set_kv(f"llama.{key}", vtype, value)))
    for k, (key, vtype, value, bad) in enumerate([
        ("general.architecture", V.STRING, "gpt2", True), ("general.architecture", V.STRING, "", True),
        ("general.architecture", None, None, True), ("general.architecture", V.UINT32, 1, True),
        ("general.architecture", V.STRING, "qwen2", True),      # no qwen2.* keys, no biases
        ("general.architecture", V.STRING, "qwen3", True),      # no qwen3.* keys, no heads' norms
        ("llama.rope.scaling.type", V.STRING, "llama3", True),  # without its parameters
        ("llama.rope.scaling.factor", V.STRING, "8", True), ("llama.expert_count", u, 8, True),
        ("llama.expert_count", u, 0, False),
        ("general.alignment", u, 0, True), ("general.alignment", u, 3, True), ("general.alignment", u, 48, True),
        ("general.alignment", V.UINT64, 2**63, True), ("general.alignment", u, 16, False),
        ("general.alignment", u, 64, False), ("general.alignment", V.STRING, "32", True),
        ("llama.rope.scaling.type", V.STRING, "longrope", True), ("llama.rope.scaling.type", V.STRING, "none", False),
        ("llama.rope.scaling.type", V.STRING, "yarn", False),   # without a factor: no scaling, as llama.cpp
        ("llama.rope.scaling.factor", f, 4.0, False), ("llama.rope.scaling.factor", f, math.inf, True),
        ("llama.rope.scale_linear", f, math.nan, True), ("llama.rope.scaling.attn_factor", f, -1.0, True),
        ("llama.rope.scaling.attn_factor", V.STRING, "1", True),
        ("dpllama.format", u, 2, True), ("dpllama.format", u, 1, False), ("dpllama.kind.output", V.STRING, "q8", True),
        ("tokenizer.ggml.model", V.STRING, "bert", True), ("tokenizer.ggml.model", None, None, True),
        ("tokenizer.ggml.model", V.STRING, "llama", False), ("tokenizer.ggml.pre", V.STRING, "llama3", False),
        ("tokenizer.ggml.pre", V.STRING, "weird", True), ("tokenizer.ggml.pre", None, None, True),
        ("tokenizer.ggml.pre", V.STRING, "qwen2", False),
        ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, []), True),
        ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, ["hi"] * 8), True),
        ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, VOCAB + [f"t{i}" for i in range(4000)]), True),
        ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, [b"\xff\xfe", b"", *VOCAB[2:]]), False),
        ("tokenizer.ggml.tokens", V.ARRAY, (V.UINT32, list(range(8))), True),
        ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [1] * 4), True),
        ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [99, -1, 6, 6, 5, 4, 3, 2]), False),
        ("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [math.nan] * 8), False),
        ("tokenizer.ggml.merges", V.ARRAY, (V.STRING, ["hi"]), True),
        ("tokenizer.ggml.merges", V.ARRAY, (V.STRING, ["q z", " ", "hi !"]), False),
        ("tokenizer.ggml.merges", V.ARRAY, (V.STRING, MERGES[::-1]), False),
        ("tokenizer.ggml.bos_token_id", V.UINT32, 2**31, False), ("tokenizer.ggml.bos_token_id", V.INT32, -1, False),
        ("tokenizer.ggml.eos_token_id", V.UINT64, 2**63, False), ("tokenizer.ggml.bos_token_id", V.STRING, "1", True),
        ("tokenizer.ggml.add_bos_token", V.BOOL, b"\x07", False), ("tokenizer.ggml.add_bos_token", u, 1, True),
        ("tokenizer.chat_template", V.STRING, "{% for %}", False),
        ("tokenizer.chat_template", V.STRING, "{{ raise_exception('no') }}", False),
        ("tokenizer.chat_template", V.STRING, "{{ ''.__class__.__mro__ }}", False),
        ("general.name", V.STRING, b"\x03\x00\x00\x00\x00\x00\x00\x00\xff\xfe\xfd", True),   # not UTF-8
        ("general.name", 13, b"", True), ("general.name", V.ARRAY, (V.ARRAY, []), True),
        ("general.name", V.ARRAY, (99, []), True), ("general.name", V.STRING, b"\xff" * 8, True),
    ]):
        shown = str(value)[:24] if not isinstance(value, tuple) else f"{len(value[1])}x{value[0]}"
        add("GGUF", f"gguf-{k}-{key}={shown}-{vtype}", bad, gguf(set_kv(key, vtype, value)))

    def duplicate(kvs, tensors):
        kvs.append(kvs[2])
    add("GGUF", "gguf-duplicate-key", True, gguf(duplicate))

    def llama3_scaling(factor: float):     # Llama 3.1's RoPE scaling with this factor
        def edit(kvs, tensors):
            for key, vtype, value in [("type", V.STRING, "llama3"), ("factor", f, factor), ("low_freq_factor", f, 1.0),
                                      ("high_freq_factor", f, 4.0), ("original_context_length", u, 8192)]:
                set_kv(f"llama.rope.scaling.{key}", vtype, value)(kvs, tensors)
        return edit
    for factor, bad in [(8.0, False), (math.inf, True), (1e-45, True)]:    # 1e-45: a float32 below the normal ones
        add("GGUF", f"gguf-llama3-scaling-factor={factor}", bad, gguf(llama3_scaling(factor)))

    def vocabulary(tokens: list):   # tokens, their types and scores, consistent
        def edit(kvs, tensors):
            for key, item, value in [("tokens", V.STRING, tokens), ("scores", V.FLOAT32, [0.0] * len(tokens)),
                                     ("token_type", V.INT32, [3] + [1] * (len(tokens) - 1))]:
                set_kv(f"tokenizer.ggml.{key}", V.ARRAY, (item, value))(kvs, tensors)
        return edit
    add("GGUF", "gguf-tokens-past-embedding", True, gguf(vocabulary(VOCAB + ["hi!", "!!"])))
    add("GGUF", "gguf-tokens-fewer-than-embedding", False, gguf(vocabulary(VOCAB[:6])))


def gguf_table_cases():
    def tensor(i: int, **change):
        def edit(kvs, tensors):
            tensors[i].update({k: v(tensors[i]) if callable(v) else v for k, v in change.items()})
        return edit
    n = len(TYPES)
    last = n - 1
    for name, bad, edit in [
        ("swap-dims", True, tensor(last, dims=lambda t: t["dims"][::-1])),
        ("dim+1", True, tensor(last, dims=lambda t: [t["dims"][0] + 1, t["dims"][1]])),
        ("dims-0", True, tensor(2, dims=[])), ("dims-5", True, tensor(2, dims=[32, 1, 1, 1, 1])),
        ("dims-3", True, tensor(last, dims=lambda t: t["dims"] + [1])),
        ("dim-huge", True, tensor(last, dims=lambda t: [t["dims"][0], 2**40])),
        ("dims-product-overflow", True, tensor(last, dims=[2**32, 2**32])),
        ("q8-dim-not-block", True, tensor(1, dims=lambda t: [16, t["dims"][1] * 2])),
        ("type-99", True, tensor(2, type=99)), ("type-I8", True, tensor(2, type=T.I8)),
        ("type-Q2_K", True, tensor(last, type=T.Q2_K)),
        ("f32-as-f16", False, tensor(2, type=T.F16)), ("q8-as-q4_0", False, tensor(1, type=T.Q4_0)),
        ("offset+1", True, tensor(0, offset=1)), ("offset+16", True, tensor(1, offset=lambda t: 16)),
        ("offset-past-end", True, tensor(last, offset=1 << 41)), ("offset-2^63", True, tensor(last, offset=2**63)),
        ("overlap", True, tensor(1, offset=0)), ("overlap-last", True, tensor(last, offset=0)),
        ("duplicate-name", True, tensor(3, name="output_norm.weight")),
        ("rename", True, tensor(4, name="blk.0.attn_qq.weight")),
        ("rename-blk1", True, tensor(4, name="blk.1.attn_q.weight")),
        ("name-not-utf8", True, tensor(4, name=b"\xff\xfe")),
    ]:
        add("GGUF", f"gguf-table-{name}", bad, gguf(edit))

    def drop(i):
        def edit(kvs, tensors):
            del tensors[i]
        return edit

    def extra(kvs, tensors):
        tensors.append(dict(name="blk.0.attn_q_norm.weight", dims=[8], type=T.F32, offset=None, data=bytes(32)))

    add("GGUF", "gguf-table-drop-norm", True, gguf(drop(2)))
    add("GGUF", "gguf-table-drop-output", False, gguf(drop(0)))     # a tied classifier then
    add("GGUF", "gguf-table-extra-tensor", True, gguf(extra))
    for name, counts, bad in [("tensors-1", (n - 1, None), True), ("tensors+1", (n + 1, None), False),
                              ("tensors-huge", (2**63, None), True), ("kv+1", (None, 1), False),
                              ("kv-1", (None, -1), False), ("kv-huge", (None, 2**63), True),
                              ("tensors-0", (0, None), True)]:
        def edit(kvs, tensors, counts=counts):
            t, k = counts
            return dict(counts=(t if t is not None else len(tensors), len(kvs) + k if k else len(kvs)))
        add("GGUF", f"gguf-count-{name}", bad, gguf(edit))
    for version in (0, 1, 4, 2**31):
        add("GGUF", f"gguf-version-{version}", True, gguf(lambda kvs, tensors, v=version: dict(version=v)))
    for name, value in [("key-length-huge", 2**63), ("key-length-past-end", 2**20)]:
        add("GGUF", f"gguf-{name}", True, gguf(mutate=lambda d, at, v=value: put(d, 24, "Q", v)))

    def tokens_count(v):  # the tokens array's count, found by its key
        def mutate(d, at):
            i = bytes(d).index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
            return put(d, i, "Q", v)
        return mutate
    add("GGUF", "gguf-array-count-huge", True, gguf(mutate=tokens_count(2**62)))
    add("GGUF", "gguf-array-count+1", True, gguf(mutate=tokens_count(len(VOCAB) + 1)))


def gguf_data_cases():
    rng = random.Random(23)
    kinds = list(TYPES)
    # bits of a bad value: float32 in F32, float16 in F16 and in the block scales of Q8_0 (d), Q4_0 (d), Q4_1
    # (d, m), IQ4_NL (d) and IQ4_XS (d), whose blocks are 34, 18, 20, 18 and 136 bytes
    f16 = {"nan": 0x7E00, "inf": 0x7C00, "-inf": 0xFC00}
    for value in ("nan", "inf", "-inf"):
        for name in kinds:
            t = TYPES[name]
            k = rng.randrange(8)
            if t == T.F32:
                mutate = lambda d, at, name=name, k=k, v=float(value): put(d, at[name] + 4 * k, "f", v)
            elif t == T.BF16:
                mutate = lambda d, at, name=name, k=k, v=float(value): put(
                    d, at[name] + 2 * k, "H", np.float32(v).view(np.uint32) >> 16)
            else:
                block = {T.F16: 2, T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20, T.IQ4_NL: 18, T.IQ4_XS: 136}[t]
                scale = 2 * rng.randrange(2) if t == T.Q4_1 else 0
                mutate = lambda d, at, name=name, o=block * (k % 4) + scale, v=f16[value]: put(d, at[name] + o, "H", v)
            if name in ("output.weight", "blk.0.ffn_up.weight") or t != T.F32:
                add("GGUF", f"gguf-data-{name}-{value}", True, gguf(mutate=mutate))
    end = len(gguf_bytes(*gguf_base())[0])
    start = min(gguf_bytes(*gguf_base())[1].values())
    for k in range(8):
        s = rng.randrange(1 << 30)
        add("GGUF", f"gguf-data-flip-{k}", False,
            gguf(mutate=lambda d, at, s=s: flip(d, random.Random(s), start, end, 1 + s % 4)))
    for k in range(20):
        s = rng.randrange(1 << 30)
        add("GGUF", f"gguf-header-flip-{k}", False,
            gguf(mutate=lambda d, at, s=s: flip(d, random.Random(s), 0, start, 1 + s % 3)))
    for cut in sorted({0, 3, 4, 23, start - 1, start, end - 1} | {rng.randrange(end) for _ in range(6)}):
        add("GGUF", f"gguf-truncate-{cut}", True, gguf(mutate=lambda d, at, cut=cut: bytes(d[:cut])))
    add("GGUF", "gguf-text-file", True, gguf(mutate=lambda d, at: b"this is not a model\n"))


@functools.cache
def container_base() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        w = quantize(random_weights(**G, shared=True, seed=2), 32)
        write_dpllama_gguf(Path(d) / "q.gguf", w, gguf_tokenizer_fields())
        return (Path(d) / "q.gguf").read_bytes()


@functools.cache
def container_tensors() -> tuple[dict[str, int], int]:
    """Where each tensor's data starts in the container base, and where the last one ends (gguf's reader)."""
    with tempfile.TemporaryDirectory() as d:
        tensors = GGUFReader(written(Path(d), "q.gguf", container_base())).tensors
        return {t.name: int(t.data_offset) for t in tensors}, max(int(t.data_offset + t.n_bytes) for t in tensors)


def container(mutate: Callable[[bytearray], bytes]):
    def make(folder):
        p = written(folder, "q.gguf", mutate(bytearray(container_base())))
        return lambda: load_model_and_tokenizer(p)
    return make


def after_key(d: bytearray, key: str) -> int:
    """Where the value of metadata `key` starts (past its type)."""
    return bytes(d).index(key.encode()) + len(key) + 4


def container_cases():
    rng = random.Random(31)
    for name, key, fmt, value in [("kind-int5", "dpllama.kind.blk.0.attn_q", "12s", b"\x04" + bytes(7) + b"int5"),
                                  ("group0", "dpllama.group.blk.0.attn_k", "I", 0),
                                  ("group7", "dpllama.group.blk.0.attn_k", "I", 7),
                                  ("group12", "dpllama.group.blk.0.attn_k", "I", 12),
                                  ("group64", "dpllama.group.blk.0.attn_k", "I", 64),
                                  ("group-huge", "dpllama.group.blk.0.attn_k", "I", 2**32 - 1),
                                  ("format2", "dpllama.format", "I", 2), ("format0", "dpllama.format", "I", 0)]:
        add("GGUF", f"dpllama-gguf-{name}", True,
            container(lambda d, key=key, fmt=fmt, value=value: put(d, after_key(d, key), fmt, value)))
    at, end = container_tensors()
    for name, value in [("blk.0.attn_q.scales", 0x7E00), ("blk.0.ffn_up.mins", 0x7C00),
                        ("token_embd.scales", 0xFF800000), ("blk.0.ffn_down.scales", 0xFC00)]:
        fmt = "I" if name == "token_embd.scales" else "H"
        add("GGUF", f"dpllama-gguf-{name}-{value:x}", True,
            container(lambda d, p=at[name] + 4 * rng.randrange(4), fmt=fmt, v=value: put(d, p, fmt, v)))
    start = min(at.values())
    for k in range(4):
        add("GGUF", f"dpllama-gguf-qweight-flip-{k}", False,
            container(lambda d, k=k, q=at["blk.0.attn_v.qweight"]: flip(d, random.Random(k), q, q + 64, 3)))
        add("GGUF", f"dpllama-gguf-header-flip-{k}", False,
            container(lambda d, k=k: flip(d, random.Random(100 + k), 0, start, 2)))
    for cut in (start - 10, start + 100, end - 1):
        add("GGUF", f"dpllama-gguf-truncate-{cut}", True, container(lambda d, cut=cut: bytes(d[:cut])))


gguf_metadata_cases()
gguf_table_cases()
gguf_data_cases()
container_cases()


# ------------------------------------------------------------------------------------------ tokenizer.bin

def tok_bytes(pieces: list[bytes], scores=None) -> bytes:
    out = struct.pack("<i", max(map(len, pieces), default=0))
    for p, s in zip(pieces, scores or [0.0] * len(pieces)):
        out += struct.pack("<fi", s, len(p)) + p
    return out


TINY = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"b", b"ab", b" a", b"\xe2\x96", b"<0x41>"]   # no byte tokens


@functools.cache
def tok512() -> bytes:
    return TOK512.read_bytes()


@functools.cache
def tok512_entry(k: int) -> int:
    """The offset of token k's (score, length) in tok512.bin."""
    return tok512_entries()[k]


@functools.cache
def tok512_entries() -> list[int]:
    d, at, out = tok512(), 4, []
    while at < len(d):
        out.append(at)
        at += 8 + struct.unpack_from("<i", d, at + 4)[0]
    return out


def tokenizer_case(mutate: Callable[[bytearray], bytes], vocab: int | None = 512, base: Callable = tok512):
    def make(folder):
        p = written(folder, "tok.bin", mutate(bytearray(base())))
        return lambda: exercise(Llama2cTokenizer(p, vocab))
    return make


def tokenizer_cases():
    rng = random.Random(41)
    # where to cut: a byte offset, or from the end when negative
    for cut in sorted({0, 3, 4, 11, -1} | {rng.randrange(-6000, -1) for _ in range(8)}):
        add("tokenizer.bin", f"tok-truncate-{cut}", True, tokenizer_case(lambda d, cut=cut: bytes(d[:cut])))
    for k in range(5):      # at a token's end: a shorter vocabulary, when no model says how long
        t = rng.randrange(3, 512)
        add("tokenizer.bin", f"tok-truncate-token-{t}-no-vocab", False,
            tokenizer_case(lambda d, t=t: bytes(d[:tok512_entry(t)]), vocab=None))
    for value in (-1, -2**31, 2**31 - 1, 1 << 20):
        for t in rng.sample(range(512), 2):
            add("tokenizer.bin", f"tok-length={value}-token-{t}", True,
                tokenizer_case(lambda d, t=t, v=value: put(d, tok512_entry(t) + 4, "i", v)))
    for delta in (-1, 1, 3, -4):
        t = rng.randrange(512)
        add("tokenizer.bin", f"tok-length{delta:+}-token-{t}", False, tokenizer_case(
            lambda d, t=t, delta=delta: put(d, tok512_entry(t) + 4, "i",
                                            max(0, struct.unpack_from("<i", d, tok512_entry(t) + 4)[0] + delta))))
    for value in (math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45):
        for t in rng.sample(range(512), 2):
            add("tokenizer.bin", f"tok-score={value}-token-{t}", False,
                tokenizer_case(lambda d, t=t, v=value: put(d, tok512_entry(t), "f", v)))

    def all_nan(d):
        for at in tok512_entries():
            struct.pack_into("<f", d, at, math.nan)
        return bytes(d)
    add("tokenizer.bin", "tok-scores-all-nan", False, tokenizer_case(all_nan))
    for value in (0, -1, 2**31 - 1):
        add("tokenizer.bin", f"tok-max-length={value}", False,
            tokenizer_case(functools.partial(put, at=0, fmt="i", value=value)))
    for n in (1, 7, 8, 12):
        add("tokenizer.bin", f"tok-append-{n}", True, tokenizer_case(lambda d, n=n: bytes(d) + bytes(n)))
    for k in range(10):
        s = rng.randrange(1 << 30)
        add("tokenizer.bin", f"tok-flip-{k}", False,
            tokenizer_case(lambda d, s=s: flip(d, random.Random(s), 0, len(d), 1 + s % 3)))
    tiny = lambda: tok_bytes(TINY)  # noqa: E731
    add("tokenizer.bin", "tok-tiny-no-byte-tokens", False, tokenizer_case(bytes, vocab=len(TINY), base=tiny))
    add("tokenizer.bin", "tok-tiny-no-space", False,
        tokenizer_case(bytes, vocab=None, base=lambda: tok_bytes(TINY[:3])))
    add("tokenizer.bin", "tok-two-tokens", True, tokenizer_case(bytes, vocab=None, base=lambda: tok_bytes(TINY[:2])))
    add("tokenizer.bin", "tok-no-tokens", True, tokenizer_case(bytes, vocab=None, base=lambda: tok_bytes([])))
    add("tokenizer.bin", "tok-utf8-broken", False,
        tokenizer_case(bytes, vocab=None, base=lambda: tok_bytes(TINY[:3] + [b"\xff", b"\xc3", b" \xe2\x82", b"\x00"])))

    def for_model(folder):     # a tokenizer of the wrong size for the model
        p = written(folder, "tok.bin", tok512())
        return lambda: llama2c_model_tokenizer(str(p), 511, folder / "m.bin")
    add("tokenizer.bin", "tok-wrong-vocab-for-model", True, for_model)

    def model_without_tokenizer(folder):
        p = written(folder, "m.bin", l2c_base(1))
        return lambda: tokenizer_only(str(p), None)
    add("tokenizer.bin", "tok-none-beside-model", True, model_without_tokenizer)
    for name, path in [("missing", "nope.bin"), ("folder", "."), ("nul", "a\x00b.bin"), ("empty-name", "")]:
        add("tokenizer.bin", f"tok-path-{name}", True,
            lambda folder, path=path: lambda: tokenizer_only(None, str(folder / path) if path else path))


tokenizer_cases()


# ------------------------------------------------------------------------------------------- YAML configs

def config_case(data: Callable[[], bytes]):
    def make(folder):
        p = written(folder, "c.yaml", data())
        return lambda: load_config(p)
    return make


def yaml_with(path: tuple, value) -> Callable[[], bytes]:
    def data():
        d = defaults()
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return yaml.safe_dump(d, allow_unicode=True).encode()
    return data


def yaml_chars(text: bytes, rng: random.Random) -> bytes:
    d = bytearray(text)
    for _ in range(1 + rng.randrange(3)):
        d[rng.randrange(len(d))] = rng.choice(b":-[]{}#&*!|>'\"%@`, \n\t?0x.")
    return bytes(d)


def schema_keys(d: dict, prefix=()) -> list:
    """(path, default) of every key of a config."""
    return [x for k, v in d.items()
            for x in (schema_keys(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])]


def config_cases():
    rng = random.Random(53)
    bad_of = {int: ["x", 1.5, True, [1], {"a": 1}, None, -1, 2**63, 2**31],
              str: [5, ["a"], {"a": "b"}, True, 1.5, None],
              bool: [1, "x", [], None, 0.0], list: ["x", [1], [["a"]], {"a": 1}, None, [None]]}
    for path, default in schema_keys(defaults()):
        typ = type(default)
        bad = list(bad_of[typ])
        if path[0] == "work_group":
            bad += ([0, 65536, 3] if path[1] in ("gemv", "reduce", "attention", "tile_rows") else
                    [65536, 24] if path[1] == "key_block" else      # key_block 0: one block
                    [0, 65536, 24] if path[1] == "attention_span" else
                    [65536] if path[1] in ("decode_prefetch", "prefill_prefetch") else [0, 65536])   # 0: none
        if path[0] == "match":
            bad += ["a,b"] + (["quantum"] if path[1] == "type" else [])
        for value in rng.sample(bad, 3):
            add("YAML config", f"yaml-{'.'.join(path)}={value!r}", True, config_case(yaml_with(path, value)))
        good = {int: 2 ** rng.randrange(6), str: random_text(rng, 6).encode("utf-8", "replace").decode(), bool: False,
                list: [random_text(rng, 4)]}[typ]
        add("YAML config", f"yaml-{'.'.join(path)}-other", False, config_case(yaml_with(path, good)))
    base = yaml.safe_dump(defaults()).encode()
    for name, text, bad in [
        ("unknown-top", b"gpu_magic: 1\n", True), ("unknown-nested", b"work_group: {gemm: 64}\n", True),
        ("section-not-map", b"work_group: 64\n", True), ("empty", b"", False), ("comment-only", b"# x\n", False),
        ("byte-ff", b"\xff", True), ("bytes-in-value", b"name: \xff\xfe\n", True),
        ("utf16", "name: x\n".encode("utf-16"), True), ("unclosed-list", b"build_options: [\n", True),
        ("tab-indent", b"work_group:\n\tgemv: 64\n", True), ("bad-indent", b"name: x\n  y: z\n", True),
        ("unclosed-map", b"{", True), ("unclosed-quote", b"name: 'x\n", True), ("list-top", b"- a\n- b\n", True),
        ("int-top", b"42\n", True), ("str-top", b"'x'\n", True),
        ("python-tag", b"!!python/object/apply:os.system ['true']\n", True),
        ("binary-tag", b"name: !!binary aGk=\n", True),
        ("float-tag", b"work_group: {gemv: !!float 64}\n", True), ("self-alias", b"build_options: &x [*x]\n", True),
        ("alias-bomb", b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nbuild_options: [*c, *c]\n", True),
        ("nested-50", b"build_options: " + b"[" * 50 + b"]" * 50 + b"\n", True),
        ("duplicate-key", b"name: a\nname: b\n", False),
        ("long-int", b"memory: {max_alloc_mb: 1" + b"0" * 400 + b"}\n", True),
        ("inf", b"work_group: {gemv: .inf}\n", True), ("nan", b"memory: {max_alloc_mb: .nan}\n", True),
        ("hex", b"work_group: {gemv: 0x40}\n", False), ("octal", b"work_group: {gemv: 0o100}\n", False),
        ("sexagesimal", b"work_group: {gemv: 1:04}\n", False), ("bool-yes", b"queue: {profiling: yes}\n", False),
        ("long-name", b"name: " + b"x" * 100000 + b"\n", False), ("crlf", base.replace(b"\n", b"\r\n"), False),
        ("bom", b"\xef\xbb\xbf" + base, False),
    ]:
        add("YAML config", f"yaml-{name}", bad, config_case(lambda text=text: text))
    lines = base.splitlines(keepends=True)
    for k in range(12):     # characters that mean something to YAML, in place of others
        s = rng.randrange(1 << 30)
        add("YAML config", f"yaml-chars-{k}", False, config_case(lambda s=s: yaml_chars(base, random.Random(s))))
    for k in range(4):
        drop = rng.sample(range(len(lines)), 3)
        add("YAML config", f"yaml-drop-lines-{k}", False,
            config_case(lambda drop=drop: b"".join(l for i, l in enumerate(lines) if i not in drop)))
    for k in range(2):
        s = rng.randrange(1 << 30)
        add("YAML config", f"yaml-random-bytes-{k}", False, config_case(lambda s=s: random.Random(s).randbytes(64)))

    # on the device: sizes that parse but may not fit it, with a model to run
    for section, key, value in [("work_group", "gemv", 32768), ("work_group", "reduce", 8192),
                                ("work_group", "attention", 4096), ("work_group", "prefill_chunk", 60000),
                                ("memory", "max_alloc_mb", 1)]:
        def make(folder, section=section, key=key, value=value):
            p = written(folder, "c.yaml", yaml_with((section, key), value)())

            def run():
                llm = dpllama.load(str(STORIES), str(TOK512), config=str(p), max_seq=32)
                "".join(llm.generate("Once", steps=12, temperature=0))
            return run
        add("YAML config", f"yaml-device-{key}={value}", False, make)


config_cases()


# ------------------------------------------------------------------------- prompts and API arguments

SAMPLER_VALUES = {"temperature": [0, 0.7, 1, 2, -1, -0.0, math.nan, math.inf, 1e-300, 5e-324, 1e300],
                  "top_p": [0, 0.5, 0.9, 1, 1.5, -0.1, math.nan, math.inf, 1e-9],
                  "top_k": [0, 1, 5, 10**9, -1, -2**63],
                  "repeat_penalty": [1, 1.3, 0.5, 0, -1, math.nan, math.inf, 1e-30, 1e30],
                  "repeat_last_n": [64, 0, -1, -2, 2**40, -2**63],
                  "seed": [0, 1, -1, 2**64, 2**70, -2**70]}
SAMPLER_OK = {"temperature": lambda t: 0 <= t < math.inf, "top_p": lambda p: 0 <= p <= 1, "top_k": lambda k: k >= 0,
              "repeat_penalty": lambda r: 0 < r < math.inf, "repeat_last_n": lambda n: n >= -1, "seed": lambda s: True}
LOGITS = [np.random.default_rng(0).normal(0, 3, 50).astype(np.float32), np.zeros(50, np.float32),
          np.ones(1, np.float32), np.array([3e38, -3e38, 0, 1e-45, -1e-45], np.float32)]


def sampler_args(rng: random.Random, keys=SAMPLER_VALUES) -> tuple[dict, bool]:
    """Sampler arguments drawn from SAMPLER_VALUES, and whether they are certainly invalid."""
    kw = {k: rng.choice(SAMPLER_VALUES[k]) for k in keys}
    return kw, not all(SAMPLER_OK[k](v) for k, v in kw.items())


def sample_all(kw: dict) -> None:
    s = Sampler(**kw)
    for logits in LOGITS:
        for history in ([], [0, 1, 1, 3]):
            t = s.pick(logits, [i % len(logits) for i in history])
            assert 0 <= t < len(logits), (kw, t)


@functools.cache
def prompt_tokenizers() -> dict:
    fields = gguf_tokenizer_fields()
    return {"tok512": Llama2cTokenizer(TOK512), "llama2": Llama2cTokenizer(TOK512.parent / "tokenizer.bin"),
            "gpt2": tokenizer_from_gguf_fields(fields, "gpt2"),
            "spm": tokenizer_from_gguf_fields(dict(fields, **{"tokenizer.ggml.model": "llama"}), "spm")}


def encode_decode(name: str, text: str, special: bool) -> None:
    tok = prompt_tokenizers()[name]
    ids = tok.encode(text, parse_special=special)
    assert all(0 <= i < tok.vocab_size for i in ids), ids
    assert isinstance(tok.decode(ids), str)
    tok.apply_chat_template([{"role": "system", "content": text}, {"role": "user", "content": text}])


def prompt_cases():
    rng = random.Random(61)
    for k in range(30):
        kw, bad = sampler_args(rng)
        add("prompts and arguments", f"sampler-{k}-" + ",".join(f"{v}" for v in kw.values()), bad,
            lambda folder, kw=kw: lambda: sample_all(kw))
    texts = PROMPTS + [random_text(rng, rng.randrange(1, 200)) for _ in range(4)]
    for name in ("tok512", "llama2", "gpt2", "spm"):
        for i, text in enumerate(texts):
            special = bool(i % 2)
            add("prompts and arguments", f"prompt-{name}-{i}{'-special' if special else ''}", False,
                lambda folder, name=name, text=text, special=special: lambda: encode_decode(name, text, special))
    for steps in (-1, -2**63, 0, 5, 2**63):
        add("prompts and arguments", f"check-steps={steps}", steps < 0, lambda folder, n=steps: lambda: check_steps(n))

    # on the device, the shared stories260K
    for k in range(20):
        kw, bad = sampler_args(rng, ("temperature", "top_p", "top_k", "repeat_penalty", "seed"))
        steps = rng.choice([-1, -2**63, 0, 1, 7, 64, 2**40])
        prompt = rng.choice(texts)

        def make(folder, llm, kw=kw, steps=steps, prompt=prompt):
            return lambda: "".join(llm.generate(prompt, steps=steps, **kw))
        add("prompts and arguments", f"generate-{k}-steps={steps}", bad or steps < 0, make, device=True)
    for ids in ([-1], [512], [2**31 - 1], [1, 600], [1, -2**31], []):
        def make(folder, llm, ids=ids):
            return lambda: list(generate(llm.model, ids, 8, Sampler(temperature=0)))
        add("prompts and arguments", f"generate-ids={ids}", True, make, device=True)
    model, tok = str(STORIES), str(TOK512)
    for name, kwargs, bad in [("max-seq=-1", dict(max_seq=-1), True), ("max-seq=-5", dict(max_seq=-5), True),
                              ("max-seq=1", dict(max_seq=1), False), ("max-seq=2^40", dict(max_seq=2**40), False),
                              ("device=gpu:9", dict(device="gpu:9"), True),
                              ("device=name~none", dict(device="name~no-such-device"), True),
                              ("device=99", dict(device="99"), True), ("device=,,", dict(device=",,"), False),
                              ("config=none", dict(config="no-such-config"), True),
                              ("tokenizer=folder", dict(tokenizer=str(TOK512.parent)), True),
                              ("tokenizer=nul", dict(tokenizer="a\x00b"), True),
                              ("model=empty", dict(model=""), True), ("model=nul", dict(model="a\x00b"), True),
                              ("model=tokenizer", dict(model=tok), True)]:
        def make(folder, kwargs=kwargs):
            def run():
                llm = dpllama.load(**dict(dict(model=model, tokenizer=tok), **kwargs))
                "".join(llm.generate("Once", steps=4, temperature=0))
            return run
        add("prompts and arguments", f"load-{name}", bad, make)


prompt_cases()


# -------------------------------------------------------------------------------------------- JSON schemas

SCHEMA = {"$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"},
                                                            "kind": {"enum": ["cat", "dog", 3, None]}},
                            "required": ["name"], "additionalProperties": False}},
          "type": "object", "title": "Person",
          "properties": {"name": {"type": "string"}, "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                         "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
                         "extra": {"type": "object", "additionalProperties": {"type": ["number", "boolean"]}}},
          "required": ["name", "pets"]}
SCHEMA_JUNK = [None, True, False, 0, -1, 2**63, 1.5, -0.0, "", "object", "string", "array", "integer", "#",
               "#/$defs/Pet", "#/$defs/", "#/$defs/Pet/properties", "\ud800", [], [None], {}, {"type": "float"},
               {"$ref": "#"}, ["name", "name"], "name", "a" * 300]
SCHEMA_KEYS = ["type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
               "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "title", "not", "minLength", "pattern", "format",
               "minimum", "uniqueItems", "prefixItems", "nullable", ""]


def schema_paths(value, at=()) -> list[tuple]:
    """The path of every value inside a JSON value."""
    paths = [at]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        paths += schema_paths(inner, at + (key,))
    return paths


def schema_mutant(rng: random.Random) -> dict:
    """SCHEMA with one to three values replaced, keys added or keys removed, at random places."""
    import copy
    schema = copy.deepcopy(SCHEMA)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(schema_paths(schema)[1:])
        parent = functools.reduce(lambda v, k: v[k], path[:-1], schema)
        action = rng.randrange(3)
        if action == 0:
            parent[path[-1]] = rng.choice(SCHEMA_JUNK)
        elif action == 1 and isinstance(parent, dict):
            parent[rng.choice(SCHEMA_KEYS)] = rng.choice(SCHEMA_JUNK)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    return schema


def hold_to(schema, rng: random.Random) -> None:
    """Compile the schema and walk its grammar 300 bytes, each drawn from those that continue it."""
    g = grammar(schema)
    states, alphabet = g.open, bytes(range(0x20, 0x7F)) + b"\n\xc3\xa9"
    for _ in range(300):
        nexts = [t for t in (g.advance(states, b) for b in alphabet) if t is not None]
        if not nexts:
            assert done(states), states     # a state that takes no byte has closed
            break
        states = rng.choice(nexts)


def schema_cases():
    rng = random.Random(83)
    for k in range(60):
        schema = schema_mutant(rng)
        add("JSON schemas", f"schema-mutant-{k}", False,
            lambda folder, s=schema, k=k: lambda: hold_to(s, random.Random(k)))
    for name, schema in [("root-array", {"type": "array"}), ("root-string", {**SCHEMA, "type": "string"}),
                         ("pattern", {"properties": {"a": {"type": "string", "pattern": "^a(?=b)"}}}),
                         ("pattern-nested", {"properties": {"a": {"type": "string", "pattern": "(" * 999 + ")" * 999}}}),
                         ("format", {"properties": {"a": {"type": "string", "format": "email"}}}),
                         ("ref-missing", {"properties": {"a": {"$ref": "#/$defs/None"}}}),
                         ("ref-self", {"properties": {"a": {"$ref": "#/$defs/A"}},
                                       "$defs": {"A": {"$ref": "#/$defs/A"}}}),
                         ("required-undefined", {"properties": {}, "required": ["a"]}),
                         ("deep", functools.reduce(lambda s, _: {"properties": {"a": s}}, range(40), {})),
                         ("nan-enum", {"properties": {"a": {"enum": [math.nan]}}}),
                         ("not-json", {"properties": {"a": {"const": object()}}}),
                         ("huge-enum", {"properties": {"a": {"enum": ["x" * 130_000]}}})]:
        add("JSON schemas", f"schema-{name}", True, lambda folder, s=schema: lambda: hold_to(s, random.Random(0)))


schema_cases()


# ------------------------------------------------------------------- models that load but overflow on the device

def overflowing(change: Callable):
    """A random model whose weights are all below the loaders' bound, but large enough (`change`) that its
    activations may overflow: the run either ends in the loop's check of the logits or succeeds."""
    def make(folder, llm):
        w = random_weights(**L2C, seed=3)
        change(w)
        write_llama2c(folder / "m.bin", w, 1)

        def run():
            model = Llama(load_weights(folder / "m.bin"), llm.model.q)
            for sampler in (Sampler(temperature=0), Sampler(temperature=1, seed=1),
                            Sampler(temperature=0, repeat_penalty=1.5)):
                list(generate(model, [1, 2, 3], 8, sampler))
        return run
    return make


def big_cases():
    big = 4e9      # just below MAX_WEIGHT
    for name, change in [("embedding", lambda w: w.tok_embeddings.data.fill(big)),
                         ("final-norm", lambda w: w.norm.fill(big)),
                         ("attention", lambda w: [(L.attn_norm.fill(big), L.wq.data.fill(big), L.wk.data.fill(-big))
                                                  for L in w.layers]),
                         ("ffn", lambda w: [(L.ffn_norm.fill(big), L.w2.data.fill(-big)) for L in w.layers]),
                         ("one-weight", lambda w: w.layers[1].wo.data.__setitem__((3, 4), big))]:
        add("llama2.c", f"l2c-overflow-{name}", False, overflowing(change), device=True)


big_cases()


# -------------------------------------------------------------------------------------------------- CLI

def cli(*args, env=None, stdin: bytes = b""):
    """Run `dpllama ARGS`: a clean error (exit 1 and one `dpllama: error:` line, or what argparse refuses: exit 2
    and its usage) raises DpllamaError with that line; anything else but a success is a Failure."""
    try:
        r = subprocess.run([sys.executable, "-m", "dpllama.cli", *args], cwd=REPO_ROOT, capture_output=True,
                           input=stdin, timeout=CLI_LIMIT, env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        raise Failure("hangs", f"no end after {CLI_LIMIT} s") from None
    err = r.stderr.decode("utf-8", "replace")
    if r.returncode < 0:
        raise Failure("crashes", f"signal {-r.returncode}: {err[-2000:]}")
    if "Traceback" in err:
        raise Failure("tracebacks", err[-2000:])
    if r.returncode == 0:
        return
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("dpllama: error: ")]
    if r.returncode == 1 and len(errors) == 1:
        raise DpllamaError(errors[0])
    if r.returncode == 2 and lines and lines[0].startswith("usage: dpllama") and " error: " in lines[-1]:
        raise DpllamaError(lines[-1])
    raise Failure("bad messages", f"exit {r.returncode} without one error line: {err[-2000:]}")


def cli_case(name: str, bad: bool, args: Callable, outputs=(), env=None, stdin: bytes = b"",
             same: str | None = None):
    """`args(folder)` writes the inputs and gives the arguments; `same` names an input the run must leave as it was."""
    def make(folder):
        argv = [str(a) if isinstance(a, Path) else a for a in args(folder)]

        def run():
            before = (folder / same).read_bytes() if same else None
            try:
                cli(*argv, env=env, stdin=stdin)
            finally:
                if same and (folder / same).read_bytes() != before:
                    raise Failure("invalid accepted", f"{same} was overwritten")
        return run
    add("CLI", f"cli-{name}", bad, make, outputs=outputs)


def cli_cases():
    S, Z = STORIES, TOK512
    gen = ["generate", "-m", S, "-z", Z, "-n", "8"]

    def fifo(rest: Callable):     # a FIFO named "fifo" in the folder, then the arguments: nobody ever writes to it
        def at(folder):
            os.mkfifo(folder / "fifo")
            return rest(folder)
        return at

    def inputs(**named):    # write {file name: bytes} in the folder, then give the arguments
        def args(rest: Callable):
            def at(folder):
                for n, data in named.items():
                    written(folder, n, data() if callable(data) else data)
                return rest(folder)
            return at
        return args

    nan_at = f32_region(1)[0] + 40
    for name, bad, args in [
        ("generate-folder", True, lambda f: ["generate", "-m", f, "-z", Z]),
        ("generate-missing", True, lambda f: ["generate", "-m", f / "nope.bin", "-z", Z]),
        ("generate-empty", True, inputs(**{"m.bin": b""})(lambda f: ["generate", "-m", f / "m.bin", "-z", Z])),
        ("generate-text-gguf", True, inputs(**{"m.gguf": b"not a model\n"})(
            lambda f: ["generate", "-m", f / "m.gguf"])),
        ("generate-truncated", True, inputs(**{"m.bin": lambda: l2c_base(1)[:5000]})(
            lambda f: ["generate", "-m", f / "m.bin", "-z", Z])),
        ("generate-nan-weight", True, inputs(**{"m.bin": lambda: put(bytearray(l2c_base(1)), nan_at, "f", math.nan)})(
            lambda f: ["generate", "-m", f / "m.bin", "-z", Z])),
        ("generate-gguf-tokens-past-vocab", True, inputs(**{"m.gguf": lambda: gguf_bytes(
            [kv if kv[0] != "tokenizer.ggml.tokens" else (kv[0], V.ARRAY, (V.STRING, VOCAB + ["x", "y"]))
             for kv in gguf_base()[0] if kv[0] != "tokenizer.ggml.token_type"], gguf_base()[1])[0]})(
            lambda f: ["generate", "-m", f / "m.gguf", "-p", "xy"])),
        ("generate-gguf", False, inputs(**{"m.gguf": lambda: gguf_bytes(*gguf_base())[0]})(
            lambda f: ["generate", "-m", f / "m.gguf", "-p", "hi hi!", "-t", "0.5"])),
        ("generate-t-nan", True, lambda f: gen + ["-t", "nan"]),
        ("generate-t-negative", True, lambda f: gen + ["-t", "-1"]),
        ("generate-top-p-2", True, lambda f: gen + ["--top-p", "2"]),
        ("generate-top-k-negative", True, lambda f: gen + ["--top-k", "-3"]),
        ("generate-repeat-penalty-nan", True, lambda f: gen + ["--repeat-penalty", "nan", "-t", "0.8"]),
        ("generate-repeat-last-n", True, lambda f: gen + ["--repeat-last-n", "-2"]),
        ("generate-n-negative", True, lambda f: gen + ["-n", "-5"]),
        ("generate-ctx-0", True, lambda f: gen + ["-c", "0"]),
        ("generate-ctx-negative", True, lambda f: gen + ["--ctx-size", "-1"]),
        ("generate-n-text", True, lambda f: gen + ["-n", "abc"]),
        ("generate-ctx-float", True, lambda f: gen + ["-c", "1e3"]),
        ("generate-t-text", True, lambda f: gen + ["-t", "x"]),
        ("generate-unknown-option", True, lambda f: gen + ["--bogus"]),
        ("generate-t-past-float32", True, lambda f: gen + ["-t", "1e39"]),
        ("generate-repeat-penalty-past-float32", True, lambda f: gen + ["--repeat-penalty", "1e39", "-t", "0.8"]),
        # a FIFO blocks its reader; /proc/self/mem is a regular file that refuses reads
        ("tokenize-tokenizer-fifo", True, fifo(lambda f: ["tokenize", "-z", f / "fifo", "hi"])),
        ("generate-model-proc-mem", True, lambda f: ["generate", "-m", "/proc/self/mem", "-z", Z]),
        ("generate-config-bytes", True, inputs(**{"c.yaml": b"\xff\xfe"})(lambda f: gen + ["--config", f / "c.yaml"])),
        ("generate-config-unknown-key", True, inputs(**{"c.yaml": b"gpu: {fast: true}\n"})(
            lambda f: gen + ["--config", f / "c.yaml"])),
        ("generate-config-gemv-32768", False, inputs(**{"c.yaml": yaml_with(("work_group", "gemv"), 32768)})(
            lambda f: gen + ["--config", f / "c.yaml"])),
        ("generate-device-absent", True, lambda f: gen + ["--device", "gpu:7"]),
        ("generate-tokenizer-truncated", True, inputs(**{"t.bin": lambda: tok512()[:3000]})(
            lambda f: ["generate", "-m", S, "-z", f / "t.bin"])),
        ("generate-tokenizer-other-vocab", True, inputs(**{"t.bin": tok_bytes(TINY)})(
            lambda f: ["generate", "-m", S, "-z", f / "t.bin"])),
        ("generate-prompt-bytes", False, lambda f: gen + ["-p", b"\xff\xfe caf\xc3\xa9 \xe2\x82"]),
        ("generate-prompt-empty", False, lambda f: gen + ["-p", ""]),
        ("generate-prompt-long", False, lambda f: gen + ["-c", "16", "-p", "Once upon a time " * 200]),
        ("tokenize-unicode", False, lambda f: ["tokenize", "-z", Z, "--pieces", random_text(random.Random(5), 80)
                                               .encode("utf-8", "surrogatepass")]),
        ("tokenize-nothing", True, lambda f: ["tokenize", "text"]),
        ("tokenize-folder", True, lambda f: ["tokenize", "-m", f, "text"]),
        ("quantize-truncated", True, inputs(**{"m.bin": lambda: l2c_base(1)[:9000]})(
            lambda f: ["quantize", f / "m.bin", f / "out.gguf", "-z", Z])),
        ("quantize-to-proc", True, lambda f: ["quantize", S, "/proc/nope.gguf", "-z", Z]),
        ("quantize-to-folder", True, lambda f: ["quantize", S, f, "-z", Z]),
        ("quantize-group-7", True, lambda f: ["quantize", S, f / "out.gguf", "-z", Z, "--group", "7"]),
        ("quantize-scheme", True, lambda f: ["quantize", S, f / "out.gguf", "-z", Z, "--scheme", "nf4"]),
        ("quantize-keep-8bit", True, lambda f: ["quantize", S, f / "out.gguf", "-z", Z, "--keep-8bit", "wq"]),
        ("quantize-no-tokenizer", True, lambda f: ["quantize", S, f / "out.gguf"]),
        ("chat-n-negative", True, lambda f: ["chat", "-m", S, "-z", Z, "-n", "-1"]),
        ("pull-unknown", True, lambda f: ["pull", "llama-70b"]),
        ("bench-gen-1", True, lambda f: ["bench", "-m", S, "-z", Z, "--gen", "1"]),
        ("devices-config-missing", True, lambda f: ["devices", "--config", f / "nope.yaml"]),
        ("devices-device-absent", True, lambda f: ["devices", "--device", "name~no-such-device"]),
    ]:
        cli_case(name, bad, args)
    cli_case("quantize", False, lambda f: ["quantize", S, f / "out.gguf", "-z", Z], outputs=("out.gguf",))
    cli_case("quantize-onto-input", True, inputs(**{"m.bin": STORIES.read_bytes})(
        lambda f: ["quantize", f / "m.bin", f / "m.bin", "-z", Z]), same="m.bin")
    cli_case("devices-write-onto-config", True, inputs(**{"c.yaml": b"name: mine\n"})(
        lambda f: ["devices", "--config", f / "c.yaml", "--write-config", f / "c.yaml"]), same="c.yaml")
    cli_case("chat", False, lambda f: ["chat", "-m", S, "-z", Z, "-n", "8", "-t", "0"],
             stdin="hello\n/reset\nwhat now? \u00e9\n/exit\n".encode())
    cli_case("pull-home-unusable", True, lambda f: ["pull", "smollm2-135m"], env={"DPLLAMA_HOME": "/proc/nope"})


cli_cases()


def test_unmutated_inputs_are_valid(tmp_path):
    """What the cases mutate loads: their errors come from the mutations."""
    llama2c_dir()       # tok512 is one of them: without ../shared, a skip that says so
    for i, make in enumerate([l2c(0, bytes), l2c(0, bytes, shared=False), l2c(1, bytes), l2c(1, bytes, shared=False),
                              l2c(2, bytes), gguf(), container(bytes), tokenizer_case(bytes),
                              config_case(lambda: yaml.safe_dump(defaults()).encode())]):
        (tmp_path / str(i)).mkdir()
        make(tmp_path / str(i))()
