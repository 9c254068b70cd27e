"""The request bodies the server takes, as OpenAI's API and llama.cpp's server spell them, and their limits.

A parameter this server does not implement (tools, n > 1, logit_bias, echo, ...) is refused with 400 naming
it, never ignored: `unsupported` lists a body's fields that no model here declares. A field sent with a value
that asks for nothing (null, an empty list or object, OpenAI's default such as `tool_choice: "none"`) counts as
not sent: clients and frameworks send them with every request.

Values are JSON's own types (pydantic's strict mode): pydantic's default took "1" and true as numbers, 0 as
false and "yes" as true, so that a parameter sent as the wrong type was served as something else. A whole
number may be written 2.0 (JSON's numbers have no separate integers).
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, TypeAdapter,
                      model_validator)
from pydantic_core import PydanticCustomError

from dpllama.constrain import Grammar, SchemaError, grammar
from dpllama.errors import DpllamaError
from dpllama.serve import REASONING_FORMATS
from dpllama.tokenizer import check_template_kwargs


class ParameterError(Exception):
    """A request's parameter that cannot be served: HTTP 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# the values of fields this server does not implement that ask for what it does anyway (OpenAI's defaults)
NEUTRAL = {"tool_choice": "none", "parallel_tool_calls": True, "best_of": 1, "store": False, "suffix": "", "n": 1,
           "echo": False}


def asks_nothing(name: str, value) -> bool:
    return value is None or value == [] or value == {} or (
        name in NEUTRAL and type(value) is type(NEUTRAL[name]) and value == NEUTRAL[name])


def extras(model: BaseModel, prefix: str = "") -> list[str]:
    """The model's fields that it does not declare, sent with a value that asks for something."""
    return [prefix + name for name, value in (model.model_extra or {}).items() if not asks_nothing(name, value)]


def integral(value):
    """A number with no fraction as the int it is: strict mode refuses 2.0 where a whole number goes."""
    return int(value) if type(value) is float and value.is_integer() else value


Whole = Annotated[int, BeforeValidator(integral)]
Real = Annotated[float, AllowInfNan(False)]     # "should be a finite number", not "less than or equal to 2" for NaN


def text_or_list(item, expected: str) -> PlainValidator:
    """A string or a list of `item`, whose errors name the field or the list's item ("stop", "stop[1]"): pydantic's
    union names each member's failure at a place of its own ("stop.str", "stop.list[str].1"), which no client sent."""
    items = TypeAdapter(list[item], config=ConfigDict(strict=True))

    def check(value):
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return items.validate_python(value)
        raise PydanticCustomError("text_or_list_type", f"Input should be {expected}")
    return PlainValidator(check)


# response_format's kinds and the fields each takes (json_object's `schema` is llama-server's)
FORMATS = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}
JSON_SCHEMA = {"name": str, "description": str, "schema": dict, "strict": bool}


def json_grammar(value) -> Grammar | None:
    """response_format: text (OpenAI's default: None), JSON mode (json_object: any object, or the `schema` given
    with it, as llama-server takes it) or Structured Outputs (json_schema: {"name": ..., "schema": {...}}, the
    document its schema admits; without a schema any object), as the grammar (dpllama.constrain) that holds the
    reply to it."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in FORMATS:
        raise PydanticCustomError("response_format", 'Input should be {"type": "text"}, {"type": "json_object"} or '
                                                     '{"type": "json_schema", "json_schema": {...}}')
    for key in value:
        if key not in FORMATS[kind]:
            raise PydanticCustomError("response_format", f'{kind} takes no field "{key}"')
    if kind == "text":
        return None
    schema = value.get("schema")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise PydanticCustomError("response_format", 'json_schema should be an object: {"name": ..., "schema": '
                                                         '{...}}')
        for key, want in spec.items():
            if key not in JSON_SCHEMA or not isinstance(want, JSON_SCHEMA[key]):
                raise PydanticCustomError("response_format", f'json_schema.{key} should be of '
                                          f'{", ".join(f"{k} ({t.__name__})" for k, t in JSON_SCHEMA.items())}')
        schema = spec.get("schema")
    elif schema is not None and not isinstance(schema, dict):
        raise PydanticCustomError("response_format", "schema should be a JSON schema (an object)")
    try:
        return grammar(schema)
    except SchemaError as e:
        raise PydanticCustomError("response_format", f"the JSON schema: {e}") from None


class Body(BaseModel):
    """A JSON object of the API's: null for a field with a default is that default, as OpenAI takes `temperature:
    null` and the like (clients send them), and a required field's null is its error."""
    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def nulls_unset(cls, data):
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or (k in fields and fields[k].is_required())}


class StreamOptions(Body):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Sampling(Body):
    """What chat and completions share (n and echo, whose only value here is OpenAI's default, are NEUTRAL's)."""
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Whole | None = Field(None, ge=1)
    temperature: Real = Field(1.0, ge=0, le=2)
    top_p: Real = Field(1.0, ge=0, le=1)
    top_k: Whole = Field(0, ge=0)                               # llama.cpp's and vLLM's extension
    stop: Annotated[str | list[str] | None, text_or_list(str, "a string or a list of strings")] = None
    seed: Whole | None = None
    presence_penalty: Real = Field(0.0, ge=-2, le=2)
    frequency_penalty: Real = Field(0.0, ge=-2, le=2)
    repeat_penalty: Real = Field(1.0, gt=0, le=10)              # llama.cpp's
    repeat_last_n: Whole = Field(64, ge=-1)                     # llama.cpp's window of the three penalties
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                                     # an end user's id: no effect on the output
    reply_format: Annotated[Grammar | None, PlainValidator(json_grammar)] = Field(None, alias="response_format")

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4:
            raise ParameterError("stop", f"at most 4 stop sequences, found {len(stops)}")
        return stops

    def unsupported(self) -> list[str]:
        """Fields sent with a value that this server does not implement, in the body's order."""
        return extras(self) + (extras(self.stream_options, "stream_options.") if self.stream_options else [])


class CalledFunction(Body):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str              # JSON text, as OpenAI writes it


class ToolCall(Body):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"]
    function: CalledFunction


class Message(Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null only for an assistant's message that calls tools, as OpenAI takes it
    content: Annotated[str | list[dict] | None, text_or_list(dict, "a string or a list of content parts")] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None    # an assistant's
    tool_call_id: str | None = None             # a tool's: the call it answers

    def for_template(self, where: str) -> dict:
        """The message as chat templates take it (transformers' shape): the role as they know it, the text, an
        assistant's calls with their arguments as objects (Qwen's template writes them with tojson), a tool's
        result with the call's id."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ParameterError(f"{where}.content", f"{where}.content is required (null only for an assistant's "
                                                     f"message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ParameterError(f"{where}.tool_calls", "only an assistant's message has tool_calls")
        message = {"role": self.template_role, "content": "" if self.content is None else self.text(where)}
        if self.tool_calls:
            message["tool_calls"] = []
            for i, call in enumerate(self.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise ParameterError(f"{where}.tool_calls[{i}].function.arguments",
                                         f"{where}.tool_calls[{i}].function.arguments should be a JSON object's text")
                message["tool_calls"].append({"id": call.id, "type": "function",
                                              "function": {"name": call.function.name, "arguments": arguments}})
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

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


class Function(Body):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")        # OpenAI's names
    description: str | None = None
    parameters: dict | None = None                              # a JSON schema; none: no parameters
    strict: bool | None = None


class Tool(Body):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: Function


class ChosenFunction(Body):
    model_config = ConfigDict(extra="forbid")
    name: str


class ChosenTool(Body):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChosenTool | None = None     # None: "auto" with tools
    parallel_tool_calls: bool = True
    max_completion_tokens: Whole | None = Field(None, ge=1)    # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Whole | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict | None = None                    # llama.cpp's and vLLM's: the template's extra variables
    reasoning_format: Literal[REASONING_FORMATS] | None = None  # llama.cpp's; None: --reasoning-format's

    def template_kwargs(self, server: dict) -> dict:
        """The chat template's extra variables: the server's (--chat-template-kwargs), and the request's over them."""
        try:
            return check_template_kwargs({**server, **(self.chat_template_kwargs or {})})
        except DpllamaError as e:
            raise ParameterError("chat_template_kwargs", f"chat_template_kwargs: {e}") from None

    def unsupported(self) -> list[str]:
        extra = super().unsupported()
        for i, m in enumerate(self.messages):
            extra += extras(m, f"messages[{i}].")
        return extra

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def functions(self) -> list[dict]:
        """The functions the reply may call ([] where none may: no tools, or tool_choice "none"), as dicts."""
        if not self.tools:
            if self.tool_choice not in (None, "none", "auto"):
                raise ParameterError("tool_choice", "tool_choice asks for a call, and there are no tools")
            return []
        names = [t.function.name for t in self.tools]
        if len(set(names)) < len(names):
            raise ParameterError("tools", "tools: two functions have the same name")
        if isinstance(self.tool_choice, ChosenTool) and self.tool_choice.function.name not in names:
            raise ParameterError("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is "
                                                f"none of the tools")
        return [] if self.tool_choice == "none" else [t.function.model_dump(exclude_none=True) for t in self.tools]

    def forced(self) -> str | None:
        """The function the reply must call: its name, "" for any (tool_choice "required"), None where the model
        chooses (auto) or calls none."""
        if isinstance(self.tool_choice, ChosenTool):
            return self.tool_choice.function.name
        return "" if self.tool_choice == "required" else None

    def alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: Annotated[str | list[int], text_or_list(Whole, "a string or a list of token ids")]
    max_tokens: Whole | None = Field(16, ge=1)                 # OpenAI's default for completions
    logprobs: Whole | None = Field(None, ge=0, le=5)

    def limit(self) -> int | None:
        return self.max_tokens

    def alternatives(self) -> int | None:
        return self.logprobs


class TokenizeRequest(Body):
    model_config = ConfigDict(extra="forbid")
    content: str
    add_special: bool = False           # BOS where the model wants one
    parse_special: bool = True          # <|im_start|> and its kind as the special tokens they name
    with_pieces: bool = False


class DetokenizeRequest(Body):
    model_config = ConfigDict(extra="forbid")
    tokens: list[Whole]
