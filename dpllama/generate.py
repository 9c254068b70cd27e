"""Token generation: sampling and the token loop, streaming text as it comes.

Tokens are chosen on the device where the sampler allows (sampling.cl's draw: greedy, or a temperature with top-k
and top-p, after llama.cpp's repetition, presence and frequency penalties over up to PENALTY_WINDOW latest tokens; the
coin drawn on the host with llama2.c's xorshift generator, so a `seed` reproduces a run): the token goes into the
device's token buffer and only its id is read back, so the next step is enqueued before it is read. Log-probabilities
and penalties over a longer window (or the whole history) read the logits back (vocab x 4 bytes) and draw on the
host (Sampler.pick: Sampler.penalize, then run.c's sample_topp with a top-k, of which the device's draw is the twin);
so does JSON mode (dpllama.constrain), whose tokens must continue the JSON.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from dpllama.errors import DpllamaError
from dpllama.model.llama import PENALTY_WINDOW, Llama, Part, Pending, not_finite
from dpllama.model.weights import F32_MAX, F32_TINY, ModelConfig

if TYPE_CHECKING:
    from dpllama.constrain import JsonMode


def whole(x) -> bool:
    """An integer, NumPy's too, and not a bool (which Python counts as one)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def real(x) -> bool:
    """A real number, NumPy's too, and not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class XorShift:
    """llama2.c run.c's random_u32 / random_f32 (xorshift64*), seed for seed."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF or 1

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & 0xFFFFFFFFFFFFFFFF
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF) >> 32

    def f32(self) -> float:
        return (self.u32() >> 8) / 16777216.0


@dataclass
class Sampler:
    temperature: float = 1.0    # 0: greedy
    top_p: float = 0.9          # nucleus; 0 or >= 1 turns it off (llama2.c's -p)
    top_k: int = 0              # 0: off
    repeat_penalty: float = 1.0  # > 1 discourages tokens among the last `repeat_last_n`
    repeat_last_n: int = 64     # 0: off, -1: the whole history
    seed: int = 0
    presence_penalty: float = 0.0   # OpenAI's: subtracted once from each token in the window
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per occurrence in the window

    def __post_init__(self):
        # the CLI and the Python API both come through here, before a model loads; each test is written so
        # that NaN, which compares false with everything, fails it
        for name, kind in (("temperature", real), ("top_p", real), ("top_k", whole), ("repeat_penalty", real),
                           ("repeat_last_n", whole), ("seed", whole), ("presence_penalty", real),
                           ("frequency_penalty", real)):
            value = getattr(self, name)
            if not kind(value):     # "0", None or 2.5 raised TypeErrors further on, or went to the device as a window
                raise DpllamaError(f"sampling: {name.replace('_', '-')} must be "
                                   f"{'a whole number' if kind is whole else 'a number'}, found {value!r}")
        # the device samples in float32: a number past its largest would be infinite there
        for ok, rule, value in ((0 <= self.temperature <= F32_MAX, f"temperature must be >= 0 and at most "
                                 f"{F32_MAX:.4g} (float32's largest)", self.temperature),
                                (0 <= self.top_p <= 1, "top-p must be between 0 and 1", self.top_p),
                                (self.top_k >= 0, "top-k must be >= 0", self.top_k),
                                (0 < self.repeat_penalty <= F32_MAX, f"repeat-penalty must be > 0 and at most "
                                 f"{F32_MAX:.4g} (float32's largest)", self.repeat_penalty),
                                (self.repeat_last_n >= -1, "repeat-last-n must be >= -1", self.repeat_last_n),
                                (-2 <= self.presence_penalty <= 2, "presence penalty must be between -2 and 2",
                                 self.presence_penalty),
                                (-2 <= self.frequency_penalty <= 2, "frequency penalty must be between -2 and 2",
                                 self.frequency_penalty)):
            if not ok:
                raise DpllamaError(f"sampling: {rule}, found {value}")
        if 0 < self.top_p < F32_TINY:   # 0 in float32, the device's "off": the least cut keeps the top token alone
            self.top_p = F32_TINY
        if np.float32(self.temperature) == 0:   # greedy on the device, where the host divided the logits by its
            self.temperature = 0.0              # float32 0 (NaN): 1e-300 drew the same token every time
        self.rng = XorShift(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def window(self) -> int:
        """How many of the latest tokens the penalties count: 0 without a penalty, -1 for the whole history."""
        return self.repeat_last_n if self.penalized else 0

    @property
    def on_device(self) -> bool:
        """Whether the device can draw this sampler's tokens (sampling.cl): greedy, or a temperature with top-k and
        top-p, after penalties over at most PENALTY_WINDOW tokens (more, or the whole history, draw on the host)."""
        return 0 <= self.window <= PENALTY_WINDOW

    def draw(self) -> tuple[float, float, float, int, float, float, float, int]:
        """The device's draw of the next token: (temperature, top_p, coin, top_k, repeat penalty, presence penalty,
        frequency penalty, window), temperature 0 for the argmax (top-k 1 too), top_p 0 and top_k 0 for none, window 0
        for no penalty. Draws the coin, as `pick` would for this token."""
        penalties = (self.repeat_penalty, self.presence_penalty, self.frequency_penalty, self.window)
        if self.greedy or self.top_k == 1:
            return 0.0, 0.0, 0.0, 0, *penalties
        return self.temperature, self.top_p if 0.0 < self.top_p < 1.0 else 0.0, self.rng.f32(), self.top_k, *penalties

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """llama.cpp's penalties over the last repeat_last_n tokens (-1: all, as llama.cpp), sampling.cl's penalize
        operation for operation: in the window's order, a token's logit at its first occurrence is divided by the
        repetition penalty where positive (multiplied where not), less the presence penalty; at every occurrence, less
        the frequency penalty. In float32, each operation rounded, as the device does, the quotient or product held to
        the finite floats (a penalty of 1e-38 makes a logit of 4 overflow, and the infinity the draw's NaN)."""
        if not self.window or not history:
            return logits
        window = history if self.window < 0 else history[-self.window:]
        logits = logits.copy()
        rp, pp, fp = np.float32(self.repeat_penalty), np.float32(self.presence_penalty), np.float32(self.frequency_penalty)
        seen = set()
        for t in window:
            v = logits[t]
            if t not in seen:
                seen.add(t)
                with np.errstate(over="ignore", divide="ignore"):     # a penalty below float32's least: 0
                    v = (min(v / rp, F32_MAX) if v > 0 else max(v * rp, -F32_MAX)) - pp
            logits[t] = v - fp
        return logits

    def pick(self, logits: np.ndarray, history: list[int], json: JsonMode | None = None) -> int:
        """The next token. In JSON mode one that cannot continue the JSON is drawn again, with a new coin, from the
        same logits less every token that cannot (llama.cpp's grammar sampling: checking the token drawn costs
        microseconds, the mask milliseconds); greedy, the likeliest token that can."""
        logits = self.penalize(logits, history)
        token = self.choose(logits)
        if json is None or json.fits(token):
            return token
        allowed = json.allowed()
        if not allowed.any():
            raise DpllamaError("JSON mode: no token of the vocabulary continues the JSON")
        return self.choose(np.where(allowed, logits, -np.inf))

    def choose(self, logits: np.ndarray) -> int:
        """The argmax of `logits`, or a draw from their softmax at the temperature (sample)."""
        if self.greedy:
            return int(np.argmax(logits))
        with np.errstate(over="ignore"):   # penalized logits may lie F32_MAX apart: their gap is -inf, e^-inf 0
            z = np.exp((logits - logits.max()) / self.temperature)
        return self.sample(z / z.sum())

    def sample(self, probs: np.ndarray) -> int:
        """Draw from probabilities, cut to the top k (ties: the lower index first) and to the top-p nucleus (run.c's
        sample_topp), in descending order of probability; without either, every token in index order."""
        coin = self.rng.f32()
        n = probs.shape[0]
        order = None
        if self.top_k and self.top_k < n:
            least = np.partition(probs, n - self.top_k)[n - self.top_k]     # the k-th largest
            above = np.flatnonzero(probs > least)
            order = np.union1d(above, np.flatnonzero(probs == least)[:self.top_k - len(above)])
            order = order[np.argsort(-probs[order], kind="stable")]
        if 0.0 < self.top_p < 1.0:
            # tokens below it cannot be in the nucleus (run.c's shortcut), but the most likely one always is
            # (run.c reads out of bounds when nothing passes: a top-p below 1 / vocab on flat probabilities)
            cutoff = min((1.0 - self.top_p) / max(n - 1, 1), float(probs.max()))
            if order is None:
                cand = np.nonzero(probs >= cutoff)[0]
                order = cand[np.argsort(-probs[cand], kind="stable")]
            else:                   # the top k's, in descending order already
                order = order[probs[order] >= cutoff]
            cum = np.cumsum(probs[order])
            last = int(np.searchsorted(cum, self.top_p, side="right"))
            order = order[:min(last + 1, len(order))]
        if order is None:
            order = np.arange(n)
        p = probs[order]
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, coin * cdf[-1], side="right"))
        return int(order[min(i, len(order) - 1)])


def reusable(cached: list[int], prompt: list[int]) -> int:
    """How many of `prompt`'s first tokens a KV cache holding `cached` serves (`generate`'s keep): their common
    prefix, short of the prompt's last token, which must be fed for its logits."""
    keep = 0
    while keep < min(len(cached), len(prompt) - 1) and cached[keep] == prompt[keep]:
        keep += 1
    return keep




def check_sampler(sampler) -> Sampler:
    if not isinstance(sampler, Sampler):
        raise DpllamaError(f"sampler must be a dpllama.generate.Sampler, found {type(sampler).__name__}")
    return sampler


def check_steps(steps: int, name: str = "steps") -> int:
    """`steps` (positions to run, as llama2.c's -n) unless it is negative; `name` is how the user gave it."""
    if not whole(steps):
        raise DpllamaError(f"{name} must be a whole number, found {steps!r}")
    if steps < 0:
        raise DpllamaError(f"{name} must be >= 0, found {steps}")
    return steps


def check_reach(steps: int, prompt_tokens: int, name: str = "steps") -> None:
    """`steps` positions (llama2.c's -n: the prompt's count) must reach the prompt's last one, whose logits give the
    first new token: fewer would end inside the prompt, generating nothing (run.c prints the prompt's start then)."""
    if steps < prompt_tokens:
        raise DpllamaError(f"{name} {steps} ends inside the prompt of {prompt_tokens} tokens, so nothing would be "
                           f"generated: {name} counts the prompt's positions too, as llama2.c's -n does; give at least "
                           f"{prompt_tokens}")


@dataclass
class Stats:
    """Timings of one generation (time.perf_counter seconds): the prompt runs from `start` until the first
    new token, as llama.cpp counts it; decoding from then until `end`."""
    prompt_tokens: int              # fed in this generation (a reused prefix not counted)
    generated_tokens: int = 0       # a stop token included
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    end: float | None = None

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / max((self.first_token or self.end) - self.start, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, per second (0 with fewer than two)."""
        n = self.generated_tokens - 1
        return n / max(self.end - self.first_token, 1e-9) if n > 0 else 0.0


class Generation:
    """The new tokens after `prompt`, as they come: at most `max_new`, fewer where the context ends (the last
    one may sit at position seq_len: produced, never fed). A token in `stop` ends it without being yielded
    (`stop_token` says which). The prompt goes through in batched chunks; its first `keep` positions'
    KV cache is reused from the previous generation (a chat's earlier turns). Greedy sampling without a
    penalty never leaves the device, and each token is fed before the host has even seen it.
    `stats` holds the timings, `tokens` the sequence so far (the stop token included). With `keep_logits`,
    every token is drawn on the host from logits read back, and `logits` holds those the last token came from
    (for its log-probabilities). With `json` (JSON mode), every token is drawn on the host too, each one continuing
    the JSON, and the token that closes the object is the last (`stopped` then says so, as after a stop token).

    Drive it one way: iterate over it (the model's selected sequence alone, through the token loop's primitives),
    or pass it with others to a `Batcher`, which runs the passes of several at once (Llama.enqueue_batch; the
    server's engine). A sequence runs one generation at a time: one started on it since (in this thread or
    another) makes this one's next step a DpllamaError, where their tokens would have mixed in one KV cache."""

    def __init__(self, model: Llama, prompt: list[int], max_new: int, sampler: Sampler,
                 stop: set[int] = frozenset(), keep: int = 0, chunk: int = 0, keep_logits: bool = False,
                 json: JsonMode | None = None):
        with model.lock:
            model.start(prompt, keep)       # checks the prompt before anything runs
            self.seq = model.seq
            self.seq.owner = self
        self.model, self.sampler, self.stop, self.chunk = model, sampler, stop, chunk
        self.slot = self.seq.slot
        self.max_new = max(0, min(max_new, model.seq_len - len(prompt) + 1))
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.stop_token: int | None = None
        self.stats = Stats(len(prompt) - keep)
        self.keep_logits = keep_logits
        self.logits: np.ndarray | None = None
        self.fed = keep                 # tokens whose forward pass has been enqueued (batched driving)
        self.ahead = 0                  # new tokens chosen on the device by enqueued passes, not yet taken (batched)
        self.json = json
        self.on_device = sampler.on_device and not keep_logits and json is None
        self.ended = False
        if not self.max_new:
            self._end()

    def __iter__(self) -> Iterator[int]:
        model = self.model
        if self.ended:
            return
        try:
            with self._holding():
                n = len(self.tokens) - self.fed
                while 0 < self.chunk < n:
                    model.feed(self.chunk)
                    model.next_given()  # on to the prompt's next token, where feed(n) would have gone on itself
                    n -= self.chunk
                model.feed(n)
            first = True
            while True:
                with self._holding():
                    if not (first or self.on_device):
                        model.step()
                    first = False
                    more = self.stats.generated_tokens + 1 < self.max_new
                    if self.on_device:
                        tok = model.next_chosen(self.sampler.draw(), ahead=more)
                    else:
                        tok = self._draw(model.read_logits())
                        model.next_given(tok)
                if not self._took(tok):
                    return
                yield tok
                if not more or self.ended:
                    return
        finally:
            self._end()

    @contextlib.contextmanager
    def _holding(self):
        """The model's lock, for steps of this generation's, which must still own the selected sequence: between
        two of them another thread's may not step, and another generation started on it is this one's end."""
        with self.model.lock:
            if self.model.seq is not self.seq or self.seq.owner is not self:
                raise DpllamaError("another generation was started on this sequence (slot "
                                   f"{self.slot}) since this one was: a sequence runs one at a time (read one to its "
                                   "end or close it before the next; threads: a model each)")
            yield

    # ---- batched driving (Batcher) ----
    def part(self, room: int, chosen: int | None) -> Part | None:
        """What this generation feeds in the next batched pass, at most `room` tokens: the next piece of its
        prompt, or its newest token; that one from the device when a pass in flight chose it there (as its
        wanted row `chosen`). None once it has ended, once its last token is chosen, or without room."""
        if self.ended or room <= 0:
            return None
        window = self.sampler.window if self.on_device else 0
        if self.ahead:
            if self.stats.generated_tokens + self.ahead >= self.max_new:
                return None
            return Part(self.slot, self.fed, [-1 - chosen], logits=True, draw=self.sampler.draw(),
                        history=tuple(self.tokens[max(len(self.tokens) - window, 0):]) if window else ())
        todo = self.tokens[self.fed:self.fed + room]
        end = self.fed + len(todo)
        logits = end == len(self.tokens)
        return Part(self.slot, self.fed, todo, logits, self.sampler.draw() if logits and self.on_device else None,
                    tuple(self.tokens[max(end - 1 - window, 0):end - 1]) if logits and window else ())

    def enqueued(self, part: Part) -> None:
        self.fed += len(part.tokens)
        self.ahead += part.logits and part.draw is not None

    @property
    def prompted(self) -> bool:
        """Whether its whole prompt has been fed, or its pass enqueued (it is decoding)."""
        return self.fed >= self.prompt_len

    def took(self, part: Part, result: int | np.ndarray | None) -> int | None:
        """The pass that fed `part` has run; `result`: what came back for its last token (when the part wanted
        logits): the token chosen on the device, or the logits. Returns the new token, None after a piece of the
        prompt, after a stop token (then `ended`) or once it has ended; `ended` also turns true with the last
        token max_new allows, or the one that closes the JSON, which is returned."""
        if part.logits and part.draw is not None:
            self.ahead -= 1
        if result is None or self.ended:        # a prompt piece; or a pass enqueued before a stop token was seen
            return None
        try:
            if part.draw is not None:
                if result < 0:                  # choose_rows' mark for logits that are not all finite
                    raise DpllamaError(not_finite(part.pos + len(part.tokens) - 1))
                tok = result
            else:
                if not np.isfinite(result).all():
                    raise DpllamaError(not_finite(part.pos + len(part.tokens) - 1))
                tok = self._draw(result)
            if not self._took(tok):
                return None
            if self.stats.generated_tokens == self.max_new:
                self._end()
            return tok
        except DpllamaError:
            self._end()
            raise

    # ---- shared by both ----
    @property
    def stopped(self) -> bool:
        """Whether it ended of itself (a stop token; in JSON mode, the object closed), not at max_new or the
        context's end."""
        return self.stop_token is not None or self.json is not None and self.json.done

    def _draw(self, logits: np.ndarray) -> int:
        if self.keep_logits:
            self.logits = logits
        return self.sampler.pick(logits, self.tokens, self.json)

    def _took(self, tok: int) -> bool:
        """Count a new token; False when it is a stop token (which ends the generation, unyielded). The token that
        closes the JSON ends it too, yielded."""
        st = self.stats
        if st.first_token is None:
            st.first_token = time.perf_counter()
        st.generated_tokens += 1
        self.tokens.append(tok)
        if tok in self.stop:
            self.stop_token = tok
            self._end()
            return False
        if self.json is not None:
            self.json.take(tok)
            if self.json.done:
                self._end()
        return True

    def _end(self) -> None:
        self.ended = True
        if self.stats.end is None:
            self.stats.end = time.perf_counter()


def positions_per_row(c: ModelConfig) -> float:
    """Positions of attention that cost a row about what the matrices cost it: the matrices' multiply-adds a row
    over attention's a position (scores and values, every query head), over 3, as attention's float multiply-adds
    run ~3 times slower than the matrices' integer ones (SmolLM2: 3,072 / 3 = 1,024; a 2,048-token prompt, whose
    attention took 1.0 of its 2.3 s on a 2-vCPU Xeon, gives ~1,300)."""
    matrices = c.dim * (c.n_heads * c.head_dim + 2 * c.kv_dim) + c.n_heads * c.head_dim * c.dim + 3 * c.dim * c.hidden_dim
    return matrices / (2 * c.n_heads * c.head_dim) / 3


def rows_cost(P: float, rows: int, first: int) -> float:
    """What `rows` rows at positions first, first + 1, ... cost a pass, in rows at position 0 (P:
    positions_per_row)."""
    return rows + rows * (first + (rows - 1) / 2) / P


def piece_rows(P: float, cost: float, first: int) -> int:
    """The most rows from position `first` that cost at most `cost` (rows_cost), at least one. Where a prompt's
    piece goes beside decoding sequences, so that their next token waits for about a pass of position-0 rows
    however far the prompt is: 256 rows at position 7,000 took SmolLM2's pass from ~0.2 to ~3 s, each a pause in
    every stream beside it."""
    a, b = 1 / (2 * P), 1 + (first - 0.5) / P      # rows_cost = a r^2 + b r
    return max(1, int((-b + math.sqrt(b * b + 4 * a * max(cost, 0))) / (2 * a)))


class Batcher:
    """Runs generations of `model`, each in its own slot, in batched forward passes (Llama.enqueue_batch), as the
    server's engine does: each pass holds the newest token of each decoding generation, then pieces of the prompts
    still being read, the earliest given first, in the room left of the pass's `model.chunk` rows; beside decoding
    rows, pieces that cost at most what a pass of `model.chunk` rows at position 0 costs (piece_rows). The tokens of a
    generation whose sampler the device can draw for (Sampler.on_device: greedy, or a temperature with top-k and
    top-p) are chosen on the device and fed from there, so the next pass is enqueued before the host has read this
    one's tokens, and the device never waits on the host; a pass with a token drawn on the host (penalties,
    log-probabilities, JSON mode) is waited for before the next is made. A generation that has just drawn a stop
    token may then still get one more row, whose result is dropped (its cost: a row)."""

    def __init__(self, model: Llama):
        self.model = model
        self.positions_per_row = positions_per_row(model.config)
        self.in_flight: tuple[list[tuple[Generation, Part]], Pending] | None = None

    @property
    def idle(self) -> bool:
        """No pass is in flight."""
        return self.in_flight is None

    def step(self, gens: list[Generation]) -> list[tuple[Generation, int | None | DpllamaError]]:
        """Enqueue the next pass for `gens`, then collect the pass before it. Returns each generation that had a
        part in that one and had not ended before, with its new token (None: a prompt piece went through, or a stop
        token ended it) or the error that ended it (logits that are not finite). [] with nothing in flight. A pass
        that cannot be made (Llama.enqueue_batch's DpllamaError) raises, after the one in flight is collected."""
        out = []
        if self.in_flight and not all(p.draw is not None for _, p in self.in_flight[0] if p.logits):
            out = self._collect()       # a token drawn on the host comes before its generation's next part
        chosen = {}
        if self.in_flight:              # the rows of the pass in flight whose tokens the device chose
            chosen = {id(g): i for i, g in enumerate(g for g, p in self.in_flight[0] if p.logits)}
        room, parts = self.model.chunk, []
        cost, P = room, self.positions_per_row  # what the pass may cost beside decoding rows (piece_rows)
        decoding = False                        # a decoding row is in the pass
        for gen in sorted(gens, key=lambda g: not g.prompted):     # a stable sort: otherwise in the given order
            rows = min(room, piece_rows(P, cost, gen.fed)) if decoding and not gen.prompted else room
            part = gen.part(rows, chosen.get(id(gen)))
            if part is not None:
                parts.append((gen, part))
                room -= len(part.tokens)
                cost -= rows_cost(P, len(part.tokens), part.pos)
                decoding |= gen.prompted
        pending = None
        if parts:
            try:
                pending = self.model.enqueue_batch([p for _, p in parts])
            except DpllamaError:
                self._collect()
                raise
            for gen, part in parts:
                gen.enqueued(part)
        out += self._collect()
        if pending:
            self.in_flight = (parts, pending)
        return out

    def _collect(self) -> list[tuple[Generation, int | None | DpllamaError]]:
        if self.in_flight is None:
            return []
        parts, pending = self.in_flight
        self.in_flight = None
        results = iter(pending.wait())
        out = []
        for gen, part in parts:
            ended = gen.ended
            try:
                token = gen.took(part, next(results) if part.logits else None)
            except DpllamaError as e:
                out.append((gen, e))
                continue
            if not ended:
                out.append((gen, token))
        return out


def generate(model: Llama, prompt: list[int], max_new: int, sampler: Sampler, stop: set[int] = frozenset(),
             keep: int = 0, chunk: int = 0, keep_logits: bool = False, json: JsonMode | None = None) -> Generation:
    """The one way tokens are generated: see Generation."""
    return Generation(model, prompt, max_new, sampler, stop, keep, chunk, keep_logits, json)


def new_tokens(steps: int, prompt_len: int) -> int:
    """New tokens in `steps` positions after a prompt of prompt_len, as llama2.c's -n counts positions: position
    pos consumes token pos and produces token pos + 1."""
    return steps - prompt_len + 1
