"""`dpllama chat`: an interactive conversation in the model's chat template, streamed.

Each turn renders the whole conversation with the template, then feeds only the tokens after the
longest prefix already in the KV cache, so earlier turns are not recomputed. When the conversation
outgrows the context, the oldest exchanges are dropped (the system prompt stays). A model without a
template of its own (any llama2.c model) gets ChatML, and the chat says so at the start.
"""
from __future__ import annotations

from dpllama.generate import Sampler, generate, reusable
from dpllama.llm import LLM
from dpllama.tokenizer import StreamDecoder, Tokenizer


def chat_text(tok: Tokenizer, messages: list[dict]) -> str:
    """A conversation in the model's chat template, ready for the assistant's reply."""
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def chat_ids(tok: Tokenizer, text: str) -> list[int]:
    """The token ids of chat_text's `text`: the template writes BOS itself where the model wants one."""
    return tok.encode(text, bos=False, parse_special=True)


def chat_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a conversation in the model's chat template, ready for the assistant's reply."""
    return chat_ids(tok, chat_text(tok, messages))


class Chat:
    def __init__(self, llm: LLM, sampler: Sampler, system: str | None = None, max_reply: int = 512):
        self.llm = llm
        self.sampler = sampler
        self.max_reply = max_reply
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []     # tokens whose keys and values the model's cache holds

    def _prompt_ids(self) -> list[int]:
        return chat_prompt(self.llm.tokenizer, self.messages)

    def reply(self, user: str):
        """Stream the assistant's answer to `user`, piece by piece; it joins the conversation, as far as it
        went when the stream is cut short (Ctrl-C, or closed), so that the roles still alternate."""
        self.messages.append({"role": "user", "content": user})
        answer = []
        try:
            ids = self._prompt_ids()
            limit = self.llm.model.seq_len
            first = 1 if self.messages[0]["role"] == "system" else 0
            while len(ids) + min(self.max_reply, limit // 4) > limit and len(self.messages) > first + 1:
                del self.messages[first:first + 2]      # the oldest exchange
                ids = self._prompt_ids()
            keep = reusable(self.cached, ids)
            self.cached = ids[:keep]    # all the cache is sure to hold if the reply is cut short
            model, tok = self.llm.model, self.llm.tokenizer
            dec = StreamDecoder(tok, prev=ids[-1])
            reply = generate(model, ids, self.max_reply, self.sampler, tok.eos_ids, keep)
            for t in reply:
                piece = dec.push(t)
                answer.append(piece)
                yield piece
            tail = dec.flush()
            answer.append(tail)
            yield tail
            self.cached = reply.tokens[:model.pos]      # the tokens fed: the last one was produced, not fed
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})
