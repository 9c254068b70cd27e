"""`dpllama chat`: an interactive conversation in the model's chat template, streamed.

Each turn renders the whole conversation with the template, then feeds only the tokens after the
longest prefix already in the KV cache, so earlier turns are not recomputed. When the conversation
outgrows the context, the oldest exchanges are dropped (the system prompt stays); a message that does not fit
even alone is refused (MessageTooLong) and the conversation stays as it was. A model without a
template of its own (any llama2.c model) gets ChatML, and the chat says so at the start.
"""
from __future__ import annotations

from dpllama.errors import DpllamaError
from dpllama.generate import Sampler, check_sampler, check_steps, generate, reusable
from dpllama.llm import LLM
from dpllama.tokenizer import StreamDecoder, Tokenizer, check_template_kwargs


def chat_text(tok: Tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> str:
    """A conversation in the model's chat template, ready for the assistant's reply; `template_kwargs` are the
    template's extra variables ({"enable_thinking": False})."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, **check_template_kwargs(template_kwargs or {}))


def chat_ids(tok: Tokenizer, text: str) -> list[int]:
    """The token ids of chat_text's `text`: the template writes BOS itself where the model wants one."""
    ids = tok.encode(text, bos=False, parse_special=True)
    if not ids:     # a template that writes nothing (a model's metadata is anybody's)
        raise DpllamaError(f"{tok.source}: the chat template rendered the conversation as no tokens at all")
    return ids


def chat_prompt(tok: Tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """The token ids of a conversation in the model's chat template, ready for the assistant's reply."""
    return chat_ids(tok, chat_text(tok, messages, template_kwargs))


class MessageTooLong(DpllamaError):
    """A message that does not fit the context with room for a reply, even with every earlier exchange dropped:
    that message is refused, the conversation goes on."""


class Chat:
    def __init__(self, llm: LLM, sampler: Sampler, system: str | None = None, max_reply: int = 512,
                 template_kwargs: dict | None = None):
        self.llm = llm
        self.sampler = check_sampler(sampler)
        self.max_reply = check_steps(max_reply, "max_reply")
        self.template_kwargs = check_template_kwargs(template_kwargs or {})     # before the first message
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []     # tokens whose keys and values the model's cache holds
        self.last = None                # the generation of the last reply: while it owns the sequence, `cached` holds
        self.replying = False           # a reply is being read

    def reply(self, user: str):
        """Stream the assistant's answer to `user`, piece by piece; it joins the conversation, as far as it
        went when the stream is cut short (Ctrl-C, or closed), so that the roles still alternate. MessageTooLong,
        before any piece, leaves the conversation as it was; so does a DpllamaError for a reply asked for while the
        last one is still being read (its message would come between the last one's and its answer)."""
        if self.replying:
            raise DpllamaError("the last reply is still being read: read it to its end or close it first")
        tok, limit = self.llm.tokenizer, self.llm.model.seq_len
        messages = self.messages + [{"role": "user", "content": user}]
        ids = chat_prompt(tok, messages, self.template_kwargs)
        first = 1 if messages[0]["role"] == "system" else 0
        while len(ids) + min(self.max_reply, limit // 4) > limit and len(messages) > first + 1:
            del messages[first:first + 2]       # the oldest exchange
            ids = chat_prompt(tok, messages, self.template_kwargs)
        if len(ids) >= limit:
            raise MessageTooLong(f"the message does not fit the context: with {'the system prompt and ' * first}"
                                 f"no earlier exchange it is {len(ids)} tokens in the chat template, the context "
                                 f"holds {limit} with at least one for the reply")
        self.messages = messages
        answer = []
        self.replying = True
        try:
            model = self.llm.model
            if model.seq.owner is not self.last:    # another generation has run on the model since: its cache is
                self.cached = []                    # not this conversation's
            keep = reusable(self.cached, ids)
            self.cached = ids[:keep]    # all the cache is sure to hold if the reply is cut short
            dec = StreamDecoder(tok, prev=ids[-1])
            reply = self.last = generate(model, ids, self.max_reply, self.sampler, tok.eos_ids, keep)
            for t in reply:
                piece = dec.push(t)
                answer.append(piece)
                yield piece
            tail = dec.flush()
            answer.append(tail)
            yield tail
            self.cached = reply.tokens[:model.pos]      # the tokens fed: the last one was produced, not fed
        finally:
            self.replying = False
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})
