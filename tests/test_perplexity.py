"""`dpllama perplexity` (dpllama/commands/perplexity.py, dpllama/perplexity.py): the all-rows logits pass against the
NumPy reference; llama-perplexity's protocol on a tiny random model against a NumPy computation of the same
protocol; SmolLM2's first 4 chunks of WikiText-2 against the float32 oracle; KL divergence of a model against its own
base and against the exact KL; the errors."""
from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest

from dpllama import cli
from dpllama.errors import DpllamaError
from dpllama.llm import load
from dpllama.model.llama import Llama
from dpllama.model.llama2c import load_llama2c
from dpllama.model.reference import Reference
from dpllama.perplexity import HEADER, STEP, Base, BaseWriter, KLStatistics, chunk_distributions, record
from dpllama.tokenizer import Llama2cTokenizer
from tests.helpers import SHARED, random_llama2c, random_weights, shared_models, smollm2_gguf_path
from tests.test_forward import GPU_LIKE, SHAPE, int4_weights, logits_atol, queue_with

VOCAB = 3 + 256 + 1     # <unk>, BOS, EOS, the 256 byte tokens, " ": every text encodes, byte by byte
N_CTX, CHUNKS = 16, 3


def tokenizer_bin(extra: int = 0) -> bytes:
    """A llama2.c tokenizer.bin of VOCAB (+ extra unused) pieces, with no merges."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)] + [b" "]
    pieces += [b"<extra%d>" % i for i in range(extra)]
    return struct.pack("<i", max(map(len, pieces))) + b"".join(struct.pack("<fi", 0.0, len(p)) + p for p in pieces)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random llama2.c model (float32, context 32) with its tokenizer, and a text of 70 tokens: 4 chunks of 16."""
    d = tmp_path_factory.mktemp("ppl")
    random_llama2c(d / "model.bin", 32, 48, 2, 4, 2, VOCAB, 32, shared=False, seed=7)
    (d / "tok.bin").write_bytes(tokenizer_bin())
    (d / "text.txt").write_text("the cat sat on a mat; a dog ran far off, and then sat too. " + "abcdefghij")
    return d


def tiny_tokens(d) -> list[int]:
    return Llama2cTokenizer(str(d / "tok.bin"), VOCAB).encode((d / "text.txt").read_text())


def ppl_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["perplexity", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(d, *more):
    return ("-m", d / "model.bin", "-z", d / "tok.bin", "-c", N_CTX, *more)


def numpy_protocol(weights, tokens: list[int], n_ctx: int, n_chunk: int, bos: int | None) -> list[np.ndarray]:
    """llama-perplexity's protocol written out in NumPy over the reference forward pass: per chunk, the NLLs of the
    tokens at first + 1 .. n_ctx - 1, each from the logits of the position before, the chunk's first token replaced
    by `bos` for the pass; and the largest logit seen."""
    ref, first, out = Reference(weights), n_ctx // 2, []
    numpy_protocol.max_logit = 0.0
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        fed = chunk if bos is None else [bos] + chunk[1:]
        logits = [ref.forward(t, p).astype(np.float64) for p, t in enumerate(fed)]
        numpy_protocol.max_logit = max(numpy_protocol.max_logit, max(np.abs(z).max() for z in logits))
        nll = [np.log(np.exp(z - z.max()).sum()) + z.max() - z[chunk[j + 1]]
               for j, z in list(enumerate(logits))[first:n_ctx - 1]]
        out.append(np.array(nll))
    return out


def printed(out: str) -> tuple[list[float], float, float]:
    """The running PPLs and the final estimate with its +/- from the command's stdout."""
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out)]
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    return running, float(final[1]), float(final[2])


@pytest.mark.parametrize("geometry", [dict(prefill_chunk=5), GPU_LIKE])
def test_every_row_logits_match_the_reference(queue, geometry):
    """The all-rows pass (feed_rows) after a batched prefill, over several prefill chunks of 5 and a partial one,
    against the reference's logits at each position; quantized weights (int4 of both schemes, q8 table); the
    shipped geometry, and the GPU configs' (64 work-items per row tile, tree reductions)."""
    w = int4_weights(random_weights(**SHAPE, shared=False, seed=3), 32, "mixed")
    q = queue_with(queue, {"work_group": geometry})
    model, ref = Llama(w, q), Reference(w)
    tokens = np.random.default_rng(2).integers(0, SHAPE["vocab"], 20).tolist()
    model.start(tokens)
    model.feed(7)
    assert model.row_logits is None
    model.next_given()
    rows = model.feed_rows(12)      # positions 7 .. 18: chunks of 5, 5, 2
    want = np.stack([ref.forward(t, p) for p, t in enumerate(tokens[:19])])[7:]
    assert model.pos == 18
    for i, (got, w_row) in enumerate(zip(rows, want)):
        np.testing.assert_allclose(got, w_row, rtol=0, atol=logits_atol(w, w_row), err_msg=f"row {i}")
    # generation's passes are as they were: the all-rows buffer, made on first use, is only the all-rows passes'
    for (T, every_row, _slot), cmds in model.commands.items():
        assert any(a.buffer is model.row_logits for cmd in cmds for a in cmd.accessors) == every_row, T


def test_every_row_logits_that_are_not_finite_are_an_error(queue):
    """As read_logits: NaN or infinite logits (here the final norm's weights overflow the LM head) name the first
    position they come at."""
    w = random_weights(**SHAPE, shared=False, seed=3)
    w.norm = np.full_like(w.norm, 3e38)
    model = Llama(w, queue)
    model.start([1, 5, 7, 9, 11, 13])
    model.feed(2)
    model.next_given()
    with pytest.raises(DpllamaError, match="^the logits at position 2 are not finite"):
        model.feed_rows(3)


def test_protocol_matches_numpy(tiny, capsys):
    """The running PPLs and the final estimate against the protocol computed in NumPy: chunks of 16 from an empty
    cache, BOS in place of each chunk's first token (llama2.c tokenizers add BOS), second halves scored.
    Tolerance: the device's logits are within LOGITS_RTOL (1e-4, tests/test_forward.py) of the largest logit of the
    reference's; NLL = logsumexp(z) - z[token] moves by at most twice a logit's error, so every NLL, their mean
    (ln PPL) and their standard deviation move by at most a = 2e-4 max|z|: PPL by a relative e^a - 1, its +/- by as
    much again; plus the printed rounding (4 and 5 decimals)."""
    code, out, err = ppl_cli(capsys, *tiny_args(tiny, "-f", tiny / "text.txt", "--chunks", CHUNKS))
    assert code == 0, err
    w = load_llama2c(tiny / "model.bin")
    tokens = tiny_tokens(tiny)
    assert tokens[0] == 1 and len(tokens) // N_CTX == 4      # BOS in front; 4 chunks there, --chunks takes 3
    nll = numpy_protocol(w, tokens, N_CTX, CHUNKS, bos=1)
    a = 2e-4 * numpy_protocol.max_logit
    running, ppl, pm = printed(out)
    want = [math.exp(np.concatenate(nll[:k + 1]).mean()) for k in range(CHUNKS)]
    assert running == pytest.approx(want, rel=math.expm1(a), abs=5e-5)
    all_nll = np.concatenate(nll)
    want_pm = want[-1] * all_nll.std() / math.sqrt(all_nll.size - 1)
    assert (ppl, pm) == pytest.approx((want[-1], want_pm), rel=2 * math.expm1(a), abs=5e-5)
    # the BOS rule is seen: the same protocol without the replacement is 10 times the tolerance away or more
    no_bos = np.concatenate(numpy_protocol(w, tokens, N_CTX, CHUNKS, bos=None))
    assert abs(math.exp(no_bos.mean()) - ppl) > 10 * (ppl * math.expm1(a) + 5e-5)
    assert "tok/s" in err and "[1]" not in err


@pytest.fixture(scope="module")
def oracle():
    return json.loads((shared_models("smollm2") / "perplexity_wikitext2.json").read_text())


# The SmolLM2 oracle: a float32 NumPy forward over the Q4_1 weights dequantized. dpllama's logits are within
# ORACLE_ATOL = 1e-2 of that reference's (tests/test_smollm2.py: measured 0.0037; the device rounds the input of
# every int4 matrix to 16-bit steps). NLL = logsumexp(z) - z[token]: both terms move by at most the largest logit
# error, so a token's NLL by at most 2e-2, plus the oracle's rounding to 5 decimals (measured: 0.0027).
NLL_ATOL = 2 * 1e-2 + 5e-6
# The per-token errors come from rounding, of either sign; bounded by NLL_ATOL, their mean over the 1,020 tokens is
# within NLL_ATOL sqrt(2 ln(2 / 1e-6) / 1020) = 3.4e-3 but for a chance of 1e-6 (Hoeffding): ln PPL, so PPL within a
# relative 3.4e-3 (measured: 1.1e-5). llama.cpp, with its 8-bit activations, is 3.9e-3 away.
PPL_RTOL = NLL_ATOL * math.sqrt(2 * math.log(2 / 1e-6) / 1020)


def test_smollm2_four_chunks_match_the_fp32_oracle(oracle):
    """WikiText-2 tokenized whole (304,830 tokens, no BOS: add_bos_token is false), the first chunk's ids, and the
    NLL of every scored token of 4 chunks of 512 against the float32 oracle."""
    text = (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw")
    if not text.is_file():
        pytest.skip(f"{text} not found (shared/ must sit beside the repository)")
    llm = load(str(smollm2_gguf_path()), max_seq=512)
    assert not llm.tokenizer.add_bos
    tokens = np.asarray(llm.tokenizer.encode(text.read_bytes().decode("utf-8")), np.int32)
    assert tokens.size == oracle["n_tokens_total"]
    assert tokens[:512].tolist() == oracle["first_chunk_token_ids"]
    nll = np.stack([d.nll(t) for d, t in chunk_distributions(llm.model, tokens, 512, 4, None)])
    want = np.array(oracle["per_token_nll_fp32"])
    assert nll.shape == want.shape == (4, 255)
    assert np.abs(nll - want).max() <= NLL_ATOL
    assert math.exp(nll.mean()) == pytest.approx(oracle["fp32"]["ppl"], rel=PPL_RTOL)


def test_kl_of_a_model_against_its_own_base_is_zero(tiny, capsys):
    base = tiny / "self.kld"
    code, out, err = ppl_cli(capsys, *tiny_args(tiny, "-f", tiny / "text.txt", "--kl-divergence-base", base))
    assert code == 0, err
    code, kl_out, err = ppl_cli(capsys, *tiny_args(tiny, "--kl-divergence-base", base, "--kl-divergence"))
    assert code == 0, err
    # both rounded on the same 16-bit grid (dpllama/perplexity.py): exactly 0, and the same PPL
    assert re.search(r"Mean    KLD:   0\.000000 ±   0\.000000", kl_out)
    assert re.search(r"Maximum KLD:   0\.000000", kl_out)
    assert "Same top p: 100.000 ± 0.000 %" in kl_out
    assert re.search(r"Mean PPL\(Q\)/PPL\(base\)         :   1\.000000 ±   0\.000000", kl_out)
    ppl = printed(out)[1]
    assert float(re.search(r"Mean PPL\(base\)                : +([0-9.]+)", kl_out)[1]) == pytest.approx(ppl, abs=5e-5)


def test_kl_against_the_exact_kl(tiny, queue, tmp_path):
    """An int4 model against the float32 one's base: per position within the bound the base's 16-bit grid allows
    of the KL over the whole vocabulary from float32 log-probabilities. Each of p's and q's log-probabilities moves
    by at most STEP / 2, so a term p (lp - lq) by at most p e^(STEP/2) STEP + p (e^(STEP/2) - 1) |lp - lq|; terms
    under the window (p < e^-16 of the top) are left out whole."""
    w = load_llama2c(tiny / "model.bin")
    tokens = np.asarray(tiny_tokens(tiny), np.int32)
    ref_log_p = []
    with open(tmp_path / "f32.kld", "wb") as f:
        writer = BaseWriter(f, N_CTX, VOCAB, tokens, CHUNKS)
        for dist, targets in chunk_distributions(Llama(w, queue), tokens, N_CTX, CHUNKS, 1):
            writer.add(dist, targets)
            ref_log_p.append(dist.log_p_all())
    base = Base.read(tmp_path / "f32.kld")
    for i, (dist, targets) in enumerate(chunk_distributions(Llama(int4_weights(w, 32, False), queue), tokens, N_CTX,
                                                            CHUNKS, 1)):
        stats = KLStatistics.of(base.records[i], dist, targets)
        lp, lq = ref_log_p[i], dist.log_p_all()
        p, gap = np.exp(lp), np.abs(lp - lq)
        exact = (p * (lp - lq)).sum(axis=1)
        kept = lp >= lp.max(axis=1, keepdims=True) - 16
        bound = (np.where(kept, p * (math.exp(STEP / 2) * STEP + math.expm1(STEP / 2) * gap), 0)
                 + np.where(kept, 0, p * gap)).sum(axis=1)
        assert np.all(np.abs(stats.kld - exact) <= bound * (1 + 1e-9)), f"chunk {i}"
        assert exact.mean() > 10 * bound.mean()         # int4 moves the distributions well beyond the grid's error
        np.testing.assert_array_equal(stats.nll_base, -np.take_along_axis(lp, targets[:, None], 1)[:, 0])
        np.testing.assert_array_equal(stats.same_top, lp.argmax(axis=1) == lq.argmax(axis=1))


def corrupted(d, name: str, change) -> tuple:
    """The arguments of --kl-divergence against a copy of good.kld in which change(tokens, records) has written,
    both memory-mapped: int32 [chunks * N_CTX] and record(VOCAB) [chunks, scored]."""
    (d / name).write_bytes((d / "good.kld").read_bytes())
    base = Base.read(d / "good.kld")
    tokens = np.memmap(d / name, "<i4", "r+", HEADER.itemsize, base.tokens.shape)
    records = np.memmap(d / name, record(VOCAB), "r+", HEADER.itemsize + tokens.nbytes, base.records.shape)
    change(tokens, records)
    tokens.flush(), records.flush()
    return tiny_args(d, "--kl-divergence", "--kl-divergence-base", d / name)


def error_cases(d):
    """name -> (arguments, what the one line says)."""
    (d / "short.txt").write_text("too short")
    (d / "other.txt").write_text("a different text, long enough to give as many chunks as the first one does. " * 2)
    (d / "latin1.txt").write_bytes(b"caf\xe9 " * 40)
    (d / "tok300.bin").write_bytes(tokenizer_bin(extra=40))
    random_llama2c(d / "model300.bin", 32, 48, 2, 4, 2, VOCAB + 40, 32, shared=False, seed=8)
    assert cli.main(["perplexity", *map(str, tiny_args(d, "-f", d / "text.txt", "--kl-divergence-base",
                                                       d / "good.kld"))]) == 0
    good = (d / "good.kld").read_bytes()
    (d / "truncated.kld").write_bytes(good[:-100])
    (d / "junk.kld").write_bytes(b"not a base file at all")
    (d / "llamacpp.kld").write_bytes(b"_logits_" + bytes(100))
    text = ("-f", d / "text.txt")
    kl = ("--kl-divergence", "--kl-divergence-base")
    return {
        "missing text": (tiny_args(d, "-f", d / "missing.txt"), r"missing\.txt: cannot read the text: No such file"),
        "not UTF-8": (tiny_args(d, "-f", d / "latin1.txt"), r"latin1\.txt: not UTF-8 text \(byte 3\)"),
        "no text": (tiny_args(d), r"give the text to score with -f TEXT"),
        "too short": (tiny_args(d, "-f", d / "short.txt"),
                      r"the text is \d+ tokens; a context of 16 needs at least 32"),
        "odd -c": (tiny_args(d, *text, "-c", 15), r"-c 15: the chunk must be an even number of tokens, at least 4"),
        "tiny -c": (tiny_args(d, *text, "-c", 2), r"-c 2: the chunk must be an even number"),
        "-c past the context": (tiny_args(d, *text, "-c", 64), r"-c 64 is beyond the model's context of 32 tokens"),
        "--chunks 0": (tiny_args(d, *text, "--chunks", 0), r"--chunks must be at least 1, found 0"),
        "base of another vocab": (("-m", d / "model300.bin", "-z", d / "tok300.bin", *kl, d / "good.kld"),
                                  r"made with a vocabulary of 260 tokens, the model has 300"),
        "base of another text": (tiny_args(d, "-f", d / "other.txt", *kl, d / "good.kld"),
                                 r"good\.kld: made from another text \(or tokenizer\)"),
        "base with another -c": (tiny_args(d, "-c", 8, *kl, d / "good.kld"), r"-c 8: the base .* was made with -c 16"),
        "truncated base": (tiny_args(d, *kl, d / "truncated.kld"),
                           r"truncated\.kld: \d+ bytes where its header \(4 chunks of 16, vocabulary 260\) makes \d+: "
                           r"truncated"),
        "not a base": (tiny_args(d, *kl, d / "junk.kld"), r"junk\.kld: not a KL-divergence base file of dpllama"),
        "llama.cpp's logits": (tiny_args(d, *kl, d / "llamacpp.kld"), r"a llama\.cpp logits file"),
        "missing base": (tiny_args(d, *kl, d / "missing.kld"), r"missing\.kld: cannot read the KL-divergence base"),
        "--kl-divergence alone": (tiny_args(d, *text, "--kl-divergence"),
                                  r"--kl-divergence needs --kl-divergence-base"),
        "base into a folder": (tiny_args(d, *text, "--kl-divergence-base", d), r"is a folder"),
        "text from a device": (tiny_args(d, "-f", "/dev/zero"), r"/dev/zero: not a regular file"),
        # a base's body as read: each field within what BaseWriter writes, else named (not a traceback, nor nan)
        "base target past the vocabulary": (corrupted(d, "t.kld", lambda t, r: t.__setitem__(N_CTX - 1, 99999)),
                                            r"t\.kld: corrupted: token 15 of the text is 99999, expected an id "
                                            r"0\.\.259"),
        "base token -1": (corrupted(d, "t1.kld", lambda t, r: t.__setitem__(N_CTX - 1, -1)),
                          r"t1\.kld: corrupted: token 15 of the text is -1, expected"),
        "base nll huge": (corrupted(d, "n.kld", lambda t, r: r["nll"].__setitem__((1, 2), 1e308)),
                          r"n\.kld: corrupted: chunk 2, scored position 2: nll is 1e\+308, expected 0 to 709\.78"),
        "base nll nan": (corrupted(d, "nn.kld", lambda t, r: r["nll"].__setitem__((0, 0), math.nan)),
                         r"nn\.kld: corrupted: chunk 1, scored position 0: nll is nan"),
        "base top past the vocabulary": (corrupted(d, "top.kld", lambda t, r: r["top"].__setitem__((0, 1), VOCAB)),
                                         r"top\.kld: corrupted: chunk 1, scored position 1: top is 260, expected an "
                                         r"id 0\.\.259"),
        "base floor nan": (corrupted(d, "f.kld", lambda t, r: r["floor"].__setitem__((2, 0), math.nan)),
                           r"f\.kld: corrupted: chunk 3, scored position 0: floor is nan, expected -21\.\d+ to -16"),
        "base floor huge": (corrupted(d, "f1.kld", lambda t, r: r["floor"].__setitem__((0, 0), 1e30)),
                            r"f1\.kld: corrupted: chunk 1, scored position 0: floor is 1e\+30"),
    }


def test_bad_input_is_one_line_and_an_exit_status(tiny, capsys):
    cases = error_cases(tiny)
    capsys.readouterr()
    for name, (args, message) in cases.items():
        code, out, err = ppl_cli(capsys, *args)
        lines = [line for line in err.splitlines() if line.startswith("dpllama: error:")]
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, f"{name}: {code} {err}"
        assert re.search(message, lines[0]), f"{name}: {lines[0]}"


def test_ctx_past_the_models_context_is_refused_before_the_device_opens(tiny, capsys, monkeypatch):
    """-c beyond the context in the model's header: one line before any kernel compiles or weight goes up."""
    import dpllama.llm

    def no_device(*args, **kwargs):
        raise AssertionError("the device was opened")
    monkeypatch.setattr(dpllama.llm, "open_queue", no_device)
    code, _, err = ppl_cli(capsys, *tiny_args(tiny, "-f", tiny / "text.txt", "-c", 64))
    assert code == 1 and "-c 64 is beyond the model's context of 32 tokens" in err and "opened" not in err
