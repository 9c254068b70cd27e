"""Tokenizers described by GGUF metadata, with llama.cpp's semantics: SentencePiece-style
("llama": scores + <0xNN> byte fallback) and byte-level BPE ("gpt2", encoded with HF tokenizers)."""
from __future__ import annotations

import os
import re
from functools import cached_property

from dpllama.errors import DpllamaError
from dpllama.tokenizer.base import Tokenizer, merge_by_score, utf8

# tokenizer.ggml.token_type values
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)
# Token texts llama.cpp (llama-vocab.cpp) treats as end of generation, FIM pad/repo/sep included.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
})
SPACE = "\u2581"  # SentencePiece's visible space "▁"
_BYTE_TOKEN = re.compile("<0x[0-9A-Fa-f]{2}>")

KEY = "tokenizer.ggml."
# HF tokenizers' batches would otherwise run on a pool of threads of its own, and a process that forks after using
# it prints a warning
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class GgufTokenizer(Tokenizer):
    """What SPM and BPE vocabularies share: token types, special ids, special-token splitting."""

    def __init__(self, fields: dict, source: str, default_add_bos: bool, default_ids=(None, None, None)):
        self.source = source
        tokens = fields.get(KEY + "tokens")
        if tokens is None or len(tokens) == 0:
            raise DpllamaError(f"{source}: GGUF has no {KEY}tokens")
        self.tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in tokens]
        # llama.cpp renames empty tokens so they can neither match text nor collide
        self.tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(self.tokens)]
        n = self.vocab_size = len(self.tokens)
        types = fields.get(KEY + "token_type")
        self.types = [NORMAL] * n if types is None else [int(t) for t in types]
        if len(self.types) < n:
            raise DpllamaError(f"{source}: {KEY}token_type has {len(self.types)} entries, expected {n}")
        for i in (i for i, ty in enumerate(self.types[:n]) if ty == BYTE):    # token_bytes reads the byte from its text
            if not _BYTE_TOKEN.fullmatch(self.tokens[i]):
                raise DpllamaError(f"{source}: {KEY}token_type says token {i} {self.tokens[i]!r} is a byte, "
                                   f"expected a text such as '<0x0A>'")
        self.token_to_id = {}
        for i, t in enumerate(self.tokens):
            j = self.token_to_id.setdefault(t, i)
            if j != i:
                raise DpllamaError(f"{source}: duplicate token {t!r} at ids {j} and {i}")

        def special_id(name, default=None):
            v = fields.get(KEY + name, default)
            # llama.cpp ignores out-of-range special ids the same way
            return int(v) if v is not None and 0 <= int(v) < n else None

        self.bos_id, self.eos_id, self.unk_id = (
            special_id(k, d) for k, d in zip(("bos_token_id", "eos_token_id", "unknown_token_id"), default_ids))
        eog = {self.token_to_id[t] for t in EOG_TEXTS if t in self.token_to_id}
        for i in eog:
            self.types[i] = CONTROL  # llama.cpp forces these to control type too
        eog |= {self.eos_id, special_id("eot_token_id"), special_id("eom_token_id")}
        self.eos_ids = frozenset(eog - {None})
        self.add_bos = bool(fields.get(KEY + "add_bos_token", default_add_bos))
        self.chat_template = fields.get("tokenizer.chat_template")
        # Longest first, as llama.cpp's tokenizer_st_partition tries them.
        self.specials = sorted(((t, i, ty) for i, (t, ty) in enumerate(zip(self.tokens, self.types))
                                if ty in (CONTROL, USER_DEFINED, UNKNOWN)),
                               key=lambda s: -len(s[0]))

    def fragments(self, text: str, parse_special: bool) -> list:
        """Split text into raw-text pieces (str) and special token ids (int), as llama.cpp does:
        user-defined tokens always split out, control/unknown ones only with parse_special."""
        frags = [text] if text else []
        for tok, tid, ttype in self.specials:
            if not parse_special and ttype != USER_DEFINED:
                continue
            out = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(tok)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def encode(self, text: str, bos: bool | None = None, eos: bool = False,
               parse_special: bool = False) -> list[int]:
        # Text from argv/stdin may carry undecodable bytes as surrogates; they become U+FFFD, as lone surrogates do.
        text = utf8(text).decode("utf-8", "replace")
        ids = []
        if self.add_bos if bos is None else bos:
            ids.append(self._required(self.bos_id, "bos_token_id"))
        ids += self.encode_fragments(self.fragments(text, parse_special))
        if eos:
            ids.append(self._required(self.eos_id, "eos_token_id"))
        return ids

    def _required(self, token, name):
        if token is None:
            raise DpllamaError(f"{self.source}: GGUF has no valid {KEY}{name}")
        return token

    def encode_fragments(self, frags: list) -> list[int]:
        raise NotImplementedError

    def normal_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        ttype, text = self.types[token], self.tokens[token]
        if ttype == BYTE:
            return bytes([int(text[3:5], 16)])  # "<0xNN>"
        if ttype == NORMAL:
            return self.normal_bytes(token)
        return text.encode()

    def unprinted(self, token: int) -> bool:
        # llama.cpp's token_to_piece(special=false): control/unknown/unused print nothing.
        return self.types[token] not in (NORMAL, BYTE, USER_DEFINED)

    def decode_piece(self, prev: int | None, token: int) -> bytes:
        return b"" if self.unprinted(token) else self.token_bytes(token)

    def special_text(self, token: int | None) -> str:
        return "" if token is None else self.tokens[token]


class SpmTokenizer(GgufTokenizer):
    """llama.cpp's llm_tokenizer_spm: score-driven merges over UTF-8 characters, spaces as "▁",
    a "▁" prefix on text at the start or after a special token, <0xNN> fallback for leftovers."""
    kind = "spm"

    def __init__(self, fields: dict, source: str):
        # llama.cpp's defaults for SPM vocabularies
        super().__init__(fields, source, default_add_bos=True, default_ids=(1, 2, 0))
        scores = fields.get(KEY + "scores")
        self.scores = [0.0] * self.vocab_size if scores is None else [float(s) for s in scores]
        if len(self.scores) < self.vocab_size:
            raise DpllamaError(f"{source}: {KEY}scores has {len(self.scores)} entries, "
                               f"expected {self.vocab_size}")
        self.add_space_prefix = bool(fields.get(KEY + "add_space_prefix", True))
        self.byte_ids = [self.token_to_id.get(f"<0x{b:02X}>", self.token_to_id.get(chr(b), self.unk_id))
                         for b in range(256)]

    def encode_fragments(self, frags: list) -> list[int]:
        ids, after_special = [], True
        for f in frags:
            if isinstance(f, int):
                ids.append(f)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                f = " " + f
            after_special = False
            chars = f.replace(" ", SPACE)
            merged, pieces = merge_by_score([self.token_to_id.get(c) for c in chars], list(chars),
                                            self.token_to_id, self.scores)
            for tid, piece in zip(merged, pieces):
                # Only single characters can be missing from the vocab: merges always make tokens.
                ids.extend([tid] if tid is not None else [self._byte(b) for b in piece.encode()])
        return ids

    def _byte(self, b: int) -> int:
        if self.byte_ids[b] is None:
            raise DpllamaError(f"{self.source}: vocabulary has no byte token <0x{b:02X}> and no unknown token")
        return self.byte_ids[b]

    def normal_bytes(self, token: int) -> bytes:
        return self.tokens[token].replace(SPACE, " ").encode()

    def decode_piece(self, prev: int | None, token: int) -> bytes:
        piece = super().decode_piece(prev, token)
        # Drop the space the encoder's "▁" prefix added, as SentencePiece's decoder does.
        if self.add_space_prefix and (prev is None or prev == self.bos_id) and piece[:1] == b" ":
            piece = piece[1:]
        return piece


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)  # printable bytes stand for themselves, the others for chr(256), chr(257), ...
    extra = [b for b in range(256) if b not in bs]
    return dict(zip(bs + extra, map(chr, cs + [256 + k for k in range(len(extra))])))


_UNICODE_OF_BYTE = _bytes_to_unicode()
_BYTE_OF_CHAR = {c: b for b, c in _UNICODE_OF_BYTE.items()}
# The pre-tokenizers, as llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp) splits text before byte-level BPE:
# tokenizer.ggml.pre -> its regexes, each splitting every piece the one before left (what a match leaves
# between matches is a piece too), under the names llama.cpp gives them.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's tokenizer.json says (?i:'s|'t|...); llama.cpp spells the case-insensitive contractions out
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")      # digits one at a time
_SPLITS = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2_REGEX,),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), (_LLAMA3_REGEX,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_REGEX,)),
    **dict.fromkeys(("smollm", "starcoder", "refact"), (r"\p{N}", _GPT2_REGEX)),
}
# llama.cpp adds BOS and takes whole in-vocab pre-tokens (ignore_merges) for these
_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})


def pre_tokenizer(pre: str):
    """The HF `tokenizers` pre-tokenizer of tokenizer.ggml.pre `pre` (a key of _SPLITS): its splits, then
    GPT-2's bytes-to-characters mapping."""
    from tokenizers import Regex, pre_tokenizers as pt

    return pt.Sequence([pt.Split(Regex(r), behavior="isolated") for r in _SPLITS[pre]]
                       + [pt.ByteLevel(add_prefix_space=False, use_regex=False)])


class Gpt2Tokenizer(GgufTokenizer):
    """Byte-level BPE. Raw text goes through an HF `tokenizers` model built from the vocab and
    merges with no added tokens, so special-token text is ordinary text unless fragments() split
    it out first."""
    kind = "gpt2"

    def __init__(self, fields: dict, source: str):
        from tokenizers import Tokenizer as HFTokenizer, models

        pre = self.pre = fields.get(KEY + "pre")
        super().__init__(fields, source, default_add_bos=pre in _LLAMA3_PRE)
        # no silent fallback (llama.cpp's, to "default", tokenizes such a model's text differently from its own)
        if pre is None:
            raise DpllamaError(f"{source}: GGUF has no {KEY}pre, the pre-tokenizer a gpt2 vocabulary needs "
                               f"(supported: {', '.join(sorted(_SPLITS))})")
        if pre not in _SPLITS:
            raise DpllamaError(f"{source}: unsupported {KEY}pre '{pre}' (supported: {', '.join(sorted(_SPLITS))})")
        merges = []
        for m in fields.get(KEY + "merges", ()):
            m = m.decode() if isinstance(m, bytes) else str(m)
            pos = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
            if pos < 0:
                raise DpllamaError(f"{source}: malformed {KEY}merges entry {m!r}")
            merges.append((m[:pos], m[pos + 1:]))
        try:
            model = models.BPE(self.token_to_id, merges, ignore_merges=pre in _LLAMA3_PRE)
        except Exception as e:  # tokenizers raises plain Exception for bad merges
            raise DpllamaError(f"{source}: invalid BPE vocabulary/merges: {e}") from None
        self.hf = HFTokenizer(model)
        self.hf.pre_tokenizer = pre_tokenizer(pre)

    def encode_fragments(self, frags: list) -> list[int]:
        # encode_batch lets go of the interpreter while it works (encode holds it: a server's streams stopped for
        # the length of a long prompt's encoding); TOKENIZERS_PARALLELISM (above) keeps it in this thread
        texts = iter(self.hf.encode_batch([f for f in frags if isinstance(f, str)], add_special_tokens=False))
        ids = []
        for f in frags:
            ids.extend([f] if isinstance(f, int) else next(texts).ids)
        return ids

    def every_byte_encodes(self) -> bool:
        # HF's BPE drops a byte the vocabulary lacks (SmolLM2's: a few ASCII controls, bytes UTF-8 never or
        # seldom starts a character with): a character of several bytes keeps one while its continuation
        # bytes (0x80-0xBF) are all there, so that only `vanishing` ASCII ones go whole
        return all(_UNICODE_OF_BYTE[b] in self.token_to_id for b in range(0x80, 0xC0))

    @cached_property
    def vanishing(self) -> str:
        return "".join(chr(b) for b in range(0x80) if _UNICODE_OF_BYTE[b] not in self.token_to_id)

    def normal_bytes(self, token: int) -> bytes:
        text = self.tokens[token]
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in text)
        except KeyError:  # not a byte-level token after all: keep its text
            return text.encode()


def tokenizer_from_gguf_fields(fields: dict, source: str) -> Tokenizer:
    """Build the tokenizer from GGUF metadata given as {key: value} (str, int, bool, lists)."""
    model = fields.get(KEY + "model")
    if model == "llama":
        return SpmTokenizer(fields, source)
    if model == "gpt2":
        return Gpt2Tokenizer(fields, source)
    if model is None:
        raise DpllamaError(f"{source}: GGUF has no {KEY}model")
    raise DpllamaError(f"{source}: unsupported tokenizer model '{model}' (supported: llama, gpt2)")


def load_gguf_tokenizer(path) -> Tokenizer:
    """The tokenizer of a GGUF model, without its weights (dpllama's header parser, not GGUFReader:
    ~0.1 s instead of ~2.5 s on a 49k vocabulary)."""
    from dpllama.formats.gguf import read_gguf
    fields = {k: v for k, v in read_gguf(path).fields.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf_fields(fields, str(path))
