"""Tokenizers: llama2.c against upstream run.c oracles, GGUF SPM/BPE against llama.cpp semantics."""
import json
import re
import struct
import sys
import time
from pathlib import Path

import pytest

from dpllama.errors import DpllamaError
from dpllama.tokenizer import (Llama2cTokenizer, StreamDecoder, load_gguf_tokenizer, printable_piece,
                               tokenizer_from_gguf_fields)
from tests.helpers import NO_THINKING, QWEN3_CHAT_TEMPLATE, smollm2_gguf_path

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
LLAMA2C = MODELS / "llama2c"
SMOLLM2 = MODELS / "smollm2"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared model data not found: {path}")
    return path


ROUND_TRIP = ["", "Once upon a time", "12345", "3.14159 and 1,000,000", "  leading and trailing  ",
              "tabs\tand\nnewlines\n\n", "héllo wörld", "日本語のテキスト", "emoji 🎉🦙👩‍👩‍👧", "\u00a0\u200b\ufeff",
              "<|im_start|> literal", "it's we've I'm", "a" * 300, "\x01\x7f control"]


# ---------------------------------------------------------------- llama2.c

def write_llama2c_bin(path: Path, pieces, scores=None) -> Path:
    scores = scores or [0.0] * len(pieces)
    body = b"".join(struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores))
    path.write_bytes(struct.pack("<i", max(map(len, pieces))) + body)
    return path


def base_pieces():
    """llama2.c layout: <unk>, BOS, EOS, then the 256 byte tokens."""
    return [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]


@pytest.fixture(scope="module")
def tok32k():
    return Llama2cTokenizer(need(LLAMA2C / "tokenizer.bin"), 32000)


@pytest.fixture(scope="module")
def tok512():
    return Llama2cTokenizer(need(LLAMA2C / "tok512.bin"), 512)


def test_llama2c_oracle_cases(tok32k):
    cases = json.loads(need(LLAMA2C / "tokenizer_cases.json").read_text())["cases"]
    assert len(cases) == 8
    for case in cases:
        assert tok32k.encode(case["text"]) == case["ids"], case["text"]
        assert tok32k.decode(case["ids"]) == case["text"]


def test_tok512_encode(tok512):
    assert tok512.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok512.encode("Once upon a time", bos=False, eos=True) == [403, 407, 261, 378, 2]
    assert tok512.encode("") == [1]
    assert (tok512.kind, tok512.vocab_size, tok512.bos_id, tok512.eos_id) == ("llama2c", 512, 1, 2)
    assert tok512.eos_ids == {1}  # run.c stops when the model samples BOS


@pytest.mark.parametrize("run", ["reference_stories260K_greedy", "reference_stories260K_greedy_noprompt_n256"])
def test_llama2c_reference_output(tok512, run):
    """run.c prints printable_piece(decode(ids[k-1], ids[k])) for k >= 1, then a newline."""
    ids = [int(x) for x in need(LLAMA2C / f"{run}_ids.txt").read_text().split()]
    out = b"".join(printable_piece(tok512.decode_piece(ids[k - 1], ids[k])) for k in range(1, len(ids)))
    assert out + b"\n" == (LLAMA2C / f"{run}.txt").read_bytes()
    # streaming gives the same text (no unprintable pieces in these runs)
    stream = StreamDecoder(tok512, prev=ids[0])
    assert "".join(stream.push(t) for t in ids[1:]) + stream.flush() == out.decode()


def test_llama2c_decode_piece_rules(tok32k):
    once = tok32k.encode("Once")[1]
    assert tok32k.decode_piece(1, once) == b"Once"   # leading space dropped after BOS
    assert tok32k.decode_piece(5, once) == b" Once"
    assert tok32k.decode_piece(1, 3 + 0x0A) == b"\n"  # <0x0A>
    assert tok32k.token_bytes(3 + 0xE6) == b"\xe6"


def test_printable_piece():
    assert printable_piece(b"hello") == b"hello"
    assert printable_piece(b"\n") == b"\n"
    assert printable_piece(b"\xe6") == b""     # lone non-ASCII byte
    assert printable_piece(b"\x01") == b""     # control byte
    assert printable_piece(b"\x00") == b""
    assert printable_piece(b"ab\x00cd") == b"ab"  # printf("%s") stops at NUL
    assert printable_piece("日".encode()) == "日".encode()


def test_llama2c_bad_files(tmp_path, tok512):
    good = need(LLAMA2C / "tok512.bin").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good[:-3])
    with pytest.raises(DpllamaError, match=r"cut\.bin: truncated tokenizer file: expected 512 tokens, found 511"):
        Llama2cTokenizer(cut, 512)
    with pytest.raises(DpllamaError, match=r"tok512\.bin: truncated tokenizer file: expected 32000 tokens, found 512"):
        Llama2cTokenizer(LLAMA2C / "tok512.bin", 32000)
    with pytest.raises(DpllamaError, match=r"tok512\.bin: tokenizer has 512 tokens but the model's vocab_size is 300"):
        Llama2cTokenizer(LLAMA2C / "tok512.bin", 300)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(good + b"xyz")
    with pytest.raises(DpllamaError, match=r"junk\.bin: corrupt tokenizer file: 3 stray bytes after 512 tokens"):
        Llama2cTokenizer(junk, 512)
    with pytest.raises(DpllamaError, match=r"missing\.bin: cannot read tokenizer"):
        Llama2cTokenizer(tmp_path / "missing.bin", 512)
    assert Llama2cTokenizer(LLAMA2C / "tok512.bin").vocab_size == 512  # no vocab_size: take the file's


def test_llama2c_merge_order(tmp_path):
    """Highest score first; among equal scores the leftmost pair (run.c's strict '>')."""
    pieces = base_pieces() + [b" ", b"a", b"b", b"c", b"aa", b"ab", b"bc"]
    scores = [0.0] * 259 + [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -1.5]
    tok = Llama2cTokenizer(write_llama2c_bin(tmp_path / "t.bin", pieces, scores))
    ids = {p: i for i, p in enumerate(pieces)}
    assert tok.encode("aaa", bos=False) == [ids[b" "], ids[b"aa"], ids[b"a"]]
    assert tok.encode("abc", bos=False) == [ids[b" "], ids[b"a"], ids[b"bc"]]
    assert tok.encode("é", bos=False) == [ids[b" "], 3 + 0xC3, 3 + 0xA9]  # byte fallback


def test_llama2c_vocab_without_byte_tokens(tmp_path):
    """Fewer than 259 tokens and no <0xXX> ones: a character outside the vocabulary is <unk> (a run of them one
    <unk>), as sentencepiece without byte fallback has it, never run.c's byte + 3 past the vocabulary's end."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ", b"a", b"b", b" a"]
    tok = Llama2cTokenizer(write_llama2c_bin(tmp_path / "t.bin", pieces), len(pieces))
    assert tok.encode("a é€ b") == [1, 6, 3, 0, 3, 5]
    assert tok.encode("a\x01é") == [1, 6, 0]
    with pytest.raises(DpllamaError, match=r"t2\.bin: a llama2\.c tokenizer has at least 3 tokens \(<unk>, BOS, "
                                           r"EOS\), found 2"):
        Llama2cTokenizer(write_llama2c_bin(tmp_path / "t2.bin", pieces[:2]))


# ---------------------------------------------------------------- SentencePiece (GGUF "llama")

def spm_fields(pieces, scores, **extra):
    """GGUF fields for a llama2.c-layout vocabulary: the same ids, SentencePiece spelling."""
    special = {0: ("<unk>", 2), 1: ("<s>", 3), 2: ("</s>", 3)}
    tokens, types = [], []
    for i, p in enumerate(pieces):
        text, ttype = special.get(i, (p.decode().replace(" ", "\u2581"), 6 if i < 259 else 1))
        tokens.append(text)
        types.append(ttype)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, **extra}


def test_spm_matches_llama2c_on_tokenizer_bin(tok32k):
    spm = tokenizer_from_gguf_fields(spm_fields(tok32k.pieces, tok32k.scores), "tokenizer.bin")
    assert (spm.kind, spm.add_bos, spm.eos_ids) == ("spm", True, {2})
    for case in json.loads(need(LLAMA2C / "tokenizer_cases.json").read_text())["cases"]:
        assert spm.encode(case["text"]) == case["ids"], case["text"]
    for s in ROUND_TRIP:
        ids = spm.encode(s)
        assert ids == tok32k.encode(s), s
        assert spm.decode(ids) == s
    # special-token syntax only with parse_special; text after a special token gets a "▁" prefix
    assert spm.encode("<s> not special </s>", parse_special=True) == [1, 1, 29871, 451, 4266, 29871, 2]
    assert spm.encode("hello<s>world", parse_special=True) == [1] + spm.encode("hello", bos=False) + [1] + \
        spm.encode("world", bos=False)


def test_spm_synthetic():
    pieces = base_pieces() + [b" ", b"a", b"b", b"c", b"aa", b"ab", b"bc", b" a"]
    scores = [0.0] * 259 + [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -1.5, -3.0]
    ids = {p: i for i, p in enumerate(pieces)}
    spm = tokenizer_from_gguf_fields(spm_fields(pieces, scores), "t.gguf")
    assert spm.encode("aaa") == [1, ids[b" "], ids[b"aa"], ids[b"a"]]
    assert spm.encode("abc", bos=False, eos=True) == [ids[b" a"], ids[b"bc"], 2]
    assert spm.encode("a é") == [1, ids[b" a"], ids[b" "], 3 + 0xC3, 3 + 0xA9]
    assert spm.decode(spm.encode("a é")) == "a é"
    assert spm.decode_piece(None, ids[b" a"]) == b"a"   # prefix space dropped at the start
    assert spm.decode_piece(1, ids[b" a"]) == b"a"      # ... and after BOS
    assert spm.decode_piece(ids[b"b"], ids[b" a"]) == b" a"
    assert spm.decode_piece(ids[b"b"], 2) == b""        # control tokens print nothing
    assert spm.token_bytes(2) == b"</s>"
    no_prefix = tokenizer_from_gguf_fields(
        spm_fields(pieces, scores, **{"tokenizer.ggml.add_space_prefix": False}), "t.gguf")
    assert no_prefix.encode("aaa", bos=False) == [ids[b"aa"], ids[b"a"]]


def test_spm_and_llama2c_differ_on_unknown_characters(tmp_path):
    """A character missing from the vocab: llama2.c turns it into byte tokens before merging, so it
    can never merge; SentencePiece/llama.cpp merges the text first. Real Llama vocabularies contain
    every character of every piece, so this never shows on tokenizer.bin."""
    pieces = base_pieces() + [b" ", b"b", b"ab"]
    ids = {p: i for i, p in enumerate(pieces)}
    l2c = Llama2cTokenizer(write_llama2c_bin(tmp_path / "t.bin", pieces))
    spm = tokenizer_from_gguf_fields(spm_fields(pieces, [0.0] * len(pieces)), "t.gguf")
    assert l2c.encode("ab") == [1, ids[b" "], 3 + ord("a"), ids[b"b"]]
    assert spm.encode("ab") == [1, ids[b" "], ids[b"ab"]]


# ---------------------------------------------------------------- byte-level BPE (GGUF "gpt2")

def byte_chars():
    from dpllama.tokenizer.gguf import _bytes_to_unicode
    return list(_bytes_to_unicode().values())


def gpt2_fields(**extra):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    tokens = specials + byte_chars() + ["Ġt", "he", "Ġthe", "12"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3, 3, 3, 4] + [1] * (len(tokens) - 4),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, **extra}


@pytest.fixture(scope="module")
def tiny_gpt2():
    return tokenizer_from_gguf_fields(gpt2_fields(), "tiny.gguf")


def test_gpt2_synthetic(tiny_gpt2):
    tok = tiny_gpt2
    the, im_start, im_end, tool = tok.vocab_size - 2, 1, 2, 3
    assert (tok.kind, tok.add_bos, tok.eos_ids) == ("gpt2", False, {0, 2})
    assert tok.encode(" the") == [the]
    assert tok.encode("12")[0] != tok.vocab_size - 1  # smollm splits digits before BPE
    raw = tok.encode("<|im_start|> the")
    assert im_start not in raw and raw[-1] == the
    assert tok.encode("<|im_start|> the<|im_end|>", parse_special=True) == [im_start, the, im_end]
    assert tok.encode("a<tool>b") == tok.encode("a") + [tool] + tok.encode("b")  # user-defined: always
    assert tok.encode(" the", bos=True, eos=True) == [1, the, 2]
    assert tok.decode([im_start, the, im_end]) == " the"  # control tokens print nothing
    assert tok.decode([im_start, the, im_end], special=True) == "<|im_start|> the<|im_end|>"    # /detokenize's
    assert tok.decode([tool]) == "<tool>"
    assert tok.token_bytes(im_end) == b"<|im_end|>"
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s)) == s, s


def test_stream_decoder_holds_back_partial_utf8(tiny_gpt2):
    text = "héllo 日本 🦙!"
    ids = tiny_gpt2.encode(text)  # one token per byte here, so characters arrive split
    stream = StreamDecoder(tiny_gpt2)
    parts = [stream.push(t) for t in ids]
    assert "".join(parts) + stream.flush() == text
    assert all("\ufffd" not in p for p in parts)
    assert StreamDecoder(tiny_gpt2).push(ids[1]) == ""  # first byte of "é"


def test_chat_templates(tiny_gpt2):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tiny_gpt2.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    custom = tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.chat_template": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools') }}{% endif %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}")}), "c.gguf")
    assert custom.apply_chat_template(msgs, add_generation_prompt=False) == "<|im_start|>[Be brief.][Hi]<|im_end|>"
    with pytest.raises(DpllamaError, match=r"c\.gguf: chat template refused the messages: no tools"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])
    broken = tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.chat_template": "{% for %}"}), "b.gguf")
    with pytest.raises(DpllamaError, match=r"b\.gguf: chat template error"):
        broken.apply_chat_template(msgs)


@pytest.mark.parametrize("template, error", [
    ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
    ('{{ "a" + 1 }}', "TypeError: can only concatenate str"),
    ("{{ range(10**9) }}", "OverflowError: Range too big"),
    ('{{ "%d" % "x" }}', "TypeError: %d format"),
    ("{{ 'ab' * 10**9 }}", "* would make 2000000000 items (or bits), over 4194304"),     # 2 GB, in seconds
    ("{{ [0] * 10**7 }}", "* would make 10000000 items (or bits), over 4194304"),
    ("{{ 10 ** 10000000 }}", "** would make 40000000 items (or bits), over 4194304"),
])
def test_chat_template_expressions_that_raise(tiny_gpt2, template, error):
    """A model's template whose expressions raise what Python raises (its metadata is anybody's) is the model's
    error in one line, not a traceback (chat) or a 500 (serve)."""
    bad = tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.chat_template": template}), "t.gguf")
    with pytest.raises(DpllamaError, match=re.escape(f"t.gguf: chat template error: {error}")):
        bad.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_chat_template_kwargs_are_extra_variables():
    """Extra variables reach the template as transformers passes them (Qwen3's enable_thinking=False), and as
    dpllama.chat's functions take them; one of the template's own (messages, bos_token, ...) is refused, not
    replaced."""
    from dpllama.chat import chat_text
    qwen3 = tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.chat_template": QWEN3_CHAT_TEMPLATE}), "q.gguf")
    msgs = [{"role": "user", "content": "Hi"}]
    thinking = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3.apply_chat_template(msgs) == qwen3.apply_chat_template(msgs, enable_thinking=True) == thinking
    assert qwen3.apply_chat_template(msgs, enable_thinking=False) == thinking + NO_THINKING
    assert chat_text(qwen3, msgs, {"enable_thinking": False}) == thinking + NO_THINKING
    with pytest.raises(DpllamaError, match=r"^bos_token is the chat template's own variable, which dpllama sets$"):
        qwen3.apply_chat_template(msgs, bos_token="")
    with pytest.raises(DpllamaError, match=r"^messages is the chat template's own variable"):
        chat_text(qwen3, msgs, {"messages": []})


def test_chat_template_that_runs_away_is_stopped(tiny_gpt2, monkeypatch):
    """Loops nested past any conversation's need (10^10 turns: hours) end at RENDER_SECONDS with one line, in the
    thread that renders (the server's worker, which would otherwise stay busy for good); a tracer set before is
    set again after."""
    import dpllama.tokenizer.base as base
    monkeypatch.setattr(base, "RENDER_SECONDS", 0.3)
    bad = tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.chat_template": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")}), "t.gguf")
    before, start = sys.gettrace(), time.monotonic()
    with pytest.raises(DpllamaError,
                       match=r"^t\.gguf: chat template error: it ran over 0\.3 s \(a loop without end\?\)$"):
        bad.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert time.monotonic() - start < 5 and sys.gettrace() is before


def test_chat_template_that_writes_nothing(tiny_gpt2):
    from dpllama.chat import chat_prompt
    empty = tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.chat_template": "{# nothing #}"}), "e.gguf")
    with pytest.raises(DpllamaError, match=r"^e\.gguf: the chat template rendered the conversation as no tokens"):
        chat_prompt(empty, [{"role": "user", "content": "Hi"}])


def test_decode_refuses_ids_outside_the_vocabulary(tiny_gpt2):
    """-1 decoded as the vocabulary's last token; the others raised IndexError or TypeError."""
    for bad in (-1, tiny_gpt2.vocab_size, 2**64, 3.0, None):
        with pytest.raises(DpllamaError, match=rf"^tiny\.gguf: token id {re.escape(repr(bad))} is not in the "
                                               rf"vocabulary of {tiny_gpt2.vocab_size}$"):
            tiny_gpt2.decode([5, bad])


def test_gguf_field_errors():
    with pytest.raises(DpllamaError, match=r"x\.gguf: unsupported tokenizer model 'bert'"):
        tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.ggml.model": "bert"}), "x.gguf")
    with pytest.raises(DpllamaError, match=r"^x\.gguf: unsupported tokenizer\.ggml\.pre 'klingon' \(supported: "
                                           r"deepseek-r1-qwen, default, gpt-2, llama-bpe, .*\)$"):
        tokenizer_from_gguf_fields(gpt2_fields(**{"tokenizer.ggml.pre": "klingon"}), "x.gguf")
    with pytest.raises(DpllamaError, match=r"^x\.gguf: GGUF has no tokenizer\.ggml\.pre, the pre-tokenizer a gpt2 "
                                           r"vocabulary needs \(supported: .*qwen2, refact, smollm, starcoder\)$"):
        tokenizer_from_gguf_fields({**gpt2_fields(), "tokenizer.ggml.pre": None}, "x.gguf")
    with pytest.raises(DpllamaError, match=r"x\.gguf: GGUF has no tokenizer\.ggml\.tokens"):
        tokenizer_from_gguf_fields({"tokenizer.ggml.model": "gpt2"}, "x.gguf")
    fields = gpt2_fields()
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"][:-1] + ["he"]
    with pytest.raises(DpllamaError, match=r"x\.gguf: duplicate token 'he'"):
        tokenizer_from_gguf_fields(fields, "x.gguf")
    no_bos = tokenizer_from_gguf_fields({**gpt2_fields(), "tokenizer.ggml.bos_token_id": None}, "x.gguf")
    with pytest.raises(DpllamaError, match=r"x\.gguf: GGUF has no valid tokenizer\.ggml\.bos_token_id"):
        no_bos.encode("hi", bos=True)


# ---------------------------------------------------------------- pre-tokenizers (tokenizer.ggml.pre)

def pre_splits(pre: str, text: str) -> list[str]:
    """The pieces dpllama's pre-tokenizer `pre` cuts `text` into, as text (not GPT-2's byte characters)."""
    from dpllama.tokenizer.gguf import _BYTE_OF_CHAR, pre_tokenizer
    return [bytes(_BYTE_OF_CHAR[c] for c in piece).decode() for piece, _ in pre_tokenizer(pre).pre_tokenize_str(text)]


PRE_TEXT = "Hello world 12345 it's DON'T\n\n  x\t(a+b)=$3.14!! é日本 🦙"
# Each pre-tokenizer's pieces of PRE_TEXT, worked out by hand from llama.cpp's regexes (llama-vocab.cpp): what
# tells them apart is digits (runs, threes, ones), contractions (llama3 and qwen2 take 'T as 's), punctuation
# before a letter (llama3 and qwen2 take "(a"), newlines with the spaces after them, and default's
# punctuation regex, which goes first and so cuts "it's" into "'" and "s".
PRE_SPLITS = {
    "default": ["Hello", " world", " ", "123", "45", " it", "'", "s", " DON", "'", "T", "\n\n ", " x", "\t", "(",
                "a", "+", "b", ")=$", "3", ".", "14", "!!", " é日本", " 🦙"],
    "gpt-2": ["Hello", " world", " 12345", " it", "'s", " DON", "'", "T", "\n\n ", " x", "\t", "(", "a", "+", "b",
              ")=$", "3", ".", "14", "!!", " é日本", " 🦙"],
    "llama-bpe": ["Hello", " world", " ", "123", "45", " it", "'s", " DON", "'T", "\n\n", " ", " x", "\t", "(a",
                  "+b", ")=$", "3", ".", "14", "!!", " é日本", " 🦙"],
    "qwen2": ["Hello", " world", " ", "1", "2", "3", "4", "5", " it", "'s", " DON", "'T", "\n\n", " ", " x", "\t",
              "(a", "+b", ")=$", "3", ".", "1", "4", "!!", " é日本", " 🦙"],
    "smollm": ["Hello", " world", " ", "1", "2", "3", "4", "5", " it", "'s", " DON", "'", "T", "\n\n ", " x", "\t",
               "(", "a", "+", "b", ")=$", "3", ".", "1", "4", "!!", " é日本", " 🦙"],
}


@pytest.mark.parametrize("pre", PRE_SPLITS)
def test_pre_tokenizer_known_splits(pre):
    assert pre_splits(pre, PRE_TEXT) == PRE_SPLITS[pre]


def hf_pre_tokenizer(pre: str):
    """The pre-tokenizer each model's own tokenizer.json declares, built by HF `tokenizers`: a second
    formulation of what llama.cpp's regexes do (Llama 3's and Qwen2's case-insensitive (?i:...) contractions,
    SmolLM2's Digits step, GPT-2's ByteLevel regex with its final |\\s+)."""
    from tokenizers import Regex, pre_tokenizers as pt

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "llama-bpe": pt.Sequence([pt.Split(Regex(llama3), behavior="isolated"), byte_level]),
        "qwen2": pt.Sequence([pt.Split(Regex(llama3.replace(r"\p{N}{1,3}", r"\p{N}")), behavior="isolated"),
                              byte_level]),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True),
                               pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
    }[pre]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_pre_tokenizer_matches_the_models_own(pre):
    """On every text of ROUND_TRIP and more, the pieces of llama.cpp's regexes are those of the model's own
    tokenizer.json pre-tokenizer."""
    from dpllama.tokenizer.gguf import pre_tokenizer
    texts = ROUND_TRIP + [PRE_TEXT, "x = foo(bar)\n    return x ** 2  # 'QUOTE'S\r\n\r\n\tend",
                          "I'LL SHE'D we'Re ½ ² ٣٤٥ 1234567", "!!!???...\n\n\n   \n", "naïve café — “quotes”"]
    ours, theirs = pre_tokenizer(pre), hf_pre_tokenizer(pre)
    for text in texts:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text


@pytest.mark.parametrize("pre, pieces", [("llama-bpe", [" ", "12", "3", "4", "5"]),
                                         ("qwen2", [" ", "1", "2", "3", "4", "5"]),
                                         ("smollm", [" ", "1", "2", "3", "4", "5"])])
def test_gpt2_vocabulary_uses_its_pre_tokenizer(pre, pieces):
    """A gpt2 vocabulary's tokenizer splits with the pre-tokenizer tokenizer.ggml.pre names, then merges inside
    each piece: the merge "1 2" makes "12" of llama3's piece "123", and cannot where digits come one a piece."""
    fields = gpt2_fields(**{"tokenizer.ggml.pre": pre})
    del fields["tokenizer.ggml.add_bos_token"]
    tok = tokenizer_from_gguf_fields(fields, "p.gguf")
    assert [tok.decode([t]) for t in tok.encode(" 12345", bos=False)] == pieces
    assert tok.add_bos == (pre == "llama-bpe")         # llama.cpp's default, where the file does not say


def test_load_gguf_tokenizer(tmp_path):
    import gguf

    f = gpt2_fields()
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(f["tokenizer.ggml.model"])
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"])
    w.add_token_list(f["tokenizer.ggml.tokens"])
    w.add_token_types(f["tokenizer.ggml.token_type"])
    w.add_token_merges(f["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_gguf_tokenizer(path)
    assert tok.encode("<|im_start|> the", parse_special=True) == [1, tok.vocab_size - 2]
    with pytest.raises(DpllamaError, match=r"tok512\.bin: not a GGUF file"):
        load_gguf_tokenizer(need(LLAMA2C / "tok512.bin"))
    with pytest.raises(DpllamaError, match=r"nope\.gguf: cannot read: No such file"):
        load_gguf_tokenizer(tmp_path / "nope.gguf")


# ---------------------------------------------------------------- SmolLM2 (real GGUF)

@pytest.fixture(scope="module")
def smollm2():
    return load_gguf_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_cases():
    return {c["name"]: c for c in json.loads(need(SMOLLM2 / "fp32_greedy.json").read_text())["cases"]}


def test_smollm2_oracle_prompts(smollm2, smollm2_cases):
    raw, chat = smollm2_cases["raw_once_upon_a_time"], smollm2_cases["chat_capital_of_france"]
    assert smollm2.encode(raw["prompt"]) == raw["prompt_token_ids"] == [6403, 1980, 253, 655]
    assert smollm2.encode(chat["prompt"], parse_special=True) == chat["prompt_token_ids"]
    assert smollm2.decode(chat["output_token_ids"]) == chat["output_text"]
    assert smollm2.decode(raw["output_token_ids"]) == raw["output_text"]
    assert (smollm2.kind, smollm2.add_bos, smollm2.bos_id, smollm2.eos_id) == ("gpt2", False, 1, 2)
    assert smollm2.eos_ids == {0, 2, 4}  # what the oracle (and llama.cpp) stop on


def test_smollm2_chat_template(smollm2, smollm2_cases):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert smollm2.apply_chat_template(msgs) == smollm2_cases["chat_capital_of_france"]["prompt"]


def test_smollm2_round_trip(smollm2):
    assert smollm2.encode("12345") == [33, 34, 35, 36, 37]
    for s in ROUND_TRIP:
        assert smollm2.decode(smollm2.encode(s)) == s, s


# ---------------------------------------------------------------- too_long: a floor on a text's tokens, unencoded

def texts_to_bound(tok) -> list[str]:
    """Texts near the floor's edge: the longest token's text repeated (where the floor is reached), 200 other
    tokens' texts, a run of characters a vocabulary may drop, random characters of every plane, and the
    round-trip cases."""
    import random
    rng = random.Random(0)
    longest = max(range(tok.vocab_size), key=lambda t: len(tok.token_bytes(t)))
    texts = [tok.token_bytes(longest).decode("utf-8", "replace") * 40, "\x04" * 500 + "a", *ROUND_TRIP]
    texts += [tok.token_bytes(t).decode("utf-8", "replace") * 3 for t in rng.sample(range(tok.vocab_size), 200)]
    for high in (0x80, 0x800, 0x10000, 0x110000):
        texts.append("".join(chr(c) if not 0xD800 <= (c := rng.randrange(high)) < 0xE000 else "x"
                             for _ in range(500)))
    return texts


def check_floor(tok):
    most = tok.most_bytes_per_token
    for text in texts_to_bound(tok):
        n = len(tok.encode(text, parse_special=True))
        kept = len(text) - sum(map(text.count, tok.vanishing))
        assert n * most >= kept, (text[:30], n, kept, most)
        assert not tok.too_long(text, n), text[:30]       # never a text that fits
    assert tok.too_long("a" * (most * 10 + 1), 10) and not tok.too_long("a" * most * 10, 10)


def test_floor_on_tokens_llama2c_and_spm(tmp_path, tok512, tok32k):
    pieces = base_pieces() + [b" ", b"a", b"b", b"c", b"aa", b"ab", b"bc", b" a"]
    scores = [0.0] * 259 + [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -1.5, -3.0]
    spm = tokenizer_from_gguf_fields(spm_fields(pieces, scores), "t.gguf")
    for tok in (tok512, tok32k, spm, tokenizer_from_gguf_fields(spm_fields(tok512.pieces, tok512.scores), "t")):
        check_floor(tok)
    assert (tok512.most_bytes_per_token, spm.most_bytes_per_token, spm.vanishing) == (7, 5, "")   # " little", "<unk>"
    # without byte tokens a run of characters the vocabulary lacks is one <unk>: no floor
    no_bytes = Llama2cTokenizer(write_llama2c_bin(tmp_path / "t.bin", [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" ",
                                                                       b"a"]), 5)
    assert no_bytes.most_bytes_per_token is None and len(no_bytes.encode("é" * 1000)) == 3
    assert not no_bytes.too_long("é" * 1000, 2)


def test_floor_on_tokens_gpt2(tiny_gpt2):
    check_floor(tiny_gpt2)
    assert tiny_gpt2.most_bytes_per_token == len("<|endoftext|>") and tiny_gpt2.vanishing == ""
    # a vocabulary without some ASCII bytes (SmolLM2's lacks six controls) drops them: they count for nothing
    fields = gpt2_fields()
    from dpllama.tokenizer.gguf import _bytes_to_unicode
    char = _bytes_to_unicode()
    dropped = [char[4], char[6]]
    fields["tokenizer.ggml.tokens"] = [t for t in fields["tokenizer.ggml.tokens"] if t not in dropped]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"][:len(fields["tokenizer.ggml.tokens"])]
    gaps = tokenizer_from_gguf_fields(fields, "gaps.gguf")
    assert gaps.vanishing == "\x04\x06" and gaps.encode("\x04\x06" * 500) == []
    check_floor(gaps)
    assert not gaps.too_long("\x04" * 10_000 + "a", 1)
    # one without a continuation byte drops part of a character: no floor
    fields["tokenizer.ggml.tokens"] = [t for t in fields["tokenizer.ggml.tokens"] if t != char[0x80]]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"][:len(fields["tokenizer.ggml.tokens"])]
    assert tokenizer_from_gguf_fields(fields, "gaps.gguf").most_bytes_per_token is None


def test_floor_on_tokens_smollm2(smollm2):
    check_floor(smollm2)
    assert smollm2.most_bytes_per_token == 81 and smollm2.vanishing == "\x04\x06\x13\x14\x16\x1d"
