"""The HTTP API of `dpllama serve` (FastAPI): OpenAI's chat and completions, streamed or not, and llama.cpp's
/tokenize, /detokenize, /health and /metrics, in front of an `Engine`.

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a body this server cannot
serve (malformed, a parameter out of range or not implemented, a prompt longer than the context), 401 without
a valid API key, 404 for another model, 413 for a body longer than any this context can use, 429 when the wait
queue is full, 503 while loading or shutting down.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from dpllama.chat import chat_ids, chat_text
from dpllama.constrain import Grammar, SchemaError, grammar
from dpllama.errors import DpllamaError
from dpllama.fileio import remove_live
from dpllama.generate import Sampler
from dpllama.llm import LLM
from dpllama.serve import log
from dpllama.serve.metrics import Metrics
from dpllama.serve.engine import Busy, Done, Engine, Failed, Piece, Request, TokenLogprob, Unavailable
from dpllama.serve.schemas import (Body, ChatRequest, CompletionRequest, DetokenizeRequest, ParameterError,
                                   Sampling, TokenizeRequest)
from dpllama.serve.tools import ARGUMENTS, OPEN as TOOL_OPEN, ToolCalls, call_schema, tag_start, tool_format
from dpllama.signals import HELD

SHUT_DOWN = "the server shut down before the request was done"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "unavailable_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), e.status)


def found(value) -> str:
    """What a request held where something else belonged, for its error message: a list or an object by its size
    (its JSON may be megabytes), anything else as JSON cut short. ASCII (json.dumps escapes the rest), so that a
    lone surrogate sent back cannot fail the response's UTF-8."""
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value[:40] if isinstance(value, str) else value)
    return text if len(text) <= 40 else text[:40] + "..."


def validated(kind: type[Body], data) -> Body:
    """The parsed body `data` as `kind`, or a 400 for its first bad field, named as OpenAI names it in `param`
    (messages[0].content), with what it should be and what it was."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the body should be a JSON object, found {found(data)}")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or None
        message = f"{param or 'the body'}: {first['msg']}"
        if first["type"] != "missing":      # whose input is the object that misses it
            message += f", found {found(first['input'])}"
        raise ApiError(400, message, param) from None


def body_limit(llm: LLM) -> int | None:
    """The most bytes a request body can need, None where nothing bounds a text's tokens (Tokenizer.too_long):
    its texts fit the slot's context, ctx tokens of at most most_bytes_per_token bytes of UTF-8, which JSON spells
    in 6 bytes a byte at most (\\u001f; a character of 3 bytes in 6, of 4 in 12), plus 64 KiB for the rest."""
    most = llm.tokenizer.most_bytes_per_token
    return None if most is None else 6 * llm.model.seq_len * most + 65536


class IncomingBody:
    """A request body as it arrives. 413 past `limit()` bytes (None: no limit, the model loading), counted as it
    arrives, whatever Content-Length says: a body is held whole and parsed in the event loop, where 32 MB
    held every stream for 0.15 s, and a gigabyte would take a gigabyte. The rest is read and dropped before the
    answer, so that a client still sending gets it rather than a reset connection. 503 once the server begins
    to stop (`closing`) with the body still on its way: the request is not running yet, and uvicorn would wait
    for it until its own deadline, then cancel it, answer 500 and log a traceback."""

    def __init__(self, app, limit: Callable[[], int | None], closing: asyncio.Event):
        self.app, self.limit, self.closing = app, limit, closing

    async def arrival(self, receive) -> dict:
        if self.closing.is_set():
            raise HTTPException(503, "the server is shutting down")
        got, stop = asyncio.ensure_future(receive()), asyncio.ensure_future(self.closing.wait())
        try:
            await asyncio.wait((got, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            arrived = got.done()
            if not arrived:
                got.cancel()
        if not arrived:
            raise HTTPException(503, "the server is shutting down")
        return got.result()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        most, size, whole = self.limit(), 0, False

        async def counted():
            nonlocal size, whole
            if whole:
                return await receive()      # after the body: a disconnect, whenever it comes
            message = await self.arrival(receive)
            while message["type"] == "http.request":
                size += len(message.get("body", b""))
                whole = not message.get("more_body")
                if most is None or size <= most:
                    return message
                if whole:
                    raise HTTPException(413, f"the request body is {size} bytes, more than the {most} that any "
                                             f"request can use with this model's context per slot")
                message = await self.arrival(receive)
            return message      # http.disconnect
        await self.app(scope, counted, send)


class ApiKeys:
    """401 for a request without one of `keys` as its Bearer token (no keys: none asked), before its body is read,
    so that a client without a key costs no parsing. /health needs none: probes come without."""

    def __init__(self, app, keys: frozenset[str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"] != "/health":
            scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or key.strip() not in self.keys:
                answer = error_response(ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                                 code="invalid_api_key"))
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)


class RequestLog:
    """One line on stderr per request when its response has been sent (a stream's at its end): client, method
    and path, status, seconds, and what the completion handlers note in scope["dpllama"]. Probes (/health,
    /metrics) are not logged: they come every few seconds. With `replica`, every response names it in an
    X-Dpllama-Replica header."""

    def __init__(self, app, replica: str | None = None):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, note = time.perf_counter(), [500], scope.setdefault("dpllama", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if self.replica:
                    message["headers"] = [*message.get("headers", []), (b"x-dpllama-replica", self.replica.encode())]
            await send(message)
        if scope["path"] in ("/health", "/metrics"):
            return await self.app(scope, receive, sending)
        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            extra = "".join(f" {k}={v}" for k, v in note.items())
            log(f"dpllama: {client[0]} {scope['method']} {scope['path']} {status[0]} "
                f"{time.perf_counter() - start:.3f}s{extra}")


def make_app(engine: Engine, model_name: str, api_keys: frozenset[str] = frozenset(),
             template_kwargs: dict | None = None, reasoning_format: str = "auto",
             replica: str | None = None) -> FastAPI:
    """The API over `engine` (started and stopped with the app), serving it as `model_name`; with `api_keys`,
    every endpoint but /health wants one of them as a Bearer token. `template_kwargs` are the chat template's
    extra variables (--chat-template-kwargs), under a request's own; `reasoning_format` (--reasoning-format) is
    what a chat request's reasoning_format is when it sends none. `replica` names this process in an
    X-Dpllama-Replica header (Ray Serve's replicas)."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="dpllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.closing = asyncio.Event()     # the server has begun to stop (serve's signal handler sets it)
    app.add_middleware(IncomingBody, limit=lambda: body_limit(engine.llm) if engine.ready.is_set() else None,
                       closing=app.state.closing)
    app.add_middleware(ApiKeys, keys=api_keys)
    app.add_middleware(RequestLog, replica=replica)     # the outer one: it logs the others' answers too
    metrics = engine.metrics

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), code="request_too_large" if e.status_code == 413
                                       else None))

    async def json_body(http: HttpRequest):
        """The body parsed as JSON whatever its Content-Type says (`curl -d` sends a form's), as llama-server takes
        it; parsed here, not by FastAPI, whose errors named neither the field nor the problem ("There was an error
        parsing the body")."""
        try:
            return json.loads(await http.body())
        except ValueError as e:     # JSONDecodeError, or bytes that are not UTF-8
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        except ClientDisconnect:    # gone before its body was whole (unhandled: a 500 and a traceback in the log);
            raise ApiError(499, "the client went away before its body was whole") from None     # nobody reads it

    def loaded() -> LLM:
        if not engine.ready.is_set():
            raise ApiError(503, "the model is loading")
        return engine.llm

    @app.get("/health")
    async def health():
        if not engine.ready.is_set():
            return JSONResponse(error_body(503, "the model is loading"), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def card() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "dpllama"}
        if engine.ready.is_set():
            card["meta"] = {"n_ctx_per_slot": engine.llm.model.seq_len, "slots": engine.slots,
                            "n_vocab": engine.llm.model.config.vocab_size}
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")     # the openai client's models.retrieve; a name may hold a "/"
    async def model(name: str):
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {model_name!r}", "model",
                           "model_not_found")
        return card()

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest):
        body = validated(TokenizeRequest, await json_body(http))
        llm = loaded()
        tok = llm.tokenizer
        ids = await prompt_of(llm, lambda: body.content, "content", "the text",
                              partial(tok.encode, bos=body.add_special, parse_special=body.parse_special))
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": tok.token_bytes(t).decode("utf-8", "replace")} for t in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest):
        body = validated(DetokenizeRequest, await json_body(http))
        llm = loaded()
        tok, ctx = llm.tokenizer, llm.model.seq_len
        # no more than a slot's context, which any model's input or output here fits: decoding is Python work,
        # and beside a stream it runs ~8 times slower than alone and holds the stream as long (1.9 million ids:
        # 2.6 s, the stream's tokens held 1.9 s)
        if len(body.tokens) > ctx:
            raise ApiError(400, f"{len(body.tokens)} token ids, more than the context of {ctx} per slot", "tokens")
        bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is not in the vocabulary of {tok.vocab_size}", "tokens")
        return {"content": tok.decode(body.tokens, special=True)}    # what /tokenize shows, as llama-server's

    def check(body: Sampling) -> LLM:
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, f"unsupported parameter: {unsupported[0]}", unsupported[0], "unsupported_parameter")
        if body.stream_options is not None and not body.stream:     # OpenAI's 400: ignored, they hid a client's slip
            raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
        if body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist: this server serves {model_name!r}",
                           "model", "model_not_found")
        return loaded()

    async def prompt_of(llm: LLM, text_of: Callable[[], str], param: str, what: str,
                        encode: Callable[[str], list[int]]) -> list[int]:
        """encode(text_of()), in a worker thread, so that the event loop goes on sending the other streams' tokens
        (the tokenizers and Jinja let go of the interpreter: HF's while it works, Python code every few
        milliseconds; a 600,000-character prompt took 0.4 s to encode, a template over 90,000 messages 1.5 s to
        render). A text that cannot fit the context (Tokenizer.too_long) is refused without being encoded."""
        ctx, tok = llm.model.seq_len, llm.tokenizer

        def work() -> list[int]:
            text = text_of()
            if tok.too_long(text, ctx):
                raise ApiError(400, f"{what} is {len(text)} characters, more than the context of {ctx} tokens per "
                                    f"slot holds (a token is at most {tok.most_bytes_per_token} bytes)", param,
                               "context_length_exceeded")
            return encode(text)
        return await asyncio.to_thread(work)

    def fitting(llm: LLM, prompt: list[int], param: str) -> list[int]:
        ctx = llm.model.seq_len
        if len(prompt) > ctx:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens, more than the context of {ctx} per slot",
                           param, "context_length_exceeded")
        return prompt

    def request_of(llm: LLM, body: ChatRequest | CompletionRequest, prompt: list[int], param: str,
                   rules: Grammar | None) -> Request:
        fitting(llm, prompt, param)
        ctx = llm.model.seq_len
        sampler = Sampler(body.temperature, body.top_p, body.top_k, body.repeat_penalty, body.repeat_last_n,
                          time.time_ns() if body.seed is None else body.seed, body.presence_penalty,
                          body.frequency_penalty)
        try:
            return Request(prompt, body.limit() or ctx, sampler, body.stops(), body.alternatives(), json=rules)
        except ParameterError as e:
            raise ApiError(400, str(e), e.param) from None

    async def run(http: HttpRequest, body, llm: LLM, prompt: list[int], param: str, thinking: Thinking | None,
                  tools: ToolCalls | None = None, rules: Grammar | None = None):
        """Generate the reply to `prompt`, held to `rules` (a JSON grammar: the response_format's, or a forced tool
        call's), its text split by `thinking` and `tools` (chat)."""
        request = request_of(llm, body, prompt, param, rules)
        try:
            engine.submit(request)
        except Busy as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        note = http.scope.setdefault("dpllama", {})
        note["prompt"] = len(prompt)
        reply = Reply(llm, request, model_name, thinking, tools)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.stream(engine, usage, note), media_type="text/event-stream")
        return await reply.whole(engine, http, note)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        # the body parsed here, not by FastAPI, so that the messages are counted before Pydantic makes each one
        # (in the event loop, holding every stream: 90,000 took 0.4-0.5 s, the body's JSON ~0.03 s)
        data = await json_body(http)
        messages = data.get("messages") if isinstance(data, dict) else None
        ctx = engine.llm.model.seq_len if engine.ready.is_set() else None
        if ctx and isinstance(messages, list) and len(messages) > ctx:
            # a template gives each at least a token (90,000 took 1.5 s to render)
            raise ApiError(400, f"{len(messages)} messages, more than the context of {ctx} tokens per slot holds",
                           "messages", "context_length_exceeded")
        body = validated(ChatRequest, data)
        llm = check(body)

        rendered, rules = "", body.reply_format
        try:
            functions, forced = body.functions(), body.forced()
            forced = forced if functions else None      # a call the reply must make: the function's name, "" any
            kwargs = body.template_kwargs(template_kwargs or {})
        except ParameterError as e:
            raise ApiError(400, str(e), e.param) from None
        calling = tool_format(llm.tokenizer.chat_template)
        if functions:
            if calling is None:
                raise ApiError(400, "tools: this model's chat template renders no tools, or has the model write "
                                    "its calls in a format dpllama does not read (it reads <tool_call> blocks, as "
                                    "Qwen's and Hermes's templates write them, and bare JSON objects, as Llama 3's)",
                               "tools")
            if rules is not None:
                raise ApiError(400, "response_format: a JSON reply and tools at once are not supported (tool_choice "
                                    "\"none\" leaves the tools out)", "response_format")
            kwargs["tools"] = [{"type": "function", "function": f} for f in functions]
            if forced is not None:
                try:
                    rules = grammar(call_schema(functions, forced or None, ARGUMENTS[calling]))
                except SchemaError as e:
                    raise ApiError(400, f"tools: a function's parameters: {e}", "tools") from None

        # a forced call in Hermes's format: the reply starts inside its block, as the template writes one
        inside = forced is not None and calling == "hermes"

        def text() -> str:
            nonlocal rendered
            messages = [m.for_template(f"messages[{i}]") for i, m in enumerate(body.messages)]
            rendered = chat_text(llm.tokenizer, messages, kwargs) + (TOOL_OPEN + "\n" if inside else "")
            return rendered
        try:
            prompt = await prompt_of(llm, text, "messages", "the conversation in the chat template",
                                     partial(chat_ids, llm.tokenizer))
        except ParameterError as e:
            raise ApiError(400, str(e), e.param) from None
        except DpllamaError as e:      # the template refused the conversation
            raise ApiError(400, str(e), "messages") from None
        extract = (body.reasoning_format or reasoning_format) != "none"
        # some templates open the thinking themselves (QwQ's, DeepSeek-R1's: the prompt ends in "<think>\n"), and
        # the reply begins inside it, as llama.cpp reads it; in JSON mode the reply is the JSON from its first token
        opened = rules is None and rendered.rstrip().endswith(Thinking.OPEN)
        tools = ToolCalls({f["name"] for f in functions}, inside, not body.parallel_tool_calls) if functions else None
        return await run(http, body, llm, prompt, "messages", Thinking(extract, opened), tools, rules)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = validated(CompletionRequest, await json_body(http))
        llm = check(body)
        if isinstance(body.prompt, str):
            prompt = await prompt_of(llm, lambda: body.prompt, "prompt", "the prompt", llm.encode)
        else:
            vocab = llm.model.config.vocab_size
            prompt = fitting(llm, body.prompt, "prompt")       # before the ids are looked at: millions took 0.5 s
            if not prompt or not all(0 <= t < vocab for t in prompt):
                raise ApiError(400, f"a prompt of token ids holds at least one, each below {vocab}", "prompt")
        return await run(http, body, llm, prompt, "prompt", None, rules=body.reply_format)

    return app


def announce(model_name: str) -> Callable[[LLM], None]:
    """The line a server (or replica) logs once its engine takes requests (Engine's on_ready)."""
    def ready(llm: LLM) -> None:
        log(f"dpllama: ready: {model_name}, {len(llm.model.sequences)} slot(s) of {llm.model.seq_len} tokens each")
    return ready


def serve(sock: socket.socket, load: Callable[[int], LLM], slots: int, max_waiting: int, model_name: str,
          api_keys: frozenset[str], drain_timeout: float, template_kwargs: dict, reasoning_format: str) -> None:
    """Serve on the listening `sock` with uvicorn until SIGTERM or SIGINT: the server stops accepting, running
    requests have `drain_timeout` seconds to finish, then the rest are cancelled. The model loads meanwhile
    (`load(slots)`, /health says 503 until it is done); its failure ends the server with its DpllamaError, and a
    signal before it is done ends the process at once, with status 0."""
    import uvicorn

    failed: list[str] = []

    def fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    engine = Engine(load, slots, max_waiting, Metrics(), fatal, announce(model_name))
    # when the drain time is up the engine cancels what is left, so that each request still gets its answer (a 503,
    # in a stream too) before uvicorn closes the connections; uvicorn's own deadline, later, would cancel the
    # responses' tasks, which it logs as tracebacks
    deadline = threading.Timer(drain_timeout, engine.stop)
    deadline.daemon = True
    loop: list[asyncio.AbstractEventLoop] = []     # the server's, once it runs (signals below)
    started = threading.Event()

    class Server(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            loop.append(asyncio.get_running_loop())
            started.set()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit:    # the first signal (a second Ctrl-C is uvicorn's forced exit)
                name = signal.Signals(sig).name
                if engine.drain():
                    log(f"dpllama: {name}: stopped while the model was loading")
                else:
                    deadline.start()
                    log(f"dpllama: {name}: no new requests; those running have {drain_timeout:g} s to finish")
                asyncio.get_running_loop().call_soon_threadsafe(app.state.closing.set)
            super().handle_exit(sig, frame)

    app = make_app(engine, model_name, api_keys, template_kwargs, reasoning_format)
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                   lifespan="on", timeout_graceful_shutdown=drain_timeout + 10))
    # SIGTERM and SIGINT are taken by a thread of their own (sigwait), never by a handler: every thread of the
    # server is started after this and holds them blocked, as the main thread now does. A handler would also run
    # LLVM's, installed while PoCL compiles in the scheduler thread, which deletes the compile's files (see
    # dpllama/signals.py): a SIGTERM during a first start's compiles failed its load with a build error. Either
    # signal drains the server, which ends with status 0, as a container's stop should (not the CLI's 130).
    def signals() -> None:
        while True:
            sig = signal.sigwait(HELD)
            started.wait()
            try:
                loop[0].call_soon_threadsafe(server.handle_exit, sig, None)
            except RuntimeError:    # the loop has closed: the server has stopped
                return

    # uvicorn's handlers, which never run now, raise the signals they would have taken again once it is done: these
    # take them, should they ever come
    for sig in HELD:
        signal.signal(sig, lambda signum, frame: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    threading.Thread(target=signals, name="dpllama-signals", daemon=True).start()
    server.run(sockets=[sock])
    deadline.cancel()
    if failed:
        raise DpllamaError(failed[0])
    if not engine.ready.is_set():
        # stopped while the model loads (in the scheduler thread, in the driver): exit now, as cli.interrupted does,
        # rather than wait for the load, or run the interpreter's and the driver's teardown beside its compiles
        remove_live()
        os._exit(0)
    log("dpllama: stopped")


class Thinking:
    """A chat reply's text as it comes, split as llama-server's --reasoning-format deepseek splits it: the thinking
    (reasoning_content) is the text inside <think>...</think> less the whitespace around it, the content the rest
    less the whitespace after </think>. A reply thinks where it begins with <think> (whitespace before it stays in
    the content) or where its prompt ended inside an open one (`opened`); a <think> right after </think> thinks on.
    What could be the start of a tag, and whitespace that could end a thought, is held back until the text after it
    decides, so that no part of a tag is ever sent. Without `extract` all of it is content, as it comes."""
    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, extract: bool, opened: bool = False):
        self.state = "start" if extract else "answer"     # start, think, after (a </think>), answer
        self.opened, self.held = opened, ""
        self.fresh = True       # nothing of this thought sent yet: whitespace at its start goes

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and the content that the new `text` lets go (`final`: the reply has ended, all of it)."""
        held, reasoning, content = self.held + text, "", ""
        while self.state != "answer":
            if self.state != "think":
                body = held.lstrip()
                if body.startswith(self.OPEN):
                    if self.state == "start":
                        content += held[:len(held) - len(body)]
                    held, self.state, self.fresh = body[len(self.OPEN):], "think", True
                elif not final and self.OPEN.startswith(body):    # whitespace, or the start of a tag: undecided
                    break
                elif self.state == "start" and self.opened:
                    held, self.state = body, "think"
                else:
                    held, self.state = held if self.state == "start" else body, "answer"
                continue
            close = held.find(self.CLOSE)
            end = close if close >= 0 else len(held) if final else len(held) - tag_start(held, self.CLOSE)
            part = held[:end].lstrip() if self.fresh else held[:end]
            said = part.rstrip()
            reasoning += said
            self.fresh = self.fresh and not said
            if close < 0:
                held = part[len(said):] + held[end:]
                break
            held, self.state = held[close + len(self.CLOSE):], "after"
        if self.state == "answer":
            content, held = content + held, ""
        self.held = held
        return reasoning, content


class Reply:
    """One request's response in OpenAI's shapes: chat.completion(.chunk), its text split by `thinking` and its
    content by `tools` (where the request has tools), or text_completion (`thinking` None)."""

    def __init__(self, llm: LLM, request: Request, model_name: str, thinking: Thinking | None,
                 tools: ToolCalls | None = None):
        self.tok, self.request, self.thinking, self.tools = llm.tokenizer, request, thinking, tools
        self.chat = thinking is not None
        self.head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "created": int(time.time()), "model": model_name}
        self.offset = 0     # characters of text so far (completions' logprobs.text_offset)
        self.held: list[TokenLogprob] = []     # chat's: log-probabilities of tokens whose text `thinking` holds

    def _token(self, t: int) -> tuple[str, list[int]]:
        raw = self.tok.token_bytes(t)
        return raw.decode("utf-8", "replace"), list(raw)

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.request.logprobs is None:
            return None
        if self.chat:
            def one(t, lp):
                text, raw = self._token(t)
                return {"token": text, "logprob": lp, "bytes": raw}
            return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                                for e in entries]}
        tokens = [self._token(e.token)[0] for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t)[0]: lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def choice(self, delta: dict | str, entries: list[TokenLogprob], finish: str | None) -> dict:
        """A choice of chat's chunks, with its `delta`, or of completions' (streamed or not), with its text."""
        if not self.chat:
            return {"index": 0, "text": delta, "logprobs": self.logprobs(entries), "finish_reason": finish}
        # OpenAI's chunk with the finish_reason has none, even where the others have them (the role chunk an empty
        # list); completions' has its empty lists
        return {"index": 0, "delta": delta, "logprobs": None if finish else self.logprobs(entries),
                "finish_reason": finish}

    def pieces(self, text: str, entries: list[TokenLogprob], final: bool = False) -> list[dict]:
        """The choices of the chunks that send the new `text` (`final`: the reply's end, with what was held back):
        completions' one; chat's a delta of the reasoning, then one of the content, where each has text, as
        llama-server sends them. The tokens' log-probabilities go with the last, or wait for text to go with (at
        the end, an empty content delta)."""
        if not self.chat:
            return [] if final else [self.choice(text, entries, None)]
        self.held += entries
        reasoning, content, calls = self.split(text, final)
        deltas = [{key: part} for key, part in (("reasoning_content", reasoning), ("content", content)) if part]
        deltas += [{"tool_calls": [call]} for call in calls]
        if not deltas and not (final and self.held):
            return []
        deltas = deltas or [{"content": ""}]
        choices = [self.choice(d, [], None) for d in deltas[:-1]] + [self.choice(deltas[-1], self.held, None)]
        self.held = []
        return choices

    def split(self, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """A chat reply's new text as reasoning, content and tool calls."""
        reasoning, content = self.thinking.push(text, final)
        content, calls = self.tools.push(content, final) if self.tools else (content, [])
        return reasoning, content, calls

    def finish(self, reason: str) -> str:
        """OpenAI's finish_reason: "tool_calls" where a reply that ended by itself made calls."""
        return "tool_calls" if reason == "stop" and self.tools and self.tools.made else reason

    def chunk(self, choices: list[dict], **extra) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head, 'object': kind, 'choices': choices, **extra})}\n\n"

    @staticmethod
    def usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    async def stream(self, engine: Engine, usage: bool, note: dict):
        """Server-sent events: a first chunk with the role (chat), delta chunks, a chunk with finish_reason, the
        usage chunk (choices: []) when asked for, then [DONE]. The client's going away cancels the request."""
        extra = {"usage": None} if usage else {}
        ended = False
        try:
            if self.chat:
                yield self.chunk([self.choice({"role": "assistant", "content": ""}, [], None)], **extra)
            while True:
                event = await self.request.events.get()
                if isinstance(event, Piece):
                    for choice in self.pieces(event.text, event.logprobs):
                        yield self.chunk([choice], **extra)
                    continue
                ended = True
                if isinstance(event, Failed):
                    note["error"] = json.dumps(event.message)
                    yield f"data: {json.dumps(error_body(500, event.message))}\n\n"
                    return
                note.update(completion=event.completion_tokens, finish=event.finish_reason)
                if event.finish_reason == "cancelled":      # by the server's stop: the error a whole response gets
                    yield f"data: {json.dumps(error_body(503, SHUT_DOWN))}\n\n"
                    return
                for choice in self.pieces("", [], final=True):
                    yield self.chunk([choice], **extra)
                yield self.chunk([self.choice({} if self.chat else "", [], self.finish(event.finish_reason))], **extra)
                if usage:
                    yield self.chunk([], usage=self.usage(event))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not ended:
                engine.cancel(self.request)
                note["finish"] = "cancelled"

    async def whole(self, engine: Engine, http: HttpRequest, note: dict):
        """The whole response once generated; a client gone meanwhile cancels the request."""
        texts, entries = [], []
        while True:
            try:
                event = await asyncio.wait_for(self.request.events.get(), 0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    engine.cancel(self.request)
                    note["finish"] = "cancelled"
                    return Response(status_code=499)    # nobody reads it
                continue
            if isinstance(event, Piece):
                texts.append(event.text)
                entries += event.logprobs
            elif isinstance(event, Failed):
                note["error"] = json.dumps(event.message)
                raise ApiError(500, event.message)
            else:
                break
        note.update(completion=event.completion_tokens, finish=event.finish_reason)
        if event.finish_reason == "cancelled":
            raise ApiError(503, SHUT_DOWN)
        text = "".join(texts)
        if self.chat:
            reasoning, content, calls = self.split(text, final=True)
            # no reasoning_content where there was no thinking, as llama-server's; content null beside calls, as
            # OpenAI's
            message = {"role": "assistant", **({"reasoning_content": reasoning} if reasoning else {}),
                       "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            choice = {"index": 0, "message": message, "logprobs": self.logprobs(entries),
                      "finish_reason": self.finish(event.finish_reason)}
        else:
            choice = self.choice(text, entries, event.finish_reason)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": [choice], "usage": self.usage(event)}
