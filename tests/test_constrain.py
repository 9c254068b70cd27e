"""JSON mode and JSON schemas (dpllama.constrain). Any object: the validator against Python's json, byte by byte and
in every split. Schemas: random schemas of every kind dpllama takes, their documents accepted and every document the
validator closes valid by an independent validator (jsonschema), every prefix it accepts one that can still close;
what it cannot hold a document to refused with the keyword and where. The masks against checking every token; and
generations held to them, on a random tiny model (the text is always a prefix) and on SmolLM2 (whose replies close:
json.loads gives a dict, Pydantic reads the model a schema came from)."""
from __future__ import annotations

import datetime
import heapq
import json
import random
import re

import jsonschema
import numpy as np
import pytest

from dpllama.chat import chat_prompt
from dpllama.constrain import MAX_DEPTH, MAX_WS, NUMBER, JsonMode, SchemaError, Vocabulary, done, grammar, spell
from dpllama.generate import Batcher, Sampler, generate
from dpllama.model.llama import Llama
from dpllama.tokenizer import tokenizer_from_gguf_fields
from dpllama.tokenizer.gguf import _bytes_to_unicode
from tests.helpers import random_weights, smollm2_gguf_path
from tests.test_tokenizer import gpt2_fields

ANY = grammar()                 # JSON mode's: any object
OPEN = ANY.open


def feed(states, data: bytes, g=ANY):
    return g.feed(states, data)


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


def completion(states: tuple, g=ANY, alphabet: bytes = CLOSING) -> bytes | None:
    """Bytes of `alphabet` that take `states` to a closed document: a best-first search by the path's length, each
    open frame counting 8 bytes, so that opening brackets wait, and each digit of a bounded integer 8, so that its
    many spellings wait too."""
    todo, seen, n = [(0, 0, states, b"")], {states}, 0
    while todo and n < 100000:
        *_, s, path = heapq.heappop(todo)
        if done(s):
            return path
        for b in alphabet:
            t = g.advance(s, b)
            if t is not None and t not in seen:
                seen.add(t)
                n += 1
                digits = max(len(aux) if mode in NUMBER and aux else 0 for mode, _, aux in t)
                frames = min(len(stack) for _, stack, _ in t)
                heapq.heappush(todo, (len(path) + 8 * digits + 8 * frames, n, t, path + bytes([b])))
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
            states.append(states[-1] and ANY.advance(states[-1], b))
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


# ---- JSON schemas ------------------------------------------------------------------------------------------------
NAMES = ["a", "name", "x y", "\u00e9t\u00e9", 'q"uote', "back\\slash", "n1", "\u65e5"]
VALUES = [1, -2, 12, 1.5, 0, "a", "ab", "\u65e5\u672c", "", True, False, None, [1, "x"], {"k": [2, None]}]
WS_BYTES = b" \t\n\r"
COUNTED_TEXT = TEXT.replace("\x01", "").replace("\x1f", "")     # what json.dumps writes without \\u escapes
# patterns and formats of the random schemas, with strings each admits (written without \\u escapes)
PATTERNED = {"^[A-Z]{2}-\\d{1,3}$": ["AB-1", "ZZ-999"], "ab+": ["ab", "xxabbb", "\u00e9ab\n"],
             "^(cat|dog)s?$": ["cat", "dogs"], "^[^\\s\\d]*$": ["", "\u00e9t\u00e9", "a_b"],
             "^.{2,4}$": ["ab", "\u65e5\"\\/"]}
FORMATTED = {"date": ["2024-02-29", "1999-12-31"], "time": ["23:59:00Z", "01:02:03.5+05:30"],
             "date-time": ["2024-02-29T12:00:00Z", "2000-01-01T00:00:00.123-08:00"],
             "uuid": ["123e4567-e89b-12d3-a456-426614174000", "FFFFFFFF-0000-4000-8000-ABCDEFABCDEF"]}


def random_schema(rng: random.Random, depth: int, defs: dict) -> dict:
    """A schema of the kinds dpllama takes, nested up to depth 3, annotated at random."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "anyOf", "types", "any"]
    if depth < 3:
        kinds += ["object"] * 3 + ["array"] * 2 + ["free", "ref"]
    kind = rng.choice(kinds)
    if kind in ("string", "integer", "number", "boolean", "null"):
        schema = {"type": kind}
        if kind == "string" and rng.random() < 0.5:
            schema["minLength"] = rng.randint(0, 3)
            schema["maxLength"] = schema["minLength"] + rng.randint(0, 4)
        elif kind == "string" and rng.random() < 0.4:
            schema.update(rng.choice([{"pattern": p} for p in PATTERNED] + [{"format": f} for f in FORMATTED]))
        if kind == "integer" and rng.random() < 0.6:     # bounds of either sign, exclusive or not, one or both
            low, high = sorted(rng.sample([-1000, -37, -5, 0, 3, 12, 99, 1001, 2**40], 2))
            for word, value in (("minimum", low), ("maximum", high)):
                if rng.random() < 0.7:
                    schema[("exclusiveM" + word[1:]) if rng.random() < 0.3 else word] = value
    elif kind == "enum":
        schema = {"enum": rng.sample(VALUES, rng.randint(1, 4))}
        if rng.random() < 0.3:      # a type beside enum keeps the values of that type
            schema["type"] = ["string", "integer", "null"]
            schema["enum"].append("typed")
    elif kind == "const":
        schema = {"const": rng.choice(VALUES)}
    elif kind == "anyOf":
        schema = {"anyOf": [random_schema(rng, depth + 1, defs) for _ in range(rng.randint(2, 3))]}
    elif kind == "types":
        schema = {"type": rng.sample(["string", "integer", "number", "boolean", "null"], 2)}
    elif kind == "any":
        schema = rng.choice([{}, {"description": "anything"}])
    elif kind == "object":
        props = {n: random_schema(rng, depth + 1, defs) for n in rng.sample(NAMES, rng.randint(0, 4))}
        required = rng.sample(list(props), rng.randint(0, len(props)))
        schema = {"type": "object", "properties": props, "required": required}
        if rng.random() < 0.5:
            schema["additionalProperties"] = rng.choice([False, True])
    elif kind == "free":
        schema = {"type": "object", "additionalProperties": rng.choice([True, random_schema(rng, depth + 1, defs)])}
    elif kind == "array":
        schema = {"type": "array", "items": random_schema(rng, depth + 1, defs)}
        if rng.random() < 0.5:
            schema["minItems"] = rng.randint(0, 2)
            schema["maxItems"] = schema["minItems"] + rng.randint(0, 2)
    else:
        name = f"D{len(defs)}"
        defs[name] = {}             # first: the definition may refer to itself
        defs[name] = random_schema(rng, depth + 1, defs)
        schema = {"$ref": f"#/$defs/{name}"}
    if rng.random() < 0.2 and "$ref" not in schema:
        schema["title"] = "annotated"
    return schema


def random_root(rng: random.Random) -> dict:
    defs = {}
    props = {n: random_schema(rng, 1, defs) for n in rng.sample(NAMES, rng.randint(1, 5))}
    return {"type": "object", "properties": props, "required": rng.sample(list(props), rng.randint(0, len(props))),
            "$defs": defs}


def ws(rng: random.Random) -> bytes:
    return bytes(rng.choice(WS_BYTES) for _ in range(rng.choice([0, 0, 0, 1, 3])))


def instance(rng: random.Random, schema, root: dict, depth: int = 0) -> tuple[object, bytes]:
    """A document `schema` admits, as dpllama's grammar spells it (properties in order, enums compact), with
    whitespace at random: (its value, its bytes)."""
    if schema is True or schema == {} or set(schema) <= {"description", "title"}:
        value = random_value(rng, max(depth, 2))
        return value, json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])).encode()
    if "$ref" in schema:
        return instance(rng, root["$defs"][schema["$ref"].split("/")[-1]], root, depth)
    for word in ("anyOf", "oneOf"):
        if word in schema:
            return instance(rng, rng.choice(schema[word]), root, depth)
    if "enum" in schema or "const" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if "type" in schema:
            values = [v for v in values if any(jsonschema.Draft202012Validator({"type": t}).is_valid(v)
                                               for t in schema["type"])]
        value = rng.choice(values)
        return value, spell(value)
    kind = schema["type"] if isinstance(schema["type"], str) else rng.choice(schema["type"])
    if kind == "object" and "properties" in schema:
        value, parts = {}, []
        for name, sub in schema["properties"].items():
            if name in schema["required"] or rng.random() < 0.5:
                value[name], text = instance(rng, sub, root, depth + 1)
                parts.append(ws(rng) + json.dumps(name, ensure_ascii=False).encode() + ws(rng) + b":" + ws(rng) + text)
        return value, b"{" + b",".join(parts) + ws(rng) + b"}"
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        value, parts = {}, []
        for _ in range(rng.randrange(3)):
            key = random_text(rng)
            v, text = instance(rng, extra, root, depth + 1)
            value[key] = v
            parts.append(json.dumps(key, ensure_ascii=rng.random() < 0.5).encode() + b":" + ws(rng) + text)
        return value, b"{" + ws(rng) + b",".join(parts) + b"}"
    if kind == "array":
        least = schema.get("minItems", 0)
        items = [instance(rng, schema["items"], root, depth + 1)
                 for _ in range(rng.randint(least, schema.get("maxItems", least + 3)))]
        return [v for v, _ in items], b"[" + b",".join(ws(rng) + t + ws(rng) for _, t in items) + b"]"
    if kind == "string" and ("pattern" in schema or "format" in schema):
        value = rng.choice(PATTERNED.get(schema.get("pattern")) or FORMATTED[schema["format"]])
        return value, json.dumps(value, ensure_ascii=False).encode()
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):    # no \\u escapes in these
        value = "".join(rng.choice(COUNTED_TEXT) for _ in range(rng.randint(schema["minLength"], schema["maxLength"])))
        return value, json.dumps(value, ensure_ascii=False).encode()
    if kind == "integer" and set(schema) & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        low = max(schema.get("minimum", -2**45), schema.get("exclusiveMinimum", -2**45) + 1)
        high = min(schema.get("maximum", 2**45), schema.get("exclusiveMaximum", 2**45) - 1)
        value = rng.choice([low, high, rng.randint(low, high)])
        return value, json.dumps(value).encode()
    value = {"string": lambda: random_text(rng), "integer": lambda: rng.choice([0, -7, 10**rng.randrange(20)]),
             "number": lambda: rng.choice([0, 3, -1.25e-7, 123.456, 3e20]), "boolean": lambda: rng.random() < 0.5,
             "null": lambda: None}[kind]()
    return value, json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()


# jsonschema's checker of formats (date, uuid), with Python's own reading of RFC 3339's times for time and
# date-time (its fractions cut to the microseconds Python reads)
FORMAT_CHECKER = jsonschema.FormatChecker()


def iso(text: str) -> str:
    return re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")


@FORMAT_CHECKER.checks("time", raises=ValueError)
def _time(text) -> bool:
    return not isinstance(text, str) or bool(datetime.time.fromisoformat(iso(text)).tzinfo)


@FORMAT_CHECKER.checks("date-time", raises=ValueError)
def _date_time(text) -> bool:
    return not isinstance(text, str) or (len(text) > 10 and text[10] == "T"
                                         and bool(datetime.datetime.fromisoformat(iso(text)).tzinfo))


def alphabet() -> bytes:
    """Bytes enough to close a document of the random schemas: CLOSING's, and those of their names and values."""
    return bytes(sorted(set(CLOSING + b"".join(spell(n) for n in NAMES) + b"".join(spell(v) for v in VALUES)
                            + b"typed019TZ:-+.ABCDEFabcdefgost")))     # few digits: numbers many ways


def test_schema_documents_are_valid_and_every_prefix_can_close():
    """Random schemas (objects of properties required or not, free objects, arrays bounded or not, strings, numbers,
    integers, literals, enums, consts, anyOf and oneOf, type lists, $defs and $ref, recursion, annotations) and
    documents of each as the grammar spells them: each document is accepted, in every split, and "done" only at its
    end; of each document mutated (a byte deleted, inserted, replaced or swapped, or cut short), every one the
    grammar closes is JSON that jsonschema (an independent validator) finds valid, and every prefix it accepts can
    still close, by the shortest completion it finds, into a document jsonschema finds valid."""
    rng = random.Random(7)
    closed = complete = alive = 0
    for _ in range(100):
        schema = random_root(rng)
        g, valid = grammar(schema), jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER)
        for _ in range(4):
            value, text = instance(rng, schema, schema)
            assert valid.is_valid(value) and json.loads(text) == value, text
            text = ws(rng) + text + ws(rng)
            states = [g.open]
            for b in text:
                states.append(g.advance(states[-1], b))
            assert all(states) and done(states[-1]), (schema, text)
            alive += any(len(s) > 1 for s in states)    # anyOf's alternatives alive together
            end = len(text.rstrip(bytes(WS_BYTES)))
            assert not any(done(s) for s in states[:end]), (schema, text)
            for k in range(0, len(text) + 1, 7):
                assert feed(feed(g.open, text[:k], g), text[k:], g) == states[-1]
            for bad in mutations(text, rng):
                s = feed(g.open, bad, g)
                if done(s):
                    assert valid.is_valid(json.loads(bad)), (schema, bad)
                    closed += 1
                elif s is not None:
                    rest = completion(s, g, alphabet())
                    assert rest is not None and valid.is_valid(json.loads(bad + rest)), (schema, bad, rest)
                    complete += 1
    assert closed > 300 and complete > 300 and alive > 20, (closed, complete, alive)


def test_objects_take_their_properties_in_order():
    """An object's properties as the schema lists them, optional ones left out or not, required ones never, and no
    others; the object closes once none required is left; so with thousands of them. Integers take no fraction or
    exponent; enum values only as written compact."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"},
                                               "c": {"enum": [[1, 2], "x"]}, "d": {"type": "null"}},
              "required": ["c"]}
    g = grammar(schema)
    accepted = [b'{"c":"x"}', b'{"a":"","c":[1,2]}', b'{"b":-3,"c":"x","d":null}', b'{ "a" : "z" , "c" : "x" }']
    refused = [b'{"c":"x","a":""}', b'{"a":""}', b'{}', b'{"d":null,"c":"x"}', b'{"c":"x","e":1}', b'{"b":1.0,"c":"x"}',
               b'{"b":1e3,"c":"x"}', b'{"c":[1, 2]}', b'{"c":"x","c":"x"}', b'{"c":"\\u0078"}']
    for text in accepted:
        assert done(feed(g.open, text, g)), text
    for text in refused:
        assert not done(feed(g.open, text, g)), text
    # oneOf as anyOf, as llama.cpp takes it: a document that two alternatives admit is not refused
    either = grammar({"properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}})
    assert done(feed(either.open, b'{"a":1}', either)) and done(feed(either.open, b'{"a":1.5}', either))
    # thousands of names and values, found by their prefixes: "n1" also begins "n10"..."n19", "n100"...
    many = grammar({"properties": {f"n{i}": {"$ref": "#/$defs/E"} for i in range(2000)}, "required": ["n1500"],
                    "$defs": {"E": {"enum": list(range(1000))}}})
    assert done(feed(many.open, b'{"n1":1,"n150":999,"n1500":15}', many))
    assert done(feed(many.open, b'{"n1500":0,"n1999":100}', many))
    for text in (b'{"n1500":1000}', b'{"n1501":1,"n1500":1}', b'{"n1":1,"n1":1', b'{"n2000"', b'{"n1999":1}'):
        assert not done(feed(many.open, text, many)), text
    assert grammar(schema) is g             # compiled once: its masks kept from one request to the next
    assert grammar({**schema, "properties": dict(reversed(schema["properties"].items()))}) is not g


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    """A pattern of dpllama.pattern's subset: literals, classes, shorthands, groups, alternations, quantifiers."""
    atoms = ["a", "b", "c", ".", "\\d", "\\w", "\\s", "\\D", "\\W", "\\S", "[a-c]", "[^a\\d]", "\\.", "\\x41", "[\\w-]"]
    parts = []
    for _ in range(rng.randint(1, 3)):
        if depth < 2 and rng.random() < 0.25:
            inner = "|".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 2)))
            atom = rng.choice(["(?:", "("]) + inner + ")"
        else:
            atom = rng.choice(atoms)
        parts.append(atom + rng.choice(["", "", "*", "+", "?", "{2}", "{1,3}", "{2,}", "*?", "{0}"]))
    return "".join(parts)


def test_patterns_match_as_pythons_re():
    """dpllama.pattern's NFA on 400 random patterns and 60 strings each: every string it accepts, Python's re.search
    finds a match in (so a client's Python validator agrees, whatever the characters: Unicode digits, letters and
    spaces, line ends), and on ASCII strings without line ends, where ECMA-262's and Python's classes are the same,
    the two agree exactly; anchored or not."""
    from dpllama.pattern import Pattern
    rng = random.Random(13)
    wide, narrow = "ab c1_-\n\r\t\u00e9\u0663\u2028\u00a0ZA.", "ab c1_-ZA."
    agreed = 0
    for _ in range(400):
        text = rng.choice(["", "^"]) + random_pattern(rng) + rng.choice(["", "$"])
        nfa = Pattern(text)
        for k in range(60):
            chars = wide if k % 2 else narrow
            string = "".join(rng.choice(chars) for _ in range(rng.randrange(7)))
            states = nfa.start
            for c in string:
                states = nfa.next(states, c)
            ours, python = bool(states) and nfa.accepts(states), re.search(text, string) is not None
            assert python or not ours, (text, string)
            if chars == narrow:
                assert ours == python, (text, string)
                agreed += ours
    assert agreed > 1000


@pytest.mark.parametrize("schema, message", [
    ({"type": "string"}, "the schema's root must be an object"),
    ({"type": "array"}, "the schema's root must be an object"),
    ({"properties": {"a": {"type": "string", "pattern": "a(?!b)"}}},
     '#/properties/a: "pattern": a lookaround or named group at character 2 of the pattern \'a(?!b)\''),
    ({"properties": {"a": {"type": "string", "pattern": "(a)\\1"}}}, '"pattern": the escape \\1 at character 5'),
    ({"properties": {"a": {"type": "string", "pattern": "(a{999}){999}"}}},
     "the pattern needs more than 20,000 states"),
    ({"properties": {"a": {"type": "string", "pattern": "(" * 60 + "a" + ")" * 60}}},
     "groups nested more than 50 deep"),
    ({"properties": {"a": {"type": "string", "pattern": 5}}}, '#/properties/a: "pattern" must be a string, found 5'),
    ({"properties": {"a": {"type": "string", "pattern": "a+", "maxLength": 3}}},
     '"pattern" or "format" beside another of "pattern", "format", "minLength" and "maxLength" is not supported'),
    ({"properties": {"a": {"type": "string", "minLength": 3, "maxLength": 2}}},
     '#/properties/a: "minLength" 3 is more than "maxLength" 2'),
    ({"properties": {"a": {"type": "number", "minimum": 0}}},
     '#/properties/a: "minimum" is supported on an integer, not on a number'),
    ({"properties": {"a": {"type": ["integer", "number"], "maximum": 0}}}, '"maximum" is supported on an integer, not'),
    ({"properties": {"a": {"type": "integer", "minimum": 5, "exclusiveMaximum": 5}}},
     "#/properties/a: no integer lies within its bounds (minimum, exclusiveMaximum)"),
    ({"properties": {"a": {"type": "integer", "minimum": "1"}}},
     '#/properties/a: "minimum" must be a number, found "1"'),
    ({"properties": {"a": {"type": "string", "format": "email"}}},
     '#/properties/a: "format" "email" is not supported (supported: date, time, date-time, uuid)'),
    ({"properties": {"a": {"type": "integer", "multipleOf": 2}}}, '#/properties/a: "multipleOf" is not supported'),
    ({"properties": {"a": {"type": "array", "prefixItems": []}}}, '#/properties/a: "prefixItems" is not supported'),
    ({"properties": {"a": {"type": "string", "properties": {}}}}, '#/properties/a: "properties" is not supported'),
    ({"properties": {"a": {"$ref": "#/components/x"}}}, "\"$ref\" '#/components/x' is not supported"),
    ({"properties": {"a": {"$ref": "#/$defs/X"}}}, "\"$ref\" '#/$defs/X' names no schema of the document"),
    ({"properties": {"a": {"$ref": "#/$defs/X", "minLength": 1}}, "$defs": {"X": {}}}, '"minLength" is not supported'),
    ({"properties": {"a": {"allOf": [{}, {}]}}}, '"allOf" of more than one schema is not supported'),
    ({"properties": {"a": {"anyOf": []}}}, '#/properties/a: "anyOf" must be a list of schemas'),
    ({"properties": {"a": {"type": "float"}}}, '#/properties/a: "type" must be one of object, array, string'),
    ({"properties": {"a": {"enum": []}}}, '#/properties/a: "enum" must be a list of values'),
    ({"properties": {"a": {"type": "string", "enum": [1, None]}}}, 'no value of "enum" is of the type "string"'),
    ({"properties": {"a": {}}, "required": ["b"]}, "\"required\" names 'b', which \"properties\" does not define"),
    ({"properties": {"a": {"type": "array", "minItems": 3, "maxItems": 2}}}, '"minItems" 3 is more than "maxItems" 2'),
    ({"properties": {"a": {"type": "array", "minItems": -1}}}, '"minItems" must be a whole number, found -1'),
    ({"properties": {"a": False}}, "#/properties/a: a schema must be an object or true, found false"),
    ({"properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}},
     "a schema that refers only to itself"),
    ({"properties": {"a": {"anyOf": [{"$ref": "#"}, {"$ref": "#/properties/a"}]}}}, "\"$ref\" '#/properties/a'"),
    (json.loads('{"properties": {"a": ' * (MAX_DEPTH // 2 + 1) + "{}" + "}}" * (MAX_DEPTH // 2 + 1)),
     f"the schema nests deeper than {MAX_DEPTH} levels"),
    ({"properties": {"a": {"enum": ["\udc00"]}}}, "the schema's name or value '\\udc00' cannot be written as JSON in "
                                                 "UTF-8"),
    ({"properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": [None]}, "\"$ref\" '#/$defs/A' names no schema"),
    ({"properties": {"a" * 257: {}}}, "#: the property name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'... is longer "
                                      "than 256 bytes"),
    ({"properties": {f"p{i}": {"enum": ["x" * 1000]} for i in range(121)}},
     "the schema's property names, enum and const values spell more than 120,000 bytes"),
])
def test_schemas_that_cannot_be_held_are_refused(schema, message):
    """A keyword that would constrain the document beyond what the grammar holds it to is refused, named with where
    it is (a JSON pointer), never ignored; so are schemas that admit no document or that are malformed."""
    with pytest.raises(SchemaError) as e:
        grammar(schema)
    assert message in str(e.value), str(e.value)


def test_recursive_and_pydantic_schemas():
    """A tree that refers to itself nests as deep as the document goes; Pydantic's schemas ($defs, $ref, enums,
    Optional as anyOf with null, titles and defaults) are taken as it writes them, and what the grammar closes
    Pydantic reads back."""
    tree = {"type": "object", "properties": {"v": {"type": "integer"},
                                             "kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["v"]}
    g = grammar(tree)
    assert done(feed(g.open, b'{"v":1,"kids":[{"v":2,"kids":[{"v":3}]},{"v":4,"kids":[]}]}', g))
    assert feed(g.open, b'{"v":1,"kids":[{"kids":', g) is None
    from enum import Enum
    from typing import Optional
    from pydantic import BaseModel, ConfigDict

    class Color(str, Enum):
        red = "red"
        green = "green"

    class Pet(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        color: Color = Color.red

    class Person(BaseModel):
        name: str
        age: Optional[int] = None
        pets: list[Pet]

    g = grammar(Person.model_json_schema())
    text = b'{"name":"Bob","age":null,"pets":[{"name":"Rex","color":"green"},{"name":"Tom"}]}'
    assert done(feed(g.open, text, g))
    assert Person.model_validate_json(text).pets[0].color is Color.green
    assert feed(g.open, b'{"name":"Bob","pets":[{"name":"Rex","color":"blue', g) is None


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
    assert vocab.reach == 6         # '"]}}' ends four values: the stack's top six decide
    special = [t for t in range(tok.vocab_size) if tok.unprinted(t)]
    tool = tok.token_to_id["<tool>"]
    states = {OPEN}
    for data in VALID + documents(30, seed=2) + [b'{"a":[[[[[{"b":[[{"c":"d', b'{"a":[[[[[{"b":[[{"c":[1']:
        for k in range(len(data) + 1):
            states.add(feed(OPEN, data[:k]))
    for state in states:
        want = np.array([bool(p) and feed(state, p) is not None for p in vocab.pieces])
        assert (vocab.allowed(ANY, state) == want).all(), state
        assert not want[special].any()
        mode = JsonMode(tok)
        mode.state = state
        assert [mode.fits(t) for t in range(tok.vocab_size)] == list(want)
    assert len(vocab.masks) < len(states)
    assert vocab.allowed(ANY, feed(OPEN, b'{"'))[tool]


def test_schema_masks_are_the_tokens_that_fit(tok):
    """Under schemas (random ones, and one whose names and enum values are tokens of their own), a mask holds exactly
    the tokens whose bytes continue the states, for every state their documents pass through, anyOf's alternatives
    alive together included; masks are kept per grammar and state, so two schemas never share one."""
    vocab = Vocabulary(tok)
    rng = random.Random(3)
    named = {"type": "object", "properties": {"a": {"enum": ["abc", True, None]}, "abc": {"type": "array",
             "items": {"anyOf": [{"type": "integer"}, {"const": 0.5}, {"type": "object", "properties": {"a": {}}}]},
                                                                  "maxItems": 2},
                                               # counts far from their bounds share masks (Vocabulary.key)
                                               "long": {"type": "string", "minLength": 30, "maxLength": 60},
                                               "n": {"type": "integer", "minimum": -20, "maximum": 1234}},
             "required": ["abc"]}
    cases = [(named, [b'{"a":"abc","abc":[0.5,{"a":{"b":[true]}}]}', b'{"abc":[-1 ]}', b'{"a":null,"abc":[]}',
                      b'{"abc":[],"long":"' + "\u00e9a\\n\u65e5".encode() * 10 + b'","n":1234}'])]
    for _ in range(12):
        schema = random_root(rng)
        cases.append((schema, [instance(rng, schema, schema)[1] for _ in range(3)]))
    for schema, docs in cases:
        g = grammar(schema)
        states = {g.open}
        for data in docs:
            assert done(feed(g.open, data, g)), data
            for k in range(len(data) + 1):
                states.add(feed(g.open, data[:k], g))
        for state in states:
            want = np.array([bool(p) and feed(state, p, g) is not None for p in vocab.pieces])
            assert (vocab.allowed(g, state) == want).all(), (schema, state)
    # the same states under another grammar: '{"' opens a key any object takes, and one only "a" or "abc" begins
    assert vocab.allowed(ANY, OPEN)[tok.token_to_id[_bytes_to_unicode()[ord("{")]]]
    g = grammar(named)
    assert vocab.allowed(g, feed(g.open, b'{"', g)).sum() < vocab.allowed(ANY, feed(OPEN, b'{"')).sum()


@pytest.fixture(scope="module")
def tiny(queue, tok):
    """A random model over the tiny vocabulary, two slots."""
    return Llama(random_weights(vocab=tok.vocab_size, seq_len=96, seed=3), queue, slots=2)


def json_text(tok, tokens: list[int]) -> bytes:
    return b"".join(tok.token_bytes(t) for t in tokens)


def batched(model, gens: list, rounds: int) -> list[list[int]]:
    """The tokens of each generation, driven together as the server drives them (a Batcher), `rounds` steps at
    most."""
    got = {id(gen): [] for gen in gens}
    batcher = Batcher(model)
    for _ in range(rounds):
        for gen, token in batcher.step(gens):
            if token is not None:
                got[id(gen)].append(token)
        if batcher.idle:
            break
    return [got[id(gen)] for gen in gens]


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
        assert batched(tiny, gens, 200)[0] == tokens and all(g.ended for g in gens)
    assert closed       # seed 3's object closes in 21 tokens


def test_json_schema_on_a_random_model(tiny, tok):
    """A random model's tokens under a schema, greedy and sampled: the text is always a prefix of one of its
    documents, and where the generation stopped one that jsonschema finds valid; batched driving (the server's,
    beside a sequence in plain JSON mode) gives the tokens the single sequence gets. (The model writes whitespace
    as long as it may, MAX_WS bytes in a row: 90 tokens let seed 5's object close.)"""
    schema = {"type": "object", "properties": {"the": {"type": "array", "items": {"enum": [12, "the"]}, "maxItems": 2},
                                               "n": {"type": "boolean"}}, "required": ["the", "n"]}
    g, prompt, closed = grammar(schema), tok.encode("the 12"), 0
    for seed in range(6):
        sampler = (lambda: Sampler(temperature=0)) if seed == 0 else (lambda s=seed: Sampler(temperature=1.0, seed=s))
        tiny.select(0)
        gen = generate(tiny, prompt, 90, sampler(), tok.eos_ids, json=JsonMode(tok, g))
        tokens = list(gen)
        state = feed(g.open, json_text(tok, tokens), g)
        assert state is not None and gen.stopped == done(state), tokens
        if gen.stopped:
            assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(json_text(tok, tokens)))
            closed += 1
        gens = []
        for slot, json_grammar in enumerate((g, ANY)):
            tiny.select(slot)
            gens.append(generate(tiny, prompt, 90, sampler(), tok.eos_ids, json=JsonMode(tok, json_grammar)))
        assert batched(tiny, gens, 300)[0] == tokens and all(gen.ended for gen in gens)
    assert closed


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
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}}, "required": ["name", "age"]}
    text = "".join(llm.stream(ids, steps, Sampler(temperature=0), echo_prompt=False, json=person))
    assert list(json.loads(text)) in (["name", "age"], ["name", "age", "city"]) and json.loads(text)["age"] == 30, text
    # formats and patterns: Bob's birthday a date Python reads, his code one the pattern matches
    dated = {"type": "object", "properties": {"name": {"type": "string"},
                                              "birthday": {"type": "string", "format": "date"},
                                              "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
             "required": ["name", "birthday", "code"]}
    value = json.loads("".join(llm.stream(ids, steps, Sampler(temperature=0), echo_prompt=False, json=dated)))
    assert datetime.date.fromisoformat(value["birthday"]) and re.fullmatch("[A-Z]{3}-[0-9]{2}", value["code"]), value
    with pytest.raises(SchemaError, match='"pattern": a lookaround'):
        llm.generate("A JSON object:", 80, json={"properties": {"name": {"type": "string", "pattern": "B(?=o)"}}})
