"""JSON mode (dpllama.constrain): the validator against Python's json, byte by byte and in every split; the masks
against checking every token; and generations held to it, on a random tiny model (the text is always a JSON
object's prefix) and on SmolLM2 (whose replies close: json.loads gives a dict)."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from dpllama.chat import chat_prompt
from dpllama.constrain import MAX_WS, OPEN, JsonMode, Vocabulary, done, feed, step
from dpllama.generate import Batcher, Sampler, generate
from dpllama.model.llama import Llama
from dpllama.tokenizer import tokenizer_from_gguf_fields
from dpllama.tokenizer.gguf import _bytes_to_unicode
from tests.helpers import random_weights, smollm2_gguf_path
from tests.test_tokenizer import gpt2_fields


def python_accepts(data: bytes) -> bool:
    """Whether `data` is one JSON object as Python reads it: UTF-8, RFC 8259's JSON (no NaN or Infinity)."""
    def constant(name):
        raise ValueError(name)
    try:
        return isinstance(json.loads(data.decode("utf-8"), parse_constant=constant), dict)
    except ValueError:          # UnicodeDecodeError and JSONDecodeError too
        return False


TEXT = 'ab z"\\/\b\f\n\r\t\x01\x1f\x7f\u00e9\u0800\uffff\u65e5\U0001F600\U0010FFFF\u2028'


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randrange(6)))


def random_value(rng: random.Random, depth: int):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -0, 7, -31, 10**rng.randrange(20), -rng.randrange(10**9)])
    if kind == 2:
        return rng.choice([0.5, -1.25e-7, 3e20, 1e-5, -0.0, 123.456, rng.uniform(-1e6, 1e6)])
    if kind in (3, 4):
        return random_text(rng)
    if kind in (5, 6):
        return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def documents(n: int, seed: int = 0) -> list[bytes]:
    """Objects json.dumps writes, of every kind of value, compact or indented (runs of whitespace up to 13), ASCII
    or UTF-8, with whitespace around."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        value = {random_text(rng): random_value(rng, 1) for _ in range(rng.randrange(4))}
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 0, 2, "\t"]),
                          separators=rng.choice([None, (",", ":"), (" , ", " : ")]))
        docs.append((rng.choice(["", " ", "\r\n"]) + text + rng.choice(["", "\n", " \t"])).encode())
    return docs


VALID = [b'{}', b'{"":""}', b'{"a":-0}', b'{"a":0.0e0}', b'{"a":1E+2,"b":-0.5e-10,"c":10}', b'{"a":[[], {}, [{}]]}',
         b'{"a":"\\u00E9\\uD83D\\ude00\\/\\b\\f\\n\\r\\t\\"\\\\"}', b'{"a":true,"b":false,"c":null}',
         '{"\u0800\uffff\U00010000\U0010FFFF\ue000\u07ff\x7f":1}'.encode(), b'{' + b' ' * MAX_WS + b'}',
         b'{"a":[1,2,3]}' + b'\n' * MAX_WS, b' {"a" : [ 1 , { "b" : "c" } ] } ']
INVALID = [b'', b'[]', b'"a"', b'1', b'null', b'{"a":01}', b'{"a":1.}', b'{"a":.5}', b'{"a":+1}', b'{"a":1e}',
           b'{"a":--1}', b'{"a":-}', b'{"a":tru}', b'{"a":True}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}',
           b'{"a":1,}', b'{"a":[1,]}', b'{,}', b"{'a':1}", b'{"a" 1}', b'{"a"::1}', b'{1:2}', b'{"a":1}}',
           b'{"a":1}{', b'{"a":1}x', b'{"a":"\x01"}', b'{"a":"\n"}', b'{"a":"\\x"}', b'{"a":"\\u12G4"}',
           b'{"a":"\xc0\xaf"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\x80"}',
           b'{"a":"\xe6"}', b'{"a":"\xf5\x80\x80\x80"}', b'\xef\xbb\xbf{}', b'{' + b' ' * (MAX_WS + 1) + b'}',
           b'{"a":[1]' + b'\t' * (MAX_WS + 1) + b'}']
NOISE = b' \t\n\r{}[]:,"\\/0123456789-+.eEtrufalsn' + bytes([0, 0x1F, 0x7F, 0x80, 0xBF, 0xC0, 0xC3, 0xE0, 0xED, 0xF0,
                                                              0xF4, 0xF5, 0xFF])


def mutations(doc: bytes, rng: random.Random) -> list[bytes]:
    """`doc` with a byte deleted, inserted, replaced, two swapped, or cut short."""
    i = rng.randrange(len(doc))
    noise = bytes([rng.choice(NOISE)])
    return [doc[:i] + doc[i + 1:], doc[:i] + noise + doc[i:], doc[:i] + noise + doc[i + 1:],
            doc[:i] + doc[i + 1:i + 2] + doc[i:i + 1] + doc[i + 2:], doc[:i]]


def corpus() -> list[bytes]:
    rng = random.Random(1)
    docs = VALID + documents(300)
    return docs + INVALID + [m for d in docs for m in mutations(d, rng)]


# bytes enough to close any prefix: the opening brace, a quote, closers, a colon, a digit, the literals' letters, a
# UTF-8 continuation byte in every lead byte's range
CLOSING = b'{"}]:0ruelsa\x80\x90\xa0'


def completion(state: tuple) -> bytes | None:
    """The shortest bytes of CLOSING that take `state` to a closed object (breadth first)."""
    seen, frontier = {state}, [(state, b"")]
    while frontier:
        after = []
        for s, path in frontier:
            if done(s):
                return path
            for b in CLOSING:
                t = step(s, b)
                if t is not None and t not in seen:
                    seen.add(t)
                    after.append((t, path + bytes([b])))
        frontier = after
    return None


def longest_ws_run(data: bytes) -> int:
    return max((len(m) for m in re.findall(rb"[ \t\n\r]+", data)), default=0)


def test_the_validator_accepts_exactly_json_objects_and_their_prefixes():
    """For each of ~1,700 strings (valid objects, every kind of error, and the objects with a byte deleted, inserted,
    replaced or swapped, or cut short), fed byte by byte and in every split into two pieces: the validator says
    "done" exactly where Python's json reads a whole object (with whitespace runs of at most MAX_WS); each prefix it
    accepts is one of a valid object (Python reads it closed by the validator's shortest completion); and an
    accepted prefix of a valid object is never refused."""
    checked = set()
    for data in corpus():
        if data in checked:
            continue
        checked.add(data)
        states = [OPEN]
        for b in data:
            states.append(states[-1] and step(states[-1], b))
        final = states[-1]
        for k in range(len(data) + 1):      # fed in two pieces, split anywhere: the same verdict
            assert feed(feed(OPEN, data[:k]), data[k:]) == final, (data, k)
        accepts = python_accepts(data) and longest_ws_run(data) <= MAX_WS
        assert done(final) == accepts, data
        reached = max(k for k, s in enumerate(states) if s is not None)
        for k in range(reached + 1):        # "done" as soon as, and only once, the object has closed
            assert done(states[k]) == python_accepts(data[:k]), (data, k)
        rest = completion(states[reached])
        assert rest is not None and python_accepts(data[:reached] + rest), (data, reached, rest)
    assert len(checked) > 1500


def test_whitespace_runs_are_bounded():
    """MAX_WS bytes of whitespace in a row, anywhere JSON allows them, and no more: a model cannot loop on them."""
    for place in (b"", b"{", b'{"a"', b'{"a":', b'{"a":1', b'{"a":[', b'{"a":[1,', b'{"a":1}'):
        state = feed(OPEN, place)
        assert feed(state, b" \t\n\r" * (MAX_WS // 4)) is not None
        assert feed(state, b" " * (MAX_WS + 1)) is None, place
    assert feed(OPEN, b'{"' + b" " * 100) is not None      # a string's spaces are its text


# tokens of several bytes beside the tiny vocabulary's single bytes: closers in runs (what a mask keyed on the stack's
# top must see), pieces of UTF-8 characters, escapes, whitespace runs, literals, and a user-defined token ("<tool>")
PIECES = [b'"}', b'}}', b']}', b'"}]', b'}]}', b'"]}}', b'": ', b'", "', b'{"', b'[{', b'\\u00', b'\\n', b'true',
          b'null}', b'0.5', b'-1', b'e+', b'\xe6\x97', b'\xe6\x97\xa5', b'\xf0\x9f', b'\x98\x80"', b'  ',
          b'\n' + b' ' * 12, b' ' * 24, b'abc', b'"a"', b'\t}']


def tiny_fields() -> dict:
    fields = gpt2_fields()
    chars = _bytes_to_unicode()
    fields["tokenizer.ggml.tokens"] += ["".join(chars[b] for b in p) for p in PIECES]
    fields["tokenizer.ggml.token_type"] += [1] * len(PIECES)
    return fields


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf_fields(tiny_fields(), "tiny.gguf")


def test_masks_are_the_tokens_that_fit(tok):
    """A mask (made by walking the sorted pieces, kept per mode, top of the stack and whitespace run) holds exactly
    the tokens whose bytes continue the state, for every state the corpus passes through: states that share a mask
    (deeper stacks alike at the top) included. Special tokens never fit; a user-defined one prints, so fits in a
    string."""
    vocab = Vocabulary(tok)
    assert vocab.reach == 4         # "]}}" closes three containers: the stack's top four decide
    special = [t for t in range(tok.vocab_size) if tok.unprinted(t)]
    tool = tok.token_to_id["<tool>"]
    states = {OPEN}
    for data in VALID + documents(30, seed=2) + [b'{"a":[[[[[{"b":[[{"c":"d', b'{"a":[[[[[{"b":[[{"c":[1']:
        for k in range(len(data) + 1):
            states.add(feed(OPEN, data[:k]))
    for state in states:
        want = np.array([bool(p) and feed(state, p) is not None for p in vocab.pieces])
        assert (vocab.allowed(state) == want).all(), state
        assert not want[special].any()
        mode = JsonMode(tok)
        mode.state = state
        assert [mode.fits(t) for t in range(tok.vocab_size)] == list(want)
    assert len(vocab.masks) < len(states)
    assert vocab.allowed(feed(OPEN, b'{"'))[tool]


@pytest.fixture(scope="module")
def tiny(queue, tok):
    """A random model over the tiny vocabulary, two slots."""
    return Llama(random_weights(vocab=tok.vocab_size, seq_len=96, seed=3), queue, slots=2)


def json_text(tok, tokens: list[int]) -> bytes:
    return b"".join(tok.token_bytes(t) for t in tokens)


def test_json_mode_on_a_random_model(tiny, tok):
    """A random model's tokens, greedy and sampled, in JSON mode: every one prints and the text is always a JSON
    object's prefix (closed where the generation says it stopped, cut at max_new where not); the same seed gives the
    same tokens, and batched driving (the server's) the tokens the single sequence gets. The draws are on the host;
    without JSON mode the same sampler draws on the device, as it did."""
    prompt, closed = tok.encode("the 12"), 0
    tiny.select(0)
    assert generate(tiny, prompt, 8, Sampler(temperature=0)).on_device
    assert generate(tiny, prompt, 8, Sampler(temperature=0.8, seed=1)).on_device
    for sampler in (lambda: Sampler(temperature=0), *(lambda s=s: Sampler(temperature=1.0, seed=s) for s in (1, 2, 3))):
        tiny.select(0)
        gen = generate(tiny, prompt, 40, sampler(), tok.eos_ids, json=JsonMode(tok))
        assert not gen.on_device
        tokens = list(gen)
        state = feed(OPEN, json_text(tok, tokens))
        assert state is not None and not any(tok.unprinted(t) for t in tokens)
        assert gen.stopped == done(state) and (gen.stopped or len(tokens) == 40), tokens
        if gen.stopped:
            assert python_accepts(json_text(tok, tokens))
            closed += 1
        tiny.select(0)
        assert list(generate(tiny, prompt, 40, sampler(), tok.eos_ids, json=JsonMode(tok))) == tokens
        gens = []
        for slot, json_mode in enumerate((True, False)):
            tiny.select(slot)
            gens.append(generate(tiny, prompt, 40, sampler(), tok.eos_ids, json=JsonMode(tok) if json_mode else None))
        got = {id(g): [] for g in gens}
        batcher = Batcher(tiny)
        for _ in range(200):
            for gen, token in batcher.step(gens):
                if token is not None:
                    got[id(gen)].append(token)
            if batcher.idle:
                break
        assert got[id(gens[0])] == tokens and all(g.ended for g in gens)
    assert closed       # seed 3's object closes in 21 tokens


@pytest.fixture(scope="module")
def smollm2():
    import dpllama
    return dpllama.load(str(smollm2_gguf_path()), max_seq=320)


def test_json_mode_on_smollm2(smollm2):
    """SmolLM2 asked for JSON: its replies in JSON mode, greedy and sampled with several seeds, are each one JSON
    object that json.loads reads as a dict, the generation stopping as it closes (the same seed, the same text); cut
    short by the steps, the text is no JSON and the generation did not stop. Without JSON mode its greedy reply is
    Markdown around the JSON (```json ...), which is what JSON mode keeps out."""
    llm = smollm2
    ids = chat_prompt(llm.tokenizer, [{"role": "user", "content": "Reply in JSON: the name and age of a person "
                                                                  "called Bob who is 30."}])
    steps = len(ids) + 160
    plain = "".join(llm.stream(ids, steps, Sampler(temperature=0), echo_prompt=False))
    assert not python_accepts(plain.encode())
    for sampler in (lambda: Sampler(temperature=0), *(lambda s=s: Sampler(temperature=0.7, seed=s) for s in (1, 2, 3))):
        stream = llm.stream(ids, steps, sampler(), echo_prompt=False, json=True)
        text = "".join(stream)
        assert isinstance(json.loads(text), dict) and stream.generation.stopped, text
        assert "".join(llm.stream(ids, steps, sampler(), echo_prompt=False, json=True)) == text
    cut = llm.stream(ids, len(ids) + 6, Sampler(temperature=0), echo_prompt=False, json=True)
    text = "".join(cut)
    assert not cut.generation.stopped and not python_accepts(text.encode()) and feed(OPEN, text.encode()), text
    text = "".join(llm.generate("A JSON object:", 80, temperature=0, echo_prompt=False, json=True))
    assert isinstance(json.loads(text), dict), text     # "\n\n{\n ...": whitespace may come first
