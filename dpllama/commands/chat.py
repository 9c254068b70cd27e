"""`dpllama chat`: an interactive conversation in the model's chat template (dpllama.chat.Chat), streamed."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from dpllama.chat import Chat, MessageTooLong
from dpllama.commands.options import (add_activation_bits, add_device, add_model, add_sampling, add_template_kwargs,
                                      load_llm, sampler_from, template_kwargs_from)
from dpllama.generate import Sampler, check_steps
from dpllama.llm import LLM
from dpllama.signals import presses_noted


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own, if any)")
    p.add_argument("-n", "--max-reply", type=int, default=512, help="longest reply in tokens (default 512)")
    add_sampling(p, temperature=0.7)
    add_template_kwargs(p)
    add_device(p)
    add_activation_bits(p)


def run(args: argparse.Namespace) -> int:
    max_reply = check_steps(args.max_reply, "-n")
    sampler = sampler_from(args)
    kwargs = template_kwargs_from(args)
    llm = load_llm(args)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # at the prompt, input() raises it: the chat ends
    repl(llm, sampler, args.system, max_reply, template_kwargs=kwargs)
    return 0


def template_note(tok) -> str:
    if tok.chat_template:
        return "chat template: the model's own"
    model = "a llama2.c model" if tok.kind == "llama2c" else "the model"
    return f"chat template: ChatML, as {model} has none of its own"


def repl(llm: LLM, sampler: Sampler, system: str | None, max_reply: int, stdin=sys.stdin, stdout=sys.stdout,
         stderr=sys.stderr, template_kwargs: dict | None = None):
    """The conversation on a terminal or a pipe. Ctrl-C during a reply stops only the reply (as llama.cpp's
    chat); at the prompt it quits, as Ctrl-D (end of input) and /exit do."""
    chat = Chat(llm, sampler, system, max_reply, template_kwargs)
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() gets line editing and history)
        except ImportError:
            pass
        stdout.write("dpllama chat: type a message; /reset starts over; /exit, Ctrl-D or Ctrl-C quits "
                     "(Ctrl-C during a reply stops the reply)\n")
    stderr.write(f"dpllama: {template_note(llm.tokenizer)}\n")
    stderr.flush()
    while True:
        try:     # input() drops the newline, so that "" is only the end
            line = input("> ") + "\n" if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:
            if interactive:
                stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            chat = Chat(llm, sampler, system, max_reply, template_kwargs)
            stderr.write("dpllama: the conversation starts over\n")
            stderr.flush()
            continue
        with presses_noted() as pressed, contextlib.closing(chat.reply(line)) as pieces:
            try:
                for piece in pieces:
                    stdout.write(piece)
                    stdout.flush()
                    if pressed:     # the reply stops between tokens, where the model's state is whole
                        break
            except MessageTooLong as e:
                stderr.write(f"dpllama: {e}; not sent\n")
                stderr.flush()
                continue
        stopped = bool(pressed)
        stdout.write("\n")
        stdout.flush()
        if stopped:
            stderr.write("dpllama: reply stopped (Ctrl-C); Ctrl-C at the prompt quits\n")
            stderr.flush()
