"""The engine behind `dpllama serve`: a bounded wait queue, the model's slots, and one scheduler thread.

The scheduler thread loads the model and is then the only thread that touches the device. Each round it
admits waiting requests into free slots (each slot a sequence of the model with its own KV cache and
positions: the context is per slot) and runs one batched forward pass (`Llama.batch`) for all running
requests: every decoding request's newest token, then, in the room left of the pass's rows (`--batch-size`,
Llama's `chunk`), the next pieces of the prompts still being read, oldest request first. Each weight is read and decoded once
per pass for all of them, and a new prompt is read in pieces between the decode steps of the running
streams, which never stall for more than a pass. A new request goes to the free slot whose KV cache it gains
most from and loses least of (llama-server's cache_prompt). Every request is a `Generation` (dpllama.generate, the one
generation contract) with its own sampler, and the passes are a dpllama.generate.Batcher's: greedy requests' tokens
are chosen on the device, and each round enqueues the next pass before it reads the tokens of the one before, so
the host's work (text, events, admissions) runs while the device computes.

Results do not depend on load: a row's arithmetic is the same whichever rows share its pass (the matrix
kernels treat rows independently, attention reads only the row's own slot), and a request's sampler is
its own.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dpllama.constrain import Grammar, JsonMode
from dpllama.errors import DpllamaError
from dpllama.generate import Batcher, Generation, Sampler, generate, reusable
from dpllama.llm import LLM, text_decoder
from dpllama.serve.metrics import Metrics
from dpllama.tokenizer import Tokenizer


class Busy(Exception):
    """The wait queue is full (HTTP 429)."""


class Unavailable(Exception):
    """The engine is loading or shutting down (HTTP 503)."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]    # the most likely tokens and their log-probabilities


@dataclass
class Piece:
    """Text that is safe to send (no stop string can start in it), and the log-probabilities of the tokens
    whose text it completes, when asked for."""
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Done:
    finish_reason: str          # stop, length, cancelled
    prompt_tokens: int
    completion_tokens: int      # every token the model produced, an end-of-text token included
    cached_tokens: int = 0      # of the prompt's, those whose KV cache a slot held from its previous request


@dataclass
class Failed:
    message: str


@dataclass
class Request:
    """One generation: made in the server's event loop, whose queue `events` receives its Pieces, then a Done or
    a Failed."""
    prompt: list[int]
    max_new: int
    sampler: Sampler
    stops: tuple[str, ...] = ()
    logprobs: int | None = None     # alternatives per token (0: the chosen one's only); None: no log-probabilities
    json: Grammar | None = None     # JSON mode: the reply is one JSON document the grammar admits
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def emit(self, event) -> None:
        """From the scheduler thread into the request's event loop (gone once the server has stopped)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class StopMatch:
    """One stop string's matcher (Knuth-Morris-Pratt): fed the text a character at a time, `k` is how many of the
    stop's first characters the text ends with, in constant time a character amortized. Comparing each new text's
    end with every prefix of the stop cost its length squared a token: seconds a stream, in the thread that
    serves every stream, for a stop of a few thousand characters that the output keeps matching the start of."""

    def __init__(self, stop: str):
        self.stop, self.k = stop, 0
        self.back = [0] * len(stop)     # back[i]: the longest proper prefix of stop[:i + 1] that ends it too
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.back[k - 1]
            k += stop[i] == stop[k]
            self.back[i] = k

    def feed(self, c: str) -> bool:
        """Take the text's next character; whether the text now ends with the whole stop."""
        stop, k = self.stop, self.k
        if k == len(stop):
            k = self.back[k - 1]
        while k and c != stop[k]:
            k = self.back[k - 1]
        self.k = k = k + (c == stop[k])
        return k == len(stop)


class StopText:
    """New tokens to text, cut at the first of `stops`: text that could be the start of a stop string is held
    back until the next tokens show it is not, so no part of a stop string is ever sent. Of the stops a token
    completes, the text is cut where the first begins (llama-server's)."""

    def __init__(self, tok: Tokenizer, prev: int, stops: tuple[str, ...]):
        self.decoder = text_decoder(tok, prev)
        self.matches = [StopMatch(s) for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        return self.release(self.decoder.push(token))

    def flush(self) -> str:
        return self.release(self.decoder.flush(), final=True)

    def release(self, text: str, final: bool = False) -> str:
        """Of the text held and the new `text`, what can be sent: up to a stop, or all but what could begin one
        (`final`: all)."""
        held, cut = self.held + text, None
        for i, c in enumerate(text, len(self.held) + 1):
            for m in self.matches:
                if m.feed(c) and (cut is None or i - len(m.stop) < cut):
                    cut = i - len(m.stop)
        if cut is not None:
            self.stopped, self.held = True, ""
            return held[:cut]
        keep = 0 if final else max((m.k for m in self.matches), default=0)    # what could begin a stop
        self.held = held[len(held) - keep:]
        return held[:len(held) - keep]


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the model's distribution (the raw logits, before temperature
    and penalties, as OpenAI reports them) and the `top` most likely tokens'."""
    shifted = logits.astype(np.float64) - logits.max()
    lp = shifted - np.log(np.exp(shifted).sum())
    best = np.argsort(-lp, kind="stable")[:top]
    return TokenLogprob(token, float(lp[token]), [(int(t), float(lp[t])) for t in best])


@dataclass
class Run:
    """A request in a slot."""
    request: Request
    slot: int
    generation: Generation
    text: StopText
    cached: int = 0                                             # prompt tokens kept from the slot's cache
    pending: list[TokenLogprob] = field(default_factory=list)    # logprobs of tokens whose text is held back
    last: float | None = None                                   # when its latest token came


class Engine:
    def __init__(self, load: Callable[[int], LLM], slots: int, max_waiting: int, metrics: Metrics,
                 on_fatal: Callable[[str], None], on_ready: Callable[[LLM], None] = lambda llm: None):
        """`load(slots)` gives the model (called in the scheduler thread); `on_fatal(message)` is told when it
        fails, `on_ready(llm)` once the engine takes requests (not before: a signal between the two would find it
        still loading). At most `max_waiting` requests wait for a slot; more are refused (Busy)."""
        self.slots, self.max_waiting, self.metrics = slots, max_waiting, metrics
        self._load, self._on_fatal, self._on_ready = load, on_fatal, on_ready
        self.llm: LLM | None = None
        self.ready = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._free = list(range(slots))
        self._kept: list[list[int]] = [[] for _ in range(slots)]   # per slot, the tokens its KV cache holds
        self._used = [0] * slots                                    # per slot, when a request last took it
        self._clock = itertools.count(1)
        self._running: list[Run] = []
        self._batcher: Batcher | None = None
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="dpllama-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            if not (self.ready.is_set() and self._accepting):
                self.metrics.rejected.labels("503").inc()
                raise Unavailable("the model is loading" if self._accepting else "the server is shutting down")
            if len(self._waiting) >= self.max_waiting + len(self._free):
                self.metrics.rejected.labels("429").inc()
                raise Busy(f"all {self.slots} slots are busy and {len(self._waiting)} requests wait, the most "
                           f"--max-waiting allows")
            self._waiting.append(request)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """End a request, running or waiting (its client went away): the scheduler drops it at its next round."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def drain(self) -> bool:
        """Refuse new requests (503); those running or waiting go on (the server's stop has begun). While the model
        loads, the engine stops instead, as stop() stops it: whether it did."""
        with self._cond:
            self._accepting = False
            loading = not self.ready.is_set()
            self._stopping |= loading
            return loading

    def stop(self, timeout: float = 30) -> None:
        """Refuse new requests, cancel those left (each one's client gets its answer: a 503) and end the scheduler
        thread. While the model loads, the engine never becomes ready and nothing waits for the load: it runs in
        the driver, which nothing can cut short, and would hold the server's stop for its whole length."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
            loaded = self.ready.is_set()
        if loaded:
            self._thread.join(timeout)

    # ---- the scheduler thread ----
    def _main(self) -> None:
        try:
            self.llm = self._load(self.slots)
        except DpllamaError as e:
            self._on_fatal(str(e))
            return
        except Exception as e:      # the driver's (a buffer it cannot make): the server must not go on never ready
            self._on_fatal(f"loading the model failed: {type(e).__name__}: {e}")
            return
        self._batcher = Batcher(self.llm.model)
        with self._cond:
            if self._stopping:      # stopped while it loaded
                return
            self.ready.set()
        self._on_ready(self.llm)
        while True:
            with self._cond:
                for r in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(r)
                    self._ended(r, Done("cancelled", len(r.prompt), 0))
                while not (self._stopping or self._waiting or self._running):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = [self._slot_for(self._waiting.popleft())
                            for _ in range(min(len(self._free), len(self._waiting)))]
                self.metrics.waiting.set(len(self._waiting))
            for request, slot, keep in admitted:
                self._admit(request, slot, keep)
            for run in [r for r in self._running if r.request.cancelled]:
                self._finish(run, "cancelled")
            if self._running or not self._batcher.idle:
                self._pass()
        for run in list(self._running):
            self._finish(run, "cancelled")
        with self._cond:
            for r in self._waiting:
                self._ended(r, Done("cancelled", len(r.prompt), 0))
            self._waiting.clear()
            self.metrics.waiting.set(0)

    def _slot_for(self, request: Request) -> tuple[Request, int, int]:
        """The free slot whose KV cache the request gains most from and loses least of (the prompt's tokens it
        holds less those it would throw away; of equals, the one used least recently), taken, and how many of the
        prompt's tokens it can keep (all but the last, which must be fed). The longest prefix alone sent a new
        conversation to the slot of another that shared its system prompt, not to an empty one: two chats on two
        slots then took each other's slot at every turn, and each turn read its whole conversation again."""
        keep = {s: reusable(self._kept[s], request.prompt) for s in self._free}
        slot = max(self._free, key=lambda s: (keep[s] - (len(self._kept[s]) - keep[s]), -self._used[s]))
        self._free.remove(slot)
        self._used[slot] = next(self._clock)
        return request, slot, keep[slot]

    def _admit(self, request: Request, slot: int, keep: int) -> None:
        """Start the request in `slot`, reusing the KV cache of the prompt's first `keep` tokens (llama-server's
        cache_prompt: a chat's follow-up turn reads only its new messages). Results are the same either way: the
        kept rows were computed by the same kernels."""
        model, tok = self.llm.model, self.llm.tokenizer
        model.select(slot)
        self._kept[slot] = []       # until it ends, what the slot holds is in flux
        try:
            gen = generate(model, request.prompt, request.max_new, request.sampler, tok.eos_ids, keep=keep,
                           keep_logits=request.logprobs is not None,
                           json=JsonMode(tok, request.json) if request.json else None)
        except DpllamaError as e:
            with self._cond:
                self._free.append(slot)
            self._ended(request, Failed(str(e)))
            return
        self.metrics.prompt_tokens.inc(len(request.prompt) - keep)
        self.metrics.prompt_tokens_cached.inc(keep)
        run = Run(request, slot, gen, StopText(tok, request.prompt[-1], request.stops), keep)
        self._running.append(run)
        self.metrics.running.set(len(self._running))
        if gen.ended:           # max_tokens 0, or a prompt that fills the context
            self._finish(run, "length")

    def _pass(self) -> None:
        """Enqueue one batched forward pass for every running request and take the results of the one before
        (Batcher.step)."""
        runs = {id(run.generation): run for run in self._running}
        try:
            results = self._batcher.step([run.generation for run in self._running])
        except DpllamaError as e:
            for run in list(self._running):
                self._finish(run, "error", str(e))
            return
        for gen, result in results:
            run = runs.get(id(gen))
            if run is None:         # its request was cancelled while the pass was in flight
                continue
            if isinstance(result, DpllamaError):
                self._finish(run, "error", str(result))
            else:
                self._took(run, result)

    def _took(self, run: Run, token: int | None) -> None:
        """The pass has run the request's part: send on its new token as text, end it when it has ended."""
        gen, request = run.generation, run.request
        if token is not None:
            now = time.perf_counter()
            if run.last is None:
                self.metrics.time_to_first_token.observe(now - request.arrived)
            else:
                self.metrics.time_per_output_token.observe(now - run.last)
            run.last = now
            if request.logprobs is not None:
                run.pending.append(token_logprob(gen.logits, token, request.logprobs))
            text = run.text.push(token)
            if run.text.stopped:
                self._send(run, text)
                self._finish(run, "stop")
                return
            if text:
                self._send(run, text)
        if gen.ended:
            self._finish(run, "stop" if gen.stopped else "length")

    def _send(self, run: Run, text: str) -> None:
        run.request.emit(Piece(text, run.pending))
        run.pending = []

    def _finish(self, run: Run, reason: str, error: str | None = None) -> None:
        gen = run.generation
        if reason in ("stop", "length") and not run.text.stopped:
            tail = run.text.flush()
            if run.text.stopped:    # at a stop that ends in the text's last, unfinished character (U+FFFD)
                reason = "stop"
            if tail or run.pending:
                self._send(run, tail)
        self._running.remove(run)
        self._kept[run.slot] = [] if error else gen.tokens[:gen.fed]     # the tokens whose passes have run
        with self._cond:
            self._free.append(run.slot)
        self.metrics.running.set(len(self._running))
        self.metrics.generation_tokens.inc(gen.stats.generated_tokens)
        self._ended(run.request, Failed(error) if error else
                    Done(reason, len(run.request.prompt), gen.stats.generated_tokens, run.cached))

    def _ended(self, request: Request, event: Done | Failed) -> None:
        self.metrics.finished.labels(event.finish_reason if isinstance(event, Done) else "error").inc()
        request.emit(event)
