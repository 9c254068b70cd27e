"""What every tokenizer kind shares: the common interface, score-driven merging (llama2.c and
SentencePiece), streaming decode, and chat-template rendering."""
from __future__ import annotations

import heapq
import json
import numbers
import re
import sys
import time
from datetime import datetime
from functools import cached_property, lru_cache

from dpllama.errors import DpllamaError

# lone surrogates but surrogateescape's U+DC80..U+DCFF, which stand for bytes argv or stdin could not decode
_NOT_BYTES = re.compile("[\ud800-\udc7f\udd00-\udfff]")

# Used when a model has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """Common interface. Subclasses set the attributes and implement encode/token_bytes/decode_piece.

    kind:          "llama2c", "spm" or "gpt2"
    vocab_size:    number of tokens
    bos_id/eos_id: the model's BOS and EOS ids
    eos_ids:       ids that end generation
    add_bos:       whether encode() adds BOS by default
    chat_template: Jinja source from the model, or None
    source:        file the tokenizer came from, for error messages
    """

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    eos_ids: frozenset
    add_bos: bool
    chat_template: str | None = None
    source: str
    decode_skips: frozenset = frozenset()   # ids decode() leaves out (llama2.c's BOS/EOS markers)
    piece_filter = None     # bytes -> bytes: what of a piece a generation's text prints (llama2.c's: run.c's)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False,
               parse_special: bool = False) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for, without context; special tokens give their text."""
        raise NotImplementedError

    def decode_piece(self, prev: int | None, token: int) -> bytes:
        """The bytes to print for `token` when it follows `prev` (None: start of text)."""
        raise NotImplementedError

    def decode(self, ids, special: bool = False) -> str:
        """The text of `ids`, each piece decoded after the one before it. Special tokens (BOS, <|im_start|>) give
        none, or with `special` their text as chat templates spell it (llama-server's /detokenize), which
        encode(parse_special=True) reads back as the token."""
        ids = list(ids)
        for t in ids:       # a negative id would index from the vocabulary's end: another token's text
            if not (isinstance(t, numbers.Integral) and 0 <= t < self.vocab_size):
                raise DpllamaError(f"{self.source}: token id {t!r} is not in the vocabulary of {self.vocab_size}")
        out, prev = [], None
        for t in ids:
            if special and self.unprinted(t):
                out.append(self.special_text(t).encode())
            elif t not in self.decode_skips:
                out.append(self.decode_piece(prev, t))
            prev = t
        return b"".join(out).decode("utf-8", "replace")

    def unprinted(self, token: int) -> bool:
        """Whether decode() gives no text for `token` (a special token's)."""
        return token in self.decode_skips

    def every_byte_encodes(self) -> bool:
        """Whether a character the vocabulary lacks becomes a token a byte (its byte tokens, or <unk>), an error,
        or nothing (`vanishing`), so that no token stands for more text than its own bytes."""
        return True

    vanishing = ""      # characters encode() drops

    @cached_property
    def most_bytes_per_token(self) -> int | None:
        """The most bytes of text one token of encode() stands for; None where nothing bounds it (a run of
        characters the vocabulary lacks as one <unk>)."""
        return max(len(self.token_bytes(t)) for t in range(self.vocab_size)) if self.every_byte_encodes() else None

    def too_long(self, text: str, tokens: int) -> bool:
        """Whether `text` is sure to encode to more than `tokens` tokens, known without encoding it: a character
        that does not vanish is a byte at least, and a token most_bytes_per_token at most. The server refuses
        such a prompt at once; encoding megabytes holds the interpreter, and every stream with it, for seconds to
        minutes."""
        most = self.most_bytes_per_token
        if most is None or len(text) <= tokens * most:
            return False
        return len(text) - sum(map(text.count, self.vanishing)) > tokens * most

    def special_text(self, token: int) -> str:
        """Text of a special token as chat templates spell it (bos_token, eos_token)."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation in the chat template; `kwargs` are extra variables of the template's, as transformers
        takes them (Qwen3's enable_thinking=False)."""
        return render_chat_template(self.chat_template or CHATML_TEMPLATE, messages,
                                    add_generation_prompt, self.special_text(self.bos_id),
                                    self.special_text(self.eos_id), self.source, kwargs)


def utf8(text: str) -> bytes:
    """The UTF-8 bytes of `text` as a tokenizer sees them: the bytes surrogateescape kept, and U+FFFD for any
    other lone surrogate (from the Python API: no UTF-8 can hold one)."""
    return _NOT_BYTES.sub("\ufffd", text).encode("utf-8", "surrogateescape")


def merge_by_score(ids: list, pieces: list, lookup: dict, scores, min_score: float | None = None):
    """Repeatedly merge the adjacent pair whose concatenation is the highest-scoring vocab entry,
    taking the leftmost pair on ties, until no pair is in the vocab. This is both run.c's encode
    loop and llama.cpp's llm_tokenizer_spm; a heap makes it O(n log n) instead of run.c's O(n^2).

    ids[i] may be None for a piece that is not itself in the vocab (SPM). Pairs scoring at or
    below min_score never merge (run.c starts its search at -1e10). Returns (ids, pieces)."""
    n = len(pieces)
    ids, pieces = list(ids), list(pieces)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []

    def push(i):
        j = nxt[i] if i >= 0 else n
        if j >= n:
            return
        m = lookup.get(pieces[i] + pieces[j])
        if m is not None and (min_score is None or scores[m] > min_score):
            # Position i orders ties: nodes keep their original index, so smaller is further left.
            heapq.heappush(heap, (-scores[m], i, j, pieces[i], pieces[j], m))

    for i in range(n - 1):
        push(i)
    while heap:
        _, i, j, left, right, m = heapq.heappop(heap)
        # Skip entries made stale by an earlier merge of either side.
        if not alive[i] or not alive[j] or nxt[i] != j or pieces[i] != left or pieces[j] != right:
            continue
        ids[i], pieces[i] = m, left + right
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        push(prv[i])
        push(i)
    keep = [i for i in range(n) if alive[i]]
    return [ids[i] for i in keep], [pieces[i] for i in keep]


def _complete_utf8_len(buf: bytes) -> int:
    """Length of the prefix of buf that does not end inside an unfinished UTF-8 sequence."""
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for its lead byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return len(buf) - back if back < need else len(buf)
    return len(buf)


class StreamDecoder:
    """Turns generated token ids into text one at a time, holding back bytes of a UTF-8 character
    that is not complete yet. Pass prev = the last prompt token so context-dependent pieces come
    out right (llama2.c and SentencePiece drop the leading space of the piece after BOS).
    `piece_filter` (bytes -> bytes) sees every piece first, e.g. run.c's printable_piece."""

    def __init__(self, tokenizer: Tokenizer, prev: int | None = None, piece_filter=None):
        self.tokenizer = tokenizer
        self.prev = prev
        self.pending = b""
        self.piece_filter = piece_filter    # bytes -> bytes, e.g. run.c's printable_piece

    def push(self, token: int) -> str:
        piece = self.tokenizer.decode_piece(self.prev, token)
        self.pending += self.piece_filter(piece) if self.piece_filter else piece
        self.prev = token
        n = _complete_utf8_len(self.pending)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out.decode("utf-8", "replace")

    def flush(self) -> str:
        out, self.pending = self.pending, b""
        return out.decode("utf-8", "replace")


def _raise_exception(message):
    raise DpllamaError(message)


# The variables a chat template gets from dpllama, which extra ones (--chat-template-kwargs, a request's
# chat_template_kwargs) may not replace: another `messages` would render another conversation than the one sent,
# and the prompt relies on the rest (the template writes BOS, and ends where the reply begins). llama.cpp lets the
# extra one win without a word, so that a slip renders a prompt nobody asked for; a refusal says what is wrong.
TEMPLATE_OWN = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def check_template_kwargs(kwargs: dict) -> dict:
    """`kwargs`, extra variables for a chat template, unless one is the template's own (a DpllamaError)."""
    own = [name for name in TEMPLATE_OWN if name in kwargs]
    if own:
        raise DpllamaError(f"{own[0]} is the chat template's own variable, which dpllama sets")
    return kwargs


# A model's chat template is anybody's code, bounded like its other metadata: in time (a loop without end, loops
# nested past any conversation's need) and in the size of what one `*` or `**` makes ('ab' * 10**9 took 2 GB)
RENDER_SECONDS = 10.0       # every model's template renders a conversation in milliseconds, 90,000 messages in ~2 s
TEMPLATE_ITEMS = 1 << 22    # the most characters or items (or bits of an integer) one `*` or `**` may make


class TemplateTimeout(Exception):
    pass


@lru_cache(maxsize=1)
def _environment():
    """The sandbox chat templates render in (transformers': trim_blocks/lstrip_blocks, raise_exception/strftime_now,
    tojson keeping non-ASCII), with the bounds above on `*` and `**`."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            ints = [isinstance(v, int) for v in (left, right)]
            if operator == "*" and any(ints):
                seq = right if ints[0] else left
                count = left if ints[0] else right
                size = len(seq) * count if isinstance(seq, (str, list, tuple)) else 0
            else:       # **: an integer power's bits
                size = left.bit_length() * right if all(ints) and right > 0 else 0
            if size > TEMPLATE_ITEMS:
                raise SecurityError(f"{operator} would make {size} items (or bits), over {TEMPLATE_ITEMS}")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=8)
def _compiled(template: str):
    """A template compiled once, not at every turn of a chat (Qwen3's: ~10 ms)."""
    return _environment().from_string(template)


def _deadline(seconds: float):
    """A trace function that raises TemplateTimeout on a line of a template's code `seconds` from now (its frames
    only: Jinja compiles a template into Python code named "<template>"), looking at the clock every 1,024 lines."""
    end, lines = time.monotonic() + seconds, [0]

    def line(frame, event, arg):
        lines[0] += 1
        if not lines[0] & 1023 and time.monotonic() > end:
            raise TemplateTimeout
        return line
    return lambda frame, event, arg: line if frame.f_code.co_filename == "<template>" else None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         bos_token: str, eos_token: str, source: str, kwargs: dict | None = None) -> str:
    """Render a Hugging Face-style chat template the way transformers does (_environment), with `kwargs` as extra
    variables, within RENDER_SECONDS."""
    import jinja2

    kwargs = check_template_kwargs(kwargs or {})
    previous = sys.gettrace()
    try:
        compiled = _compiled(template)
        sys.settrace(_deadline(RENDER_SECONDS))
        return compiled.render(**kwargs, messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except TemplateTimeout:
        raise DpllamaError(f"{source}: chat template error: it ran over {RENDER_SECONDS:g} s (a loop without end?)") \
            from None
    except DpllamaError as e:
        raise DpllamaError(f"{source}: chat template refused the messages: {e}") from None
    except jinja2.TemplateError as e:
        raise DpllamaError(f"{source}: chat template error: {e}") from None
    except Exception as e:      # what its expressions raise: {{ 1/0 }}, {{ "a" + 1 }}, a range past the sandbox's
        raise DpllamaError(f"{source}: chat template error: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
