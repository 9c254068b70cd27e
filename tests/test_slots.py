"""Several sequences in one model (Llama(slots=n)), run together in batched passes (Llama.enqueue_batch, driven
by a dpllama.generate.Batcher): each gives what it gives alone through the single-sequence path, token for
token and logit for logit, whatever shares its passes. (tests/test_forward.py checks batched passes against the
NumPy reference, under every config.)"""
from __future__ import annotations

import numpy as np
import pytest

from dpllama.errors import DpllamaError
from dpllama.generate import Batcher, Sampler, generate
from dpllama.model.llama import Llama, Part
from tests.helpers import random_weights

# prompts of different lengths: the longest (13) does not fit one pass of a 5-row model beside the others
PROMPTS = ([1, 5, 7, 9, 3, 11, 2], [2, 8, 4], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1, 2, 9])
NEW = 6


@pytest.fixture(scope="module")
def weights():
    return random_weights(seq_len=32)


@pytest.fixture(scope="module")
def model(queue, weights):
    return Llama(weights, queue, slots=3)


def sampler(i: int) -> Sampler:
    """Greedy for the first prompt, seeded sampling for the others (so that the tokens are not all alike)."""
    return Sampler(temperature=0) if i == 0 else Sampler(temperature=1.0, top_p=0.9, seed=100 + i)


def alone(model, i: int, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Tokens and the logits each came from, through the single-sequence path in slot 0."""
    model.select(0)
    gen = generate(model, prompt, NEW, sampler(i), keep_logits=True)
    tokens, logits = [], []
    for t in gen:
        tokens.append(t)
        logits.append(gen.logits)
    return tokens, logits


def run_batched(model, gens) -> list[tuple[list[int], list]]:
    """Each generation's tokens and the logits each came from (None where not kept), all run in one Batcher's
    passes to their end (at most 100)."""
    out = {id(g): ([], []) for g in gens}
    batcher = Batcher(model)
    for _ in range(100):
        for gen, token in batcher.step(gens):
            assert not isinstance(token, DpllamaError)
            if token is not None:
                out[id(gen)][0].append(token)
                out[id(gen)][1].append(gen.logits)
        if batcher.idle:
            break
    assert all(g.ended for g in gens)
    return [out[id(g)] for g in gens]


def together(model, slots_prompts, rows: int | None = None) -> list[tuple[list[int], list[np.ndarray]]]:
    """Each (slot, i)'s tokens and logits from PROMPTS[i], all generated in batched passes of at most `rows`
    rows."""
    gens = []
    for slot, i in slots_prompts:
        model.select(slot)
        gens.append(generate(model, PROMPTS[i], NEW, sampler(i), keep_logits=True))
    chunk, model.chunk = model.chunk, rows or model.chunk
    try:
        return run_batched(model, gens)
    finally:
        model.chunk = chunk


@pytest.mark.parametrize("rows", [None, 5], ids=["one-pass-prompts", "5-row-passes"])
def test_batched_sequences_give_what_each_gives_alone(model, rows):
    """In 5-row passes the prompts are cut into pieces beside the others' decode steps, and the logits wanted
    are gathered from rows in the middle of the pass."""
    solo = [alone(model, i, p) for i, p in enumerate(PROMPTS)]
    for slots in ([0, 1, 2], [2, 0, 1]):      # slots swapped: a sequence's slot does not matter either
        got = together(model, list(zip(slots, range(3))), rows)
        for (tokens, logits), (want_tokens, want_logits) in zip(got, solo):
            assert tokens == want_tokens and len(tokens) == NEW
            for a, b in zip(logits, want_logits):
                np.testing.assert_array_equal(a, b)    # the same kernels on the same rows: the same floats


def test_batch_parts_are_checked(model):
    vocab, seq = model.config.vocab_size, model.seq_len
    for parts, message in (([Part(0, seq - 1, [1, 2], True)], "past the context"),
                           ([Part(3, 0, [1], True)], "slots"),
                           ([Part(0, 0, [vocab], True)], "not in the model's vocabulary")):
        with pytest.raises(DpllamaError, match=message):
            model.batch(parts)
    with pytest.raises(ValueError, match="a batch holds 1 to"):
        model.batch([Part(0, 0, [1] * (model.chunk + 1), True)])
    with pytest.raises(ValueError, match="one part per slot"):
        model.batch([Part(0, 0, [1], False), Part(0, 1, [2], True)])


def test_chunked_prompt_equals_the_whole_prompt_fed_at_once(model):
    model.select(0)
    whole = generate(model, PROMPTS[2], 4, Sampler(temperature=0), keep_logits=True)
    first = [(t, whole.logits) for t in whole]
    chunked = generate(model, PROMPTS[2], 4, Sampler(temperature=0), chunk=3, keep_logits=True)
    second = [(t, chunked.logits) for t in chunked]
    assert [t for t, _ in first] == [t for t, _ in second]
    for (_, a), (_, b) in zip(first, second):
        np.testing.assert_array_equal(a, b)


DEVICE_DRAWS = {"greedy": lambda i: Sampler(temperature=0),
                "top-p": lambda i: Sampler(temperature=0.8, top_p=0.9, seed=10 + i),
                "whole": lambda i: Sampler(temperature=1.2, top_p=1.0, seed=20 + i),
                "top-k": lambda i: Sampler(temperature=0.9, top_k=40, top_p=0.95, seed=30 + i),
                "penalized": lambda i: Sampler(temperature=0.9, top_k=40, top_p=0.95, repeat_penalty=1.3,
                                               presence_penalty=0.3, frequency_penalty=0.5, repeat_last_n=6,
                                               seed=40 + i),
                "greedy penalized": lambda i: Sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=64)}


@pytest.mark.parametrize("draw", list(DEVICE_DRAWS))
@pytest.mark.parametrize("rows", [None, 5], ids=["one-pass-prompts", "5-row-passes"])
def test_tokens_drawn_on_the_device_give_what_each_gives_alone(model, rows, draw, monkeypatch):
    """Generations without kept logits, greedy or sampled at a temperature (with top-p, top-k and top-p, or from the
    whole distribution; with penalties, over windows that the batch uploads with the token fed from the device last,
    and that alone choose_embed reads from the sequence's tokens), get their tokens drawn on the device (choose_rows;
    alone, choose_embed), and each pass is
    enqueued before the host has read the one before: the next pass feeds those tokens from the device. Each gives
    the tokens it gives alone (the same logits, the same coins: the same draws), whether a stop token ends it part
    way (its extra row dropped), max_new does, or it shares its passes with a sequence drawn on the host (which
    makes the Batcher wait)."""
    new_sampler = DEVICE_DRAWS[draw]

    def solo(i, stop):
        model.select(0)
        return list(generate(model, PROMPTS[i], NEW, new_sampler(i), stop))
    free = [solo(i, set()) for i in range(3)]
    stops = [set(), {free[1][2]}, set()]                # sequence 1 stops at its third token (or before)
    want = [solo(i, stops[i]) for i in range(3)]
    assert len(want[1]) < NEW and len(want[0]) == len(want[2]) == NEW
    fed_from_device = []
    enqueue = model.enqueue_batch
    monkeypatch.setattr(model, "enqueue_batch", lambda parts: (
        fed_from_device.extend(t for p in parts for t in p.tokens if t < 0), enqueue(parts))[1])
    chunk, model.chunk = model.chunk, rows or model.chunk
    try:
        for host_drawn in (False, True):       # then sequence 2 keeps its logits: its tokens are drawn on the host
            gens = []
            for slot, i in enumerate(range(3)):
                model.select(slot)
                gens.append(generate(model, PROMPTS[i], NEW, new_sampler(i), stops[i],
                                     keep_logits=host_drawn and i == 2))
            assert [tokens for tokens, _ in run_batched(model, gens)] == want
    finally:
        model.chunk = chunk
    assert fed_from_device, "no pass fed a token from the device"


@pytest.mark.parametrize("kind,on_device", [("top-p", True), ("whole", True), ("top-k 1", True), ("top-k 5", True),
                                             ("repeat penalty", True), ("penalties over 256", True),
                                             ("penalties over 257", False), ("penalties over all", False),
                                             ("kept logits", False)])
def test_tokens_are_drawn_on_the_device_unless_the_host_must(model, monkeypatch, kind, on_device):
    """A sampler at a temperature draws on the device (no logits come back, and the next step is enqueued before
    the token is read), with top-k, top-p or neither, and top-k 1 is the argmax, after penalties over up to
    PENALTY_WINDOW tokens; penalties over more (or the whole history) or kept logits (log-probabilities) read the
    logits back and draw on the host."""
    samplers = {"top-p": Sampler(temperature=0.8, top_p=0.9, seed=1), "whole": Sampler(temperature=0.8, top_p=1.0),
                "top-k 1": Sampler(temperature=0.8, top_k=1), "top-k 5": Sampler(temperature=0.8, top_k=5),
                "repeat penalty": Sampler(temperature=0.8, repeat_penalty=1.3),
                "penalties over 256": Sampler(temperature=0.8, frequency_penalty=0.5, repeat_last_n=256),
                "penalties over 257": Sampler(temperature=0.8, frequency_penalty=0.5, repeat_last_n=257),
                "penalties over all": Sampler(temperature=0.8, presence_penalty=0.5, repeat_last_n=-1),
                "kept logits": Sampler(temperature=0.8)}
    reads = []
    read_logits = model.read_logits
    monkeypatch.setattr(model, "read_logits", lambda: (reads.append(1), read_logits())[1])
    model.select(0)
    tokens = list(generate(model, PROMPTS[0], NEW, samplers[kind], keep_logits=kind == "kept logits"))
    assert len(tokens) == NEW
    assert (not reads) == on_device, f"{kind}: {len(reads)} reads of the logits"


@pytest.mark.parametrize("last_n", [3, 64])
def test_penalties_on_the_device_give_the_hosts_tokens(model, last_n):
    """Greedy with penalties strong enough to change its course: the tokens drawn on the device (alone: choose_embed,
    the window from the sequence's tokens on the device; batched beside another sequence: choose_rows, the window
    from the host with the token fed from the device) are those the host draws (kept logits: Sampler.penalize on the
    logits read back, then the argmax), which the device's penalties give bit for bit."""
    sampler = lambda: Sampler(temperature=0, repeat_penalty=1.8, presence_penalty=0.4, frequency_penalty=0.6,  # noqa: E731
                              repeat_last_n=last_n)
    model.select(0)
    plain = list(generate(model, PROMPTS[1], NEW, Sampler(temperature=0)))
    host = list(generate(model, PROMPTS[1], NEW, sampler(), keep_logits=True))
    device = list(generate(model, PROMPTS[1], NEW, sampler()))
    assert host != plain, "the penalties must change the greedy tokens"
    assert device == host
    gens = []
    for slot, (prompt, s) in enumerate(((PROMPTS[1], sampler()), (PROMPTS[0], Sampler(temperature=0)))):
        model.select(slot)
        gens.append(generate(model, prompt, NEW, s))
    assert run_batched(model, gens)[0][0] == host


def test_prepared_batches_record_nothing_when_they_run(queue, weights, monkeypatch):
    """prepare_batches(n) records the launches of every batch of decode steps of up to n sequences and of a full
    pass (the server does, before it is ready): batches of one-token prompts and decode steps then record nothing,
    and their tokens are the ones each sequence gives alone. Past decode_rows rows, a batch runs padded to whole
    groups of prefill's rows (padded_rows), so sizes share their launches."""
    fresh = Llama(weights, queue, slots=3)
    prompts = [[5], [7], [9]]
    want = [alone(fresh, i, p)[0] for i, p in enumerate(prompts)]
    fresh.prepare_batches(3)
    sizes = sorted({fresh.padded_rows(n) for n in (1, 2, 3)} | {fresh.chunk})
    assert sorted(fresh.batch_commands) == sizes and fresh.chunk in sizes and len(sizes) <= 4
    assert list(fresh.head_commands) == list(fresh.choose_rows_commands) == [1, 2, 3]
    monkeypatch.setattr(fresh, "_layer_commands", lambda *a: pytest.fail(f"a batch recorded its pass: {a[0]} rows"))
    gens = []
    for slot, p in enumerate(prompts):
        fresh.select(slot)
        gens.append(generate(fresh, p, NEW, sampler(slot), keep_logits=True))
    assert [tokens for tokens, _ in run_batched(fresh, gens)] == want
    assert sorted(fresh.batch_commands) == sizes and list(fresh.head_commands) == [1, 2, 3]


def test_prompt_pieces_beside_decoding_rows_cost_at_most_a_pass(queue, monkeypatch):
    """Beside a decoding sequence, a long prompt goes in pieces that cost the pass at most what `chunk` rows at
    position 0 cost (generate.piece_rows: attention makes a row at position p cost 1 + p / positions_per_row), so
    that the decoding sequence's tokens never wait for a pass of `chunk` rows far into the context; and both give
    what each gives alone."""
    from dpllama.generate import positions_per_row, rows_cost
    weights = random_weights(seq_len=256, seed=4)
    model = Llama(weights, queue, slots=2, chunk=64)
    P = positions_per_row(weights.config)
    assert P < 100          # this model's pieces shrink well within its context (at 190 they are a third)
    rng = np.random.default_rng(1)
    long = [int(t) for t in rng.integers(1, weights.config.vocab_size, 200)]
    model.select(0)
    want_short = list(generate(model, [1, 2, 3], 220, Sampler(temperature=0)))
    model.select(0)
    want_long = list(generate(model, long, 8, Sampler(temperature=0)))
    passes = []
    enqueue = model.enqueue_batch
    monkeypatch.setattr(model, "enqueue_batch", lambda parts: passes.append(list(parts)) or enqueue(parts))
    model.select(0)
    short = generate(model, [1, 2, 3], 220, Sampler(temperature=0))
    batcher, got = Batcher(model), {}
    for _ in range(20):     # the short one decoding before the long one comes
        for gen, token in batcher.step([short]):
            if token is not None:
                got.setdefault(id(gen), []).append(token)
    model.select(1)
    second = generate(model, long, 8, Sampler(temperature=0))
    for _ in range(400):
        for gen, token in batcher.step([short, second]):
            if token is not None:
                got.setdefault(id(gen), []).append(token)
        if batcher.idle:
            break
    assert got[id(short)] == want_short and got[id(second)] == want_long
    beside = [p for p in passes if len(p) > 1 and any(len(x.tokens) > 1 for x in p)]
    pieces = [len(x.tokens) for p in beside for x in p if x.slot == 1]
    assert sum(pieces) + 1 >= len(long) - 64 and min(pieces) < 64 // 3     # every piece but maybe the first: beside
    for p in beside:
        cost = sum(rows_cost(P, len(x.tokens), x.pos) for x in p)
        piece = next(x for x in p if x.slot == 1)
        assert cost <= model.chunk or len(piece.tokens) == 1, (cost, [(x.pos, len(x.tokens)) for x in p])
