"""`dpllama serve`: an OpenAI-compatible HTTP server (dpllama.serve), in this process through uvicorn, or as
Ray Serve replicas behind Ray's HTTP proxy (--replicas)."""
from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from dpllama.commands.options import (add_activation_bits, add_device, add_model, add_template_kwargs, check_ctx,
                                      load_llm, one_of, template_kwargs_from)
from dpllama.errors import DpllamaError
from dpllama.fileio import check_input
from dpllama.hub import local_model
from dpllama.serve import REASONING_FORMATS, log

ENV_PREFIX = "DPLLAMA_"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: every "
                   "interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on, 0 = any free one (default 8080)")
    p.add_argument("--parallel", "-np", type=int, default=1, metavar="N",
                   help="requests run at once, each in a slot with its own KV cache of --ctx tokens (default 1)")
    p.add_argument("--batch-size", "-b", type=int, default=256, metavar="N",
                   help="rows of one forward pass: each running request's next token, then pieces of new prompts "
                        "(default 256; larger lets new prompts in with fewer, longer passes)")
    p.add_argument("--max-waiting", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot; more get 429 (default 64)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this Bearer token (repeatable, or comma-separated); none: no key is asked")
    p.add_argument("--api-key-file", metavar="PATH", help="accept the tokens in this file, one a line")
    p.add_argument("--model-name", help="the model's name in the API (default: -m's file name or known name)")
    add_template_kwargs(p)      # a request's chat_template_kwargs go over them
    p.add_argument("--reasoning-format", type=one_of(*REASONING_FORMATS), default="auto",
                   metavar="{" + ",".join(REASONING_FORMATS) + "}",
                   help="a chat reply's thinking (<think>...</think>, Qwen3's, DeepSeek-R1's): auto and deepseek send "
                        "it as reasoning_content, apart from the content; none leaves it in the content (default "
                        "auto; a request's reasoning_format goes over it)")
    p.add_argument("--drain-timeout", type=float, default=30, metavar="S",
                   help="on SIGTERM, seconds that running requests have to finish before they are cancelled "
                        "(default 30)")
    p.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="run N engines as Ray Serve replicas behind Ray's HTTP proxy (needs dpllama[ray]); "
                        "0: one engine in this process (default)")
    add_device(p)
    add_activation_bits(p)
    environment_defaults(p)


def environment_defaults(p: argparse.ArgumentParser) -> None:
    """Every option can come from the environment, for containers: --max-waiting from DPLLAMA_MAX_WAITING and so
    on (--api-key's variable holds comma-separated keys). The command line wins. argparse converts and checks a
    string default as it does the argument, so a bad variable is the same one-line error."""
    for action in p._actions:
        names = [s for s in action.option_strings if s.startswith("--")]
        if not names:
            continue
        value = os.environ.get(ENV_PREFIX + names[0][2:].upper().replace("-", "_"))
        if value is None:
            continue
        action.default = [value] if isinstance(action, argparse._AppendAction) else value
        action.required = False
        action.help = f"{action.help}; now from ${ENV_PREFIX}{names[0][2:].upper().replace('-', '_')}"


def api_keys(args: argparse.Namespace) -> frozenset[str]:
    keys = [k.strip() for a in args.api_key for k in a.split(",") if k.strip()]
    if args.api_key and not keys:   # a secret left empty must not start a server open to all
        raise DpllamaError(f"--api-key {','.join(args.api_key)!r}: no key in it (from the command line or "
                           f"${ENV_PREFIX}API_KEY); leave it out for a server without keys")
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            check_input(path)       # a device (/dev/zero) or a FIFO would be read without end
            lines = path.read_text().splitlines()
        except DpllamaError as e:
            raise DpllamaError(f"--api-key-file {e}") from None
        except OSError as e:
            raise DpllamaError(f"--api-key-file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise DpllamaError(f"--api-key-file {path}: not UTF-8 text (byte {e.start})") from None
        found = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
        if not found:
            raise DpllamaError(f"--api-key-file {args.api_key_file}: no key in it")
        keys += found
    return frozenset(keys)


def check(args: argparse.Namespace) -> None:
    for ok, rule in ((0 <= args.port <= 65535, f"--port must be between 0 and 65535, found {args.port}"),
                     (args.parallel >= 1, f"--parallel must be at least 1, found {args.parallel}"),
                     (args.batch_size >= 1, f"--batch-size must be at least 1, found {args.batch_size}"),
                     (args.max_waiting >= 0, f"--max-waiting must be >= 0, found {args.max_waiting}"),
                     (0 <= args.drain_timeout <= 86400,
                      f"--drain-timeout must be between 0 and 86400 seconds, found {args.drain_timeout}"),
                     (args.replicas >= 0, f"--replicas must be >= 0, found {args.replicas}"),
                     (not args.replicas or args.port, "--replicas needs a --port other than 0 (Ray's proxy binds it)")):
        if not ok:
            raise DpllamaError(rule)
    check_ctx(args)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that an address in use is one line before anything loads."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise DpllamaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    check(args)
    keys = api_keys(args)
    kwargs = template_kwargs_from(args)
    local_model(args.model)     # a missing file is one line before the server listens (a fetch, long, comes after)
    name = args.model_name or Path(args.model).name

    def load(slots: int):
        llm = load_llm(args, slots, args.batch_size)
        llm.model.prepare_batches(slots)    # the passes of decode steps, recorded before the first request
        llm.tokenizer.most_bytes_per_token  # and the longest token (the body limit, the floor on tokens): 0.1 s for
                                            # Qwen's 151,936, which the first request would take in the event loop
        return llm

    if args.replicas:
        from dpllama.serve.ray_serve import serve_replicas
        return serve_replicas(load, args.host, args.port, args.replicas, args.parallel, args.max_waiting, name, keys,
                              args.drain_timeout, kwargs, args.reasoning_format)

    from dpllama.serve.app import serve
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    log(f"dpllama: listening on http://{host}:{port} (loading {args.model})")
    serve(sock, load, args.parallel, args.max_waiting, name, keys, args.drain_timeout, kwargs, args.reasoning_format)
    return 0
