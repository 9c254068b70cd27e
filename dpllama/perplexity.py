"""Perplexity and KL divergence over a text, as llama.cpp's `llama-perplexity` computes them (the `dpllama
perplexity` command is dpllama/commands/perplexity.py).

The protocol (tools/perplexity/perplexity.cpp, perplexity() and kl_divergence(), without --ppl-stride):
- the text is tokenized as one string, with BOS in front only where the vocabulary asks for it (add_bos), and
  must give at least 2 n_ctx tokens (llama.cpp's own floor);
- chunk i is tokens[i n_ctx, (i + 1) n_ctx), for i < n_tokens // n_ctx (at most --chunks), each from an empty KV
  cache; with add_bos the chunk's first token is replaced by BOS (not preceded) for the pass;
- only the second half is scored: with first = n_ctx / 2, the logits at positions j = first .. n_ctx - 2 score the
  token at j + 1, n_ctx - 1 - first tokens per chunk (position n_ctx - 1's logits are never used, so its token
  is not fed);
- PPL = exp(mean NLL over every token scored so far), printed after each chunk; the final +/- is
  PPL sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

KL divergence: a run with `--kl-divergence-base FILE` saves the reference's distributions at every scored position
(`BaseWriter`), and a run of another model with `--kl-divergence` compares its own with them (`KLStatistics`):
KL(base || model), whether the top tokens agree, and both perplexities. The base keeps what llama.cpp's keeps, each
position's log-probabilities over the 16 nats below its largest in 16 bits (a step of 16 / 65535 = 2.4e-4; smaller
ones, under e^-16 of the top token's probability, are left out of the sum as llama.cpp leaves out those under
e^-16), and exactly what llama.cpp derives from them: the NLL of the token that follows (float64) and the top token.
The model's log-probabilities are put on the same grid before they are compared, so that the rounding is the same on
both sides: a model against its own base gives a KL of exactly 0. Keeping only each position's most likely tokens
was tried and is not enough: SmolLM2's distributions are flat (the 128 most likely tokens hold 86% of the mass on
average), and the KL of the top 128 with the rest lumped into one outcome came out 17% under the full KL.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dpllama.errors import DpllamaError

WINDOW = 16.0                   # nats below a position's largest log-probability that its base record keeps
STEP = WINDOW / 65535           # ... in 16-bit steps of this many nats
MIN_CTX = 4     # the smallest even chunk that scores a token (first = 2 scores position 2's prediction of 3)
MAX_NLL = math.log(sys.float_info.max)  # the largest NLL whose e^NLL, a perplexity, is a float


def first_scored(n_ctx: int) -> int:
    """The first position whose logits are scored (they predict the token after it)."""
    return n_ctx // 2


def check_ctx(n_ctx: int, context: int | None = None) -> None:
    """-c against the protocol, and against the model's context when given."""
    if n_ctx < MIN_CTX or n_ctx % 2:
        raise DpllamaError(f"-c {n_ctx}: the chunk must be an even number of tokens, at least {MIN_CTX} (its second "
                           f"half is scored)")
    if context is not None and n_ctx > context:
        raise DpllamaError(f"-c {n_ctx} is beyond the model's context of {context} tokens")


def chunk_count(n_tokens: int, n_ctx: int, chunks: int | None = None) -> int:
    """How many chunks of n_ctx tokens are scored: all that fit, at most `chunks`."""
    if n_tokens < 2 * n_ctx:
        raise DpllamaError(f"the text is {n_tokens} tokens; a context of {n_ctx} needs at least {2 * n_ctx} (as "
                           f"llama-perplexity asks): give a longer text or a smaller -c")
    n = n_tokens // n_ctx
    return n if chunks is None else min(chunks, n)


class Distribution:
    """The next-token distributions of rows of logits (float32 [n, vocab]): log-probabilities taken as llama.cpp
    does (the max subtracted in float32, exp in float32, the sum in float64)."""

    def __init__(self, rows: np.ndarray):
        self.z = rows - rows.max(axis=1, keepdims=True)
        self.e = np.exp(self.z)
        self.log_total = np.log(self.e.sum(axis=1, dtype=np.float64))

    def log_p(self, ids: np.ndarray) -> np.ndarray:
        """float64 [n, k]: the log-probabilities of ids [n, k]."""
        return np.take_along_axis(self.z, ids, axis=1) - self.log_total[:, None]

    def nll(self, targets: np.ndarray) -> np.ndarray:
        """float64 [n]: -log p of each row's target."""
        return -self.log_p(targets[:, None])[:, 0]

    def argmax(self) -> np.ndarray:
        return self.z.argmax(axis=1)

    def log_p_all(self) -> np.ndarray:
        """float64 [n, vocab]: every log-probability."""
        return self.z - self.log_total[:, None]


def chunk_distributions(model, tokens: np.ndarray, n_ctx: int, n_chunk: int, bos: int | None
                        ) -> Iterator[tuple[Distribution, np.ndarray]]:
    """Per chunk, the distributions at its scored positions and the tokens they predict. `model` is a
    dpllama.model.llama.Llama: the first half goes through batched prefill, the rest through the all-rows pass."""
    first = first_scored(n_ctx)
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        fed = [int(t) for t in chunk[:-1]]
        if bos is not None:
            fed[0] = bos
        model.start(fed)
        model.feed(first)
        model.next_given()
        yield Distribution(model.feed_rows(n_ctx - 1 - first)), chunk[first + 1:]


def ppl_estimate(nll: np.ndarray) -> tuple[float, float]:
    """PPL over the scored tokens' NLLs, and llama.cpp's +/-."""
    mean = nll.mean()
    var = (nll ** 2).mean() - mean ** 2
    ppl = math.exp(mean)
    return ppl, ppl * math.sqrt(var / (nll.size - 1)) if var > 0 and nll.size > 1 else math.nan


# ---- the base file of --kl-divergence-base ----
MAGIC = b"DPLLKLD1"
HEADER = np.dtype([("magic", "S8"), ("n_ctx", "<i4"), ("n_vocab", "<i4"), ("n_chunk", "<i4")])


def record(n_vocab: int) -> np.dtype:
    """One scored position of the base: the NLL of the token that follows, the most likely token, and every
    log-probability as `floor` + u STEP (u in 1..65535; u = 0: under the window, left out)."""
    return np.dtype([("nll", "<f8"), ("top", "<i4"), ("floor", "<f4"), ("u", "<u2", (n_vocab,))])


def window_floor(log_p_max: np.ndarray) -> np.ndarray:
    """float32 [n]: the bottom of each position's window, rounded up to float32 so that the top stays within
    65535 steps of it."""
    floor = (log_p_max - WINDOW).astype(np.float32)
    return np.where(floor < log_p_max - WINDOW, np.nextafter(floor, np.float32(0)), floor)


def on_grid(log_p: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """float64: the steps of log_p [n, vocab] above each position's floor [n], rounded (the base's u, unclipped)."""
    return np.rint((log_p - floor.astype(np.float64)[:, None]) / STEP)


class BaseWriter:
    """Writes a base file to the open file `f`: HEADER, the n_chunk n_ctx tokens of the chunks (int32, as in the text,
    before any BOS replacement), then per chunk its n_ctx - 1 - n_ctx / 2 records."""

    def __init__(self, f, n_ctx: int, n_vocab: int, tokens: np.ndarray, n_chunk: int):
        self.f, self.n_vocab = f, n_vocab
        f.write(np.array([(MAGIC, n_ctx, n_vocab, n_chunk)], HEADER).tobytes())
        f.write(np.ascontiguousarray(tokens[:n_chunk * n_ctx], "<i4").tobytes())

    def add(self, dist: Distribution, targets: np.ndarray) -> None:
        log_p = dist.log_p_all()
        rec = np.empty(len(targets), record(self.n_vocab))
        rec["nll"], rec["top"] = dist.nll(targets), dist.argmax()
        rec["floor"] = window_floor(log_p.max(axis=1))
        rec["u"] = np.clip(on_grid(log_p, rec["floor"]), 0, 65535)
        self.f.write(rec.tobytes())


@dataclass
class Base:
    """A base file, its size checked against its header; the records stay on disk (memory-mapped)."""
    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray      # int32 [n_chunk * n_ctx]
    records: np.ndarray     # [n_chunk, scored per chunk] of record(n_vocab)

    @property
    def n_chunk(self) -> int:
        return len(self.records)

    @classmethod
    def read(cls, path: str | Path) -> "Base":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                head, size = f.read(HEADER.itemsize), path.stat().st_size
        except OSError as e:
            raise DpllamaError(f"{path}: cannot read the KL-divergence base: {e.strerror}") from None
        if head[:8] == b"_logits_":
            raise DpllamaError(f"{path}: a llama.cpp logits file; dpllama reads its own base files (made by "
                               f"`dpllama perplexity --kl-divergence-base FILE -f TEXT`)")
        if len(head) < HEADER.itemsize or head[:8] != MAGIC:
            raise DpllamaError(f"{path}: not a KL-divergence base file of dpllama (made by `dpllama perplexity "
                               f"--kl-divergence-base FILE -f TEXT`)")
        h = np.frombuffer(head, HEADER)[0]
        n_ctx, n_vocab, n_chunk = int(h["n_ctx"]), int(h["n_vocab"]), int(h["n_chunk"])
        if n_ctx < MIN_CTX or n_ctx % 2 or n_vocab < 1 or n_chunk < 1:
            raise DpllamaError(f"{path}: impossible header (n_ctx {n_ctx}, vocabulary {n_vocab}, {n_chunk} chunks)")
        rec, scored = record(n_vocab), n_ctx - 1 - first_scored(n_ctx)
        tokens_at, records_at = HEADER.itemsize, HEADER.itemsize + 4 * n_chunk * n_ctx
        want = records_at + n_chunk * scored * rec.itemsize
        if size != want:
            raise DpllamaError(f"{path}: {size} bytes where its header ({n_chunk} chunks of {n_ctx}, vocabulary "
                               f"{n_vocab}) makes {want}: {'truncated' if size < want else 'trailing data'}")
        tokens = np.fromfile(path, "<i4", n_chunk * n_ctx, offset=tokens_at)
        if (bad := np.flatnonzero((tokens < 0) | (tokens >= n_vocab))).size:
            raise DpllamaError(f"{path}: corrupted: token {bad[0]} of the text is {tokens[bad[0]]}, expected an id "
                               f"0..{n_vocab - 1}")
        records = np.memmap(path, rec, "r", records_at, (n_chunk, scored))
        return cls(path, n_ctx, n_vocab, tokens, records)

    def chunk(self, i: int) -> np.ndarray:
        """Chunk i's records, read and checked: each field within what BaseWriter writes, so that a corrupted file
        is named, not turned into nan statistics or a traceback. Checked chunk by chunk, as they are used: a long
        text's records may not fit in memory."""
        rec = np.array(self.records[i])
        # log p of the top token is between -ln(vocab) and 0, the floor 16 below it, rounded up (a step of slack)
        low = -WINDOW - math.log(self.n_vocab) - STEP
        for field, ok, expected in (
                ("nll", (rec["nll"] >= 0) & (rec["nll"] <= MAX_NLL), f"0 to {MAX_NLL:.2f}"),
                ("top", (rec["top"] >= 0) & (rec["top"] < self.n_vocab), f"an id 0..{self.n_vocab - 1}"),
                ("floor", (rec["floor"] >= low) & (rec["floor"] <= -WINDOW), f"{low:.4f} to {-WINDOW}")):
            if not ok.all():    # NaN fails the comparisons
                j = int(np.argmin(ok))
                raise DpllamaError(f"{self.path}: corrupted: chunk {i + 1}, scored position {j}: {field} is "
                                   f"{rec[field][j]:.7g}, expected {expected}")
        return rec

    def check(self, n_vocab: int, tokens: np.ndarray | None) -> None:
        """That a model of n_vocab tokens, and the text's `tokens` if given, are those the base was made with."""
        if n_vocab != self.n_vocab:
            raise DpllamaError(f"{self.path}: made with a vocabulary of {self.n_vocab} tokens, the model has "
                               f"{n_vocab}: the base must come from a model with the same tokenizer")
        if tokens is not None and not np.array_equal(tokens[:self.tokens.size], self.tokens):
            raise DpllamaError(f"{self.path}: made from another text (or tokenizer): its tokens differ from the "
                               f"text's")


def mean_and_unc(x: np.ndarray) -> tuple[float, float]:
    """The mean and its +/- as llama.cpp's mean_and_uncertainty: sqrt((mean(x^2) - mean^2) / (n - 1))."""
    mean = float(x.mean())
    return mean, math.sqrt(max(float((x ** 2).mean()) - mean ** 2, 0.0) / max(x.size - 1, 1))


@dataclass
class KLStatistics:
    """What llama-perplexity --kl-divergence reports, over the positions scored so far: the PPL of the model (Q) and
    of the base, their ratio and correlation, KL(base || Q), delta p = p_Q - p_base of the token that follows, and
    how often the top tokens agree; each mean with its +/-, as llama.cpp computes them."""
    nll: np.ndarray         # the model's NLLs, float64 [n]
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray    # bool [n]

    @classmethod
    def of(cls, base: np.ndarray, dist: Distribution, targets: np.ndarray) -> "KLStatistics":
        """One chunk's: the model's distributions `dist` against the base's records of the same positions,
        KL(base || model) = sum over the base's window of p (log p - log q), both log-probabilities on its grid."""
        u, floor = base["u"].astype(np.float64), base["floor"]
        kld = np.where(u > 0, np.exp(u * STEP + floor[:, None]) * (u - on_grid(dist.log_p_all(), floor)), 0.0)
        kld = kld.sum(axis=1) * STEP
        return cls(dist.nll(targets), np.array(base["nll"]), kld, dist.argmax() == base["top"])

    @classmethod
    def join(cls, parts: list["KLStatistics"]) -> "KLStatistics":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nll", "nll_base", "kld", "same_top")))

    def summary(self) -> dict[str, tuple[float, float]]:
        """(value, +/-) by llama.cpp's name for it."""
        n = self.nll.size
        (lq, lq_unc), (lb, lb_unc) = mean_and_unc(self.nll), mean_and_unc(self.nll_base)
        cov = (float((self.nll * self.nll_base).mean()) - lq * lb) / max(n - 1, 1)
        ln_ratio_unc = math.sqrt(max(lq_unc ** 2 + lb_unc ** 2 - 2 * cov, 0.0))
        ppl, ppl_base = math.exp(lq), math.exp(lb)
        dp = np.exp(-self.nll) - np.exp(-self.nll_base)
        rms = math.sqrt(float((dp ** 2).mean()))
        rms_unc = (math.sqrt(max(float((dp ** 4).mean()) - rms ** 4, 0.0) / max(n - 1, 1)) / (2 * rms) if rms
                   else 0.0)
        same = float(self.same_top.mean())
        return {
            "PPL(Q)": (ppl, ppl * lq_unc),
            "PPL(base)": (ppl_base, ppl_base * lb_unc),
            "Cor(ln(PPL(Q)), ln(PPL(base)))": (cov / (lq_unc * lb_unc) if lq_unc * lb_unc else 1.0, 0.0),
            "ln(PPL(Q)/PPL(base))": (lq - lb, ln_ratio_unc),
            "PPL(Q)/PPL(base)": (math.exp(lq - lb), math.exp(lq - lb) * ln_ratio_unc),
            "PPL(Q)-PPL(base)": (ppl - ppl_base, math.sqrt(max((ppl * lq_unc) ** 2 + (ppl_base * lb_unc) ** 2
                                                               - 2 * ppl * ppl_base * cov, 0.0))),
            "KLD": mean_and_unc(self.kld),
            "delta p": mean_and_unc(dp),
            "RMS delta p": (rms, rms_unc),
            "Same top p": (same, math.sqrt(same * (1 - same) / max(n - 1, 1))),
        }
