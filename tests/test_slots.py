"""Several sequences in one model (Llama(slots=n), select): interleaved, each gives what it gives alone."""
from __future__ import annotations

import numpy as np
import pytest

from dpllama.generate import Sampler, generate
from dpllama.model.llama import Llama
from tests.helpers import random_weights

PROMPTS = ([1, 5, 7, 9, 3, 11, 2], [2, 8, 4])


@pytest.fixture(scope="module")
def model(queue):
    return Llama(random_weights(seq_len=32), queue, slots=2)


def run(model, slots_prompts, new, keep_logits, chunk=2):
    """Generate from each (slot, prompt) with the steps interleaved round-robin; each one's tokens and (with
    keep_logits) the logits of each token."""
    gens = []
    for slot, prompt in slots_prompts:
        model.select(slot)
        gens.append((slot, generate(model, prompt, new, Sampler(temperature=0), chunk=chunk,
                                    keep_logits=keep_logits), [], []))
    live = list(gens)
    for _ in range(100):
        if not live:
            break
        for entry in list(live):
            slot, gen, tokens, logits = entry
            model.select(slot)
            token = next(gen.steps(), "end")
            if token == "end":
                live.remove(entry)
            elif token is not None:
                tokens.append(token)
                logits.append(gen.logits)
    return [(tokens, logits) for _, _, tokens, logits in gens]


@pytest.mark.parametrize("keep_logits", [True, False], ids=["host", "device-greedy"])
def test_two_slots_interleaved_give_what_each_gives_alone(model, keep_logits):
    alone = [run(model, [(0, p)], 6, keep_logits)[0] for p in PROMPTS]
    together = run(model, [(0, PROMPTS[0]), (1, PROMPTS[1])], 6, keep_logits)
    swapped = run(model, [(1, PROMPTS[0]), (0, PROMPTS[1])], 6, keep_logits)
    for (tokens, logits), (t2, l2), (t3, l3) in zip(alone, together, swapped):
        assert tokens == t2 == t3 and len(tokens) == 6
        for a, b, c in zip(logits, l2, l3):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_chunked_steps_equal_the_whole_prompt_fed_at_once(model):
    model.select(0)
    whole = generate(model, PROMPTS[0], 4, Sampler(temperature=0), keep_logits=True)
    first = [(t, whole.logits) for t in whole]
    chunked = run(model, [(0, PROMPTS[0])], 4, True, chunk=3)[0]
    assert [t for t, _ in first] == chunked[0]
    for (_, a), b in zip(first, chunked[1]):
        np.testing.assert_array_equal(a, b)
