"""`dpllama chat`: an interactive conversation in the model's chat template, streamed.

Each turn renders the whole conversation with the template, then feeds only the tokens after the
longest prefix already in the KV cache, so earlier turns are not recomputed. When the conversation
outgrows the context, the oldest exchanges are dropped (the system prompt stays).
"""
from __future__ import annotations

import sys

from dpllama.generate import Sampler, generate_ids
from dpllama.llm import LLM
from dpllama.tokenizer import StreamDecoder


class Chat:
    def __init__(self, llm: LLM, sampler: Sampler, system: str | None = None, max_reply: int = 512):
        self.llm = llm
        self.sampler = sampler
        self.max_reply = max_reply
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []     # tokens whose keys and values the model's cache holds

    def _prompt_ids(self) -> list[int]:
        tok = self.llm.tokenizer
        text = tok.apply_chat_template(self.messages, add_generation_prompt=True)
        # the template writes BOS itself where the model wants one
        return tok.encode(text, bos=False, parse_special=True)

    def reply(self, user: str):
        """Stream the assistant's answer to `user`, piece by piece; it joins the conversation."""
        self.messages.append({"role": "user", "content": user})
        ids = self._prompt_ids()
        limit = self.llm.model.seq_len
        first = 1 if self.messages[0]["role"] == "system" else 0
        while len(ids) + min(self.max_reply, limit // 4) > limit and len(self.messages) > first + 1:
            del self.messages[first:first + 2]      # the oldest exchange
            ids = self._prompt_ids()
        keep = 0
        while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
            keep += 1
        tok = self.llm.tokenizer
        dec = StreamDecoder(tok, prev=ids[-1])
        seq, answer = list(ids), []
        tokens = generate_ids(self.llm.model, ids, len(ids) + self.max_reply, self.sampler, tok.eos_ids, keep)
        for pos, t in enumerate(tokens, start=keep + 1):
            if pos < len(ids):
                continue            # the rest of the prompt going through
            seq.append(t)
            if t in tok.eos_ids:
                break
            piece = dec.push(t)
            answer.append(piece)
            yield piece
        tail = dec.flush()
        answer.append(tail)
        yield tail
        self.cached = seq[:-1]      # the last token was produced, not yet fed
        self.messages.append({"role": "assistant", "content": "".join(answer).strip()})


def repl(llm: LLM, sampler: Sampler, system: str | None, max_reply: int, stdin=sys.stdin, stdout=sys.stdout):
    chat = Chat(llm, sampler, system, max_reply)
    interactive = stdin.isatty()
    if interactive:
        stdout.write("dpllama chat: type a message, /reset to start over, /exit or Ctrl-D to quit\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            chat = Chat(llm, sampler, system, max_reply)
            continue
        for piece in chat.reply(line):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
