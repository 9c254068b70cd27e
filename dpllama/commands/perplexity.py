"""`dpllama perplexity -m MODEL -f TEXT`: perplexity over a text in llama.cpp's `llama-perplexity` protocol
(dpllama/perplexity.py), and KL divergence against a reference model's saved distributions.

As llama.cpp: the running PPL after each chunk (`[1]12.5616,[2]21.2799,...`) and the results go to stdout, progress
and timing to stderr (llama.cpp prints its `Final estimate` line through its log, on stderr; here it is on stdout
with the other results, so that `> file` keeps them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from dpllama.commands.options import add_activation_bits, add_device, add_model, load_llm
from dpllama.errors import DpllamaError
from dpllama.fileio import atomic_output, check_input, check_output
from dpllama.perplexity import (Base, BaseWriter, KLStatistics, check_ctx, chunk_count, chunk_distributions,
                                ppl_estimate)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("-f", "--file", metavar="TEXT", help="the text to score (WikiText-2's wiki.test.raw, as is); "
                   "with --kl-divergence optional: the base file holds its tokens")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="tokens per chunk, even; the second half of each is scored (default 512; with "
                        "--kl-divergence the base file's)")
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="score at most N chunks (default all)")
    p.add_argument("--kl-divergence-base", metavar="FILE",
                   help="without --kl-divergence: save the model's distributions at every scored position to FILE "
                        "(its top tokens; see docs/ARCHITECTURE.md); with it: the reference to compare against")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare the model with the base of --kl-divergence-base: KL divergence, same top token, "
                        "PPL ratio")
    add_device(p, ctx=False)
    add_activation_bits(p)


def say(text: str) -> None:
    print(f"perplexity: {text}", file=sys.stderr, flush=True)


def read_text(path: str) -> str:
    check_input(path)
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise DpllamaError(f"{path}: cannot read the text: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DpllamaError(f"{path}: not UTF-8 text (byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    if args.chunks is not None and args.chunks < 1:
        raise DpllamaError(f"--chunks must be at least 1, found {args.chunks}")
    base = None
    if args.kl_divergence:
        if not args.kl_divergence_base:
            raise DpllamaError("--kl-divergence needs --kl-divergence-base FILE, the reference's saved distributions")
        base = Base.read(args.kl_divergence_base)
        if args.ctx_size is not None and args.ctx_size != base.n_ctx:
            raise DpllamaError(f"-c {args.ctx_size}: the base {base.path} was made with -c {base.n_ctx}")
        n_ctx = base.n_ctx
    else:
        if not args.file:
            raise DpllamaError("give the text to score with -f TEXT")
        if args.kl_divergence_base:
            check_output(args.kl_divergence_base, (args.file,))
        n_ctx = 512 if args.ctx_size is None else args.ctx_size
    text = read_text(args.file) if args.file else None
    check_ctx(n_ctx)     # the protocol's own limits, before the model loads
    args.ctx = n_ctx
    # the model's context from its header, before kernels compile; then what the device holds (fit_context)
    llm = load_llm(args, check=lambda config: check_ctx(n_ctx, config.seq_len))
    check_ctx(n_ctx, llm.model.seq_len)
    tokens = None
    if text is not None:
        say("tokenizing the input ..")
        t = time.perf_counter()
        tokens = np.asarray(llm.tokenizer.encode(text), np.int32)
        say(f"tokenization took {(time.perf_counter() - t) * 1e3:.1f} ms: {tokens.size} tokens")
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    if base is not None:
        base.check(llm.model.config.vocab_size, tokens)
        n_chunk = base.n_chunk if args.chunks is None else min(args.chunks, base.n_chunk)
        return kl_divergence(llm.model, base, n_chunk, bos)
    n_chunk = chunk_count(tokens.size, n_ctx, args.chunks)
    if args.kl_divergence_base:
        with atomic_output(args.kl_divergence_base) as tmp, open(tmp, "wb") as f:
            perplexity(llm.model, tokens, n_ctx, n_chunk, bos,
                       BaseWriter(f, n_ctx, llm.model.config.vocab_size, tokens, n_chunk))
        say(f"saved the distributions at every scored position to {args.kl_divergence_base}")
    else:
        perplexity(llm.model, tokens, n_ctx, n_chunk, bos)
    return 0


class Timer:
    """llama.cpp's time per pass and ETA after the first chunk, and the speed at the end (on stderr)."""

    def __init__(self, model, n_ctx: int, n_chunk: int):
        say(f"calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={model.chunk} (prefill chunk)")
        self.n_ctx, self.n_chunk, self.done = n_ctx, n_chunk, 0
        self.start = time.perf_counter()

    def chunk_done(self) -> None:
        self.done += 1
        if self.done == 1:
            s = time.perf_counter() - self.start
            say(f"{s:.2f} seconds per pass - ETA {s * self.n_chunk / 60:.2f} minutes")

    def end(self) -> None:
        s = time.perf_counter() - self.start
        fed = self.done * (self.n_ctx - 1)      # position n_ctx - 1 of a chunk is never fed
        say(f"{self.done} chunks, {fed} tokens in {s:.2f} s: {fed / s:.1f} tok/s (batched prefill, every scored "
            f"position's logits, scoring)")


def perplexity(model, tokens: np.ndarray, n_ctx: int, n_chunk: int, bos: int | None,
               writer: BaseWriter | None = None) -> None:
    """Score n_chunk chunks, printing the running PPL after each and the final estimate; `writer` saves the
    distributions too."""
    timer, out, nll = Timer(model, n_ctx, n_chunk), sys.stdout, []
    for i, (dist, targets) in enumerate(chunk_distributions(model, tokens, n_ctx, n_chunk, bos)):
        nll.append(dist.nll(targets))
        if writer is not None:
            writer.add(dist, targets)
        timer.chunk_done()
        out.write(f"[{i + 1}]{np.exp(np.concatenate(nll).mean()):.4f},")
        out.flush()
    out.write("\n")
    timer.end()
    ppl, pm = ppl_estimate(np.concatenate(nll))
    out.write(f"Final estimate: PPL = {ppl:.4f} +/- {pm:.5f}\n")


COLUMNS = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
           "Δp RMS            Same top p")


def kl_divergence(model, base: Base, n_chunk: int, bos: int | None) -> int:
    """Compare the model with the base over n_chunk chunks: a row of running statistics per chunk, as llama.cpp's
    table, then the summary."""
    timer, out, parts = Timer(model, base.n_ctx, n_chunk), sys.stdout, []
    out.write(COLUMNS + "\n")
    for i, (dist, targets) in enumerate(chunk_distributions(model, base.tokens, base.n_ctx, n_chunk, bos)):
        parts.append(KLStatistics.of(base.chunk(i), dist, targets))
        timer.chunk_done()
        s = KLStatistics.join(parts).summary()
        out.write(f"{i + 1:4d}{s['PPL(Q)'][0]:14.4f} ± {s['PPL(Q)'][1]:9.4f}"
                  f"{s['ln(PPL(Q)/PPL(base))'][0]:14.5f} ± {s['ln(PPL(Q)/PPL(base))'][1]:9.5f}"
                  f"{s['KLD'][0]:14.5f} ± {s['KLD'][1]:9.5f}"
                  f"{100 * s['RMS delta p'][0]:10.3f} ± {100 * s['RMS delta p'][1]:6.3f} %"
                  f"{100 * s['Same top p'][0]:11.3f} ± {100 * s['Same top p'][1]:6.3f} %\n")
        out.flush()
    timer.end()
    stats = KLStatistics.join(parts)
    out.write(summary_text(stats))
    return 0


def summary_text(stats: KLStatistics) -> str:
    """llama.cpp's three blocks of statistics, in its words and formats."""
    s = stats.summary()
    v = lambda name: f"{s[name][0]:10.6f} ± {s[name][1]:10.6f}"   # noqa: E731
    kld = np.sort(stats.kld)
    at = lambda q: kld[min(int(q * kld.size), kld.size - 1)]       # noqa: E731
    lines = ["", "====== Perplexity statistics ======"]
    lines += [f"Mean PPL(Q)                   : {v('PPL(Q)')}",
              f"Mean PPL(base)                : {v('PPL(base)')}",
              f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['Cor(ln(PPL(Q)), ln(PPL(base)))'][0]:6.2f}%",
              f"Mean ln(PPL(Q)/PPL(base))     : {v('ln(PPL(Q)/PPL(base))')}",
              f"Mean PPL(Q)/PPL(base)         : {v('PPL(Q)/PPL(base)')}",
              f"Mean PPL(Q)-PPL(base)         : {v('PPL(Q)-PPL(base)')}",
              "", "====== KL divergence statistics ======",
              f"Mean    KLD: {v('KLD')}",
              f"Maximum KLD: {kld[-1]:10.6f}",
              f"99.9%   KLD: {at(0.999):10.6f}",
              f"99.0%   KLD: {at(0.99):10.6f}",
              f"Median  KLD: {at(0.5):10.6f}",
              f"Minimum KLD: {kld[0]:10.6f}",
              "", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['delta p'][0]:6.3f} ± {100 * s['delta p'][1]:5.3f} %",
              f"RMS Δp    : {100 * s['RMS delta p'][0]:6.3f} ± {100 * s['RMS delta p'][1]:5.3f} %",
              f"Same top p: {100 * s['Same top p'][0]:6.3f} ± {100 * s['Same top p'][1]:5.3f} %", ""]
    return "\n".join(lines)
