"""Tool calls (OpenAI's `tools`), as chat templates have models write them (`tool_format`): Hermes's blocks (Qwen2.5's,
Qwen3's, Hermes 2's and 3's templates) or bare JSON objects (Llama 3.1's to 3.3's).

The template renders the tools (its `tools` variable) and the conversation's calls and results (assistant messages'
`tool_calls`, `tool` messages); the model answers with blocks of
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
or with the object alone, {"name": "get_weather", "parameters": {"city": "Paris"}} in Llama 3's words, which
`ToolCalls` takes out of the reply's text as it comes, as vLLM's hermes and llama3_json parsers and llama-server do.
With tool_choice "required" or a named function the reply is one call: the JSON is held to a schema of the functions
(`call_schema`, dpllama.constrain), so that it names one of them with arguments its parameters admit, from the
reply's first token (Hermes's: the prompt ends in `<tool_call>\\n`).
"""
from __future__ import annotations

import json
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def tag_start(text: str, tag: str) -> int:
    """How many of `tag`'s first characters `text` ends with, short of the whole tag."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


# the key of a call's arguments in each format's JSON
ARGUMENTS = {"hermes": "arguments", "json": "parameters"}


def tool_format(template: str | None) -> str | None:
    """How a chat template has the model write its calls: "hermes" (<tool_call> blocks), "json" (the objects alone:
    a template that renders tools without the tags, as Llama 3's), None where it renders no tools or writes calls
    some other way (Mistral's [TOOL_CALLS] list)."""
    if template is None or "tools" not in template or "[TOOL_CALLS]" in template:
        return None
    return "hermes" if OPEN in template else "json"


def hoisted(schema, prefix: str, defs: dict):
    """A function's parameters schema with its definitions moved to `defs` under `prefix` and its $refs renamed to
    match ("#" itself is `prefix`), so that several functions' schemas can sit in one document."""
    if isinstance(schema, list):
        return [hoisted(s, prefix, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, inner in value.items():
                defs[f"{prefix}.{name}"] = hoisted(inner, prefix, defs)
        elif key == "$ref" and isinstance(value, str):
            parts = value.split("/")
            out[key] = f"#/$defs/{prefix}" if value == "#" else f"#/$defs/{prefix}.{parts[-1]}" if len(parts) == 3 \
                else value
        else:
            out[key] = hoisted(value, prefix, defs)
    return out


def call_schema(functions: list[dict], name: str | None = None, arguments: str = "arguments") -> dict:
    """The JSON schema of one call of `functions` (of the one called `name` where given): {"name": its name,
    `arguments`: what its parameters admit}, any object where it has none."""
    defs, calls = {}, []
    for i, f in enumerate(functions):
        if name is not None and f["name"] != name:
            continue
        params = f.get("parameters") or {"type": "object"}
        defs[f"f{i}"] = hoisted(params, f"f{i}", defs)
        calls.append({"type": "object", "required": ["name", arguments],
                      "properties": {"name": {"const": f["name"]}, arguments: {"$ref": f"#/$defs/f{i}"}}})
    return {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "$defs": defs}


class ToolCalls:
    """A chat reply's content as it comes, its tool calls taken out: <tool_call> blocks, and JSON objects written
    bare where a call may begin (the reply's start, or right after a call, whitespace aside), as llama.cpp's Hermes
    parser takes them too (Qwen2.5-Coder writes its calls so). A block or object whose JSON names one of `names` and
    has an object for arguments is a call; any other stays in the content as the model wrote it, tags and all
    (`single`: every one after the first call, parallel_tool_calls false). What could be the start of a tag or of a
    call, and whitespace that may only separate calls, is held back until the text after it decides. `opened`: the
    prompt ended inside a block (a forced call)."""

    def __init__(self, names: set[str], opened: bool = False, single: bool = False):
        self.names, self.inside, self.single = names, opened, single
        self.held, self.space, self.made = "", "", 0
        self.fresh = True       # no content since the reply's start or the last call: a bare call may come

    def push(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """The content and the calls that the new `text` lets go (`final`: the reply has ended, all of it); a call
        carries its `index` among the reply's calls."""
        held, content, calls = self.held + text, "", []
        while held:
            if self.inside:
                end = held.find(CLOSE)
                if end < 0 and not final:
                    break
                block, held = (held, "") if end < 0 else (held[:end], held[end + len(CLOSE):])
                content += self.take(block, OPEN + block + (CLOSE if end >= 0 else ""), calls)
                self.inside = False
                continue
            body = held.lstrip()
            if self.fresh and body.startswith("{"):
                if not final and "}" not in text:
                    break               # the object can end only at a "}": no new one, no need to read it again
                try:
                    _, n = json.JSONDecoder().raw_decode(body)
                except ValueError:
                    if not final:
                        break           # the object may still be coming
                    n = len(body)
                content += held[:len(held) - len(body)] + self.take(body[:n], body[:n], calls)
                held = body[n:]
                continue
            start = held.find(OPEN)
            if start < 0:
                keep = 0 if final else tag_start(held, OPEN)
                part, held = held[:len(held) - keep], held[len(held) - keep:]
                content += part
                self.fresh = self.fresh and not part.strip()
                break
            content += held[:start]
            self.fresh = self.fresh and not held[:start].strip()
            held, self.inside = held[start + len(OPEN):], True
        self.held = held
        content = self.space + content
        said = content.rstrip()
        self.space = content[len(said):]
        if final and not self.made:
            said, self.space = said + self.space, ""
        return said, calls

    def take(self, block: str, written: str, calls: list[dict]) -> str:
        """Add the call `block` makes to `calls` and return no content, or return the block as it was `written`."""
        call = self.parse(block)
        if call is None:
            self.fresh = False
            return written
        calls.append({"index": self.made, **call})
        self.made += 1
        self.fresh = True
        return ""

    def parse(self, block: str) -> dict | None:
        """The call a block's JSON makes, in OpenAI's shape (its arguments as JSON text), None where it makes none."""
        if self.single and self.made:
            return None
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
