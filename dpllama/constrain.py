"""JSON mode and JSON schemas: a generation whose text is one JSON object (RFC 8259), any object as OpenAI's
`response_format: {"type": "json_object"}` and llama.cpp's JSON grammar give it, or one that a JSON schema admits,
as OpenAI's Structured Outputs (`json_schema`) and llama.cpp's `--json-schema` give it.

`Grammar` compiles a schema (None: any object) to nodes, and its `step` is an incremental validator over bytes, a
pushdown automaton whose state is an immutable tuple (mode, stack, aux), so that a copy is the tuple itself. A
schema's `anyOf` makes it nondeterministic: a generation's state is a tuple of such states, the alternatives still
alive (`feed`). The stack holds the frames of the values being read: a node's id for a value not yet begun or still
in its bytes, (id, i) for an object (i: the properties behind it) or an array (i: its items so far). It accepts
exactly the prefixes of whitespace, one value the schema admits and whitespace, as the schema's documents spell it:
- an object's properties come in the schema's order, optional ones may be left out, and no others, as OpenAI's
  strict mode writes them (keys `additionalProperties` allows are not written); an object without `properties`
  takes any keys, their values as `additionalProperties` says;
- `enum` and `const` values are written as `json.dumps(value, ensure_ascii=False, separators=(",", ":"))`;
- a string with `minLength` or `maxLength` has its characters counted (code points, as JSON Schema counts them), and
  takes no \\u escapes (a surrogate pair's two would count as one character); one with a `pattern` or a `format`
  (dpllama.pattern) runs its characters through the pattern's NFA, without \\u escapes either; an integer with
  bounds (`minimum`, `maximum` and their exclusive forms) takes a digit only where some integer within them begins so
  (`reachable`);
- structural whitespace comes at most MAX_WS bytes in a row (llama.cpp's json.gbnf bounds it alike), so a model
  cannot loop on it; strings are UTF-8 (no overlong forms or surrogates, as Python decodes it) without unescaped
  control characters, numbers are the grammar's (no leading zeros, no "+", no bare "."), and \\uXXXX takes any four
  hex digits, as RFC 8259's grammar and Python's json do.
A keyword that would constrain the document further than this (`multipleOf`, a number's `minimum`, ...) is
refused with a `SchemaError` naming it and where it is: never ignored, so that every document made is one the schema
admits.

`JsonMode` applies a grammar to a generation: each token's bytes as its text prints them (`Vocabulary`, once per
tokenizer), and the tokens that can continue a state (a mask over the vocabulary), made by walking the sorted
pieces, sharing their common prefixes' steps and skipping every piece that starts with a dead prefix, and kept per
grammar and state as far as the tokens can see it (the mode, the frames that the most closing bytes of one token can
reach, aux): 35-50 ms in Python for SmolLM2's 49k tokens in a string (~1 ms elsewhere, where few tokens fit), so
`Sampler.pick` asks for one only when the token it drew first does not fit, as llama.cpp's sampler does.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left
from functools import lru_cache

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.pattern import FORMATS, Pattern, PatternError, pattern
from dpllama.tokenizer import Tokenizer

MAX_WS = 20
MAX_DEPTH = 64      # a schema's nesting, far beyond any document's need: deeper ones are refused
MAX_SPELLED = 120_000   # bytes of a schema's names and enum and const values, as OpenAI bounds them
MAX_NAME = 256      # bytes of a property's name: each of its prefixes is a key of the object's table
MASKS = 256         # masks kept per vocabulary (49 KB each for SmolLM2's); all dropped when it is full

(VALUE, OBJECT, KEY, NAME, COLON, ARRAY, AFTER, DONE, STRING, ESCAPE, HEX, UTF8, LITERAL,
 MINUS, ZERO, INT, POINT, FRACTION, EXP, EXP_SIGN, EXPONENT, COUNTED, PATTERNED) = range(23)
# the nodes' kinds: any of several nodes, an object, an array, a string, a number, one of fixed spellings
ALT, OBJ, ARR, STR, NUM, LIT = range(6)

WS = frozenset(b" \t\n\r")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
# a JSON string's escapes other than \\u, and the characters they stand for
ESCAPE_CHARS = {ord('"'): '"', ord("\\"): "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f", ord("n"): "\n",
                ord("r"): "\r", ord("t"): "\t"}
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
FLOAT = frozenset({POINT, EXP})         # what an integer's digits never lead to

# keywords that say what a schema is without constraining its documents
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions", "strict"})
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# the keywords each type takes here, beside `type`, `enum`, `const` and the annotations
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
KEYWORDS = {"object": {"properties", "required", "additionalProperties"}, "array": {"items", "minItems", "maxItems"},
            "string": {"minLength", "maxLength", "pattern", "format"}, "integer": set(BOUNDS), "number": set(BOUNDS),
            "boolean": set(), "null": set()}


def spell(value) -> bytes:
    """A JSON value as a property's name or an `enum` or `const` value of the schema is written."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:    # UnicodeEncodeError too: a lone surrogate, which no UTF-8 text holds
        raise SchemaError(f"the schema's name or value {str(value)[:40]!r} cannot be written as JSON in UTF-8: "
                          f"{e}") from None


def is_type(value, name: str) -> bool:
    """Whether a JSON value (as json.loads gives it) is of a JSON schema type."""
    if name == "integer":
        return type(value) is int or (type(value) is float and value.is_integer())
    if name == "number":
        return type(value) in (int, float)
    return type(value) is {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}[name]


class SchemaError(DpllamaError):
    """A JSON schema this validator cannot hold documents to: the message names the keyword and where it is."""


class Grammar:
    """A JSON schema (None: any JSON object) as nodes, and the validator over them (`step`). Nodes, by kind:
    (ALT, ids), (OBJ, properties: ((name as JSON spells it, without its quotes, node), ...), the node of any other
    key's value (None: no others), after i properties the end of those that may come next, and whether the object
    may close, each prefix of a name: the properties it begins, each name: its property),
    (ARR, item node, least items, most items or None), (STR,), (NUM, integer only), (LIT, spellings, the same
    sorted). An object's names (by their prefixes in a table) and a literal's spellings (by bisection) are found
    without trying each: a schema may have thousands of them."""

    def __init__(self, schema: dict | None = None):
        self.nodes: list[tuple | None] = []
        self.refs: dict[str, int] = {}
        self.spelled = 0
        self.schema = schema
        self.any = self._add((ALT, ()))
        free_object = self._add((OBJ, (), self.any, (0,), (True,), {}, {}))
        self.nodes[self.any] = (ALT, (free_object, self._add((ARR, self.any, 0, None)), self._add((STR, 0, None, None)),
                                      self._add((NUM, False, None, None)), self._literal((b"true", b"false", b"null"))))
        root = free_object if schema is None else self._compile(schema, "#")
        self._flatten()
        kinds = {self.nodes[n][0] for n in self._leaves(root)}
        if kinds != {OBJ}:
            raise SchemaError("the schema's root must be an object (\"type\": \"object\"), as OpenAI's Structured "
                              "Outputs require")
        self.open = ((VALUE, (root,), 0),)

    def _add(self, node: tuple | None) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _literal(self, spellings) -> int:
        self._spend(spellings)
        return self._add((LIT, frozenset(spellings), tuple(sorted(set(spellings)))))

    def _spend(self, spellings) -> None:
        """Count the bytes of names and values a schema spells: compiling and walking them costs as much."""
        self.spelled += sum(len(s) for s in spellings)
        if self.spelled > MAX_SPELLED:
            raise SchemaError(f"the schema's property names, enum and const values spell more than {MAX_SPELLED:,} "
                              f"bytes (OpenAI's bound is 120,000 characters)")

    # ---- compiling a schema -------------------------------------------------------------------------------------
    def _compile(self, schema, at: str) -> int:
        if schema is True or schema == {}:
            return self.any
        if not isinstance(schema, dict):
            raise SchemaError(f"{at}: a schema must be an object or true, found {json.dumps(schema)[:40]}")
        keys = set(schema) - ANNOTATIONS
        if "$ref" in schema:
            self._only(schema, at, {"$ref"})
            return self._ref(schema["$ref"], at)
        if "allOf" in schema:
            self._only(schema, at, {"allOf"})
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(f'{at}: "allOf" of more than one schema is not supported')
            return self._compile(parts[0], f"{at}/allOf/0")
        for word in ("anyOf", "oneOf"):     # oneOf as anyOf, as llama.cpp takes it: most are disjoint anyway
            if word in schema:
                self._only(schema, at, {word})
                parts = schema[word]
                if not isinstance(parts, list) or not parts:
                    raise SchemaError(f'{at}: "{word}" must be a list of schemas')
                return self._add((ALT, tuple(self._compile(p, f"{at}/{word}/{i}") for i, p in enumerate(parts))))
        types = schema.get("type")
        if types is None:           # a type the keywords imply, as llama.cpp infers it; none: any value
            types = ["object"] if keys & KEYWORDS["object"] else ["array"] if keys & KEYWORDS["array"] else None
        elif isinstance(types, str):
            types = [types]
        if types is not None and (not isinstance(types, list) or not types or any(t not in TYPES for t in types)):
            raise SchemaError(f'{at}: "type" must be one of {", ".join(TYPES)} or a list of them, found '
                              f'{json.dumps(schema["type"])[:60]}')
        if "enum" in schema or "const" in schema:
            word = "const" if "const" in schema else "enum"
            self._only(schema, at, {"type", word})
            values = [schema["const"]] if word == "const" else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f'{at}: "enum" must be a list of values')
            kept = [v for v in values if types is None or any(is_type(v, t) for t in types)]
            if not kept:
                raise SchemaError(f'{at}: no value of "{word}" is of the type {json.dumps(schema["type"])}')
            return self._literal([spell(v) for v in kept])
        if types is None:
            self._only(schema, at, set())
            return self.any
        self._only(schema, at, {"type"}.union(*(KEYWORDS[t] for t in types)))
        nodes = [self._typed(schema, t, at) for t in types]
        return nodes[0] if len(nodes) == 1 else self._add((ALT, tuple(nodes)))

    @staticmethod
    def _only(schema: dict, at: str, allowed: set) -> None:
        """Refuse a keyword beside those this schema's kind takes: held to nothing, it would be ignored."""
        for key in schema:
            if key not in allowed and key not in ANNOTATIONS:
                raise SchemaError(f'{at}: "{key}" is not supported here (dpllama takes type, properties, required, '
                                  f'additionalProperties, items, minItems, maxItems, minLength, maxLength, an '
                                  f'integer\'s minimum, maximum, exclusiveMinimum and exclusiveMaximum, enum, const, '
                                  f'anyOf, oneOf, a single allOf and $ref to "#", "#/$defs/..." or '
                                  f'"#/definitions/...")')

    def _ref(self, pointer, at: str) -> int:
        if not isinstance(pointer, str):
            raise SchemaError(f'{at}: "$ref" must be a string')
        if pointer not in self.refs:
            target = self.schema
            parts = pointer.split("/")
            if parts[0] != "#" or (len(parts) != 1 and (len(parts) != 3 or parts[1] not in ("$defs", "definitions"))):
                raise SchemaError(f'{at}: "$ref" {pointer!r} is not supported: only "#", "#/$defs/NAME" and '
                                  f'"#/definitions/NAME" are')
            if len(parts) == 3:
                name = parts[2].replace("~1", "/").replace("~0", "~")
                defs = self.schema.get(parts[1])
                target = defs.get(name) if isinstance(defs, dict) else None
                if target is None:
                    raise SchemaError(f'{at}: "$ref" {pointer!r} names no schema of the document')
            self.refs[pointer] = node = self._add(None)     # first: a schema may refer to itself
            self.nodes[node] = (ALT, (self._compile(target, pointer),))
        return self.refs[pointer]

    def _typed(self, schema: dict, kind: str, at: str) -> int:
        if kind == "object":
            return self._object(schema, at)
        if kind == "array":
            items = self._compile(schema.get("items", True), f"{at}/items")
            return self._add((ARR, items, *self._counts(schema, at, "minItems", "maxItems")))
        if kind == "string":        # the characters' count (code points, as JSON Schema counts them), or a pattern
            return self._add((STR, *self._counts(schema, at, "minLength", "maxLength"), self._pattern(schema, at)))
        if kind in ("integer", "number"):
            return self._add((NUM, kind == "integer", *self._bounds(schema, kind, at)))
        return self._literal((b"true", b"false") if kind == "boolean" else (b"null",))

    @staticmethod
    def _counts(schema: dict, at: str, low: str, high: str) -> tuple[int, int | None]:
        """A count's bounds (minItems and maxItems, minLength and maxLength): the least, the most or None."""
        least, most = schema.get(low), schema.get(high)
        for word, n in ((low, least), (high, most)):
            if n is not None and (type(n) is not int or n < 0):
                raise SchemaError(f'{at}: "{word}" must be a whole number, found {json.dumps(n)[:40]}')
        if most is not None and (least or 0) > most:
            raise SchemaError(f'{at}: "{low}" {least} is more than "{high}" {most}')
        return least or 0, most

    @staticmethod
    def _pattern(schema: dict, at: str) -> Pattern | None:
        """A string's `pattern`, or its `format` as one (dpllama.pattern.FORMATS), compiled."""
        text, fmt = schema.get("pattern"), schema.get("format")
        if text is None and fmt is None:
            return None
        if ("minLength" in schema or "maxLength" in schema) or (text is not None and fmt is not None):
            raise SchemaError(f'{at}: "pattern" or "format" beside another of "pattern", "format", "minLength" and '
                              f'"maxLength" is not supported: say the length in the pattern')
        if fmt is not None and fmt not in FORMATS:
            raise SchemaError(f'{at}: "format" {json.dumps(fmt)[:40]} is not supported (supported: '
                              f'{", ".join(FORMATS)})')
        if text is not None and not isinstance(text, str):
            raise SchemaError(f'{at}: "pattern" must be a string, found {json.dumps(text)[:40]}')
        try:
            return pattern(FORMATS[fmt] if fmt is not None else text)
        except PatternError as e:
            raise SchemaError(f'{at}: "pattern": {e}') from None

    @staticmethod
    def _bounds(schema: dict, kind: str, at: str) -> tuple[int | None, int | None]:
        """An integer's least and greatest values (None: unbounded) from minimum, maximum and their exclusive
        forms; a number's bounds are refused (its digits cannot be held to them as an integer's are)."""
        given = {k: schema[k] for k in BOUNDS if k in schema}
        if given and kind == "number":
            raise SchemaError(f'{at}: "{next(iter(given))}" is supported on an integer, not on a number')
        for word, v in given.items():
            if type(v) not in (int, float) or not math.isfinite(v):
                raise SchemaError(f'{at}: "{word}" must be a number, found {json.dumps(v)[:40]}')
        lows = [math.ceil(given["minimum"])] if "minimum" in given else []
        lows += [math.floor(given["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in given else []
        highs = [math.floor(given["maximum"])] if "maximum" in given else []
        highs += [math.ceil(given["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in given else []
        lo, hi = max(lows, default=None), min(highs, default=None)
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(f"{at}: no integer lies within its bounds ({', '.join(given)})")
        return lo, hi

    def _object(self, schema: dict, at: str) -> int:
        props, required = schema.get("properties") or {}, schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict):
            raise SchemaError(f'{at}: "properties" must be an object')
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise SchemaError(f'{at}: "required" must be a list of names')
        missing = [r for r in required if r not in props]
        if missing:
            raise SchemaError(f'{at}: "required" names {missing[0]!r}, which "properties" does not define')
        if props:                   # other keys the schema allows are not written: a permission, not a constraint
            names = list(props)
            need = [n in required for n in names]
            spelled = [spell(n)[1:-1] for n in names]       # as JSON spells them, less the quotes
            long = next((n for n, s in zip(names, spelled) if len(s) > MAX_NAME), None)
            if long is not None:
                raise SchemaError(f"{at}: the property name {long[:40]!r}... is longer than {MAX_NAME} bytes")
            self._spend(spelled)
            nodes = tuple((s, self._compile(props[n], f"{at}/properties/{n}")) for n, s in zip(names, spelled))
            # after i properties: those up to the first required one may come next (i up to stops[i]), and the
            # object may close once no required one is left
            stops, closes, stop = [0] * (len(names) + 1), [True] * (len(names) + 1), len(names)
            for i in reversed(range(len(names))):
                stop = i + 1 if need[i] else stop
                stops[i], closes[i] = stop, closes[i + 1] and not need[i]
            stops[len(names)] = len(names)
            prefixes: dict[bytes, list[int]] = {}   # each prefix of a name: the properties whose names it begins
            for j, (name, _) in enumerate(nodes):
                for k in range(1, len(name) + 1):
                    prefixes.setdefault(name[:k], []).append(j)
            names = {name: j for j, (name, _) in enumerate(nodes)}
            return self._add((OBJ, nodes, None, tuple(stops), tuple(closes),
                              {p: tuple(js) for p, js in prefixes.items()}, names))
        other = None if extra is False else self._compile(extra, f"{at}/additionalProperties")
        return self._add((OBJ, (), other, (0,), (True,), {}, {}))

    def _leaves(self, node: int, seen: set | None = None) -> list[int]:
        """The nodes other than ALT that `node` may be, each once (an ALT that reaches itself adds nothing)."""
        seen = set() if seen is None else seen
        if node in seen:
            return []
        seen.add(node)
        kind = self.nodes[node]
        return [n for alt in kind[1] for n in self._leaves(alt, seen)] if kind[0] == ALT else [node]

    def _flatten(self) -> None:
        """Each ALT as the nodes it may be, none an ALT: `step` then tries each once."""
        flat = {n: tuple(dict.fromkeys(self._leaves(n))) for n, node in enumerate(self.nodes) if node[0] == ALT}
        for n, leaves in flat.items():
            if not leaves:
                raise SchemaError("a schema that refers only to itself (through $ref, anyOf or oneOf) admits no value")
            self.nodes[n] = (ALT, leaves)

    # ---- the validator --------------------------------------------------------------------------------------------
    @staticmethod
    def ended(stack: tuple) -> tuple:
        """The state after the value on the stack's top ends."""
        return (AFTER, stack[:-1], 0) if len(stack) > 1 else (DONE, (), 0)

    def step(self, state: tuple, b: int):
        """What follows byte `b`: None where nothing the grammar admits continues with it, a state, or a list of
        them (a value of several alternatives, `anyOf`)."""
        mode, stack, aux = state
        if mode == STRING:          # first: a mask's walk spends most of its steps in strings
            if b == 0x22:
                return (COLON, stack, 0) if type(stack[-1]) is tuple else self.ended(stack)
            if b == 0x5C:
                return ESCAPE, stack, 0
            if b < 0x80:
                return state if b >= 0x20 else None
            return (UTF8, stack, LEADS[b]) if b in LEADS else None
        if mode == UTF8:            # aux: (bytes to come, the next one's range[, a counted string's characters])
            need, low, high = aux[:3]
            if not low <= b <= high:
                return None
            if need > 1:
                return UTF8, stack, (need - 1, 0x80, 0xBF) + aux[3:]
            return (STRING, stack, 0) if len(aux) == 3 else (COUNTED, stack, aux[3] + 1)
        if mode == ESCAPE:          # aux: 0, or (a counted string's characters,), whose escapes take no \\u
            if aux:
                return (COUNTED, stack, aux[0] + 1) if b in ESCAPES and b != 0x75 else None
            return None if b not in ESCAPES else (HEX, stack, 4) if b == 0x75 else (STRING, stack, 0)
        if mode == COUNTED:         # a string with minLength or maxLength: aux, its characters so far
            _, least, most, _ = self.nodes[stack[-1]]
            if b == 0x22:
                return self.ended(stack) if aux >= least else None
            if (most is not None and aux >= most) or b < 0x20:
                return None
            if b == 0x5C:
                return ESCAPE, stack, (aux,)
            if b < 0x80:
                return COUNTED, stack, aux + 1
            return (UTF8, stack, LEADS[b] + (aux,)) if b in LEADS else None
        if mode == HEX:
            return None if b not in HEX_DIGITS else (HEX, stack, aux - 1) if aux > 1 else (STRING, stack, 0)
        if mode == NAME:            # a property's name, one of those the position may take next
            node, i = stack[-1]
            _, _, _, stops, _, prefixes, names = self.nodes[node]
            name = aux + bytes([b])
            js = prefixes.get(name, ())     # a name that may come next begins so: one in [i, stops[i])
            k = bisect_left(js, i)
            if k < len(js) and js[k] < stops[i]:
                return NAME, stack, name
            j = names.get(aux, -1) if b == 0x22 else -1
            return (COLON, stack[:-1] + ((node, j + 1),), 0) if i <= j < stops[i] else None
        if mode == LITERAL:
            _, spellings, ordered = self.nodes[stack[-1]]
            spelled = aux + bytes([b])
            k = bisect_left(ordered, spelled)       # the least spelling from `spelled` on begins with it, if any does
            if k < len(ordered) and ordered[k].startswith(spelled):
                return LITERAL, stack, spelled
            return self.step(self.ended(stack), b) if aux in spellings else None
        if mode in NUMBER:          # aux: 0, or a bounded integer's bytes so far
            _, integer, lo, hi = self.nodes[stack[-1]]
            after = NUMBER[mode].get(b)
            if after is not None and not (after in FLOAT and integer):
                if not aux:
                    return after, stack, 0
                spelled = aux + bytes([b])
                return (after, stack, spelled) if reachable(spelled, lo, hi) else None
            if mode not in ENDS or (aux and not within(int(aux), lo, hi)):
                return None
            return self.step(self.ended(stack), b)
        if mode == PATTERNED:       # a string with a pattern: aux, (the NFA's states, a character's bytes so far)
            states, partial = aux
            if partial == b"\\":       # an escape: its character
                return self.character(stack, states, ESCAPE_CHARS[b]) if b in ESCAPE_CHARS else None
            if partial:             # a character's UTF-8 bytes, as Python decodes them
                got = partial + bytes([b])
                need, low, high = LEADS[got[0]]
                if not (0x80 if len(got) > 2 else low) <= b <= (0xBF if len(got) > 2 else high):
                    return None
                return self.character(stack, states, got.decode()) if len(got) == need + 1 else \
                    (PATTERNED, stack, (states, got))
            if b == 0x22:
                return self.ended(stack) if self.nodes[stack[-1]][3].accepts(states) else None
            if b == 0x5C or b in LEADS:
                return PATTERNED, stack, (states, bytes([b]))
            return self.character(stack, states, chr(b)) if 0x20 <= b < 0x80 else None
        if b in WS:                 # the structural modes, where whitespace may come
            return (mode, stack, aux + 1) if aux < MAX_WS else None
        if mode == VALUE:
            return self.begin(stack, b)
        if mode == AFTER:
            node, i = stack[-1]
            kind = self.nodes[node]
            if kind[0] == OBJ:
                if b == 0x2C:
                    return (KEY, stack, 0) if kind[2] is not None or kind[3][i] > i else None
                return self.ended(stack) if b == 0x7D and kind[4][i] else None
            if b == 0x2C:
                return self.item(stack, i) if kind[3] is None or i < kind[3] else None
            return self.ended(stack) if b == 0x5D and i >= kind[2] else None
        if mode in (OBJECT, KEY):   # after "{" or ","
            node, i = stack[-1]
            kind = self.nodes[node]
            if b == 0x22:
                return (STRING, stack, 0) if kind[2] is not None else (NAME, stack, b"") if kind[3][i] > i else None
            return self.ended(stack) if b == 0x7D and mode == OBJECT and kind[4][i] else None
        if mode == COLON:
            if b != 0x3A:
                return None
            node, i = stack[-1]
            kind = self.nodes[node]
            return VALUE, stack + (kind[2] if kind[2] is not None else kind[1][i - 1][1],), 0
        if mode == ARRAY:           # after "["
            node, _ = stack[-1]
            kind = self.nodes[node]
            if b == 0x5D:
                return self.ended(stack) if kind[2] == 0 else None
            if kind[3] == 0:
                return None
            return self.begin(self.item(stack, 0)[1], b)
        return None                 # DONE: whitespace only

    def character(self, stack: tuple, states: frozenset, c: str) -> tuple | None:
        """A patterned string's state after its next character, None where no match goes on."""
        after = self.nodes[stack[-1]][3].next(states, c)
        return (PATTERNED, stack, (after, b"")) if after else None

    def item(self, stack: tuple, i: int) -> tuple:
        """The state before an array's item i + 1 (counted only where the array is bounded)."""
        node, _ = stack[-1]
        kind = self.nodes[node]
        counted = kind[2] > 0 or kind[3] is not None
        return VALUE, stack[:-1] + ((node, i + 1 if counted else 0), kind[1]), 0

    def begin(self, stack: tuple, b: int):
        """A value's first byte: the value of the node on the stack's top."""
        node = stack[-1]
        kind = self.nodes[node]
        tag = kind[0]
        if tag == ALT:
            states = []
            for alt in kind[1]:
                s = self.begin(stack[:-1] + (alt,), b)
                if s is not None:
                    states.append(s)
            return None if not states else states[0] if len(states) == 1 else states
        if tag == STR:
            if b != 0x22:
                return None
            if kind[3] is not None:
                return PATTERNED, stack, (kind[3].start, b"")
            return (STRING, stack, 0) if kind[1:3] == (0, None) else (COUNTED, stack, 0)
        if tag == OBJ:
            return (OBJECT, stack[:-1] + ((node, 0),), 0) if b == 0x7B else None
        if tag == ARR:
            return (ARRAY, stack[:-1] + ((node, 0),), 0) if b == 0x5B else None
        if tag == NUM:
            mode = MINUS if b == 0x2D else NUMBER[MINUS].get(b)
            if mode is None:
                return None
            if kind[2:] == (None, None):
                return mode, stack, 0
            return (mode, stack, bytes([b])) if reachable(bytes([b]), *kind[2:]) else None
        first = bytes([b])
        k = bisect_left(kind[2], first)
        return (LITERAL, stack, first) if k < len(kind[2]) and kind[2][k].startswith(first) else None

    def advance(self, states: tuple, b: int) -> tuple | None:
        """The states after byte `b`, None where it continues none of them."""
        if len(states) == 1:
            s = self.step(states[0], b)
            return None if s is None else tuple(s) if type(s) is list else (s,)
        out = []
        for state in states:
            s = self.step(state, b)
            if type(s) is list:
                out += s
            elif s is not None:
                out.append(s)
        return tuple(dict.fromkeys(out)) or None

    def feed(self, states: tuple | None, data: bytes) -> tuple | None:
        """The states after `data`, None once a byte continues none of them (or `states` is None)."""
        for b in data:
            if states is None:
                break
            states = self.advance(states, b)
        return states


def within(value: int, lo: int | None, hi: int | None) -> bool:
    return (lo is None or lo <= value) and (hi is None or value <= hi)


def reachable(spelled: bytes, lo: int | None, hi: int | None) -> bool:
    """Whether an integer that JSON spells beginning with `spelled` (a minus, digits without leading zeros) can lie
    in [lo, hi] (None: unbounded): its magnitude, d followed by k more digits, is in [d 10^k, (d + 1) 10^k - 1]."""
    negative = spelled[:1] == b"-"
    digits = spelled[negative:]
    if not digits:
        return lo is None or lo <= 0
    d = int(digits)
    if d == 0:      # 0 or -0: no more digits
        return within(0, lo, hi)
    least, most = ((None if hi is None else -hi), (None if lo is None else -lo)) if negative else (lo, hi)
    first, last = d, d
    while most is None or first <= most:
        if least is None or last >= least:
            return True
        first, last = first * 10, last * 10 + 9
    return False


def done(states: tuple | None) -> bool:
    """Whether the document has closed (whitespace may follow)."""
    return bool(states) and any(s[0] == DONE for s in states)


def after(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: there is none)."""
    prefix = prefix.rstrip(b"\xff")
    return prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else None


@lru_cache(maxsize=64)
def _grammar(text: str | None) -> Grammar:
    return Grammar(None if text is None else json.loads(text))


def too_deep(value) -> bool:
    """Whether a JSON value nests deeper than MAX_DEPTH, found without recursion (and so for a dict that holds
    itself, which the Python API could be given)."""
    todo = [(value, 0)]
    while todo:
        value, d = todo.pop()
        if d > MAX_DEPTH:
            return True
        inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo += [(v, d + 1) for v in inner]
    return False


def grammar(schema: dict | None = None) -> Grammar:
    """The grammar of a schema (None: any JSON object), compiled once per schema (its text, properties in order),
    so that its masks are kept from one request to the next."""
    if schema is None:
        return _grammar(None)
    if too_deep(schema):
        raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels")
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"the schema is no JSON: {e}") from None
    return _grammar(text)


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
        # the frames a token's steps can read: one a closing byte (a quote, "]" or "}") ends, one a number or
        # literal in progress ends on a byte of its own, and the frame below the last one ended
        self.reach = max((p.count(b'"') + p.count(b"]") + p.count(b"}") for p in self.sorted), default=0) + 2
        self.longest = max(map(len, self.sorted), default=0)
        self.masks: dict[tuple, np.ndarray] = {}

    def key(self, grammar: Grammar, state: tuple) -> tuple:
        """What a mask of `state` depends on: its mode, the frames a token can reach, and aux, where a counted
        string's characters so far count only as how far each bound is, up to a token's length."""
        mode, stack, aux = state
        counted = mode == COUNTED or (mode == ESCAPE and aux) or (mode == UTF8 and len(aux) == 4)
        if counted:
            n = aux if mode == COUNTED else aux[-1]
            _, least, most, _ = grammar.nodes[stack[-1]]
            far = (min(max(least - n, 0), self.longest), None if most is None else min(most - n, self.longest))
            aux = (aux[:-1] if mode != COUNTED else ()) + far
        return mode, stack[-self.reach:], aux

    def allowed(self, grammar: Grammar, states: tuple) -> np.ndarray:
        """bool[vocab]: the tokens whose bytes continue one of `states`."""
        key = (grammar, tuple(self.key(grammar, s) for s in states))
        mask = self.masks.get(key)
        if mask is None:
            if len(self.masks) >= MASKS:
                self.masks.clear()
            mask = self.masks[key] = self._walk(grammar, states)
        return mask

    def _walk(self, grammar: Grammar, states: tuple) -> np.ndarray:
        mask = np.zeros(len(self.pieces), bool)
        pieces, n, advance = self.sorted, len(self.sorted), grammar.advance
        walked, i = [states], 0     # walked[d]: the states after the first d bytes of the piece last walked
        while i < n:
            piece = pieces[i]
            d = min(self.shared[i], len(walked) - 1)
            del walked[d + 1:]
            s = walked[d]
            while d < len(piece):
                s = advance(s, piece[d])
                if s is None:
                    break
                walked.append(s)
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
    """One generation's JSON: the grammar's states after the tokens taken so far. Special tokens, the end-of-text
    ones included, never fit: the generation ends as the document closes, so they are never needed."""

    def __init__(self, tok: Tokenizer, grammar: Grammar | None = None):
        self.vocab = vocabulary(tok)
        self.grammar = grammar or _grammar(None)
        self.state = self.grammar.open

    def fits(self, token: int) -> bool:
        piece = self.vocab.pieces[token]
        return bool(piece) and self.grammar.feed(self.state, piece) is not None

    def allowed(self) -> np.ndarray:
        return self.vocab.allowed(self.grammar, self.state)

    def take(self, token: int) -> None:
        self.state = self.grammar.feed(self.state, self.vocab.pieces[token])

    @property
    def done(self) -> bool:
        return done(self.state)
