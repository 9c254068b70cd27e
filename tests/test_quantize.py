"""`dpllama quantize`: the quantize-model script, its output, its errors, and what int4 does to a real model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpllama.generate import Sampler, generate
from dpllama.model.gguf import load_gguf
from dpllama.model.llama import Llama
from dpllama.model.llama2c import load_llama2c
from dpllama.quantize import quantize
from tests.helpers import llama2c_dir, quantize_cli, random_llama2c, random_weights, write_test_gguf

# Mean negative log-likelihood of fp32's own greedy continuation: int4 may cost a little, not a lot.
# Measured on stories260K (nats/token): fp32 0.453, int4 g32 asym 0.474, int4 g32 sym 0.572; the bound
# leaves room above sym's +0.12 and is far below what broken dequantization costs (whole nats).
NLL_MARGIN = 0.2


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dpllama.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def stories():
    d = llama2c_dir()
    return d / "stories260K.bin", d / "tok512.bin"


def test_quantize_cli_writes_one_file_model(stories, tmp_path, repo_root):
    model, tok = stories
    out = tmp_path / "s260-q4.gguf"
    r = run("quantize", model, out, "-z", tok, "--group", 32, "--scheme", "asym", cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert "layers.4.w2" in r.stdout and "rel. RMSE" in r.stdout and "overall rel. RMSE" in r.stdout
    w = load_gguf(out)
    assert w.meta["format"] == "dpllama-gguf"
    assert (w.layers[0].w1.kind, w.layers[0].w1.group, w.layers[0].w1.cols_padded) == ("int4", 32, 64)
    assert w.layers[0].w2.cols_padded == 192          # hidden 172 padded to whole groups, not rejected
    assert w.tok_embeddings.kind == "q8"              # kept in 8 bits by default
    # one file is enough to run: the tokenizer is inside
    g = run("generate", "-m", out, "-p", "Once upon a time", "-n", 40, "-t", 0, cwd=repo_root)
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("Once upon a time") and len(g.stdout.split()) > 20
    assert list(tmp_path.iterdir()) == [out]          # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask   # a normal file, not the temporary file's 0600


def mean_nll(model: Llama, ids: list[int]) -> float:
    """Mean -log p(ids[k+1] | ids[..k]) over the sequence, from the device logits."""
    model.start(ids)
    total = 0.0
    for k in range(len(ids) - 1):
        model.step()
        logits = model.read_logits().astype(np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        total -= logp[ids[k + 1]]
        model.next_given()
    return total / (len(ids) - 1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_stories260k_stays_close_to_fp32(stories, queue, symmetric):
    w = load_llama2c(stories[0])
    fp32 = Llama(w, queue, max_seq=128)
    ids = [1] + list(generate(fp32, [1], 100, Sampler(temperature=0)))
    q = Llama(quantize(w, 32, symmetric), queue, max_seq=128)
    base, quant = mean_nll(fp32, ids), mean_nll(q, ids)
    assert quant < base + NLL_MARGIN, (base, quant)
    text = list(generate(q, [1], 60, Sampler(temperature=0)))
    assert len(set(text)) > 15          # a story, not one token over and over


# --keep-8bit -> the kinds of (tok_embeddings, output) once loaded. A tied model has one table, the embedding and
# the classifier at once: it stays in 8 bits when either name is kept.
KEEP_8BIT = {
    "tied": [("none", "int4", "int4"), ("output", "q8", "q8"), ("tok_embeddings", "q8", "q8"),
             ("tok_embeddings,output", "q8", "q8")],
    "untied": [("none", "int4", "int4"), ("output", "int4", "q8"), ("tok_embeddings", "q8", "int4"),
               ("tok_embeddings,output", "q8", "q8")],
}


@pytest.mark.parametrize("model", KEEP_8BIT)
def test_keep_8bit_through_the_loader(tmp_path, model):
    src = tmp_path / "src.gguf"
    write_test_gguf(src, random_weights(shared=model == "tied"))
    for keep, emb, out in KEEP_8BIT[model]:
        w = quantize_cli(src, tmp_path / f"{keep}.gguf", "--keep-8bit", keep)
        assert w.tied == (model == "tied"), keep
        assert (w.tok_embeddings.kind, w.output.kind) == (emb, out), keep


def test_quantize_errors_are_one_line(stories, tmp_path, repo_root):
    model, tok = stories
    cases = [
        (("quantize", model, tmp_path / "missing" / "x.gguf", "-z", tok), "output folder"),
        (("quantize", model, tmp_path / "x.gguf", "-z", tok, "--group", 48), "group size must be one of 32, 64, 128"),
        (("quantize", model, tmp_path / "x.gguf", "-z", tok, "--scheme", "nf4"), "--scheme must be sym or asym"),
        (("quantize", model, tmp_path / "x.gguf"), "pass -z TOKENIZER.bin"),
        (("quantize", model, tmp_path / "x.gguf", "-z", tok, "--keep-8bit", "wq"), "--keep-8bit: unknown tensor"),
        (("quantize", tmp_path / "nope.bin", tmp_path / "x.gguf"), "model file not found"),
    ]
    for args, message in cases:
        r = run(*args, cwd=repo_root)
        assert r.returncode == 1, args
        assert r.stderr.startswith("dpllama: error:") and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []           # nothing written, not even partly


def test_quantize_refuses_bad_outputs_before_any_work(stories, tmp_path, repo_root):
    """A folder (a name ending in / too), standard output, a device, a place nobody can write, or an input (the
    model, a link to it, the tokenizer) as the output: one line, before loading or quantizing anything (nothing on
    stdout), and the inputs intact."""
    model, tok = (Path(shutil.copy(p, tmp_path)) for p in stories)    # copies: a bug must not eat the shared ones
    (tmp_path / "link.bin").symlink_to(model)
    (tmp_path / "dir.gguf").mkdir()
    before = {p: p.read_bytes() for p in (model, tok)}
    for out, message in [(tmp_path / "dir.gguf", "is a folder"), (f"{tmp_path}/out.gguf/", "names a folder"),
                         ("-", "the output goes to a file, not to standard output"),
                         ("/dev/null", "not a regular file"),
                         ("/sys/out.gguf", "cannot write in /sys"), ("/proc/self/out.gguf", "cannot write in /proc"),
                         (model, f"is the input {model}"), (tmp_path / "link.bin", f"is the input {model}"),
                         (tok, f"is the input {tok}")]:
        r = run("quantize", model, out, "-z", tok, cwd=repo_root)
        assert r.returncode == 1 and r.stdout == "", out
        assert r.stderr.startswith(f"dpllama: error: {out}: {message}") and r.stderr.count("\n") == 1, r.stderr
    assert {p: p.read_bytes() for p in (model, tok)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "link.bin", "stories260K.bin", "tok512.bin"]


def test_interrupted_write_leaves_nothing(stories, tmp_path, monkeypatch):
    """The container is written to a temporary file and renamed at the end: a failure halfway leaves no file."""
    from dpllama.model import gguf
    w = load_llama2c(stories[0])
    q = quantize(w, 32, False)
    from dpllama.tokenizer import Llama2cTokenizer
    fields = Llama2cTokenizer(stories[1], 512).gguf_fields()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError):
        gguf.write_dpllama_gguf(tmp_path / "out.gguf", q, fields)
    assert list(tmp_path.iterdir()) == []


def test_quantize_cli_from_gguf_keeps_matching_q4_blocks(tmp_path, repo_root):
    """A GGUF with every supported tensor type: Q4_0 tensors carried over bit for bit into symmetric group
    32, every other matrix requantized, the result loads with its tokenizer; a GGUF of another
    architecture is refused in one line."""
    from gguf import GGMLQuantizationType as T
    src = tmp_path / "mixed.gguf"
    types = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q4_1,
             "blk.0.attn_v.weight": T.F16, "blk.0.attn_output.weight": T.BF16, "blk.1.ffn_down.weight": T.Q4_0}
    write_test_gguf(src, random_weights(dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=8,
                                        seq_len=32), types)
    out = tmp_path / "q.gguf"
    r = run("quantize", src, out, "--scheme", "sym", cwd=repo_root)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if "rel. RMSE" in line and "overall" not in line}
    for name in ("layers.0.wq", "layers.1.w2"):
        assert lines[name].endswith("rel. RMSE 0.00000") and "int4 g32" in lines[name]   # lossless
    assert not lines["layers.0.wk"].endswith("rel. RMSE 0.00000")      # Q4_1 is asymmetric: requantized
    before, after = load_gguf(src), load_gguf(out)
    assert np.array_equal(after.layers[0].wq.data, before.layers[0].wq.data)
    assert after.meta["tokenizer_fields"]["tokenizer.ggml.model"] == "gpt2"
    other = tmp_path / "other.gguf"
    write_test_gguf(other, random_weights(vocab=8), arch="mamba")
    r = run("quantize", other, tmp_path / "x.gguf", cwd=repo_root)
    assert r.returncode == 1 and \
        "unsupported GGUF architecture 'mamba' (supported: llama, qwen2, qwen3, phi3)" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_reads_every_gguf_type(tmp_path):
    """A GGUF with a tensor of every type quantizes: Q4_K (asymmetric int4 g32) carried over with its float32
    scales, the Q5_0 table kept as it loaded (int5, which q8 would round again) where 8 bits are asked for it,
    every other matrix requantized; the output loads and runs as the report says."""
    from tests.helpers import EVERY_TYPE, EVERY_TYPE_SHAPE
    src = tmp_path / "every.gguf"
    write_test_gguf(src, random_weights(shared=False, **EVERY_TYPE_SHAPE), EVERY_TYPE)
    before = load_gguf(src)
    after = quantize_cli(src, tmp_path / "q.gguf", "--keep-8bit", "tok_embeddings")
    for name in ("w1", "w3"):                                           # blk.1's Q4_K
        a, b = getattr(after.layers[1], name), getattr(before.layers[1], name)
        assert np.array_equal(a.data, b.data) and np.array_equal(a.scales, b.scales) and a.scales.dtype == np.float32
    assert after.tok_embeddings.kind == "int5" and np.array_equal(after.tok_embeddings.data, before.tok_embeddings.data)
    assert after.output.kind == "int4" and after.layers[0].wq.kind == "int4" and after.layers[0].wq.group == 32
    assert after.meta["tokenizer_fields"]["tokenizer.ggml.model"] == "gpt2"


def test_sigkilled_quantize_leaves_no_temporary_behind(stories, tmp_path, repo_root):
    """SIGKILL while the output is being written leaves the hidden temporary (nothing can remove it then); the next
    run that writes there removes it, the writer being dead."""
    random_llama2c(tmp_path / "m.bin", dim=256, hidden=768, n_layers=4, n_heads=8, n_kv_heads=8, vocab=512)
    out = tmp_path / "out"
    out.mkdir()
    args = ("quantize", tmp_path / "m.bin", out / "q.gguf", "-z", stories[1])
    for _ in range(10):     # the temporary lives some 20 ms: killed the moment it shows, else tried again
        p = subprocess.Popen([sys.executable, "-m", "dpllama.cli", *map(str, args)], cwd=repo_root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and not any(n.endswith(".tmp") for n in os.listdir(out)):
            time.sleep(0.001)
        p.kill()
        p.wait()
        left = os.listdir(out)
        if any(n.endswith(".tmp") for n in left):
            break
        (out / "q.gguf").unlink(missing_ok=True)    # it finished first, or that was check_output's probe
    assert len(left) == 1 and left[0].startswith(".q.gguf.") and left[0].endswith(".tmp"), left
    r = run(*args, cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == ["q.gguf"]
