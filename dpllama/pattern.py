"""JSON Schema's `pattern` (ECMA-262 regular expressions, the subset below) and the `format`s llama.cpp holds strings
to (date, time, date-time, uuid), compiled to an NFA over characters, for dpllama.constrain's strings.

The subset: literals and escaped punctuation, `.`, classes (`[a-z_]`, `[^...]`), `\\d \\w \\s` and their negations,
`\\t \\n \\r \\f \\v \\xHH \\uHHHH`, groups (`(...)`, `(?:...)`), `|`, the quantifiers `* + ? {n} {n,} {n,m}` (lazy or
not: the same strings), `^` at the start and `$` at the end. A pattern matches anywhere in the string unless anchored,
as JSON Schema says. Refused with a PatternError naming the construct: backreferences, lookarounds, word boundaries,
flags, anchors elsewhere, more than MAX_STATES states.

Where ECMA-262 and Python's `re` (which a client's validator may use) differ, a class takes only the characters both
take: `\\d` is [0-9], `\\w` [A-Za-z0-9_], `\\s` the ASCII spaces, `.` anything but a line terminator (\\n, \\r, U+2028,
U+2029), and a negated one leaves out whatever either counts in it (`\\D` no Unicode digit, `\\W` no letter). So every
string the NFA accepts matches the pattern under both.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

MAX_STATES = 20_000     # an NFA's states: {n,m} copies its atom, so `(a{1000}){1000}` is refused, not built
MAX_GROUPS = 50         # groups nested in groups: the parser recurses once a group
LINE_ENDS = frozenset("\n\r\u2028\u2029")
ECMA_SPACES = frozenset("\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff") | \
    frozenset(chr(c) for c in range(0x2000, 0x200b))

# a shorthand class: (the characters both dialects put in it, the characters either does), as predicates
SHORTHANDS = {
    "d": (lambda c: "0" <= c <= "9", lambda c: "0" <= c <= "9" or unicodedata.category(c) == "Nd"),
    "w": (lambda c: c.isascii() and (c.isalnum() or c == "_"), lambda c: c.isalnum() or c == "_"),
    "s": (lambda c: c in " \t\n\v\f\r", lambda c: c.isspace() or c in ECMA_SPACES),
}
ESCAPED = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
FORMATS = {     # RFC 3339's full-date, full-time and date-time (as llama.cpp's grammars), RFC 4122's uuid
    "date": r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$",
    "time": r"^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$",
    "date-time": r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                 r"(\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$",
    "uuid": r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}


class PatternError(ValueError):
    """A pattern outside the subset, or malformed: the message says which construct and where."""


class CharSet:
    """A class of characters: ranges and shorthands, negated or not. Called with a character: whether both dialects
    put it in the class (a negated one asks its parts what either takes, so that its complement is what both
    leave out)."""

    def __init__(self, ranges=(), shorthands=(), negated=False):
        self.ranges, self.shorthands, self.negated = tuple(ranges), tuple(shorthands), negated

    def _has(self, c: str, wide: bool) -> bool:
        return any(lo <= c <= hi for lo, hi in self.ranges) or any(self._short(s, c, wide) for s in self.shorthands)

    @staticmethod
    def _short(s: str, c: str, wide: bool) -> bool:
        # an upper-case shorthand is a complement: \D takes what \d leaves out in the other sense
        return not SHORTHANDS[s.lower()][not wide](c) if s.isupper() else SHORTHANDS[s][wide](c)

    def __call__(self, c: str) -> bool:
        return not self._has(c, True) if self.negated else self._has(c, False)


ANY = CharSet([("\0", "\U0010ffff")])


class Parser:
    """Recursive descent over the pattern, building a Thompson NFA: `edges[s]` lists (CharSet or None for an empty
    move, target)."""

    def __init__(self, pattern: str):
        self.p, self.i, self.depth = pattern, 0, 0
        self.edges: list[list[tuple]] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise PatternError(f"the pattern needs more than {MAX_STATES:,} states")
        self.edges.append([])
        return len(self.edges) - 1

    def error(self, what: str) -> PatternError:
        return PatternError(f"{what} at character {self.i} of the pattern {self.p[:60]!r}")

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def take(self) -> str:
        c = self.peek()
        if not c:
            raise self.error("the pattern ends too soon")
        self.i += 1
        return c

    # each returns a fragment (start, end) of states: end has no edges yet
    def alternation(self) -> tuple[int, int]:
        parts = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            parts.append(self.concat())
        if len(parts) == 1:
            return parts[0]
        start, end = self.state(), self.state()
        for a, b in parts:
            self.edges[start].append((None, a))
            self.edges[b].append((None, end))
        return start, end

    def concat(self) -> tuple[int, int]:
        start = end = self.state()
        while self.peek() not in ("", "|", ")"):
            a, b = self.repeat()
            self.edges[end].append((None, a))
            end = b
        return start, end

    def repeat(self) -> tuple[int, int]:
        begin = self.i
        fragment = self.atom()
        c = self.peek()
        if c not in ("*", "+", "?", "{"):
            return fragment
        low, high = self.quantifier()
        if self.peek() == "?":      # lazy: the same strings
            self.i += 1
        if self.peek() in ("*", "+", "?", "{"):
            raise self.error("a quantifier of a quantifier")
        start, out = self.state(), self.state()
        if high == 0:
            self.edges[start].append((None, out))
            return start, out
        # copies of the atom: parsed again from its text for each copy past the first
        end_of_atom = self.i
        copies = [fragment]
        for _ in range(max(low, 1 if high is None else high) - 1):
            self.i = begin
            copies.append(self.atom())
        self.i = end_of_atom
        end = start
        for k, (a, b) in enumerate(copies):
            if k >= low:                                # optional from here on: a way out before each
                self.edges[end].append((None, out))
            self.edges[end].append((None, a))
            end = b
        if high is None:                                # the last copy repeats
            self.edges[copies[-1][1]].append((None, copies[-1][0]))
        self.edges[end].append((None, out))
        return start, out

    def quantifier(self) -> tuple[int, int | None]:
        c = self.take()
        if c == "*":
            return 0, None
        if c == "+":
            return 1, None
        if c == "?":
            return 0, 1
        close = self.p.find("}", self.i)
        body = self.p[self.i:close] if close >= 0 else ""
        low, comma, high = body.partition(",")
        if close < 0 or not low.isdigit() or (high and not high.isdigit()):
            raise self.error("a malformed {n,m}")
        self.i = close + 1
        low_n, high_n = int(low), (None if comma and not high else int(high) if high else int(low))
        if high_n is not None and high_n < low_n:
            raise self.error(f"{{{body}}} counts down")
        if max(low_n, high_n or 0) > 1000:
            raise self.error(f"{{{body}}} repeats more than 1,000 times")
        return low_n, high_n

    def atom(self) -> tuple[int, int]:
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("a lookaround or named group")
            self.depth += 1
            if self.depth > MAX_GROUPS:
                raise self.error(f"groups nested more than {MAX_GROUPS} deep")
            fragment = self.alternation()
            if self.take() != ")":
                raise self.error("an unclosed group")
            self.depth -= 1
            return fragment
        if c in ("^", "$"):
            raise self.error(f"{c!r} inside the pattern (only ^ at its start and $ at its end are supported)")
        if c in ("*", "+", "?", "{", ")"):
            raise self.error(f"{c!r} with nothing to repeat or close")
        if c == "[":
            return self.edge(self.char_class())
        if c == ".":
            return self.edge(CharSet([(x, x) for x in sorted(LINE_ENDS)], negated=True))
        if c == "\\":
            return self.edge(self.escape())
        return self.edge(CharSet([(c, c)]))

    def edge(self, chars: CharSet) -> tuple[int, int]:
        a, b = self.state(), self.state()
        self.edges[a].append((chars, b))
        return a, b

    def escape(self) -> CharSet:
        c = self.take()
        if c.lower() in SHORTHANDS:
            return CharSet(shorthands=[c])
        if c in ESCAPED:
            return CharSet([(ESCAPED[c], ESCAPED[c])])
        if c in ("x", "u"):
            digits = self.p[self.i:self.i + (2 if c == "x" else 4)]
            if len(digits) != (2 if c == "x" else 4) or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"a malformed \\{c} escape")
            self.i += len(digits)
            ch = chr(int(digits, 16))
            return CharSet([(ch, ch)])
        if c.isalnum():     # \b, \B, \1, \k, \p, \c, ...
            raise self.error(f"the escape \\{c}")
        return CharSet([(c, c)])

    def char_class(self) -> CharSet:
        negated = self.peek() == "^"
        self.i += negated
        ranges, shorthands = [], []
        first = True
        while first or self.peek() != "]":
            first = False
            c = self.take()
            if c == "\\":
                part = self.escape()
                if part.shorthands:
                    shorthands += part.shorthands
                    continue
                c = part.ranges[0][0]
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                d = self.take()
                if d == "\\":
                    part = self.escape()
                    if part.shorthands:
                        raise self.error("a range ending in a class")
                    d = part.ranges[0][0]
                if d < c:
                    raise self.error(f"the range {c}-{d} runs backwards")
                ranges.append((c, d))
            else:
                ranges.append((c, c))
        self.i += 1
        return CharSet(ranges, shorthands, negated)


class Pattern:
    """A pattern's NFA: sets of states (frozensets) and the moves between them, kept as they are made."""

    def __init__(self, pattern: str):
        anchored_start = pattern.startswith("^")
        anchored_end = pattern.endswith("$") and not pattern.endswith("\\$")
        body = pattern[anchored_start:len(pattern) - anchored_end]
        parser = Parser(body)
        start, end = parser.alternation()
        if parser.i != len(body):
            raise parser.error("an unmatched ')'")
        self.edges, self.accept = parser.edges, end
        if not anchored_start:      # anything may come before
            self.edges[start].append((ANY, start))
        if not anchored_end:
            self.edges[end].append((ANY, end))
        self.start = self.closure({start})
        self.moves: dict[tuple, frozenset] = {}

    def closure(self, states) -> frozenset:
        todo, seen = list(states), set(states)
        while todo:
            for chars, t in self.edges[todo.pop()]:
                if chars is None and t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def next(self, states: frozenset, c: str) -> frozenset:
        """The states after character c (empty: no match can go on)."""
        key = (states, c)
        after = self.moves.get(key)
        if after is None:
            if len(self.moves) > 100_000:
                self.moves.clear()
            after = self.moves[key] = self.closure({t for s in states for chars, t in self.edges[s]
                                                    if chars is not None and chars(c)})
        return after

    def accepts(self, states: frozenset) -> bool:
        return self.accept in states


@lru_cache(maxsize=64)
def pattern(text: str) -> Pattern:
    return Pattern(text)
