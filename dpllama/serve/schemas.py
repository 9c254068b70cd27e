"""The request bodies the server takes, as OpenAI's API and llama.cpp's server spell them, and their limits.

A parameter this server does not implement (tools, n > 1, logit_bias, echo, ...) is refused with 400 naming
it, never ignored: `unsupported` lists a body's fields that no model here declares. A field sent with a value
that asks for nothing (null, an empty list or object, OpenAI's default such as `response_format: {"type":
"text"}`) counts as not sent: clients and frameworks send them with every request.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ParameterError(Exception):
    """A request's parameter that cannot be served: HTTP 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# the values of fields this server does not implement that ask for what it does anyway (OpenAI's defaults)
NEUTRAL = {"response_format": {"type": "text"}, "tool_choice": "none", "parallel_tool_calls": True, "best_of": 1,
           "store": False, "suffix": ""}


def asks_nothing(name: str, value) -> bool:
    return value is None or value == [] or value == {} or (
        name in NEUTRAL and type(value) is type(NEUTRAL[name]) and value == NEUTRAL[name])


def extras(model: BaseModel, prefix: str = "") -> list[str]:
    """The model's fields that it does not declare, sent with a value that asks for something."""
    return [prefix + name for name, value in (model.model_extra or {}).items() if not asks_nothing(name, value)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Sampling(BaseModel):
    """What chat and completions share."""
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)                                 # llama.cpp's and vLLM's extension
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repeat_penalty: float = Field(1.0, gt=0, le=10)             # llama.cpp's
    repeat_last_n: int = Field(64, ge=-1)                       # llama.cpp's window of the three penalties
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                                     # an end user's id: no effect on the output

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4:
            raise ParameterError("stop", f"at most 4 stop sequences, found {len(stops)}")
        return stops

    def unsupported(self) -> list[str]:
        """Fields sent with a value that this server does not implement, in the body's order."""
        return extras(self) + (extras(self.stream_options, "stream_options.") if self.stream_options else [])


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]
    name: str | None = None

    @property
    def template_role(self) -> str:
        """The role as chat templates know it: OpenAI's "developer" (its newer models' name for the system
        prompt, which its clients send) is "system"."""
        return "system" if self.role == "developer" else self.role

    def text(self, where: str) -> str:
        """The message's text: a string, or text parts (OpenAI's content array) joined."""
        if isinstance(self.content, str):
            return self.content
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ParameterError(f"{where}.content[{i}]", "only text content parts are supported")
        return "".join(part["text"] for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)      # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def unsupported(self) -> list[str]:
        extra = super().unsupported()
        for i, m in enumerate(self.messages):
            extra += extras(m, f"messages[{i}].")
        return extra

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)                   # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False

    def limit(self) -> int | None:
        return self.max_tokens

    def alternatives(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str
    add_special: bool = False           # BOS where the model wants one
    parse_special: bool = True          # <|im_start|> and its kind as the special tokens they name
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]
