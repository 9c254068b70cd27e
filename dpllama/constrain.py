"""JSON mode: a generation whose text is one JSON object (RFC 8259), as OpenAI's `response_format: {"type":
"json_object"}` and llama.cpp's JSON grammar give it.

`feed` is an incremental validator over bytes, a pushdown automaton whose state is an immutable tuple (mode, stack,
aux), so that a copy is the tuple itself: it accepts exactly the prefixes of whitespace, one object and whitespace
(JSON's text with an object for its value), and `done` says when the object has closed. The stack holds the open
containers, one character each: "k" an object awaiting a key, "v" an object reading a key's value, "a" an array.
Structural whitespace comes at most MAX_WS bytes in a row (llama.cpp's json.gbnf bounds it alike), so a model
cannot loop on it; strings are UTF-8 (no overlong forms or surrogates, as Python decodes it) without unescaped
control characters, numbers are the grammar's (no leading zeros, no "+", no bare "."), and \\uXXXX takes any four
hex digits, as RFC 8259's grammar and Python's json do.

`JsonMode` applies it to a generation: each token's bytes as its text prints them (`Vocabulary`, once per
tokenizer), and the tokens that can continue a state (a mask over the vocabulary), made by walking the sorted
pieces, sharing their common prefixes' steps and skipping every piece that starts with a dead prefix, and kept per
state as far as the tokens can see it (the mode, the top of the stack that the most closing brackets of one token
can reach, the whitespace run): 30-90 ms in Python for SmolLM2's 49k tokens in a string (~1 ms elsewhere, where
few tokens fit), so `Sampler.pick` asks for one only when the token it drew first does not fit, as llama.cpp's
sampler does.
"""
from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache

import numpy as np

from dpllama.tokenizer import Tokenizer

MAX_WS = 20
MASKS = 256         # masks kept per vocabulary (49 KB each for SmolLM2's); all dropped when it is full

(START, KEY_OR_CLOSE, KEY, COLON, VALUE, VALUE_OR_CLOSE, AFTER, DONE, STRING, ESCAPE, HEX, UTF8, LITERAL,
 MINUS, ZERO, INT, POINT, FRACTION, EXP, EXP_SIGN, EXPONENT) = range(21)
OPEN = (START, "", 0)

WS = frozenset(b" \t\n\r")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# a UTF-8 lead byte: (continuation bytes, the first one's range), as Python's decoder takes them
LEADS = {**{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)},
         **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)},
         0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)}
DIGITS = {b: INT for b in b"123456789"}
# a number's modes: the mode each byte leads to; a byte none takes ends the number where it may end (ENDS)
NUMBER = {MINUS: {ord("0"): ZERO, **DIGITS},
          ZERO: {ord("."): POINT, ord("e"): EXP, ord("E"): EXP},
          INT: {ord("0"): INT, **DIGITS, ord("."): POINT, ord("e"): EXP, ord("E"): EXP},
          POINT: {b: FRACTION for b in b"0123456789"},
          FRACTION: {**{b: FRACTION for b in b"0123456789"}, ord("e"): EXP, ord("E"): EXP},
          EXP: {**{b: EXPONENT for b in b"0123456789"}, ord("+"): EXP_SIGN, ord("-"): EXP_SIGN},
          EXP_SIGN: {b: EXPONENT for b in b"0123456789"},
          EXPONENT: {b: EXPONENT for b in b"0123456789"}}
ENDS = frozenset({ZERO, INT, FRACTION, EXPONENT})


def closed(stack: str) -> tuple:
    """The state after the top container's closing bracket."""
    return (AFTER, stack[:-1], 0) if len(stack) > 1 else (DONE, "", 0)


def step(state: tuple, b: int) -> tuple | None:
    """The state after byte `b`, None where no JSON object continues with it."""
    mode, stack, aux = state
    if mode == STRING:          # first: a mask's walk spends most of its steps in strings
        if b == 0x22:
            return (COLON, stack, 0) if stack[-1] == "k" else (AFTER, stack, 0)
        if b == 0x5C:
            return ESCAPE, stack, 0
        if b < 0x80:
            return state if b >= 0x20 else None
        return (UTF8, stack, LEADS[b]) if b in LEADS else None
    if mode == UTF8:
        need, low, high = aux
        if not low <= b <= high:
            return None
        return (STRING, stack, 0) if need == 1 else (UTF8, stack, (need - 1, 0x80, 0xBF))
    if mode == ESCAPE:
        return None if b not in ESCAPES else (HEX, stack, 4) if b == 0x75 else (STRING, stack, 0)
    if mode == HEX:
        return None if b not in HEX_DIGITS else (HEX, stack, aux - 1) if aux > 1 else (STRING, stack, 0)
    if mode == LITERAL:
        return None if b != aux[0] else (LITERAL, stack, aux[1:]) if len(aux) > 1 else (AFTER, stack, 0)
    if mode in NUMBER:
        after = NUMBER[mode].get(b)
        if after is not None:
            return after, stack, 0
        return step((AFTER, stack, 0), b) if mode in ENDS else None
    if b in WS:                 # the structural modes, where whitespace may come
        return (mode, stack, aux + 1) if aux < MAX_WS else None
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:
            return (KEY, stack[:-1] + "k", 0) if top == "v" else (VALUE, stack, 0)
        return closed(stack) if b == (0x5D if top == "a" else 0x7D) else None
    if mode == START:
        return (KEY_OR_CLOSE, "k", 0) if b == 0x7B else None
    if mode in (KEY_OR_CLOSE, KEY):
        return (STRING, stack, 0) if b == 0x22 else closed(stack) if b == 0x7D and mode == KEY_OR_CLOSE else None
    if mode == COLON:
        return (VALUE, stack[:-1] + "v", 0) if b == 0x3A else None
    if mode in (VALUE, VALUE_OR_CLOSE):     # a value's first byte
        if b == 0x7B:
            return KEY_OR_CLOSE, stack + "k", 0
        if b == 0x5B:
            return VALUE_OR_CLOSE, stack + "a", 0
        if b == 0x22:
            return STRING, stack, 0
        if b == 0x2D:
            return MINUS, stack, 0
        if b == 0x30:
            return ZERO, stack, 0
        if b in DIGITS:
            return INT, stack, 0
        if b in LITERALS:
            return LITERAL, stack, LITERALS[b]
        return closed(stack) if b == 0x5D and mode == VALUE_OR_CLOSE else None
    return None                 # DONE: whitespace only


def feed(state: tuple | None, data: bytes) -> tuple | None:
    """The state after `data`, None once a byte does not continue a JSON object (or `state` is None)."""
    for b in data:
        if state is None:
            break
        state = step(state, b)
    return state


def done(state: tuple | None) -> bool:
    """Whether the object has closed (whitespace may follow)."""
    return state is not None and state[0] == DONE


def after(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: there is none)."""
    prefix = prefix.rstrip(b"\xff")
    return prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else None


class Vocabulary:
    """A tokenizer's tokens as JSON mode sees them: each one's bytes as the text prints them (none for special
    tokens, which never continue the JSON), the pieces sorted with the bytes each shares with the one before, and
    the masks made so far. A SentencePiece decoder drops a piece's leading space right after BOS: whitespace before
    the object, which may go."""

    def __init__(self, tok: Tokenizer):
        printed = tok.piece_filter or bytes
        self.pieces = [b"" if tok.unprinted(t) else printed(tok.token_bytes(t)) for t in range(tok.vocab_size)]
        self.order = sorted((t for t, p in enumerate(self.pieces) if p), key=self.pieces.__getitem__)
        self.sorted = [self.pieces[t] for t in self.order]
        self.shared = [0] + [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                             for a, b in zip(self.sorted, self.sorted[1:])]
        # the most containers one token can close: what a mask can see of the stack below its top
        self.reach = max((p.count(b"]") + p.count(b"}") for p in self.sorted), default=0) + 1
        self.masks: dict[tuple, np.ndarray] = {}

    def allowed(self, state: tuple) -> np.ndarray:
        """bool[vocab]: the tokens whose bytes continue `state`."""
        mode, stack, aux = state
        key = (mode, stack[-self.reach:], aux)
        mask = self.masks.get(key)
        if mask is None:
            if len(self.masks) >= MASKS:
                self.masks.clear()
            mask = self.masks[key] = self._walk(state)
        return mask

    def _walk(self, state: tuple) -> np.ndarray:
        mask = np.zeros(len(self.pieces), bool)
        pieces, n = self.sorted, len(self.sorted)
        states, i = [state], 0      # states[d]: the state after the first d bytes of the piece last walked
        while i < n:
            piece = pieces[i]
            d = min(self.shared[i], len(states) - 1)
            del states[d + 1:]
            s = states[d]
            while d < len(piece):
                s = step(s, piece[d])
                if s is None:
                    break
                states.append(s)
                d += 1
            if s is None:           # every piece that starts as this one did up to its dead byte is dead too
                nxt = after(piece[:d + 1])
                i = n if nxt is None else bisect_left(pieces, nxt, i + 1)
            else:
                mask[self.order[i]] = True
                i += 1
        return mask


@lru_cache(maxsize=4)
def vocabulary(tok: Tokenizer) -> Vocabulary:
    return Vocabulary(tok)


class JsonMode:
    """One generation's JSON: the validator's state after the tokens taken so far. Special tokens, the end-of-text
    ones included, never fit: the generation ends as the object closes, so they are never needed."""

    def __init__(self, tok: Tokenizer):
        self.vocab, self.state = vocabulary(tok), OPEN

    def fits(self, token: int) -> bool:
        piece = self.vocab.pieces[token]
        return bool(piece) and feed(self.state, piece) is not None

    def allowed(self) -> np.ndarray:
        return self.vocab.allowed(self.state)

    def take(self, token: int) -> None:
        self.state = feed(self.state, self.vocab.pieces[token])

    @property
    def done(self) -> bool:
        return done(self.state)
