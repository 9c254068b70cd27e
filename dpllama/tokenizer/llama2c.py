"""llama2.c's tokenizer (`tokenizer.bin`), reproducing upstream run.c's encode/decode exactly.

File format: int32 max_token_length, then per token: float32 score, int32 length, the bytes.
Ids 0/1/2 are <unk>, BOS ("\\n<s>\\n"), EOS ("\\n</s>\\n"); ids 3..258 are the byte tokens <0x00>..<0xFF>.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

from dpllama.errors import DpllamaError
from dpllama.fileio import check_input
from dpllama.tokenizer.base import Tokenizer, merge_by_score, utf8
from dpllama.tokenizer.gguf import BYTE, CONTROL, NORMAL, UNKNOWN

UNK, BOS, EOS = 0, 1, 2
# run.c recognises byte tokens with sscanf(piece, "<0x%02hhX>"), which matches this prefix.
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")
# C-locale isprint() || isspace()
_PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(b" \t\n\v\f\r")


def _read_vocab(path: Path, vocab_size: int | None) -> tuple[list[bytes], list[float]]:
    check_input(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DpllamaError(f"{path}: cannot read tokenizer: {e.strerror}") from None
    except ValueError as e:     # a NUL in the path, from the Python API
        raise DpllamaError(f"{str(path)!r}: cannot read tokenizer: {e}") from None
    if len(data) < 4:
        raise DpllamaError(f"{path}: truncated tokenizer file: {len(data)} bytes, no header")
    pieces, scores = [], []
    off = 4
    while off + 8 <= len(data):
        score, n = struct.unpack_from("<fi", data, off)
        if n < 0 or off + 8 + n > len(data):
            break
        pieces.append(data[off + 8:off + 8 + n])
        scores.append(score)
        off += 8 + n
    k, stray = len(pieces), max(0, len(data) - off)
    if vocab_size is not None and k < vocab_size:
        raise DpllamaError(f"{path}: truncated tokenizer file: expected {vocab_size} tokens, found {k}")
    if vocab_size is not None and k > vocab_size:
        raise DpllamaError(f"{path}: tokenizer has {k} tokens but the model's vocab_size is "
                           f"{vocab_size}: wrong tokenizer for this model")
    if stray:
        raise DpllamaError(f"{path}: corrupt tokenizer file: {stray} stray bytes after {k} tokens")
    if k < 3:
        raise DpllamaError(f"{path}: a llama2.c tokenizer has at least 3 tokens (<unk>, BOS, EOS), found {k}")
    return pieces, scores


def printable_piece(piece: bytes) -> bytes:
    """What run.c's safe_printf writes for a piece: printf("%s") stops at NUL, and a lone byte
    that is neither printable nor whitespace (control bytes, bytes >= 0x80) is dropped."""
    piece = piece.split(b"\0", 1)[0]
    if len(piece) == 1 and piece[0] not in _PRINTABLE:
        return b""
    return piece


class Llama2cTokenizer(Tokenizer):
    kind = "llama2c"
    decode_skips = frozenset({BOS, EOS})    # decode() gives the text as run.c prints it, without the markers
    piece_filter = staticmethod(printable_piece)    # a lone control byte is dropped

    def __init__(self, path, vocab_size: int | None = None):
        path = Path(path)
        self.source = str(path)
        self.pieces, self.scores = _read_vocab(path, vocab_size)
        self.vocab_size = len(self.pieces)
        # run.c bsearches a sorted copy; the vocabularies have no duplicate pieces, so a dict
        # (first occurrence wins) finds the same ids.
        self.lookup = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)
        # byte fallback: run.c emits byte + 3, which is the <0xXX> token in every vocabulary trained with
        # sentencepiece's byte_fallback; a vocabulary without byte tokens (run.c would index past its end)
        # gets <unk> for the character instead, as sentencepiece gives it without byte_fallback
        self.byte_ids = {b: i for b in range(256) if (i := self.lookup.get(b"<0x%02X>" % b)) is not None}
        self.bos_id, self.eos_id = BOS, EOS
        # run.c stops generating when the model samples BOS, not EOS (stories models end a
        # story with BOS).
        self.eos_ids = frozenset({BOS})
        self.add_bos = True
        self.chat_template = None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False,
               parse_special: bool = False) -> list[int]:
        """run.c encode(). parse_special is accepted for interface parity; run.c has no
        special-token syntax."""
        raw = utf8(text)
        ids = [BOS] if (self.add_bos if bos is None else bos) else []
        if raw:
            # sentencepiece's add_dummy_prefix, as run.c does it: a separate " " token that
            # the merges below join to the first word.
            space = self.lookup.get(b" ")
            if space is None:
                raise DpllamaError(f"{self.source}: vocabulary has no ' ' token, needed to encode text")
            ids.append(space)
        i = 0
        while i < len(raw):
            # A lead byte plus its continuation bytes, at most 4 bytes, exactly as run.c groups them.
            j = i + 1
            while j < len(raw) and raw[j] & 0xC0 == 0x80 and j - i < 4:
                j += 1
            tok = self.lookup.get(raw[i:j])
            if tok is not None:
                ids.append(tok)
            elif all(b in self.byte_ids for b in raw[i:j]):
                ids.extend(self.byte_ids[b] for b in raw[i:j])
            elif ids[-1] != UNK:            # sentencepiece: a run of unknown characters is one <unk>
                ids.append(UNK)
            i = j
        # BOS takes part in the merge loop in run.c too (it never merges in practice).
        ids, _ = merge_by_score(ids, [self.pieces[t] for t in ids], self.lookup, self.scores,
                                min_score=-1e10)
        if eos:
            ids.append(EOS)
        return ids

    def decode_piece(self, prev: int | None, token: int) -> bytes:
        """run.c decode(): strip the leading space of the piece after BOS; byte tokens give the byte."""
        piece = self.pieces[token]
        if prev == BOS and piece[:1] == b" ":
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def token_bytes(self, token: int) -> bytes:
        return self.decode_piece(None, token)

    def every_byte_encodes(self) -> bool:
        return len(self.byte_ids) == 256    # else a run of characters the vocabulary lacks is one <unk>

    def special_text(self, token: int) -> str:
        return self.pieces[token].decode("utf-8", "replace").strip()

    def gguf_fields(self) -> dict:
        """This vocabulary as GGUF `tokenizer.*` fields (llama.cpp's SentencePiece kind, spaces as
        "▁"), for dpllama's quantized container; SpmTokenizer encodes them to the same ids."""
        types = [UNKNOWN if i == UNK else CONTROL if i in (BOS, EOS)
                 else BYTE if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", p) else NORMAL for i, p in enumerate(self.pieces)]
        try:
            tokens = [p.decode("utf-8").replace(" ", "\u2581") for p in self.pieces]
        except UnicodeDecodeError as e:
            raise DpllamaError(f"{self.source}: a token is not valid UTF-8 ({e.reason}); "
                               "GGUF cannot store this vocabulary") from None
        return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [float(s) for s in self.scores], "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.eos_token_id": EOS,
                "tokenizer.ggml.unknown_token_id": UNK, "tokenizer.ggml.add_bos_token": True}
